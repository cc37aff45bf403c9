//! Disk contents and write workloads: file-system-like images, and seeded generators of
//! database-like churn (InnoDB and PostgreSQL pages, log appends, a zipf hot spot, a full
//! overwrite, zero pages, discards) at an op or byte count and an optional rate.
//!
//! Every write goes through [`BlockDevice::write_at`] and every discard through
//! [`BlockDevice::discard`] of the device given: a tracker wrapper marks them as it would an
//! application's, and a device node (a loop device under the kernel tracker) sees them as bios.
//! The same seed gives the same operations, offsets and bytes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// 16 KiB random page writes (InnoDB).
    Innodb,
    /// 8 KiB random page writes (PostgreSQL).
    Postgres,
    /// Sequential appends of 4-64 KiB to a log region (the last eighth of the disk).
    Log,
    /// 16 KiB page writes whose pages follow a zipf distribution: a few hot pages take most
    /// writes (a hot spot starting at a seeded page).
    Zipf,
    /// The whole disk written once, sequentially, in 1 MiB writes.
    Overwrite,
    /// 16 KiB pages of zeros written at random pages.
    Zero,
    /// Discards of 64 KiB to 1 MiB (4 KiB aligned) at random offsets.
    Discard,
}

impl Pattern {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Innodb => "innodb 16K",
            Pattern::Postgres => "postgres 8K",
            Pattern::Log => "log append",
            Pattern::Zipf => "zipf 16K",
            Pattern::Overwrite => "full overwrite",
            Pattern::Zero => "zero pages",
            Pattern::Discard => "discard",
        }
    }

    /// The largest single operation, in bytes.
    pub fn op_bytes_max(self) -> u64 {
        match self {
            Pattern::Innodb | Pattern::Zipf | Pattern::Zero => PAGE_INNODB,
            Pattern::Postgres => PAGE_POSTGRES,
            Pattern::Log => LOG_APPEND_MAX,
            Pattern::Overwrite => OVERWRITE_CHUNK,
            Pattern::Discard => DISCARD_MAX,
        }
    }
}

const PAGE_INNODB: u64 = 16 << 10;
const PAGE_POSTGRES: u64 = 8 << 10;
/// Log appends are 1 to 16 pages of 4 KiB.
const LOG_APPEND_MAX: u64 = 64 << 10;
const OVERWRITE_CHUNK: u64 = 1 << 20;
const DISCARD_ALIGN: u64 = 4 << 10;
const DISCARD_MIN: u64 = 64 << 10;
const DISCARD_MAX: u64 = 1 << 20;
/// The zipf exponent when none is given: a strong hot spot (the test
/// `zipf_writes_concentrate_on_a_hot_spot` prints the share the hottest 10% of pages take).
pub const ZIPF_EXPONENT_DEFAULT: f64 = 1.1;
/// The smallest disk a workload runs on: the log region (an eighth) must hold the largest
/// append.
pub const DISK_BYTES_MIN: u64 = 8 * LOG_APPEND_MAX;

/// How much and how fast.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct WorkloadSpec {
    /// What to write.
    pub pattern: Pattern,
    /// Stop once this many bytes were written or discarded (the last operation is whole, so up
    /// to one operation more). Exactly one of `bytes` and `ops`.
    pub bytes: Option<u64>,
    /// Stop after this many operations (writes and discards). Exactly one of `bytes` and `ops`.
    pub ops: Option<u64>,
    /// Pace to at most this many bytes per second (real time); none: as fast as the device goes.
    pub rate_bytes_per_s: Option<u64>,
    /// Seed of offsets, lengths and contents: the same seed gives the same operations.
    pub seed: u64,
    /// The zipf pattern's exponent (> 0); default [`ZIPF_EXPONENT_DEFAULT`].
    pub zipf_exponent: Option<f64>,
}

/// What a workload did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WorkloadReport {
    /// Write operations.
    pub writes: u64,
    /// Bytes they wrote.
    pub bytes_written: u64,
    /// Discard operations.
    pub discards: u64,
    /// Bytes they discarded.
    pub bytes_discarded: u64,
    /// Wall-clock time, flush included.
    pub elapsed_ms: u64,
}

impl WorkloadSpec {
    /// Checks the spec against a device of `disk_bytes`; the error names the field.
    pub fn validate(&self, disk_bytes: u64) -> Result<()> {
        match (self.bytes, self.ops) {
            (Some(_), Some(_)) => bail!(
                "workload spec: set exactly one of `bytes` and `ops`, not both (bytes {:?}, ops {:?})",
                self.bytes,
                self.ops
            ),
            (None, None) => {
                bail!("workload spec: set exactly one of `bytes` and `ops` (neither is set)")
            }
            _ => {}
        }
        if self.rate_bytes_per_s == Some(0) {
            bail!("workload spec: `rate_bytes_per_s` must be at least 1 (or unset for no limit)");
        }
        if let Some(e) = self.zipf_exponent {
            if self.pattern != Pattern::Zipf {
                bail!(
                    "workload spec: `zipf_exponent` applies to the zipf pattern only, not {}",
                    self.pattern.name()
                );
            }
            if !(e.is_finite() && e > 0.0) {
                bail!("workload spec: `zipf_exponent` must be a positive number, got {e}");
            }
        }
        if disk_bytes < DISK_BYTES_MIN || !disk_bytes.is_multiple_of(DISCARD_ALIGN) {
            bail!(
                "workload: the device has {disk_bytes} bytes; workloads need at least \
                 {DISK_BYTES_MIN} bytes in whole 4 KiB pages"
            );
        }
        Ok(())
    }
}

/// One operation of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Write { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

/// Chooses the operations of a pattern and fills their data.
struct Generator<'a> {
    pattern: Pattern,
    rng: &'a mut ChaCha8Rng,
    log_cursor: &'a mut u64,
    size: u64,
    zipf: Option<(Zipf, u64)>,
    overwrite_at: u64,
}

impl<'a> Generator<'a> {
    fn new(
        pattern: Pattern,
        size: u64,
        rng: &'a mut ChaCha8Rng,
        log_cursor: &'a mut u64,
        zipf_exponent: f64,
    ) -> Self {
        let zipf = (pattern == Pattern::Zipf).then(|| {
            let pages = size / PAGE_INNODB;
            // The hot spot starts at a seeded page and wraps around the disk.
            let start = rng.random_range(0..pages);
            (Zipf::new(pages, zipf_exponent), start)
        });
        Generator {
            pattern,
            rng,
            log_cursor,
            size,
            zipf,
            overwrite_at: 0,
        }
    }

    /// The next operation, or none when the pattern is done (a full overwrite reached the end).
    fn next_op(&mut self) -> Option<Op> {
        let size = self.size;
        let page_write = |rng: &mut ChaCha8Rng, len: u64| Op::Write {
            offset: rng.random_range(0..size / len) * len,
            len,
        };
        Some(match self.pattern {
            Pattern::Innodb | Pattern::Zero => page_write(self.rng, PAGE_INNODB),
            Pattern::Postgres => page_write(self.rng, PAGE_POSTGRES),
            Pattern::Log => {
                let log_start = size - size / 8;
                let len = u64::from(self.rng.random_range(1u32..=16)) * 4096;
                if *self.log_cursor < log_start || *self.log_cursor + len > size {
                    *self.log_cursor = log_start;
                }
                let offset = *self.log_cursor;
                *self.log_cursor += len;
                Op::Write { offset, len }
            }
            Pattern::Zipf => {
                let (zipf, start) = self.zipf.as_ref()?;
                let rank = zipf.sample(self.rng);
                let pages = size / PAGE_INNODB;
                Op::Write {
                    offset: (start + rank - 1) % pages * PAGE_INNODB,
                    len: PAGE_INNODB,
                }
            }
            Pattern::Overwrite => {
                if self.overwrite_at >= size {
                    return None;
                }
                let offset = self.overwrite_at;
                let len = OVERWRITE_CHUNK.min(size - offset);
                self.overwrite_at += len;
                Op::Write { offset, len }
            }
            Pattern::Discard => {
                let len = self
                    .rng
                    .random_range(DISCARD_MIN / DISCARD_ALIGN..=DISCARD_MAX / DISCARD_ALIGN)
                    * DISCARD_ALIGN;
                let len = len.min(size);
                let offset =
                    self.rng.random_range(0..=(size - len) / DISCARD_ALIGN) * DISCARD_ALIGN;
                Op::Discard { offset, len }
            }
        })
    }

    /// Fills `buf` with what a write of this pattern holds.
    fn fill(&mut self, buf: &mut [u8]) {
        match self.pattern {
            Pattern::Log => fill_text(self.rng, buf),
            Pattern::Zero | Pattern::Discard => buf.fill(0),
            Pattern::Overwrite => match self.rng.random_range(0..3) {
                0 => fill_text(self.rng, buf),
                1 => fill_binary(self.rng, buf),
                _ => self.rng.fill_bytes(buf),
            },
            Pattern::Innodb | Pattern::Postgres | Pattern::Zipf => {
                // A page: header, some rows of text, free space.
                let len = buf.len() as u64;
                fill_binary(self.rng, &mut buf[..64]);
                let used = self.rng.random_range(len / 4..len) as usize;
                fill_text(self.rng, &mut buf[64..used]);
                buf[used..].fill(0);
            }
        }
    }
}

/// Runs `spec` against `dev`: seeded operations until its byte or op count, paced to its rate,
/// then a flush. Writes go through `dev.write_at`, discards through `dev.discard`.
pub fn run_workload(dev: &dyn BlockDevice, spec: &WorkloadSpec) -> Result<WorkloadReport> {
    let size = dev.size_bytes();
    spec.validate(size)
        .with_context(|| format!("{} on {}", spec.pattern.name(), dev.name()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut log_cursor = 0;
    let mut generator = Generator::new(
        spec.pattern,
        size,
        &mut rng,
        &mut log_cursor,
        spec.zipf_exponent.unwrap_or(ZIPF_EXPONENT_DEFAULT),
    );
    let mut report = WorkloadReport::default();
    let mut buf = vec![0u8; spec.pattern.op_bytes_max().min(size) as usize];
    // Real time on purpose: the rate is the device's, in wall-clock seconds, and this runs only
    // in the harness binary.
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    loop {
        let (ops, bytes) = (
            report.writes + report.discards,
            report.bytes_written + report.bytes_discarded,
        );
        if spec.ops.is_some_and(|n| ops >= n) || spec.bytes.is_some_and(|n| bytes >= n) {
            break;
        }
        let Some(op) = generator.next_op() else {
            break;
        };
        match op {
            Op::Write { offset, len } => {
                let data = &mut buf[..len as usize];
                generator.fill(data);
                dev.write_at(data, offset).with_context(|| {
                    format!(
                        "{} write at offset {offset} ({len} bytes)",
                        spec.pattern.name()
                    )
                })?;
                report.writes += 1;
                report.bytes_written += len;
            }
            Op::Discard { offset, len } => {
                dev.discard(offset, len).with_context(|| {
                    format!("{} at offset {offset} ({len} bytes)", spec.pattern.name())
                })?;
                report.discards += 1;
                report.bytes_discarded += len;
            }
        }
        if let Some(rate) = spec.rate_bytes_per_s {
            let done = report.bytes_written + report.bytes_discarded;
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            let ahead = due.saturating_sub(started.elapsed());
            if !ahead.is_zero() {
                // Real sleeps: the harness paces a real device (see above).
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(ahead);
            }
        }
    }
    dev.flush()
        .with_context(|| format!("flushing {} after the workload", dev.name()))?;
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

/// Writes `total_bytes` in `pattern` to `dev` (through a tracker, so every write is marked).
/// `log_cursor` carries the append position of the log pattern between calls. Returns the
/// number of operations. (The demo's rounds share one generator state this way; one-shot
/// workloads use [`run_workload`].)
pub fn run_pattern(
    dev: &dyn BlockDevice,
    pattern: Pattern,
    total_bytes: u64,
    rng: &mut ChaCha8Rng,
    log_cursor: &mut u64,
) -> Result<u64> {
    let size = dev.size_bytes();
    let mut generator = Generator::new(pattern, size, rng, log_cursor, ZIPF_EXPONENT_DEFAULT);
    let mut done = 0u64;
    let mut ops = 0u64;
    let mut page = vec![0u8; pattern.op_bytes_max().min(size) as usize];
    while done < total_bytes {
        let Some(op) = generator.next_op() else {
            break;
        };
        match op {
            Op::Write { offset, len } => {
                let buf = &mut page[..len as usize];
                generator.fill(buf);
                dev.write_at(buf, offset)
                    .with_context(|| format!("{} write at offset {offset}", pattern.name()))?;
                done += len;
            }
            Op::Discard { offset, len } => {
                dev.discard(offset, len)
                    .with_context(|| format!("{} at offset {offset}", pattern.name()))?;
                done += len;
            }
        }
        ops += 1;
    }
    Ok(ops)
}

/// A zipf distribution over `1..=n` with exponent `s` (P(k) proportional to k^-s), sampled by
/// rejection-inversion (W. Hörmann and G. Derflinger, "Rejection-inversion to generate variates
/// from monotone discrete distributions", 1996): constant time and memory per sample, whatever
/// `n`, for any `s > 0`.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    squeeze: f64,
}

impl Zipf {
    /// `n` >= 1 elements, exponent `s` > 0 (checked by the caller).
    pub fn new(n: u64, s: f64) -> Self {
        let n = n.max(1) as f64;
        let mut z = Zipf {
            n,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            squeeze: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(n + 0.5);
        z.squeeze = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// A value in `1..=n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        loop {
            let u01: f64 = rng.random();
            let u = self.h_integral_n + u01 * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.squeeze || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    /// h(x) = x^-s, the density the sampler inverts.
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// H(x), an antiderivative of h: (x^(1-s) - 1) / (1 - s), or ln x for s = 1.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        expm1_over_x((1.0 - self.s) * log_x) * log_x
    }

    /// The inverse of H.
    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (ln1p_over_x(t) * x).exp()
    }
}

/// (e^x - 1) / x, continuous at 0.
fn expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + x * 0.25))
    }
}

/// ln(1 + x) / x, continuous at 0.
fn ln1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - x * 0.25))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use replicator_core::device::{DeviceError, MemDevice};

    use super::*;

    /// A device that records every operation (kind, offset, length, CRC of the data).
    #[derive(Debug)]
    struct Recording {
        inner: MemDevice,
        ops: Mutex<Vec<(char, u64, u64, u32)>>,
    }

    impl Recording {
        fn new(size: u64) -> Self {
            Recording {
                inner: MemDevice::new("recording", size),
                ops: Mutex::new(Vec::new()),
            }
        }

        fn ops(&self) -> Vec<(char, u64, u64, u32)> {
            self.ops.lock().unwrap().clone()
        }
    }

    impl BlockDevice for Recording {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
            self.inner.read_at(buf, offset_bytes)
        }
        fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
            self.ops.lock().unwrap().push((
                'W',
                offset_bytes,
                buf.len() as u64,
                crc32fast::hash(buf),
            ));
            self.inner.write_at(buf, offset_bytes)
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), DeviceError> {
            self.ops
                .lock()
                .unwrap()
                .push(('D', offset_bytes, len_bytes, 0));
            self.inner.discard(offset_bytes, len_bytes)
        }
    }

    const DISK: u64 = 16 << 20;
    const ALL: [Pattern; 7] = [
        Pattern::Innodb,
        Pattern::Postgres,
        Pattern::Log,
        Pattern::Zipf,
        Pattern::Overwrite,
        Pattern::Zero,
        Pattern::Discard,
    ];

    fn spec(pattern: Pattern, bytes: Option<u64>, ops: Option<u64>, seed: u64) -> WorkloadSpec {
        WorkloadSpec {
            pattern,
            bytes,
            ops,
            rate_bytes_per_s: None,
            seed,
            zipf_exponent: None,
        }
    }

    #[test]
    fn same_seed_same_writes_other_seed_other_writes() {
        for p in ALL {
            let run = |seed| {
                let dev = Recording::new(DISK);
                // Zero pages and discards need something to clear.
                dev.inner.write_at(&vec![0xAB; DISK as usize], 0).unwrap();
                let r = run_workload(&dev, &spec(p, None, Some(200), seed)).unwrap();
                (dev.ops(), dev.inner.snapshot(), r)
            };
            let (a_ops, a_bytes, a) = run(7);
            let (b_ops, b_bytes, b) = run(7);
            let (c_ops, _, _) = run(8);
            assert_eq!(
                a_ops, b_ops,
                "{p:?}: the same seed gives the same operations"
            );
            assert!(a_bytes == b_bytes, "{p:?}: and the same disk");
            assert_eq!((a.writes, a.bytes_written), (b.writes, b.bytes_written));
            if p != Pattern::Overwrite {
                assert_ne!(a_ops, c_ops, "{p:?}: another seed, other operations");
            }
        }
    }

    #[test]
    fn byte_and_op_counts_are_what_the_device_saw() {
        for p in ALL {
            let dev = Recording::new(DISK);
            let r = run_workload(&dev, &spec(p, None, Some(123), 1)).unwrap();
            let ops = dev.ops();
            // A full overwrite stops at the end of the disk: one write per MiB.
            let want_ops = if p == Pattern::Overwrite {
                DISK >> 20
            } else {
                123
            };
            assert_eq!(r.writes + r.discards, want_ops, "{p:?}");
            assert_eq!(ops.len() as u64, want_ops, "{p:?}");
            let (w, d): (Vec<&(char, u64, u64, u32)>, Vec<_>) =
                ops.iter().partition(|o| o.0 == 'W');
            assert_eq!(
                (r.writes, r.discards),
                (w.len() as u64, d.len() as u64),
                "{p:?}"
            );
            assert_eq!(r.bytes_written, w.iter().map(|o| o.2).sum::<u64>(), "{p:?}");
            assert_eq!(
                r.bytes_discarded,
                d.iter().map(|o| o.2).sum::<u64>(),
                "{p:?}"
            );
            let want = 5 << 20;
            let dev = Recording::new(DISK);
            let r = run_workload(&dev, &spec(p, Some(want.min(DISK)), None, 1)).unwrap();
            let done = r.bytes_written + r.bytes_discarded;
            assert!(
                done >= want && done < want + p.op_bytes_max(),
                "{p:?}: {done} bytes for a target of {want}"
            );
            let seen: u64 = dev.ops().iter().map(|o| o.2).sum();
            assert_eq!(seen, done, "{p:?}");
            // Every operation lies on the disk, in whole sectors.
            for (_, off, len, _) in dev.ops() {
                assert!(
                    off % 512 == 0 && len % 512 == 0 && off + len <= DISK,
                    "{p:?}"
                );
            }
        }
    }

    #[test]
    fn patterns_write_what_they_say() {
        // Page patterns: page-aligned pages.
        for (p, page) in [
            (Pattern::Innodb, 16 << 10),
            (Pattern::Postgres, 8 << 10),
            (Pattern::Zero, 16 << 10),
            (Pattern::Zipf, 16 << 10),
        ] {
            let dev = Recording::new(DISK);
            run_workload(&dev, &spec(p, None, Some(500), 3)).unwrap();
            assert!(
                dev.ops()
                    .iter()
                    .all(|o| o.0 == 'W' && o.2 == page && o.1 % page == 0),
                "{p:?}"
            );
        }
        // Zero pages are zeros.
        let dev = Recording::new(DISK);
        dev.inner.write_at(&vec![0xAB; DISK as usize], 0).unwrap();
        run_workload(&dev, &spec(Pattern::Zero, None, Some(50), 3)).unwrap();
        let snap = dev.inner.snapshot();
        for (_, off, len, _) in dev.ops() {
            assert!(
                snap[off as usize..(off + len) as usize]
                    .iter()
                    .all(|b| *b == 0)
            );
        }
        // The log appends sequentially in the last eighth.
        let dev = Recording::new(DISK);
        run_workload(&dev, &spec(Pattern::Log, None, Some(100), 3)).unwrap();
        let ops = dev.ops();
        let log_start = DISK - DISK / 8;
        assert_eq!(ops[0].1, log_start);
        let mut wrapped = 0;
        for w in ops.windows(2) {
            assert!(w[1].1 + w[1].2 <= DISK);
            if w[1].1 == log_start {
                wrapped += 1;
            } else {
                assert_eq!(w[1].1, w[0].1 + w[0].2, "appends follow each other");
            }
        }
        assert!(wrapped >= 1, "100 appends of 4-64 KiB go round a 2 MiB log");
        // Overwrite: the whole disk once, in order, whatever count was asked.
        let dev = Recording::new(DISK);
        let r = run_workload(&dev, &spec(Pattern::Overwrite, Some(1 << 40), None, 3)).unwrap();
        assert_eq!(r.bytes_written, DISK);
        let ops = dev.ops();
        assert_eq!(ops.first().map(|o| o.1), Some(0));
        for w in ops.windows(2) {
            assert_eq!(w[1].1, w[0].1 + w[0].2);
        }
        // Discards: 4 KiB aligned, 64 KiB to 1 MiB, and the range reads as zeros.
        let dev = Recording::new(DISK);
        dev.inner.write_at(&vec![0xAB; DISK as usize], 0).unwrap();
        run_workload(&dev, &spec(Pattern::Discard, None, Some(40), 3)).unwrap();
        let snap = dev.inner.snapshot();
        for (k, off, len, _) in dev.ops() {
            assert!(k == 'D' && off % 4096 == 0 && (64 << 10..=1 << 20).contains(&len));
            assert!(
                snap[off as usize..(off + len) as usize]
                    .iter()
                    .all(|b| *b == 0)
            );
        }
    }

    #[test]
    fn zipf_writes_concentrate_on_a_hot_spot() {
        let dev = Recording::new(DISK);
        let n = 4_000;
        run_workload(&dev, &spec(Pattern::Zipf, None, Some(n), 5)).unwrap();
        let mut per_page = std::collections::HashMap::new();
        for (_, off, _, _) in dev.ops() {
            *per_page.entry(off / (16 << 10)).or_insert(0u64) += 1;
        }
        let mut counts: Vec<u64> = per_page.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let pages = DISK / (16 << 10);
        let top: u64 = counts.iter().take((pages / 10) as usize).sum();
        let share = top as f64 / n as f64;
        println!("zipf 1.1 over {pages} pages: the top 10% of pages took {share:.3}");
        assert!(
            share > 0.6,
            "the top 10% of pages took {share:.3} of the writes"
        );
        // Uniform random pages for comparison: nowhere near.
        let dev = Recording::new(DISK);
        run_workload(&dev, &spec(Pattern::Innodb, None, Some(n), 5)).unwrap();
        let mut per_page = std::collections::HashMap::new();
        for (_, off, _, _) in dev.ops() {
            *per_page.entry(off / (16 << 10)).or_insert(0u64) += 1;
        }
        let mut counts: Vec<u64> = per_page.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top: u64 = counts.iter().take((pages / 10) as usize).sum();
        assert!((top as f64 / n as f64) < 0.3);
    }

    #[test]
    fn zipf_sampler_matches_its_distribution() {
        // Exact probabilities for n = 10: P(k) = k^-s / sum.
        for s in [0.5, 1.0, 1.1, 2.0] {
            let n = 10u64;
            let z = Zipf::new(n, s);
            let norm: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let draws = 200_000;
            let mut seen = vec![0u64; n as usize + 1];
            for _ in 0..draws {
                let k = z.sample(&mut rng);
                assert!((1..=n).contains(&k));
                seen[k as usize] += 1;
            }
            for k in 1..=n {
                let p = (k as f64).powf(-s) / norm;
                let got = seen[k as usize] as f64 / draws as f64;
                // Five standard deviations of a binomial proportion.
                let tol = 5.0 * (p * (1.0 - p) / draws as f64).sqrt();
                assert!(
                    (got - p).abs() < tol,
                    "s {s}, k {k}: expected {p:.4}, got {got:.4}"
                );
            }
        }
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // measures real pacing
    fn rate_paces_in_real_time() {
        let dev = Recording::new(DISK);
        let mut s = spec(Pattern::Postgres, Some(2 << 20), None, 1);
        s.rate_bytes_per_s = Some(1 << 20);
        let started = Instant::now();
        let r = run_workload(&dev, &s).unwrap();
        let took = started.elapsed();
        // 2 MiB at 1 MiB/s: two seconds; loose bounds for a shared machine.
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
            "{took:?}"
        );
        assert!((1900..6000).contains(&r.elapsed_ms), "{r:?}");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let dev = MemDevice::new("d", DISK);
        let e = |s: WorkloadSpec| format!("{:#}", run_workload(&dev, &s).unwrap_err());
        assert!(e(spec(Pattern::Innodb, Some(1), Some(1), 1)).contains("`bytes` and `ops`"));
        assert!(e(spec(Pattern::Innodb, None, None, 1)).contains("neither"));
        let mut s = spec(Pattern::Innodb, Some(1), None, 1);
        s.rate_bytes_per_s = Some(0);
        assert!(e(s).contains("`rate_bytes_per_s`"));
        let mut s = spec(Pattern::Innodb, Some(1), None, 1);
        s.zipf_exponent = Some(1.0);
        assert!(e(s).contains("`zipf_exponent`"));
        let mut s = spec(Pattern::Zipf, Some(1), None, 1);
        s.zipf_exponent = Some(-1.0);
        assert!(e(s).contains("positive"));
        let small = MemDevice::new("small", 4096);
        let err = run_workload(&small, &spec(Pattern::Log, Some(1), None, 1)).unwrap_err();
        assert!(format!("{err:#}").contains("at least"), "{err:#}");
    }

    #[test]
    fn spec_round_trips_as_kebab_case_json() {
        let mut s = spec(Pattern::Zipf, None, Some(10), 9);
        s.zipf_exponent = Some(1.2);
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"pattern\":\"zipf\""), "{j}");
        assert_eq!(serde_json::from_str::<WorkloadSpec>(&j).unwrap(), s);
        let d: WorkloadSpec = serde_json::from_str(
            r#"{"pattern":"discard","bytes":4096,"ops":null,"rate_bytes_per_s":null,"seed":1,"zipf_exponent":null}"#,
        )
        .unwrap();
        assert_eq!(d.pattern, Pattern::Discard);
    }
}
