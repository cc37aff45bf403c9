//! Shared pieces of the fuzz targets in `fuzz_targets/`:
//!
//! - the golden key material of `replicator-core/tests/golden.rs` (master key
//!   bytes 0..32, disk id 0xA0..0xB0, cycle 7, attempt 3, salt 0x5A x 16), so
//!   the committed golden objects in `seeds/` decode in the raw targets;
//! - [`Sealer`], an independent implementation of the documented key schedule
//!   and object envelope (`FORMAT-objects.md`) that authenticates an
//!   *arbitrary* plaintext, so the payload parsers behind AES-GCM can be
//!   fuzzed (random bytes never get past the tag);
//! - [`Tamper`] operations applied to encoded objects;
//! - [`Intervals`], a trivially correct reference model of a sector set, used
//!   to check [`replicator_core::bitmap::SectorBitmap`].

use std::sync::OnceLock;

use aes_gcm::aead::{AeadInOut, Nonce, Tag};
use aes_gcm::{Aes256Gcm, Key, KeyInit};
use arbitrary::Arbitrary;
use hkdf::Hkdf;
use replicator_core::format::{
    Expect, FORMAT_VERSION, FormatError, HEADER_FLAGS_NONE, HEADER_LEN, HKDF_DISK_SALT,
    HKDF_KEY_ID_INFO, HKDF_SESSION_INFO, KEY_ID_LEN, MAGIC, NONCE_LEN, OFF_ATTEMPT, OFF_CYCLE,
    OFF_FLAGS, OFF_HEADER_CRC, OFF_KIND, OFF_NONCE, OFF_PAYLOAD_LEN, OFF_SEQ, OFF_VERSION,
    ObjectHeader, ObjectKind, SALT_LEN, Session, peek_header,
};
use replicator_core::keys::{DiskId, DiskKey, MasterKey};
use sha2::Sha256;

// ---------------------------------------------------------------------------
// Golden key material (same as replicator-core/tests/golden.rs)
// ---------------------------------------------------------------------------

/// Cycle of the golden objects.
pub const GOLDEN_CYCLE: u64 = 7;
/// Attempt of the golden objects.
pub const GOLDEN_ATTEMPT: u64 = 3;
/// Session salt of the golden objects.
pub const GOLDEN_SALT: [u8; SALT_LEN] = [0x5A; SALT_LEN];

/// Master key bytes 0, 1, ..., 31.
pub fn golden_master_bytes() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

/// Disk id bytes 0xA0, 0xA1, ..., 0xAF.
pub fn golden_disk() -> DiskId {
    DiskId(std::array::from_fn(|i| 0xA0 + i as u8))
}

/// The golden disk key, derived once.
pub fn golden_disk_key() -> &'static DiskKey {
    static KEY: OnceLock<DiskKey> = OnceLock::new();
    KEY.get_or_init(|| MasterKey::from_bytes(golden_master_bytes()).disk_key(&golden_disk()))
}

/// What the raw decode targets expect: the golden disk, cycle and attempt,
/// any seq, any tag.
pub fn golden_expect() -> Expect {
    Expect {
        disk_id: golden_disk(),
        cycle: GOLDEN_CYCLE,
        attempt: Some(GOLDEN_ATTEMPT),
        seq: None,
        tag: None,
    }
}

/// The checks every raw-bytes decode target makes: a header `peek_header` rejects is never
/// decoded, and a decoded object's header is the peeked one, of `kind`, with seq 0 unless it is a
/// blob; error messages render. Returns the decoded value, its header and the session that must
/// re-encode it, or `None` if `data` did not decode.
pub fn checked_decode<T>(
    data: &[u8],
    kind: ObjectKind,
    decode: impl FnOnce(&[u8]) -> Result<(ObjectHeader, T), FormatError>,
) -> Option<(ObjectHeader, T, Session)> {
    let peek = peek_header(data);
    let decoded = decode(data);
    if let Err(e) = &peek {
        let _ = e.to_string();
        assert!(
            decoded.is_err(),
            "peek_header rejects ({e}) but the {kind} decoder accepts"
        );
    }
    let (header, value) = match decoded {
        Ok(v) => v,
        Err(e) => {
            let _ = e.to_string();
            return None;
        }
    };
    assert_eq!(Ok(&header), peek.as_ref());
    assert_eq!(header.kind, kind);
    assert_eq!(header.payload_len as usize, data.len() - HEADER_LEN);
    if kind != ObjectKind::Blob {
        assert_eq!(header.seq, 0);
    }
    let session = Session::new(
        golden_disk_key(),
        header.disk_id,
        header.cycle,
        header.attempt,
        header.salt,
    );
    Some((header, value, session))
}

// ---------------------------------------------------------------------------
// Independent sealer
// ---------------------------------------------------------------------------

fn hkdf_expand<const N: usize>(hk: &Hkdf<Sha256>, info: &[&[u8]]) -> [u8; N] {
    let mut okm = [0u8; N];
    hk.expand_multi_info(info, &mut okm)
        .expect("hkdf-sha256 expand of at most 32 bytes");
    okm
}

/// Seals arbitrary plaintexts into objects exactly as the format specifies,
/// without going through `replicator_core::format::Session` (which only
/// encrypts well-formed payloads it builds itself).
pub struct Sealer {
    key_id: [u8; KEY_ID_LEN],
    disk: DiskId,
    cycle: u64,
    attempt: u64,
    salt: [u8; SALT_LEN],
    disk_key: [u8; 32],
}

impl Sealer {
    pub fn new(
        master: &[u8; 32],
        disk: DiskId,
        cycle: u64,
        attempt: u64,
        salt: [u8; SALT_LEN],
    ) -> Self {
        let disk_key: [u8; 32] = hkdf_expand(
            &Hkdf::<Sha256>::new(Some(HKDF_DISK_SALT), master),
            &[&disk.0],
        );
        let prk = Hkdf::<Sha256>::from_prk(&disk_key).expect("32-byte prk");
        let key_id = hkdf_expand(&prk, &[HKDF_KEY_ID_INFO]);
        Self {
            key_id,
            disk,
            cycle,
            attempt,
            salt,
            disk_key,
        }
    }

    /// The golden session (see the module docs).
    pub fn golden() -> Self {
        Self::new(
            &golden_master_bytes(),
            golden_disk(),
            GOLDEN_CYCLE,
            GOLDEN_ATTEMPT,
            GOLDEN_SALT,
        )
    }

    pub fn key_id(&self) -> [u8; KEY_ID_LEN] {
        self.key_id
    }

    /// header[96] || AES-256-GCM(plaintext, aad = header) || tag[16].
    pub fn seal(&self, kind: ObjectKind, seq: u32, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[0] = kind.as_u8();
        nonce[4..].copy_from_slice(&u64::from(seq).to_le_bytes());

        let payload_len = plaintext.len() as u64 + 16;
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + 16);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(kind.as_u8());
        out.push(HEADER_FLAGS_NONE);
        out.extend_from_slice(&self.key_id);
        out.extend_from_slice(&self.disk.0);
        out.extend_from_slice(&self.cycle.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&payload_len.to_le_bytes());
        assert_eq!(out.len(), OFF_HEADER_CRC);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(out.len(), HEADER_LEN);

        let cipher = self.cipher(kind);
        let header = out.clone();
        out.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_inout_detached(
                &Nonce::<Aes256Gcm>::from(nonce),
                &header,
                (&mut out[HEADER_LEN..]).into(),
            )
            .expect("aes-gcm encryption of a small payload");
        out.extend_from_slice(tag.as_slice());
        out
    }

    /// The plaintext of an object sealed in this session (kind and seq read
    /// from its header), or `None` if it does not authenticate. Only used to
    /// turn encoder output into plaintext seeds.
    pub fn open(&self, object: &[u8]) -> Option<Vec<u8>> {
        if object.len() < HEADER_LEN + 16 {
            return None;
        }
        let kind = ObjectKind::from_u8(object[OFF_KIND])?;
        let (header, rest) = object.split_at(HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - 16);
        let nonce: [u8; NONCE_LEN] = header[OFF_NONCE..OFF_NONCE + NONCE_LEN].try_into().ok()?;
        let mut plaintext = ciphertext.to_vec();
        let tag: [u8; 16] = tag.try_into().ok()?;
        self.cipher(kind)
            .decrypt_inout_detached(
                &Nonce::<Aes256Gcm>::from(nonce),
                header,
                plaintext.as_mut_slice().into(),
                &Tag::<Aes256Gcm>::from(tag),
            )
            .ok()?;
        Some(plaintext)
    }

    fn cipher(&self, kind: ObjectKind) -> Aes256Gcm {
        let hk = Hkdf::<Sha256>::new(Some(&self.salt), &self.disk_key);
        let session: [u8; 32] = hkdf_expand(
            &hk,
            &[
                HKDF_SESSION_INFO,
                &[kind.as_u8()],
                &self.disk.0,
                &self.cycle.to_le_bytes(),
                &self.attempt.to_le_bytes(),
            ],
        );
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(session))
    }
}

// ---------------------------------------------------------------------------
// Tampering
// ---------------------------------------------------------------------------

/// A header field that [`Tamper::SetField`] overwrites.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum HeaderField {
    Version,
    Kind,
    Flags,
    Cycle,
    Attempt,
    Seq,
    PayloadLen,
}

/// One change to an encoded object. Positions are taken modulo the current
/// length. Some operations can be no-ops (or cancel each other out); callers
/// compare the final bytes with the original to know whether anything changed.
#[derive(Arbitrary, Clone, Debug)]
pub enum Tamper {
    /// XOR one byte with a non-zero mask (a zero mask is read as 0x01).
    Flip { pos: u32, mask: u8 },
    /// Overwrite one byte.
    Set { pos: u32, byte: u8 },
    /// Cut the object to `len % current length` bytes.
    Truncate { len: u32 },
    /// Append up to 32 bytes.
    Append { bytes: Vec<u8> },
    /// Insert one byte.
    Insert { pos: u32, byte: u8 },
    /// Remove one byte.
    Remove { pos: u32 },
    /// Overwrite a header field (little-endian, truncated to its width).
    SetField { field: HeaderField, value: u64 },
    /// Make `payload_len` match the bytes actually following the header.
    FixPayloadLen,
    /// Recompute the header CRC over bytes 0..92, as a forger would.
    FixCrc,
}

fn index(pos: u32, len: usize) -> Option<usize> {
    (len > 0).then(|| pos as usize % len)
}

fn write_at(bytes: &mut [u8], at: usize, value: &[u8]) {
    if let Some(dst) = bytes.get_mut(at..at + value.len()) {
        dst.copy_from_slice(value);
    }
}

/// Applies `ops` in order to `bytes`.
pub fn apply_tamper(bytes: &mut Vec<u8>, ops: &[Tamper]) {
    for op in ops {
        match op {
            Tamper::Flip { pos, mask } => {
                if let Some(i) = index(*pos, bytes.len()) {
                    bytes[i] ^= (*mask).max(1);
                }
            }
            Tamper::Set { pos, byte } => {
                if let Some(i) = index(*pos, bytes.len()) {
                    bytes[i] = *byte;
                }
            }
            Tamper::Truncate { len } => {
                if let Some(n) = index(*len, bytes.len()) {
                    bytes.truncate(n);
                }
            }
            Tamper::Append { bytes: more } => {
                bytes.extend(more.iter().take(32));
            }
            Tamper::Insert { pos, byte } => {
                let i = index(*pos, bytes.len() + 1).unwrap_or(0);
                bytes.insert(i, *byte);
            }
            Tamper::Remove { pos } => {
                if let Some(i) = index(*pos, bytes.len()) {
                    bytes.remove(i);
                }
            }
            Tamper::SetField { field, value } => {
                let v = value.to_le_bytes();
                match field {
                    HeaderField::Version => write_at(bytes, OFF_VERSION, &v[..2]),
                    HeaderField::Kind => write_at(bytes, OFF_KIND, &v[..1]),
                    HeaderField::Flags => write_at(bytes, OFF_FLAGS, &v[..1]),
                    HeaderField::Cycle => write_at(bytes, OFF_CYCLE, &v),
                    HeaderField::Attempt => write_at(bytes, OFF_ATTEMPT, &v),
                    HeaderField::Seq => write_at(bytes, OFF_SEQ, &v[..4]),
                    HeaderField::PayloadLen => write_at(bytes, OFF_PAYLOAD_LEN, &v),
                }
            }
            Tamper::FixPayloadLen => {
                let len = bytes.len().saturating_sub(HEADER_LEN) as u64;
                write_at(bytes, OFF_PAYLOAD_LEN, &len.to_le_bytes());
            }
            Tamper::FixCrc => {
                if bytes.len() >= HEADER_LEN {
                    let crc = crc32fast::hash(&bytes[..OFF_HEADER_CRC]);
                    write_at(bytes, OFF_HEADER_CRC, &crc.to_le_bytes());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reference sector set
// ---------------------------------------------------------------------------

/// Sorted, disjoint, non-adjacent half-open intervals `[start, end)`: the
/// obviously correct (and slow) model of a sector bitmap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intervals(pub Vec<(u64, u64)>);

impl Intervals {
    /// Adds `[start, end)`.
    pub fn mark(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b < s || a > e {
                out.push((a, b));
            } else {
                // overlapping or adjacent: merge
                s = s.min(a);
                e = e.max(b);
            }
        }
        out.push((s, e));
        out.sort_unstable();
        self.0 = out;
    }

    /// Removes `[start, end)`.
    pub fn clear(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b <= start || a >= end {
                out.push((a, b));
                continue;
            }
            if a < start {
                out.push((a, start));
            }
            if b > end {
                out.push((end, b));
            }
        }
        self.0 = out;
    }

    pub fn union(&mut self, other: &Intervals) {
        for &(a, b) in &other.0 {
            self.mark(a, b);
        }
    }

    pub fn difference(&mut self, other: &Intervals) {
        for &(a, b) in &other.0 {
            self.clear(a, b);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|&(a, b)| b - a).sum()
    }

    pub fn contains(&self, x: u64) -> bool {
        self.0.iter().any(|&(a, b)| a <= x && x < b)
    }

    /// The intervals clipped to `[start, end)`.
    pub fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.0
            .iter()
            .filter_map(|&(a, b)| {
                let (a, b) = (a.max(start), b.min(end));
                (a < b).then_some((a, b))
            })
            .collect()
    }
}

/// Cheap deterministic bytes (xorshift64*), for incompressible blob data.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
