//! What the kernel says about a block device: its numbers, size, identity (for a loop device, the
//! backing file and the attachment's disk sequence number) and I/O counters, from sysfs.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use replicator_core::tracker::kernel_state::WriteCounters;

/// Parses the contents of a block device's `stat` file.
pub fn parse_stat(text: &str) -> Result<WriteCounters> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| f.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("`{}` is not a list of counters", text.trim()))?;
    if fields.len() < 11 {
        bail!(
            "`{}` has {} fields, expected at least 11",
            text.trim(),
            fields.len()
        );
    }
    Ok(WriteCounters {
        writes: fields[4],
        sectors_written: fields[6],
        // Kernels before 4.18 have no discard fields, and count discards as writes.
        discards: fields.get(11).copied().unwrap_or(0),
        sectors_discarded: fields.get(13).copied().unwrap_or(0),
    })
}

/// A whole block device, as the kernel names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDev {
    /// The path it was given as.
    pub path: PathBuf,
    /// Its kernel name (`loop3`).
    pub name: String,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// For a loop device, the file it is attached to.
    pub backing_file: Option<String>,
    /// The kernel's disk sequence number, new at every loop attachment or media change (0 where
    /// the kernel has none).
    pub diskseq: u64,
    /// The logical block size: the alignment of direct I/O.
    pub logical_block_bytes: u64,
}

/// Major and minor numbers of a `st_rdev`, as glibc's `gnu_dev_major`/`gnu_dev_minor` split it.
pub fn split_rdev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn read_trimmed(path: &Path) -> Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = read_trimmed(path)?;
    text.parse()
        .with_context(|| format!("{} holds `{text}`, not a number", path.display()))
}

impl BlockDev {
    /// Looks up the block device at `path` (a device node such as `/dev/loop3`). Partitions are
    /// refused: their events are reported against the whole disk, so track the whole disk.
    pub fn resolve(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
        if !meta.file_type().is_block_device() {
            bail!(
                "{} is not a block device; the kernel tracker follows block devices (attach an \
                 image file with `losetup --find --show --direct-io=on FILE`)",
                path.display()
            );
        }
        let (major, minor) = split_rdev(meta.rdev());
        let sys = Self::sysfs_of(major, minor);
        if sys.join("partition").exists() {
            bail!(
                "{} ({major}:{minor}) is a partition; the kernel tracker follows whole disks: \
                 track the disk it is on",
                path.display()
            );
        }
        let real = fs::canonicalize(&sys).with_context(|| {
            format!(
                "{} ({major}:{minor}) has no sysfs entry {}",
                path.display(),
                sys.display()
            )
        })?;
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let size_bytes = read_u64(&sys.join("size"))?.saturating_mul(512);
        let backing_file = match fs::read_to_string(sys.join("loop/backing_file")) {
            Ok(s) => Some(s.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading {}", sys.join("loop/backing_file").display())
                });
            }
        };
        let diskseq = if sys.join("diskseq").exists() {
            read_u64(&sys.join("diskseq"))?
        } else {
            0
        };
        let logical_block_bytes = read_u64(&sys.join("queue/logical_block_size"))?;
        if logical_block_bytes == 0 || !logical_block_bytes.is_power_of_two() {
            bail!(
                "{} reports a logical block size of {logical_block_bytes}",
                path.display()
            );
        }
        Ok(BlockDev {
            path: path.to_path_buf(),
            name,
            major,
            minor,
            size_bytes,
            backing_file,
            diskseq,
            logical_block_bytes,
        })
    }

    fn sysfs_of(major: u32, minor: u32) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
    }

    /// The kernel's internal device number, as trace event filters compare it.
    pub fn kernel_dev(&self) -> u32 {
        (self.major << 20) | self.minor
    }

    /// `loop3 (7:3)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({}:{})", self.path.display(), self.major, self.minor);
        if let Some(b) = &self.backing_file {
            s.push_str(&format!(" over {b}"));
        }
        s
    }

    /// The device's size and disk sequence number now.
    pub fn size_and_diskseq(&self) -> Result<(u64, u64)> {
        let sys = Self::sysfs_of(self.major, self.minor);
        let size = read_u64(&sys.join("size"))?.saturating_mul(512);
        let diskseq = if sys.join("diskseq").exists() {
            read_u64(&sys.join("diskseq"))?
        } else {
            0
        };
        Ok((size, diskseq))
    }

    /// The device's write and discard counters now.
    pub fn counters(&self) -> Result<WriteCounters> {
        let path = Self::sysfs_of(self.major, self.minor).join("stat");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        parse_stat(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): device counters restart at boot.
pub fn boot_id() -> Result<[u8; 16]> {
    let path = Path::new("/proc/sys/kernel/random/boot_id");
    let text = read_trimmed(path)?;
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    if hex.len() != 32 {
        bail!("{} holds `{text}`, not a UUID", path.display());
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("{} holds `{text}`, not a UUID", path.display()))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() -> Result<()> {
        let c = parse_stat(
            "     469        0   929056     1144     4942    76776   653632     6538        0      852     7686        0        0        0        0       14        3\n",
        )?;
        assert_eq!(
            c,
            WriteCounters {
                writes: 4942,
                sectors_written: 653632,
                discards: 0,
                sectors_discarded: 0
            }
        );
        let c = parse_stat("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17")?;
        assert_eq!(
            (c.writes, c.sectors_written, c.discards, c.sectors_discarded),
            (5, 7, 12, 14)
        );
        assert!(parse_stat("1 2 3").is_err());
        assert!(parse_stat("1 2 x 4 5 6 7 8 9 10 11").is_err());
        Ok(())
    }

    #[test]
    fn rdev_split() {
        assert_eq!(split_rdev(0x0703), (7, 3));
        // Large minors spill into the high bits.
        assert_eq!(
            split_rdev((259 << 8) | 0x12 | (0x345 << 20)),
            (259, 0x34512)
        );
    }
}
