//! Every tracker against the shared conformance suite (`tracker::conformance`), for many seeds:
//! CBT in memory and persistent, HRL under its log limit (point in time for written sectors) and
//! overflowing a tiny one (live reads). Then trackers broken on purpose, to show the suite fails
//! them and names the seed, the step and the sector.

// Helpers panic on what the tests set up themselves, as the tests do (clippy.toml).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt;
use std::sync::{Arc, Mutex};

use replicator_core::bitmap::SectorBitmap;
use replicator_core::device::{BlockDevice, MemDevice};
use replicator_core::error::{Error, Result};
use replicator_core::tracker::conformance::{
    Capabilities, ConformanceFailure, FrozenReads, TrackerFixture, run,
};
use replicator_core::tracker::{
    CbtTracker, ChangeTracker, Frozen, Generation, HrlConfig, HrlTracker, LogLimit, TrackerConfig,
};

const DISK_BYTES: u64 = 1 << 20;
const OPS: usize = 200;

/// A tracker that is also the device writes go through, reopened by `open` on restarts.
struct Fixture<T> {
    dev: Arc<MemDevice>,
    tracker: Option<Arc<T>>,
    open: Box<dyn Fn(Arc<MemDevice>) -> Result<T>>,
    caps: Capabilities,
    _dir: Option<tempfile::TempDir>,
}

impl<T: ChangeTracker + BlockDevice + 'static> Fixture<T> {
    fn new(
        dir: Option<tempfile::TempDir>,
        caps: Capabilities,
        open: impl Fn(Arc<MemDevice>) -> Result<T> + 'static,
    ) -> Self {
        let dev = Arc::new(MemDevice::new("conformance", DISK_BYTES));
        let tracker = open(Arc::clone(&dev)).expect("open the tracker");
        Fixture {
            dev,
            tracker: Some(Arc::new(tracker)),
            open: Box::new(open),
            caps,
            _dir: dir,
        }
    }

    fn live(&self) -> &Arc<T> {
        self.tracker.as_ref().expect("the tracker is open")
    }

    fn reopen(&mut self) -> Result<()> {
        let t = self.tracker.take().expect("the tracker is open");
        assert_eq!(Arc::strong_count(&t), 1, "the suite kept the tracker");
        drop(t);
        self.tracker = Some(Arc::new((self.open)(Arc::clone(&self.dev))?));
        Ok(())
    }
}

impl<T: ChangeTracker + BlockDevice + 'static> TrackerFixture for Fixture<T> {
    fn tracker(&self) -> Arc<dyn ChangeTracker> {
        Arc::clone(self.live()) as Arc<dyn ChangeTracker>
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<()> {
        Ok(self.live().write_at(data, offset_bytes)?)
    }

    fn discard(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        Ok(self.live().discard(offset_bytes, len_bytes)?)
    }

    fn restart_clean(&mut self) -> Result<()> {
        self.live().checkpoint()?;
        self.reopen()
    }

    fn crash_restart(&mut self) -> Result<()> {
        self.reopen()
    }

    fn read_device(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        Ok(self.dev.read_at(buf, offset_bytes)?)
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }
}

fn cbt_in_memory() -> Fixture<CbtTracker<Arc<MemDevice>>> {
    Fixture::new(
        None,
        Capabilities {
            frozen_reads: FrozenReads::PointInTime,
            restarts: false,
            exact_after_crash: true,
            lost_after_crash: false,
        },
        |dev| Ok(CbtTracker::in_memory(dev, TrackerConfig::default())),
    )
}

fn cbt_persistent() -> Fixture<CbtTracker<Arc<MemDevice>>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cbt");
    Fixture::new(
        Some(dir),
        Capabilities {
            frozen_reads: FrozenReads::PointInTime,
            restarts: true,
            // The activity log marks whole regions after a crash.
            exact_after_crash: false,
            lost_after_crash: false,
        },
        move |dev| {
            let cfg = TrackerConfig {
                region_bytes: 64 << 10,
                ..TrackerConfig::default()
            };
            Ok(CbtTracker::open(dev, &path, cfg)?.0)
        },
    )
}

fn hrl(cfg: HrlConfig, frozen_reads: FrozenReads) -> Fixture<HrlTracker<Arc<MemDevice>>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.hrl");
    Fixture::new(
        Some(dir),
        Capabilities {
            frozen_reads,
            restarts: true,
            exact_after_crash: true,
            lost_after_crash: false,
        },
        move |dev| Ok(HrlTracker::open(dev, &path, cfg)?.0),
    )
}

/// HRL with room to log everything: written sectors are point in time.
fn hrl_roomy() -> Fixture<HrlTracker<Arc<MemDevice>>> {
    hrl(
        HrlConfig {
            log_limit: LogLimit::Bytes(1 << 30),
            ..HrlConfig::default()
        },
        FrozenReads::PointInTimeForWrites,
    )
}

/// HRL whose log overflows all the time (and folds its mark records often): reads may be live.
fn hrl_overflowing() -> Fixture<HrlTracker<Arc<MemDevice>>> {
    hrl(
        HrlConfig {
            log_limit: LogLimit::Bytes(24 << 10),
            index_entries_max: 16,
            overflow_marks_max: 3,
        },
        FrozenReads::Live,
    )
}

fn seeds(
    count: u64,
    make: impl Fn() -> Box<dyn TrackerFixture>,
) -> std::result::Result<(), ConformanceFailure> {
    for seed in 0..count {
        let mut fx = make();
        run(fx.as_mut(), seed, OPS)?;
    }
    Ok(())
}

#[test]
fn cbt_in_memory_conforms() -> std::result::Result<(), ConformanceFailure> {
    seeds(64, || Box::new(cbt_in_memory()))
}

#[test]
fn cbt_persistent_conforms() -> std::result::Result<(), ConformanceFailure> {
    seeds(32, || Box::new(cbt_persistent()))
}

#[test]
fn hrl_conforms() -> std::result::Result<(), ConformanceFailure> {
    seeds(32, || Box::new(hrl_roomy()))
}

#[test]
fn hrl_conforms_while_overflowing() -> std::result::Result<(), ConformanceFailure> {
    seeds(32, || Box::new(hrl_overflowing()))
}

#[test]
fn the_default_hrl_config_conforms_as_a_live_reader() -> std::result::Result<(), ConformanceFailure>
{
    // Half of a 1 MiB disk: some seeds overflow, some do not.
    seeds(16, || {
        Box::new(hrl(HrlConfig::default(), FrozenReads::Live))
    })
}

// ---------------------------------------------------------------------------------------------
// Broken trackers: the suite must fail each.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// Freeze hands out a bitmap without its lowest sector.
    DropsAMark,
    /// Writes made while an epoch is frozen are counted in the frozen epoch (so a committed
    /// release forgets them).
    MarksIntoTheFrozenEpoch,
    /// Frozen reads come from the live device, though point in time is claimed.
    ReadsLive,
    /// Release(committed) keeps the frozen marks in the next epoch.
    KeepsCommittedMarks,
    /// Discards reach the device but are not marked.
    ForgetsDiscards,
}

/// A CBT tracker with one bug.
struct Broken {
    inner: CbtTracker<Arc<MemDevice>>,
    bug: Bug,
    frozen: Mutex<Option<SectorBitmap>>,
}

impl fmt::Debug for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Broken({:?})", self.bug)
    }
}

impl ChangeTracker for Broken {
    fn kind(&self) -> &'static str {
        "broken"
    }
    fn name(&self) -> &str {
        "broken"
    }
    fn disk_bytes(&self) -> u64 {
        self.inner.disk_bytes()
    }
    fn generation(&self) -> Generation {
        self.inner.generation()
    }
    fn epoch(&self) -> Result<u64> {
        self.inner.epoch()
    }
    fn current(&self) -> Result<SectorBitmap> {
        self.inner.current()
    }
    fn mark_all(&self) -> Result<()> {
        self.inner.mark_all()
    }
    fn carry(&self, sectors: &SectorBitmap) -> Result<()> {
        self.inner.carry(sectors)
    }
    fn freeze(&self) -> Result<Frozen> {
        let mut f = self.inner.freeze()?;
        let first = f.bitmap.extents().next();
        if self.bug == Bug::DropsAMark
            && let Some(e) = first
        {
            f.bitmap.clear_sectors(e.start_sector, 1)?;
        }
        *self.frozen.lock().unwrap() = Some(f.bitmap.clone());
        Ok(f)
    }
    fn read_frozen(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        if self.bug == Bug::ReadsLive {
            self.inner.read_frozen(buf, offset_bytes)?;
            return Ok(self.inner.device().read_at(buf, offset_bytes)?);
        }
        self.inner.read_frozen(buf, offset_bytes)
    }
    fn release(&self, committed: bool) -> Result<()> {
        let frozen = self.frozen.lock().unwrap().take();
        self.inner.release(committed)?;
        if committed
            && self.bug == Bug::KeepsCommittedMarks
            && let Some(b) = frozen
        {
            self.inner.carry(&b)?;
        }
        Ok(())
    }
    fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint()
    }
}

struct BrokenFixture {
    dev: Arc<MemDevice>,
    tracker: Arc<Broken>,
}

impl BrokenFixture {
    fn new(bug: Bug) -> Self {
        let dev = Arc::new(MemDevice::new("broken", DISK_BYTES));
        let inner = CbtTracker::in_memory(Arc::clone(&dev), TrackerConfig::default());
        BrokenFixture {
            dev,
            tracker: Arc::new(Broken {
                inner,
                bug,
                frozen: Mutex::new(None),
            }),
        }
    }
}

impl TrackerFixture for BrokenFixture {
    fn tracker(&self) -> Arc<dyn ChangeTracker> {
        Arc::clone(&self.tracker) as Arc<dyn ChangeTracker>
    }
    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<()> {
        if self.tracker.bug == Bug::MarksIntoTheFrozenEpoch && self.tracker.inner.is_frozen() {
            // Straight to the device: the mark goes to the frozen epoch's bitmap, which the
            // cycle already has, and is forgotten by a committed release.
            self.dev.write_at(data, offset_bytes)?;
            if let Some(b) = self.tracker.frozen.lock().unwrap().as_mut() {
                b.mark_bytes(offset_bytes, data.len() as u64)?;
            }
            return Ok(());
        }
        Ok(self.tracker.inner.write_at(data, offset_bytes)?)
    }
    fn discard(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        if self.tracker.bug == Bug::ForgetsDiscards {
            return Ok(self.dev.discard(offset_bytes, len_bytes)?);
        }
        Ok(self.tracker.inner.discard(offset_bytes, len_bytes)?)
    }
    fn read_device(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        Ok(self.dev.read_at(buf, offset_bytes)?)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            frozen_reads: FrozenReads::PointInTime,
            restarts: false,
            exact_after_crash: true,
            lost_after_crash: false,
        }
    }
}

/// The first failure over seeds 0..20, and that the same seed fails the same way again.
fn first_failure(bug: Bug) -> ConformanceFailure {
    for seed in 0..20 {
        if let Err(f) = run(&mut BrokenFixture::new(bug), seed, OPS) {
            let again = run(&mut BrokenFixture::new(bug), seed, OPS)
                .expect_err("the same seed must fail again");
            assert_eq!(
                (again.step, &again.detail),
                (f.step, &f.detail),
                "a seed must repeat its run"
            );
            return f;
        }
    }
    panic!("the suite passed a tracker with bug {bug:?} for 20 seeds");
}

fn assert_names(f: &ConformanceFailure, words: &[&str]) {
    let msg = f.to_string();
    assert!(
        msg.contains(&format!("seed {}", f.seed)) && msg.contains(&format!("step {}", f.step)),
        "{msg}"
    );
    for w in words {
        assert!(msg.contains(w), "{msg} should mention {w:?}");
    }
}

#[test]
fn the_suite_fails_a_tracker_that_drops_a_mark() {
    let f = first_failure(Bug::DropsAMark);
    assert_names(&f, &["frozen epoch", "misses sector", "lost mark"]);
}

#[test]
fn the_suite_fails_a_tracker_that_marks_a_post_freeze_write_into_the_frozen_epoch() {
    let f = first_failure(Bug::MarksIntoTheFrozenEpoch);
    assert_names(&f, &["misses sector", "written at step"]);
}

#[test]
fn the_suite_fails_a_point_in_time_tracker_that_reads_live() {
    let f = first_failure(Bug::ReadsLive);
    assert_names(
        &f,
        &["frozen read of sector", "not its content at the freeze"],
    );
}

#[test]
fn the_suite_fails_a_tracker_that_does_not_mark_discards() {
    let f = first_failure(Bug::ForgetsDiscards);
    assert_names(&f, &["misses sector", "discard"]);
}

#[test]
fn the_suite_fails_a_tracker_that_keeps_committed_marks() {
    let f = first_failure(Bug::KeepsCommittedMarks);
    assert_names(&f, &["marks sector", "wrong epoch"]);
}

/// A persistent HRL whose "crash" damages its state file: it then reports lost tracking, which
/// the suite refuses for a tracker that does not lose tracking on a crash.
#[test]
fn the_suite_fails_a_tracker_that_loses_tracking_on_a_crash() {
    struct Damaging(Fixture<HrlTracker<Arc<MemDevice>>>, std::path::PathBuf);
    impl TrackerFixture for Damaging {
        fn tracker(&self) -> Arc<dyn ChangeTracker> {
            self.0.tracker()
        }
        fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<()> {
            self.0.write(offset_bytes, data)
        }
        fn restart_clean(&mut self) -> Result<()> {
            self.0.restart_clean()
        }
        fn crash_restart(&mut self) -> Result<()> {
            let mut bytes =
                std::fs::read(&self.1).map_err(|e| Error::InvalidInput(e.to_string()))?;
            bytes[20] ^= 0xFF;
            std::fs::write(&self.1, bytes).map_err(|e| Error::InvalidInput(e.to_string()))?;
            self.0.crash_restart()
        }
        fn read_device(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
            self.0.read_device(buf, offset_bytes)
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
    }
    let mut failure = None;
    for seed in 0..20 {
        let fx = hrl_roomy();
        let state = fx.live().dir().join("hrl.state");
        if let Err(f) = run(&mut Damaging(fx, state), seed, OPS) {
            failure = Some(f);
            break;
        }
    }
    let f = failure.expect("the suite passed a tracker that lost tracking");
    // The new state has a new generation, or the lost report comes first.
    assert!(
        f.detail.contains("generation changed") || f.detail.contains("lost tracking"),
        "{f}"
    );
}

#[test]
fn a_disk_without_sectors_is_refused_not_panicked_on() {
    struct Empty(Arc<CbtTracker<Arc<MemDevice>>>);
    impl TrackerFixture for Empty {
        fn tracker(&self) -> Arc<dyn ChangeTracker> {
            Arc::clone(&self.0) as Arc<dyn ChangeTracker>
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn read_device(&self, _: &mut [u8], _: u64) -> Result<()> {
            Ok(())
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                frozen_reads: FrozenReads::Live,
                restarts: false,
                exact_after_crash: true,
                lost_after_crash: false,
            }
        }
    }
    let dev = Arc::new(MemDevice::new("empty", 0));
    let t = Arc::new(CbtTracker::in_memory(dev, TrackerConfig::default()));
    let f = run(&mut Empty(t), 1, 10).expect_err("an empty disk is refused");
    assert!(f.detail.contains("no sectors"), "{f}");
}

/// The inode of `path`: a checkpoint written again is a new file renamed into place.
fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").ino()
}

#[test]
fn a_clean_reopen_leaves_the_checkpoint_alone_and_an_unclean_one_rewrites_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cbt");
    let ckpt = path.join("tracker.ckpt");
    let dev = Arc::new(MemDevice::new("d", DISK_BYTES));
    let cfg = TrackerConfig {
        region_bytes: 64 << 10,
        ..TrackerConfig::default()
    };
    let open = || CbtTracker::open(Arc::clone(&dev), &path, cfg).expect("open");

    let (t, _) = open();
    t.write_at(&[7u8; 4096], 0).expect("write");
    t.checkpoint().expect("checkpoint");
    drop(t);
    let before = inode(&ckpt);
    let (t, report) = open();
    assert!(!report.unclean, "{report:?}");
    assert_eq!(
        inode(&ckpt),
        before,
        "nothing to add: the checkpoint is not written again"
    );
    assert_eq!(
        t.current().expect("current").count(),
        8,
        "the marks are the checkpoint's"
    );

    // Written without a checkpoint after (a crash): the activity log's region is merged and the
    // checkpoint written anew, the log emptied.
    t.write_at(&[9u8; 4096], 512 << 10).expect("write");
    drop(t);
    let (t, report) = open();
    assert!(report.unclean, "{report:?}");
    assert_ne!(inode(&ckpt), before, "the recovered marks are checkpointed");
    assert_eq!(
        std::fs::metadata(path.join("tracker.al"))
            .expect("al")
            .len(),
        0,
        "the activity log is emptied"
    );
    assert!(t.current().expect("current").count() >= 8 + 8);
    drop(t);
    let after = inode(&ckpt);
    let (_t, report) = open();
    assert!(!report.unclean);
    assert_eq!(inode(&ckpt), after);
}
