//! The CBT-style change tracker: a [`BlockDevice`] wrapper that marks every write passing through
//! it, in epochs, and serves frozen point-in-time reads to the cycle that ships an epoch.
//!
//! # Epochs and freezing
//! Writes mark the *current* epoch's bitmap. [`CbtTracker::freeze`] atomically (under the tracker
//! lock, so no write is half-counted) moves that bitmap into a *frozen* epoch and starts a new,
//! empty current one. The cycle then reads the frozen sectors with
//! [`CbtTracker::read_frozen`]. [`CbtTracker::release`] ends the frozen epoch: dropped if the cycle
//! committed, merged back into the current epoch if it did not, so no mark is ever lost.
//!
//! # Point-in-time reads: copy-on-write
//! While an epoch is frozen, a write that would overwrite a frozen sector the cycle has not read
//! yet first copies the sector's old contents into the copy-on-write store (a file in the state
//! directory, or memory for trackers without one). `read_frozen` overlays those preserved sectors
//! on what the device holds, so the cycle ships the disk exactly as of the freeze while writes go
//! on. A sector is preserved at most once per freeze, and sectors the cycle has read are never
//! preserved, so the store holds at most the frozen sectors overwritten before the cycle got to
//! them, and never more than [`TrackerConfig::cow_bytes_max`]: past that the frozen epoch is
//! abandoned (its cycle fails with [`Error::CowExhausted`]) rather than failing the writer.
//!
//! # Persistence: checkpoint plus activity log
//! With a state directory, the bitmaps are checkpointed to `tracker.ckpt` at every freeze and
//! release. Between checkpoints, before the first write into each [`TrackerConfig::region_bytes`]
//! region the region's number is appended to `tracker.al` and fsynced (an activity log, as DRBD
//! does). On open after an unclean stop, every logged region is marked changed: recovery marks at
//! most a few regions too many and never misses a write. A frozen epoch found on open never
//! committed from the tracker's view and is merged back into the current one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::bitmap::{Extent, SECTOR_SIZE, SectorBitmap};
use crate::device::{BlockDevice, DeviceOp, check_range};
use crate::error::{Error, Result};
use crate::state::write_atomic;
pub use crate::tracker::OpenReport;
use crate::tracker::{ChangeTracker, Frozen, GENERATION_LEN, Generation};

const CKPT_MAGIC_V1: &[u8; 8] = b"RPLTRCK1";
const CKPT_MAGIC: &[u8; 8] = b"RPLTRCK2";
/// Longest lost-tracking reason kept in a checkpoint.
const LOST_REASON_BYTES_MAX: usize = 1024;
const AL_RECORD_LEN: usize = 16;
const AL_MAGIC: u32 = 0x4C41_5052; // "RPAL"
const CKPT_FILE: &str = "tracker.ckpt";
const AL_FILE: &str = "tracker.al";
const COW_FILE: &str = "tracker.cow";
/// Most bytes preserved per read and write when copying to the copy-on-write file. 1 MiB.
const PRESERVE_STEP_BYTES: u64 = 1 << 20;

/// Limits and granularity of a tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Activity-log granularity: a region is logged (one fsync) before its first write since the
    /// last checkpoint, and marked whole after an unclean stop. 4 MiB.
    pub region_bytes: u64,
    /// Most bytes the copy-on-write store may hold for one frozen epoch. 4 GiB.
    pub cow_bytes_max: u64,
    /// Activity-log records after which the tracker checkpoints on its own, bounding recovery
    /// over-marking and the log's size. 4096.
    pub al_records_max: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            region_bytes: 4 << 20,
            cow_bytes_max: 4 << 30,
            al_records_max: 4096,
        }
    }
}

#[derive(Debug)]
struct FrozenEpoch {
    epoch: u64,
    bitmap: SectorBitmap,
    /// Frozen sectors neither read by the cycle nor preserved yet.
    unread: SectorBitmap,
    /// Preserved old contents: start sector -> (sector count, location).
    cow: BTreeMap<u64, (u64, CowLoc)>,
    cow_bytes: u64,
    exhausted: bool,
    /// It was frozen while tracking was lost: a committed release clears the lost state.
    lost: bool,
}

#[derive(Debug)]
enum CowLoc {
    File(u64),
    Mem(Vec<u8>),
}

#[derive(Debug)]
struct Inner {
    epoch: u64,
    /// Bytes written into the current epoch (not persisted: a restart starts counting anew).
    bytes_written: u64,
    /// Why the marks cannot be trusted, until a committed cycle compared the whole disk.
    lost: Option<String>,
    current: SectorBitmap,
    frozen: Option<FrozenEpoch>,
    active_regions: BTreeSet<u64>,
    al: Option<File>,
    cow_file: Option<File>,
}

/// The CBT-style tracker over a device `D`.
#[derive(Debug)]
pub struct CbtTracker<D: BlockDevice> {
    dev: D,
    name: String,
    cfg: TrackerConfig,
    dir: Option<PathBuf>,
    generation: Generation,
    inner: Mutex<Inner>,
}

impl<D: BlockDevice> CbtTracker<D> {
    /// A tracker that remembers nothing across restarts (the target side, tests).
    pub fn in_memory(dev: D, cfg: TrackerConfig) -> Self {
        let sectors = dev.size_bytes() / SECTOR_SIZE;
        let name = format!("tracker({})", dev.name());
        CbtTracker {
            dev,
            name,
            cfg,
            dir: None,
            // Nothing persists, so nothing can be mistaken for it: a fixed generation.
            generation: Generation([0; GENERATION_LEN]),
            inner: Mutex::new(Inner {
                epoch: 1,
                bytes_written: 0,
                lost: None,
                current: SectorBitmap::new(sectors),
                frozen: None,
                active_regions: BTreeSet::new(),
                al: None,
                cow_file: None,
            }),
        }
    }

    /// Opens the tracker persisted in `dir` (created if new), recovering from an unclean stop.
    pub fn open(dev: D, dir: &Path, cfg: TrackerConfig) -> Result<(Self, OpenReport)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::state_io(dir, "cannot create the tracker directory", e))?;
        let sectors = dev.size_bytes() / SECTOR_SIZE;
        let mut report = OpenReport::default();
        let ckpt_path = dir.join(CKPT_FILE);
        // Whether the checkpoint on disk already says all that is opened (read whole, nothing
        // merged or recovered into it): then it is not written again.
        let mut unchanged = true;
        let ckpt = match std::fs::read(&ckpt_path) {
            Ok(bytes) => match decode_checkpoint(&bytes, &ckpt_path, sectors) {
                Ok(c) => c,
                // A resized or swapped device is the operator's to sort out, not ours to guess.
                Err(e @ Error::InvalidInput(_)) => return Err(e),
                Err(e) => {
                    // A damaged checkpoint: the marks are unknown, so tracking is lost and the
                    // next cycle compares checksums rather than re-seeding everything.
                    let reason = format!("the tracker checkpoint could not be read ({e})");
                    tracing::warn!(path = %ckpt_path.display(), %reason, "tracking lost");
                    unchanged = false;
                    Checkpoint {
                        generation: Generation::generate()?,
                        epoch: 1,
                        lost: Some(reason),
                        current: SectorBitmap::full(sectors),
                        frozen: None,
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                unchanged = false;
                Checkpoint {
                    generation: Generation::generate()?,
                    epoch: 1,
                    lost: None,
                    current: SectorBitmap::new(sectors),
                    frozen: None,
                }
            }
            Err(e) => return Err(Error::state_io(&ckpt_path, "cannot read", e)),
        };
        let Checkpoint {
            generation,
            epoch,
            lost,
            mut current,
            frozen,
        } = ckpt;
        report.lost = lost.clone();
        if let Some(frozen) = frozen {
            current.union_with(&frozen)?;
            report.frozen_merged = true;
            unchanged = false;
        }
        let al_path = dir.join(AL_FILE);
        let regions = read_activity_log(&al_path)?;
        // A log with anything in it is emptied by a checkpoint: its regions were merged above,
        // and a torn record would hide the records appended after it.
        if std::fs::metadata(&al_path).map_or(true, |m| m.len() != 0) {
            unchanged = false;
        }
        if !regions.is_empty() {
            report.unclean = true;
            report.regions_recovered = regions.len() as u64;
            for region in regions {
                let start = region.saturating_mul(cfg.region_bytes);
                if start >= dev.size_bytes() {
                    continue;
                }
                let len = cfg.region_bytes.min(dev.size_bytes() - start);
                current.mark_bytes(start, len)?;
            }
        }
        let al = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&al_path)
            .map_err(|e| Error::state_io(&al_path, "cannot open", e))?;
        let cow_path = dir.join(COW_FILE);
        let cow_file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&cow_path)
            .map_err(|e| Error::state_io(&cow_path, "cannot open", e))?;
        let name = format!("tracker({})", dev.name());
        let tracker = CbtTracker {
            dev,
            name,
            cfg,
            dir: Some(dir.to_path_buf()),
            generation,
            inner: Mutex::new(Inner {
                epoch,
                bytes_written: 0,
                lost,
                current,
                frozen: None,
                active_regions: BTreeSet::new(),
                al: Some(al),
                cow_file: Some(cow_file),
            }),
        };
        if !unchanged {
            let mut inner = tracker.lock();
            tracker.checkpoint_locked(&mut inner)?;
        }
        Ok((tracker, report))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device underneath.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Whether an epoch is frozen.
    pub fn is_frozen(&self) -> bool {
        self.lock().frozen.is_some()
    }

    /// Removes every mark of the current epoch and returns them (the target side, between
    /// cycles).
    pub fn take_current(&self) -> SectorBitmap {
        let mut inner = self.lock();
        let sectors = inner.current.disk_sectors();
        std::mem::replace(&mut inner.current, SectorBitmap::new(sectors))
    }

    /// Bytes held by the copy-on-write store for the frozen epoch.
    pub fn cow_bytes(&self) -> u64 {
        self.lock()
            .frozen
            .as_ref()
            .map(|f| f.cow_bytes)
            .unwrap_or(0)
    }

    fn cow_path(&self) -> PathBuf {
        self.dir
            .as_deref()
            .map(|d| d.join(COW_FILE))
            .unwrap_or_default()
    }

    fn checkpoint_locked(&self, inner: &mut Inner) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let bytes = encode_checkpoint(
            self.generation,
            inner.epoch,
            inner.lost.as_deref(),
            &inner.current,
            inner.frozen.as_ref().map(|f| &f.bitmap),
        );
        let path = dir.join(CKPT_FILE);
        write_atomic(&path, &bytes)?;
        if let Some(al) = inner.al.as_ref() {
            let al_path = dir.join(AL_FILE);
            al.set_len(0)
                .map_err(|e| Error::state_io(&al_path, "cannot truncate", e))?;
            al.sync_all()
                .map_err(|e| Error::state_io(&al_path, "cannot sync", e))?;
        }
        inner.active_regions.clear();
        Ok(())
    }

    /// Logs the regions of a write before it happens (persistent trackers only).
    fn log_regions(&self, inner: &mut Inner, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        if inner.al.is_none() || len_bytes == 0 {
            return Ok(());
        }
        let first = offset_bytes / self.cfg.region_bytes;
        let last = (offset_bytes + len_bytes - 1) / self.cfg.region_bytes;
        let new: Vec<u64> = (first..=last)
            .filter(|r| !inner.active_regions.contains(r))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        if inner.active_regions.len() as u64 + new.len() as u64 > self.cfg.al_records_max {
            self.checkpoint_locked(inner)?;
        }
        let al_path = self
            .dir
            .as_deref()
            .map(|d| d.join(AL_FILE))
            .unwrap_or_default();
        let mut records = Vec::with_capacity(new.len() * AL_RECORD_LEN);
        for r in &new {
            records.extend_from_slice(&al_record(*r));
        }
        if let Some(al) = inner.al.as_mut() {
            al.write_all(&records)
                .map_err(|e| Error::state_io(&al_path, "cannot append", e))?;
            al.sync_data()
                .map_err(|e| Error::state_io(&al_path, "cannot sync", e))?;
        }
        inner.active_regions.extend(new);
        Ok(())
    }

    /// Preserves the frozen, unread sectors that a write to `[offset, offset+len)` would overwrite.
    fn preserve(&self, inner: &mut Inner, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let Inner {
            frozen, cow_file, ..
        } = inner;
        let Some(frozen) = frozen.as_mut() else {
            return Ok(());
        };
        if frozen.exhausted || len_bytes == 0 {
            return Ok(());
        }
        let start = offset_bytes / SECTOR_SIZE;
        let end = (offset_bytes + len_bytes).div_ceil(SECTOR_SIZE);
        let runs: Vec<Extent> = frozen.unread.extents_within(start, end - start).collect();
        for run in runs {
            if frozen.cow_bytes + run.len_bytes() > self.cfg.cow_bytes_max {
                // Give up the frozen epoch rather than fail the writer.
                frozen.exhausted = true;
                frozen.cow.clear();
                return Ok(());
            }
            let loc = match cow_file.as_ref() {
                Some(file) => {
                    // The file is emptied at every freeze and only appended to since. Copied in
                    // bounded steps: a discard can cover far more than any write buffer.
                    let at = frozen.cow_bytes;
                    let mut old = vec![0u8; run.len_bytes().min(PRESERVE_STEP_BYTES) as usize];
                    let mut done = 0;
                    while done < run.len_bytes() {
                        let n = (run.len_bytes() - done).min(PRESERVE_STEP_BYTES) as usize;
                        self.dev.read_at(&mut old[..n], run.offset_bytes() + done)?;
                        file.write_all_at(&old[..n], at + done).map_err(|e| {
                            Error::state_io(self.cow_path(), "cannot preserve sectors", e)
                        })?;
                        done += n as u64;
                    }
                    CowLoc::File(at)
                }
                None => {
                    let mut old = vec![0u8; run.len_bytes() as usize];
                    self.dev.read_at(&mut old, run.offset_bytes())?;
                    CowLoc::Mem(old)
                }
            };
            frozen.cow.insert(run.start_sector, (run.sector_count, loc));
            frozen.cow_bytes += run.len_bytes();
            frozen
                .unread
                .clear_sectors(run.start_sector, run.sector_count)?;
        }
        Ok(())
    }

    /// Writes through the tracker like [`BlockDevice::write_at`] and returns the epoch the write
    /// was marked in: it ships in the cycle that freezes that epoch.
    pub fn write_tracked(&self, buf: &[u8], offset_bytes: u64) -> Result<u64> {
        check_range(self, DeviceOp::Write, offset_bytes, buf.len() as u64)?;
        let mut inner = self.lock();
        self.log_regions(&mut inner, offset_bytes, buf.len() as u64)?;
        self.preserve(&mut inner, offset_bytes, buf.len() as u64)?;
        self.dev.write_at(buf, offset_bytes)?;
        inner.current.mark_bytes(offset_bytes, buf.len() as u64)?;
        inner.bytes_written = inner.bytes_written.saturating_add(buf.len() as u64);
        Ok(inner.epoch)
    }

    /// Discards through the tracker like [`BlockDevice::discard`]: the range is marked (and the
    /// frozen sectors it covers preserved first) like a write, so the next cycle ships it as the
    /// zeros it now reads as. Returns the epoch it was marked in.
    pub fn discard_tracked(&self, offset_bytes: u64, len_bytes: u64) -> Result<u64> {
        check_range(self, DeviceOp::Discard, offset_bytes, len_bytes)?;
        let mut inner = self.lock();
        if len_bytes == 0 {
            return Ok(inner.epoch);
        }
        self.log_regions(&mut inner, offset_bytes, len_bytes)?;
        self.preserve(&mut inner, offset_bytes, len_bytes)?;
        self.dev.discard(offset_bytes, len_bytes)?;
        inner.current.mark_bytes(offset_bytes, len_bytes)?;
        inner.bytes_written = inner.bytes_written.saturating_add(len_bytes);
        Ok(inner.epoch)
    }
}

impl<D: BlockDevice> ChangeTracker for CbtTracker<D> {
    fn kind(&self) -> &'static str {
        "cbt"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn disk_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }

    fn generation(&self) -> Generation {
        self.generation
    }

    fn epoch(&self) -> Result<u64> {
        Ok(self.lock().epoch)
    }

    fn current(&self) -> Result<SectorBitmap> {
        Ok(self.lock().current.clone())
    }

    fn mark_all(&self) -> Result<()> {
        let mut inner = self.lock();
        let sectors = inner.current.disk_sectors();
        inner.current = SectorBitmap::full(sectors);
        self.checkpoint_locked(&mut inner)
    }

    fn carry(&self, sectors: &SectorBitmap) -> Result<()> {
        let mut inner = self.lock();
        inner.current.union_with(sectors)?;
        self.checkpoint_locked(&mut inner)
    }

    fn freeze(&self) -> Result<Frozen> {
        let mut inner = self.lock();
        if let Some(f) = &inner.frozen {
            return Err(Error::InvalidInput(format!(
                "{}: epoch {} is already frozen by a running cycle",
                self.name, f.epoch
            )));
        }
        // What the cycle ships must be durable on the source first: once the freeze checkpoints,
        // the marks are gone, and a crash that dropped a cached write would leave the target
        // holding data the source no longer has, with nothing marked to repair it.
        self.dev.flush()?;
        let sectors = inner.current.disk_sectors();
        if inner.lost.is_some() {
            inner.current = SectorBitmap::full(sectors);
        }
        let bitmap = std::mem::replace(&mut inner.current, SectorBitmap::new(sectors));
        let epoch = inner.epoch;
        let lost = inner.lost.clone();
        let bytes_written = std::mem::take(&mut inner.bytes_written);
        inner.epoch += 1;
        inner.frozen = Some(FrozenEpoch {
            epoch,
            unread: bitmap.clone(),
            bitmap: bitmap.clone(),
            cow: BTreeMap::new(),
            cow_bytes: 0,
            exhausted: false,
            lost: lost.is_some(),
        });
        if let Some(f) = inner.cow_file.as_ref() {
            f.set_len(0)
                .map_err(|e| Error::state_io(self.cow_path(), "cannot reset", e))?;
        }
        self.checkpoint_locked(&mut inner)?;
        Ok(Frozen {
            epoch,
            bitmap,
            lost,
            bytes_written: Some(bytes_written),
        })
    }

    /// Reads `buf.len()` bytes at `offset_bytes` as they were when the epoch was frozen. Every
    /// sector of the range must be in the frozen bitmap. Those sectors need no preserving after.
    fn read_frozen(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        if !offset_bytes.is_multiple_of(SECTOR_SIZE)
            || !(buf.len() as u64).is_multiple_of(SECTOR_SIZE)
        {
            return Err(Error::InvalidInput(format!(
                "{}: frozen reads must be sector-aligned (offset {offset_bytes}, length {})",
                self.name,
                buf.len()
            )));
        }
        let epoch = {
            let inner = self.lock();
            let Some(frozen) = inner.frozen.as_ref() else {
                return Err(Error::InvalidInput(format!(
                    "{}: no epoch is frozen",
                    self.name
                )));
            };
            frozen.epoch
        };
        // The device is read without the lock, so that several reads (and writers) proceed at
        // once. A write meanwhile to a sector of this range preserves the sector's frozen
        // content first (it is still unread), and that preserved copy is laid over the buffer
        // below, under the lock: the result is the disk as of the freeze either way.
        self.dev.read_at(buf, offset_bytes)?;
        let mut inner = self.lock();
        let Inner {
            frozen, cow_file, ..
        } = &mut *inner;
        let Some(frozen) = frozen.as_mut().filter(|f| f.epoch == epoch) else {
            return Err(Error::InvalidInput(format!(
                "{}: the frozen epoch {epoch} ended while it was being read",
                self.name
            )));
        };
        if frozen.exhausted {
            return Err(Error::CowExhausted {
                limit_bytes: self.cfg.cow_bytes_max,
            });
        }
        let start = offset_bytes / SECTOR_SIZE;
        let count = buf.len() as u64 / SECTOR_SIZE;
        let end = start + count;
        // Overlay preserved sectors overlapping [start, end).
        let first_key = frozen
            .cow
            .range(..=start)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(start);
        for (&cow_start, (cow_count, loc)) in frozen.cow.range(first_key..end) {
            let cow_end = cow_start + cow_count;
            let lo = cow_start.max(start);
            let hi = cow_end.min(end);
            if lo >= hi {
                continue;
            }
            let dst = &mut buf
                [((lo - start) * SECTOR_SIZE) as usize..((hi - start) * SECTOR_SIZE) as usize];
            let skip = (lo - cow_start) * SECTOR_SIZE;
            match loc {
                CowLoc::Mem(bytes) => {
                    dst.copy_from_slice(&bytes[skip as usize..skip as usize + dst.len()])
                }
                CowLoc::File(at) => {
                    let file = cow_file.as_ref().ok_or_else(|| {
                        Error::state(self.cow_path(), "copy-on-write file missing")
                    })?;
                    file.read_exact_at(dst, at + skip).map_err(|e| {
                        Error::state_io(self.cow_path(), "cannot read preserved sectors", e)
                    })?;
                }
            }
        }
        frozen.unread.clear_sectors(start, count)?;
        Ok(())
    }

    /// Ends the frozen epoch. `committed`: the cycle is safely in the cache (its sectors are
    /// remembered elsewhere), so they are dropped; otherwise they go back into the current epoch.
    fn release(&self, committed: bool) -> Result<()> {
        let mut inner = self.lock();
        let Some(frozen) = inner.frozen.take() else {
            return Ok(());
        };
        if !committed {
            inner.current.union_with(&frozen.bitmap)?;
        } else if frozen.lost {
            // The cycle that saw the loss shipped the whole disk's differences.
            inner.lost = None;
        }
        if let Some(f) = inner.cow_file.as_ref() {
            f.set_len(0)
                .map_err(|e| Error::state_io(self.cow_path(), "cannot reset", e))?;
        }
        self.checkpoint_locked(&mut inner)
    }

    fn checkpoint(&self) -> Result<()> {
        let mut inner = self.lock();
        self.checkpoint_locked(&mut inner)
    }
}

super::write_through_device!(CbtTracker);

fn al_record(region: u64) -> [u8; AL_RECORD_LEN] {
    let mut r = [0u8; AL_RECORD_LEN];
    r[0..4].copy_from_slice(&AL_MAGIC.to_le_bytes());
    r[4..12].copy_from_slice(&region.to_le_bytes());
    let crc = crc32fast::hash(&r[0..12]);
    r[12..16].copy_from_slice(&crc.to_le_bytes());
    r
}

/// Reads the regions of valid activity-log records; a torn or damaged tail is ignored (the write
/// it announced never started, since writes wait for the record's fsync).
fn read_activity_log(path: &Path) -> Result<Vec<u64>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(|e| Error::state_io(path, "cannot read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::state_io(path, "cannot open", e)),
    }
    let mut regions = Vec::new();
    for rec in bytes.chunks_exact(AL_RECORD_LEN) {
        let magic = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let crc = u32::from_le_bytes([rec[12], rec[13], rec[14], rec[15]]);
        if magic != AL_MAGIC || crc != crc32fast::hash(&rec[0..12]) {
            break;
        }
        let mut region = [0u8; 8];
        region.copy_from_slice(&rec[4..12]);
        regions.push(u64::from_le_bytes(region));
    }
    Ok(regions)
}

/// The contents of a checkpoint file (`tracker.ckpt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The tracker state's generation.
    pub generation: Generation,
    /// The current epoch's number.
    pub epoch: u64,
    /// Why tracking is lost, if it is.
    pub lost: Option<String>,
    /// The current epoch's marks.
    pub current: SectorBitmap,
    /// A frozen epoch's marks, if one was frozen.
    pub frozen: Option<SectorBitmap>,
}

/// Parses checkpoint bytes for a disk of `disk_sectors` sectors (public for the fuzz target).
/// A checkpoint written before generations gets a new random generation.
pub fn parse_checkpoint(bytes: &[u8], disk_sectors: u64) -> Result<Checkpoint> {
    decode_checkpoint(bytes, Path::new(CKPT_FILE), disk_sectors)
}

/// The bytes of a checkpoint (public for the fuzz target and its seeds).
pub fn checkpoint_bytes(c: &Checkpoint) -> Vec<u8> {
    encode_checkpoint(
        c.generation,
        c.epoch,
        c.lost.as_deref(),
        &c.current,
        c.frozen.as_ref(),
    )
}

fn encode_checkpoint(
    generation: Generation,
    epoch: u64,
    lost: Option<&str>,
    current: &SectorBitmap,
    frozen: Option<&SectorBitmap>,
) -> Vec<u8> {
    let cur = current.encode();
    let fro = frozen.map(|f| f.encode());
    let mut reason = lost.unwrap_or("").as_bytes();
    if reason.len() > LOST_REASON_BYTES_MAX {
        reason = &reason[..LOST_REASON_BYTES_MAX];
    }
    let mut out =
        Vec::with_capacity(64 + reason.len() + cur.len() + fro.as_ref().map_or(0, Vec::len));
    out.extend_from_slice(CKPT_MAGIC);
    out.extend_from_slice(&generation.0);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.push(u8::from(lost.is_some()));
    out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(&(cur.len() as u64).to_le_bytes());
    out.extend_from_slice(&cur);
    match &fro {
        Some(f) => {
            out.push(1);
            out.extend_from_slice(&(f.len() as u64).to_le_bytes());
            out.extend_from_slice(f);
        }
        None => out.push(0),
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a checkpoint (`RPLTRCK2`, or `RPLTRCK1` from before generations, which gets a new
/// one). Damage is [`Error::State`]; bitmaps for another disk size are [`Error::InvalidInput`].
fn decode_checkpoint(bytes: &[u8], path: &Path, sectors: u64) -> Result<Checkpoint> {
    let bad = |why: &str| Error::state(path, format!("damaged tracker checkpoint: {why}"));
    if bytes.len() < 8 + 8 + 8 + 1 + 4 {
        return Err(bad("too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if stored != crc32fast::hash(body) {
        return Err(bad("checksum mismatch"));
    }
    let v2 = match &body[0..8] {
        m if m == CKPT_MAGIC => true,
        m if m == CKPT_MAGIC_V1 => false,
        _ => return Err(bad("bad magic")),
    };
    let mut pos = 8;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let s = body
            .get(*pos..pos.saturating_add(n))
            .ok_or_else(|| bad("truncated"))?;
        *pos += n;
        Ok(s)
    };
    let take_u64 = |pos: &mut usize| -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(take(pos, 8)?);
        Ok(u64::from_le_bytes(a))
    };
    let (generation, epoch, lost) = if v2 {
        let mut g = [0u8; GENERATION_LEN];
        g.copy_from_slice(take(&mut pos, GENERATION_LEN)?);
        let epoch = take_u64(&mut pos)?;
        let flag = take(&mut pos, 1)?[0];
        let mut len = [0u8; 4];
        len.copy_from_slice(take(&mut pos, 4)?);
        let len = u32::from_le_bytes(len) as usize;
        if len > LOST_REASON_BYTES_MAX {
            return Err(bad("lost reason too long"));
        }
        let reason = String::from_utf8_lossy(take(&mut pos, len)?).into_owned();
        let lost = match flag {
            0 => None,
            1 => Some(reason),
            _ => return Err(bad("bad lost flag")),
        };
        (Generation(g), epoch, lost)
    } else {
        (Generation::generate()?, take_u64(&mut pos)?, None)
    };
    let cur_len = usize::try_from(take_u64(&mut pos)?).map_err(|_| bad("length overflow"))?;
    let cur_bytes = take(&mut pos, cur_len)?;
    let current =
        SectorBitmap::decode(cur_bytes).map_err(|e| bad(&format!("current bitmap: {e}")))?;
    let has_frozen = take(&mut pos, 1)?[0];
    let frozen = match has_frozen {
        0 => None,
        1 => {
            let len = usize::try_from(take_u64(&mut pos)?).map_err(|_| bad("length overflow"))?;
            let fb = take(&mut pos, len)?;
            Some(SectorBitmap::decode(fb).map_err(|e| bad(&format!("frozen bitmap: {e}")))?)
        }
        _ => return Err(bad("bad frozen flag")),
    };
    if pos != body.len() {
        return Err(bad("trailing bytes"));
    }
    for b in std::iter::once(&current).chain(frozen.iter()) {
        if b.disk_sectors() != sectors {
            return Err(Error::InvalidInput(format!(
                "{}: it tracks a disk of {} sectors but the device has {sectors}; was the device \
                 resized or swapped? Use the state directory that belongs to this disk",
                path.display(),
                b.disk_sectors()
            )));
        }
    }
    Ok(Checkpoint {
        generation,
        epoch,
        lost,
        current,
        frozen,
    })
}
