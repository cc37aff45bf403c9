//! The target side: hydrate committed cycles from the cache into the target disk, in order.
//!
//! For the next cycle (the lowest committed one whose base is the target's committed cycle):
//!
//! 1. **Verify everything first.** Fetch every blob the manifest lists, authenticate it (its GCM
//!    tag must also be the one the manifest pins), decompress it and check its plaintext CRC32.
//!    Verified blobs are staged, still encrypted, in the state directory. The extents of the
//!    verified blobs must cover exactly the manifest's source bitmap (reconciliation before
//!    writing). Any failure fails the cycle with nothing written.
//! 2. **Write.** Mark the cycle as applying (persisted), then decode each staged blob again (its
//!    checks are re-run right before its bytes are written) and write it through a tracker, so
//!    the target's bitmap is what was really written.
//! 3. **Reconcile** the target's bitmap with the source's. Only if equal is the committed cycle
//!    advanced (persisted atomically) and an acknowledgement put in the cache.
//!
//! A cycle that fails verification or reconciliation is acknowledged as failed: the source
//! carries its sectors into its next cycle, which applies on the same base. A crash at any point
//! is repaired by running hydrate again: an applying cycle is re-applied from the cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use replicator_sink::buf::BufPool;
use replicator_sink::{PutMode, Sink};

use crate::bitmap::{Extent, SECTOR_SIZE, SectorBitmap};
use crate::catalog::{self, DigestCatalog};
use crate::clock::{Clock, Timestamp};
use crate::device::{AlignedBuf, BlockDevice};
use crate::error::{Error, ErrorKind, ReconcileFailure, Result, first_extent_note};
use crate::format::{
    self, Ack, AckStatus, BlobExtent, DecodedBlob, Expect, ExtentKind, Manifest, ManifestBlob,
    Session,
};
use crate::keys::{DiskId, DiskKey, MasterKey};
use crate::layout;
use crate::pipeline;
use crate::progress::Progress;
use crate::state::{STATE_VERSION, StateDir, TARGET_FILE, TargetState};
use crate::tracker::{CbtTracker, Generation, TrackerConfig};

const STAGING_DIR: &str = "staging";
/// Bytes of zeros written (or probed) per call for a zero extent.
const ZERO_WRITE_BYTES: usize = 1 << 20;
/// Zero extents at least this long (64 KiB) are read first and left alone where the target
/// already holds zeros (a fresh sparse image stays sparse; reading a hole costs no I/O); shorter
/// ones (the zero tails of database pages) are written, which is cheaper than a read. Not larger:
/// a churned file system's free space is cut into pieces by the blocks written into it.
pub const ZERO_PROBE_MIN_BYTES: u64 = 64 << 10;

/// Settings of hydration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HydrateConfig {
    /// Cycles applied in one call, at most (0 = no limit).
    pub cycles_max: u64,
    /// Verified blobs are kept (still encrypted) in the state directory between verification
    /// and writing when the cycle's blobs total at most this many bytes (8 GiB); a larger cycle
    /// is fetched again for writing, and verified again, instead of filling the local disk.
    pub staging_bytes_max: u64,
    /// Answer a resync request by reading the whole target disk again instead of trusting the
    /// kept digest catalog (which knows only what cycles wrote): to verify the target, or after
    /// it may have been written outside replication.
    pub catalog_reread: bool,
    /// Threads verifying (decrypting, decompressing, checksumming) blobs; 0 = one per core.
    /// Twice as many blobs are fetched and verified ahead of the writer, at most; with 1, one
    /// blob at a time, so the cache sees its gets in manifest order.
    pub decode_threads: usize,
    /// Of a staged cycle, verified blobs are kept decoded in memory, up to this many data bytes
    /// (64 MiB), so a delta is decoded once; the rest are staged encrypted on disk.
    pub keep_in_memory_bytes_max: u64,
    /// The initial copy (no committed cycle yet, so no recovery point to protect) verifies each
    /// blob right before writing it, in one pass, instead of verifying all first. True.
    pub initial_single_pass: bool,
}

impl Default for HydrateConfig {
    fn default() -> Self {
        HydrateConfig {
            cycles_max: 0,
            staging_bytes_max: 8 << 30,
            catalog_reread: false,
            decode_threads: 0,
            keep_in_memory_bytes_max: 64 << 20,
            initial_single_pass: true,
        }
    }
}

/// One cycle applied and committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedCycle {
    /// The cycle.
    pub cycle: u64,
    /// Its base.
    pub base_cycle: u64,
    /// Sectors written (equal to the source's changed sectors, by reconciliation).
    pub sectors_written: u64,
    /// Blob bytes read from the cache.
    pub blob_bytes: u64,
    /// Blobs read.
    pub blob_count: u32,
    /// When applying started and ended.
    pub started: Timestamp,
    /// See `started`.
    pub finished: Timestamp,
}

/// A cycle that failed here.
#[derive(Debug)]
pub struct FailedCycle {
    /// The cycle.
    pub cycle: u64,
    /// Why, naming the blob, extent and check.
    pub error: Error,
}

/// What [`hydrate`] did.
#[derive(Debug)]
pub struct HydrateReport {
    /// Cycles applied, in order.
    pub applied: Vec<AppliedCycle>,
    /// The cycle that failed, if one did (hydration stops there).
    pub failed: Option<FailedCycle>,
    /// The committed cycle at the end.
    pub committed_cycle: u64,
    /// Newer cycles in the cache that cannot be applied yet (their base was never committed
    /// here, typically because an earlier cycle failed and the source has not resent it).
    pub waiting_cycles: Vec<u64>,
    /// A digest catalog put in the cache by this call, for a checksum resync.
    pub catalog: Option<PublishedCatalog>,
}

/// A digest catalog the target put in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedCatalog {
    /// Its number in the cache.
    pub number: u64,
    /// The resync request it answers (0: sent unasked, the target could apply nothing).
    pub answers_request: u64,
    /// The committed cycle it describes.
    pub committed_cycle: u64,
    pub block_bytes: u32,
    pub blocks: u64,
    /// Bytes of the target disk read to make it (only blocks changed since the last catalog).
    pub bytes_read: u64,
}

const CATALOG_FILE: &str = "catalog.bin";
const CATALOG_DIRTY_FILE: &str = "catalog-dirty.bmap";

/// The target side of one disk.
#[derive(Debug)]
pub struct Target<D: BlockDevice> {
    dir: StateDir,
    state: TargetState,
    disk_id: DiskId,
    /// Shared with the threads that write an initial copy's blobs side by side.
    tracker: Arc<CbtTracker<D>>,
}

/// The disks that have objects in the cache.
pub async fn discover_disks(sink: &dyn Sink) -> Result<Vec<DiskId>> {
    let mut disks: Vec<DiskId> = sink
        .list("disks/")
        .await?
        .iter()
        .filter_map(|m| layout::disk_of_key(&m.key))
        .collect();
    disks.dedup();
    Ok(disks)
}

impl<D: BlockDevice> Target<D> {
    /// Opens (or starts) the target side of `disk` in `state_path`, writing to `device`.
    pub fn open(state_path: &Path, device: D, disk: DiskId) -> Result<Self> {
        let dir = StateDir::open(state_path)?;
        let state = match dir.read_json::<TargetState>(TARGET_FILE)? {
            Some(s) => {
                if s.version != STATE_VERSION {
                    return Err(Error::state(
                        dir.file(TARGET_FILE),
                        format!("unsupported version {}", s.version),
                    ));
                }
                if s.disk_id != disk.to_string() {
                    return Err(Error::InvalidInput(format!(
                        "target state {} belongs to disk {}, not {disk}; use that disk's state directory",
                        state_path.display(),
                        s.disk_id
                    )));
                }
                s
            }
            None => {
                let s = TargetState {
                    version: STATE_VERSION,
                    disk_id: disk.to_string(),
                    committed_cycle: 0,
                    committed_unix_ms: 0,
                    committed_acked: true,
                    applying_cycle: None,
                    failed_cycles: Vec::new(),
                    generation: None,
                    catalogs_published: 0,
                    answered_request: 0,
                    stuck_catalog_at: None,
                };
                dir.write_json(TARGET_FILE, &s)?;
                s
            }
        };
        let mut state = state;
        if state
            .generation
            .as_deref()
            .is_none_or(|g| g.parse::<Generation>().is_err())
        {
            state.generation = Some(Generation::generate()?.to_string());
            dir.write_json(TARGET_FILE, &state)?;
        }
        Ok(Target {
            dir,
            state,
            disk_id: disk,
            tracker: Arc::new(CbtTracker::in_memory(device, TrackerConfig::default())),
        })
    }

    /// The persisted state.
    pub fn state(&self) -> &TargetState {
        &self.state
    }

    /// This target state's generation.
    pub fn generation(&self) -> Generation {
        self.state
            .generation
            .as_deref()
            .and_then(|g| g.parse().ok())
            .unwrap_or(Generation([0; crate::tracker::GENERATION_LEN]))
    }

    /// The target device.
    pub fn device(&self) -> &D {
        self.tracker.device()
    }

    /// The disk's id.
    pub fn disk_id(&self) -> DiskId {
        self.disk_id
    }

    fn save(&self) -> Result<()> {
        self.dir.write_json(TARGET_FILE, &self.state)
    }

    fn staging(&self, cycle: u64) -> PathBuf {
        self.dir.file(STAGING_DIR).join(cycle.to_string())
    }
}

/// The cycles in the cache newer than the committed one: (cycle, manifest) for those that decode.
/// Manifests that fail verification are returned as failures.
async fn candidates(
    sink: &dyn Sink,
    disk_key: &DiskKey,
    disk: &DiskId,
    after: u64,
) -> Result<Vec<(u64, std::result::Result<(u64, Manifest), Error>)>> {
    let mut out = Vec::new();
    for meta in sink.list(&layout::manifests_prefix(disk)).await? {
        let Some(cycle) = layout::cycle_of_key(&meta.key) else {
            continue;
        };
        if cycle <= after {
            continue;
        }
        let bytes = sink.get(&meta.key).await?;
        let expect = Expect {
            disk_id: *disk,
            cycle,
            attempt: None,
            seq: None,
            tag: None,
        };
        let decoded = match format::decode_manifest(disk_key, &bytes, &expect) {
            Ok((header, manifest)) => Ok((header.attempt, manifest)),
            // A wrong key is the operator's to fix, not the cycle's fault.
            Err(e) if e.is_wrong_key() => {
                return Err(Error::Object {
                    key: meta.key,
                    source: e,
                });
            }
            Err(e) => Err(Error::Object {
                key: meta.key.clone(),
                source: e,
            }),
        };
        out.push((cycle, decoded));
    }
    Ok(out)
}

/// Applies every committed cycle not yet applied, in order, stopping at the first failure.
pub async fn hydrate<D: BlockDevice + 'static>(
    t: &mut Target<D>,
    sink: &dyn Sink,
    key: &MasterKey,
    clock: &dyn Clock,
    cfg: &HydrateConfig,
    progress: &dyn Progress,
) -> Result<HydrateReport> {
    let disk = t.disk_id;
    let disk_key = key.disk_key(&disk);
    let mut report = HydrateReport {
        applied: Vec::new(),
        failed: None,
        committed_cycle: t.state.committed_cycle,
        waiting_cycles: Vec::new(),
        catalog: None,
    };
    if !t.state.committed_acked {
        put_ack(
            t,
            sink,
            &disk_key,
            t.state.committed_cycle,
            AckStatus::Applied,
            t.tracker.size_bytes() / SECTOR_SIZE,
            "applied",
        )
        .await?;
        t.state.committed_acked = true;
        t.save()?;
    }
    // One listing serves the whole call: cycles are applied in order, each on the one before, so
    // a cycle passed over because its base was not committed can never apply later in this call.
    let found = candidates(sink, &disk_key, &disk, t.state.committed_cycle).await?;
    tracing::debug!(cycles = found.len(), "hydrate: manifests listed");
    // Bases of the cycles passed over, to tell "waiting for the source" from "stuck for good".
    let mut stuck_bases: Vec<u64> = Vec::new();
    for (cycle, decoded) in found {
        if t.state.failed_cycles.contains(&cycle) {
            // The source waits for this cycle's failure report, and a failed cycle is never
            // tried again: a report whose put failed, or that the cache lost or damaged, is put
            // again, or the two sides would wait for each other forever.
            if !failure_reported(sink, &disk_key, &disk, cycle).await? {
                put_ack(
                    t,
                    sink,
                    &disk_key,
                    cycle,
                    AckStatus::Failed,
                    0,
                    "failed here earlier; its first failure report is missing from the cache",
                )
                .await?;
            }
            continue;
        }
        let (attempt, manifest) = match decoded {
            Ok(v) => v,
            Err(error) => {
                // A manifest that fails authentication: the cycle failed.
                fail_cycle(t, sink, &disk_key, cycle, &error).await?;
                report.failed = Some(FailedCycle { cycle, error });
                break;
            }
        };
        if manifest.base_cycle != t.state.committed_cycle {
            report.waiting_cycles.push(cycle);
            stuck_bases.push(manifest.base_cycle);
            continue;
        }
        if cfg.cycles_max != 0 && report.applied.len() as u64 >= cfg.cycles_max {
            break;
        }
        match apply_cycle(
            t, sink, &disk_key, cycle, attempt, &manifest, cfg, clock, progress,
        )
        .await
        {
            Ok(applied) => report.applied.push(applied),
            Err(error) if error.kind() == ErrorKind::CycleFailed => {
                fail_cycle(t, sink, &disk_key, cycle, &error).await?;
                report.failed = Some(FailedCycle { cycle, error });
                break;
            }
            Err(error) => return Err(error),
        }
    }
    let committed = t.state.committed_cycle;
    report.waiting_cycles.retain(|c| *c > committed);
    report.committed_cycle = t.state.committed_cycle;
    if report.failed.is_none() && t.state.applying_cycle.is_none() {
        report.catalog = answer_resync(
            t,
            sink,
            &disk_key,
            &stuck_bases,
            cfg.catalog_reread,
            clock,
            progress,
        )
        .await?;
    }
    Ok(report)
}

/// The sectors written since the kept catalog was last brought up to date.
fn read_dirty<D: BlockDevice>(t: &Target<D>, disk_sectors: u64) -> Result<SectorBitmap> {
    if t.dir.file(CATALOG_DIRTY_FILE).exists() {
        t.dir.read_bitmap(CATALOG_DIRTY_FILE, disk_sectors)
    } else {
        Ok(SectorBitmap::new(disk_sectors))
    }
}

/// Puts a digest catalog in the cache when the source asked for one (a resync request newer than
/// the last answered), or unasked when cycles are waiting in the cache but none can ever apply
/// here (none is based on the committed cycle, and none waits on a cycle that failed here, which
/// the source carries forward by itself): the target was replaced, restored, or lost its chain.
async fn answer_resync<D: BlockDevice>(
    t: &mut Target<D>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    stuck_bases: &[u64],
    reread: bool,
    clock: &dyn Clock,
    progress: &dyn Progress,
) -> Result<Option<PublishedCatalog>> {
    let disk = t.disk_id;
    let mut newest: Option<(u64, u32)> = None;
    for meta in sink.list(&layout::requests_prefix(&disk)).await? {
        let Some(number) = layout::cycle_of_key(&meta.key) else {
            continue;
        };
        if number <= t.state.answered_request || newest.is_some_and(|(n, _)| n >= number) {
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
        match format::decode_resync_request(disk_key, &bytes, &expect) {
            Ok((_, q)) => newest = Some((number, q.block_bytes)),
            Err(e) if e.is_wrong_key() => {
                return Err(Error::Object {
                    key: meta.key,
                    source: e,
                });
            }
            Err(e) => {
                tracing::warn!(key = %meta.key, error = %e, "ignoring a resync request that failed verification");
            }
        }
    }
    let committed = t.state.committed_cycle;
    let stuck = !stuck_bases.is_empty()
        && stuck_bases
            .iter()
            .all(|b| *b != committed && !t.state.failed_cycles.contains(b))
        && t.state.stuck_catalog_at != Some(committed);
    let (answers_request, block_bytes) = match newest {
        Some((n, block)) => (n, block),
        None if stuck => (0, catalog::DEFAULT_BLOCK_BYTES),
        None => return Ok(None),
    };
    let size = t.tracker.size_bytes();
    let path = t.dir.file(CATALOG_FILE);
    let disk_sectors = size / SECTOR_SIZE;
    // The kept catalog, brought up to date by reading only the blocks written since; or, with
    // none (or another block size), one made by reading the whole disk once.
    let kept =
        DigestCatalog::load(&path, size)?.filter(|c| c.block_bytes == block_bytes && !reread);
    let (cat, bytes_read) = match kept {
        Some(mut cat) => {
            let dirty = read_dirty(t, disk_sectors)?;
            let read = cat.refresh(t.tracker.device(), &dirty, committed)?;
            (cat, read)
        }
        None => DigestCatalog::build(t.tracker.device(), block_bytes, committed, progress)?,
    };
    cat.save(&path)?;
    t.dir.remove(CATALOG_DIRTY_FILE)?;
    let number = t.state.catalogs_published + 1;
    // Persisted before the put: a put that fails may still have stored the catalog (a lost
    // acknowledgement), and a source that read it skips every catalog numbered up to it, so the
    // number must not be used again.
    t.state.catalogs_published = number;
    t.save()?;
    let key = layout::catalog_key(&disk, number);
    let salt = crate::error::fresh_salt()?;
    let session = Session::new(disk_key, disk, number, 0, salt);
    let blocks = cat.digests.len() as u64;
    let obj = session
        .encode_catalog(&format::Catalog {
            target_generation: t.generation().0,
            committed_cycle: committed,
            answers_request,
            block_bytes,
            disk_bytes: size,
            digests: cat.digests,
            created_unix_ms: clock.now().unix_ms(),
        })
        .map_err(|e| Error::Object {
            key: key.clone(),
            source: e,
        })?;
    sink.put(&key, obj.bytes, PutMode::Overwrite).await?;
    t.state.catalogs_published = number;
    if answers_request > 0 {
        t.state.answered_request = answers_request;
    } else {
        t.state.stuck_catalog_at = Some(committed);
    }
    t.save()?;
    tracing::info!(
        number,
        answers_request,
        committed,
        blocks,
        bytes_read,
        "digest catalog put in the cache"
    );
    Ok(Some(PublishedCatalog {
        number,
        answers_request,
        committed_cycle: committed,
        block_bytes,
        blocks,
        bytes_read,
    }))
}

async fn put_ack<D: BlockDevice>(
    t: &Target<D>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    cycle: u64,
    status: AckStatus,
    sectors_written: u64,
    message: &str,
) -> Result<()> {
    if cycle == 0 {
        return Ok(());
    }
    let salt = crate::error::fresh_salt()?;
    let session = Session::new(disk_key, t.disk_id, cycle, 0, salt);
    let mut message = message.to_owned();
    if message.len() > 4000 {
        let mut cut = 4000;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let ack = Ack {
        status,
        sectors_written,
        message,
        target_generation: Some(t.generation().0),
    };
    let key = layout::ack_key(&t.disk_id, cycle);
    let obj = session.encode_ack(&ack).map_err(|e| Error::Object {
        key: key.clone(),
        source: e,
    })?;
    sink.put(&key, obj.bytes, PutMode::Overwrite).await?;
    Ok(())
}

/// Whether the cache holds an authentic failure report of `cycle`.
async fn failure_reported(
    sink: &dyn Sink,
    disk_key: &DiskKey,
    disk: &DiskId,
    cycle: u64,
) -> Result<bool> {
    let bytes = match sink.get(&layout::ack_key(disk, cycle)).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let expect = Expect {
        disk_id: *disk,
        cycle,
        attempt: None,
        seq: None,
        tag: None,
    };
    Ok(matches!(
        format::decode_ack(disk_key, &bytes, &expect),
        Ok((_, ack)) if ack.status == AckStatus::Failed
    ))
}

async fn fail_cycle<D: BlockDevice>(
    t: &mut Target<D>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    cycle: u64,
    error: &Error,
) -> Result<()> {
    tracing::warn!(cycle, error = %error, "cycle failed on the target");
    if !t.state.failed_cycles.contains(&cycle) {
        t.state.failed_cycles.push(cycle);
    }
    t.save()?;
    let _ = std::fs::remove_dir_all(t.staging(cycle));
    put_ack(
        t,
        sink,
        disk_key,
        cycle,
        AckStatus::Failed,
        0,
        &error.to_string(),
    )
    .await
}

/// After every blob was fetched and verified (or found unusable): the verified blobs must cover
/// exactly the manifest's sectors, else a reconcile error naming the unusable blobs; then the
/// first blob error, if any.
fn check_coverage(
    cycle: u64,
    stage: &'static str,
    written: &str,
    expected: &SectorBitmap,
    covered: &SectorBitmap,
    unusable: &[String],
    first_error: Option<Error>,
) -> Result<()> {
    if covered != expected {
        let cause = if unusable.is_empty() {
            String::new()
        } else {
            format!("; {written}; unusable blobs: {}", unusable.join("; "))
        };
        return Err(reconcile_error(
            cycle,
            stage,
            "covered by verified blobs",
            expected,
            covered,
            cause,
        )?);
    }
    first_error.map_or(Ok(()), Err)
}

fn reconcile_error(
    cycle: u64,
    stage: &'static str,
    verb: &'static str,
    expected: &SectorBitmap,
    got: &SectorBitmap,
    cause: String,
) -> Result<Error> {
    let mut missing = expected.clone();
    missing.difference_with(got)?;
    let mut extra = got.clone();
    extra.difference_with(expected)?;
    Ok(Error::Reconcile(Box::new(ReconcileFailure {
        cycle,
        stage,
        verb,
        missing_sectors: missing.count(),
        extra_sectors: extra.count(),
        first_missing: first_extent_note(missing.extents().next()),
        first_extra: first_extent_note(extra.extents().next()),
        cause,
    })))
}

/// Marks the target as applying `cycle` (persisted) before its first byte is written, tells the
/// kept digest catalog which blocks change, and starts the write tracker afresh.
fn begin_writing<D: BlockDevice>(
    t: &mut Target<D>,
    cycle: u64,
    expected: &SectorBitmap,
    disk_sectors: u64,
) -> Result<()> {
    t.state.applying_cycle = Some(cycle);
    t.save()?;
    // The kept digest catalog learns which blocks to read again before any of them changes.
    if t.dir.file(CATALOG_FILE).exists() {
        let mut dirty = read_dirty(t, disk_sectors)?;
        dirty.union_with(expected)?;
        t.dir.write_bitmap(CATALOG_DIRTY_FILE, &dirty)?;
    }
    let _ = t.tracker.take_current();
    Ok(())
}

/// Where a blob is read from for verification.
#[derive(Clone, Debug)]
enum BlobFrom {
    Sink,
    /// Staged in the state directory, as fetched.
    File(PathBuf),
}

/// Fetches one blob's bytes from where `from` says.
async fn fetch_blob(sink: &dyn Sink, key: &str, from: BlobFrom) -> Result<Bytes> {
    match from {
        BlobFrom::Sink => sink.get(key).await.map_err(Error::from),
        BlobFrom::File(path) => std::fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| Error::state_io(&path, "cannot read a staged blob", e)),
    }
}

/// What the blobs of one cycle are checked against, for the threads that verify them.
#[derive(Clone)]
struct CycleCheck {
    disk_key: DiskKey,
    disk: DiskId,
    cycle: u64,
    attempt: u64,
    disk_sectors: u64,
    /// Decoded blobs' buffers, reused once a blob was written.
    pool: Arc<BufPool>,
}

impl CycleCheck {
    /// Authenticates, decompresses and CRC-checks one blob fetched from `key`, which the
    /// manifest lists as `listed`, and checks that its extents fit the disk.
    fn verify(&self, key: &str, bytes: &[u8], listed: &ManifestBlob) -> Result<DecodedBlob> {
        let expect = Expect {
            disk_id: self.disk,
            cycle: self.cycle,
            attempt: Some(self.attempt),
            seq: Some(listed.seq),
            tag: Some(listed.tag),
        };
        let blob = format::decode_blob_pooled(&self.disk_key, bytes, &expect, Some(&self.pool))
            .map_err(|e| Error::Object {
                key: key.to_owned(),
                source: e,
            })?;
        let disk_sectors = self.disk_sectors;
        for (i, e) in blob.extents.iter().enumerate() {
            let end = e.start_sector.checked_add(e.sector_count);
            if end.is_none_or(|end| end > disk_sectors) {
                return Err(Error::Manifest {
                    key: key.to_owned(),
                    detail: format!(
                        "extent {i} (sectors {}+{}) lies past the end of the {disk_sectors}-sector disk",
                        e.start_sector, e.sector_count
                    ),
                });
            }
        }
        Ok(blob)
    }
}

/// Runs `f` on the blocking pool; a panic there becomes an error.
async fn on_blocking_pool<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::InvalidInput(format!(
            "a verifying thread failed: {e}"
        )))
    })
}

/// Fetches and verifies `fetches` in order; each item is a future, so that `.buffered(n)` runs
/// `n` fetches at once, each verified on the blocking pool as soon as it arrived.
fn verified_blobs<'a>(
    sink: &'a dyn Sink,
    check: &'a CycleCheck,
    fetches: Vec<(ManifestBlob, BlobFrom)>,
) -> impl Stream<
    Item = impl std::future::Future<Output = (ManifestBlob, Result<(Bytes, DecodedBlob)>)> + 'a,
> + 'a {
    futures::stream::iter(fetches).map(move |(b, from)| async move {
        let key = layout::blob_key(&check.disk, check.cycle, check.attempt, b.seq);
        let bytes = match fetch_blob(sink, &key, from).await {
            Ok(bytes) => bytes,
            Err(e) => return (b, Err(e)),
        };
        let (check, listed, data) = (check.clone(), b.clone(), bytes.clone());
        let verified = on_blocking_pool(move || check.verify(&key, &data, &listed))
            .await
            .map(|blob| (bytes, blob));
        (b, verified)
    })
}

/// One blob of an initial copy, verified and written by [`written_blobs`].
struct WrittenBlob {
    extents: Vec<Extent>,
    already_zero: Vec<Extent>,
    span_bytes: u64,
}

/// Fetches, verifies and writes `fetches`: each item is a future, so that `.buffered(n)` keeps
/// `n` blobs in progress, each verified and then written on the blocking pool (writes go to the
/// target side by side, which keeps its queue full). A blob whose sectors overlap a blob already
/// claimed is refused before it writes anything. Once `stop` is set no further blob starts.
fn written_blobs<'a, D: BlockDevice + 'static>(
    sink: &'a dyn Sink,
    check: &'a CycleCheck,
    tracker: &'a Arc<CbtTracker<D>>,
    claimed: &'a Arc<Mutex<SectorBitmap>>,
    stop: &'a Arc<AtomicBool>,
    fetches: Vec<ManifestBlob>,
) -> impl Stream<Item = impl std::future::Future<Output = (ManifestBlob, Result<WrittenBlob>)> + 'a> + 'a
{
    let stop_starting = Arc::clone(stop);
    let fetches = fetches
        .into_iter()
        .take_while(move |_| !stop_starting.load(Ordering::SeqCst));
    futures::stream::iter(fetches).map(move |b| async move {
        let key = layout::blob_key(&check.disk, check.cycle, check.attempt, b.seq);
        let bytes = match fetch_blob(sink, &key, BlobFrom::Sink).await {
            Ok(bytes) => bytes,
            Err(e) => return (b, Err(e)),
        };
        let (check, listed, tracker, claimed, stop) = (
            check.clone(),
            b.clone(),
            Arc::clone(tracker),
            Arc::clone(claimed),
            Arc::clone(stop),
        );
        let written = on_blocking_pool(move || {
            let blob = check.verify(&key, &bytes, &listed)?;
            drop(bytes);
            let extents: Vec<Extent> = blob
                .extents
                .iter()
                .map(|e| Extent::new(e.start_sector, e.sector_count))
                .collect();
            {
                let mut claimed = claimed.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(e) = extents.iter().find(|e| {
                    claimed
                        .extents_within(e.start_sector, e.sector_count)
                        .next()
                        .is_some()
                }) {
                    return Err(Error::Manifest {
                        key,
                        detail: format!(
                            "its sectors {}+{} overlap another blob of the cycle",
                            e.start_sector, e.sector_count
                        ),
                    });
                }
                for e in &extents {
                    claimed.mark_extent(*e)?;
                }
            }
            if stop.load(Ordering::SeqCst) {
                return Err(Error::InvalidInput(
                    "the cycle stopped before this blob was written".into(),
                ));
            }
            let span_bytes = extents.iter().map(Extent::len_bytes).sum();
            let already_zero = write_blob(&tracker, &key, &blob.extents, &blob.data)?;
            Ok(WrittenBlob {
                extents,
                already_zero,
                span_bytes,
            })
        })
        .await;
        (b, written)
    })
}

thread_local! {
    /// A writing thread's buffers for zero extents: one to read the target into (is it zero
    /// already?) and one of zeros to write.
    static ZERO_BUFFERS: std::cell::RefCell<(AlignedBuf, Vec<u8>)> =
        std::cell::RefCell::new((AlignedBuf::zeroed(0), Vec::new()));
    /// A writing thread's buffer for pieces joined into one write ([`JOIN_BYTES_MAX`]).
    static JOIN_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Extents of a blob that lie back to back on the disk, each at most this long, are written as
/// one write of at most this many bytes: a delta's 16 KiB page whose zero runs the encoder cut
/// out goes to the target in one write, not three. Longer data extents are written as they are
/// (no copy).
const JOIN_BYTES_MAX: usize = 256 << 10;

/// A piece of a joined write: data from the blob, or zeros.
enum Piece<'a> {
    Data(&'a [u8]),
    Zeros(usize),
}

/// Extents waiting to be written as one: they start at `offset` and follow each other.
struct Joined<'a> {
    offset: u64,
    len: usize,
    pieces: Vec<Piece<'a>>,
}

impl<'a> Joined<'a> {
    /// Adds a piece if it follows the others and the write stays short enough.
    fn try_push(&mut self, offset: u64, piece: Piece<'a>, len: usize) -> bool {
        if !self.pieces.is_empty()
            && (self.offset + self.len as u64 != offset || self.len + len > JOIN_BYTES_MAX)
        {
            return false;
        }
        if self.pieces.is_empty() {
            self.offset = offset;
        }
        self.len += len;
        self.pieces.push(piece);
        true
    }

    /// Writes the pieces held, as one write, and empties the list.
    fn write<D: BlockDevice>(&mut self, tracker: &CbtTracker<D>) -> Result<()> {
        match self.pieces.as_slice() {
            [] => {}
            [Piece::Data(chunk)] => tracker.write_at(chunk, self.offset)?,
            pieces => JOIN_BUFFER.with(|cell| -> Result<()> {
                let mut buf = cell.borrow_mut();
                buf.clear();
                for p in pieces {
                    match p {
                        Piece::Data(chunk) => buf.extend_from_slice(chunk),
                        Piece::Zeros(n) => {
                            let to = buf.len() + n;
                            buf.resize(to, 0);
                        }
                    }
                }
                Ok(tracker.write_at(&buf, self.offset)?)
            })?,
        }
        self.pieces.clear();
        self.len = 0;
        Ok(())
    }
}

/// Writes one verified blob through the target's tracker: data extents as they are; zero
/// extents of at least [`ZERO_PROBE_MIN_BYTES`] only where the target does not already read as
/// zero, shorter ones as zeros; short extents back to back as one write. Returns the sectors
/// found already zero (not written; they hold what the cycle says, so they count as written).
fn write_blob<D: BlockDevice>(
    tracker: &CbtTracker<D>,
    key: &str,
    extents: &[BlobExtent],
    data: &[u8],
) -> Result<Vec<Extent>> {
    let mut data_pos = 0usize;
    let mut already_zero: Vec<Extent> = Vec::new();
    let mut joined = Joined {
        offset: 0,
        len: 0,
        pieces: Vec::new(),
    };
    for e in extents {
        let len = (e.sector_count * SECTOR_SIZE) as usize;
        let offset = e.start_sector * SECTOR_SIZE;
        match e.kind {
            ExtentKind::Data => {
                let chunk = data
                    .get(data_pos..data_pos + len)
                    .ok_or_else(|| Error::Manifest {
                        key: key.to_owned(),
                        detail: "its data is shorter than its extents".into(),
                    })?;
                data_pos += len;
                if len > JOIN_BYTES_MAX {
                    joined.write(tracker)?;
                    tracker.write_at(chunk, offset)?;
                } else if !joined.try_push(offset, Piece::Data(chunk), len) {
                    joined.write(tracker)?;
                    joined.try_push(offset, Piece::Data(chunk), len);
                }
            }
            ExtentKind::Zero if (len as u64) < ZERO_PROBE_MIN_BYTES => {
                if !joined.try_push(offset, Piece::Zeros(len), len) {
                    joined.write(tracker)?;
                    joined.try_push(offset, Piece::Zeros(len), len);
                }
            }
            ExtentKind::Zero => {
                joined.write(tracker)?;
                ZERO_BUFFERS.with(|cell| -> Result<()> {
                    let (probe, zeros) = &mut *cell.borrow_mut();
                    let mut done = 0usize;
                    while done < len {
                        let n = ZERO_WRITE_BYTES.min(len - done);
                        let at = offset + done as u64;
                        probe.resize(n);
                        tracker.read_at(probe.as_mut_slice(), at)?;
                        if pipeline::is_zero(probe.as_slice()) {
                            let found = Extent::new(at / SECTOR_SIZE, n as u64 / SECTOR_SIZE);
                            match already_zero.last_mut() {
                                Some(last) if last.end_sector() == found.start_sector => {
                                    last.sector_count += found.sector_count;
                                }
                                _ => already_zero.push(found),
                            }
                            done += n;
                            continue;
                        }
                        if zeros.len() < n {
                            *zeros = vec![0u8; ZERO_WRITE_BYTES];
                        }
                        tracker.write_at(&zeros[..n], at)?;
                        done += n;
                    }
                    Ok(())
                })?;
            }
        }
    }
    joined.write(tracker)?;
    Ok(already_zero)
}

/// Writes a blob on this thread and records what it found already zero.
fn write_blob_here<D: BlockDevice>(
    tracker: &CbtTracker<D>,
    key: &str,
    blob: &DecodedBlob,
    already_zero: &mut SectorBitmap,
    progress: &dyn Progress,
) -> Result<()> {
    for e in write_blob(tracker, key, &blob.extents, &blob.data)? {
        already_zero.mark_extent(e)?;
    }
    progress.advance(
        blob.extents
            .iter()
            .map(|e| e.sector_count * SECTOR_SIZE)
            .sum(),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn apply_cycle<D: BlockDevice + 'static>(
    t: &mut Target<D>,
    sink: &dyn Sink,
    disk_key: &DiskKey,
    cycle: u64,
    attempt: u64,
    manifest: &Manifest,
    cfg: &HydrateConfig,
    clock: &dyn Clock,
    progress: &dyn Progress,
) -> Result<AppliedCycle> {
    let started = clock.now();
    let disk = t.disk_id;
    let size = t.tracker.size_bytes();
    if manifest.disk_bytes != size {
        return Err(Error::InvalidInput(format!(
            "target {} is {size} bytes but the source disk of cycle {cycle} is {} bytes; give a target of the same size",
            t.tracker.name(),
            manifest.disk_bytes
        )));
    }
    let disk_sectors = size / SECTOR_SIZE;
    let manifest_key = layout::manifest_key(&disk, cycle);
    let expected = SectorBitmap::decode(&manifest.bitmap).map_err(|e| Error::Manifest {
        key: manifest_key.clone(),
        detail: format!("its source bitmap is invalid: {e}"),
    })?;
    if expected.disk_sectors() != disk_sectors {
        return Err(Error::Manifest {
            key: manifest_key,
            detail: format!(
                "its source bitmap is for {} sectors, the disk has {disk_sectors}",
                expected.disk_sectors()
            ),
        });
    }

    let threads = match cfg.decode_threads {
        0 => pipeline::default_threads(),
        n => n,
    };
    // Blobs fetched and verified at once, ahead of the writer: each holds at most one encoded
    // and one decoded blob. One thread: one blob at a time, fetched in manifest order.
    let ahead = if threads <= 1 { 1 } else { threads * 2 };
    let total: u64 = manifest.blobs.iter().map(|b| b.object_len).sum();
    let mut already_zero = SectorBitmap::new(disk_sectors);
    let blob_bytes = total;
    let check = CycleCheck {
        disk_key: disk_key.clone(),
        disk,
        cycle,
        attempt,
        disk_sectors,
        // Each blob in progress holds a plaintext and a decoded buffer.
        pool: BufPool::new(2 * ahead + 2),
    };

    if t.state.committed_cycle == 0 && cfg.initial_single_pass {
        // The initial copy: no committed cycle to protect, so each blob is verified right before
        // its bytes are written, in one pass. The target is marked as applying first; a failure
        // leaves it so (not consistent) until a later cycle applies whole.
        begin_writing(t, cycle, &expected, disk_sectors)?;
        progress.begin(
            &format!("apply cycle {cycle}"),
            expected.count() * SECTOR_SIZE,
        );
        let mut covered = SectorBitmap::new(disk_sectors);
        let mut unusable: Vec<String> = Vec::new();
        let mut first_error: Option<Error> = None;
        let mut fatal: Option<Error> = None;
        let claimed = Arc::new(Mutex::new(SectorBitmap::new(disk_sectors)));
        let stop = Arc::new(AtomicBool::new(false));
        let fetches = manifest.blobs.clone();
        let mut stream =
            written_blobs(sink, &check, &t.tracker, &claimed, &stop, fetches).buffered(ahead);
        // Every blob started is waited for, also after a failure: no write of this attempt may
        // land after hydrate returned.
        while let Some((_, written)) = stream.next().await {
            match written {
                Ok(w) => {
                    for e in w.extents {
                        covered.mark_extent(e)?;
                    }
                    for e in w.already_zero {
                        already_zero.mark_extent(e)?;
                    }
                    progress.advance(w.span_bytes);
                }
                Err(e) if e.kind() == ErrorKind::Transient || e.kind() == ErrorKind::Io => {
                    stop.store(true, Ordering::SeqCst);
                    fatal.get_or_insert(e);
                }
                Err(e) => {
                    if fatal.is_none() {
                        unusable.push(format!("{e}"));
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = fatal {
            progress.end();
            return Err(e);
        }
        drop(stream);
        progress.end();
        check_coverage(
            cycle,
            "while writing",
            "only verified blobs were written",
            &expected,
            &covered,
            &unusable,
            first_error,
        )?;
    } else {
        // Phase 1: fetch and verify every blob; keep it (decoded in memory up to a budget, else
        // staged encrypted in the state directory); nothing is written to the target.
        let staging = t.staging(cycle);
        std::fs::create_dir_all(&staging)
            .map_err(|e| Error::state_io(&staging, "cannot create the staging directory", e))?;
        let stage_locally = total <= cfg.staging_bytes_max;
        progress.begin(&format!("verify cycle {cycle}"), total);
        let mut covered = SectorBitmap::new(disk_sectors);
        let mut unusable: Vec<String> = Vec::new();
        let mut first_error: Option<Error> = None;
        let mut kept: Vec<Option<DecodedBlob>> = vec![None; manifest.blobs.len()];
        let mut kept_bytes = 0u64;
        {
            let fetches = manifest
                .blobs
                .iter()
                .map(|b| (b.clone(), BlobFrom::Sink))
                .collect();
            let mut stream = verified_blobs(sink, &check, fetches).buffered(ahead);
            let mut index = 0usize;
            while let Some((b, verified)) = stream.next().await {
                match verified {
                    Ok((bytes, blob)) => {
                        for e in &blob.extents {
                            covered.mark_extent(Extent::new(e.start_sector, e.sector_count))?;
                        }
                        let size = blob.data.len() as u64;
                        if stage_locally && kept_bytes + size <= cfg.keep_in_memory_bytes_max {
                            kept_bytes += size;
                            if let Some(slot) = kept.get_mut(index) {
                                *slot = Some(blob);
                            }
                        } else if stage_locally {
                            let path = staging.join(b.seq.to_string());
                            std::fs::write(&path, &bytes)
                                .map_err(|e| Error::state_io(&path, "cannot stage a blob", e))?;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Transient || e.kind() == ErrorKind::Io => {
                        progress.end();
                        return Err(e);
                    }
                    Err(e) => {
                        unusable.push(format!("{e}"));
                        first_error.get_or_insert(e);
                    }
                }
                progress.advance(b.object_len);
                index += 1;
            }
        }
        progress.end();
        check_coverage(
            cycle,
            "before writing",
            "nothing was written",
            &expected,
            &covered,
            &unusable,
            first_error,
        )?;
        tracing::debug!(cycle, "hydrate: every blob verified");

        // Phase 2: write. Blobs kept decoded were verified in phase 1 and never left memory;
        // the others are read again (staged file or cache) and verified again right before
        // their bytes go out.
        begin_writing(t, cycle, &expected, disk_sectors)?;
        progress.begin(
            &format!("apply cycle {cycle}"),
            expected.count() * SECTOR_SIZE,
        );
        let mut again = Vec::new();
        for (b, slot) in manifest.blobs.iter().zip(kept.iter_mut()) {
            let key = layout::blob_key(&disk, cycle, attempt, b.seq);
            match slot.take() {
                Some(blob) => {
                    write_blob_here(&t.tracker, &key, &blob, &mut already_zero, progress)?
                }
                None if stage_locally => {
                    again.push((b.clone(), BlobFrom::File(staging.join(b.seq.to_string()))))
                }
                None => again.push((b.clone(), BlobFrom::Sink)),
            }
        }
        drop(kept);
        let mut stream = verified_blobs(sink, &check, again).buffered(ahead);
        while let Some((b, verified)) = stream.next().await {
            let (_, blob) = verified?;
            let key = layout::blob_key(&disk, cycle, attempt, b.seq);
            write_blob_here(&t.tracker, &key, &blob, &mut already_zero, progress)?;
        }
    }
    // Sectors found already zero hold what the cycle says: they count as written.
    crate::tracker::ChangeTracker::carry(&*t.tracker, &already_zero)?;
    tracing::debug!(cycle, "hydrate: written");
    t.tracker.flush()?;
    progress.end();
    tracing::debug!(cycle, "hydrate: flushed");

    // Phase 3: reconcile what was really written with what the source said changed.
    let written = t.tracker.take_current();
    if written != expected {
        return Err(reconcile_error(
            cycle,
            "after writing",
            "written",
            &expected,
            &written,
            String::new(),
        )?);
    }
    t.state.committed_cycle = cycle;
    t.state.committed_unix_ms = clock.now().unix_ms();
    t.state.applying_cycle = None;
    t.state.committed_acked = false;
    t.save()?;
    tracing::debug!(cycle, "hydrate: committed");
    let _ = std::fs::remove_dir_all(t.staging(cycle));
    put_ack(
        t,
        sink,
        disk_key,
        cycle,
        AckStatus::Applied,
        written.count(),
        "applied",
    )
    .await?;
    t.state.committed_acked = true;
    t.save()?;
    tracing::debug!(cycle, "hydrate: acknowledged");
    Ok(AppliedCycle {
        cycle,
        base_cycle: manifest.base_cycle,
        sectors_written: written.count(),
        blob_bytes,
        blob_count: manifest.blobs.len() as u32,
        started,
        finished: clock.now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceError, MemDevice};

    /// A memory disk that records every write's offset and length.
    #[derive(Debug)]
    struct Counting {
        dev: MemDevice,
        writes: Mutex<Vec<(u64, usize)>>,
    }

    impl BlockDevice for Counting {
        fn name(&self) -> &str {
            self.dev.name()
        }
        fn size_bytes(&self) -> u64 {
            self.dev.size_bytes()
        }
        fn read_at(
            &self,
            buf: &mut [u8],
            offset_bytes: u64,
        ) -> std::result::Result<(), DeviceError> {
            self.dev.read_at(buf, offset_bytes)
        }
        fn write_at(&self, buf: &[u8], offset_bytes: u64) -> std::result::Result<(), DeviceError> {
            self.writes.lock().unwrap().push((offset_bytes, buf.len()));
            self.dev.write_at(buf, offset_bytes)
        }
        fn flush(&self) -> std::result::Result<(), DeviceError> {
            Ok(())
        }
    }

    fn ext(start_kib: u64, kib: u64, kind: ExtentKind) -> BlobExtent {
        BlobExtent {
            start_sector: start_kib * 2,
            sector_count: kib * 2,
            kind,
        }
    }

    #[test]
    fn extents_back_to_back_are_written_as_one_and_land_where_they_belong() {
        use ExtentKind::{Data, Zero};
        let dev = MemDevice::new("t", 4 << 20);
        // Old content everywhere, so that zeros written (or not) show.
        dev.write_at(&vec![0xee; 4 << 20], 0).unwrap();
        // The target already reads zero here: a long zero run there is left alone.
        dev.write_at(&vec![0; 128 << 10], 2048 << 10).unwrap();
        let tracker = CbtTracker::in_memory(
            Counting {
                dev,
                writes: Mutex::new(Vec::new()),
            },
            TrackerConfig::default(),
        );
        let extents = vec![
            // A 16 KiB page whose zero run was cut out: one write.
            ext(0, 8, Data),
            ext(8, 4, Zero),
            ext(12, 4, Data),
            // Not adjacent: a write of its own.
            ext(64, 4, Data),
            // Longer than the join limit: written as it is.
            ext(512, 300, Data),
            // A long zero run, already zero on the target: not written.
            ext(2048, 128, Zero),
            // A long zero run over old content: written as zeros.
            ext(3000, 64, Zero),
            // Adjacent pieces that together pass the limit: two writes.
            ext(3500, 200, Data),
            ext(3700, 100, Data),
        ];
        let data_kib: u64 = extents
            .iter()
            .filter(|e| e.kind == Data)
            .map(|e| e.sector_count / 2)
            .sum();
        let data: Vec<u8> = (0..data_kib * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let zero = write_blob(&tracker, "k", &extents, &data).unwrap();
        assert_eq!(zero, vec![Extent::new(2048 * 2, 128 * 2)]);
        let writes = tracker.device().writes.lock().unwrap().clone();
        let kib = |(o, l): (u64, usize)| (o >> 10, l >> 10);
        assert_eq!(
            writes.into_iter().map(kib).collect::<Vec<_>>(),
            vec![
                (0, 16),
                (64, 4),
                (512, 300),
                (3000, 64),
                (3500, 200),
                (3700, 100)
            ]
        );
        // Every byte where the extents say.
        let disk = tracker.device().dev.snapshot();
        let mut pos = 0usize;
        for e in &extents {
            let at = (e.start_sector * SECTOR_SIZE) as usize;
            let len = (e.sector_count * SECTOR_SIZE) as usize;
            match e.kind {
                Data => {
                    assert_eq!(&disk[at..at + len], &data[pos..pos + len], "data at {at}");
                    pos += len;
                }
                Zero => assert!(disk[at..at + len].iter().all(|b| *b == 0), "zeros at {at}"),
            }
        }
        assert!(
            disk[16 << 10..64 << 10].iter().all(|b| *b == 0xee),
            "untouched between"
        );
    }
}
