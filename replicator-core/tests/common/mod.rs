//! Shared set-up for the end-to-end tests: in-memory disks, a local cache, a simulated clock,
//! and fault-injecting wrappers.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::clock::{SimClock, Timestamp};
use replicator_core::device::{BlockDevice, DeviceError, DeviceOp, MemDevice};
use replicator_core::keys::MasterKey;
use replicator_core::progress::NoProgress;
use replicator_core::source::{ShipConfig, ShipOutcome, ShipReport, Source, ship_cycle};
use replicator_core::target::{HydrateConfig, HydrateReport, Target, hydrate};
use replicator_core::tracker::{CbtTracker, TrackerConfig};
use replicator_sink::wrap::{Fault, FaultRule, FaultSink, OpKind, Trigger};
use replicator_sink::{LocalDirSink, Sink};

pub const DISK_BYTES: u64 = 8 << 20;

/// A device that fails every write once its byte budget is spent (a crash mid-apply).
#[derive(Debug)]
pub struct FailingDevice {
    pub inner: Arc<MemDevice>,
    pub write_budget: AtomicI64,
}

impl FailingDevice {
    pub fn new(inner: Arc<MemDevice>, budget: i64) -> Self {
        FailingDevice {
            inner,
            write_budget: AtomicI64::new(budget),
        }
    }
}

impl BlockDevice for FailingDevice {
    fn name(&self) -> &str {
        "failing"
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let left = self
            .write_budget
            .fetch_sub(buf.len() as i64, Ordering::SeqCst);
        if left < buf.len() as i64 {
            return Err(DeviceError::new(
                "failing",
                DeviceOp::Write,
                offset,
                buf.len() as u64,
                "simulated crash",
            ));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// One replication set-up: a source and a target disk in memory, state in a temporary directory.
pub struct World {
    pub dir: tempfile::TempDir,
    pub src_disk: Arc<MemDevice>,
    pub tgt_disk: Arc<MemDevice>,
    /// The cache: a local directory behind a fault injector.
    pub sink: Arc<FaultSink>,
    pub local: LocalDirSink,
    pub key: MasterKey,
    pub clock: SimClock,
    pub source: Source<CbtTracker<Arc<MemDevice>>>,
    pub target: Option<Target<Arc<MemDevice>>>,
    pub rng: ChaCha8Rng,
    /// Small blobs, so that a delta spreads over several.
    pub ship_cfg: ShipConfig,
}

impl World {
    pub fn new(seed: u64) -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let src_disk = Arc::new(MemDevice::new("source", DISK_BYTES));
        let tgt_disk = Arc::new(MemDevice::new("target", DISK_BYTES));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Some content before replication starts: random, text-like and zero regions.
        let mut buf = vec![0u8; 256 << 10];
        for chunk in 0..(DISK_BYTES / buf.len() as u64) {
            match chunk % 3 {
                0 => rng.fill_bytes(&mut buf),
                1 => buf
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = b"replica "[i % 8]),
                _ => continue,
            }
            src_disk.write_at(&buf, chunk * buf.len() as u64)?;
        }
        let local = LocalDirSink::create(dir.path().join("cache"))?;
        let clock = SimClock::new(Timestamp::from_unix_ms(1_700_000_000_000));
        let sink = Arc::new(FaultSink::new(
            Arc::new(local.clone()),
            Arc::new(clock.clone()),
            seed,
        ));
        let key = MasterKey::from_bytes([7u8; 32]);
        let (source, _) = Source::open(
            &dir.path().join("src-state"),
            Arc::clone(&src_disk),
            TrackerConfig::default(),
        )?;
        let target = Target::open(
            &dir.path().join("tgt-state"),
            Arc::clone(&tgt_disk),
            source.disk_id(),
        )?;
        Ok(World {
            dir,
            src_disk,
            tgt_disk,
            sink,
            local,
            key,
            clock,
            source,
            target: Some(target),
            rng,
            ship_cfg: ShipConfig {
                blob_span_bytes_max: 256 << 10,
                ..ShipConfig::default()
            },
        })
    }

    pub async fn ship(&mut self) -> anyhow::Result<ShipReport> {
        Ok(self.ship_outcome().await?.into_shipped()?)
    }

    /// Ships, returning the outcome as is (a resync may await the target's catalog).
    pub async fn ship_outcome(&mut self) -> anyhow::Result<ShipOutcome> {
        Ok(ship_cycle(
            &mut self.source,
            self.sink.as_ref(),
            &self.key,
            &self.clock,
            &self.ship_cfg,
            &NoProgress,
        )
        .await?)
    }

    pub async fn hydrate(&mut self) -> anyhow::Result<HydrateReport> {
        let target = self
            .target
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no target"))?;
        Ok(hydrate(
            target,
            self.sink.as_ref(),
            &self.key,
            &self.clock,
            &HydrateConfig::default(),
            &NoProgress,
        )
        .await?)
    }

    /// Random writes of 512 B to 64 KiB, some unaligned, through the source's tracker.
    pub fn churn(&mut self, writes: usize) -> anyhow::Result<()> {
        for _ in 0..writes {
            let len = self.rng.random_range(1..=64 * 1024u64);
            let off = self.rng.random_range(0..DISK_BYTES - len);
            let mut data = vec![0u8; len as usize];
            if self.rng.random_bool(0.8) {
                self.rng.fill_bytes(&mut data);
            }
            self.source.tracker().write_at(&data, off)?;
        }
        Ok(())
    }

    /// Stops the source (dropping it without a checkpoint, as a crash would), lets `between`
    /// change its state directory, and opens it again.
    pub fn reopen_source(
        &mut self,
        between: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<replicator_core::tracker::OpenReport> {
        let dir = self.dir.path().join("src-state");
        let placeholder_dir = self.dir.path().join("placeholder-state");
        let _ = std::fs::remove_dir_all(&placeholder_dir);
        let (placeholder, _) = Source::open(
            &placeholder_dir,
            Arc::new(MemDevice::new("placeholder", DISK_BYTES)),
            TrackerConfig::default(),
        )?;
        drop(std::mem::replace(&mut self.source, placeholder));
        between(&dir)?;
        let (source, report) =
            Source::open(&dir, Arc::clone(&self.src_disk), TrackerConfig::default())?;
        self.source = source;
        Ok(report)
    }

    /// Replaces the target with one whose state lives in `state_dir` (new or kept) and whose disk
    /// is `disk`.
    pub fn replace_target(&mut self, state_dir: &Path, disk: Arc<MemDevice>) -> anyhow::Result<()> {
        self.target = None;
        self.target = Some(Target::open(
            state_dir,
            Arc::clone(&disk),
            self.source.disk_id(),
        )?);
        self.tgt_disk = disk;
        Ok(())
    }

    pub fn identical(&self) -> bool {
        self.src_disk.snapshot() == self.tgt_disk.snapshot()
    }

    pub fn cache_path(&self) -> &Path {
        self.local.root()
    }

    /// The next `times` operations of `op` on keys containing `part` fail with `fault`.
    pub fn fault(&self, op: OpKind, fault: Fault, part: &str, times: u64) -> anyhow::Result<()> {
        self.sink
            .add_rule(FaultRule::new(op, fault, Trigger::times(times)).on_keys_containing(part))?;
        Ok(())
    }

    /// The keys of blobs of `cycle` in the cache.
    pub async fn blob_keys(&self, cycle: u64) -> anyhow::Result<Vec<String>> {
        let prefix = replicator_core::layout::cycle_blobs_prefix(&self.source.disk_id(), cycle);
        Ok(self
            .sink
            .list(&prefix)
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect())
    }
}
