//! The tracker conformance suite: one model-based check of the [`ChangeTracker`] contract that
//! every tracker must pass, whatever its kind (as `replicator_sink::conformance` is for sinks).
//!
//! A tracker's tests wrap it in a [`TrackerFixture`] (how to write through it, wait for it, restart
//! it, read the device underneath) and call [`run`] for many seeds. [`run`] drives one seeded
//! random sequence of operations against the tracker and a trivial model — the content of every
//! sector written (a `BTreeMap` from sector to bytes) and, per epoch, the set of sectors that must
//! be marked — and checks after every step:
//!
//! - a freeze's bitmap covers every sector written since the previous committed freeze, plus
//!   every sector carried back or marked by `mark_all`; and holds nothing else (no write lands in
//!   the wrong epoch), unless [`Capabilities::exact_after_crash`] says a crash's recovery may
//!   over-mark and a crash happened since;
//! - freezes return strictly increasing epochs, and the new epoch starts empty;
//! - frozen reads return each sector as it was at the freeze ([`FrozenReads::PointInTime`]; for
//!   [`FrozenReads::PointInTimeForWrites`] only the sectors written since the last committed
//!   freeze), or else the live content (which was then written after the freeze, so it is in the
//!   current epoch and ships again);
//! - the current epoch holds every sector written, carried or returned by an uncommitted release
//!   since the last committed freeze (no mark is lost), and nothing else when it must be exact;
//! - the device holds what was written, after every write and every restart;
//! - marks survive clean and crash restarts; a frozen epoch found after a restart is merged back;
//!   a tracker that reports [`Frozen::lost`](super::Frozen::lost) marks the whole disk, and only
//!   does so where [`Capabilities::lost_after_crash`] allows; the generation never changes.
//!
//! A failure names the seed, the step and the sector; the same seed repeats the same run. The
//! generator is a fixed SplitMix64 written out here, so a seed reproduces its run whatever
//! version of any random-number crate is in use, and the module needs no dependency.
//!
//! The fixture's disk should be small (1 to 8 MiB): `mark_all` makes a cycle read all of it, and
//! writes land anywhere on it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use crate::bitmap::{Extent, SECTOR_SIZE, SectorBitmap};
use crate::error::{Error, Result};
use crate::tracker::{ChangeTracker, Generation};

/// What the frozen reads of a tracker promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrozenReads {
    /// Every frozen sector reads as it was at the freeze (CBT: copy-on-write).
    PointInTime,
    /// Sectors written through the tracker since the last committed freeze read as they were at
    /// the freeze; sectors marked otherwise (carried back, `mark_all`) may read live (HRL while
    /// its log is under its limit: those come from the device).
    PointInTimeForWrites,
    /// Frozen sectors may read live (the kernel tracker; HRL once its log overflowed).
    Live,
}

/// Where trackers really differ. Every check runs on every tracker; a capability only changes
/// what a check expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// What frozen reads return.
    pub frozen_reads: FrozenReads,
    /// The tracker can be restarted (it is persistent): the suite then restarts it, cleanly and
    /// by crashing it.
    pub restarts: bool,
    /// After a crash the marks are exactly the writes. Without it, recovery may over-mark (CBT
    /// marks whole activity-log regions) until the next freeze, but never under-mark.
    pub exact_after_crash: bool,
    /// A crash restart may lose tracking (reported in `Frozen::lost`, with the whole disk
    /// marked). Without it, a tracker that reports lost tracking fails the suite (nothing here
    /// damages its state).
    pub lost_after_crash: bool,
}

/// What [`run`] drives: a tracker over a device, and how to write, wait and restart.
///
/// The suite takes the tracker anew from [`TrackerFixture::tracker`] for every call and never
/// keeps it across a restart, so a fixture may drop and reopen it.
pub trait TrackerFixture {
    /// The tracker as it is now.
    fn tracker(&self) -> Arc<dyn ChangeTracker>;

    /// Writes `data` at `offset_bytes` (any alignment) the way the tracked disk is written: through
    /// the tracker for in-process trackers, to the device for trackers that watch it.
    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<()>;

    /// Discards `len_bytes` at `offset_bytes` the way the tracked disk is discarded (through the
    /// tracker's [`BlockDevice::discard`](crate::device::BlockDevice::discard), or on the
    /// device); afterwards the range reads as zeros. The default writes zeros with
    /// [`TrackerFixture::write`].
    fn discard(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let zeros = vec![0u8; usize::try_from(len_bytes).unwrap_or(usize::MAX)];
        self.write(offset_bytes, &zeros)
    }

    /// Waits until the tracker has seen every completed write. A no-op for in-process trackers.
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }

    /// Stops the tracker cleanly and opens it again.
    fn restart_clean(&mut self) -> Result<()> {
        Err(Error::InvalidInput(
            "this tracker fixture cannot restart".into(),
        ))
    }

    /// Drops the tracker without a clean stop (a crash) and opens it again.
    fn crash_restart(&mut self) -> Result<()> {
        Err(Error::InvalidInput(
            "this tracker fixture cannot restart".into(),
        ))
    }

    /// Reads the device underneath (not through the frozen view).
    fn read_device(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()>;

    /// What this tracker promises.
    fn capabilities(&self) -> Capabilities;
}

/// A broken promise: the seed and step that show it, and what was seen.
#[derive(Debug, thiserror::Error)]
#[error(
    "tracker conformance failed for {tracker}: seed {seed}, step {step} ({op}): {detail} \
     (run the suite with seed {seed} to repeat it)"
)]
pub struct ConformanceFailure {
    /// The tracker's kind and name.
    pub tracker: String,
    /// The seed of the run.
    pub seed: u64,
    /// The step (0-based) at which the check failed.
    pub step: usize,
    /// The step's operation.
    pub op: String,
    /// What was expected and what was seen, naming the sector.
    pub detail: String,
}

/// SplitMix64: tiny, fixed, good enough to pick operations.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// A discard: the range reads as zeros afterwards, and is marked like a write.
    Discard {
        offset_bytes: u64,
        len_bytes: u64,
    },
    Freeze,
    /// Reads this many of the frozen epoch's unread extents (each in random sector-aligned
    /// pieces).
    ReadFrozen {
        extents: usize,
    },
    /// A committed release first reads every frozen sector left, as a cycle does.
    Release {
        committed: bool,
    },
    /// Carries back the pending committed bitmap at this index and every later one (the target
    /// failed that cycle, and the later ones chain on it).
    Carry {
        from: usize,
    },
    /// The target acknowledged the pending committed epoch at this index and every earlier one.
    Acknowledge {
        upto: usize,
    },
    MarkAll,
    Checkpoint,
    RestartClean,
    CrashRestart,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write {
                offset_bytes,
                len_bytes,
            } => write!(
                f,
                "write {len_bytes} bytes at offset {offset_bytes} (sectors {}..{})",
                offset_bytes / SECTOR_SIZE,
                (offset_bytes + len_bytes).div_ceil(SECTOR_SIZE)
            ),
            Op::Discard {
                offset_bytes,
                len_bytes,
            } => write!(
                f,
                "discard {len_bytes} bytes at offset {offset_bytes} (sectors {}..{})",
                offset_bytes / SECTOR_SIZE,
                (offset_bytes + len_bytes).div_ceil(SECTOR_SIZE)
            ),
            Op::Freeze => f.write_str("freeze"),
            Op::ReadFrozen { extents } => write!(f, "read {extents} frozen extents"),
            Op::Release { committed: true } => f.write_str("read the rest and release committed"),
            Op::Release { committed: false } => f.write_str("release not committed"),
            Op::Carry { from } => write!(f, "carry pending committed bitmaps from #{from}"),
            Op::Acknowledge { upto } => {
                write!(f, "acknowledge pending committed epochs to #{upto}")
            }
            Op::MarkAll => f.write_str("mark all"),
            Op::Checkpoint => f.write_str("checkpoint"),
            Op::RestartClean => f.write_str("clean restart"),
            Op::CrashRestart => f.write_str("crash restart"),
        }
    }
}

/// What must be marked in one epoch.
#[derive(Clone, Debug, Default)]
struct Marks {
    /// Sectors written through the tracker.
    written: BTreeSet<u64>,
    /// Sectors carried back.
    carried: BTreeSet<u64>,
    /// `mark_all` (or a lost frozen epoch released back): every sector.
    all: bool,
    /// Recovery after a crash may have marked more than this.
    inexact: bool,
}

impl Marks {
    fn absorb(&mut self, other: Marks) {
        self.written.extend(other.written);
        self.carried.extend(other.carried);
        self.all |= other.all;
        self.inexact |= other.inexact;
    }

    fn contains(&self, sector: u64) -> bool {
        self.all || self.written.contains(&sector) || self.carried.contains(&sector)
    }
}

type Content = BTreeMap<u64, Rc<[u8]>>;

#[derive(Debug)]
struct FrozenModel {
    epoch: u64,
    /// What must be in it.
    expect: Marks,
    /// What the tracker returned.
    bitmap: SectorBitmap,
    /// Sectors not read yet.
    unread: SectorBitmap,
    /// The content of every sector written before the freeze, as of the freeze.
    snapshot: Content,
    lost: bool,
}

struct Suite<'a> {
    fx: &'a mut dyn TrackerFixture,
    caps: Capabilities,
    rng: SplitMix,
    seed: u64,
    step: usize,
    op: String,
    name: String,
    disk_sectors: u64,
    generation: Generation,
    /// Content of every sector written so far.
    content: Content,
    /// Content of a sector before its first write (read from the device then).
    initial: Content,
    /// The step that last wrote each sector, for messages.
    written_at: BTreeMap<u64, usize>,
    current: Marks,
    frozen: Option<FrozenModel>,
    /// Committed frozen epochs not yet acknowledged nor carried: (epoch, bitmap).
    pending: Vec<(u64, SectorBitmap)>,
    last_epoch: Option<u64>,
    /// A crash happened that may have lost tracking; cleared by a committed lost freeze.
    lost_allowed: bool,
}

/// Runs `ops` seeded random operations against the fixture's tracker and the model, checking the
/// contract after each (see the module documentation). The tracker must start with no frozen
/// epoch; marks it holds at the start are allowed in the first freeze.
pub fn run(
    fixture: &mut dyn TrackerFixture,
    seed: u64,
    ops: usize,
) -> std::result::Result<(), ConformanceFailure> {
    let tracker = fixture.tracker();
    let name = format!("{} tracker {}", tracker.kind(), tracker.name());
    let disk_sectors = tracker.disk_bytes() / SECTOR_SIZE;
    let generation = tracker.generation();
    // Marks the tracker holds already ship in the first freeze; without any, it must be exact.
    let starts_marked = tracker.current().map(|b| !b.is_empty()).unwrap_or(true);
    drop(tracker);
    let caps = fixture.capabilities();
    let mut suite = Suite {
        fx: fixture,
        caps,
        rng: SplitMix(seed),
        seed,
        step: 0,
        op: "start".into(),
        name,
        disk_sectors,
        generation,
        content: BTreeMap::new(),
        initial: BTreeMap::new(),
        written_at: BTreeMap::new(),
        current: Marks {
            inexact: starts_marked,
            ..Marks::default()
        },
        frozen: None,
        pending: Vec::new(),
        last_epoch: None,
        lost_allowed: false,
    };
    if disk_sectors == 0 {
        return Err(suite.fail("the tracked disk has no sectors".into()));
    }
    for step in 0..ops {
        suite.step = step;
        let op = suite.pick();
        suite.op = op.to_string();
        suite.apply(op)?;
        suite.check_current()?;
    }
    Ok(())
}

impl Suite<'_> {
    fn fail(&self, detail: String) -> ConformanceFailure {
        ConformanceFailure {
            tracker: self.name.clone(),
            seed: self.seed,
            step: self.step,
            op: self.op.clone(),
            detail,
        }
    }

    /// An error from the tracker or the fixture where none is allowed.
    fn io<T>(&self, what: &str, r: Result<T>) -> std::result::Result<T, ConformanceFailure> {
        r.map_err(|e| self.fail(format!("{what} failed: {e}")))
    }

    fn tracker(&self) -> Arc<dyn ChangeTracker> {
        self.fx.tracker()
    }

    fn pick(&mut self) -> Op {
        let restarts = self.caps.restarts;
        loop {
            let roll = self.rng.below(100);
            let op = match roll {
                0..=44 => match self.pick_write() {
                    // One in eight turns into a discard of the same range (its length in whole
                    // sectors most of the time, as discards usually are).
                    Op::Write {
                        offset_bytes,
                        len_bytes,
                    } if self.rng.chance(12) => Op::Discard {
                        offset_bytes,
                        len_bytes,
                    },
                    op => op,
                },
                45..=54 => Op::Freeze,
                55..=64 => Op::ReadFrozen {
                    extents: self.rng.range(1, 8) as usize,
                },
                65..=72 => Op::Release { committed: true },
                73..=76 => Op::Release { committed: false },
                77..=80 => Op::Carry {
                    from: self.rng.below(self.pending.len().max(1) as u64) as usize,
                },
                81..=86 => Op::Acknowledge {
                    upto: self.rng.below(self.pending.len().max(1) as u64) as usize,
                },
                87 => Op::MarkAll,
                88..=90 => Op::Checkpoint,
                91..=94 if restarts => Op::RestartClean,
                95..=99 if restarts => Op::CrashRestart,
                _ => continue,
            };
            return op;
        }
    }

    fn pick_write(&mut self) -> Op {
        let disk_bytes = self.disk_sectors * SECTOR_SIZE;
        // Half the writes land in a small hot region, so they overlap.
        let window = if self.rng.chance(50) {
            (64 * SECTOR_SIZE).min(disk_bytes)
        } else {
            disk_bytes
        };
        let (offset_bytes, len_bytes) = match self.rng.below(10) {
            // Sector-aligned, whole sectors.
            0..=4 => (
                self.rng.below(window / SECTOR_SIZE) * SECTOR_SIZE,
                self.rng.range(1, 16) * SECTOR_SIZE,
            ),
            // Aligned start, a length that is not a whole number of sectors.
            5..=6 => (
                self.rng.below(window / SECTOR_SIZE) * SECTOR_SIZE,
                self.rng.range(0, 8) * SECTOR_SIZE + self.rng.range(1, SECTOR_SIZE - 1),
            ),
            // Anything.
            _ => (self.rng.below(window), self.rng.range(1, 8192)),
        };
        let offset_bytes = offset_bytes.min(disk_bytes - 1);
        Op::Write {
            offset_bytes,
            len_bytes: len_bytes.min(disk_bytes - offset_bytes),
        }
    }

    fn apply(&mut self, op: Op) -> std::result::Result<(), ConformanceFailure> {
        match op {
            Op::Write {
                offset_bytes,
                len_bytes,
            } => self.write(offset_bytes, len_bytes, false),
            Op::Discard {
                offset_bytes,
                len_bytes,
            } => self.write(offset_bytes, len_bytes, true),
            Op::Freeze => self.freeze(),
            Op::ReadFrozen { extents } => self.read_frozen(extents),
            Op::Release { committed } => self.release(committed),
            Op::Carry { from } => self.carry(from),
            Op::Acknowledge { upto } => self.acknowledge(upto),
            Op::MarkAll => {
                let r = self.tracker().mark_all();
                self.io("mark_all", r)?;
                self.current.all = true;
                Ok(())
            }
            Op::Checkpoint => {
                let r = self.tracker().checkpoint();
                self.io("checkpoint", r)
            }
            Op::RestartClean => self.restart(false),
            Op::CrashRestart => self.restart(true),
        }
    }

    /// The content of `sector` now, if it was ever written.
    fn now(&self, sector: u64) -> Option<&Rc<[u8]>> {
        self.content.get(&sector)
    }

    /// A write of random bytes, or a discard (`zeros`): the model sees a write of zeros.
    fn write(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        zeros: bool,
    ) -> std::result::Result<(), ConformanceFailure> {
        let first = offset_bytes / SECTOR_SIZE;
        let end = (offset_bytes + len_bytes).div_ceil(SECTOR_SIZE);
        // Remember what a sector held before its first write.
        for s in first..end {
            if !self.content.contains_key(&s) && !self.initial.contains_key(&s) {
                let mut buf = vec![0u8; SECTOR_SIZE as usize];
                let r = self.fx.read_device(&mut buf, s * SECTOR_SIZE);
                self.io("reading the device", r)?;
                self.initial.insert(s, buf.into());
            }
        }
        let mut data = vec![0u8; len_bytes as usize];
        if zeros {
            let r = self.fx.discard(offset_bytes, len_bytes);
            self.io("the discard", r)?;
        } else {
            self.rng.fill(&mut data);
            let r = self.fx.write(offset_bytes, &data);
            self.io("the write", r)?;
        }
        let r = self.fx.settle();
        self.io("settle", r)?;
        for s in first..end {
            let base = self
                .content
                .get(&s)
                .or_else(|| self.initial.get(&s))
                .map(|b| b.to_vec())
                .unwrap_or_else(|| vec![0u8; SECTOR_SIZE as usize]);
            let mut sector = base;
            let lo = (s * SECTOR_SIZE).max(offset_bytes);
            let hi = ((s + 1) * SECTOR_SIZE).min(offset_bytes + len_bytes);
            sector[(lo - s * SECTOR_SIZE) as usize..(hi - s * SECTOR_SIZE) as usize]
                .copy_from_slice(&data[(lo - offset_bytes) as usize..(hi - offset_bytes) as usize]);
            self.content.insert(s, sector.into());
            self.current.written.insert(s);
            self.written_at.insert(s, self.step);
        }
        self.check_device(first, end)
    }

    /// The device holds the model's content over `[first, end)` (sectors ever written).
    fn check_device(&self, first: u64, end: u64) -> std::result::Result<(), ConformanceFailure> {
        let mut buf = vec![0u8; SECTOR_SIZE as usize];
        for (&s, want) in self.content.range(first..end) {
            let r = self.fx.read_device(&mut buf, s * SECTOR_SIZE);
            self.io("reading the device", r)?;
            if buf[..] != want[..] {
                return Err(self.fail(format!(
                    "sector {s} on the device does not hold what step {} wrote there",
                    self.written_at.get(&s).copied().unwrap_or(0)
                )));
            }
        }
        Ok(())
    }

    fn freeze(&mut self) -> std::result::Result<(), ConformanceFailure> {
        let result = self.tracker().freeze();
        if let Some(f) = &self.frozen {
            if result.is_ok() {
                return Err(self.fail(format!(
                    "a second freeze succeeded while epoch {} was frozen",
                    f.epoch
                )));
            }
            return Ok(());
        }
        let frozen = self.io("freeze", result)?;
        if let Some(last) = self.last_epoch
            && frozen.epoch <= last
        {
            return Err(self.fail(format!(
                "freeze returned epoch {} after epoch {last}: epochs must increase",
                frozen.epoch
            )));
        }
        self.last_epoch = Some(frozen.epoch);
        let now = self.tracker().epoch();
        let now = self.io("epoch", now)?;
        if now <= frozen.epoch {
            return Err(self.fail(format!(
                "the current epoch is {now} after freezing epoch {}",
                frozen.epoch
            )));
        }
        if frozen.bitmap.disk_sectors() != self.disk_sectors {
            return Err(self.fail(format!(
                "the frozen bitmap is for {} sectors, the disk has {}",
                frozen.bitmap.disk_sectors(),
                self.disk_sectors
            )));
        }
        let expect = std::mem::take(&mut self.current);
        if let Some(reason) = &frozen.lost {
            if !self.lost_allowed {
                return Err(self.fail(format!(
                    "epoch {} reports lost tracking ({reason}) though nothing damaged the \
                     tracker's state",
                    frozen.epoch
                )));
            }
            if frozen.bitmap.count() != self.disk_sectors {
                return Err(self.fail(format!(
                    "epoch {} reports lost tracking but marks {} of {} sectors, not the whole disk",
                    frozen.epoch,
                    frozen.bitmap.count(),
                    self.disk_sectors
                )));
            }
        } else {
            self.check_covers(
                &frozen.bitmap,
                &expect,
                &format!("frozen epoch {}", frozen.epoch),
            )?;
        }
        let fresh = self.tracker().current();
        let fresh = self.io("current", fresh)?;
        if let Some(e) = fresh.extents().next() {
            return Err(self.fail(format!(
                "right after freezing epoch {}, the new epoch already marks sector {}",
                frozen.epoch, e.start_sector
            )));
        }
        self.frozen = Some(FrozenModel {
            epoch: frozen.epoch,
            expect,
            unread: frozen.bitmap.clone(),
            bitmap: frozen.bitmap,
            snapshot: self.content.clone(),
            lost: frozen.lost.is_some(),
        });
        Ok(())
    }

    /// `got` holds every sector `expect` must, and (when exact) nothing else.
    fn check_covers(
        &self,
        got: &SectorBitmap,
        expect: &Marks,
        what: &str,
    ) -> std::result::Result<(), ConformanceFailure> {
        if expect.all {
            if got.count() != self.disk_sectors {
                let missing = (0..self.disk_sectors)
                    .find(|s| !got.contains(*s))
                    .unwrap_or(0);
                return Err(self.fail(format!(
                    "{what} misses sector {missing}: the whole disk was marked"
                )));
            }
            return Ok(());
        }
        for &s in &expect.written {
            if !got.contains(s) {
                return Err(self.fail(format!(
                    "{what} misses sector {s}, written at step {} (a lost mark)",
                    self.written_at.get(&s).copied().unwrap_or(0)
                )));
            }
        }
        if let Some(&s) = expect.carried.iter().find(|s| !got.contains(**s)) {
            return Err(self.fail(format!(
                "{what} misses sector {s}, carried back from a failed cycle (a lost mark)"
            )));
        }
        if !expect.inexact {
            for e in got.extents() {
                if let Some(s) = (e.start_sector..e.end_sector()).find(|s| !expect.contains(*s)) {
                    let when = match self.written_at.get(&s) {
                        Some(step) => format!("last written at step {step}, in an earlier epoch"),
                        None => "never written".into(),
                    };
                    return Err(self.fail(format!(
                        "{what} marks sector {s}, which was neither written nor carried in it \
                         ({when}): a mark in the wrong epoch"
                    )));
                }
            }
        }
        Ok(())
    }

    fn read_frozen(&mut self, extents: usize) -> std::result::Result<(), ConformanceFailure> {
        let Some(frozen) = &self.frozen else {
            let mut buf = vec![0u8; SECTOR_SIZE as usize];
            if self.tracker().read_frozen(&mut buf, 0).is_ok() {
                return Err(self.fail("read_frozen succeeded with no epoch frozen".into()));
            }
            return Ok(());
        };
        let runs: Vec<Extent> = frozen.unread.extents().take(extents).collect();
        for run in runs {
            let mut at = run.start_sector;
            while at < run.end_sector() {
                let n = self.rng.range(1, 64).min(run.end_sector() - at);
                self.read_piece(at, n)?;
                at += n;
            }
        }
        Ok(())
    }

    /// Reads frozen sectors `[start, start+count)` and checks each against the model.
    fn read_piece(
        &mut self,
        start: u64,
        count: u64,
    ) -> std::result::Result<(), ConformanceFailure> {
        let mut buf = vec![0u8; (count * SECTOR_SIZE) as usize];
        let r = self.tracker().read_frozen(&mut buf, start * SECTOR_SIZE);
        self.io("read_frozen", r)?;
        let Some(frozen) = self.frozen.as_mut() else {
            return Ok(());
        };
        let r = frozen.unread.clear_sectors(start, count);
        let epoch = frozen.epoch;
        let frozen = &self.frozen;
        let Some(frozen) = frozen.as_ref() else {
            return Ok(());
        };
        if let Err(e) = r {
            return Err(self.fail(format!("clearing read sectors: {e}")));
        }
        let mut device = vec![0u8; SECTOR_SIZE as usize];
        for (i, got) in buf.chunks(SECTOR_SIZE as usize).enumerate() {
            let s = start + i as u64;
            // As of the freeze: written before it (snapshot), untouched before its first write
            // (initial), or never written at all (then the device holds it still).
            let matches_then = match frozen.snapshot.get(&s).or_else(|| self.initial.get(&s)) {
                Some(then) => got == &then[..],
                None => {
                    let r = self.fx.read_device(&mut device, s * SECTOR_SIZE);
                    self.io("reading the device", r)?;
                    got == &device[..]
                }
            };
            if matches_then {
                continue;
            }
            let point_in_time = match self.caps.frozen_reads {
                FrozenReads::PointInTime => true,
                FrozenReads::PointInTimeForWrites => frozen.expect.written.contains(&s),
                FrozenReads::Live => false,
            };
            // A live read is allowed only where promised, and sees a write made after the freeze:
            // that write is in the current epoch (`check_current` holds the tracker to it), so it
            // ships again.
            let live = self.now(s).is_some_and(|n| got == &n[..]);
            if point_in_time || !live {
                let seen = if live {
                    "its content now, written after the freeze"
                } else {
                    "bytes it held neither at the freeze nor now"
                };
                return Err(self.fail(format!(
                    "frozen read of sector {s} (epoch {epoch}) returned {seen}, not its content \
                     at the freeze{}",
                    match self.written_at.get(&s) {
                        Some(step) => format!(" (last written at step {step})"),
                        None => String::new(),
                    }
                )));
            }
        }
        Ok(())
    }

    fn release(&mut self, committed: bool) -> std::result::Result<(), ConformanceFailure> {
        if committed && let Some(f) = &self.frozen {
            let runs: Vec<Extent> = f.unread.extents().collect();
            for run in runs {
                self.read_piece(run.start_sector, run.sector_count)?;
            }
        }
        let r = self.tracker().release(committed);
        self.io("release", r)?;
        let Some(frozen) = self.frozen.take() else {
            return Ok(());
        };
        if committed {
            if frozen.lost {
                self.lost_allowed = false;
            }
            self.pending.push((frozen.epoch, frozen.bitmap));
        } else {
            self.current.absorb(frozen.expect);
            self.current.all |= frozen.lost;
        }
        Ok(())
    }

    fn carry(&mut self, from: usize) -> std::result::Result<(), ConformanceFailure> {
        if from >= self.pending.len() {
            return Ok(());
        }
        let dead: Vec<(u64, SectorBitmap)> = self.pending.drain(from..).collect();
        for (_, bitmap) in dead {
            let r = self.tracker().carry(&bitmap);
            self.io("carry", r)?;
            for e in bitmap.extents() {
                self.current.carried.extend(e.start_sector..e.end_sector());
            }
        }
        Ok(())
    }

    fn acknowledge(&mut self, upto: usize) -> std::result::Result<(), ConformanceFailure> {
        if upto >= self.pending.len() {
            return Ok(());
        }
        let epoch = self.pending[upto].0;
        let r = self.tracker().acknowledged(epoch);
        self.io("acknowledged", r)?;
        self.pending.drain(..=upto);
        Ok(())
    }

    fn restart(&mut self, crash: bool) -> std::result::Result<(), ConformanceFailure> {
        let r = if crash {
            self.fx.crash_restart()
        } else {
            self.fx.restart_clean()
        };
        self.io(
            if crash {
                "crash restart"
            } else {
                "clean restart"
            },
            r,
        )?;
        let tracker = self.tracker();
        if tracker.generation() != self.generation {
            return Err(self.fail(format!(
                "the generation changed across a restart ({} to {})",
                self.generation,
                tracker.generation()
            )));
        }
        // A frozen epoch found on open never committed: it is merged back.
        let mut buf = vec![0u8; SECTOR_SIZE as usize];
        if tracker.read_frozen(&mut buf, 0).is_ok() {
            return Err(self
                .fail("after a restart an epoch is still frozen; it must be merged back".into()));
        }
        drop(tracker);
        if let Some(frozen) = self.frozen.take() {
            self.current.absorb(frozen.expect);
            self.current.all |= frozen.lost;
        }
        if crash {
            if !self.caps.exact_after_crash {
                self.current.inexact = true;
            }
            if self.caps.lost_after_crash {
                self.lost_allowed = true;
                self.current.inexact = true;
            }
        }
        // Recovery must leave the device as written.
        self.check_device(0, self.disk_sectors)
    }

    /// After every step: no mark of the current epoch is lost, and (when exact) none is extra.
    fn check_current(&mut self) -> std::result::Result<(), ConformanceFailure> {
        let r = self.fx.settle();
        self.io("settle", r)?;
        let r = self.tracker().current();
        let got = self.io("current", r)?;
        let expect = self.current.clone();
        self.check_covers(&got, &expect, "the current epoch")
    }
}
