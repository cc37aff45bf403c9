//! The hostile cache table: every manipulation of stored objects a cache can make, tried many
//! times over a cache holding several shipped cycles of two disks, each caught before any byte
//! reaches the target (invariants 1, 4 and 5), each followed by healing.
//!
//! The set-up: two disks share one cache, each with an initial copy and three deltas shipped
//! (data and zero extents, several blobs per cycle; one cycle shipped twice so that an abandoned
//! attempt's blobs exist, another shipped twice under one attempt number, as after a crash that
//! lost the attempt counter, so that two authentic encryptions of each of its blobs exist under
//! one key). Nothing is applied yet. From that one set-up every attempt restores
//! the cache, the source and the target exactly, puts the target where the manipulated cycle is
//! the next to apply, manipulates objects, and checks:
//!
//! - **detected**: the step that reads the object refuses it with an error naming the object's
//!   key: hydrate fails the cycle (or stops, for a forged key id); the source ignores an
//!   acknowledgement with a warning naming it (or refuses to go on), and what it believes
//!   (pending cycles, acknowledged cycle, marked sectors) is exactly what the genuine
//!   acknowledgements say. A deleted object leaves nothing to name: a withheld manifest must
//!   leave the later cycles waiting, a withheld acknowledgement the cycle pending. A replayed
//!   processed acknowledgement must change nothing; a rolled-back cache must make hydrate apply
//!   and fail nothing.
//! - **target untouched**: the target device is byte-for-byte what it was and its committed
//!   cycle did not move (for acknowledgements, which only the source reads, this is checked
//!   too, and holds trivially).
//! - **heals** (one attempt per row and disk): the cache is restored to what it held before the
//!   manipulation, the target's failure report written since included (except where a row says
//!   otherwise), and ship + hydrate converge to a target byte-identical to the source.
//!
//! Byte flips cover every byte-position class of an object (each header field, the ciphertext
//! body, the GCM tag), rotating through the bytes of each class across objects; the header
//! field flips are tried twice, as they are and with the header CRC recomputed, as a forger who
//! knows the format would.
//!
//! The table goes to stdout and to `target/hostile-cache-table.md` (`scripts/test.sh` prints it
//! after the tests, whose output nextest captures).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::Error;
use replicator_core::clock::{SimClock, Timestamp};
use replicator_core::device::{BlockDevice, MemDevice};
use replicator_core::format::{self, HEADER_LEN, TAG_LEN};
use replicator_core::keys::{DiskId, MasterKey};
use replicator_core::layout;
use replicator_core::progress::NoProgress;
use replicator_core::source::{ShipConfig, ShipReport, Source, ship_cycle, sync_acks};
use replicator_core::state::SourceState;
use replicator_core::target::{HydrateConfig, HydrateReport, Target, hydrate};
use replicator_core::tracker::{CbtTracker, ChangeTracker, TrackerConfig};
use replicator_sink::wrap::{Fault, FaultRule, FaultSink, OpKind, Trigger};
use replicator_sink::{LocalDirSink, Sink};

const DISK_BYTES: u64 = 2 << 20;
const BLOB_SPAN_BYTES: u64 = 128 << 10;
/// Cycles shipped per disk in the set-up: the initial copy and three deltas.
const CYCLES: u64 = 4;
const DISKS: usize = 2;
/// The cycle shipped twice: its first attempt's blobs stay behind (the manifest put failed).
const ABANDONED_CYCLE: u64 = 3;
/// The cycle shipped twice under one attempt number (the source lost its attempt counter in a
/// crash), with a fresh salt: both encryptions of each blob sit under the same key.
const REUSED_ATTEMPT_CYCLE: u64 = 4;
/// Ship + hydrate rounds a heal may take: the first may only bring back a lost failure report.
const HEAL_ROUNDS_MAX: usize = 3;

type Src = Source<CbtTracker<Arc<MemDevice>>>;
type Tgt = Target<Arc<MemDevice>>;

/// One object as the set-up left it.
#[derive(Clone, Debug)]
struct Obj {
    key: String,
    bytes: Bytes,
}

/// A target as it was after applying cycles `1..=committed` (and possibly failing the next).
#[derive(Debug)]
struct Level {
    image: Arc<Vec<u8>>,
    state_json: Vec<u8>,
    committed: u64,
}

/// Everything the set-up made for one disk.
#[derive(Debug)]
struct DiskObjs {
    disk_id: DiskId,
    /// `[cycle - 1]`.
    manifests: Vec<Obj>,
    /// `[cycle - 1][seq]`.
    blobs: Vec<Vec<Obj>>,
    /// `[cycle - 1]`: the acknowledgement the target wrote when it applied the cycle.
    applied_acks: Vec<Obj>,
    /// `[cycle - 1]`: the acknowledgement the target wrote when the cycle failed there.
    failed_acks: Vec<Obj>,
    /// Blobs of the abandoned first attempt of [`ABANDONED_CYCLE`].
    abandoned: Vec<Obj>,
    /// `[seq]`: the first encryption of the blobs of [`REUSED_ATTEMPT_CYCLE`], under the keys of
    /// the committed ones: the same extents, other data, another salt.
    reused: Vec<Obj>,
    /// `[committed]`: the target after applying cycles `1..=committed`.
    levels: Vec<Level>,
    /// `[cycle - 1]`: the target after applying `1..cycle` and failing `cycle`.
    failed_levels: Vec<Level>,
    /// The source's state directory (relative path, bytes) and disk, with cycles 1..=CYCLES
    /// pending.
    source_files: Vec<(PathBuf, Vec<u8>)>,
    source_image: Arc<Vec<u8>>,
}

#[derive(Debug)]
struct Pristine {
    /// The cache right after the set-up: manifests and blobs, no acknowledgement.
    cache: BTreeMap<String, Bytes>,
    disks: Vec<DiskObjs>,
}

/// One disk's two sides.
struct Side {
    src_dev: Arc<MemDevice>,
    src_state: PathBuf,
    source: Option<Src>,
    tgt_dev: Arc<MemDevice>,
    tgt_state: PathBuf,
    target: Option<Tgt>,
    /// The image the target device holds, if known to be exactly one of the levels.
    tgt_holds: Option<Arc<Vec<u8>>>,
}

/// Two disks sharing one cache.
struct Bed {
    _dir: tempfile::TempDir,
    local: LocalDirSink,
    sink: Arc<FaultSink>,
    key: MasterKey,
    clock: SimClock,
    ship_cfg: ShipConfig,
    sides: Vec<Side>,
    rng: ChaCha8Rng,
    /// Keys whose file may differ from what a restore wants; every key when `None`.
    dirty: Option<BTreeSet<String>>,
}

impl Bed {
    fn new(seed: u64) -> anyhow::Result<Bed> {
        // Thousands of attempts each persist state and objects with fsync; on a memory file
        // system that costs nothing, so the table takes seconds instead of minutes.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("hostile-cache")
                .tempdir_in(shm)?
        } else {
            tempfile::tempdir()?
        };
        let local = LocalDirSink::create(dir.path().join("cache"))?;
        let clock = SimClock::new(Timestamp::from_unix_ms(1_700_000_000_000));
        let sink = Arc::new(FaultSink::new(
            Arc::new(local.clone()),
            Arc::new(clock.clone()),
            seed,
        ));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sides = Vec::new();
        for d in 0..DISKS {
            let src_dev = Arc::new(MemDevice::new("source", DISK_BYTES));
            fill_initial(&src_dev, &mut rng)?;
            let src_state = dir.path().join(format!("src-{d}"));
            let (source, _) =
                Source::open(&src_state, Arc::clone(&src_dev), TrackerConfig::default())?;
            let tgt_dev = Arc::new(MemDevice::new("target", DISK_BYTES));
            let tgt_state = dir.path().join(format!("tgt-{d}"));
            let target = Target::open(&tgt_state, Arc::clone(&tgt_dev), source.disk_id())?;
            sides.push(Side {
                src_dev,
                src_state,
                source: Some(source),
                tgt_dev,
                tgt_state,
                target: Some(target),
                tgt_holds: None,
            });
        }
        Ok(Bed {
            _dir: dir,
            local,
            sink,
            key: MasterKey::from_bytes([7u8; 32]),
            clock,
            ship_cfg: ShipConfig {
                blob_span_bytes_max: BLOB_SPAN_BYTES,
                ..ShipConfig::default()
            },
            sides,
            rng,
            dirty: None,
        })
    }

    fn source(&mut self, d: usize) -> anyhow::Result<&mut Src> {
        self.sides[d]
            .source
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("source {d} is closed"))
    }

    fn target(&self, d: usize) -> anyhow::Result<&Tgt> {
        self.sides[d]
            .target
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("target {d} is closed"))
    }

    async fn ship(&mut self, d: usize) -> anyhow::Result<ShipReport> {
        self.dirty = None;
        let sink = Arc::clone(&self.sink);
        let key = self.key.clone();
        let clock = self.clock.clone();
        let cfg = self.ship_cfg;
        let source = self.source(d)?;
        Ok(
            ship_cycle(source, sink.as_ref(), &key, &clock, &cfg, &NoProgress)
                .await?
                .into_shipped()?,
        )
    }

    async fn hydrate(
        &mut self,
        d: usize,
        cycles_max: u64,
    ) -> anyhow::Result<Result<HydrateReport, Error>> {
        let side = &mut self.sides[d];
        side.tgt_holds = None;
        let target = side
            .target
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("target {d} is closed"))?;
        // Every cycle, the initial copy included, verified whole before anything is written:
        // the table holds the target untouched for all of them. (By default an initial copy is
        // verified blob by blob as it is written; `cycles.rs` tests that mode.)
        let cfg = HydrateConfig {
            cycles_max,
            initial_single_pass: false,
            ..HydrateConfig::default()
        };
        Ok(hydrate(
            target,
            self.sink.as_ref(),
            &self.key,
            &self.clock,
            &cfg,
            &NoProgress,
        )
        .await)
    }

    /// Writes through the source's tracker: 4 KiB-aligned runs of 4-32 KiB, a third of them
    /// zeros, so that a delta has data and zero extents. Returns them as (offset, length, zero).
    fn churn(&mut self, d: usize, writes: usize) -> anyhow::Result<Vec<(u64, u64, bool)>> {
        let mut ops = Vec::new();
        for _ in 0..writes {
            let blocks = self.rng.random_range(1..=8u64);
            let len = blocks * 4096;
            let off = self.rng.random_range(0..(DISK_BYTES - len) / 4096) * 4096;
            ops.push((off, len, self.rng.random_range(0..3) == 0));
        }
        self.rewrite(d, &ops)?;
        Ok(ops)
    }

    /// Does the writes `ops` with fresh data.
    fn rewrite(&mut self, d: usize, ops: &[(u64, u64, bool)]) -> anyhow::Result<()> {
        for &(off, len, zero) in ops {
            let mut data = vec![0u8; len as usize];
            if !zero {
                fill_data(&mut data, &mut self.rng);
            }
            self.source(d)?.tracker().write_at(&data, off)?;
        }
        Ok(())
    }

    /// Ships a cycle whose manifest put fails, and returns the blobs it left in the cache.
    async fn abandon_attempt(&mut self, d: usize, cycle: u64) -> anyhow::Result<Vec<Obj>> {
        self.sink.add_rule(
            FaultRule::new(OpKind::Put, Fault::Transient, Trigger::times(1))
                .on_keys_containing("/manifests/"),
        )?;
        anyhow::ensure!(
            self.ship(d).await.is_err(),
            "the manifest fault did not fire"
        );
        let disk = self.source(d)?.disk_id();
        let mut left = Vec::new();
        for meta in self
            .sink
            .list(&layout::cycle_blobs_prefix(&disk, cycle))
            .await?
        {
            let bytes = self.sink.get(&meta.key).await?;
            left.push(Obj {
                key: meta.key,
                bytes,
            });
        }
        anyhow::ensure!(
            left.len() >= 2,
            "the abandoned attempt left {} blobs",
            left.len()
        );
        Ok(left)
    }

    /// Restarts source `d` as after a crash that lost the last attempt number it persisted.
    fn rewind_attempts(&mut self, d: usize) -> anyhow::Result<()> {
        let side = &mut self.sides[d];
        drop(side.source.take());
        let path = side.src_state.join("source.json");
        let mut state: SourceState = serde_json::from_slice(&std::fs::read(&path)?)?;
        state.attempts -= 1;
        std::fs::write(&path, serde_json::to_vec_pretty(&state)?)?;
        let (source, _) = Source::open(
            &side.src_state,
            Arc::clone(&side.src_dev),
            TrackerConfig::default(),
        )?;
        side.source = Some(source);
        Ok(())
    }

    fn identical(&self, d: usize) -> bool {
        self.sides[d].src_dev.snapshot() == self.sides[d].tgt_dev.snapshot()
    }

    /// Every object in the cache now.
    fn cache_keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let root = self.local.root();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(root)?;
                    keys.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        Ok(keys)
    }

    fn read_cache(&self) -> anyhow::Result<BTreeMap<String, Bytes>> {
        let mut out = BTreeMap::new();
        for key in self.cache_keys()? {
            out.insert(
                key.clone(),
                Bytes::from(std::fs::read(self.local.path_of(&key))?),
            );
        }
        Ok(out)
    }

    /// Makes the cache hold exactly `want`.
    fn set_cache(&mut self, want: &BTreeMap<String, Bytes>) -> anyhow::Result<()> {
        let present: BTreeSet<String> = self.cache_keys()?.into_iter().collect();
        for key in &present {
            if !want.contains_key(key) {
                std::fs::remove_file(self.local.path_of(key))?;
            }
        }
        for (key, bytes) in want {
            let stale = match &self.dirty {
                None => true,
                Some(dirty) => dirty.contains(key) || key.contains("/acks/"),
            };
            if !present.contains(key) || stale {
                self.write_object(key, bytes)?;
            }
        }
        self.dirty = Some(BTreeSet::new());
        Ok(())
    }

    /// Stores `bytes` under `key` directly in the cache's directory, as a cache would.
    fn write_object(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.local.path_of(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
        Ok(())
    }

    /// The manipulation: each key gets the bytes, or is deleted (`None`).
    fn manipulate(&mut self, writes: &[(String, Option<Bytes>)]) -> anyhow::Result<()> {
        for (key, bytes) in writes {
            if let Some(dirty) = self.dirty.as_mut() {
                dirty.insert(key.clone());
            }
            match bytes {
                Some(b) => self.write_object(key, b)?,
                None => match std::fs::remove_file(self.local.path_of(key)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                },
            }
        }
        Ok(())
    }

    /// Puts target `d` back to `level`, exactly.
    fn reset_target(&mut self, d: usize, level: &Level) -> anyhow::Result<()> {
        let side = &mut self.sides[d];
        let disk = side
            .target
            .take()
            .map(|t| t.disk_id())
            .ok_or_else(|| anyhow::anyhow!("target {d} is closed"))?;
        std::fs::remove_dir_all(&side.tgt_state)?;
        std::fs::create_dir_all(&side.tgt_state)?;
        std::fs::write(side.tgt_state.join("target.json"), &level.state_json)?;
        let holds = side
            .tgt_holds
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(h, &level.image));
        if !holds {
            side.tgt_dev.write_at(&level.image, 0)?;
        }
        side.target = Some(Target::open(
            &side.tgt_state,
            Arc::clone(&side.tgt_dev),
            disk,
        )?);
        side.tgt_holds = Some(Arc::clone(&level.image));
        Ok(())
    }

    /// Puts source `d` back to the set-up's end: cycles 1..=CYCLES pending, nothing acknowledged.
    fn reset_source(&mut self, d: usize, objs: &DiskObjs) -> anyhow::Result<()> {
        let side = &mut self.sides[d];
        drop(side.source.take());
        std::fs::remove_dir_all(&side.src_state)?;
        for (rel, bytes) in &objs.source_files {
            let path = side.src_state.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, bytes)?;
        }
        side.src_dev.write_at(&objs.source_image, 0)?;
        let (source, _) = Source::open(
            &side.src_state,
            Arc::clone(&side.src_dev),
            TrackerConfig::default(),
        )?;
        side.source = Some(source);
        Ok(())
    }

    /// Ship + hydrate disk `d` until the target equals the source (at most
    /// [`HEAL_ROUNDS_MAX`] rounds, each with a few more writes on the source).
    async fn converge(&mut self, d: usize) -> anyhow::Result<bool> {
        for _ in 0..HEAL_ROUNDS_MAX {
            self.churn(d, 3)?;
            self.ship(d).await?;
            let report = self.hydrate(d, 0).await??;
            if let Some(f) = &report.failed {
                anyhow::bail!("cycle {} failed while healing: {}", f.cycle, f.error);
            }
            if self.identical(d) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Data that is not all zeros and compresses well (so that encryption, which runs unoptimized
/// in a debug build, stays cheap): a random 64-byte head, then a repeated line.
fn fill_data(buf: &mut [u8], rng: &mut ChaCha8Rng) {
    let mut head = [0u8; 64];
    rng.fill_bytes(&mut head);
    let line = format!("replica line {:016x}\n", rng.next_u64());
    for (i, b) in buf.iter_mut().enumerate() {
        *b = if i < head.len() {
            head[i]
        } else {
            line.as_bytes()[i % line.len()]
        };
    }
}

/// The first content of a source disk: data regions (one with a random 4 KiB block) and zero
/// regions.
fn fill_initial(dev: &MemDevice, rng: &mut ChaCha8Rng) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    for chunk in 0..(DISK_BYTES / buf.len() as u64) {
        match chunk % 4 {
            0 => {
                fill_data(&mut buf, rng);
                rng.fill_bytes(&mut buf[..4096]);
            }
            1 => fill_data(&mut buf, rng),
            _ => continue,
        }
        dev.write_at(&buf, chunk * buf.len() as u64)?;
    }
    Ok(())
}

/// The first encryption of each blob of a cycle whose attempt number was used twice is
/// authentic, lies under the committed blob's key, and covers the same extents with other data:
/// only the manifest's pin of each blob's tag tells the two apart.
fn check_reused(
    key: &MasterKey,
    disk: DiskId,
    cycle: u64,
    attempt: u64,
    committed: &[Obj],
    reused: &[Obj],
) -> anyhow::Result<()> {
    anyhow::ensure!(
        reused.len() == committed.len(),
        "{} blobs, then {}",
        reused.len(),
        committed.len()
    );
    let disk_key = key.disk_key(&disk);
    for (seq, (old, new)) in reused.iter().zip(committed).enumerate() {
        anyhow::ensure!(old.key == new.key, "{} is not {}", old.key, new.key);
        let expect = format::Expect {
            disk_id: disk,
            cycle,
            attempt: Some(attempt),
            seq: Some(u32::try_from(seq)?),
            tag: None,
        };
        let old = format::decode_blob(&disk_key, &old.bytes, &expect)?;
        let new = format::decode_blob(&disk_key, &new.bytes, &expect)?;
        anyhow::ensure!(old.extents == new.extents, "blob {seq}: other extents");
        anyhow::ensure!(
            old.data != new.data || old.data.is_empty(),
            "blob {seq}: same data"
        );
    }
    Ok(())
}

fn read_tree(root: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    path.strip_prefix(root)?.to_path_buf(),
                    std::fs::read(&path)?,
                ));
            }
        }
    }
    Ok(out)
}

/// Ships CYCLES cycles of every disk (the abandoned attempt included) and records every object,
/// then builds the target levels and the acknowledgements.
async fn set_up(seed: u64) -> anyhow::Result<(Bed, Arc<Pristine>)> {
    let mut bed = Bed::new(seed)?;
    let mut abandoned = vec![Vec::new(); DISKS];
    let mut reused = vec![Vec::new(); DISKS];
    for cycle in 1..=CYCLES {
        for (d, (abandoned, reused)) in abandoned.iter_mut().zip(reused.iter_mut()).enumerate() {
            let ops = if cycle > 1 {
                bed.churn(d, 24)?
            } else {
                Vec::new()
            };
            if cycle == ABANDONED_CYCLE {
                *abandoned = bed.abandon_attempt(d, cycle).await?;
            }
            if cycle == REUSED_ATTEMPT_CYCLE {
                *reused = bed.abandon_attempt(d, cycle).await?;
                bed.rewind_attempts(d)?;
                // The same sectors change again before the retry: its blobs cover exactly the
                // same extents, with other data.
                bed.rewrite(d, &ops)?;
            }
            let shipped = bed.ship(d).await?;
            anyhow::ensure!(
                shipped.cycle == cycle,
                "disk {d} shipped cycle {}",
                shipped.cycle
            );
            anyhow::ensure!(
                shipped.blob_count >= 2,
                "cycle {cycle} of disk {d}: one blob"
            );
            anyhow::ensure!(
                shipped.zero_bytes > 0,
                "cycle {cycle} of disk {d}: no zero extent"
            );
            anyhow::ensure!(
                shipped.zero_bytes < shipped.changed_bytes(),
                "cycle {cycle} of disk {d}: no data extent"
            );
        }
    }
    let cache = bed.read_cache()?;
    let mut disks = Vec::new();
    for (d, (abandoned, reused)) in abandoned.into_iter().zip(reused).enumerate() {
        let disk_id = bed.source(d)?.disk_id();
        let mut manifests = Vec::new();
        let mut blobs = Vec::new();
        for cycle in 1..=CYCLES {
            let key = layout::manifest_key(&disk_id, cycle);
            let bytes = cache
                .get(&key)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no manifest {key}"))?;
            let attempt = format::peek_header(&bytes)?.attempt;
            manifests.push(Obj { key, bytes });
            let prefix = layout::cycle_blobs_prefix(&disk_id, cycle);
            let of_cycle: Vec<Obj> = cache
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, b)| Obj {
                    key: k.clone(),
                    bytes: b.clone(),
                })
                .collect();
            for (seq, o) in of_cycle.iter().enumerate() {
                let want = layout::blob_key(&disk_id, cycle, attempt, u32::try_from(seq)?);
                anyhow::ensure!(o.key == want, "unexpected blob {} (want {want})", o.key);
            }
            if cycle == REUSED_ATTEMPT_CYCLE {
                check_reused(&bed.key, disk_id, cycle, attempt, &of_cycle, &reused)?;
            }
            blobs.push(of_cycle);
        }
        let side = &bed.sides[d];
        disks.push(DiskObjs {
            disk_id,
            manifests,
            blobs,
            applied_acks: Vec::new(),
            failed_acks: Vec::new(),
            abandoned,
            reused,
            levels: Vec::new(),
            failed_levels: Vec::new(),
            source_files: read_tree(&side.src_state)?,
            source_image: Arc::new(side.src_dev.snapshot()),
        });
    }
    let mut pristine = Pristine { cache, disks };

    // The target levels and the acknowledgements: apply one cycle at a time; then, from each
    // level, fail the next cycle on a damaged blob.
    for d in 0..DISKS {
        let initial_json = std::fs::read(bed.sides[d].tgt_state.join("target.json"))?;
        let mut levels = vec![Level {
            image: Arc::new(bed.sides[d].tgt_dev.snapshot()),
            state_json: initial_json,
            committed: 0,
        }];
        let mut applied_acks = Vec::new();
        for cycle in 1..=CYCLES {
            let report = bed.hydrate(d, 1).await??;
            anyhow::ensure!(
                report.applied.len() == 1 && report.committed_cycle == cycle,
                "disk {d}: cycle {cycle} did not apply: {:?}",
                report.failed
            );
            let key = layout::ack_key(&pristine.disks[d].disk_id, cycle);
            applied_acks.push(Obj {
                bytes: bed.sink.get(&key).await?,
                key,
            });
            levels.push(Level {
                image: Arc::new(bed.sides[d].tgt_dev.snapshot()),
                state_json: std::fs::read(bed.sides[d].tgt_state.join("target.json"))?,
                committed: cycle,
            });
        }
        anyhow::ensure!(bed.identical(d), "disk {d}: the set-up did not converge");
        bed.dirty = None;
        bed.set_cache(&pristine.cache)?;
        let mut failed_acks = Vec::new();
        let mut failed_levels = Vec::new();
        for cycle in 1..=CYCLES {
            bed.reset_target(d, &levels[cycle as usize - 1])?;
            let victim = &pristine.disks[d].blobs[cycle as usize - 1][0];
            let mut damaged = victim.bytes.to_vec();
            damaged[HEADER_LEN] ^= 0x01;
            bed.manipulate(&[(victim.key.clone(), Some(Bytes::from(damaged)))])?;
            let report = bed.hydrate(d, 0).await??;
            anyhow::ensure!(
                report.failed.as_ref().is_some_and(|f| f.cycle == cycle),
                "disk {d}: the damaged cycle {cycle} did not fail"
            );
            let key = layout::ack_key(&pristine.disks[d].disk_id, cycle);
            failed_acks.push(Obj {
                bytes: bed.sink.get(&key).await?,
                key,
            });
            failed_levels.push(Level {
                image: Arc::new(bed.sides[d].tgt_dev.snapshot()),
                state_json: std::fs::read(bed.sides[d].tgt_state.join("target.json"))?,
                committed: cycle - 1,
            });
            bed.set_cache(&pristine.cache)?;
        }
        let objs = &mut pristine.disks[d];
        objs.levels = levels;
        objs.applied_acks = applied_acks;
        objs.failed_acks = failed_acks;
        objs.failed_levels = failed_levels;
    }
    Ok((bed, Arc::new(pristine)))
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Row {
    name: String,
    attempts: u64,
    detected: u64,
    untouched: u64,
    heals_tried: u64,
    healed: u64,
    /// The first few failures, for the assertion message.
    failures: Vec<String>,
}

#[derive(Debug, Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn row(&mut self, name: &str) -> &mut Row {
        if let Some(i) = self.rows.iter().position(|r| r.name == name) {
            return &mut self.rows[i];
        }
        self.rows.push(Row {
            name: name.to_owned(),
            ..Row::default()
        });
        let last = self.rows.len() - 1;
        &mut self.rows[last]
    }

    fn record(
        &mut self,
        name: &str,
        detected: bool,
        untouched: bool,
        note: impl FnOnce() -> String,
    ) {
        let row = self.row(name);
        row.attempts += 1;
        row.detected += u64::from(detected);
        row.untouched += u64::from(untouched);
        if (!detected || !untouched) && row.failures.len() < 3 {
            row.failures.push(note());
        }
    }

    fn record_heal(&mut self, name: &str, healed: Result<bool, String>) {
        let row = self.row(name);
        row.heals_tried += 1;
        match healed {
            Ok(true) => row.healed += 1,
            Ok(false) => {
                if row.failures.len() < 3 {
                    row.failures
                        .push(format!("did not converge in {HEAL_ROUNDS_MAX} rounds"));
                }
            }
            Err(e) => {
                if row.failures.len() < 3 {
                    row.failures.push(format!("heal failed: {e}"));
                }
            }
        }
    }

    fn render(&self) -> String {
        fn pct(n: u64, of: u64) -> String {
            if of == 0 {
                return "-".into();
            }
            let p = n as f64 * 100.0 / of as f64;
            if n == of {
                "100%".into()
            } else {
                format!("{p:.1}% ({n})")
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| manipulation | attempts | detected | target untouched | heals |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
        let mut totals = Row::default();
        for r in &self.rows {
            totals.attempts += r.attempts;
            totals.detected += r.detected;
            totals.untouched += r.untouched;
            totals.heals_tried += r.heals_tried;
            totals.healed += r.healed;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                r.name,
                r.attempts,
                pct(r.detected, r.attempts),
                pct(r.untouched, r.attempts),
                if r.heals_tried == 0 {
                    "-".to_owned()
                } else {
                    format!("{}/{}", r.healed, r.heals_tried)
                }
            );
        }
        let _ = writeln!(
            out,
            "| **all {} rows** | {} | {} | {} | {}/{} |",
            self.rows.len(),
            totals.attempts,
            pct(totals.detected, totals.attempts),
            pct(totals.untouched, totals.attempts),
            totals.healed,
            totals.heals_tried
        );
        out
    }

    fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| {
                r.attempts == 0
                    || r.detected != r.attempts
                    || r.untouched != r.attempts
                    || r.healed != r.heals_tried
            })
            .map(|r| format!("{}: {}", r.name, r.failures.join(" | ")))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Attempts
// ---------------------------------------------------------------------------------------------

/// A manipulation of the cache: each key gets the bytes, or is deleted (`None`).
type Writes = Vec<(String, Option<Bytes>)>;

/// What hydrate must do with a manipulated cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Fail the cycle (or refuse to go on) with an error naming one of the keys, writing
    /// nothing.
    Refused,
    /// Apply nothing and report the later cycles as waiting (their base never arrived).
    Withheld,
}

/// A manipulation that hydrate reads: the target stands at `cycle - 1`.
#[derive(Debug)]
struct Attempt {
    row: String,
    disk: usize,
    cycle: u64,
    writes: Writes,
    /// The error must name one of these keys.
    names: Vec<String>,
    want: Want,
}

/// Which acknowledgement of a cycle the target wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Applied,
    Failed,
}

/// A manipulation of the acknowledgement of `cycle`, which the source reads.
#[derive(Debug)]
struct AckAttempt {
    row: String,
    disk: usize,
    cycle: u64,
    /// What the target really wrote for `cycle`.
    status: Status,
    writes: Writes,
    /// The source must refuse it naming this key (a warning or an error); `None` for a
    /// withheld object, which leaves nothing to name.
    names: Option<String>,
    /// Heal without restoring the cache: the system must repair the damage alone.
    heal_alone: bool,
}

fn names_any(text: &str, keys: &[String]) -> bool {
    keys.iter().any(|k| text.contains(k.as_str()))
}

/// The cache as the genuine system left it with disk `d`'s target having handled cycles
/// `1..cycle` (applied) and, if given, `cycle` itself.
fn baseline(p: &Pristine, d: usize, cycle: u64, own: Option<Status>) -> BTreeMap<String, Bytes> {
    let objs = &p.disks[d];
    let mut cache = p.cache.clone();
    for ack in objs.applied_acks.iter().take(cycle as usize - 1) {
        cache.insert(ack.key.clone(), ack.bytes.clone());
    }
    let own = match own {
        Some(Status::Applied) => Some(&objs.applied_acks[cycle as usize - 1]),
        Some(Status::Failed) => Some(&objs.failed_acks[cycle as usize - 1]),
        None => None,
    };
    if let Some(ack) = own {
        cache.insert(ack.key.clone(), ack.bytes.clone());
    }
    cache
}

/// One hydrate attempt; with `heal`, then restores the cache and shows ship + hydrate converge.
async fn run_hydrate_attempt(
    bed: &mut Bed,
    p: &Pristine,
    table: &mut Table,
    a: &Attempt,
    heal: bool,
) -> anyhow::Result<()> {
    let objs = &p.disks[a.disk];
    let level = objs
        .levels
        .get(a.cycle as usize - 1)
        .ok_or_else(|| anyhow::anyhow!("no level before cycle {}", a.cycle))?;
    // Cycles the target cannot have handled yet hold no acknowledgement.
    let before = baseline(p, a.disk, a.cycle.min(CYCLES + 1), None);
    bed.set_cache(&before)?;
    bed.reset_target(a.disk, level)?;
    bed.manipulate(&a.writes)?;
    let result = bed.hydrate(a.disk, 0).await?;
    let (detected, outcome) = match (&result, a.want) {
        (Ok(r), Want::Refused) => (
            r.applied.is_empty()
                && r.failed.as_ref().is_some_and(|f| {
                    f.cycle == a.cycle && names_any(&f.error.to_string(), &a.names)
                }),
            format!(
                "applied {:?}, failed {:?}",
                r.applied.iter().map(|x| x.cycle).collect::<Vec<_>>(),
                r.failed.as_ref().map(|f| (f.cycle, f.error.to_string()))
            ),
        ),
        (Err(e), Want::Refused) => (names_any(&e.to_string(), &a.names), format!("error {e}")),
        (Ok(r), Want::Withheld) => (
            r.applied.is_empty() && r.failed.is_none() && r.waiting_cycles.contains(&(a.cycle + 1)),
            format!(
                "applied {:?}, failed {:?}, waiting {:?}",
                r.applied.iter().map(|x| x.cycle).collect::<Vec<_>>(),
                r.failed.as_ref().map(|f| f.cycle),
                r.waiting_cycles
            ),
        ),
        (Err(e), Want::Withheld) => (false, format!("error {e}")),
    };
    let state = bed.target(a.disk)?.state().clone();
    let untouched = state.committed_cycle == level.committed
        && state.applying_cycle.is_none()
        && bed.sides[a.disk].tgt_dev.snapshot() == *level.image;
    if untouched {
        bed.sides[a.disk].tgt_holds = Some(Arc::clone(&level.image));
    }
    table.record(&a.row, detected, untouched, || {
        format!(
            "disk {} cycle {} {:?}: {outcome}; committed {}",
            a.disk,
            a.cycle,
            a.writes.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
            state.committed_cycle
        )
    });
    if heal {
        // The source as the set-up left it, the cache as before the manipulation: the
        // target's own failure report, written since, is gone too.
        bed.reset_source(a.disk, objs)?;
        bed.set_cache(&before)?;
        let healed = bed.converge(a.disk).await;
        table.record_heal(&a.row, healed.map_err(|e| format!("{e:#}")));
    }
    Ok(())
}

/// Collects tracing events (the source reports an acknowledgement it ignores as a warning).
#[derive(Clone, Debug, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

impl Events {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// What the source believes: pending cycles, acknowledged cycle, sectors marked for the next
/// cycle.
fn beliefs(s: &SourceState, marked: u64) -> (Vec<u64>, u64, u64) {
    (
        s.pending.iter().map(|p| p.cycle).collect(),
        s.acked_cycle,
        marked,
    )
}

/// One acknowledgement attempt: the source reads the cache; it must keep believing exactly
/// what the genuine acknowledgements of the earlier cycles say.
async fn run_ack_attempt(
    bed: &mut Bed,
    p: &Pristine,
    table: &mut Table,
    a: &AckAttempt,
    events: &Events,
    heal: bool,
) -> anyhow::Result<()> {
    let objs = &p.disks[a.disk];
    let k = a.cycle as usize;
    let level = match a.status {
        Status::Applied => &objs.levels[k],
        Status::Failed => &objs.failed_levels[k - 1],
    };
    let before = baseline(p, a.disk, a.cycle, Some(a.status));
    bed.set_cache(&before)?;
    bed.reset_target(a.disk, level)?;
    bed.reset_source(a.disk, objs)?;
    let marked = bed.source(a.disk)?.tracker().current()?.count();
    let want = ((a.cycle..=CYCLES).collect::<Vec<_>>(), a.cycle - 1, marked);
    bed.manipulate(&a.writes)?;
    let disk_key = bed.key.disk_key(&objs.disk_id);
    let sink = Arc::clone(&bed.sink);
    events.take();
    let result = sync_acks(bed.source(a.disk)?, sink.as_ref(), &disk_key).await;
    let warned = events.take();
    let source = bed.source(a.disk)?;
    let now = beliefs(source.state(), source.tracker().current()?.count());
    let named = match (&a.names, &result) {
        (None, _) => true,
        (Some(key), Err(e)) => e.to_string().contains(key.as_str()),
        (Some(key), Ok(_)) => warned.iter().any(|w| w.contains(key.as_str())),
    };
    let detected = named && now == want;
    let state = bed.target(a.disk)?.state().clone();
    let untouched = state.committed_cycle == level.committed
        && bed.sides[a.disk].tgt_dev.snapshot() == *level.image;
    table.record(&a.row, detected, untouched, || {
        format!(
            "disk {} cycle {} {:?}: source believes {now:?}, want {want:?}; result {:?}; warnings {warned:?}",
            a.disk,
            a.cycle,
            a.status,
            result.as_ref().map_err(ToString::to_string)
        )
    });
    if heal {
        if !a.heal_alone {
            bed.set_cache(&before)?;
        }
        let healed = bed.converge(a.disk).await;
        table.record_heal(&a.row, healed.map_err(|e| format!("{e:#}")));
    }
    Ok(())
}

/// A processed acknowledgement shown to the source again: its beliefs must not change.
/// With `Failed`, the source has meanwhile shipped the replacement cycle, which a replayed
/// failure report must not kill.
async fn run_processed_replay(
    bed: &mut Bed,
    p: &Pristine,
    table: &mut Table,
    d: usize,
    cycle: u64,
    status: Status,
    heal: bool,
) -> anyhow::Result<()> {
    let row = match status {
        Status::Applied => "ack: replay a processed acknowledgement",
        Status::Failed => "ack: replay a processed failure report",
    };
    let objs = &p.disks[d];
    let k = cycle as usize;
    let level = match status {
        Status::Applied => &objs.levels[k],
        Status::Failed => &objs.failed_levels[k - 1],
    };
    let genuine = baseline(p, d, cycle, Some(status));
    bed.set_cache(&genuine)?;
    bed.reset_target(d, level)?;
    bed.reset_source(d, objs)?;
    let replayed = match status {
        Status::Applied => &objs.applied_acks[k - 1],
        Status::Failed => &objs.failed_acks[k - 1],
    };
    if status == Status::Failed {
        // The source learns of the failure and ships the replacement; the target applies it.
        bed.churn(d, 2)?;
        bed.ship(d).await?;
        bed.hydrate(d, 0).await??;
    }
    let disk_key = bed.key.disk_key(&objs.disk_id);
    let sink = Arc::clone(&bed.sink);
    sync_acks(bed.source(d)?, sink.as_ref(), &disk_key).await?;
    let source = bed.source(d)?;
    let want = beliefs(source.state(), source.tracker().current()?.count());
    let target_before = bed.sides[d].tgt_dev.snapshot();
    let committed_before = bed.target(d)?.state().committed_cycle;
    // Garbage collection may have removed it; the cache puts it back.
    bed.manipulate(&[(replayed.key.clone(), Some(replayed.bytes.clone()))])?;
    let result = sync_acks(bed.source(d)?, sink.as_ref(), &disk_key).await;
    let source = bed.source(d)?;
    let now = beliefs(source.state(), source.tracker().current()?.count());
    let detected = result.is_ok() && now == want;
    let untouched = bed.target(d)?.state().committed_cycle == committed_before
        && bed.sides[d].tgt_dev.snapshot() == target_before;
    bed.sides[d].tgt_holds = None;
    table.record(row, detected, untouched, || {
        format!("disk {d} cycle {cycle}: source believes {now:?}, want {want:?}; {result:?}")
    });
    if heal {
        let healed = bed.converge(d).await;
        table.record_heal(row, healed.map_err(|e| format!("{e:#}")));
    }
    Ok(())
}

/// Rolls the whole cache back to a snapshot taken `back` cycles ago, after the target applied
/// them; with `lose_shipped`, a cycle shipped and not yet applied is lost with it. Hydrate must
/// apply nothing and leave the target as it was; the pair must then converge (after the cache
/// comes forward again, for a lost shipped cycle).
async fn run_rollback(
    bed: &mut Bed,
    p: &Pristine,
    table: &mut Table,
    d: usize,
    back: usize,
    lose_shipped: bool,
) -> anyhow::Result<()> {
    let row = if lose_shipped {
        "cache rolled back past a shipped cycle (then brought forward)"
    } else {
        "cache rolled back past applied cycles"
    };
    let objs = &p.disks[d];
    let all_applied = baseline(p, d, CYCLES, Some(Status::Applied));
    bed.set_cache(&all_applied)?;
    bed.reset_target(d, &objs.levels[CYCLES as usize])?;
    bed.reset_source(d, objs)?;
    let mut snapshots = vec![bed.read_cache()?];
    for _ in 0..3 {
        bed.churn(d, 6)?;
        bed.ship(d).await?;
        let r = bed.hydrate(d, 0).await??;
        anyhow::ensure!(r.failed.is_none() && r.applied.len() == 1, "{:?}", r.failed);
        snapshots.push(bed.read_cache()?);
    }
    if lose_shipped {
        bed.churn(d, 6)?;
        bed.ship(d).await?;
    }
    let newest = bed.read_cache()?;
    let snapshot = &snapshots[snapshots.len() - 1 - back];
    bed.dirty = None;
    bed.set_cache(snapshot)?;
    let image = bed.sides[d].tgt_dev.snapshot();
    let committed = bed.target(d)?.state().committed_cycle;
    let result = bed.hydrate(d, 0).await?;
    let detected = result
        .as_ref()
        .is_ok_and(|r| r.applied.is_empty() && r.failed.is_none());
    let untouched = bed.target(d)?.state().committed_cycle == committed
        && bed.target(d)?.state().applying_cycle.is_none()
        && bed.sides[d].tgt_dev.snapshot() == image;
    table.record(row, detected, untouched, || {
        format!(
            "disk {d} back {back}: {:?}",
            result.as_ref().map(|r| (
                r.applied.iter().map(|a| a.cycle).collect::<Vec<_>>(),
                r.failed.as_ref().map(|f| f.error.to_string())
            ))
        )
    });
    if lose_shipped {
        bed.dirty = None;
        bed.set_cache(&newest)?;
    }
    let healed = bed.converge(d).await;
    table.record_heal(row, healed.map_err(|e| format!("{e:#}")));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Manipulations
// ---------------------------------------------------------------------------------------------

/// The byte-position classes of an object of `len` bytes: each header field, the ciphertext
/// body and the GCM tag.
fn classes(len: usize) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let field = |off: usize, n: usize| off..off + n;
    vec![
        ("magic", field(format::OFF_MAGIC, 8)),
        ("version", field(format::OFF_VERSION, 2)),
        ("kind", field(format::OFF_KIND, 1)),
        ("flags", field(format::OFF_FLAGS, 1)),
        ("key id", field(format::OFF_KEY_ID, format::KEY_ID_LEN)),
        ("disk id", field(format::OFF_DISK_ID, format::DISK_ID_LEN)),
        ("cycle", field(format::OFF_CYCLE, 8)),
        ("attempt", field(format::OFF_ATTEMPT, 8)),
        ("seq", field(format::OFF_SEQ, 4)),
        ("salt", field(format::OFF_SALT, format::SALT_LEN)),
        ("nonce", field(format::OFF_NONCE, format::NONCE_LEN)),
        ("payload length", field(format::OFF_PAYLOAD_LEN, 8)),
        ("header crc", field(format::OFF_HEADER_CRC, 4)),
        ("ciphertext body", HEADER_LEN..len - TAG_LEN),
        ("GCM tag", len - TAG_LEN..len),
    ]
}

const MASKS: [u8; 5] = [0x01, 0x80, 0xff, 0x20, 0x5a];

/// `bytes` with the byte at `pos` xored with `mask`; with `fix_crc`, the header CRC made to
/// match again (a forger who knows the format).
fn flipped(bytes: &Bytes, pos: usize, mask: u8, fix_crc: bool) -> Bytes {
    let mut b = bytes.to_vec();
    b[pos] ^= mask;
    if fix_crc {
        let crc = crc32fast::hash(&b[..format::OFF_HEADER_CRC]);
        b[format::OFF_HEADER_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    Bytes::from(b)
}

/// Every flip of `obj` for object number `i`: `reps` positions in each class, rotating through
/// the class's bytes across objects. Yields (row suffix, bytes).
fn flips(obj: &Obj, i: usize, reps: usize) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for (c, (name, range)) in classes(obj.bytes.len()).into_iter().enumerate() {
        for r in 0..reps {
            let pos = range.start + (i * 7 + r * 13 + c) % range.len();
            let mask = MASKS[(i + r + c) % MASKS.len()];
            out.push((
                format!("flip {name}"),
                flipped(&obj.bytes, pos, mask, false),
            ));
            if range.end <= format::OFF_HEADER_CRC {
                out.push((
                    format!("flip {name}, header CRC recomputed"),
                    flipped(&obj.bytes, pos, mask, true),
                ));
            }
        }
    }
    out
}

fn truncations(obj: &Obj) -> Vec<Bytes> {
    let len = obj.bytes.len();
    let mut lens: Vec<usize> = vec![
        0,
        1,
        8,
        HEADER_LEN - 1,
        HEADER_LEN,
        HEADER_LEN + 1,
        HEADER_LEN + TAG_LEN - 1,
        HEADER_LEN + TAG_LEN,
        len / 2,
        len - TAG_LEN - 1,
        len - TAG_LEN,
        len - 1,
    ];
    lens.retain(|&n| n < len);
    lens.sort_unstable();
    lens.dedup();
    lens.into_iter().map(|n| obj.bytes.slice(..n)).collect()
}

fn extensions(obj: &Obj, rng: &mut ChaCha8Rng) -> Vec<Bytes> {
    let mut out = Vec::new();
    let tag = obj.bytes.slice(obj.bytes.len() - TAG_LEN..);
    let mut random = vec![0u8; 4096];
    rng.fill_bytes(&mut random);
    for tail in [
        vec![0u8],
        random[..16].to_vec(),
        tag.to_vec(),
        random.clone(),
        obj.bytes.to_vec(),
    ] {
        let mut b = obj.bytes.to_vec();
        b.extend_from_slice(&tail);
        out.push(Bytes::from(b));
    }
    out
}

/// `n` of `items`, rotating with `i` so that successive objects get different ones and together
/// cover them all.
fn pick<T: Clone>(items: &[T], i: usize, n: usize) -> Vec<T> {
    if items.is_empty() {
        return Vec::new();
    }
    (0..n.min(items.len()))
        .map(|j| items[(i * n + j) % items.len()].clone())
        .collect()
}

fn one(key: &str, bytes: Bytes) -> Writes {
    vec![(key.to_owned(), Some(bytes))]
}

/// Hydrate must refuse `writes` in cycle `cycle` of disk `disk`, naming a key written.
fn refused(row: &str, disk: usize, cycle: u64, writes: Writes) -> Attempt {
    Attempt {
        row: row.to_owned(),
        disk,
        cycle,
        names: writes.iter().map(|(k, _)| k.clone()).collect(),
        writes,
        want: Want::Refused,
    }
}

/// Every manipulation hydrate reads: of blobs and manifests.
fn hydrate_attempts(p: &Pristine, rng: &mut ChaCha8Rng) -> Vec<Attempt> {
    let mut out = Vec::new();
    for (d, objs) in p.disks.iter().enumerate() {
        let other = &p.disks[(d + 1) % DISKS];
        let mut i = d * 1000;
        for (c, blobs) in objs.blobs.iter().enumerate() {
            let cycle = c as u64 + 1;
            for (s, blob) in blobs.iter().enumerate() {
                i += 1;
                let key = &blob.key;
                let mut add = |row: &str, writes: Writes| out.push(refused(row, d, cycle, writes));
                for (what, bytes) in flips(blob, i, 1) {
                    add(&format!("blob: {what}"), one(key, bytes));
                }
                for bytes in pick(&truncations(blob), i, 4) {
                    add("blob: truncate", one(key, bytes));
                }
                for bytes in pick(&extensions(blob, rng), i, 2) {
                    add("blob: append bytes", one(key, bytes));
                }
                add("blob: delete", vec![(key.clone(), None)]);
                let next = &blobs[(s + 1) % blobs.len()];
                add(
                    "blob: another seq's blob duplicated under its key",
                    one(key, next.bytes.clone()),
                );
                if s + 1 < blobs.len() {
                    add(
                        "blob: two positions of a cycle swapped",
                        vec![
                            (key.clone(), Some(next.bytes.clone())),
                            (next.key.clone(), Some(blob.bytes.clone())),
                        ],
                    );
                }
                if let Some(theirs) = other.blobs[c].get(s) {
                    add(
                        "blob: swapped with the other disk's (same cycle and seq)",
                        vec![
                            (key.clone(), Some(theirs.bytes.clone())),
                            (theirs.key.clone(), Some(blob.bytes.clone())),
                        ],
                    );
                }
                let others: Vec<usize> = (0..objs.blobs.len()).filter(|&c2| c2 != c).collect();
                for c2 in pick(&others, i, 1) {
                    let donors = &objs.blobs[c2];
                    let donor = donors.get(s).unwrap_or(&donors[0]);
                    add(
                        "blob: another cycle's blob (same seq) under its key",
                        one(key, donor.bytes.clone()),
                    );
                }
                if cycle == ABANDONED_CYCLE
                    && let Some(old) = objs.abandoned.get(s)
                {
                    add(
                        "blob: an abandoned attempt's blob (same seq) under its key",
                        one(key, old.bytes.clone()),
                    );
                }
                if cycle == REUSED_ATTEMPT_CYCLE
                    && let Some(old) = objs.reused.get(s)
                {
                    add(
                        "blob: its earlier encryption under the same key (attempt number reused)",
                        one(key, old.bytes.clone()),
                    );
                }
            }
        }
        for (c, manifest) in objs.manifests.iter().enumerate() {
            let cycle = c as u64 + 1;
            let key = &manifest.key;
            i += 1;
            let mut add = |row: &str, writes: Writes| out.push(refused(row, d, cycle, writes));
            for (what, bytes) in flips(manifest, i, 4) {
                add(&format!("manifest: {what}"), one(key, bytes));
            }
            for bytes in truncations(manifest) {
                add("manifest: truncate", one(key, bytes));
            }
            for bytes in extensions(manifest, rng) {
                add("manifest: append bytes", one(key, bytes));
            }
            for older in &objs.manifests[..c] {
                add(
                    "manifest: an older cycle's replayed under a newer key",
                    one(key, older.bytes.clone()),
                );
            }
            add(
                "manifest: the other disk's (same cycle) under its key",
                one(key, other.manifests[c].bytes.clone()),
            );
            // Under the key of a cycle not shipped yet: the target fails that cycle number.
            let future = layout::manifest_key(&objs.disk_id, CYCLES + 1);
            out.push(refused(
                "manifest: replayed under a future cycle's key",
                d,
                CYCLES + 1,
                one(&future, manifest.bytes.clone()),
            ));
            if cycle < CYCLES {
                out.push(Attempt {
                    row: "manifest: delete (withhold a cycle)".into(),
                    disk: d,
                    cycle,
                    writes: vec![(key.clone(), None)],
                    names: Vec::new(),
                    want: Want::Withheld,
                });
            }
        }
    }
    out
}

/// The source must ignore `writes` to the acknowledgement of cycle `cycle` of disk `disk`,
/// naming its key.
fn ignored(row: &str, disk: usize, cycle: u64, status: Status, writes: Writes) -> AckAttempt {
    AckAttempt {
        row: row.to_owned(),
        disk,
        cycle,
        status,
        names: writes.first().map(|(k, _)| k.clone()),
        writes,
        heal_alone: false,
    }
}

/// Every manipulation of acknowledgements, which the source reads.
fn ack_attempts(p: &Pristine, rng: &mut ChaCha8Rng) -> Vec<AckAttempt> {
    let mut out = Vec::new();
    let mut deleted = Vec::new();
    for (d, objs) in p.disks.iter().enumerate() {
        let other = &p.disks[(d + 1) % DISKS];
        let mut i = d * 1000;
        for (c, (applied, failed)) in objs.applied_acks.iter().zip(&objs.failed_acks).enumerate() {
            let cycle = c as u64 + 1;
            for (status, ack) in [(Status::Applied, applied), (Status::Failed, failed)] {
                i += 1;
                let key = &ack.key;
                let mut add =
                    |row: &str, writes: Writes| out.push(ignored(row, d, cycle, status, writes));
                for (what, bytes) in flips(ack, i, 3) {
                    add(&format!("ack: {what}"), one(key, bytes));
                }
                for bytes in truncations(ack) {
                    add("ack: truncate", one(key, bytes));
                }
                for bytes in extensions(ack, rng) {
                    add("ack: append bytes", one(key, bytes));
                }
                for older in objs.applied_acks[..c].iter().chain(&objs.failed_acks[..c]) {
                    add(
                        "ack: an older cycle's replayed under a newer key",
                        one(key, older.bytes.clone()),
                    );
                }
                for theirs in [&other.applied_acks[c], &other.failed_acks[c]] {
                    add(
                        "ack: the other disk's (same cycle) under its key",
                        one(key, theirs.bytes.clone()),
                    );
                }
            }
            // Nothing to name: the cycle must stay pending, and the target put the report again.
            deleted.push(AckAttempt {
                names: None,
                heal_alone: true,
                ..ignored(
                    "ack: a failure report deleted (not restored)",
                    d,
                    cycle,
                    Status::Failed,
                    vec![(failed.key.clone(), None)],
                )
            });
        }
    }
    out.extend(deleted);
    out
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// For each (row, disk), the index of its middle attempt: the one that is healed.
fn middles<'a>(keys: impl Iterator<Item = (&'a str, usize)>) -> BTreeSet<usize> {
    let mut by_row: BTreeMap<(&str, usize), Vec<usize>> = BTreeMap::new();
    for (i, key) in keys.enumerate() {
        by_row.entry(key).or_default().push(i);
    }
    by_row.values().map(|v| v[v.len() / 2]).collect()
}

/// `target/hostile-cache-table.md` of the workspace (or of `CARGO_TARGET_DIR`).
fn table_path() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = crate_dir.parent().unwrap_or(crate_dir);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace.join(dir))
        .unwrap_or_else(|| workspace.join("target"));
    target.join("hostile-cache-table.md")
}

#[tokio::test]
async fn hostile_cache_every_manipulation_is_caught_before_the_target_and_heals()
-> anyhow::Result<()> {
    let events = Events::default();
    let _events = tracing::subscriber::set_default(events.clone());
    let (mut bed, p) = set_up(0x5eed).await?;
    let mut rng = ChaCha8Rng::seed_from_u64(0xbad);
    let mut table = Table::default();

    let mut attempts = hydrate_attempts(&p, &mut rng);
    for a in &attempts {
        table.row(&a.row);
    }
    // Grouped by disk and cycle, so the target image changes rarely.
    attempts.sort_by_key(|a| (a.disk, a.cycle));
    let heals = middles(attempts.iter().map(|a| (a.row.as_str(), a.disk)));
    for (i, a) in attempts.iter().enumerate() {
        run_hydrate_attempt(&mut bed, &p, &mut table, a, heals.contains(&i)).await?;
    }
    let attempts = ack_attempts(&p, &mut rng);
    let heals = middles(attempts.iter().map(|a| (a.row.as_str(), a.disk)));
    for (i, a) in attempts.iter().enumerate() {
        run_ack_attempt(&mut bed, &p, &mut table, a, &events, heals.contains(&i)).await?;
    }
    for d in 0..DISKS {
        for cycle in 1..=CYCLES {
            for status in [Status::Applied, Status::Failed] {
                run_processed_replay(&mut bed, &p, &mut table, d, cycle, status, cycle == CYCLES)
                    .await?;
            }
        }
        for back in 0..=3 {
            // Back 0 without a lost cycle would be no rollback at all.
            if back > 0 {
                run_rollback(&mut bed, &p, &mut table, d, back, false).await?;
            }
            run_rollback(&mut bed, &p, &mut table, d, back, true).await?;
        }
    }

    let rendered = table.render();
    let path = table_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, &rendered)?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "hostile cache table (also in {}):\n{rendered}",
            path.display()
        )?;
    }
    let failures = table.failures();
    assert!(
        failures.is_empty(),
        "{} rows below 100%:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Regressions the table caught
// ---------------------------------------------------------------------------------------------

/// Damages the last bytes of a blob of `cycle` and hydrates: the cycle fails there. Returns the
/// blob's key and its genuine bytes.
async fn fail_a_cycle(w: &mut common::World, cycle: u64) -> anyhow::Result<(String, Vec<u8>)> {
    let blob = w.blob_keys(cycle).await?.remove(0);
    let path = w.cache_path().join(&blob);
    let genuine = std::fs::read(&path)?;
    let mut damaged = genuine.clone();
    let last = damaged.len() - 1;
    damaged[last - 20] ^= 0x01;
    std::fs::write(&path, &damaged)?;
    Ok((blob, genuine))
}

/// The cache lost a failure report (rolled back over it): the target never put it again, so the
/// source waited for it forever while the target waited for a cycle on the failed one's base.
#[tokio::test]
async fn a_failure_report_lost_by_the_cache_is_put_again() -> anyhow::Result<()> {
    let mut w = common::World::new(21)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(30)?;
    let failed = w.ship().await?;
    let (blob, genuine) = fail_a_cycle(&mut w, failed.cycle).await?;
    let r = w.hydrate().await?;
    assert_eq!(r.failed.map(|f| f.cycle), Some(failed.cycle));
    // The cache goes back to before the failure: the blob genuine again, no failure report.
    std::fs::write(w.cache_path().join(&blob), genuine)?;
    let report = layout::ack_key(&w.source.disk_id(), failed.cycle);
    w.sink.delete(&report).await?;

    w.churn(3)?;
    let chained = w.ship().await?;
    assert_eq!(
        chained.base_cycle, failed.cycle,
        "the source still waits for the failed cycle"
    );
    let r = w.hydrate().await?;
    assert!(r.applied.is_empty() && r.failed.is_none(), "{r:?}");
    assert_eq!(r.waiting_cycles, vec![chained.cycle]);
    assert!(
        w.sink.get(&report).await.is_ok(),
        "the failure report is put again"
    );

    let healed = w.ship().await?;
    assert_eq!(
        healed.carried_from_failed,
        vec![failed.cycle, chained.cycle]
    );
    assert_eq!(healed.base_cycle, failed.cycle - 1);
    let r = w.hydrate().await?;
    assert_eq!(r.committed_cycle, healed.cycle, "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}

/// The put of a failure report failed (a transient cache error): the cycle was already recorded
/// as failed, so later runs skipped it without ever reporting it, and the pair stalled.
#[tokio::test]
async fn a_failure_report_whose_put_failed_is_put_again() -> anyhow::Result<()> {
    let mut w = common::World::new(22)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(30)?;
    let failed = w.ship().await?;
    fail_a_cycle(&mut w, failed.cycle).await?;
    w.fault(OpKind::Put, Fault::Transient, "/acks/", 1)?;
    let err = w
        .hydrate()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the failed put went unnoticed"))?;
    assert!(err.to_string().contains("injected"), "{err}");
    let report = layout::ack_key(&w.source.disk_id(), failed.cycle);
    assert!(w.sink.get(&report).await.is_err(), "no failure report yet");

    let r = w.hydrate().await?;
    assert!(r.applied.is_empty() && r.failed.is_none(), "{r:?}");
    assert!(
        w.sink.get(&report).await.is_ok(),
        "the failure report is put again"
    );
    let healed = w.ship().await?;
    assert_eq!(healed.carried_from_failed, vec![failed.cycle]);
    let r = w.hydrate().await?;
    assert_eq!(r.committed_cycle, healed.cycle, "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}
// ---------------------------------------------------------------------------------------------
// A documented limit: cycles too large to stage
// ---------------------------------------------------------------------------------------------

/// A cache that serves `victim` genuinely the first time and damaged from then on: a blob that
/// changes between verification and writing.
#[derive(Debug)]
struct ChangesAfterFirstRead {
    inner: Arc<dyn Sink>,
    victim: String,
    reads: Mutex<u32>,
}

#[async_trait::async_trait]
impl Sink for ChangesAfterFirstRead {
    async fn put(
        &self,
        key: &str,
        data: Bytes,
        mode: replicator_sink::PutMode,
    ) -> Result<(), replicator_sink::SinkError> {
        self.inner.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, replicator_sink::SinkError> {
        let bytes = self.inner.get(key).await?;
        if key != self.victim {
            return Ok(bytes);
        }
        let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        *reads += 1;
        if *reads == 1 {
            return Ok(bytes);
        }
        let mut damaged = bytes.to_vec();
        damaged[HEADER_LEN] ^= 0x01;
        Ok(Bytes::from(damaged))
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<replicator_sink::ObjectMeta>, replicator_sink::SinkError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), replicator_sink::SinkError> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        format!("changes {} after its first read", self.victim)
    }
}

/// A cycle larger than `staging_bytes_max` is fetched again for writing, so a cache that changes
/// a blob between the two reads is caught only after the blobs before it were written: the
/// target is then a mix (marked by `applying_cycle`), but every byte written is a verified one,
/// the committed cycle does not move, and the next cycle heals it.
#[tokio::test]
async fn an_unstaged_cycle_changed_after_verification_writes_only_verified_bytes_and_heals()
-> anyhow::Result<()> {
    let mut w = common::World::new(23)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(60)?;
    let shipped = w.ship().await?;
    let blobs = w.blob_keys(shipped.cycle).await?;
    assert!(blobs.len() >= 3, "want several blobs, got {}", blobs.len());
    let victim = blobs[blobs.len() - 1].clone();
    let sink = ChangesAfterFirstRead {
        inner: Arc::clone(&w.sink) as Arc<dyn Sink>,
        victim: victim.clone(),
        reads: Mutex::new(0),
    };
    let before = w.tgt_disk.snapshot();
    let cfg = HydrateConfig {
        staging_bytes_max: 0,
        ..HydrateConfig::default()
    };
    let target = w
        .target
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no target"))?;
    let r = hydrate(target, &sink, &w.key, &w.clock, &cfg, &NoProgress).await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("a blob changed after verification was written"))?;
    assert_eq!(failed.cycle, shipped.cycle);
    assert!(
        failed.error.to_string().contains(&victim),
        "{}",
        failed.error
    );
    assert_eq!(target.state().committed_cycle, shipped.cycle - 1);
    assert_eq!(
        target.state().applying_cycle,
        Some(shipped.cycle),
        "the target knows it holds a mix of two cycles"
    );
    // Nothing was written since the ship, so the cycle's verified bytes are the source's.
    let (src, tgt) = (w.src_disk.snapshot(), w.tgt_disk.snapshot());
    let foreign = tgt
        .chunks(512)
        .zip(src.chunks(512).zip(before.chunks(512)))
        .filter(|(t, (s, b))| t != s && t != b)
        .count();
    assert_eq!(
        foreign, 0,
        "sectors hold bytes that are neither old nor verified"
    );
    assert!(
        tgt != before,
        "the blobs before the changed one were written"
    );

    w.churn(3)?;
    let healed = w.ship().await?;
    assert_eq!(healed.carried_from_failed, vec![shipped.cycle]);
    let r = w.hydrate().await?;
    assert_eq!(r.committed_cycle, healed.cycle, "{:?}", r.failed);
    assert_eq!(
        w.target.as_ref().and_then(|t| t.state().applying_cycle),
        None
    );
    assert!(w.identical());
    Ok(())
}
