//! Golden vectors: the committed files under `tests/golden/` pin the exact
//! bytes of format version 1. Encoding the fixed inputs below must reproduce
//! them, and they must decode to the fixed values.
//!
//! To regenerate after an intended format change (which should also bump
//! `FORMAT_VERSION`): `REPLICATOR_BLESS=1 cargo test --release --test golden`.
#![allow(clippy::expect_used)] // golden-vector helpers panic on their own fixed inputs

use std::path::PathBuf;

use replicator_core::format::{
    Ack, AckStatus, BlobExtent, EncodedObject, Expect, ExtentKind, HEADER_LEN, Manifest,
    ManifestBlob, ObjectKind, Session, decode_ack, decode_blob, decode_manifest, peek_header,
};
use replicator_core::keys::{DiskId, DiskKey, MasterKey};

const BLESS_VAR: &str = "REPLICATOR_BLESS";
const ZSTD_LEVEL: i32 = 3;
/// Key id of the disk key below, pinned so a change in key derivation is
/// reported as such and not only as different golden bytes.
const GOLDEN_KEY_ID: &str = "8d7cee161ddf7d06";

fn master() -> MasterKey {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8;
    }
    MasterKey::from_bytes(b)
}

fn disk() -> DiskId {
    let mut b = [0u8; 16];
    for (i, x) in b.iter_mut().enumerate() {
        *x = 0xA0 + i as u8;
    }
    DiskId(b)
}

fn disk_key() -> DiskKey {
    master().disk_key(&disk())
}

fn session() -> Session {
    Session::new(&disk_key(), disk(), 7, 3, [0x5A; 16])
}

fn expect(seq: Option<u32>) -> Expect {
    Expect {
        disk_id: disk(),
        cycle: 7,
        attempt: Some(3),
        seq,
        tag: None,
    }
}

fn blob_extents() -> Vec<BlobExtent> {
    vec![
        BlobExtent {
            start_sector: 0,
            sector_count: 8,
            kind: ExtentKind::Data,
        },
        BlobExtent {
            start_sector: 8,
            sector_count: 16,
            kind: ExtentKind::Zero,
        },
        BlobExtent {
            start_sector: 100,
            sector_count: 4,
            kind: ExtentKind::Data,
        },
    ]
}

/// 12 sectors of text-like bytes: numbered lines, cut at 6144 bytes.
fn blob_data() -> Vec<u8> {
    let mut out = Vec::new();
    let mut n = 0u32;
    while out.len() < 12 * 512 {
        out.extend_from_slice(
            format!("line {n:04}: replicator golden vector, the quick brown fox jumps over the lazy dog.\n")
                .as_bytes(),
        );
        n += 1;
    }
    out.truncate(12 * 512);
    out
}

fn golden_blob() -> EncodedObject {
    session()
        .encode_blob(0, &blob_extents(), &blob_data(), ZSTD_LEVEL)
        .expect("encode golden blob")
}

fn golden_manifest_value(blob: &EncodedObject) -> Manifest {
    Manifest {
        base_cycle: 6,
        disk_bytes: 1 << 30,
        blobs: vec![
            ManifestBlob {
                seq: 0,
                object_len: blob.bytes.len() as u64,
                tag: blob.tag,
                data_bytes: (8 + 16 + 4) * 512,
            },
            ManifestBlob {
                seq: 1,
                object_len: 4242,
                tag: [0x11; 16],
                data_bytes: 1 << 20,
            },
        ],
        bitmap: b"opaque-bitmap".to_vec(),
        created_unix_ms: 1_700_000_000_000,
    }
}

fn golden_ack_value() -> Ack {
    Ack {
        status: AckStatus::Applied,
        sectors_written: 1234,
        message: "ok".into(),
        // The v1 vector predates generations: it must keep decoding without one.
        target_generation: None,
    }
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden")).join(name)
}

/// With `REPLICATOR_BLESS=1`, writes `encoded` as the golden file; otherwise
/// asserts the committed file equals it. Returns the committed bytes.
fn check_or_bless(name: &str, encoded: &[u8]) -> Vec<u8> {
    let path = golden_path(name);
    let regen = format!("regenerate with: {BLESS_VAR}=1 cargo test --release --test golden");
    if std::env::var(BLESS_VAR).is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        std::fs::write(&path, encoded).expect("write golden file");
        return encoded.to_vec();
    }
    let committed = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => panic!(
            "golden file {} cannot be read ({e}); {regen}",
            path.display()
        ),
    };
    if committed != encoded {
        let first = committed
            .iter()
            .zip(encoded)
            .position(|(a, b)| a != b)
            .unwrap_or(committed.len().min(encoded.len()));
        panic!(
            "encoding no longer reproduces {} (committed {} bytes, now {} bytes, first difference at byte {first}); \
             the byte format changed. If that is intended, bump FORMAT_VERSION and {regen}",
            path.display(),
            committed.len(),
            encoded.len()
        );
    }
    committed
}

#[test]
fn golden_key_id() {
    let id = disk_key().key_id();
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, GOLDEN_KEY_ID, "key derivation changed");
}

#[test]
fn golden_blob_v1() {
    let enc = golden_blob();
    let committed = check_or_bless("blob_v1.bin", &enc.bytes);
    let header = peek_header(&committed).expect("peek");
    assert_eq!(header.kind, ObjectKind::Blob);
    assert_eq!(header.disk_id, disk());
    assert_eq!((header.cycle, header.attempt, header.seq), (7, 3, 0));
    assert_eq!(header.salt, [0x5A; 16]);
    assert_eq!(header.key_id, disk_key().key_id());
    assert_eq!(header.payload_len as usize, committed.len() - HEADER_LEN);
    let d = decode_blob(
        &disk_key(),
        &committed,
        &Expect {
            tag: Some(enc.tag),
            ..expect(Some(0))
        },
    )
    .expect("decode golden blob");
    assert_eq!(d.extents, blob_extents());
    assert_eq!(&d.data[..], &blob_data()[..]);
    assert!(
        d.compressed,
        "text-like golden data must be stored compressed"
    );
    assert!(d.stored_body_len < 12 * 512);
}

#[test]
fn golden_manifest_v1() {
    let blob = golden_blob();
    let m = golden_manifest_value(&blob);
    let enc = session()
        .encode_manifest(&m)
        .expect("encode golden manifest");
    let committed = check_or_bless("manifest_v1.bin", &enc.bytes);
    let (h, back) =
        decode_manifest(&disk_key(), &committed, &expect(Some(0))).expect("decode golden manifest");
    assert_eq!(h.kind, ObjectKind::Manifest);
    assert_eq!((h.cycle, h.attempt, h.seq), (7, 3, 0));
    assert_eq!(back, m);
    // the manifest pins the golden blob by length and tag
    let pinned = &back.blobs[0];
    let blob_file =
        std::fs::read(golden_path("blob_v1.bin")).unwrap_or_else(|_| blob.bytes.to_vec());
    assert_eq!(pinned.object_len as usize, blob_file.len());
    decode_blob(
        &disk_key(),
        &blob_file,
        &Expect {
            tag: Some(pinned.tag),
            ..expect(Some(pinned.seq))
        },
    )
    .expect("manifest-pinned blob decodes");
}

#[test]
fn golden_ack_v1() {
    let a = golden_ack_value();
    let enc = session().encode_ack(&a).expect("encode golden ack");
    let committed = check_or_bless("ack_v1.bin", &enc.bytes);
    let (h, back) =
        decode_ack(&disk_key(), &committed, &expect(Some(0))).expect("decode golden ack");
    assert_eq!(h.kind, ObjectKind::Ack);
    assert_eq!(back, a);
}
