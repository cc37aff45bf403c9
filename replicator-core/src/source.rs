//! The source side: ship one cycle of a tracked disk into the cache.
//!
//! A cycle: learn from the target's acknowledgements which earlier cycles landed (dropping their
//! sectors) and which failed (carrying their sectors forward); freeze the tracker; read the
//! frozen sectors as of the freeze; cut them into blobs (all-zero runs carry no data), checksum,
//! compress and encrypt each; put the blobs; put the manifest last, with put-if-absent. Only then
//! is the cycle remembered as pending until the target acknowledges it.
//!
//! The attempt number is persisted before the first byte is encrypted, so a re-run after a crash
//! always encrypts under a new session key (see `docs/FORMAT.md`).

use std::path::Path;
use std::sync::Arc;

use replicator_sink::{PutMode, Sink};

use crate::bitmap::{Extent, SECTOR_SIZE, SectorBitmap};
use crate::catalog;
use crate::clock::{Clock, Timestamp};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    self, AckStatus, BlobExtent, Catalog, Expect, Manifest, ManifestBlob, ResyncRequest, Session,
};
use crate::gc::{GcPolicy, plan_gc, run_gc};
use crate::keys::{DiskId, DiskKey, MasterKey};
use crate::layout;
pub use crate::pipeline::Compression;
use crate::pipeline::{self, EncodeSettings, EncodedBlob, Job};
use crate::progress::Progress;
use crate::state::{
    InFlightCycle, PendingCycle, ResyncState, SOURCE_FILE, STATE_VERSION, SourceState, StateDir,
};
use crate::tracker::{CbtTracker, ChangeTracker, OpenReport, TrackerConfig};
use replicator_sink::buf::BufPool;

pub use crate::pipeline::ZERO_DETECT_BYTES;

/// Limits and settings of shipping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShipConfig {
    /// Most sectors' bytes (data and zero) one blob covers. 4 MiB.
    pub blob_span_bytes_max: u64,
    /// Most extents in one blob. 4096.
    pub blob_extents_max: usize,
    /// zstd level. 1.
    pub zstd_level: i32,
    /// When blobs are compressed: adaptive (stored raw when compressing would make the cores
    /// slower than the disk), or always.
    pub compression: Compression,
    /// Encoded blobs waiting for a put, at most. 4.
    pub blobs_queued_max: usize,
    /// Puts running at once, at most. 4.
    pub puts_in_flight_max: usize,
    /// Threads checksumming, compressing and encrypting blobs; 0 = one per core. Each holds at
    /// most one blob's bytes and one encoded blob.
    pub encode_threads: usize,
    /// Threads reading blob groups ahead of the encoders, each into its own buffer, so that the
    /// disk stays busy while the encoders use every core. 2.
    pub read_threads: usize,
    /// Reads in flight per reading thread (a delta's many small extents are read at once). 16.
    pub read_depth: usize,
    /// Nice levels the encoding threads run below the shipping thread. 10. The readers (whose
    /// CPU needs are small but urgent: a read completes, the next must be issued) and the
    /// workload on the source go first; with adaptive compression, what the encoders then
    /// cannot compress in time is stored raw, so the disk never waits for them. 0: the same.
    pub encoder_nice: i32,
    /// Shipped cycles the target has not acknowledged, at most; shipping refuses beyond. 64.
    pub unacked_cycles_max: usize,
    /// What each ship's garbage collection keeps.
    pub gc: GcPolicy,
    /// Block size of a checksum resync's digests: 64 KiB.
    pub resync_block_bytes: u32,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            blob_span_bytes_max: 4 << 20,
            blob_extents_max: 4096,
            zstd_level: 1,
            compression: Compression::Adaptive,
            blobs_queued_max: 4,
            puts_in_flight_max: 4,
            encode_threads: 0,
            read_threads: 2,
            read_depth: 16,
            encoder_nice: 10,
            unacked_cycles_max: 64,
            gc: GcPolicy::default(),
            resync_block_bytes: catalog::DEFAULT_BLOCK_BYTES,
        }
    }
}

/// What one shipped cycle did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipReport {
    /// The cycle's number.
    pub cycle: u64,
    /// The target cycle it applies on top of.
    pub base_cycle: u64,
    /// Whether it is the initial full copy.
    pub initial: bool,
    /// The tracker epoch it froze: the cycle ships the disk as of that freeze.
    pub epoch: u64,
    /// Sectors in the cycle's bitmap.
    pub changed_sectors: u64,
    /// Of those, bytes found all-zero (shipped without data).
    pub zero_bytes: u64,
    /// Blobs written.
    pub blob_count: u32,
    /// Bytes written to the cache (blobs and manifest).
    pub stored_bytes: u64,
    /// Blobs whose compression was skipped because the cores were behind the disk
    /// ([`Compression::Adaptive`]; some would not have compressed anyway).
    pub blobs_kept_up: u32,
    /// Cycles the target acknowledged since the previous ship.
    pub acked: Vec<u64>,
    /// Cycles the target reported failed; their sectors went into this cycle.
    pub carried_from_failed: Vec<u64>,
    /// Set when the cycle was a checksum resync: what it compared.
    pub resync: Option<ResyncReport>,
    /// Bytes written into the frozen epoch, if the tracker counts them (see `fold_ratio`).
    pub bytes_written: Option<u64>,
    /// Time since the previous cycle froze the tracker, if one did (see `churn_bytes_per_s`).
    pub interval_ms: Option<u64>,
    /// When the cycle started and finished.
    pub started: Timestamp,
    /// See `started`.
    pub finished: Timestamp,
}

/// What a checksum resync cycle compared and shipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncReport {
    /// Why it was needed.
    pub reason: String,
    /// The target's committed cycle the catalog described (the resync cycle's base).
    pub target_cycle: u64,
    pub block_bytes: u32,
    /// Bytes of the source disk read (once).
    pub bytes_read: u64,
    /// Bytes whose digests were compared with the target's.
    pub bytes_compared: u64,
    /// Blocks whose digests differed, and were shipped.
    pub blocks_differing: u64,
    /// Bytes of those blocks.
    pub bytes_differing: u64,
    /// Pending cycles the resync replaced (their manifests were removed from the cache).
    pub superseded: Vec<u64>,
}

/// What [`ship_cycle`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum ShipOutcome {
    /// A cycle was shipped.
    Shipped(ShipReport),
    /// A checksum resync is owed and the target's digest catalog is not in the cache yet: the
    /// source asked for it (resync request `request`) and ships nothing until it arrives. Run
    /// hydrate on the target, then ship again.
    AwaitingCatalog { reason: String, request: u64 },
}

impl ShipOutcome {
    /// The shipped cycle's report, if one was shipped.
    pub fn shipped(&self) -> Option<&ShipReport> {
        match self {
            ShipOutcome::Shipped(r) => Some(r),
            ShipOutcome::AwaitingCatalog { .. } => None,
        }
    }

    /// The shipped cycle's report, or an error saying what is awaited.
    pub fn into_shipped(self) -> Result<ShipReport> {
        match self {
            ShipOutcome::Shipped(r) => Ok(r),
            ShipOutcome::AwaitingCatalog { reason, request } => Err(Error::InvalidInput(format!(
                "no cycle shipped: a checksum resync is owed ({reason}); resync request {request} \
                 waits for the target's digest catalog: run hydrate on the target, then ship again"
            ))),
        }
    }
}

impl ShipReport {
    /// Churn: changed bytes per second of the interval since the previous freeze.
    pub fn churn_bytes_per_s(&self) -> Option<f64> {
        let ms = self.interval_ms.filter(|ms| *ms > 0)?;
        Some(self.changed_bytes() as f64 * 1000.0 / ms as f64)
    }

    /// How much writes folded: bytes written into the epoch per byte of changed sectors shipped
    /// (1.0 when every write hit new sectors; 10.0 when each sector was rewritten ten times).
    /// None when the tracker counted no bytes although sectors changed: the writes were made by
    /// another process (`harness write`) whose count this one never saw.
    pub fn fold_ratio(&self) -> Option<f64> {
        let written = self.bytes_written.filter(|w| *w > 0)?;
        (self.changed_bytes() > 0).then(|| written as f64 / self.changed_bytes() as f64)
    }

    /// Bytes of the sectors the cycle covers.
    pub fn changed_bytes(&self) -> u64 {
        self.changed_sectors * SECTOR_SIZE
    }
}

/// The source side of one disk: its state directory and its tracker.
#[derive(Debug)]
pub struct Source<T: ChangeTracker + ?Sized + 'static> {
    dir: StateDir,
    state: SourceState,
    disk_id: DiskId,
    tracker: Arc<T>,
}

fn pending_file(cycle: u64) -> String {
    format!("pending-{cycle}.bmap")
}

impl<D: BlockDevice + 'static> Source<CbtTracker<D>> {
    /// Opens (or starts) the source side in `state_path` for `device`, tracked by a
    /// [`CbtTracker`] kept in the state directory's `tracker/`. The tracker recovers any marks an
    /// unclean stop left in its activity log.
    pub fn open(
        state_path: &Path,
        device: D,
        tracker_cfg: TrackerConfig,
    ) -> Result<(Self, OpenReport)> {
        Source::open_with(state_path, |tracker_dir| {
            let (tracker, report) = CbtTracker::open(device, tracker_dir, tracker_cfg)?;
            Ok((Arc::new(tracker), report))
        })
    }
}

impl<T: ChangeTracker + ?Sized + 'static> Source<T> {
    /// Opens (or starts) the source side in `state_path`, with the tracker `open_tracker` opens.
    /// It is called once the state directory is locked, with a directory inside it that the
    /// tracker may keep its state in. A tracker whose generation is not the one this source
    /// shipped with (state from another disk, or made anew) forces a checksum resync.
    pub fn open_with<F>(state_path: &Path, open_tracker: F) -> Result<(Self, OpenReport)>
    where
        F: FnOnce(&Path) -> Result<(Arc<T>, OpenReport)>,
    {
        let dir = StateDir::open(state_path)?;
        let existing = dir.read_json::<SourceState>(SOURCE_FILE)?;
        if let Some(s) = &existing
            && s.version != STATE_VERSION
        {
            return Err(Error::state(
                dir.file(SOURCE_FILE),
                format!("unsupported version {}", s.version),
            ));
        }
        let (tracker, mut report) = open_tracker(&dir.file("tracker"))?;
        let disk_bytes = tracker.disk_bytes();
        let before = existing.clone();
        let mut state = match existing {
            Some(s) => {
                if s.disk_bytes != disk_bytes {
                    return Err(Error::InvalidInput(format!(
                        "source {} is {disk_bytes} bytes but state {} was made for a {}-byte disk; \
                         use the state directory that belongs to this disk",
                        tracker.name(),
                        state_path.display(),
                        s.disk_bytes
                    )));
                }
                s
            }
            None => SourceState {
                version: STATE_VERSION,
                disk_id: DiskId::generate()?.to_string(),
                disk_bytes,
                next_cycle: 1,
                attempts: 0,
                acked_cycle: 0,
                pending: Vec::new(),
                in_flight: None,
                tracker_kind: None,
                tracker_generation: None,
                target_generation: None,
                resync: None,
                requests_put: 0,
                catalog_seen: 0,
                last_freeze_unix_ms: None,
            },
        };
        let generation = tracker.generation().to_string();
        match state.tracker_generation.as_deref() {
            // The tracker knows why its state is new (it lost it): its freeze says so.
            _ if report.lost.is_some() => {}
            Some(known) if known != generation && state.next_cycle > 1 => {
                let reason = format!(
                    "the {} tracker's state (generation {generation}) is not the one this disk was \
                     shipped with ({} generation {known}): it belongs to another disk or was made \
                     anew, so its marks cannot be trusted",
                    tracker.kind(),
                    state.tracker_kind.as_deref().unwrap_or("?"),
                );
                tracing::warn!(%reason, "forcing a checksum resync");
                state.resync.get_or_insert(ResyncState {
                    reason: reason.clone(),
                    requested: None,
                });
                report.lost.get_or_insert(reason);
            }
            _ => {}
        }
        state.tracker_kind = Some(tracker.kind().to_owned());
        state.tracker_generation = Some(generation);
        if before.as_ref() != Some(&state) {
            dir.write_json(SOURCE_FILE, &state)?;
        }
        let disk_id: DiskId = state
            .disk_id
            .parse()
            .map_err(|e| Error::state(dir.file(SOURCE_FILE), format!("bad disk_id: {e}")))?;
        Ok((
            Source {
                dir,
                state,
                disk_id,
                tracker,
            },
            report,
        ))
    }

    /// The tracker: write to the source disk through it so every change is shipped.
    pub fn tracker(&self) -> &Arc<T> {
        &self.tracker
    }

    /// The disk's id in the cache.
    pub fn disk_id(&self) -> DiskId {
        self.disk_id
    }

    /// The persisted state.
    pub fn state(&self) -> &SourceState {
        &self.state
    }

    fn save(&self) -> Result<()> {
        self.dir.write_json(SOURCE_FILE, &self.state)
    }

    /// The cycle the next cycle applies on top of at the target.
    fn chain_tip(&self) -> u64 {
        self.state
            .pending
            .last()
            .map_or(self.state.acked_cycle, |p| p.cycle)
    }
}

/// Reads the target's acknowledgements and updates the source: applied cycles are forgotten (and
/// their objects removed from the cache), failed ones have their sectors merged into the tracker's
/// current epoch. Returns (acked, carried).
pub async fn sync_acks<T: ChangeTracker + ?Sized + 'static>(
    src: &mut Source<T>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let disk = src.disk_id;
    let mut acked = Vec::new();
    let mut carried = Vec::new();
    for meta in sink.list(&layout::acks_prefix(&disk)).await? {
        let Some(cycle) = layout::cycle_of_key(&meta.key) else {
            continue;
        };
        let bytes = sink.get(&meta.key).await?;
        let expect = Expect {
            disk_id: disk,
            cycle,
            attempt: None,
            seq: None,
            tag: None,
        };
        let ack = match format::decode_ack(disk_key, &bytes, &expect) {
            Ok((_, ack)) => ack,
            Err(e) if e.is_wrong_key() => {
                return Err(Error::Object {
                    key: meta.key,
                    source: e,
                });
            }
            Err(e) => {
                // A forged or damaged acknowledgement is ignored: the cycle stays pending, so
                // nothing is lost; at worst it is shipped again.
                tracing::warn!(key = %meta.key, error = %e, "ignoring an acknowledgement that failed verification");
                continue;
            }
        };
        // The generation of the target that applied (or failed) one of our pending cycles: another
        // one than before means the target state was replaced, and its content is unknown.
        if let Some(g) = ack.target_generation
            && src.state.pending.iter().any(|p| p.cycle == cycle)
        {
            let g = to_hex(&g);
            if let Some(known) = src.state.target_generation.as_deref()
                && known != g
            {
                let reason = format!(
                    "the target's state generation changed from {known} to {g} (acknowledgement \
                     of cycle {cycle}): it was replaced or restored, so its content is unknown"
                );
                tracing::warn!(%reason, "a checksum resync is owed");
                src.request_resync(&reason)?;
            }
            src.state.target_generation = Some(g);
        }
        match ack.status {
            AckStatus::Applied => {
                if cycle > src.state.acked_cycle {
                    src.state.acked_cycle = cycle;
                }
                let before = src.state.pending.len();
                let done: Vec<u64> = src
                    .state
                    .pending
                    .iter()
                    .filter(|p| p.cycle <= cycle)
                    .map(|p| p.cycle)
                    .collect();
                if let Some(epoch) = src
                    .state
                    .pending
                    .iter()
                    .filter(|p| p.cycle <= cycle)
                    .map(|p| p.epoch)
                    .max()
                {
                    src.tracker.acknowledged(epoch)?;
                }
                src.state.pending.retain(|p| p.cycle > cycle);
                if src.state.pending.len() != before || !done.is_empty() {
                    acked.extend(done);
                }
            }
            AckStatus::Failed => {
                if !src.state.pending.iter().any(|p| p.cycle == cycle) {
                    // Already handled (or not ours to handle): its sectors were carried before.
                    continue;
                }
                // The failed cycle and every later pending one (they chain on it) are dead;
                // their sectors go into the next cycle.
                let dead: Vec<u64> = src
                    .state
                    .pending
                    .iter()
                    .filter(|p| p.cycle >= cycle)
                    .map(|p| p.cycle)
                    .collect();
                for c in &dead {
                    let bitmap = src
                        .dir
                        .read_bitmap(&pending_file(*c), src.state.disk_bytes / SECTOR_SIZE)?;
                    src.tracker.carry(&bitmap)?;
                }
                src.state.pending.retain(|p| p.cycle < cycle);
                carried.extend(dead);
            }
        }
    }
    if acked.is_empty() && carried.is_empty() {
        return Ok((acked, carried));
    }
    src.save()?;
    // Only now that the state no longer needs them: drop their bitmaps. Their cache objects and
    // the processed acknowledgements go with the next garbage collection.
    for c in acked.iter().chain(carried.iter()) {
        src.dir.remove(&pending_file(*c))?;
    }
    Ok((acked, carried))
}

/// Settles a cycle that was being written when the source stopped: if its manifest is in the
/// cache it committed (remember it as pending); otherwise remove its blobs.
async fn settle_in_flight<T: ChangeTracker + ?Sized + 'static>(
    src: &mut Source<T>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
) -> Result<()> {
    let Some(inflight) = src.state.in_flight.clone() else {
        return Ok(());
    };
    let disk = src.disk_id;
    let key = layout::manifest_key(&disk, inflight.cycle);
    let committed = match sink.get(&key).await {
        Ok(bytes) => {
            let expect = Expect {
                disk_id: disk,
                cycle: inflight.cycle,
                attempt: Some(inflight.attempt),
                seq: None,
                tag: None,
            };
            match format::decode_manifest(disk_key, &bytes, &expect) {
                Ok((_, manifest)) => {
                    let bitmap = SectorBitmap::decode(&manifest.bitmap)?;
                    src.dir
                        .write_bitmap(&pending_file(inflight.cycle), &bitmap)?;
                    true
                }
                // The torn remains of this attempt's manifest put (or a damaged read): the cycle
                // did not commit here. Its number is given up below, so the next attempt does not
                // collide with the object, and garbage collection removes it.
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "the in-flight cycle's manifest does not verify: not committed");
                    false
                }
            }
        }
        Err(e) if e.is_not_found() => false,
        Err(e) => return Err(e.into()),
    };
    if committed {
        src.state.pending.push(PendingCycle {
            cycle: inflight.cycle,
            base_cycle: inflight.base_cycle,
            epoch: inflight.epoch,
        });
    }
    // An attempt that did not commit but left a manifest (a torn put, a damaged read) gives its
    // cycle number up: a new attempt could not replace the object, and the target may already
    // have failed it.
    if committed || manifest_left(sink, &disk, inflight.cycle).await {
        src.state.next_cycle = inflight.cycle + 1;
    }
    // Blobs of an attempt that did not commit are removed by the garbage collection that follows.
    src.state.in_flight = None;
    src.save()
}

/// Whether a failed attempt may have left a manifest under `cycle` (anything but a clear "not
/// found" counts): its number must then not be used again.
async fn manifest_left(sink: &dyn Sink, disk: &DiskId, cycle: u64) -> bool {
    !matches!(sink.get(&layout::manifest_key(disk, cycle)).await, Err(e) if e.is_not_found())
}

/// Cuts a cycle's extents into blobs of at most `span_sectors` sectors and `extents_max`
/// extents, lazily: memory holds one group at a time, whatever the disk's size.
struct BlobPlan<I: Iterator<Item = Extent>> {
    runs: I,
    current: Option<Extent>,
    span_sectors: u64,
    extents_max: usize,
}

impl<I: Iterator<Item = Extent>> BlobPlan<I> {
    fn new(runs: I, cfg: &ShipConfig) -> Self {
        BlobPlan {
            runs,
            current: None,
            span_sectors: (cfg.blob_span_bytes_max / SECTOR_SIZE).max(1),
            extents_max: cfg.blob_extents_max.max(1),
        }
    }
}

impl<I: Iterator<Item = Extent>> Iterator for BlobPlan<I> {
    type Item = Vec<Extent>;

    fn next(&mut self) -> Option<Vec<Extent>> {
        let mut group = Vec::new();
        let mut group_sectors = 0u64;
        while group_sectors < self.span_sectors && group.len() < self.extents_max {
            let Some(run) = self.current.take().or_else(|| self.runs.next()) else {
                break;
            };
            let take = (self.span_sectors - group_sectors).min(run.sector_count);
            group.push(Extent::new(run.start_sector, take));
            group_sectors += take;
            if take < run.sector_count {
                self.current = Some(Extent::new(
                    run.start_sector + take,
                    run.sector_count - take,
                ));
            }
        }
        (!group.is_empty()).then_some(group)
    }
}

/// Splits the data read for `extents` (`buf` holds their bytes, in order) into data and zero
/// blob extents at [`ZERO_DETECT_BYTES`] granularity, merging neighbours of one kind. Returns the
/// blob extents, the data extents' bytes concatenated (what `Session::encode_blob` takes), and
/// the number of zero bytes. This is exactly how a cycle lays out its blobs (the cycle itself
/// does it in place, [`crate::pipeline::compact_zero_runs`]).
pub fn split_zero_runs(extents: &[Extent], buf: &[u8]) -> (Vec<BlobExtent>, Vec<u8>, u64) {
    let mut data = buf.to_vec();
    let (out, len, zero_bytes) = pipeline::compact_zero_runs(extents, &mut data);
    data.truncate(len);
    (out, data, zero_bytes)
}

impl<T: ChangeTracker + ?Sized + 'static> Source<T> {
    /// Asks for a checksum resync before the next delta (the operator's repair, or tracking
    /// known lost): the next [`ship_cycle`] asks the target for its digest catalog, and the one
    /// after the catalog arrived ships the blocks that differ. Persisted.
    pub fn request_resync(&mut self, reason: &str) -> Result<()> {
        if self.state.resync.is_none() {
            self.state.resync = Some(ResyncState {
                reason: reason.to_owned(),
                requested: None,
            });
            self.save()?;
        }
        Ok(())
    }
}

/// Ships one cycle: the initial full copy if none was shipped yet, else a delta; or, when a
/// checksum resync is owed (tracking lost, a generation mismatch, the operator asked, the target
/// was replaced or restored), a resync cycle of the blocks that differ from the target's digest
/// catalog, once the target has put that catalog in the cache.
pub async fn ship_cycle<T: ChangeTracker + ?Sized + 'static>(
    src: &mut Source<T>,
    sink: &dyn Sink,
    key: &MasterKey,
    clock: &dyn Clock,
    cfg: &ShipConfig,
    progress: &dyn Progress,
) -> Result<ShipOutcome> {
    let started = clock.now();
    let disk = src.disk_id;
    let disk_key = key.disk_key(&disk);
    settle_in_flight(src, sink, &disk_key).await?;
    tracing::debug!("ship: in-flight attempt settled");
    let (acked, carried) = sync_acks(src, sink, &disk_key).await?;
    tracing::debug!(acked = ?acked, "ship: acknowledgements read");
    // Collection is housekeeping: a failure to remove is reported and retried next time.
    match plan_gc(sink, &disk, &src.state, cfg.gc).await {
        Ok(plan) => {
            let gc = run_gc(sink, &plan).await;
            for (key, error) in &gc.failed {
                tracing::warn!(key = %key, error = %error, "could not remove an object no longer needed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "garbage collection skipped: cannot list the cache"),
    }
    tracing::debug!("ship: garbage collected");
    let found = find_catalog(src, sink, &disk_key).await?;
    if let Some(resync) = src.state.resync.clone() {
        return match found {
            Some(found) => resync_cycle(
                src,
                sink,
                &disk_key,
                found,
                resync.reason,
                (acked, carried),
                started,
                clock,
                cfg,
                progress,
            )
            .await
            .map(ShipOutcome::Shipped),
            None => request_catalog(src, sink, &disk_key, clock, cfg).await,
        };
    }
    if src.state.pending.len() >= cfg.unacked_cycles_max {
        return Err(Error::InvalidInput(format!(
            "the target has not acknowledged the last {} cycles of disk {disk}; run hydrate on the \
             target before shipping more",
            src.state.pending.len()
        )));
    }
    let cycle = src.state.next_cycle;
    let initial = cycle == 1;
    if initial {
        src.tracker.mark_all()?;
    }
    let base_cycle = src.chain_tip();
    let frozen_at_ms = clock.now().unix_ms();
    let frozen = src.tracker.freeze()?;
    if let Some(reason) = frozen.lost.clone()
        && !initial
    {
        // The marks cannot be trusted: compare checksums instead of shipping the whole disk.
        src.tracker.release(false)?;
        tracing::warn!(%reason, "tracking lost: a checksum resync replaces the next delta");
        src.request_resync(&format!("tracking was lost: {reason}"))?;
        return request_catalog(src, sink, &disk_key, clock, cfg).await;
    }
    src.state.attempts += 1;
    let attempt = src.state.attempts;
    src.state.in_flight = Some(InFlightCycle {
        cycle,
        attempt,
        base_cycle,
        epoch: frozen.epoch,
    });
    // Persist the attempt before anything is encrypted under it.
    if let Err(e) = src.save() {
        src.tracker.release(false)?;
        return Err(e);
    }
    tracing::debug!(cycle, attempt, "ship: frozen, attempt saved");
    let result = write_cycle(
        src,
        sink,
        &disk_key,
        cycle,
        attempt,
        base_cycle,
        CyclePlan::Changed(frozen.bitmap.clone()),
        clock,
        cfg,
        progress,
    )
    .await;
    match result {
        Ok(CycleWritten {
            blob_count,
            stored_bytes,
            zero_bytes,
            blobs_kept_up,
            ..
        }) => {
            tracing::debug!(cycle, blob_count, "ship: blobs and manifest put");
            src.dir.write_bitmap(&pending_file(cycle), &frozen.bitmap)?;
            src.state.pending.push(PendingCycle {
                cycle,
                base_cycle,
                epoch: frozen.epoch,
            });
            src.state.next_cycle = cycle + 1;
            src.state.in_flight = None;
            let interval_ms = src
                .state
                .last_freeze_unix_ms
                .map(|t| frozen_at_ms.saturating_sub(t));
            src.state.last_freeze_unix_ms = Some(frozen_at_ms);
            src.save()?;
            src.tracker.release(true)?;
            tracing::debug!(cycle, "ship: state saved, tracker released");
            Ok(ShipOutcome::Shipped(ShipReport {
                bytes_written: frozen.bytes_written,
                interval_ms,
                cycle,
                base_cycle,
                initial,
                epoch: frozen.epoch,
                changed_sectors: frozen.bitmap.count(),
                zero_bytes,
                blob_count,
                stored_bytes,
                blobs_kept_up,
                acked,
                carried_from_failed: carried,
                resync: None,
                started,
                finished: clock.now(),
            }))
        }
        Err(e) => {
            // Its sectors go back, and its blobs are removed by the next ship's garbage
            // collection. A failed manifest put may still have stored the manifest, whole or
            // torn: then the cycle number is given up, as in `settle_in_flight`.
            src.tracker.release(false)?;
            if manifest_left(sink, &disk, cycle).await {
                src.state.next_cycle = cycle + 1;
            }
            src.state.in_flight = None;
            src.save()?;
            Err(e)
        }
    }
}

/// A target catalog the source can resync against.
struct FoundCatalog {
    number: u64,
    catalog: Catalog,
}

/// Reads the target's catalogs newer than the last one dealt with. The newest that answers the
/// source's pending resync request, or that the target sent unasked (it could apply nothing: it
/// was replaced, restored, or lost its chain; a resync is then owed), is returned; others are
/// dealt with and removed.
async fn find_catalog<T: ChangeTracker + ?Sized + 'static>(
    src: &mut Source<T>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
) -> Result<Option<FoundCatalog>> {
    let disk = src.disk_id;
    let mut newest: Option<FoundCatalog> = None;
    let mut stale: Vec<(u64, String)> = Vec::new();
    for meta in sink.list(&layout::catalogs_prefix(&disk)).await? {
        let Some(number) = layout::cycle_of_key(&meta.key) else {
            continue;
        };
        if number <= src.state.catalog_seen {
            continue;
        }
        let bytes = match sink.get(&meta.key).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let expect = Expect {
            disk_id: disk,
            cycle: number,
            attempt: None,
            seq: None,
            tag: None,
        };
        match format::decode_catalog(disk_key, &bytes, &expect) {
            Ok((_, catalog)) => {
                if catalog.disk_bytes != src.state.disk_bytes {
                    return Err(Error::InvalidInput(format!(
                        "the target's catalog {} describes a {}-byte disk but the source disk is \
                         {} bytes; give the target a disk of the source's size",
                        meta.key, catalog.disk_bytes, src.state.disk_bytes
                    )));
                }
                if let Some(old) = newest.replace(FoundCatalog { number, catalog }) {
                    stale.push((old.number, layout::catalog_key(&disk, old.number)));
                }
            }
            Err(e) if e.is_wrong_key() => {
                return Err(Error::Object {
                    key: meta.key,
                    source: e,
                });
            }
            Err(e) => {
                tracing::warn!(key = %meta.key, error = %e, "ignoring a digest catalog that failed verification");
                stale.push((number, meta.key));
            }
        }
    }
    let usable = match newest {
        Some(found) if found.catalog.answers_request == 0 => {
            // Sent unasked: the target can apply nothing in the cache. Say why as best we can.
            let generation = to_hex(&found.catalog.target_generation);
            let at = found.catalog.committed_cycle;
            let reason = match src.state.target_generation.as_deref() {
                Some(known) if known != generation => format!(
                    "the target was replaced: its state generation is {generation}, not \
                     {known}; it holds cycle {at}"
                ),
                _ if at < src.state.acked_cycle => format!(
                    "the target went back from cycle {} to cycle {at}: it was restored from \
                     an earlier state",
                    src.state.acked_cycle
                ),
                _ => format!("the target at cycle {at} cannot apply any cycle in the cache"),
            };
            tracing::warn!(%reason, "a checksum resync is owed");
            src.request_resync(&reason)?;
            Some(found)
        }
        Some(found)
            if src
                .state
                .resync
                .as_ref()
                .and_then(|r| r.requested)
                .is_some_and(|n| n <= found.catalog.answers_request) =>
        {
            Some(found)
        }
        Some(found) => {
            stale.push((found.number, layout::catalog_key(&disk, found.number)));
            None
        }
        None => None,
    };
    if let Some(last) = stale.iter().map(|(n, _)| *n).max()
        && usable.as_ref().is_none_or(|u| u.number > last)
    {
        src.state.catalog_seen = src.state.catalog_seen.max(last);
        src.save()?;
    }
    for (_, key) in stale {
        if let Err(e) = sink.delete(&key).await {
            tracing::warn!(key = %key, error = %e, "could not remove a catalog no longer needed");
        }
    }
    Ok(usable)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Puts a resync request in the cache (once per owed resync) and reports that the source waits.
async fn request_catalog<T: ChangeTracker + ?Sized + 'static>(
    src: &mut Source<T>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    clock: &dyn Clock,
    cfg: &ShipConfig,
) -> Result<ShipOutcome> {
    catalog::check_block_bytes(cfg.resync_block_bytes)?;
    let Some(resync) = src.state.resync.clone() else {
        return Err(Error::InvalidInput("no resync is owed".into()));
    };
    if let Some(request) = resync.requested {
        return Ok(ShipOutcome::AwaitingCatalog {
            reason: resync.reason,
            request,
        });
    }
    let disk = src.disk_id;
    let number = src.state.requests_put + 1;
    src.state.requests_put = number;
    src.state.attempts += 1;
    let attempt = src.state.attempts;
    // Persist the attempt before anything is encrypted under it.
    src.save()?;
    let salt = crate::error::fresh_salt()?;
    let session = Session::new(disk_key, disk, number, attempt, salt);
    let key = layout::request_key(&disk, number);
    let obj = session
        .encode_resync_request(&ResyncRequest {
            block_bytes: cfg.resync_block_bytes,
            reason: truncate_utf8(&resync.reason, format::MAX_ACK_MESSAGE_BYTES as usize),
            created_unix_ms: clock.now().unix_ms(),
        })
        .map_err(|e| Error::Object {
            key: key.clone(),
            source: e,
        })?;
    sink.put(&key, obj.bytes, PutMode::Overwrite).await?;
    if let Some(r) = src.state.resync.as_mut() {
        r.requested = Some(number);
    }
    src.save()?;
    Ok(ShipOutcome::AwaitingCatalog {
        reason: resync.reason,
        request: number,
    })
}

fn truncate_utf8(s: &str, max: usize) -> String {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_owned()
}

/// Ships a checksum resync cycle against `found`: pending cycles the target has not applied are
/// superseded (their manifests removed first, so the target cannot apply one of them instead),
/// the whole disk is frozen and read once, and only the blocks whose digests differ are shipped,
/// on the catalog's cycle as base.
#[allow(clippy::too_many_arguments)]
async fn resync_cycle<T: ChangeTracker + ?Sized + 'static>(
    src: &mut Source<T>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    found: FoundCatalog,
    reason: String,
    (acked, carried): (Vec<u64>, Vec<u64>),
    started: Timestamp,
    clock: &dyn Clock,
    cfg: &ShipConfig,
    progress: &dyn Progress,
) -> Result<ShipReport> {
    let disk = src.disk_id;
    let base_cycle = found.catalog.committed_cycle;
    let mut superseded = Vec::new();
    for p in src.state.pending.clone() {
        if p.cycle > base_cycle {
            match sink.delete(&layout::manifest_key(&disk, p.cycle)).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            superseded.push(p.cycle);
        }
    }
    let dropped: Vec<u64> = src.state.pending.iter().map(|p| p.cycle).collect();
    src.state.pending.clear();
    src.state.acked_cycle = base_cycle;
    src.save()?;
    for c in dropped {
        src.dir.remove(&pending_file(c))?;
    }

    let cycle = src.state.next_cycle;
    src.tracker.mark_all()?;
    let frozen_at_ms = clock.now().unix_ms();
    let frozen = src.tracker.freeze()?;
    src.state.attempts += 1;
    let attempt = src.state.attempts;
    src.state.in_flight = Some(InFlightCycle {
        cycle,
        attempt,
        base_cycle,
        epoch: frozen.epoch,
    });
    if let Err(e) = src.save() {
        src.tracker.release(false)?;
        return Err(e);
    }
    let block_bytes = found.catalog.block_bytes;
    let result = write_cycle(
        src,
        sink,
        disk_key,
        cycle,
        attempt,
        base_cycle,
        CyclePlan::Resync {
            block_bytes,
            digests: found.catalog.digests,
        },
        clock,
        cfg,
        progress,
    )
    .await;
    let (blob_count, stored_bytes, zero_bytes, blobs_kept_up, scan) = match result {
        Ok(CycleWritten {
            blob_count,
            stored_bytes,
            zero_bytes,
            blobs_kept_up,
            scan: Some(scan),
        }) => (blob_count, stored_bytes, zero_bytes, blobs_kept_up, scan),
        Ok(_) => {
            src.tracker.release(false)?;
            src.state.in_flight = None;
            src.save()?;
            return Err(Error::InvalidInput(
                "the resync's reader stopped before the end of the disk".into(),
            ));
        }
        Err(e) => {
            // As in `ship_cycle`.
            src.tracker.release(false)?;
            if manifest_left(sink, &src.disk_id, cycle).await {
                src.state.next_cycle = cycle + 1;
            }
            src.state.in_flight = None;
            src.save()?;
            return Err(e);
        }
    };
    src.dir
        .write_bitmap(&pending_file(cycle), &scan.differing)?;
    src.state.pending.push(PendingCycle {
        cycle,
        base_cycle,
        epoch: frozen.epoch,
    });
    src.state.next_cycle = cycle + 1;
    src.state.in_flight = None;
    src.state.resync = None;
    src.state.catalog_seen = src.state.catalog_seen.max(found.number);
    src.state.target_generation = Some(to_hex(&found.catalog.target_generation));
    let interval_ms = src
        .state
        .last_freeze_unix_ms
        .map(|t| frozen_at_ms.saturating_sub(t));
    src.state.last_freeze_unix_ms = Some(frozen_at_ms);
    src.save()?;
    // The whole disk as of the freeze was compared: every earlier mark is accounted for.
    src.tracker.release(true)?;
    // The request and the catalog are done with.
    let mut done = vec![layout::catalog_key(&disk, found.number)];
    match sink.list(&layout::requests_prefix(&disk)).await {
        Ok(listed) => done.extend(listed.into_iter().map(|m| m.key)),
        Err(e) => tracing::warn!(error = %e, "cannot list resync requests to remove them"),
    }
    for key in done {
        match sink.delete(&key).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "could not remove a resync object no longer needed");
            }
        }
    }
    let bytes_differing = scan.differing.count() * SECTOR_SIZE;
    Ok(ShipReport {
        bytes_written: frozen.bytes_written,
        interval_ms,
        cycle,
        base_cycle,
        initial: false,
        epoch: frozen.epoch,
        changed_sectors: scan.differing.count(),
        zero_bytes,
        blob_count,
        stored_bytes,
        blobs_kept_up,
        acked,
        carried_from_failed: carried,
        resync: Some(ResyncReport {
            reason,
            target_cycle: base_cycle,
            block_bytes,
            bytes_read: scan.bytes_read,
            bytes_compared: scan.bytes_read,
            blocks_differing: scan.blocks_differing,
            bytes_differing,
            superseded,
        }),
        started,
        finished: clock.now(),
    })
}

/// What a cycle's producer reads and ships.
enum CyclePlan {
    /// The frozen bitmap's sectors.
    Changed(SectorBitmap),
    /// Every block of the disk, digested and compared with the target's catalog; only the blocks
    /// that differ are shipped.
    Resync {
        block_bytes: u32,
        digests: Vec<catalog::Digest>,
    },
}

/// What the producer of a resync cycle found.
#[derive(Debug)]
struct ResyncScan {
    differing: SectorBitmap,
    bytes_read: u64,
    blocks_differing: u64,
}

/// Bytes a resync reads from the source per call: 4 MiB (whole blocks).
const RESYNC_READ_BYTES: u64 = 4 << 20;

/// Cuts the blocks of a resync that differ from the target's into blob groups as the disk is
/// read once, and sends each group's encoded blob.
fn scan_for_resync<T: ChangeTracker + ?Sized>(
    tracker: &T,
    block_bytes: u32,
    digests: &[catalog::Digest],
    cfg: &ShipConfig,
    emit: &mut dyn FnMut(Vec<Extent>, Vec<u8>) -> bool,
) -> Result<Option<ResyncScan>> {
    let disk_bytes = tracker.disk_bytes();
    let block = u64::from(block_bytes);
    let want_blocks = disk_bytes.div_ceil(block);
    if digests.len() as u64 != want_blocks {
        return Err(Error::InvalidInput(format!(
            "the target's catalog has {} digests but the {disk_bytes}-byte source disk has \
             {want_blocks} blocks of {block_bytes} bytes",
            digests.len()
        )));
    }
    let span_max = cfg.blob_span_bytes_max.max(block);
    let chunk = (RESYNC_READ_BYTES / block).max(1) * block;
    let mut differing = SectorBitmap::new(disk_bytes / SECTOR_SIZE);
    let mut group: Vec<Extent> = Vec::new();
    let mut group_buf: Vec<u8> = Vec::new();
    let mut buf = Vec::new();
    let mut bytes_read = 0u64;
    let mut blocks_differing = 0u64;
    let mut at = 0u64;
    while at < disk_bytes {
        let len = chunk.min(disk_bytes - at);
        buf.resize(len as usize, 0);
        tracker.read_frozen(&mut buf, at)?;
        bytes_read += len;
        for (k, data) in buf.chunks(block as usize).enumerate() {
            let index = at / block + k as u64;
            if digests.get(index as usize) == Some(&catalog::block_digest(data)) {
                continue;
            }
            blocks_differing += 1;
            let offset = index * block;
            let sectors = data.len() as u64 / SECTOR_SIZE;
            differing.mark_sectors(offset / SECTOR_SIZE, sectors)?;
            match group.last_mut() {
                Some(last) if last.start_sector + last.sector_count == offset / SECTOR_SIZE => {
                    last.sector_count += sectors;
                }
                _ => group.push(Extent::new(offset / SECTOR_SIZE, sectors)),
            }
            group_buf.extend_from_slice(data);
            let full =
                group_buf.len() as u64 >= span_max || group.len() >= cfg.blob_extents_max.max(1);
            if full && !emit(std::mem::take(&mut group), std::mem::take(&mut group_buf)) {
                return Ok(None);
            }
        }
        at += len;
    }
    if !group.is_empty() && !emit(group, group_buf) {
        return Ok(None);
    }
    Ok(Some(ResyncScan {
        differing,
        bytes_read,
        blocks_differing,
    }))
}

/// What [`write_cycle`] wrote.
struct CycleWritten {
    blob_count: u32,
    stored_bytes: u64,
    zero_bytes: u64,
    /// Blobs stored uncompressed to keep up with the disk.
    blobs_kept_up: u32,
    /// The resync scan, if the plan was a resync.
    scan: Option<ResyncScan>,
}

/// Writes a cycle's blobs and, last, its manifest.
#[allow(clippy::too_many_arguments)]
async fn write_cycle<T: ChangeTracker + ?Sized + 'static>(
    src: &Source<T>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    cycle: u64,
    attempt: u64,
    base_cycle: u64,
    plan: CyclePlan,
    clock: &dyn Clock,
    cfg: &ShipConfig,
    progress: &dyn Progress,
) -> Result<CycleWritten> {
    let disk = src.disk_id;
    let salt = crate::error::fresh_salt()?;
    let threads = match cfg.encode_threads {
        0 => pipeline::default_threads(),
        n => n,
    };
    let read_threads = cfg.read_threads.max(1);
    // Encoded blobs alive at once: one per worker, the queue, the puts in flight.
    let pool = BufPool::new(threads + cfg.blobs_queued_max + cfg.puts_in_flight_max);
    let session = Arc::new(Session::new(disk_key, disk, cycle, attempt, salt).with_pool(pool));
    let (label, total) = match &plan {
        CyclePlan::Changed(b) if cycle == 1 => ("initial copy", b.count() * SECTOR_SIZE),
        CyclePlan::Changed(b) => ("delta", b.count() * SECTOR_SIZE),
        CyclePlan::Resync { .. } => ("checksum resync", src.state.disk_bytes),
    };
    progress.begin(label, total);
    let bitmap = match &plan {
        CyclePlan::Changed(b) => Some(b.clone()),
        CyclePlan::Resync { .. } => None,
    };

    // Reading and encoding is blocking work on worker threads (`pipeline::encode_blobs`); puts
    // run concurrently here. The channel bounds the encoded blobs held in memory; blobs arrive
    // in seq order.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<EncodedBlob>(cfg.blobs_queued_max.max(1));
    let tracker = Arc::clone(&src.tracker);
    let producer_session = Arc::clone(&session);
    let plan_cfg = *cfg;
    let settings = EncodeSettings {
        cycle,
        attempt,
        disk,
        zstd_level: cfg.zstd_level,
        compression: cfg.compression,
        threads,
        read_threads,
        read_depth: cfg.read_depth.max(1),
        encoder_nice: cfg.encoder_nice,
    };
    let producer = tokio::task::spawn_blocking(move || -> Result<Option<ResyncScan>> {
        let mut seq_next = 0u64;
        let mut next_seq = || {
            let seq = u32::try_from(seq_next).map_err(|_| {
                Error::InvalidInput(
                    "a cycle needs more than 2^32 blobs; raise the blob span".into(),
                )
            });
            seq_next += 1;
            seq
        };
        pipeline::encode_blobs(
            &*tracker,
            &producer_session,
            settings,
            &tx,
            |submit| match plan {
                CyclePlan::Changed(frozen) => {
                    for group in BlobPlan::new(frozen.extents(), &plan_cfg) {
                        let seq = next_seq()?;
                        if !submit(Job {
                            seq,
                            group,
                            data: None,
                        }) {
                            break;
                        }
                    }
                    Ok(None)
                }
                CyclePlan::Resync {
                    block_bytes,
                    digests,
                } => {
                    let mut seq_error = None;
                    let mut emit = |group: Vec<Extent>, data: Vec<u8>| -> bool {
                        match next_seq() {
                            Ok(seq) => submit(Job {
                                seq,
                                group,
                                data: Some(data),
                            }),
                            Err(e) => {
                                seq_error = Some(e);
                                false
                            }
                        }
                    };
                    let scan =
                        scan_for_resync(&*tracker, block_bytes, &digests, &plan_cfg, &mut emit)?;
                    match seq_error {
                        Some(e) => Err(e),
                        None => Ok(scan),
                    }
                }
            },
        )
    });

    let mut blobs: Vec<ManifestBlob> = Vec::new();
    let mut stored_bytes = 0u64;
    let mut zero_total = 0u64;
    let mut kept_up = 0u32;
    let mut failure: Option<Error> = None;
    let sink_ref: &dyn Sink = sink;
    // Puts borrow the sink, so they run as futures polled here rather than spawned tasks.
    let mut in_flight: Vec<
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64>> + Send + '_>>,
    > = Vec::new();
    loop {
        // Fill the put window.
        while in_flight.len() < cfg.puts_in_flight_max.max(1) && failure.is_none() {
            match rx.recv().await {
                Some(blob) => {
                    let key = layout::blob_key(&disk, cycle, attempt, blob.seq);
                    stored_bytes += blob.bytes.len() as u64;
                    zero_total += blob.zero_bytes;
                    kept_up += u32::from(blob.kept_up);
                    blobs.push(ManifestBlob {
                        seq: blob.seq,
                        object_len: blob.bytes.len() as u64,
                        tag: blob.tag,
                        data_bytes: blob.span_bytes,
                    });
                    let span = blob.span_bytes;
                    in_flight.push(Box::pin(async move {
                        sink_ref.put(&key, blob.bytes, PutMode::Overwrite).await?;
                        Ok(span)
                    }));
                }
                None => break,
            }
        }
        if in_flight.is_empty() {
            break;
        }
        let (done, _, rest) = futures_select_all(std::mem::take(&mut in_flight)).await;
        in_flight = rest;
        match done {
            Ok(span) => progress.advance(span),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
        if failure.is_some() {
            break;
        }
    }
    drop(rx);
    drop(in_flight);
    let produced = producer
        .await
        .map_err(|e| Error::InvalidInput(format!("the cycle's reader stopped: {e}")));
    progress.end();
    if let Some(e) = failure {
        return Err(e);
    }
    let scan = produced??;
    tracing::trace!("every blob put");
    blobs.sort_by_key(|b| b.seq);
    let bitmap = match (&scan, bitmap) {
        (Some(scan), _) => scan.differing.encode(),
        (None, Some(b)) => b.encode(),
        (None, None) => {
            return Err(Error::InvalidInput(
                "the resync's reader stopped before the end of the disk".into(),
            ));
        }
    };
    let manifest = Manifest {
        base_cycle,
        disk_bytes: src.state.disk_bytes,
        blobs,
        bitmap,
        created_unix_ms: clock.now().unix_ms(),
    };
    let obj = session
        .encode_manifest(&manifest)
        .map_err(|e| Error::Object {
            key: layout::manifest_key(&disk, cycle),
            source: e,
        })?;
    stored_bytes += obj.bytes.len() as u64;
    tracing::trace!("manifest encoded");
    sink.put(
        &layout::manifest_key(&disk, cycle),
        obj.bytes,
        PutMode::Create,
    )
    .await?;
    Ok(CycleWritten {
        blob_count: manifest.blobs.len() as u32,
        stored_bytes,
        zero_bytes: zero_total,
        blobs_kept_up: kept_up,
        scan,
    })
}

/// Waits for the first of `futs` to finish; returns its output, its index and the others.
async fn futures_select_all<T>(
    mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) -> (
    T,
    usize,
    Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) {
    let (out, idx) = std::future::poll_fn(|cx| {
        for (i, f) in futs.iter_mut().enumerate() {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready((v, i));
            }
        }
        std::task::Poll::Pending
    })
    .await;
    drop(futs.swap_remove(idx));
    (out, idx, futs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ExtentKind;

    #[test]
    fn blobs_split_long_runs_and_respect_extent_limits() {
        let mut b = SectorBitmap::new(100_000);
        let _ = b.mark_sectors(0, 20_000);
        let _ = b.mark_sectors(30_000, 10);
        let cfg = ShipConfig {
            blob_span_bytes_max: 8192 * 512,
            ..ShipConfig::default()
        };
        let groups: Vec<Vec<Extent>> = BlobPlan::new(b.extents(), &cfg).collect();
        let spans: Vec<u64> = groups
            .iter()
            .map(|g| g.iter().map(|e| e.sector_count).sum())
            .collect();
        assert_eq!(spans, vec![8192, 8192, 3626]);
        let total: u64 = spans.iter().sum();
        assert_eq!(total, b.count());
        // Scattered runs: the extent limit closes a blob before its span is full.
        let mut scattered = SectorBitmap::new(100_000);
        for i in 0..10 {
            let _ = scattered.mark_sectors(i * 100, 1);
        }
        let cfg = ShipConfig {
            blob_extents_max: 3,
            ..ShipConfig::default()
        };
        let groups: Vec<Vec<Extent>> = BlobPlan::new(scattered.extents(), &cfg).collect();
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 3, 3, 1]);
    }

    #[test]
    fn zero_runs_carry_no_data() {
        let extents = [Extent::new(0, 24)];
        let mut buf = vec![0u8; 24 * 512];
        buf[8 * 512] = 7; // the second 4 KiB block has data
        let (out, data, zeros) = split_zero_runs(&extents, &buf);
        assert_eq!(
            out,
            vec![
                BlobExtent {
                    start_sector: 0,
                    sector_count: 8,
                    kind: ExtentKind::Zero
                },
                BlobExtent {
                    start_sector: 8,
                    sector_count: 8,
                    kind: ExtentKind::Data
                },
                BlobExtent {
                    start_sector: 16,
                    sector_count: 8,
                    kind: ExtentKind::Zero
                },
            ]
        );
        assert_eq!(data.len(), 8 * 512);
        assert_eq!(zeros, 16 * 512);
    }
}
