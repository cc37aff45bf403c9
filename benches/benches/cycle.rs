//! End-to-end cycles through the whole pipeline (`cycle/*`), with the fixture of
//! `replicator_benches::pipeline`: an in-memory source disk with realistic content, `ship_cycle`
//! into a `LocalDirSink` and `hydrate` into a second in-memory disk. The state directories and
//! the cache are on the file system of the temp dir, so their fsyncs are counted as a user would
//! see them.
//!
//! Initial copy of a 256 MiB disk (each iteration a fresh pair; the fill is not timed):
//!
//! * `cycle/initial_ship_256MiB`: `ship_cycle` reading, compressing, encrypting and putting all
//!   of it;
//! * `cycle/initial_hydrate_256MiB`: `hydrate` fetching, verifying and writing all of it.
//!
//! Deltas, past the initial copy: per iteration 1 % of the disk rewritten in scattered 16 KiB
//! writes through the source's tracker, then the whole cycle; each benchmark times one phase:
//!
//! * `cycle/write_1pct_churn`: the tracked writes (including the tracker's activity log);
//! * `cycle/ship_1pct_churn`: `ship_cycle` (freeze, read, compress, encrypt, put, manifest);
//! * `cycle/hydrate_1pct_churn`: `hydrate` (fetch, verify, stage, write, reconcile, ack).
//!
//! The throughput is the disk (initial) or the churn (2.56 MiB) per phase time. The disks are in
//! memory, so the delta phases are bound by the latency of fsync on the temp dir's file system
//! far more than by CPU: when written (strace of one delta cycle), the churn cost ~60
//! activity-log `fdatasync`s (one per 4 MiB region first written since the last checkpoint),
//! ship ~23 `fsync`s (state, tracker checkpoints, blob and manifest puts, the new cycle's cache
//! directories) and hydrate ~8, while encoding the delta's one blob takes a few milliseconds (see
//! `blob/*`). Compare runs on the same storage only.
//!
//! Run with `cargo bench -p replicator-benches --bench cycle`; `-- --test` runs each once.

// Benchmarks are test code: a failed setup should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use replicator_benches::pipeline::{Phases, Replication};

const DISK_BYTES: u64 = 256 << 20;

/// Runs `iters` initial copies, each on a fresh pair, and returns the total time of the phase
/// `pick` selects.
fn initial_copies(iters: u64, pick: fn(&Phases) -> Duration) -> Duration {
    (0..iters)
        .map(|i| {
            let mut r = Replication::new(DISK_BYTES, 0xd15c + i).unwrap();
            let p = r.cycle(0).unwrap();
            r.check_identical().unwrap();
            pick(&p)
        })
        .sum()
}

/// Runs `iters` delta cycles of 1 % churn and returns the total time of the phase `pick` selects.
fn deltas(r: &mut Replication, iters: u64, pick: fn(&Phases) -> Duration) -> Duration {
    let churn = r.churn_bytes();
    (0..iters).map(|_| pick(&r.cycle(churn).unwrap())).sum()
}

fn bench_initial(c: &mut Criterion) {
    let mut g = c.benchmark_group("cycle");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(DISK_BYTES));
    g.bench_function("initial_ship_256MiB", |b| {
        b.iter_custom(|iters| initial_copies(iters, |p| p.ship));
    });
    g.bench_function("initial_hydrate_256MiB", |b| {
        b.iter_custom(|iters| initial_copies(iters, |p| p.hydrate));
    });
    g.finish();
}

fn bench_delta(c: &mut Criterion) {
    // Built on first use, so filtering out every delta benchmark skips the setup.
    let mut rep: Option<Replication> = None;
    let seeded = || Replication::seeded(DISK_BYTES, 0xd15c).unwrap();
    let mut g = c.benchmark_group("cycle");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let churn = (DISK_BYTES / 100).div_ceil(16 << 10) * (16 << 10);
    g.throughput(Throughput::Bytes(churn));
    g.bench_function("write_1pct_churn", |b| {
        let r = rep.get_or_insert_with(seeded);
        b.iter_custom(|iters| deltas(r, iters, |p| p.write));
    });
    g.bench_function("ship_1pct_churn", |b| {
        let r = rep.get_or_insert_with(seeded);
        b.iter_custom(|iters| deltas(r, iters, |p| p.ship));
    });
    g.bench_function("hydrate_1pct_churn", |b| {
        let r = rep.get_or_insert_with(seeded);
        b.iter_custom(|iters| deltas(r, iters, |p| p.hydrate));
    });
    g.finish();
    if let Some(r) = rep {
        assert_eq!(r.churn_bytes(), churn);
        r.check_identical().unwrap();
        assert!(r.cycles() > 1);
    }
}

criterion_group!(benches, bench_initial, bench_delta);
criterion_main!(benches);
