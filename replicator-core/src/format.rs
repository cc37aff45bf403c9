//! Byte format of every object the engine stores in the untrusted cache:
//! blobs of changed sectors, cycle manifests and acknowledgements.
//!
//! This module owns:
//! - every constant of the format (magic, version, offsets, lengths, limits,
//!   key-derivation labels), all in the block at the top of this file with
//!   the byte layout beside them;
//! - the common envelope: a fixed 96-byte plaintext header that is entirely
//!   the AES-256-GCM associated data, then ciphertext and tag;
//! - encoding ([`Session`]) and decoding ([`decode_blob`], [`decode_manifest`],
//!   [`decode_ack`], [`peek_header`]) with every check in a fixed order and a
//!   typed [`FormatError`] for each.
//!
//! The cache sees only the header (kind, key id, disk id, cycle, attempt, seq,
//! salt, nonce, lengths), never plaintext data, extent maps, manifests or ack
//! messages. `FORMAT-objects.md` specifies every byte.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use std::sync::Arc;

use bytes::Bytes;
use replicator_sink::buf::{BufPool, PooledBuf};

use crate::keys::{DiskId, DiskKey, SessionKey, to_hex};

// ===========================================================================
// FORMAT CONSTANTS: every magic number of the format lives here.
// ===========================================================================
//
// Key file (UTF-8 text), as written:
//   "# replicator master key v1\n" <64 lowercase hex chars = 32-byte master key> "\n"
//   (reader ignores blank lines and lines starting with '#')
//
// Key derivation, HKDF-SHA256 (RFC 5869):
//   disk key    = HKDF(salt = "replicator/v1/disk", ikm = master key[32],
//                      info = disk id[16])                                  -> 32 bytes
//   key id      = HKDF-Expand(prk = disk key, info = "replicator/v1/key-id") -> first 8 bytes
//   session key = HKDF(salt = header salt[16], ikm = disk key,
//                      info = "replicator/v1/session" || kind u8 || disk id[16]
//                             || cycle u64 LE || attempt u64 LE)            -> 32-byte AES-256-GCM key
//
// Object = header[96] || ciphertext || gcm tag[16]
// Header (all integers little-endian; all 96 bytes are the AES-GCM AAD):
//   off  len  field
//     0    8  magic        "RPLOBJ\0\x01"
//     8    2  version      u16 = 1
//    10    1  kind         u8: 1 blob, 2 manifest, 3 ack
//    11    1  flags        u8, reserved, must be 0
//    12    8  key_id       fingerprint of the disk key
//    20   16  disk_id
//    36    8  cycle        u64
//    44    8  attempt      u64
//    52    4  seq          u32 (blob sequence within the attempt; 0 for manifest/ack)
//    56   16  salt         random per session (kind, disk, cycle, attempt)
//    72   12  nonce        kind u8 || 00 00 00 || seq as u64
//    84    8  payload_len  u64 = ciphertext length + 16 (tag); bytes after the header
//    92    4  header_crc   u32 CRC-32 (IEEE, as zlib) of header bytes 0..92
//    96       payload: ciphertext || tag[16], then end of object
//
// Blob plaintext:
//     0    1  flags        bit0 = body is a zstd frame; other bits must be 0
//     1    4  extent_count u32 (1 ..= MAX_EXTENTS_PER_BLOB)
//     5  17n  extents      n x { start_sector u64, sector_count u64, kind u8 (0 data, 1 zero) }
//   5+17n  8  data_len     u64 = 512 x sum(sector_count of data extents)
//  13+17n  4  data_crc     u32 CRC-32 of the uncompressed data bytes
//  17+17n  8  body_len     u64
//  25+17n     body         body_len bytes: raw data, or zstd frame(s) of it; then end
//
// Manifest plaintext:
//     0    8  base_cycle   u64 (0 = empty target)
//     8    8  disk_bytes   u64
//    16    4  blob_count   u32
//    20  36n  blobs        n x { seq u32, object_len u64, gcm_tag[16], data_bytes u64 }
//   20+36n 8  bitmap_len   u64
//   28+36n    bitmap       bitmap_len bytes, opaque
//   28+36n+b 8 created_unix_ms u64; then end
//
// Ack plaintext:
//     0    1  status       u8: 0 applied, 1 failed
//     1    8  sectors_written u64
//     9    4  message_len  u32 (<= 4096)
//    13       message      message_len bytes of UTF-8; then end

/// Comment line written at the top of a key file.
pub const KEY_FILE_COMMENT: &str = "# replicator master key v1";
/// Master key length in bytes (64 hex characters in the key file).
pub const MASTER_KEY_LEN: usize = 32;
/// HKDF salt for deriving a disk key from the master key.
pub const HKDF_DISK_SALT: &[u8] = b"replicator/v1/disk";
/// HKDF info for the key id fingerprint.
pub const HKDF_KEY_ID_INFO: &[u8] = b"replicator/v1/key-id";
/// HKDF info prefix for session keys.
pub const HKDF_SESSION_INFO: &[u8] = b"replicator/v1/session";

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;

/// First 8 bytes of every object.
pub const MAGIC: [u8; 8] = *b"RPLOBJ\0\x01";
/// The only header/payload format version this code reads and writes.
pub const FORMAT_VERSION: u16 = 1;

/// Length of the key id fingerprint.
pub const KEY_ID_LEN: usize = 8;
/// Length of a disk id.
pub const DISK_ID_LEN: usize = 16;
/// Length of the per-session random salt.
pub const SALT_LEN: usize = 16;
/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM authentication tag.
pub const TAG_LEN: usize = 16;

/// Header field offsets (see the table above).
pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 8;
pub const OFF_KIND: usize = 10;
pub const OFF_FLAGS: usize = 11;
pub const OFF_KEY_ID: usize = 12;
pub const OFF_DISK_ID: usize = 20;
pub const OFF_CYCLE: usize = 36;
pub const OFF_ATTEMPT: usize = 44;
pub const OFF_SEQ: usize = 52;
pub const OFF_SALT: usize = 56;
pub const OFF_NONCE: usize = 72;
pub const OFF_PAYLOAD_LEN: usize = 84;
pub const OFF_HEADER_CRC: usize = 92;
/// Total header length; the payload starts here.
pub const HEADER_LEN: usize = 96;

/// Header `flags` value; every bit is reserved.
pub const HEADER_FLAGS_NONE: u8 = 0;

/// Blob payload flag: the body is a zstd frame.
pub const BLOB_FLAG_COMPRESSED: u8 = 0x01;
/// Extent kind byte: the extent's sectors are carried in the body.
pub const EXTENT_KIND_DATA: u8 = 0;
/// Extent kind byte: the extent's sectors are all zero and carry no bytes.
pub const EXTENT_KIND_ZERO: u8 = 1;
/// Bytes per extent record in a blob.
pub const EXTENT_RECORD_LEN: usize = 17;
/// Bytes of a blob payload that are not extent records or body.
pub const BLOB_FIXED_LEN: usize = 25;

/// Bytes per blob record in a manifest.
pub const MANIFEST_BLOB_RECORD_LEN: usize = 36;
/// Bytes of a manifest payload that are not blob records or bitmap.
pub const MANIFEST_FIXED_LEN: usize = 36;

/// Ack status byte: the cycle was applied.
pub const ACK_STATUS_APPLIED: u8 = 0;
/// Ack status byte: applying the cycle failed.
pub const ACK_STATUS_FAILED: u8 = 1;
/// Bytes of an ack payload before the message.
pub const ACK_FIXED_LEN: usize = 13;
/// Longest ack message in bytes.
pub const MAX_ACK_MESSAGE_BYTES: u32 = 4096;

/// Bytes of a target generation id in acks and catalogs.
pub const GENERATION_BYTES: usize = 16;
/// Bytes of one block digest in a catalog (BLAKE3, truncated).
pub const DIGEST_BYTES: usize = 16;
/// Most blocks one catalog may carry (4 TiB at 64 KiB blocks; use larger blocks beyond).
pub const MAX_CATALOG_BLOCKS: u64 = 1 << 26;
/// Smallest and largest catalog block sizes.
pub const CATALOG_BLOCK_BYTES_MIN: u32 = 4096;
pub const CATALOG_BLOCK_BYTES_MAX: u32 = 64 << 20;
/// Bytes of a catalog payload before the compressed digests.
pub const CATALOG_FIXED_LEN: usize = 16 + 8 + 8 + 4 + 8 + 8 + 8 + 8;
/// Bytes of a resync request payload before the reason.
pub const RESYNC_REQUEST_FIXED_LEN: usize = 4 + 8 + 4;

/// Decoders refuse a blob whose `data_len` is larger (bounded memory).
pub const MAX_BLOB_DATA_BYTES: u64 = 64 << 20;
/// Most extents one blob may carry.
pub const MAX_EXTENTS_PER_BLOB: u32 = 1 << 20;
/// Most blobs one manifest may list.
pub const MAX_MANIFEST_BLOBS: u32 = 1 << 24;
/// Largest bitmap one manifest may carry.
pub const MAX_BITMAP_BYTES: u64 = 1 << 32;

// ===========================================================================
// Types
// ===========================================================================

/// The kind byte of an object. Its value is part of the header, the nonce and
/// the session key derivation.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Blob = 1,
    Manifest = 2,
    Ack = 3,
    /// The target's digest catalog (checksum resync).
    Catalog = 4,
    /// The source asks the target for its digest catalog.
    ResyncRequest = 5,
}

impl ObjectKind {
    /// The header byte of this kind.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The kind for a header byte, if it is one.
    pub fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Blob),
            2 => Some(Self::Manifest),
            3 => Some(Self::Ack),
            4 => Some(Self::Catalog),
            5 => Some(Self::ResyncRequest),
            _ => None,
        }
    }

    /// Lower-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blob => "blob",
            Self::Manifest => "manifest",
            Self::Ack => "ack",
            Self::Catalog => "catalog",
            Self::ResyncRequest => "resync request",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether an extent's sectors carry data bytes or are all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    Data,
    Zero,
}

/// A run of sectors covered by a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobExtent {
    pub start_sector: u64,
    pub sector_count: u64,
    pub kind: ExtentKind,
}

/// The decoded plaintext header (the nonce and header CRC are checked and
/// not kept: both are functions of the other fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHeader {
    pub kind: ObjectKind,
    pub key_id: [u8; KEY_ID_LEN],
    pub disk_id: DiskId,
    pub cycle: u64,
    pub attempt: u64,
    pub seq: u32,
    pub salt: [u8; SALT_LEN],
    pub payload_len: u64,
}

/// What the caller expects to find; every field is checked against the header
/// before decryption and a mismatch is [`FormatError::Misplaced`] naming the
/// field.
#[derive(Clone, Debug)]
pub struct Expect {
    pub disk_id: DiskId,
    pub cycle: u64,
    pub attempt: Option<u64>,
    pub seq: Option<u32>,
    /// If `Some`, the object's GCM tag must equal it (a manifest pins each blob).
    pub tag: Option<[u8; TAG_LEN]>,
}

/// An encoded object and its GCM tag (the last 16 bytes of `bytes`).
#[derive(Clone, Debug)]
pub struct EncodedObject {
    pub bytes: Bytes,
    pub tag: [u8; TAG_LEN],
}

/// One blob listed by a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestBlob {
    pub seq: u32,
    /// Length of the whole encoded blob object.
    pub object_len: u64,
    /// GCM tag of that blob object.
    pub tag: [u8; TAG_LEN],
    /// Sectors it covers x 512, zero extents included.
    pub data_bytes: u64,
}

/// The manifest of one cycle attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The target cycle this one applies on top of; 0 = empty target.
    pub base_cycle: u64,
    pub disk_bytes: u64,
    pub blobs: Vec<ManifestBlob>,
    /// An encoded sector bitmap; opaque to this module, stored as given.
    pub bitmap: Vec<u8>,
    pub created_unix_ms: u64,
}

/// Outcome reported by an ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckStatus {
    Applied,
    Failed,
}

/// Acknowledgement of one cycle attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub status: AckStatus,
    pub sectors_written: u64,
    /// At most [`MAX_ACK_MESSAGE_BYTES`] bytes of UTF-8.
    pub message: String,
    /// The generation of the target state that wrote it (absent in acks written before
    /// generations existed).
    pub target_generation: Option<[u8; GENERATION_BYTES]>,
}

/// The target's per-block digests of its disk as of a committed cycle: what a checksum resync
/// compares the source against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    /// The generation of the target state that made it.
    pub target_generation: [u8; GENERATION_BYTES],
    /// The target's committed cycle: the digests are of the disk as of that cycle.
    pub committed_cycle: u64,
    /// The number of the resync request it answers; 0 = sent unasked, because no cycle in the
    /// cache applies on the target's committed one.
    pub answers_request: u64,
    /// Bytes per digested block (a power of two, at least 4 KiB).
    pub block_bytes: u32,
    pub disk_bytes: u64,
    /// One digest per block, `ceil(disk_bytes / block_bytes)` of them (the last block may be
    /// short).
    pub digests: Vec<[u8; DIGEST_BYTES]>,
    pub created_unix_ms: u64,
}

/// The source asks the target for a [`Catalog`] because it must resync by checksums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncRequest {
    /// Block size the source wants the digests at.
    pub block_bytes: u32,
    /// Why, for the target's operator. At most [`MAX_ACK_MESSAGE_BYTES`] bytes of UTF-8.
    pub reason: String,
    pub created_unix_ms: u64,
}

/// A decoded, verified blob.
#[derive(Clone, Debug)]
pub struct DecodedBlob {
    pub header: ObjectHeader,
    pub extents: Vec<BlobExtent>,
    /// The data extents' bytes concatenated in extent order.
    pub data: Bytes,
    /// Length of the body as stored (compressed length if `compressed`).
    pub stored_body_len: u64,
    pub compressed: bool,
}

/// Everything that can go wrong encoding or decoding an object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error(
        "object is {len} bytes, shorter than the {need}-byte header; it is truncated or not a replicator object"
    )]
    TooShort { len: u64, need: u64 },
    #[error("bad magic {found} (expected {expected}): this is not a replicator object")]
    BadMagic { found: String, expected: String },
    #[error(
        "unsupported format version {found}; this build reads version {supported}, upgrade the replicator to read it"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error(
        "unknown object kind byte {found}; the header is damaged or was written by a newer replicator"
    )]
    UnknownKind { found: u8 },
    #[error("object is a {found} but a {expected} was expected; check which object was fetched")]
    WrongKind {
        expected: ObjectKind,
        found: ObjectKind,
    },
    #[error(
        "reserved header flags {found:#04x} are set; the header is damaged or was written by a newer replicator"
    )]
    HeaderFlags { found: u8 },
    #[error(
        "header damaged: stored header crc32 is {stored:#010x} but the header bytes give {computed:#010x}; fetch the object again"
    )]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error(
        "{kind} header has seq {seq}, but {kind} objects always have seq 0; the header is damaged or forged"
    )]
    NonZeroSeq { kind: ObjectKind, seq: u32 },
    #[error(
        "header says the payload is {payload_len} bytes, less than the 16-byte authentication tag; the header is damaged"
    )]
    PayloadTooShort { payload_len: u64 },
    #[error(
        "header says the payload is {header_says} bytes but {actual} bytes follow the header; the object is truncated or has bytes appended, fetch it again"
    )]
    LengthMismatch { header_says: u64, actual: u64 },
    #[error(
        "wrong key: the object was written under key id {found} but the key file in use has key id {expected}; the key file does not match the key this disk was shipped with, use the master key file it was replicated with"
    )]
    WrongKey { expected: String, found: String },
    #[error(
        "misplaced object: its {field} is {found} but {expected} was expected; it was stored under the wrong name or moved"
    )]
    Misplaced {
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error(
        "header nonce {found} differs from {expected}, the nonce its kind and seq require; the header is forged or damaged"
    )]
    NonceMismatch { expected: String, found: String },
    #[error(
        "authentication failed: the key is right but the object's bytes or header were altered; fetch it again, or re-send the cycle if it stays corrupt"
    )]
    AuthenticationFailed,
    #[error("payload ends early reading {what}: need {need} bytes, {have} left")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("{what} is {value}, over the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("reserved blob flags {found:#04x} are set; only bit 0 (compressed) is defined")]
    BlobFlags { found: u8 },
    #[error("extent {index} has unknown kind byte {found} (0 = data, 1 = zero)")]
    UnknownExtentKind { index: usize, found: u8 },
    #[error("invalid blob body: {reason}")]
    InvalidBody { reason: String },
    #[error("zstd decompression of the blob body failed: {0}")]
    Decompress(String),
    #[error("blob body decompressed to {found} bytes, but data_len says {expected}")]
    DecompressedLength { expected: u64, found: u64 },
    #[error(
        "data checksum mismatch: stored crc32 {stored:#010x}, computed {computed:#010x}; the blob's data is corrupt"
    )]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("invalid extent {index}: {reason}")]
    InvalidExtents { index: usize, reason: String },
    #[error("{count} unexpected bytes after the end of the {kind} payload")]
    TrailingBytes { kind: ObjectKind, count: u64 },
    #[error("unknown ack status byte {found} (0 = applied, 1 = failed)")]
    UnknownAckStatus { found: u8 },
    #[error("ack message is not valid utf-8 (valid up to byte {valid_up_to})")]
    AckMessageUtf8 { valid_up_to: usize },
    #[error(
        "data is {found} bytes but the data extents cover {expected} bytes ({SECTOR_SIZE} per sector)"
    )]
    DataLength { expected: u64, found: u64 },
    #[error("zstd compression failed: {0}")]
    Compress(String),
    #[error("encryption failed: the payload is too large for aes-gcm")]
    EncryptionFailed,
    #[error(
        "{kind} seq {seq} was already encoded in this session with different contents; encrypting again under the same nonce would break aes-gcm, so reuse the bytes already produced or start a new attempt with a fresh salt"
    )]
    NonceReuse { kind: ObjectKind, seq: u32 },
    #[error("could not get random bytes from the operating system: {0}")]
    Random(String),
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl FormatError {
    /// Whether the object was written under another master key (the operator's key file is
    /// wrong), as opposed to being damaged or forged.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, FormatError::WrongKey { .. })
    }
}

// ===========================================================================
// Small helpers
// ===========================================================================

fn len64(n: usize) -> u64 {
    // usize is at most 64 bits on every supported target.
    n as u64
}

fn to_usize(v: u64, what: &'static str) -> Result<usize, FormatError> {
    usize::try_from(v).map_err(|_| FormatError::LimitExceeded {
        what,
        value: v,
        limit: len64(usize::MAX),
    })
}

/// The nonce of an object: kind || 00 00 00 || seq as u64 LE.
fn nonce_for(kind: ObjectKind, seq: u32) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    let parts = std::iter::once(kind.as_u8())
        .chain([0u8; 3])
        .chain(u64::from(seq).to_le_bytes());
    for (dst, src) in n.iter_mut().zip(parts) {
        *dst = src;
    }
    n
}

thread_local! {
    /// One zstd compression context per thread and level, kept between blobs: making one costs
    /// more than compressing a small blob.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Appends the zstd frame of `data` (as `zstd::bulk::compress` makes it: one frame recording its
/// content size) to `out`, within `out`'s spare capacity and only if strictly smaller than
/// `data`. Returns whether it did; otherwise `out` may hold a partial frame past its old length,
/// which the caller truncates.
fn compress_into(out: &mut Vec<u8>, data: &[u8], level: i32) -> bool {
    let start = out.len();
    let room = out.capacity().saturating_sub(start);
    if room == 0 {
        return false;
    }
    COMPRESSOR.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.as_ref().is_none_or(|(l, _)| *l != level) {
            *cached = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let Some((_, compressor)) = cached.as_mut() else {
            return false;
        };
        let mut cursor = std::io::Cursor::new(&mut *out);
        cursor.set_position(len64(start));
        // Too little room (the frame would not be smaller) is an error here: stored raw then.
        match compressor.compress_to_buffer(data, &mut cursor) {
            Ok(n) => n < data.len(),
            Err(_) => false,
        }
    })
}

/// Bounds-checked cursor over untrusted bytes. Never panics.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    fn remaining(&self) -> usize {
        self.rest().len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let rest = self.rest();
        match rest.split_at_checked(n) {
            Some((head, _)) => {
                self.pos = self.pos.saturating_add(n);
                Ok(head)
            }
            None => Err(FormatError::Truncated {
                what,
                need: len64(n),
                have: len64(rest.len()),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let s = self.take(N, what)?;
        <[u8; N]>::try_from(s).map_err(|_| FormatError::Truncated {
            what,
            need: len64(N),
            have: len64(s.len()),
        })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails unless `count` records of `record_len` bytes fit in what is left,
    /// so callers can allocate `count` entries safely.
    fn check_records(
        &self,
        count: u64,
        record_len: usize,
        what: &'static str,
    ) -> Result<(), FormatError> {
        let need = count.saturating_mul(len64(record_len));
        let have = len64(self.remaining());
        if need > have {
            return Err(FormatError::Truncated { what, need, have });
        }
        Ok(())
    }
}

// ===========================================================================
// Header
// ===========================================================================

/// The 96 header bytes for `h` (nonce and CRC computed).
fn encode_header(h: &ObjectHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(h.kind.as_u8());
    out.push(HEADER_FLAGS_NONE);
    out.extend_from_slice(&h.key_id);
    out.extend_from_slice(&h.disk_id.0);
    out.extend_from_slice(&h.cycle.to_le_bytes());
    out.extend_from_slice(&h.attempt.to_le_bytes());
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.salt);
    out.extend_from_slice(&nonce_for(h.kind, h.seq));
    out.extend_from_slice(&h.payload_len.to_le_bytes());
    // `out` now holds exactly header bytes 0..OFF_HEADER_CRC.
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out
}

/// Header checks shared by [`peek_header`] and the decoders, in order:
/// length, magic, version, kind (and `want`), flags, header CRC, seq of
/// manifest/ack, payload length. Returns the header and its stored nonce.
fn parse_header(
    bytes: &[u8],
    want: Option<ObjectKind>,
) -> Result<(ObjectHeader, [u8; NONCE_LEN]), FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::TooShort {
            len: len64(bytes.len()),
            need: len64(HEADER_LEN),
        });
    }
    let mut r = Reader::new(bytes);
    let magic: [u8; 8] = r.array("magic")?;
    if magic != MAGIC {
        return Err(FormatError::BadMagic {
            found: to_hex(&magic),
            expected: to_hex(&MAGIC),
        });
    }
    let version = r.u16("version")?;
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let kind_byte = r.u8("kind")?;
    let kind =
        ObjectKind::from_u8(kind_byte).ok_or(FormatError::UnknownKind { found: kind_byte })?;
    if let Some(expected) = want
        && expected != kind
    {
        return Err(FormatError::WrongKind {
            expected,
            found: kind,
        });
    }
    let flags = r.u8("header flags")?;
    if flags != HEADER_FLAGS_NONE {
        return Err(FormatError::HeaderFlags { found: flags });
    }
    let key_id = r.array("key id")?;
    let disk_id = DiskId(r.array("disk id")?);
    let cycle = r.u64("cycle")?;
    let attempt = r.u64("attempt")?;
    let seq = r.u32("seq")?;
    let salt = r.array("salt")?;
    let nonce = r.array("nonce")?;
    let payload_len = r.u64("payload length")?;
    let crc_input = bytes.get(..OFF_HEADER_CRC).unwrap_or(&[]);
    let stored = r.u32("header crc")?;
    let computed = crc32fast::hash(crc_input);
    if stored != computed {
        return Err(FormatError::HeaderChecksum { stored, computed });
    }
    if kind != ObjectKind::Blob && seq != 0 {
        return Err(FormatError::NonZeroSeq { kind, seq });
    }
    if payload_len < len64(TAG_LEN) {
        return Err(FormatError::PayloadTooShort { payload_len });
    }
    let actual = len64(r.remaining());
    if payload_len != actual {
        return Err(FormatError::LengthMismatch {
            header_says: payload_len,
            actual,
        });
    }
    Ok((
        ObjectHeader {
            kind,
            key_id,
            disk_id,
            cycle,
            attempt,
            seq,
            salt,
            payload_len,
        },
        nonce,
    ))
}

/// Reads and checks the plaintext header of a whole object without a key:
/// length, magic, version, kind, flags, header CRC, seq (0 for manifest and
/// ack), and that exactly `payload_len` bytes follow the header.
pub fn peek_header(bytes: &[u8]) -> Result<ObjectHeader, FormatError> {
    parse_header(bytes, None).map(|(h, _)| h)
}

fn misplaced(field: &'static str, expected: String, found: String) -> FormatError {
    FormatError::Misplaced {
        field,
        expected,
        found,
    }
}

/// Header checks that need the key and the caller's expectations, then
/// decryption. Returns the header and the plaintext payload.
fn open(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
    kind: ObjectKind,
    pool: Option<&Arc<BufPool>>,
) -> Result<(ObjectHeader, PooledBuf), FormatError> {
    let (header, stored_nonce) = parse_header(bytes, Some(kind))?;

    // The disk id comes first: the key id is per disk, so an object of another disk would
    // otherwise be misreported as a wrong key file.
    if header.disk_id != expect.disk_id {
        return Err(misplaced(
            "disk_id",
            expect.disk_id.to_string(),
            header.disk_id.to_string(),
        ));
    }

    // The current key, or a previous one still read after a rotation.
    let Some(key) = key.for_key_id(&header.key_id) else {
        return Err(FormatError::WrongKey {
            expected: to_hex(&key.key_id()),
            found: to_hex(&header.key_id),
        });
    };

    let (aad, payload) = bytes
        .split_at_checked(HEADER_LEN)
        .ok_or(FormatError::TooShort {
            len: len64(bytes.len()),
            need: len64(HEADER_LEN),
        })?;
    let ct_len = payload
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(FormatError::PayloadTooShort {
            payload_len: len64(payload.len()),
        })?;
    let (ciphertext, tag_bytes) =
        payload
            .split_at_checked(ct_len)
            .ok_or(FormatError::PayloadTooShort {
                payload_len: len64(payload.len()),
            })?;
    let tag: [u8; TAG_LEN] =
        <[u8; TAG_LEN]>::try_from(tag_bytes).map_err(|_| FormatError::PayloadTooShort {
            payload_len: len64(payload.len()),
        })?;

    if header.cycle != expect.cycle {
        return Err(misplaced(
            "cycle",
            expect.cycle.to_string(),
            header.cycle.to_string(),
        ));
    }
    if let Some(attempt) = expect.attempt
        && header.attempt != attempt
    {
        return Err(misplaced(
            "attempt",
            attempt.to_string(),
            header.attempt.to_string(),
        ));
    }
    if let Some(seq) = expect.seq
        && header.seq != seq
    {
        return Err(misplaced("seq", seq.to_string(), header.seq.to_string()));
    }
    if let Some(want_tag) = expect.tag
        && tag != want_tag
    {
        return Err(misplaced("tag", to_hex(&want_tag), to_hex(&tag)));
    }

    let nonce = nonce_for(kind, header.seq);
    if stored_nonce != nonce {
        return Err(FormatError::NonceMismatch {
            expected: to_hex(&nonce),
            found: to_hex(&stored_nonce),
        });
    }

    let session = key.session_key(
        kind,
        &header.disk_id,
        header.cycle,
        header.attempt,
        &header.salt,
    );
    let mut plaintext = PooledBuf::take_from(pool, ciphertext.len());
    if !session.open_into(nonce, aad, ciphertext, &tag, plaintext.as_mut_slice()) {
        return Err(FormatError::AuthenticationFailed);
    }
    Ok((header, plaintext))
}

// ===========================================================================
// Extents
// ===========================================================================

/// Checks extents are non-empty as a list and each, sorted, non-overlapping,
/// addressable in bytes; returns the number of data bytes they carry.
fn validate_extents(extents: &[BlobExtent]) -> Result<u64, FormatError> {
    if extents.is_empty() {
        return Err(FormatError::InvalidExtents {
            index: 0,
            reason: "a blob must cover at least one extent".into(),
        });
    }
    let count = len64(extents.len());
    if count > u64::from(MAX_EXTENTS_PER_BLOB) {
        return Err(FormatError::LimitExceeded {
            what: "extent count",
            value: count,
            limit: u64::from(MAX_EXTENTS_PER_BLOB),
        });
    }
    let mut prev_end: Option<u64> = None;
    let mut data_sectors: u64 = 0;
    for (index, e) in extents.iter().enumerate() {
        let invalid = |reason: String| FormatError::InvalidExtents { index, reason };
        if e.sector_count == 0 {
            return Err(invalid(format!(
                "extent at sector {} is empty (sector_count 0)",
                e.start_sector
            )));
        }
        let end = e.start_sector.checked_add(e.sector_count).ok_or_else(|| {
            invalid(format!(
                "extent at sector {} with {} sectors ends past sector 2^64",
                e.start_sector, e.sector_count
            ))
        })?;
        if end.checked_mul(SECTOR_SIZE).is_none() {
            return Err(invalid(format!(
                "extent ends at sector {end}, beyond the largest byte offset a u64 can hold"
            )));
        }
        if let Some(prev) = prev_end
            && e.start_sector < prev
        {
            return Err(invalid(format!(
                "extent starts at sector {} before the previous extent ends at sector {prev}; extents must be sorted and must not overlap",
                e.start_sector
            )));
        }
        prev_end = Some(end);
        if e.kind == ExtentKind::Data {
            data_sectors = data_sectors.checked_add(e.sector_count).ok_or_else(|| {
                invalid("data extents cover more than 2^64 sectors in total".into())
            })?;
        }
    }
    data_sectors
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| FormatError::InvalidExtents {
            index: extents.len().saturating_sub(1),
            reason: "data extents cover more bytes than a u64 can count".into(),
        })
}

// ===========================================================================
// Encoding
// ===========================================================================

/// Everything needed to encode the objects of one (disk, cycle, attempt):
/// the key id, the salt, and the three session keys (derived once, here).
///
/// A session remembers the tag of every (kind, seq) it has encoded and
/// refuses to encrypt different contents under a (kind, seq) again, because
/// that would reuse an AES-GCM nonce under the same key. Encoding identical
/// contents again is allowed and returns identical bytes.
pub struct Session {
    disk_id: DiskId,
    cycle: u64,
    attempt: u64,
    salt: [u8; SALT_LEN],
    key_id: [u8; KEY_ID_LEN],
    blob_key: SessionKey,
    manifest_key: SessionKey,
    ack_key: SessionKey,
    catalog_key: SessionKey,
    request_key: SessionKey,
    issued: Mutex<HashMap<(ObjectKind, u32), [u8; TAG_LEN]>>,
    /// Where encoded objects are built (aligned, reused once a put dropped them); none: each
    /// object gets its own buffer.
    pool: Option<Arc<BufPool>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("disk_id", &self.disk_id)
            .field("cycle", &self.cycle)
            .field("attempt", &self.attempt)
            .field("salt", &to_hex(&self.salt))
            .field("key_id", &to_hex(&self.key_id))
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Derives the session keys for every object kind of this attempt.
    /// `salt` must be fresh random bytes ([`Session::generate_salt`]) for
    /// every new attempt; it is stored in each header.
    pub fn new(
        disk_key: &DiskKey,
        disk_id: DiskId,
        cycle: u64,
        attempt: u64,
        salt: [u8; SALT_LEN],
    ) -> Session {
        let derive = |kind| disk_key.session_key(kind, &disk_id, cycle, attempt, &salt);
        Session {
            disk_id,
            cycle,
            attempt,
            salt,
            key_id: disk_key.key_id(),
            blob_key: derive(ObjectKind::Blob),
            manifest_key: derive(ObjectKind::Manifest),
            ack_key: derive(ObjectKind::Ack),
            catalog_key: derive(ObjectKind::Catalog),
            request_key: derive(ObjectKind::ResyncRequest),
            issued: Mutex::new(HashMap::new()),
            pool: None,
        }
    }

    /// Builds encoded objects in buffers from `pool`: they start aligned (a local sink writes
    /// them with `O_DIRECT` as they are) and go back to the pool when the put drops them.
    pub fn with_pool(mut self, pool: Arc<BufPool>) -> Session {
        self.pool = Some(pool);
        self
    }

    /// 16 fresh random bytes from the operating system, for [`Session::new`].
    pub fn generate_salt() -> Result<[u8; SALT_LEN], FormatError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| FormatError::Random(e.to_string()))?;
        Ok(salt)
    }

    pub fn disk_id(&self) -> DiskId {
        self.disk_id
    }

    pub fn cycle(&self) -> u64 {
        self.cycle
    }

    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    pub fn salt(&self) -> [u8; SALT_LEN] {
        self.salt
    }

    /// Encodes one blob. `extents` must be non-empty, each non-empty, sorted
    /// and non-overlapping; `data` is the data extents' bytes concatenated
    /// (512 per sector; zero extents carry none). The body is zstd-compressed
    /// at `zstd_level` and kept compressed only if strictly smaller.
    pub fn encode_blob(
        &self,
        seq: u32,
        extents: &[BlobExtent],
        data: &[u8],
        zstd_level: i32,
    ) -> Result<EncodedObject, FormatError> {
        self.encode_blob_as(seq, extents, data, Some(zstd_level))
    }

    /// [`Session::encode_blob`], with the body stored uncompressed when `zstd_level` is `None`.
    pub fn encode_blob_as(
        &self,
        seq: u32,
        extents: &[BlobExtent],
        data: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<EncodedObject, FormatError> {
        let data_len = validate_extents(extents)?;
        if len64(data.len()) != data_len {
            return Err(FormatError::DataLength {
                expected: data_len,
                found: len64(data.len()),
            });
        }
        if data_len > MAX_BLOB_DATA_BYTES {
            return Err(FormatError::LimitExceeded {
                what: "blob data bytes",
                value: data_len,
                limit: MAX_BLOB_DATA_BYTES,
            });
        }
        let extent_count =
            u32::try_from(extents.len()).map_err(|_| FormatError::LimitExceeded {
                what: "extent count",
                value: len64(extents.len()),
                limit: u64::from(MAX_EXTENTS_PER_BLOB),
            })?;
        let crc = crc32fast::hash(data);
        // Room for the body stored raw, the largest it can be: the compressed body is written
        // straight into the object behind the fixed fields (no second buffer, no copy), and
        // replaced by the raw data if it is not strictly smaller.
        let inner_len = BLOB_FIXED_LEN
            .saturating_add(extents.len().saturating_mul(EXTENT_RECORD_LEN))
            .saturating_add(data.len());
        self.seal(ObjectKind::Blob, seq, inner_len, |out| {
            let flags_at = out.len();
            out.push(0);
            out.extend_from_slice(&extent_count.to_le_bytes());
            for e in extents {
                out.extend_from_slice(&e.start_sector.to_le_bytes());
                out.extend_from_slice(&e.sector_count.to_le_bytes());
                out.push(match e.kind {
                    ExtentKind::Data => EXTENT_KIND_DATA,
                    ExtentKind::Zero => EXTENT_KIND_ZERO,
                });
            }
            out.extend_from_slice(&data_len.to_le_bytes());
            out.extend_from_slice(&crc.to_le_bytes());
            let body_len_at = out.len();
            out.extend_from_slice(&0u64.to_le_bytes());
            let body_at = out.len();
            let compressed = match zstd_level {
                Some(level) if !data.is_empty() => compress_into(out, data, level),
                _ => false,
            };
            if compressed {
                if let Some(flags) = out.get_mut(flags_at) {
                    *flags = BLOB_FLAG_COMPRESSED;
                }
            } else {
                out.truncate(body_at);
                out.extend_from_slice(data);
            }
            let body_len = len64(out.len().saturating_sub(body_at)).to_le_bytes();
            for (dst, src) in out.iter_mut().skip(body_len_at).zip(body_len) {
                *dst = src;
            }
        })
    }

    /// Encodes the manifest of this attempt (seq 0).
    pub fn encode_manifest(&self, m: &Manifest) -> Result<EncodedObject, FormatError> {
        let blob_count = u32::try_from(m.blobs.len())
            .ok()
            .filter(|&n| n <= MAX_MANIFEST_BLOBS)
            .ok_or(FormatError::LimitExceeded {
                what: "manifest blob count",
                value: len64(m.blobs.len()),
                limit: u64::from(MAX_MANIFEST_BLOBS),
            })?;
        let bitmap_len = len64(m.bitmap.len());
        if bitmap_len > MAX_BITMAP_BYTES {
            return Err(FormatError::LimitExceeded {
                what: "manifest bitmap bytes",
                value: bitmap_len,
                limit: MAX_BITMAP_BYTES,
            });
        }
        let inner_len = MANIFEST_FIXED_LEN
            .saturating_add(m.blobs.len().saturating_mul(MANIFEST_BLOB_RECORD_LEN))
            .saturating_add(m.bitmap.len());
        self.seal(ObjectKind::Manifest, 0, inner_len, |out| {
            out.extend_from_slice(&m.base_cycle.to_le_bytes());
            out.extend_from_slice(&m.disk_bytes.to_le_bytes());
            out.extend_from_slice(&blob_count.to_le_bytes());
            for b in &m.blobs {
                out.extend_from_slice(&b.seq.to_le_bytes());
                out.extend_from_slice(&b.object_len.to_le_bytes());
                out.extend_from_slice(&b.tag);
                out.extend_from_slice(&b.data_bytes.to_le_bytes());
            }
            out.extend_from_slice(&bitmap_len.to_le_bytes());
            out.extend_from_slice(&m.bitmap);
            out.extend_from_slice(&m.created_unix_ms.to_le_bytes());
        })
    }

    /// Encodes the ack of this attempt (seq 0).
    pub fn encode_ack(&self, a: &Ack) -> Result<EncodedObject, FormatError> {
        let message_len = u32::try_from(a.message.len())
            .ok()
            .filter(|&n| n <= MAX_ACK_MESSAGE_BYTES)
            .ok_or(FormatError::LimitExceeded {
                what: "ack message bytes",
                value: len64(a.message.len()),
                limit: u64::from(MAX_ACK_MESSAGE_BYTES),
            })?;
        let status = match a.status {
            AckStatus::Applied => ACK_STATUS_APPLIED,
            AckStatus::Failed => ACK_STATUS_FAILED,
        };
        let inner_len = ACK_FIXED_LEN
            .saturating_add(a.message.len())
            .saturating_add(GENERATION_BYTES);
        self.seal(ObjectKind::Ack, 0, inner_len, |out| {
            out.push(status);
            out.extend_from_slice(&a.sectors_written.to_le_bytes());
            out.extend_from_slice(&message_len.to_le_bytes());
            out.extend_from_slice(a.message.as_bytes());
            if let Some(g) = &a.target_generation {
                out.extend_from_slice(g);
            }
        })
    }

    /// Encodes a digest catalog (seq 0). The digests are zstd-compressed (level 1): the digests
    /// of repeated blocks, zero blocks above all, repeat too.
    pub fn encode_catalog(&self, c: &Catalog) -> Result<EncodedObject, FormatError> {
        check_catalog_shape(c.block_bytes, c.disk_bytes, len64(c.digests.len()))?;
        let mut flat = Vec::with_capacity(c.digests.len().saturating_mul(DIGEST_BYTES));
        for d in &c.digests {
            flat.extend_from_slice(d);
        }
        let packed =
            zstd::bulk::compress(&flat, 1).map_err(|e| FormatError::Compress(e.to_string()))?;
        let inner_len = CATALOG_FIXED_LEN.saturating_add(packed.len());
        self.seal(ObjectKind::Catalog, 0, inner_len, |out| {
            out.extend_from_slice(&c.target_generation);
            out.extend_from_slice(&c.committed_cycle.to_le_bytes());
            out.extend_from_slice(&c.answers_request.to_le_bytes());
            out.extend_from_slice(&c.block_bytes.to_le_bytes());
            out.extend_from_slice(&c.disk_bytes.to_le_bytes());
            out.extend_from_slice(&c.created_unix_ms.to_le_bytes());
            out.extend_from_slice(&len64(c.digests.len()).to_le_bytes());
            out.extend_from_slice(&len64(packed.len()).to_le_bytes());
            out.extend_from_slice(&packed);
        })
    }

    /// Encodes a resync request (seq 0).
    pub fn encode_resync_request(&self, q: &ResyncRequest) -> Result<EncodedObject, FormatError> {
        check_block_bytes(q.block_bytes)?;
        let reason_len = u32::try_from(q.reason.len())
            .ok()
            .filter(|&n| n <= MAX_ACK_MESSAGE_BYTES)
            .ok_or(FormatError::LimitExceeded {
                what: "resync reason bytes",
                value: len64(q.reason.len()),
                limit: u64::from(MAX_ACK_MESSAGE_BYTES),
            })?;
        let inner_len = RESYNC_REQUEST_FIXED_LEN.saturating_add(q.reason.len());
        self.seal(ObjectKind::ResyncRequest, 0, inner_len, |out| {
            out.extend_from_slice(&q.block_bytes.to_le_bytes());
            out.extend_from_slice(&q.created_unix_ms.to_le_bytes());
            out.extend_from_slice(&reason_len.to_le_bytes());
            out.extend_from_slice(q.reason.as_bytes());
        })
    }

    fn key_for(&self, kind: ObjectKind) -> &SessionKey {
        match kind {
            ObjectKind::Blob => &self.blob_key,
            ObjectKind::Manifest => &self.manifest_key,
            ObjectKind::Ack => &self.ack_key,
            ObjectKind::Catalog => &self.catalog_key,
            ObjectKind::ResyncRequest => &self.request_key,
        }
    }

    /// Encrypts and records (kind, seq), refusing a second, different
    /// plaintext under the same nonce.
    fn seal(
        &self,
        kind: ObjectKind,
        seq: u32,
        inner_len: usize,
        write_inner: impl FnOnce(&mut Vec<u8>),
    ) -> Result<EncodedObject, FormatError> {
        let object = self.seal_unchecked(kind, seq, inner_len, write_inner)?;
        let mut issued = self
            .issued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match issued.get(&(kind, seq)) {
            Some(tag) if *tag != object.tag => Err(FormatError::NonceReuse { kind, seq }),
            Some(_) => Ok(object),
            None => {
                issued.insert((kind, seq), object.tag);
                Ok(object)
            }
        }
    }

    /// Builds header || encrypt(inner) || tag without the reuse check.
    fn seal_unchecked(
        &self,
        kind: ObjectKind,
        seq: u32,
        inner_len: usize,
        write_inner: impl FnOnce(&mut Vec<u8>),
    ) -> Result<EncodedObject, FormatError> {
        let mut buf = PooledBuf::take_from(self.pool.as_ref(), 0);
        buf.reserve(HEADER_LEN.saturating_add(inner_len).saturating_add(TAG_LEN));
        let tag = {
            let (out, base) = buf.vec_mut();
            out.resize(base + HEADER_LEN, 0);
            write_inner(out);
            self.seal_built(kind, seq, out, base)?
        };
        buf.sync_len();
        Ok(EncodedObject {
            bytes: buf.into_bytes(),
            tag,
        })
    }

    /// Seals the object built in `out` from `base` on: header room, then the plaintext.
    /// Writes the header, encrypts in place and appends the tag.
    fn seal_built(
        &self,
        kind: ObjectKind,
        seq: u32,
        out: &mut Vec<u8>,
        base: usize,
    ) -> Result<[u8; TAG_LEN], FormatError> {
        let plaintext_len = out.len().saturating_sub(base + HEADER_LEN);
        let payload_len = len64(plaintext_len)
            .checked_add(len64(TAG_LEN))
            .ok_or(FormatError::EncryptionFailed)?;
        let header = encode_header(&ObjectHeader {
            kind,
            key_id: self.key_id,
            disk_id: self.disk_id,
            cycle: self.cycle,
            attempt: self.attempt,
            seq,
            salt: self.salt,
            payload_len,
        });
        for (dst, src) in out.iter_mut().skip(base).zip(&header) {
            *dst = *src;
        }
        let split = (base + HEADER_LEN).min(out.len());
        let (_, plaintext) = out.split_at_mut(split);
        let tag = self
            .key_for(kind)
            .seal_in_place(nonce_for(kind, seq), &header, plaintext)
            .ok_or(FormatError::EncryptionFailed)?;
        out.extend_from_slice(&tag);
        Ok(tag)
    }
}

// ===========================================================================
// Decoding
// ===========================================================================

/// Decodes and verifies a blob. Checks, in order: header (see
/// [`peek_header`], plus kind = blob), key id, `expect`, nonce, AES-GCM tag,
/// payload bounds and limits, decompression (capped at `data_len`), data
/// CRC, extents, trailing bytes.
pub fn decode_blob(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
) -> Result<DecodedBlob, FormatError> {
    decode_blob_pooled(key, bytes, expect, None)
}

thread_local! {
    /// One zstd decompression context per thread, kept between blobs.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `body` into `out`, which must come out exactly full. Returns the bytes written.
fn decompress_into(body: &[u8], out: &mut [u8]) -> Result<usize, FormatError> {
    DECOMPRESSOR.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.is_none() {
            *cached = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| FormatError::Decompress(e.to_string()))?,
            );
        }
        let Some(decompressor) = cached.as_mut() else {
            return Err(FormatError::Decompress("no decompression context".into()));
        };
        decompressor
            .decompress_to_buffer(body, out)
            .map_err(|e| FormatError::Decompress(e.to_string()))
    })
}

/// [`decode_blob`], with the plaintext and the decompressed data in buffers from `pool`: the
/// data starts aligned (written to a target with `O_DIRECT` as it is) and its buffer goes back to
/// the pool when the last clone of [`DecodedBlob::data`] is dropped.
pub fn decode_blob_pooled(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
    pool: Option<&Arc<BufPool>>,
) -> Result<DecodedBlob, FormatError> {
    let (header, plaintext) = open(key, bytes, expect, ObjectKind::Blob, pool)?;
    let mut r = Reader::new(plaintext.as_slice());

    let flags = r.u8("blob flags")?;
    if flags & !BLOB_FLAG_COMPRESSED != 0 {
        return Err(FormatError::BlobFlags { found: flags });
    }
    let compressed = flags & BLOB_FLAG_COMPRESSED != 0;

    let extent_count = r.u32("extent count")?;
    if extent_count > MAX_EXTENTS_PER_BLOB {
        return Err(FormatError::LimitExceeded {
            what: "extent count",
            value: u64::from(extent_count),
            limit: u64::from(MAX_EXTENTS_PER_BLOB),
        });
    }
    r.check_records(u64::from(extent_count), EXTENT_RECORD_LEN, "extents")?;
    let extent_count = to_usize(u64::from(extent_count), "extent count")?;
    let mut extents = Vec::with_capacity(extent_count);
    for index in 0..extent_count {
        let start_sector = r.u64("extent start sector")?;
        let sector_count = r.u64("extent sector count")?;
        let kind = match r.u8("extent kind")? {
            EXTENT_KIND_DATA => ExtentKind::Data,
            EXTENT_KIND_ZERO => ExtentKind::Zero,
            found => return Err(FormatError::UnknownExtentKind { index, found }),
        };
        extents.push(BlobExtent {
            start_sector,
            sector_count,
            kind,
        });
    }

    let data_len = r.u64("data length")?;
    if data_len > MAX_BLOB_DATA_BYTES {
        return Err(FormatError::LimitExceeded {
            what: "blob data bytes",
            value: data_len,
            limit: MAX_BLOB_DATA_BYTES,
        });
    }
    let stored_crc = r.u32("data crc")?;
    let body_len = r.u64("body length")?;
    let body_start = r.pos;
    let body = r.take(to_usize(body_len, "body length")?, "body")?;
    let body_end = r.pos;
    let trailing = r.remaining();

    let data = if compressed {
        if body_len >= data_len {
            return Err(FormatError::InvalidBody {
                reason: format!(
                    "compressed body of {body_len} bytes is not smaller than the {data_len} data bytes; an encoder only keeps a smaller one"
                ),
            });
        }
        let cap = to_usize(data_len, "blob data bytes")?;
        let mut out = PooledBuf::take_from(pool, cap);
        let n = decompress_into(body, out.as_mut_slice())?;
        if len64(n) != data_len {
            return Err(FormatError::DecompressedLength {
                expected: data_len,
                found: len64(n),
            });
        }
        out.into_bytes()
    } else {
        if body_len != data_len {
            return Err(FormatError::InvalidBody {
                reason: format!(
                    "uncompressed body is {body_len} bytes but data_len says {data_len}"
                ),
            });
        }
        if body_start > body_end || body_end > plaintext.len() {
            return Err(FormatError::InvalidBody {
                reason: "body range outside the payload".into(),
            });
        }
        plaintext.into_bytes().slice(body_start..body_end)
    };

    let computed = crc32fast::hash(&data);
    if computed != stored_crc {
        return Err(FormatError::ChecksumMismatch {
            stored: stored_crc,
            computed,
        });
    }

    let covered = validate_extents(&extents)?;
    if covered != data_len {
        return Err(FormatError::InvalidExtents {
            index: extents.len().saturating_sub(1),
            reason: format!("data extents cover {covered} bytes but data_len says {data_len}"),
        });
    }

    if trailing != 0 {
        return Err(FormatError::TrailingBytes {
            kind: ObjectKind::Blob,
            count: len64(trailing),
        });
    }

    Ok(DecodedBlob {
        header,
        extents,
        data,
        stored_body_len: body_len,
        compressed,
    })
}

/// Decodes and verifies a manifest (header, key id, `expect`, nonce, tag,
/// then payload bounds, limits and trailing bytes).
pub fn decode_manifest(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
) -> Result<(ObjectHeader, Manifest), FormatError> {
    let (header, plaintext) = open(key, bytes, expect, ObjectKind::Manifest, None)?;
    let mut r = Reader::new(plaintext.as_slice());
    let base_cycle = r.u64("base cycle")?;
    let disk_bytes = r.u64("disk bytes")?;
    let blob_count = r.u32("blob count")?;
    if blob_count > MAX_MANIFEST_BLOBS {
        return Err(FormatError::LimitExceeded {
            what: "manifest blob count",
            value: u64::from(blob_count),
            limit: u64::from(MAX_MANIFEST_BLOBS),
        });
    }
    r.check_records(
        u64::from(blob_count),
        MANIFEST_BLOB_RECORD_LEN,
        "manifest blob records",
    )?;
    let count = to_usize(u64::from(blob_count), "manifest blob count")?;
    let mut blobs = Vec::with_capacity(count);
    for _ in 0..count {
        blobs.push(ManifestBlob {
            seq: r.u32("blob seq")?,
            object_len: r.u64("blob object length")?,
            tag: r.array("blob tag")?,
            data_bytes: r.u64("blob data bytes")?,
        });
    }
    let bitmap_len = r.u64("bitmap length")?;
    if bitmap_len > MAX_BITMAP_BYTES {
        return Err(FormatError::LimitExceeded {
            what: "manifest bitmap bytes",
            value: bitmap_len,
            limit: MAX_BITMAP_BYTES,
        });
    }
    let bitmap = r
        .take(to_usize(bitmap_len, "manifest bitmap bytes")?, "bitmap")?
        .to_vec();
    let created_unix_ms = r.u64("created time")?;
    if r.remaining() != 0 {
        return Err(FormatError::TrailingBytes {
            kind: ObjectKind::Manifest,
            count: len64(r.remaining()),
        });
    }
    Ok((
        header,
        Manifest {
            base_cycle,
            disk_bytes,
            blobs,
            bitmap,
            created_unix_ms,
        },
    ))
}

/// Decodes and verifies an ack (header, key id, `expect`, nonce, tag, then
/// status, message length limit, UTF-8 and trailing bytes).
pub fn decode_ack(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
) -> Result<(ObjectHeader, Ack), FormatError> {
    let (header, plaintext) = open(key, bytes, expect, ObjectKind::Ack, None)?;
    let mut r = Reader::new(plaintext.as_slice());
    let status = match r.u8("ack status")? {
        ACK_STATUS_APPLIED => AckStatus::Applied,
        ACK_STATUS_FAILED => AckStatus::Failed,
        found => return Err(FormatError::UnknownAckStatus { found }),
    };
    let sectors_written = r.u64("sectors written")?;
    let message_len = r.u32("message length")?;
    if message_len > MAX_ACK_MESSAGE_BYTES {
        return Err(FormatError::LimitExceeded {
            what: "ack message bytes",
            value: u64::from(message_len),
            limit: u64::from(MAX_ACK_MESSAGE_BYTES),
        });
    }
    let raw = r.take(
        to_usize(u64::from(message_len), "ack message bytes")?,
        "message",
    )?;
    let message = std::str::from_utf8(raw)
        .map_err(|e| FormatError::AckMessageUtf8 {
            valid_up_to: e.valid_up_to(),
        })?
        .to_owned();
    // Acks written before generations end here; newer ones carry the target's generation.
    let target_generation = match r.remaining() {
        0 => None,
        GENERATION_BYTES => Some(r.array("target generation")?),
        count => {
            return Err(FormatError::TrailingBytes {
                kind: ObjectKind::Ack,
                count: len64(count),
            });
        }
    };
    Ok((
        header,
        Ack {
            status,
            sectors_written,
            message,
            target_generation,
        },
    ))
}

fn check_block_bytes(block_bytes: u32) -> Result<(), FormatError> {
    if !block_bytes.is_power_of_two()
        || !(CATALOG_BLOCK_BYTES_MIN..=CATALOG_BLOCK_BYTES_MAX).contains(&block_bytes)
    {
        return Err(FormatError::Invalid {
            what: "catalog block size",
            detail: format!(
                "{block_bytes} bytes; it must be a power of two from {CATALOG_BLOCK_BYTES_MIN} \
                 to {CATALOG_BLOCK_BYTES_MAX}"
            ),
        });
    }
    Ok(())
}

fn check_catalog_shape(block_bytes: u32, disk_bytes: u64, count: u64) -> Result<(), FormatError> {
    check_block_bytes(block_bytes)?;
    let want = disk_bytes.div_ceil(u64::from(block_bytes));
    if want > MAX_CATALOG_BLOCKS {
        return Err(FormatError::LimitExceeded {
            what: "catalog blocks",
            value: want,
            limit: MAX_CATALOG_BLOCKS,
        });
    }
    if count != want {
        return Err(FormatError::Invalid {
            what: "catalog digest count",
            detail: format!(
                "{count} digests for a {disk_bytes}-byte disk in {block_bytes}-byte blocks \
                 (expected {want})"
            ),
        });
    }
    Ok(())
}

/// Decodes and verifies a digest catalog (header, key id, `expect`, nonce, tag, then block size,
/// digest count against the disk size, bounded decompression and trailing bytes).
pub fn decode_catalog(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
) -> Result<(ObjectHeader, Catalog), FormatError> {
    let (header, plaintext) = open(key, bytes, expect, ObjectKind::Catalog, None)?;
    let mut r = Reader::new(plaintext.as_slice());
    let target_generation = r.array("target generation")?;
    let committed_cycle = r.u64("committed cycle")?;
    let answers_request = r.u64("request answered")?;
    let block_bytes = r.u32("block size")?;
    let disk_bytes = r.u64("disk bytes")?;
    let created_unix_ms = r.u64("created time")?;
    let count = r.u64("digest count")?;
    check_catalog_shape(block_bytes, disk_bytes, count)?;
    let packed_len = r.u64("compressed digests length")?;
    let packed = r.take(
        to_usize(packed_len, "compressed digests")?,
        "compressed digests",
    )?;
    if r.remaining() != 0 {
        return Err(FormatError::TrailingBytes {
            kind: ObjectKind::Catalog,
            count: len64(r.remaining()),
        });
    }
    let flat_len = to_usize(count.saturating_mul(len64(DIGEST_BYTES)), "digests")?;
    let flat = zstd::bulk::decompress(packed, flat_len)
        .map_err(|e| FormatError::Decompress(e.to_string()))?;
    if flat.len() != flat_len {
        return Err(FormatError::Invalid {
            what: "catalog digests",
            detail: format!(
                "{} bytes after decompression, expected {flat_len}",
                flat.len()
            ),
        });
    }
    let digests = flat
        .chunks_exact(DIGEST_BYTES)
        .map(|c| {
            let mut d = [0u8; DIGEST_BYTES];
            d.copy_from_slice(c);
            d
        })
        .collect();
    Ok((
        header,
        Catalog {
            target_generation,
            committed_cycle,
            answers_request,
            block_bytes,
            disk_bytes,
            digests,
            created_unix_ms,
        },
    ))
}

/// Decodes and verifies a resync request.
pub fn decode_resync_request(
    key: &DiskKey,
    bytes: &[u8],
    expect: &Expect,
) -> Result<(ObjectHeader, ResyncRequest), FormatError> {
    let (header, plaintext) = open(key, bytes, expect, ObjectKind::ResyncRequest, None)?;
    let mut r = Reader::new(plaintext.as_slice());
    let block_bytes = r.u32("block size")?;
    check_block_bytes(block_bytes)?;
    let created_unix_ms = r.u64("created time")?;
    let reason_len = r.u32("reason length")?;
    if reason_len > MAX_ACK_MESSAGE_BYTES {
        return Err(FormatError::LimitExceeded {
            what: "resync reason bytes",
            value: u64::from(reason_len),
            limit: u64::from(MAX_ACK_MESSAGE_BYTES),
        });
    }
    let raw = r.take(to_usize(u64::from(reason_len), "reason")?, "reason")?;
    let reason = String::from_utf8_lossy(raw).into_owned();
    if r.remaining() != 0 {
        return Err(FormatError::TrailingBytes {
            kind: ObjectKind::ResyncRequest,
            count: len64(r.remaining()),
        });
    }
    Ok((
        header,
        ResyncRequest {
            block_bytes,
            reason,
            created_unix_ms,
        },
    ))
}

// ===========================================================================
// Tests
// ===========================================================================

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;
    use proptest::prelude::*;

    fn master() -> MasterKey {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        MasterKey::from_bytes(b)
    }

    fn disk() -> DiskId {
        DiskId([
            0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAC, 0xAD,
            0xAE, 0xAF,
        ])
    }

    fn disk_key() -> DiskKey {
        master().disk_key(&disk())
    }

    fn session() -> Session {
        Session::new(&disk_key(), disk(), 7, 3, [0x5A; 16])
    }

    fn expect() -> Expect {
        Expect {
            disk_id: disk(),
            cycle: 7,
            attempt: Some(3),
            seq: None,
            tag: None,
        }
    }

    fn data_ext(start: u64, count: u64) -> BlobExtent {
        BlobExtent {
            start_sector: start,
            sector_count: count,
            kind: ExtentKind::Data,
        }
    }

    fn zero_ext(start: u64, count: u64) -> BlobExtent {
        BlobExtent {
            start_sector: start,
            sector_count: count,
            kind: ExtentKind::Zero,
        }
    }

    fn text(len: usize) -> Vec<u8> {
        let line = b"the quick brown fox jumps over the lazy dog 0123456789\n";
        line.iter().copied().cycle().take(len).collect()
    }

    /// Deterministic incompressible bytes (xorshift64*).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Test-only: encrypts an arbitrary inner payload under a correct header,
    /// nonce and tag, bypassing every encoder check, so decoders can be fed
    /// authentic but malformed payloads.
    fn seal_raw(s: &Session, kind: ObjectKind, seq: u32, inner: &[u8]) -> EncodedObject {
        s.seal_unchecked(kind, seq, inner.len(), |out| out.extend_from_slice(inner))
            .unwrap()
    }

    /// Test-only: rewrites header fields, recomputing nonce and header CRC as
    /// an attacker moving an object would.
    fn forge_header(bytes: &[u8], edit: impl FnOnce(&mut ObjectHeader)) -> Vec<u8> {
        let mut h = peek_header(bytes).unwrap();
        edit(&mut h);
        let mut out = encode_header(&h);
        out.extend_from_slice(&bytes[HEADER_LEN..]);
        out
    }

    fn blob_inner(
        flags: u8,
        extents: &[(u64, u64, u8)],
        data_len: u64,
        crc: u32,
        body: &[u8],
    ) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        for &(s, c, k) in extents {
            v.extend_from_slice(&s.to_le_bytes());
            v.extend_from_slice(&c.to_le_bytes());
            v.push(k);
        }
        v.extend_from_slice(&data_len.to_le_bytes());
        v.extend_from_slice(&crc.to_le_bytes());
        v.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    fn small_blob() -> EncodedObject {
        session()
            .encode_blob(4, &[data_ext(10, 1), zero_ext(11, 5)], &text(512), 3)
            .unwrap()
    }

    #[test]
    fn header_layout_matches_constants() {
        let h = ObjectHeader {
            kind: ObjectKind::Blob,
            key_id: [1; 8],
            disk_id: DiskId([2; 16]),
            cycle: 0x0102_0304_0506_0708,
            attempt: 0x1112_1314_1516_1718,
            seq: 0xA1A2_A3A4,
            salt: [3; 16],
            payload_len: 0x2122_2324_2526_2728,
        };
        let b = encode_header(&h);
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(HEADER_LEN, 96);
        assert_eq!(&b[OFF_MAGIC..OFF_VERSION], b"RPLOBJ\0\x01");
        assert_eq!(&b[OFF_VERSION..OFF_KIND], &[1, 0]);
        assert_eq!(b[OFF_KIND], 1);
        assert_eq!(b[OFF_FLAGS], 0);
        assert_eq!(&b[OFF_KEY_ID..OFF_DISK_ID], &[1; 8]);
        assert_eq!(&b[OFF_DISK_ID..OFF_CYCLE], &[2; 16]);
        assert_eq!(&b[OFF_CYCLE..OFF_ATTEMPT], &h.cycle.to_le_bytes());
        assert_eq!(&b[OFF_ATTEMPT..OFF_SEQ], &h.attempt.to_le_bytes());
        assert_eq!(&b[OFF_SEQ..OFF_SALT], &h.seq.to_le_bytes());
        assert_eq!(&b[OFF_SALT..OFF_NONCE], &[3; 16]);
        assert_eq!(
            &b[OFF_NONCE..OFF_PAYLOAD_LEN],
            &[1, 0, 0, 0, 0xA4, 0xA3, 0xA2, 0xA1, 0, 0, 0, 0]
        );
        assert_eq!(
            &b[OFF_PAYLOAD_LEN..OFF_HEADER_CRC],
            &h.payload_len.to_le_bytes()
        );
        assert_eq!(
            &b[OFF_HEADER_CRC..HEADER_LEN],
            &crc32fast::hash(&b[..OFF_HEADER_CRC]).to_le_bytes()
        );
    }

    #[test]
    fn blob_round_trip_with_zero_extents() {
        let s = session();
        let extents = [
            data_ext(0, 2),
            zero_ext(2, 100),
            data_ext(200, 1),
            zero_ext(201, 1),
        ];
        let data = text(3 * 512);
        let enc = s.encode_blob(9, &extents, &data, 3).unwrap();
        assert_eq!(&enc.bytes[enc.bytes.len() - 16..], &enc.tag);
        let d = decode_blob(
            &disk_key(),
            &enc.bytes,
            &Expect {
                seq: Some(9),
                tag: Some(enc.tag),
                ..expect()
            },
        )
        .unwrap();
        assert_eq!(d.extents, extents);
        assert_eq!(&d.data[..], &data[..]);
        assert!(d.compressed);
        assert!(d.stored_body_len < 3 * 512);
        assert_eq!(d.header.seq, 9);
        assert_eq!(d.header.kind, ObjectKind::Blob);
        assert_eq!(d.header.payload_len, (enc.bytes.len() - HEADER_LEN) as u64);
        assert_eq!(peek_header(&enc.bytes).unwrap(), d.header);
    }

    #[test]
    fn zero_extents_carry_no_bytes() {
        let s = session();
        let enc = s.encode_blob(0, &[zero_ext(0, 1 << 30)], &[], 3).unwrap();
        // header + flags/count + 1 extent + data_len/crc/body_len + tag, no body.
        assert_eq!(
            enc.bytes.len(),
            HEADER_LEN + BLOB_FIXED_LEN + EXTENT_RECORD_LEN + TAG_LEN
        );
        let d = decode_blob(&disk_key(), &enc.bytes, &expect()).unwrap();
        assert!(d.data.is_empty());
        assert!(!d.compressed);
        assert_eq!(d.stored_body_len, 0);
        // data for a zero extent is refused
        let e = s
            .encode_blob(1, &[zero_ext(0, 1)], &[0; 512], 3)
            .unwrap_err();
        assert_eq!(
            e,
            FormatError::DataLength {
                expected: 0,
                found: 512
            }
        );
    }

    #[test]
    fn compression_kept_only_when_smaller() {
        let s = session();
        let random = noise(64 * 512, 42);
        let enc = s.encode_blob(0, &[data_ext(0, 64)], &random, 3).unwrap();
        let d = decode_blob(&disk_key(), &enc.bytes, &expect()).unwrap();
        assert!(!d.compressed);
        assert_eq!(d.stored_body_len, random.len() as u64);
        assert_eq!(&d.data[..], &random[..]);

        for (seq, data) in [(1, vec![0u8; 64 * 512]), (2, text(64 * 512))] {
            let enc = s.encode_blob(seq, &[data_ext(0, 64)], &data, 3).unwrap();
            let d = decode_blob(&disk_key(), &enc.bytes, &expect()).unwrap();
            assert!(d.compressed);
            assert!(d.stored_body_len < data.len() as u64);
            assert_eq!(&d.data[..], &data[..]);
            assert!(enc.bytes.len() < data.len());
        }
    }

    #[test]
    fn manifest_round_trip() {
        let s = session();
        let m = Manifest {
            base_cycle: 6,
            disk_bytes: 1 << 30,
            blobs: vec![
                ManifestBlob {
                    seq: 0,
                    object_len: 1000,
                    tag: [7; 16],
                    data_bytes: 4096,
                },
                ManifestBlob {
                    seq: 1,
                    object_len: 2000,
                    tag: [8; 16],
                    data_bytes: 1 << 20,
                },
            ],
            bitmap: b"opaque-bitmap".to_vec(),
            created_unix_ms: 1_700_000_000_000,
        };
        let enc = s.encode_manifest(&m).unwrap();
        let (h, back) = decode_manifest(
            &disk_key(),
            &enc.bytes,
            &Expect {
                seq: Some(0),
                ..expect()
            },
        )
        .unwrap();
        assert_eq!(back, m);
        assert_eq!(h.kind, ObjectKind::Manifest);
        assert_eq!(h.seq, 0);
        let empty = Manifest {
            base_cycle: 0,
            disk_bytes: 0,
            blobs: vec![],
            bitmap: vec![],
            created_unix_ms: 0,
        };
        let s2 = Session::new(&disk_key(), disk(), 7, 4, [1; 16]);
        let enc = s2.encode_manifest(&empty).unwrap();
        let (_, back) = decode_manifest(&disk_key(), &enc.bytes, &expect_attempt(4)).unwrap();
        assert_eq!(back, empty);
    }

    fn expect_attempt(a: u64) -> Expect {
        Expect {
            attempt: Some(a),
            ..expect()
        }
    }

    #[test]
    fn catalog_and_resync_request_round_trip_and_checks() {
        let s = session();
        let digests: Vec<[u8; DIGEST_BYTES]> = (0..9u8).map(|i| [i % 3; DIGEST_BYTES]).collect();
        let c = Catalog {
            target_generation: [7; GENERATION_BYTES],
            committed_cycle: 4,
            answers_request: 2,
            block_bytes: 4096,
            disk_bytes: 8 * 4096 + 512,
            digests,
            created_unix_ms: 99,
        };
        let enc = s.encode_catalog(&c).unwrap();
        let (h, back) = decode_catalog(&disk_key(), &enc.bytes, &expect()).unwrap();
        assert_eq!((h.kind, back), (ObjectKind::Catalog, c.clone()));
        // A count that does not fit the disk is refused on both sides.
        let short = Catalog {
            digests: c.digests[..8].to_vec(),
            ..c.clone()
        };
        assert!(matches!(
            s.encode_catalog(&short),
            Err(FormatError::Invalid { .. })
        ));
        let odd = Catalog {
            block_bytes: 5000,
            ..c
        };
        assert!(s.encode_catalog(&odd).is_err());
        let q = ResyncRequest {
            block_bytes: 65536,
            reason: "tracking was lost".into(),
            created_unix_ms: 5,
        };
        let enc = s.encode_resync_request(&q).unwrap();
        let (h, back) = decode_resync_request(&disk_key(), &enc.bytes, &expect()).unwrap();
        assert_eq!((h.kind, back), (ObjectKind::ResyncRequest, q));
        // Kinds are not interchangeable.
        assert!(matches!(
            decode_catalog(&disk_key(), &enc.bytes, &expect()),
            Err(FormatError::WrongKind { .. })
        ));
    }

    #[test]
    fn acks_with_and_without_a_generation_decode() {
        for g in [None, Some([3u8; GENERATION_BYTES])] {
            let s = session();
            let a = Ack {
                status: AckStatus::Applied,
                sectors_written: 8,
                message: "applied".into(),
                target_generation: g,
            };
            let enc = s.encode_ack(&a).unwrap();
            assert_eq!(decode_ack(&disk_key(), &enc.bytes, &expect()).unwrap().1, a);
        }
    }

    #[test]
    fn ack_round_trip_and_limits() {
        let s = session();
        for a in [
            Ack {
                status: AckStatus::Applied,
                sectors_written: 1234,
                message: "ok".into(),
                target_generation: None,
            },
            Ack {
                status: AckStatus::Failed,
                sectors_written: 0,
                message: "écriture échouée: disque plein".into(),
                target_generation: None,
            },
        ] {
            let s = Session::new(&disk_key(), disk(), 7, 3, Session::generate_salt().unwrap());
            let enc = s.encode_ack(&a).unwrap();
            let (h, back) = decode_ack(&disk_key(), &enc.bytes, &expect()).unwrap();
            assert_eq!(back, a);
            assert_eq!(h.kind, ObjectKind::Ack);
        }
        let long = Ack {
            status: AckStatus::Failed,
            sectors_written: 0,
            message: "x".repeat(4097),
            target_generation: None,
        };
        assert!(matches!(
            s.encode_ack(&long),
            Err(FormatError::LimitExceeded { .. })
        ));
        let max = Ack {
            message: "y".repeat(4096),
            ..long
        };
        let enc = s.encode_ack(&max).unwrap();
        assert_eq!(
            decode_ack(&disk_key(), &enc.bytes, &expect()).unwrap().1,
            max
        );
    }

    #[test]
    fn encoder_validates_extents() {
        let s = session();
        let cases: Vec<(Vec<BlobExtent>, usize)> = vec![
            (vec![], 0),
            (vec![data_ext(0, 0)], 0),
            (vec![data_ext(10, 2), data_ext(11, 1)], 1),
            (vec![data_ext(10, 2), data_ext(5, 1)], 1),
            (vec![zero_ext(u64::MAX, 2)], 0),
            (vec![zero_ext(u64::MAX / 512, 1)], 0),
        ];
        for (extents, want_index) in cases {
            let data_sectors: u64 = extents
                .iter()
                .filter(|e| e.kind == ExtentKind::Data)
                .map(|e| e.sector_count)
                .fold(0u64, |a, b| a.saturating_add(b));
            let data = vec![1u8; (data_sectors.min(16) * 512) as usize];
            match s.encode_blob(0, &extents, &data, 3) {
                Err(FormatError::InvalidExtents { index, reason }) => {
                    assert_eq!(index, want_index, "{extents:?}: {reason}")
                }
                other => panic!("{extents:?}: {other:?}"),
            }
        }
        // adjacent extents are fine
        s.encode_blob(
            0,
            &[data_ext(0, 1), zero_ext(1, 1), data_ext(2, 1)],
            &text(1024),
            3,
        )
        .unwrap();
        // data length must match
        let e = s
            .encode_blob(1, &[data_ext(0, 2)], &text(1000), 3)
            .unwrap_err();
        assert_eq!(
            e,
            FormatError::DataLength {
                expected: 1024,
                found: 1000
            }
        );
        // data limit
        let big = vec![0u8; (MAX_BLOB_DATA_BYTES + 512) as usize];
        let e = s
            .encode_blob(2, &[data_ext(0, MAX_BLOB_DATA_BYTES / 512 + 1)], &big, 1)
            .unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::LimitExceeded {
                    what: "blob data bytes",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let enc = small_blob();
        let key = disk_key();
        let bytes = enc.bytes.to_vec();
        for pos in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[pos] ^= mask;
                let err = decode_blob(&key, &b, &expect()).expect_err("tampered blob decoded");
                let ok = match pos {
                    0..=7 => matches!(err, FormatError::BadMagic { .. }),
                    8..=9 => matches!(err, FormatError::UnsupportedVersion { .. }),
                    10 => matches!(
                        err,
                        FormatError::UnknownKind { .. } | FormatError::WrongKind { .. }
                    ),
                    11 => matches!(err, FormatError::HeaderFlags { .. }),
                    12..=95 => matches!(err, FormatError::HeaderChecksum { .. }),
                    _ => err == FormatError::AuthenticationFailed,
                };
                assert!(ok, "pos {pos} mask {mask:#x}: {err:?}");
            }
        }
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let enc = small_blob();
        let key = disk_key();
        for len in 0..enc.bytes.len() {
            let err =
                decode_blob(&key, &enc.bytes[..len], &expect()).expect_err("truncated decoded");
            if len < HEADER_LEN {
                assert!(
                    matches!(err, FormatError::TooShort { .. }),
                    "{len}: {err:?}"
                );
            } else {
                assert!(
                    matches!(err, FormatError::LengthMismatch { .. }),
                    "{len}: {err:?}"
                );
            }
            assert!(peek_header(&enc.bytes[..len]).is_err());
        }
        let mut longer = enc.bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            decode_blob(&key, &longer, &expect()),
            Err(FormatError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn expectation_mismatch_names_the_field() {
        let enc = small_blob();
        let key = disk_key();
        let cases: Vec<(Expect, &str)> = vec![
            (
                Expect {
                    disk_id: DiskId([0; 16]),
                    ..expect()
                },
                "disk_id",
            ),
            (
                Expect {
                    cycle: 8,
                    ..expect()
                },
                "cycle",
            ),
            (
                Expect {
                    attempt: Some(2),
                    ..expect()
                },
                "attempt",
            ),
            (
                Expect {
                    seq: Some(5),
                    ..expect()
                },
                "seq",
            ),
            (
                Expect {
                    tag: Some([0; 16]),
                    ..expect()
                },
                "tag",
            ),
        ];
        for (e, field) in cases {
            match decode_blob(&key, &enc.bytes, &e) {
                Err(FormatError::Misplaced { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let err = decode_blob(
            &key,
            &enc.bytes,
            &Expect {
                cycle: 8,
                ..expect()
            },
        )
        .unwrap_err();
        assert_eq!(
            err,
            FormatError::Misplaced {
                field: "cycle",
                expected: "8".into(),
                found: "7".into()
            }
        );
        assert!(err.to_string().contains("cycle"), "{err}");
        // all-correct expectations pass
        decode_blob(
            &key,
            &enc.bytes,
            &Expect {
                seq: Some(4),
                tag: Some(enc.tag),
                ..expect()
            },
        )
        .unwrap();
    }

    #[test]
    fn moved_objects_with_fixed_crc_never_decode() {
        let enc = small_blob();
        let key = disk_key();
        let forged: Vec<(Vec<u8>, Expect)> = vec![
            (
                forge_header(&enc.bytes, |h| h.cycle = 8),
                Expect {
                    cycle: 8,
                    ..expect()
                },
            ),
            (forge_header(&enc.bytes, |h| h.cycle = 8), expect()),
            (
                forge_header(&enc.bytes, |h| h.attempt = 4),
                Expect {
                    attempt: None,
                    ..expect()
                },
            ),
            (
                forge_header(&enc.bytes, |h| h.seq = 5),
                Expect {
                    seq: Some(5),
                    ..expect()
                },
            ),
            (forge_header(&enc.bytes, |h| h.seq = 5), expect()),
            (
                forge_header(&enc.bytes, |h| h.disk_id = DiskId([1; 16])),
                Expect {
                    disk_id: DiskId([1; 16]),
                    ..expect()
                },
            ),
            (forge_header(&enc.bytes, |h| h.salt = [0; 16]), expect()),
        ];
        for (i, (bytes, e)) in forged.iter().enumerate() {
            let err = decode_blob(&key, bytes, e).expect_err("forged header decoded");
            assert!(
                matches!(
                    err,
                    FormatError::AuthenticationFailed | FormatError::Misplaced { .. }
                ),
                "case {i}: {err:?}"
            );
        }
        // header edited but nonce left alone (only CRC fixed): the nonce check fires.
        let mut b = enc.bytes.to_vec();
        b[OFF_SEQ] ^= 1;
        let crc = crc32fast::hash(&b[..OFF_HEADER_CRC]);
        b[OFF_HEADER_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_blob(&key, &b, &expect()),
            Err(FormatError::NonceMismatch { .. })
        ));
        // kind changed, nonce and crc fixed: a manifest decoder rejects it
        let as_manifest = forge_header(&enc.bytes, |h| {
            h.kind = ObjectKind::Manifest;
            h.seq = 0;
        });
        assert_eq!(
            decode_manifest(&key, &as_manifest, &expect()).unwrap_err(),
            FormatError::AuthenticationFailed
        );
        assert!(matches!(
            decode_blob(&key, &as_manifest, &expect()),
            Err(FormatError::WrongKind { .. })
        ));
    }

    #[test]
    fn whole_header_is_associated_data() {
        // Decrypt by hand with the session's blob key: only the exact header as
        // AAD authenticates; an empty AAD or a header with one bit changed does not.
        let s = session();
        let enc = small_blob();
        let (hdr, payload) = enc.bytes.split_at(HEADER_LEN);
        let (ct, tag) = payload.split_at(payload.len() - TAG_LEN);
        let try_aad = |aad: &[u8]| {
            let mut buf = vec![0u8; ct.len()];
            s.key_for(ObjectKind::Blob).open_into(
                nonce_for(ObjectKind::Blob, 4),
                aad,
                ct,
                &<[u8; 16]>::try_from(tag).unwrap(),
                &mut buf,
            )
        };
        assert!(try_aad(hdr));
        assert!(!try_aad(&[]));
        assert!(!try_aad(&hdr[..OFF_HEADER_CRC]));
        for pos in 0..HEADER_LEN {
            let mut h = hdr.to_vec();
            h[pos] ^= 0x10;
            assert!(!try_aad(&h), "header byte {pos} is not authenticated");
        }
    }

    #[test]
    fn wrong_master_key_is_wrong_key() {
        let enc = small_blob();
        let other = MasterKey::from_bytes([0xEE; 32]).disk_key(&disk());
        let err = decode_blob(&other, &enc.bytes, &expect()).unwrap_err();
        match &err {
            FormatError::WrongKey { expected, found } => {
                assert_eq!(expected, &to_hex(&other.key_id()));
                assert_eq!(found, &to_hex(&disk_key().key_id()));
            }
            e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains("key file does not match"), "{err}");
        // the same master key with another disk id also gives a different disk key
        let other_disk = master().disk_key(&DiskId([0; 16]));
        assert!(matches!(
            decode_blob(&other_disk, &enc.bytes, &expect()),
            Err(FormatError::WrongKey { .. })
        ));
    }

    #[test]
    fn inner_crc_is_checked() {
        let s = session();
        let data = text(512);
        let good = crc32fast::hash(&data);
        let enc = seal_raw(
            &s,
            ObjectKind::Blob,
            0,
            &blob_inner(0, &[(0, 1, 0)], 512, good ^ 1, &data),
        );
        assert_eq!(
            decode_blob(&disk_key(), &enc.bytes, &expect()).unwrap_err(),
            FormatError::ChecksumMismatch {
                stored: good ^ 1,
                computed: good
            }
        );
        // compressed body, wrong crc
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let enc = seal_raw(
            &s,
            ObjectKind::Blob,
            1,
            &blob_inner(1, &[(0, 1, 0)], 512, good ^ 2, &z),
        );
        assert_eq!(
            decode_blob(&disk_key(), &enc.bytes, &expect()).unwrap_err(),
            FormatError::ChecksumMismatch {
                stored: good ^ 2,
                computed: good
            }
        );
        // and with the right crc it decodes
        let enc = seal_raw(
            &s,
            ObjectKind::Blob,
            2,
            &blob_inner(1, &[(0, 1, 0)], 512, good, &z),
        );
        assert!(
            decode_blob(&disk_key(), &enc.bytes, &expect())
                .unwrap()
                .compressed
        );
    }

    #[test]
    fn authentic_but_malformed_payloads_are_rejected() {
        let s = session();
        let data = text(1024);
        let crc = crc32fast::hash(&data);
        let key = disk_key();
        let blob = |inner: Vec<u8>| {
            decode_blob(
                &key,
                &seal_raw(&s, ObjectKind::Blob, 0, &inner).bytes,
                &expect(),
            )
        };
        assert_eq!(
            blob(blob_inner(2, &[(0, 2, 0)], 1024, crc, &data)).unwrap_err(),
            FormatError::BlobFlags { found: 2 }
        );
        assert_eq!(
            blob(blob_inner(0, &[(0, 2, 7)], 1024, crc, &data)).unwrap_err(),
            FormatError::UnknownExtentKind { index: 0, found: 7 }
        );
        assert!(matches!(
            blob(blob_inner(0, &[(0, 2, 0), (1, 1, 1)], 1024, crc, &data)).unwrap_err(),
            FormatError::InvalidExtents { index: 1, .. }
        ));
        assert!(matches!(
            blob(blob_inner(0, &[(0, 3, 0)], 1024, crc, &data)).unwrap_err(),
            FormatError::InvalidExtents { .. }
        ));
        assert!(matches!(
            blob(blob_inner(0, &[], 1024, crc, &data)).unwrap_err(),
            FormatError::InvalidExtents { index: 0, .. }
        ));
        assert!(matches!(
            blob(blob_inner(0, &[(0, 2, 0)], 1000, crc, &data)).unwrap_err(),
            FormatError::InvalidBody { .. }
        ));
        assert!(matches!(
            blob(blob_inner(
                0,
                &[(0, 2, 0)],
                MAX_BLOB_DATA_BYTES + 1,
                crc,
                &data
            ))
            .unwrap_err(),
            FormatError::LimitExceeded {
                what: "blob data bytes",
                ..
            }
        ));
        let mut trailing = blob_inner(0, &[(0, 2, 0)], 1024, crc, &data);
        trailing.push(0);
        assert_eq!(
            blob(trailing).unwrap_err(),
            FormatError::TrailingBytes {
                kind: ObjectKind::Blob,
                count: 1
            }
        );
        // huge extent count with few bytes: refused before allocating
        let mut huge = vec![0u8];
        huge.extend_from_slice(&(MAX_EXTENTS_PER_BLOB).to_le_bytes());
        assert!(matches!(
            blob(huge).unwrap_err(),
            FormatError::Truncated {
                what: "extents",
                ..
            }
        ));
        let mut over = vec![0u8];
        over.extend_from_slice(&(MAX_EXTENTS_PER_BLOB + 1).to_le_bytes());
        assert!(matches!(
            blob(over).unwrap_err(),
            FormatError::LimitExceeded {
                what: "extent count",
                ..
            }
        ));
        // compressed body that is not smaller than the data, or decompresses to the wrong size
        assert!(matches!(
            blob(blob_inner(1, &[(0, 2, 0)], 1024, crc, &data)).unwrap_err(),
            FormatError::InvalidBody { .. }
        ));
        let z_short = zstd::bulk::compress(&data[..512], 3).unwrap();
        assert!(matches!(
            blob(blob_inner(1, &[(0, 2, 0)], 1024, crc, &z_short)).unwrap_err(),
            FormatError::DecompressedLength {
                expected: 1024,
                found: 512
            }
        ));
        let z_long = zstd::bulk::compress(&text(4096), 3).unwrap();
        assert!(matches!(
            blob(blob_inner(1, &[(0, 2, 0)], 1024, crc, &z_long)).unwrap_err(),
            FormatError::Decompress(_)
        ));
        assert!(matches!(
            blob(blob_inner(1, &[(0, 2, 0)], 1024, crc, b"not zstd")).unwrap_err(),
            FormatError::Decompress(_)
        ));

        // manifest
        let man = |inner: Vec<u8>| {
            decode_manifest(
                &key,
                &seal_raw(&s, ObjectKind::Manifest, 0, &inner).bytes,
                &expect(),
            )
        };
        let mut m = Vec::new();
        m.extend_from_slice(&6u64.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        m.extend_from_slice(&MAX_MANIFEST_BLOBS.to_le_bytes());
        assert!(matches!(
            man(m.clone()).unwrap_err(),
            FormatError::Truncated { .. }
        ));
        m.truncate(16);
        m.extend_from_slice(&(MAX_MANIFEST_BLOBS + 1).to_le_bytes());
        assert!(matches!(
            man(m.clone()).unwrap_err(),
            FormatError::LimitExceeded { .. }
        ));
        m.truncate(16);
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&(MAX_BITMAP_BYTES + 1).to_le_bytes());
        assert!(matches!(
            man(m.clone()).unwrap_err(),
            FormatError::LimitExceeded { .. }
        ));
        m.truncate(20);
        m.extend_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(
            man(m.clone()).unwrap_err(),
            FormatError::Truncated { what: "bitmap", .. }
        ));
        m.truncate(20);
        m.extend_from_slice(&0u64.to_le_bytes());
        m.extend_from_slice(&5u64.to_le_bytes());
        assert!(man(m.clone()).is_ok());
        m.push(9);
        assert_eq!(
            man(m).unwrap_err(),
            FormatError::TrailingBytes {
                kind: ObjectKind::Manifest,
                count: 1
            }
        );

        // ack
        let ack = |inner: Vec<u8>| {
            decode_ack(
                &key,
                &seal_raw(&s, ObjectKind::Ack, 0, &inner).bytes,
                &expect(),
            )
        };
        let ack_inner = |status: u8, len: u32, msg: &[u8]| {
            let mut v = vec![status];
            v.extend_from_slice(&5u64.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(msg);
            v
        };
        assert!(ack(ack_inner(0, 2, b"ok")).is_ok());
        assert_eq!(
            ack(ack_inner(2, 2, b"ok")).unwrap_err(),
            FormatError::UnknownAckStatus { found: 2 }
        );
        assert!(matches!(
            ack(ack_inner(0, 4097, &[b'a'; 4097])).unwrap_err(),
            FormatError::LimitExceeded { .. }
        ));
        assert!(matches!(
            ack(ack_inner(0, 3, b"ok")).unwrap_err(),
            FormatError::Truncated { .. }
        ));
        assert_eq!(
            ack(ack_inner(0, 2, &[0xC3, 0x28])).unwrap_err(),
            FormatError::AckMessageUtf8 { valid_up_to: 0 }
        );
        assert_eq!(
            ack(ack_inner(0, 1, b"ok")).unwrap_err(),
            FormatError::TrailingBytes {
                kind: ObjectKind::Ack,
                count: 1
            }
        );
        assert!(matches!(
            ack(vec![0]).unwrap_err(),
            FormatError::Truncated { .. }
        ));
    }

    #[test]
    fn header_checks_in_order() {
        let key = disk_key();
        let s = session();
        let enc = s
            .encode_ack(&Ack {
                status: AckStatus::Applied,
                sectors_written: 1,
                message: String::new(),
                target_generation: None,
            })
            .unwrap();
        let b = enc.bytes.to_vec();
        assert!(matches!(
            decode_blob(&key, &b, &expect()),
            Err(FormatError::WrongKind {
                expected: ObjectKind::Blob,
                found: ObjectKind::Ack
            })
        ));
        assert!(matches!(
            decode_manifest(&key, &b, &expect()),
            Err(FormatError::WrongKind { .. })
        ));
        let mut v = b.clone();
        v[OFF_VERSION] = 2;
        assert_eq!(
            decode_ack(&key, &v, &expect()).unwrap_err(),
            FormatError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        let mut k = b.clone();
        k[OFF_KIND] = 9;
        assert_eq!(
            peek_header(&k).unwrap_err(),
            FormatError::UnknownKind { found: 9 }
        );
        // a manifest/ack with a non-zero seq is malformed even with a good crc
        let forged = forge_header(&b, |h| h.seq = 1);
        assert_eq!(
            decode_ack(&key, &forged, &expect()).unwrap_err(),
            FormatError::NonZeroSeq {
                kind: ObjectKind::Ack,
                seq: 1
            }
        );
        // payload shorter than a tag
        let mut short = forge_header(&b, |h| h.payload_len = 15);
        short.truncate(HEADER_LEN + 15);
        assert_eq!(
            peek_header(&short).unwrap_err(),
            FormatError::PayloadTooShort { payload_len: 15 }
        );
        // bad magic before anything else
        let mut m = b.clone();
        m[0] = b'X';
        m[OFF_VERSION] = 9;
        assert!(matches!(
            decode_ack(&key, &m, &expect()),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn sessions_never_share_key_and_nonce() {
        let key = disk_key();
        let data = text(2048);
        let extents = [data_ext(0, 4)];
        let a = Session::new(&key, disk(), 7, 3, [1; 16])
            .encode_blob(0, &extents, &data, 3)
            .unwrap();
        let b = Session::new(&key, disk(), 7, 4, [1; 16])
            .encode_blob(0, &extents, &data, 3)
            .unwrap();
        let c = Session::new(&key, disk(), 7, 3, [2; 16])
            .encode_blob(0, &extents, &data, 3)
            .unwrap();
        let a2 = Session::new(&key, disk(), 7, 3, [1; 16])
            .encode_blob(0, &extents, &data, 3)
            .unwrap();
        let body = |e: &EncodedObject| e.bytes[HEADER_LEN..].to_vec();
        assert_eq!(a.bytes, a2.bytes, "encoding is deterministic");
        assert_ne!(body(&a), body(&b));
        assert_ne!(body(&a), body(&c));
        assert_ne!(body(&b), body(&c));
        // same nonce (kind, seq) in different sessions: ciphertext xor differs from plaintext xor,
        // i.e. the keystreams differ
        let xa: Vec<u8> = body(&a).iter().zip(body(&b)).map(|(x, y)| x ^ y).collect();
        assert!(xa[..body(&a).len() - 16].iter().any(|&x| x != 0));
        // two kinds in one session have different keys even with the same nonce position
        let s = Session::new(&key, disk(), 7, 3, [1; 16]);
        assert_ne!(
            nonce_for(ObjectKind::Manifest, 0),
            nonce_for(ObjectKind::Ack, 0)
        );
        assert_ne!(
            nonce_for(ObjectKind::Blob, 1),
            nonce_for(ObjectKind::Blob, 2)
        );
        let _ = s;
    }

    #[test]
    fn session_refuses_nonce_reuse() {
        let s = session();
        let one = s.encode_blob(5, &[data_ext(0, 1)], &text(512), 3).unwrap();
        // identical contents: same bytes back
        let again = s.encode_blob(5, &[data_ext(0, 1)], &text(512), 3).unwrap();
        assert_eq!(one.bytes, again.bytes);
        // different contents under the same seq: refused
        let e = s
            .encode_blob(5, &[data_ext(0, 1)], &noise(512, 1), 3)
            .unwrap_err();
        assert_eq!(
            e,
            FormatError::NonceReuse {
                kind: ObjectKind::Blob,
                seq: 5
            }
        );
        // other seq is fine
        s.encode_blob(6, &[data_ext(0, 1)], &noise(512, 1), 3)
            .unwrap();
        let a1 = Ack {
            status: AckStatus::Applied,
            sectors_written: 1,
            message: "a".into(),
            target_generation: None,
        };
        let a2 = Ack {
            message: "b".into(),
            ..a1.clone()
        };
        s.encode_ack(&a1).unwrap();
        s.encode_ack(&a1).unwrap();
        assert!(matches!(
            s.encode_ack(&a2),
            Err(FormatError::NonceReuse {
                kind: ObjectKind::Ack,
                seq: 0
            })
        ));
    }

    #[test]
    fn error_messages_are_lower_case() {
        let samples = vec![
            FormatError::TooShort { len: 1, need: 96 },
            FormatError::AuthenticationFailed,
            FormatError::WrongKey {
                expected: "aa".into(),
                found: "bb".into(),
            },
            FormatError::HeaderChecksum {
                stored: 1,
                computed: 2,
            },
            FormatError::ChecksumMismatch {
                stored: 1,
                computed: 2,
            },
            FormatError::EncryptionFailed,
        ];
        for e in samples {
            let m = e.to_string();
            assert!(m.chars().next().is_some_and(|c| !c.is_uppercase()), "{m}");
        }
    }

    fn extents_strategy() -> impl Strategy<Value = Vec<BlobExtent>> {
        proptest::collection::vec((0u64..50, 1u64..6, any::<bool>()), 1..12).prop_map(|v| {
            let mut pos = 0u64;
            v.into_iter()
                .map(|(gap, count, is_data)| {
                    let e = BlobExtent {
                        start_sector: pos + gap,
                        sector_count: count,
                        kind: if is_data {
                            ExtentKind::Data
                        } else {
                            ExtentKind::Zero
                        },
                    };
                    pos += gap + count;
                    e
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn prop_blob_round_trip(extents in extents_strategy(), seed in any::<u64>(), repetitive in any::<bool>(), seq in any::<u32>(), level in 1i32..6) {
            let sectors: u64 = extents.iter().filter(|e| e.kind == ExtentKind::Data).map(|e| e.sector_count).sum();
            let len = (sectors * 512) as usize;
            let data = if repetitive { text(len) } else { noise(len, seed | 1) };
            let s = session();
            let enc = s.encode_blob(seq, &extents, &data, level).unwrap();
            let d = decode_blob(&disk_key(), &enc.bytes, &Expect { seq: Some(seq), tag: Some(enc.tag), ..expect() }).unwrap();
            prop_assert_eq!(&d.extents, &extents);
            prop_assert_eq!(&d.data[..], &data[..]);
            prop_assert_eq!(d.compressed, d.stored_body_len < data.len() as u64);
        }

        #[test]
        fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let key = disk_key();
            let _ = peek_header(&bytes);
            let _ = decode_blob(&key, &bytes, &expect());
            let _ = decode_manifest(&key, &bytes, &expect());
            let _ = decode_ack(&key, &bytes, &expect());
        }

        #[test]
        fn prop_random_payload_with_valid_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..300), kind in 1u8..6) {
            // a correct header in front of random bytes: reaches the key, expect and tag checks
            let key = disk_key();
            let kind = ObjectKind::from_u8(kind).unwrap();
            let h = ObjectHeader { kind, key_id: key.key_id(), disk_id: disk(), cycle: 7, attempt: 3, seq: 0, salt: [0x5A; 16], payload_len: tail.len() as u64 };
            let mut b = encode_header(&h);
            b.extend_from_slice(&tail);
            let r = match kind {
                ObjectKind::Blob => decode_blob(&key, &b, &expect()).map(|_| ()),
                ObjectKind::Manifest => decode_manifest(&key, &b, &expect()).map(|_| ()),
                ObjectKind::Ack => decode_ack(&key, &b, &expect()).map(|_| ()),
                ObjectKind::Catalog => decode_catalog(&key, &b, &expect()).map(|_| ()),
                ObjectKind::ResyncRequest => decode_resync_request(&key, &b, &expect()).map(|_| ()),
            };
            prop_assert!(r.is_err());
        }

        #[test]
        fn prop_authentic_random_payloads_never_panic(inner in proptest::collection::vec(any::<u8>(), 0..300), kind in 1u8..6, prefix in any::<u32>()) {
            // authentic (correctly encrypted) but arbitrary plaintexts exercise the inner parsers;
            // the prefix makes small counts/lengths likely.
            let s = session();
            let key = disk_key();
            let kind = ObjectKind::from_u8(kind).unwrap();
            let mut p = Vec::new();
            match kind {
                ObjectKind::Blob => { p.push((prefix & 1) as u8); p.extend_from_slice(&(prefix % 5).to_le_bytes()); }
                ObjectKind::Manifest => { p.extend_from_slice(&[0; 16]); p.extend_from_slice(&(prefix % 5).to_le_bytes()); }
                ObjectKind::Ack => { p.push((prefix % 3) as u8); p.extend_from_slice(&[0; 8]); p.extend_from_slice(&(prefix % 40).to_le_bytes()); }
                ObjectKind::Catalog => { p.extend_from_slice(&[0; 32]); p.extend_from_slice(&4096u32.to_le_bytes()); p.extend_from_slice(&u64::from(prefix % 9 * 4096).to_le_bytes()); p.extend_from_slice(&[0; 8]); p.extend_from_slice(&u64::from(prefix % 9).to_le_bytes()); }
                ObjectKind::ResyncRequest => { p.extend_from_slice(&4096u32.to_le_bytes()); p.extend_from_slice(&[0; 8]); p.extend_from_slice(&(prefix % 40).to_le_bytes()); }
            }
            for candidate in [inner.clone(), [p, inner].concat()] {
                let enc = seal_raw(&s, kind, 0, &candidate);
                let _ = match kind {
                    ObjectKind::Blob => decode_blob(&key, &enc.bytes, &expect()).map(|_| ()),
                    ObjectKind::Manifest => decode_manifest(&key, &enc.bytes, &expect()).map(|_| ()),
                    ObjectKind::Ack => decode_ack(&key, &enc.bytes, &expect()).map(|_| ()),
                    ObjectKind::Catalog => decode_catalog(&key, &enc.bytes, &expect()).map(|_| ()),
                    ObjectKind::ResyncRequest => decode_resync_request(&key, &enc.bytes, &expect()).map(|_| ()),
                };
            }
        }

        #[test]
        fn prop_mutated_objects_never_decode(pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let enc = small_blob();
            let key = disk_key();
            let mut b = enc.bytes.to_vec();
            let i = pos.index(b.len());
            prop_assume!(b[i] != byte);
            b[i] = byte;
            prop_assert!(decode_blob(&key, &b, &expect()).is_err());
            let c = cut.index(enc.bytes.len());
            prop_assert!(decode_blob(&key, &enc.bytes[..c], &expect()).is_err());
        }
    }
}
