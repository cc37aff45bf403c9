//! Structured round trip and tamper detection for all three object kinds.
//!
//! The fuzzer builds a valid blob, manifest or ack (`arbitrary`), encodes it
//! with `Session` under a fuzzer-chosen master key, disk, cycle, attempt and
//! salt, then applies a list of tamper operations (possibly empty, possibly
//! cancelling out).
//!
//! Must hold:
//! - encoding a valid value succeeds, is deterministic, and the intact bytes
//!   decode (with the strictest `Expect`: seq and tag pinned) to exactly the
//!   value that was encoded, with the header `peek_header` reports;
//! - the intact bytes are refused as the other two kinds, under a wrong
//!   expectation, and under another master key;
//! - any change at all to the bytes (flip, overwrite, truncate, append,
//!   insert, remove, a rewritten header field, even with `payload_len` and the
//!   header CRC recomputed as a forger would) is refused by the decoder, also
//!   with the loosest `Expect` (any attempt, seq and tag).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use replicator_core::format::{
    Ack, AckStatus, BlobExtent, EncodedObject, Expect, ExtentKind, FormatError,
    MAX_ACK_MESSAGE_BYTES, Manifest, ManifestBlob, ObjectHeader, ObjectKind, SECTOR_SIZE, Session,
    decode_ack, decode_catalog, decode_resync_request, decode_blob, decode_manifest, peek_header,
};
use replicator_core::keys::{DiskId, DiskKey, MasterKey};
use replicator_fuzz::{Tamper, apply_tamper, noise};

#[derive(Arbitrary, Debug)]
struct ExtentSpec {
    /// Sectors between the previous extent's end and this one's start.
    gap: u16,
    /// 1..=8 sectors (taken as `count % 8 + 1`).
    count: u8,
    is_data: bool,
}

#[derive(Arbitrary, Debug)]
enum DataSpec {
    /// Incompressible bytes: the body is stored raw.
    Noise { seed: u64 },
    /// A short pattern repeated: the body is stored as a zstd frame.
    Repeat { pattern: Vec<u8> },
    /// All zero data sectors.
    Zeros,
}

#[derive(Arbitrary, Debug)]
enum Object {
    Blob {
        seq: u32,
        /// First extent starts at `base >> 10` (keeps every byte offset in u64).
        base: u64,
        extents: Vec<ExtentSpec>,
        data: DataSpec,
        /// zstd level 1..=4.
        level: u8,
    },
    Manifest {
        base_cycle: u64,
        disk_bytes: u64,
        blobs: Vec<(u32, u64, [u8; 16], u64)>,
        bitmap: Vec<u8>,
        created_unix_ms: u64,
    },
    Ack {
        failed: bool,
        sectors_written: u64,
        message: String,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    master: [u8; 32],
    disk: [u8; 16],
    cycle: u64,
    attempt: u64,
    salt: [u8; 16],
    object: Object,
    tamper: Vec<Tamper>,
}

/// The decoded value, for equality with what was encoded.
#[derive(Debug, PartialEq)]
enum Value {
    Blob {
        extents: Vec<BlobExtent>,
        data: Vec<u8>,
    },
    Manifest(Manifest),
    Ack(Ack),
    /// A kind this target never builds.
    Other,
}

fn decode(
    kind: ObjectKind,
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
) -> Result<(ObjectHeader, Value), FormatError> {
    match kind {
        ObjectKind::Blob => decode_blob(key, bytes, expect).map(|b| {
            if b.compressed {
                assert!(b.stored_body_len < b.data.len() as u64);
            } else {
                assert_eq!(b.stored_body_len, b.data.len() as u64);
            }
            (
                b.header,
                Value::Blob {
                    extents: b.extents,
                    data: b.data.to_vec(),
                },
            )
        }),
        ObjectKind::Manifest => {
            decode_manifest(key, bytes, expect).map(|(h, m)| (h, Value::Manifest(m)))
        }
        ObjectKind::Ack => decode_ack(key, bytes, expect).map(|(h, a)| (h, Value::Ack(a))),
        ObjectKind::Catalog => decode_catalog(key, bytes, expect).map(|(h, _)| (h, Value::Other)),
        ObjectKind::ResyncRequest => {
            decode_resync_request(key, bytes, expect).map(|(h, _)| (h, Value::Other))
        }
    }
}

/// Builds the value and encodes it; `None` when the value is one the encoder
/// must refuse (and it did).
fn encode(session: &Session, object: Object) -> Option<(ObjectKind, u32, Value, EncodedObject)> {
    match object {
        Object::Blob {
            seq,
            base,
            extents: specs,
            data,
            level,
        } => {
            let mut pos = base >> 10;
            let mut extents = Vec::new();
            for s in specs.iter().take(16) {
                let start = pos + u64::from(s.gap);
                let count = u64::from(s.count % 8) + 1;
                extents.push(BlobExtent {
                    start_sector: start,
                    sector_count: count,
                    kind: if s.is_data {
                        ExtentKind::Data
                    } else {
                        ExtentKind::Zero
                    },
                });
                pos = start + count;
            }
            let sectors: u64 = extents
                .iter()
                .filter(|e| e.kind == ExtentKind::Data)
                .map(|e| e.sector_count)
                .sum();
            let len = (sectors * SECTOR_SIZE) as usize;
            let bytes = match data {
                DataSpec::Noise { seed } => noise(len, seed),
                DataSpec::Repeat { pattern } if !pattern.is_empty() => {
                    pattern.iter().copied().cycle().take(len).collect()
                }
                DataSpec::Repeat { .. } | DataSpec::Zeros => vec![0; len],
            };
            let level = i32::from(level % 4) + 1;
            let result = session.encode_blob(seq, &extents, &bytes, level);
            if extents.is_empty() {
                assert!(
                    matches!(result, Err(FormatError::InvalidExtents { .. })),
                    "{result:?}"
                );
                return None;
            }
            let enc = result.expect("valid blob encodes");
            let again = session
                .encode_blob(seq, &extents, &bytes, level)
                .expect("re-encoding the same blob is allowed");
            assert_eq!(again.bytes, enc.bytes, "blob encoding is deterministic");
            Some((
                ObjectKind::Blob,
                seq,
                Value::Blob {
                    extents,
                    data: bytes,
                },
                enc,
            ))
        }
        Object::Manifest {
            base_cycle,
            disk_bytes,
            blobs,
            bitmap,
            created_unix_ms,
        } => {
            let m = Manifest {
                base_cycle,
                disk_bytes,
                blobs: blobs
                    .into_iter()
                    .map(|(seq, object_len, tag, data_bytes)| ManifestBlob {
                        seq,
                        object_len,
                        tag,
                        data_bytes,
                    })
                    .collect(),
                bitmap,
                created_unix_ms,
            };
            let enc = session.encode_manifest(&m).expect("valid manifest encodes");
            let again = session.encode_manifest(&m).expect("same manifest again");
            assert_eq!(again.bytes, enc.bytes, "manifest encoding is deterministic");
            Some((ObjectKind::Manifest, 0, Value::Manifest(m), enc))
        }
        Object::Ack {
            failed,
            sectors_written,
            message,
        } => {
            let a = Ack {
                status: if failed {
                    AckStatus::Failed
                } else {
                    AckStatus::Applied
                },
                sectors_written,
                message,
                // Acks with and without the target's generation.
                target_generation: (sectors_written % 2 == 1).then_some([sectors_written as u8; 16]),
            };
            let result = session.encode_ack(&a);
            if a.message.len() > MAX_ACK_MESSAGE_BYTES as usize {
                assert!(
                    matches!(result, Err(FormatError::LimitExceeded { .. })),
                    "{result:?}"
                );
                return None;
            }
            let enc = result.expect("valid ack encodes");
            // a different ack under the same (kind, seq) would reuse the nonce
            let other = Ack {
                sectors_written: a.sectors_written ^ 1,
                ..a.clone()
            };
            assert!(matches!(
                session.encode_ack(&other),
                Err(FormatError::NonceReuse { .. })
            ));
            assert_eq!(
                session.encode_ack(&a).expect("same ack again").bytes,
                enc.bytes
            );
            Some((ObjectKind::Ack, 0, Value::Ack(a), enc))
        }
    }
}

fuzz_target!(|input: Input| {
    let disk = DiskId(input.disk);
    let key = MasterKey::from_bytes(input.master).disk_key(&disk);
    let session = Session::new(&key, disk, input.cycle, input.attempt, input.salt);
    let Some((kind, seq, value, enc)) = encode(&session, input.object) else {
        return;
    };
    let original = enc.bytes.to_vec();
    assert_eq!(&original[original.len() - 16..], &enc.tag[..]);

    let strict = Expect {
        disk_id: disk,
        cycle: input.cycle,
        attempt: Some(input.attempt),
        seq: Some(seq),
        tag: Some(enc.tag),
    };
    let loose = Expect {
        attempt: None,
        seq: None,
        tag: None,
        ..strict.clone()
    };

    // Intact: exact round trip.
    let header = peek_header(&original).expect("intact header");
    assert_eq!(header.kind, kind);
    assert_eq!(header.key_id, key.key_id());
    assert_eq!(header.disk_id, disk);
    assert_eq!(
        (header.cycle, header.attempt, header.seq),
        (input.cycle, input.attempt, seq)
    );
    assert_eq!(header.salt, input.salt);
    assert_eq!(header.payload_len as usize, original.len() - 96);
    let (h, back) = decode(kind, &key, &original, &strict).expect("intact object decodes");
    assert_eq!(h, header);
    assert_eq!(back, value);
    assert_eq!(
        decode(kind, &key, &original, &loose).expect("loose").1,
        value
    );

    // Intact but asked for as something else.
    for other in [ObjectKind::Blob, ObjectKind::Manifest, ObjectKind::Ack] {
        if other != kind {
            assert!(matches!(
                decode(other, &key, &original, &loose),
                Err(FormatError::WrongKind { .. })
            ));
        }
    }
    let wrong_cycle = Expect {
        cycle: input.cycle.wrapping_add(1),
        ..loose.clone()
    };
    assert!(matches!(
        decode(kind, &key, &original, &wrong_cycle),
        Err(FormatError::Misplaced { field: "cycle", .. })
    ));
    let mut other_master = input.master;
    other_master[0] ^= 1;
    let other_key = MasterKey::from_bytes(other_master).disk_key(&disk);
    assert!(decode(kind, &other_key, &original, &loose).is_err_and(|e| e.is_wrong_key()));

    // Tampered: any change must be refused.
    let mut bytes = original.clone();
    apply_tamper(&mut bytes, &input.tamper);
    if bytes == original {
        return;
    }
    for expect in [&strict, &loose] {
        if let Ok((h, v)) = decode(kind, &key, &bytes, expect) {
            panic!(
                "tampered {kind} accepted ({} bytes, was {}): header {h:?}, value {v:?}",
                bytes.len(),
                original.len()
            );
        }
    }
});
