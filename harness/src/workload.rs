//! Disk contents and write workloads: file-system-like images and database-like churn.

use anyhow::{Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::device::BlockDevice;

const WORDS: &[&str] = &[
    "the",
    "replica",
    "sector",
    "cycle",
    "block",
    "disk",
    "page",
    "log",
    "commit",
    "checkpoint",
    "mysql",
    "innodb",
    "buffer",
    "pool",
    "flush",
    "write",
    "read",
    "index",
    "table",
    "row",
    "user",
    "order",
    "id",
    "status",
    "ok",
    "error",
    "warning",
    "info",
    "debug",
    "2026-11-21",
    "GET",
    "/api/v1",
    "200",
    "404",
    "json",
    "config",
    "server",
    "client",
    "timeout",
    "retry",
];

/// The kinds of 1 MiB segments an image is filled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    Zero,
    Text,
    Binary,
    Random,
}

fn fill_text(rng: &mut ChaCha8Rng, buf: &mut [u8]) {
    let mut pos = 0;
    while pos < buf.len() {
        let w = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
        let sep: &[u8] = if rng.random_range(0..12) == 0 {
            b"\n"
        } else {
            b" "
        };
        for &b in w.iter().chain(sep.iter()) {
            if pos < buf.len() {
                buf[pos] = b;
                pos += 1;
            }
        }
    }
}

fn fill_binary(rng: &mut ChaCha8Rng, buf: &mut [u8]) {
    // Executable- and database-like: records of small integers, pointers and padding.
    let base: u64 = rng.random::<u64>() & 0x0000_7fff_ffff_f000;
    for (i, rec) in buf.chunks_mut(32).enumerate() {
        let vals = [
            (i as u64).to_le_bytes(),
            (base + (i as u64) * 64).to_le_bytes(),
            u64::from(rng.random_range(0u32..256)).to_le_bytes(),
            [0u8; 8],
        ];
        for (dst, src) in rec.iter_mut().zip(vals.iter().flatten()) {
            *dst = *src;
        }
    }
}

/// Fills `dev` with file-system-like content: text, binary records, random (compressed or
/// encrypted files) and zero (free space) regions in 1 MiB segments. Zero segments are not
/// written, so an image file stays sparse. Calls `progress` with bytes done.
pub fn fill_image(dev: &dyn BlockDevice, seed: u64, mut progress: impl FnMut(u64)) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let seg = 1u64 << 20;
    let mut buf = vec![0u8; seg as usize];
    let size = dev.size_bytes();
    let mut off = 0;
    while off < size {
        let n = seg.min(size - off) as usize;
        let kind = match rng.random_range(0..100) {
            0..30 => Segment::Zero,
            30..55 => Segment::Text,
            55..75 => Segment::Binary,
            _ => Segment::Random,
        };
        match kind {
            Segment::Zero => {}
            Segment::Text => fill_text(&mut rng, &mut buf[..n]),
            Segment::Binary => fill_binary(&mut rng, &mut buf[..n]),
            Segment::Random => rng.fill_bytes(&mut buf[..n]),
        }
        if kind != Segment::Zero {
            dev.write_at(&buf[..n], off)
                .with_context(|| format!("filling {} at offset {off}", dev.name()))?;
        }
        off += n as u64;
        progress(n as u64);
    }
    dev.flush()?;
    Ok(())
}

/// A write pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// 16 KiB random page writes (InnoDB).
    Innodb,
    /// 8 KiB random page writes (PostgreSQL).
    Postgres,
    /// Sequential appends of 4-64 KiB to a log region.
    Log,
}

impl Pattern {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Innodb => "innodb 16K",
            Pattern::Postgres => "postgres 8K",
            Pattern::Log => "log append",
        }
    }
}

/// Writes `total_bytes` in `pattern` to `dev` (through a tracker, so every write is marked).
/// `log_cursor` carries the append position of the log pattern between calls. Returns the
/// number of writes.
pub fn run_pattern(
    dev: &dyn BlockDevice,
    pattern: Pattern,
    total_bytes: u64,
    rng: &mut ChaCha8Rng,
    log_cursor: &mut u64,
) -> Result<u64> {
    let size = dev.size_bytes();
    let mut written = 0u64;
    let mut writes = 0u64;
    let mut page = vec![0u8; 64 << 10];
    // The log lives in the last eighth of the disk.
    let log_start = size - size / 8;
    while written < total_bytes {
        let (len, off) = match pattern {
            Pattern::Innodb | Pattern::Postgres => {
                let len: u64 = if pattern == Pattern::Innodb {
                    16 << 10
                } else {
                    8 << 10
                };
                let pages = size / len;
                (len, rng.random_range(0..pages) * len)
            }
            Pattern::Log => {
                let len = u64::from(rng.random_range(1u32..=16)) * 4096;
                if *log_cursor < log_start || *log_cursor + len > size {
                    *log_cursor = log_start;
                }
                let off = *log_cursor;
                *log_cursor += len;
                (len, off)
            }
        };
        let buf = &mut page[..len as usize];
        match pattern {
            Pattern::Log => fill_text(rng, buf),
            _ => {
                // A page: header, some rows of text, free space.
                fill_binary(rng, &mut buf[..64]);
                let used = rng.random_range(len / 4..len) as usize;
                fill_text(rng, &mut buf[64..used]);
                buf[used..].fill(0);
            }
        }
        dev.write_at(buf, off)
            .with_context(|| format!("{} write at offset {off}", pattern.name()))?;
        written += len;
        writes += 1;
    }
    Ok(writes)
}
