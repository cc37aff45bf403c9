//! Raw bytes into `SectorBitmap::decode`.
//!
//! Must hold: never panics; the `RPLBMAP1` encoding is canonical (runs sorted,
//! maximal, non-adjacent), so whatever decodes re-encodes to the input bytes,
//! and the decoded set is exactly the listed runs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::bitmap::{Extent, HEADER_LEN, RUN_LEN, SectorBitmap};

fuzz_target!(|data: &[u8]| {
    let bm = match SectorBitmap::decode(data) {
        Ok(bm) => bm,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(bm.encode(), data, "bitmap encoding is not canonical");
    let runs: Vec<Extent> = data[HEADER_LEN..data.len() - 4]
        .chunks_exact(RUN_LEN)
        .map(|r| {
            Extent::new(
                u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(r[8..].try_into().expect("8 bytes")),
            )
        })
        .collect();
    assert_eq!(bm.extents().collect::<Vec<_>>(), runs);
    assert_eq!(bm.count(), runs.iter().map(|e| e.sector_count).sum::<u64>());
    assert_eq!(bm.is_empty(), runs.is_empty());
    for e in &runs {
        assert!(bm.contains(e.start_sector));
        assert!(bm.contains(e.end_sector() - 1));
        assert!(!bm.contains(e.end_sector()));
        if e.start_sector > 0 {
            assert!(!bm.contains(e.start_sector - 1));
        }
    }
    let _ = bm.memory_bytes();
});
