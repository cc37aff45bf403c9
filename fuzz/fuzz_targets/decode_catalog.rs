//! Raw bytes into `decode_catalog` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded; a decoded catalog has
//! exactly one digest per block of its disk, and re-encodes to a catalog that decodes equal (the
//! zstd frame of the digests need not be byte-identical, so equality is of the decoded values).

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{ObjectKind, decode_catalog};
use replicator_fuzz::{checked_decode, golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let Some((_, catalog, session)) = checked_decode(data, ObjectKind::Catalog, |d| {
        decode_catalog(golden_disk_key(), d, &golden_expect())
    }) else {
        return;
    };
    let blocks = catalog.disk_bytes.div_ceil(u64::from(catalog.block_bytes));
    assert_eq!(catalog.digests.len() as u64, blocks);
    let again = session
        .encode_catalog(&catalog)
        .expect("a decoded catalog re-encodes");
    let (_, back) = decode_catalog(golden_disk_key(), &again.bytes, &golden_expect())
        .expect("a re-encoded catalog decodes");
    assert_eq!(back, catalog);
});
