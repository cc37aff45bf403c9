//! Discards: image files get holes that read as zeros, memory disks get zeros, and the CBT and HRL
//! trackers mark a discarded range like a write (HRL logs one header-only zero record for it,
//! whatever its length), serve the frozen epoch as of the freeze, and redo a discard after a
//! crash.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use replicator_core::device::{BlockDevice, DeviceOp, FileDevice, MemDevice};
use replicator_core::tracker::hrl::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use replicator_core::tracker::{CbtTracker, ChangeTracker, HrlConfig, HrlTracker, TrackerConfig};

const MIB: u64 = 1 << 20;

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn an_image_file_gets_a_hole_that_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let dev = FileDevice::create_sparse(&path, 8 * MIB).unwrap();
    dev.write_at(&pattern(8 * MIB, 3), 0).unwrap();
    dev.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks() * 512;
    dev.discard(2 * MIB, 4 * MIB).unwrap();
    dev.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        after + 4 * MIB <= before + 64 * 1024,
        "the discard gave back its space: {before} -> {after} bytes allocated"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        8 * MIB,
        "size kept"
    );
    let all = read(&dev, 0, 8 * MIB);
    let want = pattern(8 * MIB, 3);
    assert_eq!(all[..(2 * MIB) as usize], want[..(2 * MIB) as usize]);
    assert!(
        all[(2 * MIB) as usize..(6 * MIB) as usize]
            .iter()
            .all(|b| *b == 0)
    );
    assert_eq!(all[(6 * MIB) as usize..], want[(6 * MIB) as usize..]);
    // Not whole blocks: the file system zeroes the partial blocks.
    dev.discard(100, 1000).unwrap();
    let head = read(&dev, 0, 4096);
    assert_eq!(head[..100], want[..100]);
    assert!(head[100..1100].iter().all(|b| *b == 0));
    assert_eq!(head[1100..], want[1100..4096]);
    // Out of range: an error naming the operation and the range.
    let e = dev.discard(8 * MIB - 512, 1024).unwrap_err();
    assert_eq!(e.op, DeviceOp::Discard);
    assert!(e.to_string().contains("discard of 1024 bytes"), "{e}");
}

#[test]
fn a_memory_disk_and_the_default_discard_write_zeros() {
    let mem = MemDevice::new("m", MIB);
    mem.write_at(&pattern(MIB, 1), 0).unwrap();
    mem.discard(4096, 8192).unwrap();
    let all = read(&mem, 0, MIB);
    assert!(all[4096..12288].iter().all(|b| *b == 0));
    assert_eq!(all[..4096], pattern(MIB, 1)[..4096]);
    // Through an Arc (the default forwards).
    let arc: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("a", MIB));
    arc.write_at(&pattern(MIB, 2), 0).unwrap();
    arc.discard(0, MIB).unwrap();
    assert!(read(arc.as_ref(), 0, MIB).iter().all(|b| *b == 0));
}

#[test]
fn cbt_marks_a_discard_and_serves_the_frozen_epoch_as_of_the_freeze() {
    let dev = Arc::new(MemDevice::new("cbt", 4 * MIB));
    let t = CbtTracker::in_memory(Arc::clone(&dev), TrackerConfig::default());
    t.write_at(&pattern(MIB, 5), MIB).unwrap();
    let frozen = t.freeze().unwrap();
    assert_eq!(frozen.bitmap.count(), MIB / 512);
    // Discarded after the freeze: the frozen epoch still reads the data, the next one ships
    // the zeros.
    t.discard(MIB, MIB).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    t.read_frozen(&mut buf, MIB).unwrap();
    assert_eq!(buf, pattern(MIB, 5));
    t.release(true).unwrap();
    let next = t.freeze().unwrap();
    assert_eq!(next.bitmap.count(), MIB / 512);
    t.read_frozen(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    t.release(true).unwrap();
}

#[test]
fn hrl_logs_a_discard_as_one_zero_record_and_redoes_it_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new("hrl", 64 * MIB));
    let log = dir.path().join("log");
    let (t, _) = HrlTracker::open(Arc::clone(&dev), &log, HrlConfig::default()).unwrap();
    t.write_at(&pattern(MIB, 7), 0).unwrap();
    let logged = t.log_bytes();
    // The whole disk: one header-only record, not 64 MiB of zeros (nor an overflow).
    t.discard(0, 64 * MIB).unwrap();
    assert_eq!(t.log_bytes(), logged + RECORD_HEADER_LEN);
    assert!(!t.overflowed());
    // Written again after the discard: the log's last word wins per sector.
    t.write_at(&pattern(4096, 9), 8192).unwrap();
    let frozen = t.freeze().unwrap();
    assert_eq!(frozen.bitmap.count(), 64 * MIB / 512);
    // A write after the freeze does not show in the frozen epoch.
    t.write_at(&pattern(4096, 11), 0).unwrap();
    let mut head = vec![0u8; 16384];
    t.read_frozen(&mut head, 0).unwrap();
    assert!(
        head[..8192].iter().all(|b| *b == 0),
        "discarded as of the freeze"
    );
    assert_eq!(head[8192..12288], pattern(4096, 9)[..]);
    assert!(head[12288..].iter().all(|b| *b == 0));
    t.release(true).unwrap();
    t.acknowledged(1).unwrap();

    // A crash after a logged discard whose device write was lost: the open redoes it.
    t.write_at(&pattern(MIB, 13), 2 * MIB).unwrap();
    t.discard(2 * MIB, MIB / 2).unwrap();
    dev.write_at(&pattern(MIB / 2, 15), 2 * MIB).unwrap(); // as if the discard never landed
    drop(t);
    let (t, report) = HrlTracker::open(Arc::clone(&dev), &log, HrlConfig::default()).unwrap();
    assert!(report.unclean && report.records_redone >= 2, "{report:?}");
    let region = read(dev.as_ref(), 2 * MIB, MIB);
    assert!(region[..(MIB / 2) as usize].iter().all(|b| *b == 0));
    assert_eq!(
        region[(MIB / 2) as usize..],
        pattern(MIB, 13)[(MIB / 2) as usize..]
    );
    // Not whole sectors: logged and written as zeros, still marked.
    t.write_at(&pattern(4096, 17), 40 * MIB).unwrap();
    t.discard(40 * MIB + 100, 1000).unwrap();
    let got = read(dev.as_ref(), 40 * MIB, 4096);
    assert_eq!(got[..100], pattern(4096, 17)[..100]);
    assert!(got[100..1100].iter().all(|b| *b == 0));
    assert_eq!(got[1100..], pattern(4096, 17)[1100..]);
    let frozen = t.freeze().unwrap();
    assert!(frozen.bitmap.count() >= 8 && t.log_bytes() > SEGMENT_HEADER_LEN);
    t.release(true).unwrap();
}
