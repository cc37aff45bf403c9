//! End-to-end delta cycles (`cycle/*`): a 256 MiB in-memory source disk with realistic content,
//! its initial copy already shipped and hydrated, then per iteration 1 % of the disk rewritten in
//! scattered 16 KiB writes through the source's tracker, `ship_cycle` into a `LocalDirSink` and
//! `hydrate` into a second in-memory disk. The state directories and the cache are on the file
//! system of the temp dir, so their fsyncs are counted as a user would see them.
//!
//! Each iteration runs the whole cycle; each benchmark times one phase of it:
//!
//! * `cycle/write_1pct_churn`: the tracked writes (including the tracker's activity log);
//! * `cycle/ship_1pct_churn`: `ship_cycle` (freeze, read, compress, encrypt, put, manifest);
//! * `cycle/hydrate_1pct_churn`: `hydrate` (fetch, verify, stage, write, reconcile, ack).
//!
//! The throughput is the churn (2.56 MiB) per phase time. The disks are in memory, so these
//! phases are bound by the latency of fsync on the temp dir's file system far more than by CPU:
//! when written (strace of one delta cycle), the churn cost ~60 activity-log `fdatasync`s (one
//! per 4 MiB region first written since the last checkpoint), ship ~23 `fsync`s (state, tracker
//! checkpoints, blob and manifest puts, the new cycle's cache directories) and hydrate ~8, while
//! encoding the delta's one blob takes a few milliseconds (see `blob/*`). Compare runs on the
//! same storage only.
//!
//! Run with `cargo bench -p replicator-benches --bench cycle`; `-- --test` runs each once.

// Benchmarks are test code: a failed setup should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use replicator_benches::{DataGen, fill_device, scattered_offsets};
use replicator_core::bitmap::SECTOR_SIZE;
use replicator_core::clock::{SimClock, Timestamp};
use replicator_core::device::MemDevice;
use replicator_core::keys::MasterKey;
use replicator_core::progress::NoProgress;
use replicator_core::source::{ShipConfig, Source, ship_cycle};
use replicator_core::target::{HydrateConfig, Target, hydrate};
use replicator_core::tracker::{CbtTracker, TrackerConfig};
use replicator_sink::LocalDirSink;
use tempfile::TempDir;
use tokio::runtime::Runtime;

const DISK_BYTES: u64 = 256 << 20;
const WRITE_BYTES: u64 = 16 << 10;
/// 1 % of the disk, in whole 16 KiB writes (164 writes, 2.56 MiB).
const WRITES_PER_CYCLE: usize = (DISK_BYTES / 100).div_ceil(WRITE_BYTES) as usize;
const CHURN_BYTES: u64 = WRITES_PER_CYCLE as u64 * WRITE_BYTES;

/// Runs `f` and returns its result and how long it took. Benchmarks measure real elapsed time,
/// which the engine itself only reads through its `Clock`.
#[allow(clippy::disallowed_methods)]
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Time spent in each phase of one cycle.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    write: Duration,
    ship: Duration,
    hydrate: Duration,
}

/// A source and a target replicating one disk through a local cache, past the initial copy.
struct Replication {
    rt: Runtime,
    source: Source<CbtTracker<MemDevice>>,
    target: Target<MemDevice>,
    sink: LocalDirSink,
    key: MasterKey,
    clock: SimClock,
    ship_cfg: ShipConfig,
    content: DataGen,
    cycles: u64,
    _dir: TempDir,
}

impl Replication {
    /// Fills the source, ships and hydrates the initial copy (not timed).
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let src_dev = MemDevice::new("source", DISK_BYTES);
        fill_device(&src_dev, 0xd15c).unwrap();
        let (source, _) = Source::open(
            &dir.path().join("source-state"),
            src_dev,
            TrackerConfig::default(),
        )
        .unwrap();
        let target = Target::open(
            &dir.path().join("target-state"),
            MemDevice::new("target", DISK_BYTES),
            source.disk_id(),
        )
        .unwrap();
        let sink = LocalDirSink::create(dir.path().join("cache")).unwrap();
        let mut r = Replication {
            rt,
            source,
            target,
            sink,
            key: MasterKey::from_bytes([0x42; 32]),
            clock: SimClock::new(Timestamp::from_unix_ms(1_795_000_000_000)),
            ship_cfg: ShipConfig::default(),
            content: DataGen::new(0xc4a7),
            cycles: 0,
            _dir: dir,
        };
        let initial = r.cycle(false);
        assert!(initial.1, "the initial copy must be a full copy");
        r.check_identical();
        r
    }

    /// Runs one cycle; with `churn`, first rewrites 1 % of the disk. Returns the phase times and
    /// whether the cycle was the initial copy.
    fn cycle(&mut self, churn: bool) -> (Phases, bool) {
        let mut phases = Phases::default();
        if churn {
            let offsets = scattered_offsets(
                self.content.rng(),
                DISK_BYTES,
                WRITES_PER_CYCLE,
                WRITE_BYTES,
            );
            // Writes land where the generator says; fresh content for each.
            let bufs: Vec<Vec<u8>> = offsets
                .iter()
                .map(|_| self.content.bytes(WRITE_BYTES as usize))
                .collect();
            let tracker = self.source.tracker();
            let ((), took) = timed(|| {
                for (buf, &off) in bufs.iter().zip(&offsets) {
                    tracker.write_tracked(buf, off).unwrap();
                }
            });
            phases.write = took;
        }
        self.clock.advance(Duration::from_secs(60));
        let (shipped, took) = timed(|| {
            self.rt
                .block_on(ship_cycle(
                    &mut self.source,
                    &self.sink,
                    &self.key,
                    &self.clock,
                    &self.ship_cfg,
                    &NoProgress,
                ))
                .unwrap()
                .into_shipped()
                .unwrap()
        });
        phases.ship = took;
        if churn {
            assert_eq!(shipped.changed_bytes(), CHURN_BYTES);
        }
        let (hydrated, took) = timed(|| {
            self.rt
                .block_on(hydrate(
                    &mut self.target,
                    &self.sink,
                    &self.key,
                    &self.clock,
                    &HydrateConfig::default(),
                    &NoProgress,
                ))
                .unwrap()
        });
        phases.hydrate = took;
        assert!(hydrated.failed.is_none(), "{:?}", hydrated.failed);
        assert_eq!(hydrated.applied.len(), 1);
        assert_eq!(
            hydrated.applied[0].sectors_written * SECTOR_SIZE,
            shipped.changed_bytes()
        );
        self.cycles += 1;
        (phases, shipped.initial)
    }

    /// Runs `iters` delta cycles and returns the total time of the phase `pick` selects.
    fn run(&mut self, iters: u64, pick: fn(&Phases) -> Duration) -> Duration {
        (0..iters).map(|_| pick(&self.cycle(true).0)).sum()
    }

    fn check_identical(&self) {
        let src = self.source.tracker().device().snapshot();
        let dst = self.target.device().snapshot();
        assert!(src == dst, "the target differs from the source");
    }
}

fn bench_cycle(c: &mut Criterion) {
    // Built on first use, so filtering out every `cycle/*` benchmark skips the setup.
    let mut rep: Option<Replication> = None;
    let mut g = c.benchmark_group("cycle");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(CHURN_BYTES));
    g.bench_function("write_1pct_churn", |b| {
        let r = rep.get_or_insert_with(Replication::new);
        b.iter_custom(|iters| r.run(iters, |p| p.write));
    });
    g.bench_function("ship_1pct_churn", |b| {
        let r = rep.get_or_insert_with(Replication::new);
        b.iter_custom(|iters| r.run(iters, |p| p.ship));
    });
    g.bench_function("hydrate_1pct_churn", |b| {
        let r = rep.get_or_insert_with(Replication::new);
        b.iter_custom(|iters| r.run(iters, |p| p.hydrate));
    });
    g.finish();
    if let Some(r) = rep {
        r.check_identical();
        assert!(r.cycles > 1);
    }
}

criterion_group!(benches, bench_cycle);
criterion_main!(benches);
