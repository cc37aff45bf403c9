//! Structured round trip of `SectorBitmap` against a reference model.
//!
//! The fuzzer picks a disk size and two lists of mark / clear / mark_bytes
//! operations. Each list is applied to a `SectorBitmap` and to `Intervals`
//! (sorted disjoint ranges, obviously correct).
//!
//! Must hold: every operation succeeds exactly when its range lies on the disk
//! (and a refused one changes nothing); the bitmap always equals the model
//! (runs, count, membership, windowed runs); encode then decode gives an equal
//! bitmap whose encoding is the same bytes; union and difference of the two
//! bitmaps equal the model's; combining bitmaps of different disks is refused.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use replicator_core::bitmap::{BitmapError, CHUNK_SECTORS, Extent, SECTOR_SIZE, SectorBitmap};
use replicator_fuzz::Intervals;

#[derive(Arbitrary, Debug)]
enum DiskSize {
    /// Up to 16 chunks: many chunk boundaries within reach.
    Small(u16),
    /// Up to 2^24 sectors (4096 chunks).
    Medium(u32),
    /// Any size, including sizes near `u64::MAX`.
    Huge(u64),
    Max,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum OpKind {
    Mark,
    Clear,
    MarkBytes,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    start: u64,
    count: u64,
    /// How `start`/`count` are mapped onto the disk: 0 raw (mostly out of
    /// range), 1 anywhere on the disk with any length (maybe one past the
    /// end), 2 a short run near a chunk boundary.
    mode: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    disk: DiskSize,
    a: Vec<Op>,
    b: Vec<Op>,
    window: (u64, u64),
}

/// Maps an op onto (start, count) in its own units (sectors, or bytes for
/// `MarkBytes`).
fn place(op: &Op, disk: u64) -> (u64, u64) {
    match op.mode % 3 {
        0 => (op.start, op.count),
        1 => {
            let start = op.start % disk.saturating_add(1).max(1);
            let room = disk - start.min(disk);
            let count = op.count % room.saturating_add(2).max(1);
            match op.kind {
                OpKind::MarkBytes => (
                    start.saturating_mul(SECTOR_SIZE),
                    count.saturating_mul(SECTOR_SIZE),
                ),
                _ => (start, count),
            }
        }
        _ => {
            let chunks = disk.div_ceil(CHUNK_SECTORS).max(1);
            let boundary = (op.start % chunks) * CHUNK_SECTORS;
            let start = boundary
                .saturating_sub(op.count % 64)
                .saturating_add((op.count >> 6) % 64);
            let count = (op.count >> 12) % (2 * CHUNK_SECTORS + 3);
            match op.kind {
                OpKind::MarkBytes => (
                    start
                        .saturating_mul(SECTOR_SIZE)
                        .saturating_add((op.count >> 24) % 512),
                    count
                        .saturating_mul(SECTOR_SIZE)
                        .saturating_sub((op.count >> 33) % 512),
                ),
                _ => (start, count),
            }
        }
    }
}

/// Applies one op to both; checks the outcome matches the model's rule.
fn apply(bm: &mut SectorBitmap, model: &mut Intervals, op: &Op) {
    let disk = bm.disk_sectors();
    let (start, count) = place(op, disk);
    let (sector, sectors) = match op.kind {
        OpKind::Mark | OpKind::Clear => (start, count),
        OpKind::MarkBytes => {
            // sectors the byte range touches, rounding outwards
            let s = u128::from(start) / 512;
            let e = (u128::from(start) + u128::from(count)).div_ceil(512);
            (s as u64, if count == 0 { 0 } else { (e - s) as u64 })
        }
    };
    let end = sector.checked_add(sectors);
    let valid = sectors == 0 || end.is_some_and(|e| e <= disk);
    let before = (sectors != 0 && !valid).then(|| bm.clone());
    let result = match op.kind {
        OpKind::Mark => bm.mark_sectors(start, count),
        OpKind::Clear => bm.clear_sectors(start, count),
        OpKind::MarkBytes => bm.mark_bytes(start, count),
    };
    if valid {
        assert_eq!(
            result,
            Ok(()),
            "{op:?} -> ({start}, {count}) on disk {disk}"
        );
        if let Some(end) = end {
            match op.kind {
                OpKind::Clear => model.clear(sector, end),
                _ => model.mark(sector, end),
            }
        }
    } else {
        assert_eq!(
            result,
            Err(BitmapError::OutOfRange {
                start_sector: sector,
                sector_count: sectors,
                disk_sectors: disk,
            }),
            "{op:?} -> ({start}, {count}) on disk {disk}"
        );
        assert!(
            before.is_some_and(|b| b == *bm),
            "a refused op changed the bitmap"
        );
    }
}

fn as_extents(v: &[(u64, u64)]) -> Vec<Extent> {
    v.iter().map(|&(a, b)| Extent::new(a, b - a)).collect()
}

/// The bitmap equals the model in every observable way, and survives
/// encode/decode.
fn check(bm: &SectorBitmap, model: &Intervals, window: (u64, u64)) {
    assert_eq!(bm.extents().collect::<Vec<_>>(), as_extents(&model.0));
    assert_eq!(bm.count(), model.count());
    assert_eq!(bm.is_empty(), model.0.is_empty());
    for &(a, b) in model.0.iter().take(32) {
        for s in [a.wrapping_sub(1), a, b - 1, b] {
            assert_eq!(
                bm.contains(s),
                model.contains(s) && s < bm.disk_sectors(),
                "sector {s}"
            );
        }
    }
    let (w_start, w_len) = window;
    let w_end = w_start.saturating_add(w_len).min(bm.disk_sectors());
    assert_eq!(
        bm.extents_within(w_start, w_len).collect::<Vec<_>>(),
        as_extents(&model.within(w_start.min(w_end), w_end)),
        "window ({w_start}, {w_len})"
    );
    let _ = bm.memory_bytes();

    let bytes = bm.encode();
    let back = SectorBitmap::decode(&bytes).expect("own encoding decodes");
    assert_eq!(&back, bm);
    assert_eq!(back.encode(), bytes);
}

fuzz_target!(|input: Input| {
    let disk = match input.disk {
        DiskSize::Small(n) => u64::from(n),
        DiskSize::Medium(n) => u64::from(n) % (1 << 24),
        DiskSize::Huge(n) => n,
        DiskSize::Max => u64::MAX,
    };

    let mut a = SectorBitmap::new(disk);
    let mut ma = Intervals::default();
    for op in input.a.iter().take(48) {
        apply(&mut a, &mut ma, op);
    }
    check(&a, &ma, input.window);

    let mut b = SectorBitmap::new(disk);
    let mut mb = Intervals::default();
    for op in input.b.iter().take(48) {
        apply(&mut b, &mut mb, op);
    }
    check(&b, &mb, input.window);

    let mut u = a.clone();
    u.union_with(&b).expect("same disk");
    let mut mu = ma.clone();
    mu.union(&mb);
    check(&u, &mu, input.window);

    let mut d = a.clone();
    d.difference_with(&b).expect("same disk");
    let mut md = ma.clone();
    md.difference(&mb);
    check(&d, &md, input.window);

    let full = SectorBitmap::full(disk);
    let mf = Intervals(if disk == 0 { vec![] } else { vec![(0, disk)] });
    check(&full, &mf, input.window);
    let mut rest = full.clone();
    rest.difference_with(&a).expect("same disk");
    let mut mrest = mf.clone();
    mrest.difference(&ma);
    check(&rest, &mrest, input.window);

    let other = SectorBitmap::new(disk ^ 1);
    assert_eq!(
        a.clone().union_with(&other),
        Err(BitmapError::SizeMismatch {
            left: disk,
            right: disk ^ 1
        })
    );
    assert!(a.clone().difference_with(&other).is_err());
});
