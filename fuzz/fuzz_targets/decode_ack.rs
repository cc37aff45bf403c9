//! Raw bytes into `decode_ack` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded;
//! the ack encoding is canonical, so re-encoding a decoded ack under the same
//! session reproduces the input bytes exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{
    MAX_ACK_MESSAGE_BYTES, ObjectKind, Session, decode_ack, peek_header,
};
use replicator_fuzz::{golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let key = golden_disk_key();
    let peek = peek_header(data);
    let decoded = decode_ack(key, data, &golden_expect());
    if let Err(e) = &peek {
        let _ = e.to_string();
        assert!(
            decoded.is_err(),
            "peek_header rejects ({e}) but decode_ack accepts"
        );
    }
    let (header, ack) = match decoded {
        Ok(v) => v,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(Ok(&header), peek.as_ref());
    assert_eq!(header.kind, ObjectKind::Ack);
    assert_eq!(header.seq, 0);
    assert!(ack.message.len() <= MAX_ACK_MESSAGE_BYTES as usize);
    let session = Session::new(
        key,
        header.disk_id,
        header.cycle,
        header.attempt,
        header.salt,
    );
    let again = session.encode_ack(&ack).expect("a decoded ack re-encodes");
    assert_eq!(&again.bytes[..], data, "ack encoding is not canonical");
});
