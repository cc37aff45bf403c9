//! The HRL write-log tracker: torn tails, crash redo, overflow, truncation only after
//! acknowledgement, damaged state, and whole cycles shipped and hydrated through it. (Its
//! contract is checked by the conformance suite in `tracker_conformance.rs`.)

// Helpers panic on what the tests set up themselves, as the tests do (clippy.toml).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::Error;
use replicator_core::bitmap::SectorBitmap;
use replicator_core::clock::{SimClock, Timestamp};
use replicator_core::device::{BlockDevice, DeviceError, DeviceOp, MemDevice};
use replicator_core::keys::MasterKey;
use replicator_core::progress::NoProgress;
use replicator_core::source::{ShipConfig, Source, ship_cycle, sync_acks};
use replicator_core::target::{HydrateConfig, Target, hydrate};
use replicator_core::tracker::hrl::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, segment_file_name};
use replicator_core::tracker::{ChangeTracker, HrlConfig, HrlTracker, LogLimit, OpenReport};
use replicator_sink::LocalDirSink;

const DISK: u64 = 1 << 20;

/// What a [`Flaky`] device does with writes.
const WRITE_OK: u8 = 0;
/// Acknowledges writes without applying them (a volatile cache lost at power-off).
const WRITE_LOST: u8 = 1;
/// Applies the first half of each write, then reports success (a write torn by a crash).
const WRITE_TORN: u8 = 2;
/// Applies the first half of each write, then fails.
const WRITE_FAILS: u8 = 3;

#[derive(Debug)]
struct Flaky {
    inner: Arc<MemDevice>,
    mode: AtomicU8,
}

impl Flaky {
    fn new(inner: Arc<MemDevice>) -> Arc<Self> {
        Arc::new(Flaky {
            inner,
            mode: AtomicU8::new(WRITE_OK),
        })
    }
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl BlockDevice for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let half = &buf[..buf.len() / 2];
        match self.mode.load(Ordering::SeqCst) {
            WRITE_LOST => Ok(()),
            WRITE_TORN => self.inner.write_at(half, offset),
            WRITE_FAILS => {
                self.inner.write_at(half, offset)?;
                Err(DeviceError::new(
                    "flaky",
                    DeviceOp::Write,
                    offset,
                    buf.len() as u64,
                    "simulated media error",
                ))
            }
            _ => self.inner.write_at(buf, offset),
        }
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

type Hrl = HrlTracker<Arc<MemDevice>>;

fn open(dev: &Arc<MemDevice>, dir: &Path, cfg: HrlConfig) -> (Hrl, OpenReport) {
    HrlTracker::open(Arc::clone(dev), dir, cfg).expect("open the write log")
}

fn roomy() -> HrlConfig {
    HrlConfig {
        log_limit: LogLimit::Bytes(1 << 30),
        ..HrlConfig::default()
    }
}

fn seg(dir: &Path, epoch: u64) -> PathBuf {
    dir.join(segment_file_name(epoch))
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn set_of(b: &SectorBitmap) -> Vec<(u64, u64)> {
    b.extents()
        .map(|e| (e.start_sector, e.end_sector()))
        .collect()
}

/// Reads `len` frozen bytes at `offset`.
fn frozen(t: &dyn ChangeTracker, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    t.read_frozen(&mut buf, offset).expect("frozen read");
    buf
}

fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, offset).expect("device read");
    buf
}

/// Writes A (sectors 0..8) and B (sectors 16..24) in epoch 1, "crashes" so that B's device write
/// never began (the device is put back to before B), damages the last record with `damage`, and
/// reopens. Then checks A survives, B is gone, and later cycles work.
fn torn_tail_case(damage: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    let a = fill(1, 4096);
    let b = fill(2, 4096);
    {
        let (t, _) = open(&dev, dir.path(), roomy());
        t.write_tracked(&a, 0).unwrap();
        let before_b = dev.snapshot();
        t.write_tracked(&b, 16 * 512).unwrap();
        drop(t);
        // B's record is damaged: by the rule its device write never began.
        dev.write_at(&before_b, 0).unwrap();
    }
    let path = seg(dir.path(), 1);
    let whole = std::fs::metadata(&path).unwrap().len();
    damage(&path);
    let damaged_len = std::fs::metadata(&path).unwrap().len();
    let a_end = SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 4096;
    assert_eq!(whole, a_end + RECORD_HEADER_LEN + 4096);

    let (t, report) = open(&dev, dir.path(), roomy());
    assert!(report.unclean, "no clean stop");
    assert_eq!(report.log_tails_cut, 1, "{report:?}");
    assert_eq!(report.log_bytes_cut, damaged_len - a_end, "{report:?}");
    assert_eq!(report.records_redone, 1, "A is redone, B is not");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), a_end, "cut at B");
    assert_eq!(
        set_of(&t.current().unwrap()),
        vec![(0, 8)],
        "only A is marked"
    );
    assert_eq!(
        read(&dev, 16 * 512, 4096),
        vec![0u8; 4096],
        "B never reached the disk"
    );

    // Later cycles: appends go after the cut, and a second crash finds a clean log.
    let c = fill(3, 1024);
    t.write_tracked(&c, 40 * 512).unwrap();
    let f = t.freeze().unwrap();
    assert_eq!(set_of(&f.bitmap), vec![(0, 8), (40, 42)]);
    t.write_tracked(&fill(4, 512), 40 * 512).unwrap();
    assert_eq!(frozen(&t, 0, 4096), a);
    assert_eq!(
        frozen(&t, 40 * 512, 1024),
        c,
        "point in time despite the later write"
    );
    t.release(true).unwrap();
    drop(t);
    let (t, report) = open(&dev, dir.path(), roomy());
    assert_eq!(report.log_tails_cut, 0, "{report:?}");
    assert_eq!(set_of(&t.current().unwrap()), vec![(40, 41)]);
}

#[test]
fn a_log_cut_mid_record_is_truncated_there_and_later_cycles_work() {
    torn_tail_case(|p| {
        let len = std::fs::metadata(p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len - 1000).unwrap();
    });
}

#[test]
fn a_flipped_byte_in_the_last_record_ends_the_log_there() {
    torn_tail_case(|p| {
        let mut bytes = std::fs::read(p).unwrap();
        let last = bytes.len() - 100;
        bytes[last] ^= 0x10;
        std::fs::write(p, bytes).unwrap();
    });
}

#[test]
fn a_flipped_byte_in_the_last_record_header_ends_the_log_there() {
    torn_tail_case(|p| {
        let mut bytes = std::fs::read(p).unwrap();
        let header = (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 4096 + 20) as usize;
        bytes[header] ^= 0x01; // the record's offset
        std::fs::write(p, bytes).unwrap();
    });
}

#[test]
fn garbage_after_the_last_record_is_cut_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    {
        let (t, _) = open(&dev, dir.path(), roomy());
        t.write_tracked(&fill(1, 4096), 0).unwrap();
        t.write_tracked(&fill(2, 700), 16 * 512 + 3).unwrap();
    }
    let path = seg(dir.path(), 1);
    let valid = std::fs::metadata(&path).unwrap().len();
    let mut bytes = std::fs::read(&path).unwrap();
    let mut garbage = vec![0u8; 300];
    ChaCha8Rng::seed_from_u64(9).fill_bytes(&mut garbage);
    // Something that starts like a record: its magic, then noise.
    garbage[..4].copy_from_slice(b"HRLR");
    bytes.extend_from_slice(&garbage);
    std::fs::write(&path, bytes).unwrap();
    let before = dev.snapshot();
    let (t, report) = open(&dev, dir.path(), roomy());
    assert_eq!(report.log_tails_cut, 1);
    assert_eq!(report.log_bytes_cut, 300);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), valid);
    assert_eq!(report.records_redone, 2);
    assert_eq!(
        dev.snapshot(),
        before,
        "redo rewrites what is already there"
    );
    assert_eq!(set_of(&t.current().unwrap()), vec![(0, 8), (16, 18)]);
}

#[test]
fn a_segment_whose_header_was_torn_is_removed() {
    // Part of a header, or a header-sized file whose bytes never landed.
    for torn in [b"RPLHRL".to_vec(), vec![0u8; SEGMENT_HEADER_LEN as usize]] {
        let dir = tempfile::tempdir().unwrap();
        let dev = Arc::new(MemDevice::new("disk", DISK));
        {
            let (t, _) = open(&dev, dir.path(), roomy());
            t.write_tracked(&fill(1, 512), 0).unwrap();
            t.freeze().unwrap();
            t.release(true).unwrap();
            t.checkpoint().unwrap();
        }
        // A crash while creating epoch 2's segment.
        std::fs::write(seg(dir.path(), 2), &torn).unwrap();
        let (t, report) = open(&dev, dir.path(), roomy());
        assert!(!report.unclean, "the last stop was clean");
        assert!(report.lost.is_none(), "{report:?}");
        assert_eq!(
            (report.log_tails_cut, report.log_bytes_cut),
            (1, torn.len() as u64)
        );
        assert!(!seg(dir.path(), 2).exists());
        assert_eq!(t.segment_epochs(), vec![1], "the committed segment stays");
        t.write_tracked(&fill(2, 512), 512).unwrap();
        assert!(seg(dir.path(), 2).exists(), "made again at the next write");
        assert_eq!(set_of(&t.current().unwrap()), vec![(1, 2)]);
    }
}

#[test]
fn a_damaged_segment_header_with_records_behind_it_loses_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    {
        let (t, _) = open(&dev, dir.path(), roomy());
        t.write_tracked(&fill(1, 512), 0).unwrap();
    }
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let (t, report) = open(&dev, dir.path(), roomy());
    let reason = report.lost.expect("tracking lost");
    assert!(
        reason.contains("seg-") && reason.contains("offset 0"),
        "{reason}"
    );
    assert!(!path.exists());
    assert_eq!(t.freeze().unwrap().bitmap.count(), DISK / 512);
}

#[test]
fn a_logged_write_the_device_lost_is_redone_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new("disk", DISK));
    let flaky = Flaky::new(Arc::clone(&mem));
    let x = fill(7, 8192);
    let y = fill(8, 4096);
    {
        let (t, _) = HrlTracker::open(Arc::clone(&flaky), dir.path(), roomy()).unwrap();
        t.write_tracked(&fill(6, 512), 0).unwrap();
        flaky.set(WRITE_LOST);
        t.write_tracked(&x, 64 * 512).unwrap();
        flaky.set(WRITE_TORN);
        t.write_tracked(&y, 200 * 512).unwrap();
        flaky.set(WRITE_OK);
        // Power off.
    }
    assert_ne!(read(mem.as_ref(), 64 * 512, 8192), x);
    assert_ne!(read(mem.as_ref(), 200 * 512, 4096), y);
    let (t, report) = open(&mem, dir.path(), roomy());
    assert!(report.unclean);
    assert_eq!(report.records_redone, 3);
    assert_eq!(
        read(mem.as_ref(), 64 * 512, 8192),
        x,
        "the lost write is redone"
    );
    assert_eq!(
        read(mem.as_ref(), 200 * 512, 4096),
        y,
        "the torn write is redone"
    );
    assert_eq!(
        set_of(&t.current().unwrap()),
        vec![(0, 1), (64, 80), (200, 208)]
    );
    // A clean stop needs no redo.
    t.checkpoint().unwrap();
    drop(t);
    let (_, report) = open(&mem, dir.path(), roomy());
    assert!(!report.unclean);
    assert_eq!(report.records_redone, 0);
}

#[test]
fn a_failed_device_write_is_logged_as_what_the_device_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new("disk", DISK));
    let flaky = Flaky::new(Arc::clone(&mem));
    let (t, _) = HrlTracker::open(Arc::clone(&flaky), dir.path(), roomy()).unwrap();
    t.write_tracked(&fill(1, 4096), 0).unwrap();
    flaky.set(WRITE_FAILS);
    let err = t.write_tracked(&fill(2, 4096), 0).unwrap_err();
    assert!(matches!(err, Error::Device(_)), "{err}");
    flaky.set(WRITE_OK);
    let holds = read(mem.as_ref(), 0, 4096);
    let f = t.freeze().unwrap();
    assert_eq!(set_of(&f.bitmap), vec![(0, 8)]);
    assert_eq!(
        frozen(&t, 0, 4096),
        holds,
        "what the device holds ships, not the failed data"
    );
    t.release(false).unwrap();
    drop(t);
    // After a crash the redo leaves the device as it was.
    let (t, _) = open(&mem, dir.path(), roomy());
    assert_eq!(read(mem.as_ref(), 0, 4096), holds);
    t.freeze().unwrap();
    assert_eq!(frozen(&t, 0, 4096), holds);
}

#[test]
fn the_log_overflows_to_bitmap_marks_and_stays_correct() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    let cfg = HrlConfig {
        log_limit: LogLimit::Bytes(64 << 10),
        overflow_marks_max: 5,
        ..HrlConfig::default()
    };
    let (t, _) = open(&dev, dir.path(), cfg);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut written = SectorBitmap::new(DISK / 512);
    let write = |t: &Hrl, rng: &mut ChaCha8Rng, written: &mut SectorBitmap| {
        let len = rng.random_range(1..=16u64) * 512;
        let off = rng.random_range(0..(DISK - len) / 512) * 512;
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        t.write_tracked(&data, off).unwrap();
        written.mark_bytes(off, len).unwrap();
    };
    while !t.overflowed() {
        write(&t, &mut rng, &mut written);
        assert!(
            t.log_bytes() <= t.log_bytes_max(),
            "the log stays under its limit"
        );
    }
    assert!(
        t.log_bytes() < 4096,
        "the overflowed epoch's data left the log ({} bytes)",
        t.log_bytes()
    );
    for _ in 0..40 {
        write(&t, &mut rng, &mut written);
    }
    assert_eq!(
        set_of(&t.current().unwrap()),
        set_of(&written),
        "nothing lost"
    );
    // Marks survive a crash while overflowed (some folded into the state, some as mark records).
    drop(t);
    let (t, report) = open(&dev, dir.path(), cfg);
    assert_eq!(
        report.records_redone, 0,
        "an overflowed epoch has nothing to redo"
    );
    assert!(t.overflowed());
    assert_eq!(set_of(&t.current().unwrap()), set_of(&written));
    // The cycle reads the device for them.
    let f = t.freeze().unwrap();
    assert_eq!(set_of(&f.bitmap), set_of(&written));
    for e in f.bitmap.extents() {
        let len = e.len_bytes() as usize;
        assert_eq!(
            frozen(&t, e.offset_bytes(), len),
            read(dev.as_ref(), e.offset_bytes(), len)
        );
    }
    assert!(!t.overflowed(), "the next epoch logs again");
    t.write_tracked(&fill(1, 512), 0).unwrap();
    assert!(!t.overflowed());
    t.release(true).unwrap();
    t.acknowledged(f.epoch).unwrap();
    let f = t.freeze().unwrap();
    t.write_tracked(&fill(2, 512), 0).unwrap();
    assert_eq!(frozen(&t, 0, 512), fill(1, 512), "point in time again");
    assert_eq!(set_of(&f.bitmap), vec![(0, 1)]);
}

#[test]
fn unacknowledged_committed_segments_count_against_the_limit_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    let cfg = HrlConfig {
        log_limit: LogLimit::Bytes(40 << 10),
        ..HrlConfig::default()
    };
    let (t, _) = open(&dev, dir.path(), cfg);
    t.write_tracked(&fill(1, 32 << 10), 0).unwrap();
    let f1 = t.freeze().unwrap();
    t.release(true).unwrap();
    assert!(!t.overflowed());
    // The committed 32 KiB stay until acknowledged: 16 KiB more do not fit.
    t.write_tracked(&fill(2, 16 << 10), 128 << 10).unwrap();
    assert!(t.overflowed());
    t.acknowledged(f1.epoch).unwrap();
    assert!(!seg(dir.path(), f1.epoch).exists());
    let f2 = t.freeze().unwrap();
    assert_eq!(set_of(&f2.bitmap), vec![(256, 288)]);
    t.release(true).unwrap();
    t.write_tracked(&fill(3, 16 << 10), 0).unwrap();
    assert!(!t.overflowed(), "room again after the acknowledgement");
}

#[test]
fn segments_are_deleted_only_when_the_target_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    let (t, _) = open(&dev, dir.path(), roomy());
    t.write_tracked(&fill(1, 512), 0).unwrap();
    let e1 = t.freeze().unwrap().epoch;
    t.release(true).unwrap();
    assert!(
        seg(dir.path(), e1).exists(),
        "a committed release keeps the log"
    );
    t.write_tracked(&fill(2, 512), 512).unwrap();
    let e2 = t.freeze().unwrap().epoch;
    t.release(false).unwrap();
    t.write_tracked(&fill(3, 512), 1024).unwrap();
    let f3 = t.freeze().unwrap();
    assert_eq!(
        set_of(&f3.bitmap),
        vec![(1, 3)],
        "the uncommitted epoch came back"
    );
    assert_eq!(frozen(&t, 512, 1024), [fill(2, 512), fill(3, 512)].concat());
    t.release(true).unwrap();
    assert_eq!(t.segment_epochs(), vec![e1, e2, f3.epoch]);
    t.acknowledged(e1).unwrap();
    assert_eq!(t.segment_epochs(), vec![e2, f3.epoch]);
    assert!(!seg(dir.path(), e1).exists());
    // An acknowledgement past what was committed is held to the committed epoch.
    t.write_tracked(&fill(4, 512), 0).unwrap();
    let current = t.epoch().unwrap();
    t.acknowledged(current + 10).unwrap();
    assert_eq!(
        t.segment_epochs(),
        vec![current],
        "only the current epoch's log is left"
    );

    // An acknowledgement whose deletions a crash interrupted is finished on open.
    let f = t.freeze().unwrap();
    t.release(true).unwrap();
    let kept = std::fs::read(seg(dir.path(), f.epoch)).unwrap();
    t.acknowledged(f.epoch).unwrap();
    std::fs::write(seg(dir.path(), f.epoch), kept).unwrap();
    drop(t);
    let (t, _) = open(&dev, dir.path(), roomy());
    assert!(!seg(dir.path(), f.epoch).exists());
    assert!(t.segment_epochs().is_empty());
}

#[test]
fn a_frozen_epoch_found_on_open_is_merged_back_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    let (t, _) = open(&dev, dir.path(), roomy());
    let mut carried = SectorBitmap::new(DISK / 512);
    carried.mark_sectors(100, 4).unwrap();
    t.write_tracked(&fill(1, 1024), 0).unwrap();
    t.carry(&carried).unwrap();
    t.freeze().unwrap();
    t.write_tracked(&fill(2, 512), 512).unwrap();
    t.write_tracked(&fill(3, 512), 4096).unwrap();
    drop(t);
    let (t, report) = open(&dev, dir.path(), roomy());
    assert!(report.frozen_merged);
    let f = t.freeze().unwrap();
    assert_eq!(set_of(&f.bitmap), vec![(0, 2), (8, 9), (100, 104)]);
    t.write_tracked(&fill(4, 4096), 0).unwrap();
    assert_eq!(
        frozen(&t, 0, 1024),
        [fill(1, 512), fill(2, 512)].concat(),
        "the newest logged write before the freeze, from the log"
    );
    assert_eq!(frozen(&t, 4096, 512), fill(3, 512));
}

#[test]
fn a_damaged_state_loses_tracking_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    let (t, report) = open(&dev, dir.path(), roomy());
    assert!(report.lost.is_none());
    let generation = t.generation();
    t.write_tracked(&fill(1, 512), 0).unwrap();
    drop(t);
    let (t, _) = open(&dev, dir.path(), roomy());
    assert_eq!(t.generation(), generation, "kept across restarts");
    drop(t);
    let state = dir.path().join("hrl.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&state, bytes).unwrap();
    let (t, report) = open(&dev, dir.path(), roomy());
    let reason = report.lost.expect("tracking lost");
    assert!(
        reason.contains("hrl.state") && reason.contains("offset"),
        "{reason}"
    );
    assert_ne!(t.generation(), generation, "new state, new generation");
    let f = t.freeze().unwrap();
    assert!(f.lost.is_some());
    assert_eq!(f.bitmap.count(), DISK / 512, "the whole disk");
    assert_eq!(frozen(&t, 0, 512), fill(1, 512));
    t.release(true).unwrap();
    t.write_tracked(&fill(2, 512), 512).unwrap();
    let f = t.freeze().unwrap();
    assert!(f.lost.is_none(), "a committed lost cycle clears it");
    assert_eq!(set_of(&f.bitmap), vec![(1, 2)]);
}

#[test]
fn a_state_for_another_disk_size_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    drop(open(&dev, dir.path(), roomy()));
    let bigger = Arc::new(MemDevice::new("disk", 2 * DISK));
    let err = HrlTracker::open(bigger, dir.path(), roomy()).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("hrl.state"), "{err}");
}

#[test]
fn a_log_without_its_state_loses_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("disk", DISK));
    {
        let (t, _) = open(&dev, dir.path(), roomy());
        t.write_tracked(&fill(1, 512), 0).unwrap();
    }
    std::fs::remove_file(dir.path().join("hrl.state")).unwrap();
    let (t, report) = open(&dev, dir.path(), roomy());
    assert!(report.lost.is_some());
    assert!(
        !seg(dir.path(), 1).exists(),
        "segments of an unknown state go"
    );
    assert_eq!(t.freeze().unwrap().bitmap.count(), DISK / 512);
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

struct Rig {
    dir: tempfile::TempDir,
    src_disk: Arc<MemDevice>,
    tgt_disk: Arc<MemDevice>,
    local: LocalDirSink,
    key: MasterKey,
    clock: SimClock,
    source: Option<Source<Hrl>>,
    target: Target<Arc<MemDevice>>,
    rng: ChaCha8Rng,
    cfg: ShipConfig,
}

const RIG_DISK: u64 = 4 << 20;

fn open_source(dev: &Arc<MemDevice>, state: &Path) -> anyhow::Result<(Source<Hrl>, OpenReport)> {
    let dev = Arc::clone(dev);
    Ok(Source::open_with(state, |dir| {
        let (t, r) = HrlTracker::open(dev, dir, HrlConfig::default())?;
        Ok((Arc::new(t), r))
    })?)
}

impl Rig {
    fn new(seed: u64) -> anyhow::Result<Rig> {
        let dir = tempfile::tempdir()?;
        let src_disk = Arc::new(MemDevice::new("source", RIG_DISK));
        let tgt_disk = Arc::new(MemDevice::new("target", RIG_DISK));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Content before replication starts (not written through the tracker).
        let mut buf = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut buf);
        src_disk.write_at(&buf, 0)?;
        let local = LocalDirSink::create(dir.path().join("cache"))?;
        let (source, _) = open_source(&src_disk, &dir.path().join("src-state"))?;
        let target = Target::open(
            &dir.path().join("tgt-state"),
            Arc::clone(&tgt_disk),
            source.disk_id(),
        )?;
        Ok(Rig {
            dir,
            src_disk,
            tgt_disk,
            local,
            key: MasterKey::from_bytes([3u8; 32]),
            clock: SimClock::new(Timestamp::from_unix_ms(1_700_000_000_000)),
            source: Some(source),
            target,
            rng,
            cfg: ShipConfig {
                blob_span_bytes_max: 256 << 10,
                ..ShipConfig::default()
            },
        })
    }

    /// Drops the source without a clean stop and opens it again.
    fn crash_source(&mut self) -> anyhow::Result<OpenReport> {
        self.source = None;
        let (source, report) = open_source(&self.src_disk, &self.dir.path().join("src-state"))?;
        self.source = Some(source);
        Ok(report)
    }

    fn source(&mut self) -> &mut Source<Hrl> {
        self.source.as_mut().expect("source open")
    }

    fn tracker(&mut self) -> Arc<Hrl> {
        Arc::clone(self.source().tracker())
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("src-state").join("tracker")
    }

    fn churn(&mut self, writes: usize) -> anyhow::Result<()> {
        let t = self.tracker();
        for _ in 0..writes {
            let len = self.rng.random_range(1..=32 * 1024u64);
            let off = self.rng.random_range(0..RIG_DISK - len);
            let mut data = vec![0u8; len as usize];
            self.rng.fill_bytes(&mut data);
            t.write_tracked(&data, off)?;
        }
        Ok(())
    }

    async fn ship(&mut self) -> anyhow::Result<replicator_core::source::ShipReport> {
        let (sink, key, clock, cfg) = (
            self.local.clone(),
            self.key.clone(),
            self.clock.clone(),
            self.cfg,
        );
        Ok(
            ship_cycle(self.source(), &sink, &key, &clock, &cfg, &NoProgress)
                .await?
                .into_shipped()?,
        )
    }

    async fn hydrate(&mut self) -> anyhow::Result<replicator_core::target::HydrateReport> {
        Ok(hydrate(
            &mut self.target,
            &self.local,
            &self.key,
            &self.clock,
            &HydrateConfig::default(),
            &NoProgress,
        )
        .await?)
    }

    fn identical(&self) -> bool {
        self.src_disk.snapshot() == self.tgt_disk.snapshot()
    }
}

#[tokio::test]
async fn cycles_ship_and_hydrate_through_the_write_log_and_truncate_it_on_acks()
-> anyhow::Result<()> {
    let mut rig = Rig::new(11)?;
    let first = rig.ship().await?;
    assert!(first.initial);
    assert_eq!(first.changed_sectors, RIG_DISK / 512);
    assert!(rig.hydrate().await?.failed.is_none());
    assert!(rig.identical(), "initial copy");
    let mut last_epoch = first.epoch;
    for round in 0..6 {
        rig.churn(25)?;
        if round == 3 {
            // A crash of the source between cycles: nothing is lost.
            let report = rig.crash_source()?;
            assert!(report.unclean);
            assert!(report.records_redone > 0, "{report:?}");
        }
        let shipped = rig.ship().await?;
        assert!(!shipped.initial);
        assert_eq!(
            shipped.acked.len(),
            1,
            "round {round}: the previous cycle's ack"
        );
        // The previous cycle's log went with its acknowledgement; this one's stays until its own.
        assert!(!seg(&rig.log_dir(), last_epoch).exists(), "round {round}");
        assert!(
            seg(&rig.log_dir(), shipped.epoch).exists(),
            "round {round}: kept until acknowledged"
        );
        let r = rig.hydrate().await?;
        assert!(r.failed.is_none(), "round {round}: {:?}", r.failed);
        assert_eq!(r.applied.len(), 1);
        assert!(rig.identical(), "round {round}: target differs from source");
        last_epoch = shipped.epoch;
    }
    // The last acknowledgement: every shipped epoch's log is gone.
    let disk = rig.source().disk_id();
    let disk_key = rig.key.disk_key(&disk);
    let local = rig.local.clone();
    let (acked, _) = sync_acks(rig.source(), &local, &disk_key).await?;
    assert_eq!(acked.len(), 1);
    let t = rig.tracker();
    assert!(
        t.segment_epochs().iter().all(|e| *e > last_epoch),
        "left: {:?}",
        t.segment_epochs()
    );
    let on_disk: Vec<u64> = std::fs::read_dir(rig.log_dir())?
        .filter_map(|e| replicator_core::tracker::hrl::segment_epoch(e.ok()?.file_name().to_str()?))
        .collect();
    assert!(on_disk.is_empty(), "segments left: {on_disk:?}");
    assert!(t.log_bytes() == 0);
    Ok(())
}

#[tokio::test]
async fn a_cycle_the_target_fails_is_carried_and_shipped_from_the_device() -> anyhow::Result<()> {
    use replicator_sink::Sink;
    let mut rig = Rig::new(12)?;
    rig.ship().await?;
    rig.hydrate().await?;
    rig.churn(30)?;
    let shipped = rig.ship().await?;
    let prefix =
        replicator_core::layout::cycle_blobs_prefix(&rig.source().disk_id(), shipped.cycle);
    let blobs = rig.local.list(&prefix).await?;
    let victim = rig.local.root().join(&blobs[0].key);
    let mut bytes = std::fs::read(&victim)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes)?;
    let r = rig.hydrate().await?;
    assert!(r.failed.is_some(), "the corrupt blob fails the cycle");
    rig.churn(10)?;
    let next = rig.ship().await?;
    assert_eq!(next.carried_from_failed, vec![shipped.cycle]);
    assert!(next.changed_sectors >= shipped.changed_sectors);
    let r = rig.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert!(rig.identical());
    Ok(())
}
