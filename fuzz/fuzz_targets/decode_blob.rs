//! Raw bytes into `decode_blob` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded;
//! a decoded blob is self-consistent and survives re-encoding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{ExtentKind, ObjectKind, SECTOR_SIZE, decode_blob};
use replicator_fuzz::{checked_decode, golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let key = golden_disk_key();
    let Some((header, blob, session)) = checked_decode(data, ObjectKind::Blob, |d| {
        decode_blob(key, d, &golden_expect()).map(|b| (b.header.clone(), b))
    }) else {
        return;
    };
    assert!(!blob.extents.is_empty());
    let data_sectors: u64 = blob
        .extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.sector_count)
        .sum();
    assert_eq!(data_sectors * SECTOR_SIZE, blob.data.len() as u64);
    for w in blob.extents.windows(2) {
        assert!(w[0].start_sector + w[0].sector_count <= w[1].start_sector);
    }
    if blob.compressed {
        assert!(blob.stored_body_len < blob.data.len() as u64);
    } else {
        assert_eq!(blob.stored_body_len, blob.data.len() as u64);
    }

    // Re-encode under the same session: decodes to the same blob, and an
    // uncompressed body is canonical, so the bytes are identical.
    let again = session
        .encode_blob(header.seq, &blob.extents, &blob.data, 3)
        .expect("a decoded blob re-encodes");
    let back = decode_blob(key, &again.bytes, &golden_expect()).expect("re-encoded blob decodes");
    assert_eq!(back.extents, blob.extents);
    assert_eq!(back.data, blob.data);
    if !blob.compressed && !back.compressed {
        assert_eq!(&again.bytes[..], data);
    }
});
