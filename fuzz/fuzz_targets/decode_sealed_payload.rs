//! Arbitrary *authentic* payloads: the fuzzer picks an object kind and a
//! plaintext, the independent `Sealer` encrypts it under the golden session,
//! and the matching decoder parses it. This is the only way random bytes reach
//! the payload parsers behind AES-GCM (extent records, zstd bodies, manifest
//! records, ack messages).
//!
//! Input: byte 0 picks the kind (`% 5`: blob, manifest, ack, catalog, resync
//! request) and, for a blob, the seq (`/ 5`); the rest is the plaintext.
//!
//! Must hold: never panics; whatever decodes is self-consistent and its
//! re-encoding by `Session` is the sealed object again (manifest, ack, and
//! blobs stored uncompressed) or at least decodes to the same blob.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::format::{
    Ack, AckStatus, BlobExtent, Expect, ExtentKind, Manifest, ManifestBlob, ObjectKind,
    SECTOR_SIZE, Session, TAG_LEN, decode_ack, decode_blob, decode_catalog, decode_manifest, decode_resync_request,
};
use replicator_fuzz::{
    GOLDEN_ATTEMPT, GOLDEN_CYCLE, GOLDEN_SALT, Sealer, golden_disk, golden_disk_key, golden_expect,
    noise,
};

fn session() -> Session {
    Session::new(
        golden_disk_key(),
        golden_disk(),
        GOLDEN_CYCLE,
        GOLDEN_ATTEMPT,
        GOLDEN_SALT,
    )
}

/// The sealer must reproduce `Session` byte for byte, or this target would
/// fuzz a different format than the one the engine writes.
fn check_sealer_matches_session() {
    let sealer = Sealer::golden();
    assert_eq!(
        sealer.key_id(),
        golden_disk_key().key_id(),
        "key id derivation"
    );
    let s = session();

    let ack = Ack {
        status: AckStatus::Failed,
        sectors_written: 99,
        message: "disk full".into(),
        target_generation: None,
    };
    let mut p = vec![1u8];
    p.extend_from_slice(&99u64.to_le_bytes());
    p.extend_from_slice(&9u32.to_le_bytes());
    p.extend_from_slice(b"disk full");
    assert_eq!(
        &s.encode_ack(&ack).expect("ack").bytes[..],
        &sealer.seal(ObjectKind::Ack, 0, &p)[..]
    );

    let m = Manifest {
        base_cycle: 6,
        disk_bytes: 1 << 20,
        blobs: vec![ManifestBlob {
            seq: 4,
            object_len: 500,
            tag: [7; 16],
            data_bytes: 1024,
        }],
        bitmap: b"bm".to_vec(),
        created_unix_ms: 42,
    };
    let mut p = Vec::new();
    p.extend_from_slice(&6u64.to_le_bytes());
    p.extend_from_slice(&(1u64 << 20).to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&4u32.to_le_bytes());
    p.extend_from_slice(&500u64.to_le_bytes());
    p.extend_from_slice(&[7; 16]);
    p.extend_from_slice(&1024u64.to_le_bytes());
    p.extend_from_slice(&2u64.to_le_bytes());
    p.extend_from_slice(b"bm");
    p.extend_from_slice(&42u64.to_le_bytes());
    assert_eq!(
        &s.encode_manifest(&m).expect("manifest").bytes[..],
        &sealer.seal(ObjectKind::Manifest, 0, &p)[..]
    );

    // incompressible data is stored raw, so the blob plaintext is predictable
    let data = noise(1024, 5);
    let ext = [BlobExtent {
        start_sector: 3,
        sector_count: 2,
        kind: ExtentKind::Data,
    }];
    let mut p = vec![0u8];
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&3u64.to_le_bytes());
    p.extend_from_slice(&2u64.to_le_bytes());
    p.push(0);
    p.extend_from_slice(&1024u64.to_le_bytes());
    p.extend_from_slice(&crc32fast_hash(&data).to_le_bytes());
    p.extend_from_slice(&1024u64.to_le_bytes());
    p.extend_from_slice(&data);
    assert_eq!(
        &s.encode_blob(9, &ext, &data, 3).expect("blob").bytes[..],
        &sealer.seal(ObjectKind::Blob, 9, &p)[..]
    );
}

fn crc32fast_hash(b: &[u8]) -> u32 {
    // CRC-32 (IEEE), bitwise; independent of the crc32fast crate the engine uses.
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(
    init: check_sealer_matches_session(),
    |data: &[u8]| {
        let Some((&sel, plaintext)) = data.split_first() else { return };
        let kind = [
            ObjectKind::Blob,
            ObjectKind::Manifest,
            ObjectKind::Ack,
            ObjectKind::Catalog,
            ObjectKind::ResyncRequest,
        ][usize::from(sel % 5)];
        let seq = if kind == ObjectKind::Blob { u32::from(sel / 5) } else { 0 };
        let sealed = Sealer::golden().seal(kind, seq, plaintext);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sealed[sealed.len() - TAG_LEN..]);
        let expect = Expect { seq: Some(seq), tag: Some(tag), ..golden_expect() };
        let key = golden_disk_key();
        match kind {
            ObjectKind::Blob => {
                let blob = match decode_blob(key, &sealed, &expect) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = e.to_string();
                        return;
                    }
                };
                let data_sectors: u64 = blob
                    .extents
                    .iter()
                    .filter(|e| e.kind == ExtentKind::Data)
                    .map(|e| e.sector_count)
                    .sum();
                assert_eq!(data_sectors * SECTOR_SIZE, blob.data.len() as u64);
                // stored data crc: after flags, extent count, extents, data_len
                let at = 1 + 4 + 17 * blob.extents.len() + 8;
                let stored = u32::from_le_bytes(plaintext[at..at + 4].try_into().expect("4 bytes"));
                assert_eq!(crc32fast_hash(&blob.data), stored);
                let again = session()
                    .encode_blob(seq, &blob.extents, &blob.data, 3)
                    .expect("a decoded blob re-encodes");
                let back = decode_blob(key, &again.bytes, &golden_expect()).expect("re-encoded blob decodes");
                assert_eq!(back.extents, blob.extents);
                assert_eq!(back.data, blob.data);
                if !blob.compressed && !back.compressed {
                    assert_eq!(&again.bytes[..], &sealed[..]);
                }
            }
            ObjectKind::Manifest => {
                let (_, m) = match decode_manifest(key, &sealed, &expect) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = e.to_string();
                        return;
                    }
                };
                let again = session().encode_manifest(&m).expect("a decoded manifest re-encodes");
                assert_eq!(&again.bytes[..], &sealed[..], "manifest encoding is not canonical");
            }
            ObjectKind::Ack => {
                let (_, a) = match decode_ack(key, &sealed, &expect) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = e.to_string();
                        return;
                    }
                };
                let again = session().encode_ack(&a).expect("a decoded ack re-encodes");
                assert_eq!(&again.bytes[..], &sealed[..], "ack encoding is not canonical");
            }
            ObjectKind::Catalog => {
                let (_, c) = match decode_catalog(key, &sealed, &expect) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = e.to_string();
                        return;
                    }
                };
                assert_eq!(c.digests.len() as u64, c.disk_bytes.div_ceil(u64::from(c.block_bytes)));
                let again = session().encode_catalog(&c).expect("a decoded catalog re-encodes");
                let (_, back) = decode_catalog(key, &again.bytes, &golden_expect())
                    .expect("a re-encoded catalog decodes");
                assert_eq!(back, c);
            }
            ObjectKind::ResyncRequest => {
                let (_, q) = match decode_resync_request(key, &sealed, &expect) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = e.to_string();
                        return;
                    }
                };
                let again =
                    session().encode_resync_request(&q).expect("a decoded request re-encodes");
                if !q.reason.contains('\u{FFFD}') {
                    assert_eq!(&again.bytes[..], &sealed[..], "request encoding is not canonical");
                }
            }
        }
    }
);
