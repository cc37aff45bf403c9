//! Raw bytes into `decode_manifest` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded;
//! the manifest encoding is canonical, so re-encoding a decoded manifest under
//! the same session reproduces the input bytes exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{ObjectKind, decode_manifest};
use replicator_fuzz::{checked_decode, golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let Some((_, manifest, session)) = checked_decode(data, ObjectKind::Manifest, |d| {
        decode_manifest(golden_disk_key(), d, &golden_expect())
    }) else {
        return;
    };
    let again = session
        .encode_manifest(&manifest)
        .expect("a decoded manifest re-encodes");
    assert_eq!(&again.bytes[..], data, "manifest encoding is not canonical");
});
