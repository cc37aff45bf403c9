//! Raw bytes into `decode_manifest` (and `peek_header`) under the golden key.
//!
//! Must hold: never panics; a header `peek_header` rejects is never decoded;
//! the manifest encoding is canonical, so re-encoding a decoded manifest under
//! the same session reproduces the input bytes exactly.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{ObjectKind, Session, decode_manifest, peek_header};
use replicator_fuzz::{golden_disk_key, golden_expect};

fuzz_target!(|data: &[u8]| {
    let key = golden_disk_key();
    let peek = peek_header(data);
    let decoded = decode_manifest(key, data, &golden_expect());
    if let Err(e) = &peek {
        let _ = e.to_string();
        assert!(
            decoded.is_err(),
            "peek_header rejects ({e}) but decode_manifest accepts"
        );
    }
    let (header, manifest) = match decoded {
        Ok(v) => v,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(Ok(&header), peek.as_ref());
    assert_eq!(header.kind, ObjectKind::Manifest);
    assert_eq!(header.seq, 0);
    let session = Session::new(
        key,
        header.disk_id,
        header.cycle,
        header.attempt,
        header.salt,
    );
    let again = session
        .encode_manifest(&manifest)
        .expect("a decoded manifest re-encodes");
    assert_eq!(&again.bytes[..], data, "manifest encoding is not canonical");
});
