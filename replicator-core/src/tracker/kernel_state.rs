//! `ktrack.state`: what the kernel tracker (`harness track`) persists, byte for byte (see
//! `docs/FORMAT.md`). The tracker itself lives in the harness, which alone knows Linux devices;
//! its state format lives here with every other format, so the fuzz targets reach its parser.
//!
//! ```text
//! off  len  field (integers little-endian)
//!   0    8  magic "RPLKTRK1"
//!   8   16  generation
//!  24    8  epoch: the current epoch's number
//!  32    8  acknowledged epoch (0 = none)
//!  40    1  flags: 1 lost, 2 clean stop, 4 frozen epoch follows, 8 the frozen epoch was frozen
//!           while lost; other bits must be 0
//!  41   16  boot id the counters below belong to
//!  57    4  device major
//!  61    4  device minor
//!  65    8  device size in bytes
//!  73    8  device disk sequence number (0 = the kernel has none)
//!  81    8  writes completed       } the device's counters when the marks below were complete
//!  89    8  sectors written        }
//!  97    8  discards completed     }
//! 105    8  sectors discarded      }
//! 113    2  b = length of the loop backing file path (0 = not a loop device), at most 4096
//! 115    b  backing file path, UTF-8
//!   +    4  r = length of the lost reason, at most 1024
//!   +    r  lost reason, UTF-8 (empty unless lost)
//!   +    8  c = length of the current bitmap
//!   +    c  current epoch's marks (RPLBMAP1)
//!   if flag 4:
//!   +    8  frozen epoch's number
//!   +    8  f = length of the frozen bitmap
//!   +    f  frozen epoch's marks (RPLBMAP1)
//! end-4  4  CRC-32 of every byte before it
//! ```

use crate::bitmap::SectorBitmap;
use crate::tracker::{GENERATION_LEN, Generation};

/// The block device counters that move when data changes, from `/sys/dev/block/M:m/stat`
/// (fields 5, 7, 12 and 14: writes completed, sectors written, discards completed, sectors
/// discarded). Write-zeroes requests count as writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounters {
    /// Write requests completed.
    pub writes: u64,
    /// Sectors written.
    pub sectors_written: u64,
    /// Discard requests completed.
    pub discards: u64,
    /// Sectors discarded.
    pub sectors_discarded: u64,
}

impl std::fmt::Display for WriteCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} writes / {} sectors written, {} discards / {} sectors discarded",
            self.writes, self.sectors_written, self.discards, self.sectors_discarded
        )
    }
}

/// The state file's magic.
pub const MAGIC: &[u8; 8] = b"RPLKTRK1";
/// The state file's name in the tracker's state directory.
pub const STATE_FILE: &str = "ktrack.state";
/// Longest lost reason kept.
pub const LOST_REASON_BYTES_MAX: usize = 1024;
/// Longest backing file path kept.
pub const BACKING_PATH_BYTES_MAX: usize = 4096;

const FLAG_LOST: u8 = 1;
const FLAG_CLEAN: u8 = 2;
const FLAG_FROZEN: u8 = 4;
const FLAG_FROZEN_LOST: u8 = 8;
const FIXED_LEN: usize = 115;

/// The device a state belongs to, and where its counters stood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStamp {
    /// Boot the counters belong to.
    pub boot_id: [u8; 16],
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Disk sequence number.
    pub diskseq: u64,
    /// Counters when the marks were complete.
    pub counters: WriteCounters,
    /// Loop backing file.
    pub backing_file: Option<String>,
}

/// A frozen epoch, as persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrozenState {
    /// Its number.
    pub epoch: u64,
    /// Its marks.
    pub bitmap: SectorBitmap,
    /// It was frozen while tracking was lost.
    pub lost: bool,
}

/// Everything in `ktrack.state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackState {
    /// Names this state; new when the state is made anew.
    pub generation: Generation,
    /// The current epoch's number.
    pub epoch: u64,
    /// The newest epoch the target applied.
    pub acked_epoch: u64,
    /// Why the marks cannot be trusted, if they cannot.
    pub lost: Option<String>,
    /// Written by a clean stop (the last thing the tracker wrote).
    pub clean_stop: bool,
    /// The device and its counters.
    pub device: DeviceStamp,
    /// The current epoch's marks.
    pub current: SectorBitmap,
    /// The frozen epoch, if a cycle had one.
    pub frozen: Option<FrozenState>,
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes a state (reasons and paths longer than their limits are cut).
pub fn encode(s: &TrackState) -> Vec<u8> {
    let backing = truncate_utf8(
        s.device.backing_file.as_deref().unwrap_or(""),
        BACKING_PATH_BYTES_MAX,
    )
    .as_bytes();
    let reason = truncate_utf8(s.lost.as_deref().unwrap_or(""), LOST_REASON_BYTES_MAX).as_bytes();
    let current = s.current.encode();
    let frozen = s.frozen.as_ref().map(|f| (f.epoch, f.bitmap.encode()));
    let mut out =
        Vec::with_capacity(FIXED_LEN + backing.len() + 4 + reason.len() + 8 + current.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&s.generation.0);
    out.extend_from_slice(&s.epoch.to_le_bytes());
    out.extend_from_slice(&s.acked_epoch.to_le_bytes());
    let mut flags = 0u8;
    if s.lost.is_some() {
        flags |= FLAG_LOST;
    }
    if s.clean_stop {
        flags |= FLAG_CLEAN;
    }
    if let Some(f) = &s.frozen {
        flags |= FLAG_FROZEN;
        if f.lost {
            flags |= FLAG_FROZEN_LOST;
        }
    }
    out.push(flags);
    let d = &s.device;
    out.extend_from_slice(&d.boot_id);
    out.extend_from_slice(&d.major.to_le_bytes());
    out.extend_from_slice(&d.minor.to_le_bytes());
    out.extend_from_slice(&d.size_bytes.to_le_bytes());
    out.extend_from_slice(&d.diskseq.to_le_bytes());
    for v in [
        d.counters.writes,
        d.counters.sectors_written,
        d.counters.discards,
        d.counters.sectors_discarded,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(backing.len() as u16).to_le_bytes());
    out.extend_from_slice(backing);
    out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(&(current.len() as u64).to_le_bytes());
    out.extend_from_slice(&current);
    if let Some((epoch, bytes)) = &frozen {
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated in {what} at byte {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn text(&mut self, n: usize, what: &str) -> Result<String, String> {
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn bitmap(&mut self, what: &str) -> Result<SectorBitmap, String> {
        let len =
            usize::try_from(self.u64(what)?).map_err(|_| format!("{what} length overflows"))?;
        SectorBitmap::decode(self.take(len, what)?).map_err(|e| format!("{what}: {e}"))
    }
}

/// Decodes a state file; the error says what is damaged, and where.
pub fn decode(bytes: &[u8]) -> Result<TrackState, String> {
    if bytes.len() < FIXED_LEN + 4 + 8 + 4 {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if stored != crc32fast::hash(body) {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader {
        bytes: body,
        pos: 0,
    };
    if r.take(8, "magic")? != MAGIC {
        return Err("bad magic (not a kernel tracker state)".into());
    }
    let generation = Generation(r.array::<GENERATION_LEN>("generation")?);
    let epoch = r.u64("epoch")?;
    let acked_epoch = r.u64("acknowledged epoch")?;
    let flags = r.take(1, "flags")?[0];
    if flags & !(FLAG_LOST | FLAG_CLEAN | FLAG_FROZEN | FLAG_FROZEN_LOST) != 0 {
        return Err(format!("unknown flags {flags:#04x}"));
    }
    let boot_id = r.array::<16>("boot id")?;
    let major = r.u32("major")?;
    let minor = r.u32("minor")?;
    let size_bytes = r.u64("size")?;
    let diskseq = r.u64("disk sequence number")?;
    let counters = WriteCounters {
        writes: r.u64("counters")?,
        sectors_written: r.u64("counters")?,
        discards: r.u64("counters")?,
        sectors_discarded: r.u64("counters")?,
    };
    let backing_len = u16::from_le_bytes(r.array("backing file length")?) as usize;
    if backing_len > BACKING_PATH_BYTES_MAX {
        return Err(format!("backing file path of {backing_len} bytes"));
    }
    let backing = r.text(backing_len, "backing file path")?;
    let reason_len = r.u32("lost reason length")? as usize;
    if reason_len > LOST_REASON_BYTES_MAX {
        return Err(format!("lost reason of {reason_len} bytes"));
    }
    let reason = r.text(reason_len, "lost reason")?;
    let current = r.bitmap("current bitmap")?;
    let frozen = if flags & FLAG_FROZEN != 0 {
        let epoch = r.u64("frozen epoch")?;
        let bitmap = r.bitmap("frozen bitmap")?;
        Some(FrozenState {
            epoch,
            bitmap,
            lost: flags & FLAG_FROZEN_LOST != 0,
        })
    } else {
        None
    };
    if r.pos != body.len() {
        return Err(format!("{} trailing bytes", body.len() - r.pos));
    }
    let sectors = size_bytes / 512;
    for b in std::iter::once(&current).chain(frozen.as_ref().map(|f| &f.bitmap)) {
        if b.disk_sectors() != sectors {
            return Err(format!(
                "a bitmap of {} sectors for a device of {sectors}",
                b.disk_sectors()
            ));
        }
    }
    Ok(TrackState {
        generation,
        epoch,
        acked_epoch,
        lost: (flags & FLAG_LOST != 0).then_some(reason),
        clean_stop: flags & FLAG_CLEAN != 0,
        device: DeviceStamp {
            boot_id,
            major,
            minor,
            size_bytes,
            diskseq,
            counters,
            backing_file: (!backing.is_empty()).then_some(backing),
        },
        current,
        frozen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TrackState {
        let mut current = SectorBitmap::new(2048);
        let _ = current.mark_sectors(8, 24);
        let mut frozen = SectorBitmap::new(2048);
        let _ = frozen.mark_sectors(1000, 1);
        TrackState {
            generation: Generation([7; GENERATION_LEN]),
            epoch: 5,
            acked_epoch: 3,
            lost: Some("events were dropped".into()),
            clean_stop: true,
            device: DeviceStamp {
                boot_id: [9; 16],
                major: 7,
                minor: 3,
                size_bytes: 2048 * 512,
                diskseq: 42,
                counters: WriteCounters {
                    writes: 1,
                    sectors_written: 2,
                    discards: 3,
                    sectors_discarded: 4,
                },
                backing_file: Some("/tmp/src.img".into()),
            },
            current,
            frozen: Some(FrozenState {
                epoch: 4,
                bitmap: frozen,
                lost: true,
            }),
        }
    }

    #[test]
    fn round_trip_and_layout() -> Result<(), String> {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(&bytes[0..8], MAGIC);
        assert_eq!(&bytes[8..24], &[7; 16]);
        assert_eq!(
            bytes[40],
            FLAG_LOST | FLAG_CLEAN | FLAG_FROZEN | FLAG_FROZEN_LOST
        );
        assert_eq!(&bytes[57..61], &7u32.to_le_bytes());
        assert_eq!(&bytes[113..115], &12u16.to_le_bytes());
        assert_eq!(&bytes[115..127], b"/tmp/src.img");
        assert_eq!(decode(&bytes)?, s);
        let plain = TrackState {
            lost: None,
            clean_stop: false,
            frozen: None,
            device: DeviceStamp {
                backing_file: None,
                ..s.device.clone()
            },
            ..s
        };
        assert_eq!(decode(&encode(&plain))?, plain);
        Ok(())
    }

    #[test]
    fn damage_is_reported_never_trusted() {
        let bytes = encode(&sample());
        for i in [0, 9, 40, 60, 100, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                decode(&bad).is_err(),
                "a flipped byte at {i} went unnoticed"
            );
        }
        for n in [0, 10, FIXED_LEN, bytes.len() - 1] {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
    }
}
