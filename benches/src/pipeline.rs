//! The whole pipeline as a benchmark fixture: an in-memory source disk with realistic content, a
//! [`LocalDirSink`] cache on the file system of a temp dir, and an in-memory target, driven by
//! `ship_cycle` and `hydrate` as the harness drives them (the state directories and the cache are
//! real files, so their fsyncs count). Used by `benches/cycle.rs` and the `figures` binary.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
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

use crate::{DataGen, fill_device, scattered_offsets};

/// Bytes per write of the delta workload (an InnoDB page).
pub const CHURN_WRITE_BYTES: u64 = 16 << 10;

/// Runs `f` and returns its result and how long it took. Benchmarks measure real elapsed time,
/// which the engine itself only reads through its `Clock`.
#[allow(clippy::disallowed_methods)]
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Time spent in each phase of one cycle, and the bytes it covered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    /// The tracked writes of the churn (zero for the initial copy).
    pub write: Duration,
    /// `ship_cycle`: freeze, read, compress, encrypt, put, manifest.
    pub ship: Duration,
    /// `hydrate`: fetch, verify, decrypt, decompress, write, reconcile, acknowledge.
    pub hydrate: Duration,
    /// The sectors the cycle shipped, in bytes.
    pub changed_bytes: u64,
    /// The bytes it put in the cache (blobs and manifest).
    pub stored_bytes: u64,
}

/// A source and a target replicating one in-memory disk through a local-directory cache.
#[derive(Debug)]
pub struct Replication {
    rt: Runtime,
    source: Source<CbtTracker<MemDevice>>,
    target: Target<MemDevice>,
    sink: LocalDirSink,
    key: MasterKey,
    clock: SimClock,
    ship_cfg: ShipConfig,
    content: DataGen,
    disk_bytes: u64,
    cycles: u64,
    _dir: TempDir,
}

impl Replication {
    /// A disk of `disk_bytes` filled with realistic content from `seed`; nothing shipped yet.
    pub fn new(disk_bytes: u64, seed: u64) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let dir = tempfile::tempdir().context("making a temp dir for the states and cache")?;
        let src_dev = MemDevice::new("source", disk_bytes);
        fill_device(&src_dev, seed)?;
        let (source, _) = Source::open(
            &dir.path().join("source-state"),
            src_dev,
            TrackerConfig::default(),
        )?;
        let target = Target::open(
            &dir.path().join("target-state"),
            MemDevice::new("target", disk_bytes),
            source.disk_id(),
        )?;
        let sink = LocalDirSink::create(dir.path().join("cache"))?;
        Ok(Replication {
            rt,
            source,
            target,
            sink,
            key: MasterKey::from_bytes([0x42; 32]),
            clock: SimClock::new(Timestamp::from_unix_ms(1_795_000_000_000)),
            ship_cfg: ShipConfig::default(),
            content: DataGen::new(seed ^ 0xc4a7),
            disk_bytes,
            cycles: 0,
            _dir: dir,
        })
    }

    /// A disk whose initial copy was already shipped and hydrated (not timed).
    pub fn seeded(disk_bytes: u64, seed: u64) -> Result<Self> {
        let mut r = Self::new(disk_bytes, seed)?;
        r.cycle(0)?;
        r.check_identical()?;
        Ok(r)
    }

    /// Bytes of one delta: 1 % of the disk in whole 16 KiB writes.
    pub fn churn_bytes(&self) -> u64 {
        (self.disk_bytes / 100).div_ceil(CHURN_WRITE_BYTES) * CHURN_WRITE_BYTES
    }

    /// Runs one cycle: first `churn_bytes` of distinct scattered 16 KiB writes through the
    /// source's tracker (none for the initial copy), then ship, then hydrate.
    pub fn cycle(&mut self, churn_bytes: u64) -> Result<Phases> {
        let mut phases = Phases::default();
        let initial = self.cycles == 0;
        if !initial {
            ensure!(churn_bytes > 0, "a delta cycle needs churn");
            let writes = churn_bytes.div_ceil(CHURN_WRITE_BYTES) as usize;
            let offsets = scattered_offsets(
                self.content.rng(),
                self.disk_bytes,
                writes,
                CHURN_WRITE_BYTES,
            );
            let bufs: Vec<Vec<u8>> = offsets
                .iter()
                .map(|_| self.content.bytes(CHURN_WRITE_BYTES as usize))
                .collect();
            let tracker = self.source.tracker();
            let (written, took) = timed(|| -> Result<()> {
                for (buf, &off) in bufs.iter().zip(&offsets) {
                    tracker.write_tracked(buf, off)?;
                }
                Ok(())
            });
            written?;
            phases.write = took;
        }
        self.clock.advance(Duration::from_secs(60));
        let (shipped, took) = timed(|| {
            self.rt.block_on(ship_cycle(
                &mut self.source,
                &self.sink,
                &self.key,
                &self.clock,
                &self.ship_cfg,
                &NoProgress,
            ))
        });
        phases.ship = took;
        let shipped = shipped?.into_shipped()?;
        ensure!(
            shipped.initial == initial,
            "cycle {} was {} a full copy, expected the opposite",
            shipped.cycle,
            if shipped.initial { "" } else { "not" }
        );
        let expected = if initial {
            self.disk_bytes
        } else {
            churn_bytes.div_ceil(CHURN_WRITE_BYTES) * CHURN_WRITE_BYTES
        };
        ensure!(
            shipped.changed_bytes() == expected,
            "cycle {} shipped {} changed bytes, expected {expected}",
            shipped.cycle,
            shipped.changed_bytes()
        );
        phases.changed_bytes = shipped.changed_bytes();
        phases.stored_bytes = shipped.stored_bytes;
        let (hydrated, took) = timed(|| {
            self.rt.block_on(hydrate(
                &mut self.target,
                &self.sink,
                &self.key,
                &self.clock,
                &HydrateConfig::default(),
                &NoProgress,
            ))
        });
        phases.hydrate = took;
        let hydrated = hydrated?;
        if let Some(failed) = hydrated.failed {
            bail!("hydration failed: {failed:?}");
        }
        ensure!(
            hydrated.applied.len() == 1,
            "hydrate applied {} cycles, expected 1",
            hydrated.applied.len()
        );
        ensure!(
            hydrated.applied[0].sectors_written * SECTOR_SIZE == shipped.changed_bytes(),
            "the target wrote {} sectors for {} changed bytes",
            hydrated.applied[0].sectors_written,
            shipped.changed_bytes()
        );
        self.cycles += 1;
        Ok(phases)
    }

    /// Cycles run so far (the initial copy included).
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// Fails unless the target holds exactly the source's bytes.
    pub fn check_identical(&self) -> Result<()> {
        let src = self.source.tracker().device().snapshot();
        let dst = self.target.device().snapshot();
        ensure!(src == dst, "the target differs from the source");
        Ok(())
    }
}
