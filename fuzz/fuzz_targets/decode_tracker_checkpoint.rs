//! Raw bytes into `tracker::cbt::parse_checkpoint`, the parser of the CBT tracker's checkpoint
//! file that a source reads on every start.
//!
//! Must hold: never panics; what parses has bitmaps of the disk's size and a lost reason within
//! its limit, and re-encodes to bytes that parse to the same checkpoint (a version-1 checkpoint
//! re-encodes as version 2, with the generation it was given).

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::tracker::cbt::{checkpoint_bytes, parse_checkpoint};

/// The disk the seeds' bitmaps are for.
const DISK_SECTORS: u64 = 8192;

fuzz_target!(|data: &[u8]| {
    let c = match parse_checkpoint(data, DISK_SECTORS) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(c.current.disk_sectors(), DISK_SECTORS);
    if let Some(f) = &c.frozen {
        assert_eq!(f.disk_sectors(), DISK_SECTORS);
    }
    assert!(c.lost.as_ref().is_none_or(|r| r.len() <= 1024));
    let again = checkpoint_bytes(&c);
    let back = parse_checkpoint(&again, DISK_SECTORS).expect("a re-encoded checkpoint parses");
    assert_eq!(back, c);
});
