//! Raw bytes into `decode_ack` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded;
//! the ack encoding is canonical, so re-encoding a decoded ack under the same
//! session reproduces the input bytes exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{MAX_ACK_MESSAGE_BYTES, ObjectKind, decode_ack};
use replicator_fuzz::{checked_decode, golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let Some((_, ack, session)) = checked_decode(data, ObjectKind::Ack, |d| {
        decode_ack(golden_disk_key(), d, &golden_expect())
    }) else {
        return;
    };
    assert!(ack.message.len() <= MAX_ACK_MESSAGE_BYTES as usize);
    let again = session.encode_ack(&ack).expect("a decoded ack re-encodes");
    assert_eq!(&again.bytes[..], data, "ack encoding is not canonical");
});
