//! Raw bytes into `decode_resync_request` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded; a decoded request's
//! block size is valid and its reason within the limit, and it re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{MAX_ACK_MESSAGE_BYTES, ObjectKind, decode_resync_request};
use replicator_fuzz::{checked_decode, golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let Some((_, request, session)) = checked_decode(data, ObjectKind::ResyncRequest, |d| {
        decode_resync_request(golden_disk_key(), d, &golden_expect())
    }) else {
        return;
    };
    assert!(request.block_bytes.is_power_of_two());
    assert!(request.reason.len() <= MAX_ACK_MESSAGE_BYTES as usize);
    let again = session
        .encode_resync_request(&request)
        .expect("a decoded request re-encodes");
    // A reason that was not valid UTF-8 decodes with replacement characters and cannot
    // re-encode to the same bytes; any other request must.
    if !request.reason.contains('\u{FFFD}') {
        assert_eq!(&again.bytes[..], data, "resync request encoding is not canonical");
    }
});
