//! Key material of the replication engine: the master key and its key file,
//! disk ids, and the two keys derived from the master key.
//!
//! This module owns:
//! - [`MasterKey`]: 32 random bytes kept by the operator in a key file
//!   (`# replicator master key v1` comment line, then 64 hex characters).
//! - [`DiskId`]: 16 random bytes naming one replicated disk, shown as 32 hex
//!   characters.
//! - [`DiskKey`]: HKDF-SHA256 of the master key, one per disk. It never
//!   encrypts anything itself; it yields a public fingerprint
//!   ([`DiskKey::key_id`]) stored in every object header, and the session keys.
//! - [`SessionKey`]: the AES-256-GCM key that actually encrypts, unique per
//!   (object kind, disk, cycle, attempt, 16-byte random salt).
//!
//! Every label, salt and length used here is a format constant and lives at
//! the top of [`crate::format`]; the derivations are specified byte for byte
//! in `FORMAT-objects.md`.

use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::format::{
    DISK_ID_LEN, HKDF_DISK_SALT, HKDF_KEY_ID_INFO, HKDF_SESSION_INFO, KEY_FILE_COMMENT, KEY_ID_LEN,
    MASTER_KEY_LEN, ObjectKind, SALT_LEN,
};

/// Errors about keys, key files and disk ids.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The operating system's random number generator failed.
    #[error("could not get random bytes from the operating system: {0}")]
    Random(String),
    /// The key line is not exactly 64 characters long.
    #[error(
        "{path}:{line}: the key line has {found} characters, but a master key is exactly {expected} hex characters (32 bytes); check the file was not truncated or edited"
    )]
    KeyFileWrongLength {
        path: String,
        line: usize,
        found: usize,
        expected: usize,
    },
    /// The key line holds a character that is not a hex digit.
    #[error(
        "{path}:{line}: column {column}: {found:?} is not a hex digit; the key line must hold only 0-9 and a-f"
    )]
    KeyFileNonHex {
        path: String,
        line: usize,
        column: usize,
        found: char,
    },
    /// The key file holds only comments and blank lines.
    #[error(
        "{path}: no key found; the file must hold one line of 64 hex characters (lines starting with '#' and blank lines are ignored)"
    )]
    KeyFileMissingKey { path: String },
    /// The key file holds more than one key line.
    #[error(
        "{path}:{line}: a second key line (the first is on line {first_line}); a key file must hold exactly one key, remove the extra line"
    )]
    KeyFileMultipleKeys {
        path: String,
        first_line: usize,
        line: usize,
    },
    /// A disk id string could not be parsed.
    #[error("invalid disk id {input:?}: {reason}")]
    InvalidDiskId { input: String, reason: String },
    /// The key file can be read or written by users other than its owner.
    #[error(
        "key file {path} has mode {mode:04o}: its group or other users may read or change it, so the key may have leaked; run `chmod 600 {path}` (and consider a new key)"
    )]
    KeyFilePermissions { path: String, mode: u32 },
    /// The key file could not be read.
    #[error("cannot read key file {path}: {reason}")]
    KeyFileRead { path: String, reason: String },
}

// ---------------------------------------------------------------------------
// hex helpers (shared with crate::format for error messages)
// ---------------------------------------------------------------------------

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn hex_value(c: char) -> Option<u8> {
    c.to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Decodes exactly `N * 2` hex characters (either case). The first non-hex
/// character is reported (0-based character index) before a wrong length.
fn decode_hex<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let mut out = [0u8; N];
    let mut count = 0usize;
    let mut hi: Option<u8> = None;
    for (index, c) in s.chars().enumerate() {
        let Some(v) = hex_value(c) else {
            return Err(HexError::NonHex { index, found: c });
        };
        match hi.take() {
            None => hi = Some(v),
            Some(h) => {
                if let Some(slot) = out.get_mut(count) {
                    *slot = (h << 4) | v;
                }
                count += 1;
            }
        }
    }
    let chars = s.chars().count();
    if chars != N * 2 {
        return Err(HexError::Length { found: chars });
    }
    Ok(out)
}

enum HexError {
    NonHex { index: usize, found: char },
    Length { found: usize },
}

// ---------------------------------------------------------------------------
// HKDF helpers
// ---------------------------------------------------------------------------

/// HKDF-Expand of `info_parts` (concatenated) into `N` bytes.
fn expand<const N: usize>(hk: &Hkdf<Sha256>, info_parts: &[&[u8]]) -> [u8; N] {
    const { assert!(N <= 255 * 32, "hkdf-sha256 output is limited to 8160 bytes") };
    let mut okm = [0u8; N];
    match hk.expand_multi_info(info_parts, &mut okm) {
        Ok(()) => okm,
        // HKDF-Expand fails only when asked for more than 255 * 32 bytes,
        // which the const assertion above rules out at compile time.
        Err(_) => unreachable!("hkdf-sha256 expand of {N} bytes cannot fail"),
    }
}

/// HKDF state keyed directly with a 32-byte pseudorandom key (no extract).
fn hkdf_from_prk(prk: &[u8; 32]) -> Hkdf<Sha256> {
    match Hkdf::<Sha256>::from_prk(prk) {
        Ok(hk) => hk,
        // from_prk fails only for keys shorter than the 32-byte SHA-256 output.
        Err(_) => unreachable!("a 32-byte prk is always accepted by hkdf-sha256"),
    }
}

/// Wipes secret bytes when a key is dropped, with the `zeroize` crate's volatile writes, which
/// the compiler may not discard.
fn wipe(bytes: &mut [u8]) {
    zeroize::Zeroize::zeroize(bytes);
}

// ---------------------------------------------------------------------------
// MasterKey
// ---------------------------------------------------------------------------

/// The operator's 32-byte master key. Every disk key derives from it.
#[derive(Clone)]
pub struct MasterKey([u8; MASTER_KEY_LEN], Vec<MasterKey>);

impl MasterKey {
    /// A new random master key from the operating system's generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; MASTER_KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(k, Vec::new()))
    }

    /// Wraps existing key bytes.
    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> Self {
        Self(bytes, Vec::new())
    }

    /// Key rotation: this key encrypts everything new, and objects written under `previous`
    /// keys (chosen by the key id in their header) stay readable, so cycles shipped before the
    /// rotation still apply and their acknowledgements still count.
    pub fn with_previous(mut self, previous: Vec<MasterKey>) -> Self {
        self.1 = previous;
        self
    }

    /// The key ids (of `disk`) of this key and of the previous keys it still reads, current first.
    pub fn key_ids(&self, disk: &DiskId) -> Vec<[u8; KEY_ID_LEN]> {
        let dk = self.disk_key(disk);
        std::iter::once(dk.key_id())
            .chain(dk.previous.iter().map(DiskKey::key_id))
            .collect()
    }

    /// The key file text: the comment line `# replicator master key v1`, a
    /// newline, 64 lowercase hex characters and a newline.
    pub fn to_key_file(&self) -> String {
        let mut s = String::with_capacity(KEY_FILE_COMMENT.len() + 2 + MASTER_KEY_LEN * 2);
        s.push_str(KEY_FILE_COMMENT);
        s.push('\n');
        s.push_str(&to_hex(&self.0));
        s.push('\n');
        s
    }

    /// Parses a key file. Lines that are blank or whose first non-blank
    /// character is `#` are ignored; exactly one other line must remain, and
    /// it must be 64 hex characters (surrounding whitespace is ignored, either
    /// case is accepted). Errors name `path_for_errors`, the 1-based line and,
    /// for a bad character, the 1-based column.
    pub fn parse_key_file(text: &str, path_for_errors: &str) -> Result<Self, KeyError> {
        let mut found: Option<(usize, [u8; MASTER_KEY_LEN])> = None;
        for (index, raw) in text.lines().enumerate() {
            let line_no = index + 1;
            let trimmed_start = raw.trim_start();
            let content = trimmed_start.trim_end();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            if let Some((first_line, _)) = found {
                return Err(KeyError::KeyFileMultipleKeys {
                    path: path_for_errors.to_owned(),
                    first_line,
                    line: line_no,
                });
            }
            let leading = raw.chars().count() - trimmed_start.chars().count();
            match decode_hex::<MASTER_KEY_LEN>(content) {
                Ok(bytes) => found = Some((line_no, bytes)),
                Err(HexError::NonHex { index, found }) => {
                    return Err(KeyError::KeyFileNonHex {
                        path: path_for_errors.to_owned(),
                        line: line_no,
                        column: leading + index + 1,
                        found,
                    });
                }
                Err(HexError::Length { found }) => {
                    return Err(KeyError::KeyFileWrongLength {
                        path: path_for_errors.to_owned(),
                        line: line_no,
                        found,
                        expected: MASTER_KEY_LEN * 2,
                    });
                }
            }
        }
        match found {
            Some((_, bytes)) => Ok(Self(bytes, Vec::new())),
            None => Err(KeyError::KeyFileMissingKey {
                path: path_for_errors.to_owned(),
            }),
        }
    }

    /// Reads and parses a key file, refusing one that its group or other users could read or
    /// write (any of the mode bits 0o077): a key others can read is no longer secret.
    pub fn load_key_file(path: &std::path::Path) -> Result<Self, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read_err = |e: std::io::Error| KeyError::KeyFileRead {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::KeyFilePermissions { path: shown, mode });
        }
        let mut bytes = Vec::new();
        let read = file.read_to_end(&mut bytes).map_err(read_err);
        let parsed = read.and_then(|_| match std::str::from_utf8(&bytes) {
            Ok(text) => Self::parse_key_file(text, &shown),
            Err(e) => Err(KeyError::KeyFileRead {
                path: shown.clone(),
                reason: format!("it is not text (invalid UTF-8 at byte {})", e.valid_up_to()),
            }),
        });
        // The file's text holds the key too.
        wipe(&mut bytes);
        parsed
    }

    /// The key of one disk:
    /// HKDF-SHA256(ikm = master key, salt = `replicator/v1/disk`, info = disk id bytes), 32 bytes.
    pub fn disk_key(&self, disk: &DiskId) -> DiskKey {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_DISK_SALT), &self.0);
        DiskKey {
            key: expand::<32>(&hk, &[&disk.0]),
            previous: self.1.iter().map(|k| k.disk_key(disk)).collect(),
        }
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

// ---------------------------------------------------------------------------
// DiskId
// ---------------------------------------------------------------------------

/// 16 random bytes naming one replicated disk; displayed as 32 lowercase hex
/// characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub [u8; DISK_ID_LEN]);

impl DiskId {
    /// A new random disk id from the operating system's generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut id = [0u8; DISK_ID_LEN];
        getrandom::fill(&mut id).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(id))
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskId({self})")
    }
}

impl FromStr for DiskId {
    type Err = KeyError;

    /// Parses exactly 32 hex characters (either case, no surrounding space).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(80).collect();
        match decode_hex::<DISK_ID_LEN>(s) {
            Ok(bytes) => Ok(Self(bytes)),
            Err(HexError::NonHex { index, found }) => Err(KeyError::InvalidDiskId {
                input: shown,
                reason: format!(
                    "character {} ({found:?}) is not a hex digit; a disk id is 32 hex characters",
                    index + 1
                ),
            }),
            Err(HexError::Length { found }) => Err(KeyError::InvalidDiskId {
                input: shown,
                reason: format!(
                    "it has {found} characters, but a disk id is exactly {} hex characters",
                    DISK_ID_LEN * 2
                ),
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// DiskKey
// ---------------------------------------------------------------------------

/// The per-disk key derived from the master key. It never encrypts: it only
/// yields the public [`key_id`](DiskKey::key_id) and the [`SessionKey`]s.
#[derive(Clone)]
pub struct DiskKey {
    key: [u8; 32],
    /// Keys of the same disk under previous master keys: read, never written with.
    previous: Vec<DiskKey>,
}

impl DiskKey {
    /// The key that wrote objects whose header has `key_id`: this one or a previous one.
    pub fn for_key_id(&self, key_id: &[u8; KEY_ID_LEN]) -> Option<&DiskKey> {
        if &self.key_id() == key_id {
            return Some(self);
        }
        self.previous.iter().find(|k| &k.key_id() == key_id)
    }

    /// Non-secret fingerprint stored in every header:
    /// the first 8 bytes of HKDF-Expand(prk = disk key, info = `replicator/v1/key-id`).
    pub fn key_id(&self) -> [u8; KEY_ID_LEN] {
        expand::<KEY_ID_LEN>(&hkdf_from_prk(&self.key), &[HKDF_KEY_ID_INFO])
    }

    /// The AES-256-GCM key for one group of objects:
    /// HKDF-SHA256(ikm = disk key, salt = `salt`,
    /// info = `replicator/v1/session` || kind byte || disk id || cycle LE u64 || attempt LE u64), 32 bytes.
    pub fn session_key(
        &self,
        kind: ObjectKind,
        disk: &DiskId,
        cycle: u64,
        attempt: u64,
        salt: &[u8; SALT_LEN],
    ) -> SessionKey {
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.key);
        let mut okm = expand::<32>(
            &hk,
            &[
                HKDF_SESSION_INFO,
                &[kind.as_u8()],
                &disk.0,
                &cycle.to_le_bytes(),
                &attempt.to_le_bytes(),
            ],
        );
        let key = SessionKey::from_bytes(kind, &okm);
        wipe(&mut okm);
        key
    }
}

impl fmt::Debug for DiskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskKey")
            .field("key_id", &to_hex(&self.key_id()))
            .finish_non_exhaustive()
    }
}

impl Drop for DiskKey {
    fn drop(&mut self) {
        wipe(&mut self.key);
    }
}

// ---------------------------------------------------------------------------
// SessionKey
// ---------------------------------------------------------------------------

/// An initialized AES-256-GCM cipher for one (kind, disk, cycle, attempt,
/// salt). Derived once and reused for every object of that group.
#[derive(Clone)]
pub struct SessionKey {
    cipher: Option<Arc<LessSafeKey>>,
    kind: ObjectKind,
}

impl SessionKey {
    fn from_bytes(kind: ObjectKind, key: &[u8; 32]) -> SessionKey {
        // A 32-byte key always makes an AES-256 key; `None` would make every use fail cleanly.
        let cipher = UnboundKey::new(&AES_256_GCM, key)
            .ok()
            .map(|k| Arc::new(LessSafeKey::new(k)));
        SessionKey { cipher, kind }
    }

    /// The object kind this key was derived for.
    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    /// Encrypts `in_out` in place under `nonce`, authenticating `aad` too; returns the tag.
    pub(crate) fn seal_in_place(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<[u8; 16]> {
        let tag = self
            .cipher
            .as_ref()?
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .ok()?;
        <[u8; 16]>::try_from(tag.as_ref()).ok()
    }

    /// Authenticates `ciphertext` and `aad` against `tag` and decrypts into `out` (as long as
    /// `ciphertext`). False, with `out` holding no plaintext, when they do not authenticate.
    pub(crate) fn open_into(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; 16],
        out: &mut [u8],
    ) -> bool {
        let Some(cipher) = self.cipher.as_ref() else {
            return false;
        };
        let ok = out.len() == ciphertext.len()
            && cipher
                .open_separate_gather(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    ciphertext,
                    tag,
                    out,
                )
                .is_ok();
        if !ok {
            out.fill(0);
        }
        ok
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        MasterKey::from_bytes(b)
    }

    #[test]
    fn session_keys_are_standard_aes_256_gcm() {
        // Objects must be readable by any AES-256-GCM implementation: what this key seals, the
        // RustCrypto implementation opens, and the other way round; a changed byte fails both.
        use aes_gcm::aead::{AeadInOut, Nonce, Tag};
        use aes_gcm::{Aes256Gcm, Key, KeyInit};
        let raw: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(3));
        let ours = SessionKey::from_bytes(ObjectKind::Blob, &raw);
        let theirs = Aes256Gcm::new(&Key::<Aes256Gcm>::from(raw));
        let nonce: [u8; 12] = std::array::from_fn(|i| i as u8);
        let aad = b"header bytes";
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();

        let mut sealed = plain.clone();
        let tag = ours.seal_in_place(nonce, aad, &mut sealed).unwrap();
        assert_ne!(sealed, plain);
        let mut opened = sealed.clone();
        theirs
            .decrypt_inout_detached(
                &Nonce::<Aes256Gcm>::from(nonce),
                aad,
                opened.as_mut_slice().into(),
                &Tag::<Aes256Gcm>::from(tag),
            )
            .unwrap();
        assert_eq!(opened, plain);

        let mut theirs_sealed = plain.clone();
        let their_tag: [u8; 16] = theirs
            .encrypt_inout_detached(
                &Nonce::<Aes256Gcm>::from(nonce),
                aad,
                theirs_sealed.as_mut_slice().into(),
            )
            .unwrap()
            .into();
        assert_eq!(
            (theirs_sealed.as_slice(), their_tag),
            (sealed.as_slice(), tag)
        );
        let mut out = vec![0u8; plain.len()];
        assert!(ours.open_into(nonce, aad, &theirs_sealed, &their_tag, &mut out));
        assert_eq!(out, plain);

        theirs_sealed[500] ^= 1;
        assert!(!ours.open_into(nonce, aad, &theirs_sealed, &their_tag, &mut out));
        assert!(
            out.iter().all(|&b| b == 0),
            "no unauthenticated plaintext is left"
        );
        assert!(!ours.open_into(nonce, b"other header", &sealed, &tag, &mut out));
        assert!(!ours.open_into(nonce, aad, &sealed, &tag, &mut out[1..]));
    }

    #[test]
    fn key_file_round_trip() {
        let k = master();
        let text = k.to_key_file();
        assert_eq!(
            text,
            "# replicator master key v1\n000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
        );
        let back = MasterKey::parse_key_file(&text, "k.key").unwrap();
        assert_eq!(back.to_key_file(), text);
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let a = MasterKey::generate().unwrap();
        let b = MasterKey::generate().unwrap();
        assert_ne!(a.to_key_file(), b.to_key_file());
        let back = MasterKey::parse_key_file(&a.to_key_file(), "a").unwrap();
        assert_eq!(back.to_key_file(), a.to_key_file());
    }

    #[test]
    fn key_file_ignores_comments_blank_lines_and_crlf() {
        let hex = to_hex(&master().0).to_uppercase();
        let text = format!("\n# comment\n   # indented comment\r\n\r\n  {hex}  \r\n\n# end\n");
        let k = MasterKey::parse_key_file(&text, "x").unwrap();
        assert_eq!(k.0, master().0);
    }

    #[test]
    fn key_file_errors_name_file_line_and_column() {
        let hex = to_hex(&master().0);
        // wrong length
        let e =
            MasterKey::parse_key_file(&format!("# c\n{}\n", &hex[..63]), "/etc/r.key").unwrap_err();
        assert_eq!(
            e,
            KeyError::KeyFileWrongLength {
                path: "/etc/r.key".into(),
                line: 2,
                found: 63,
                expected: 64
            }
        );
        assert!(e.to_string().starts_with("/etc/r.key:2:"), "{e}");
        // non-hex at column N (1-based, counting leading whitespace)
        let mut bad = hex.clone();
        bad.replace_range(9..10, "g");
        let e = MasterKey::parse_key_file(&format!("# c\n\n  {bad}\n"), "k").unwrap_err();
        assert_eq!(
            e,
            KeyError::KeyFileNonHex {
                path: "k".into(),
                line: 3,
                column: 12,
                found: 'g'
            }
        );
        assert!(e.to_string().contains("column 12"), "{e}");
        // missing
        let e = MasterKey::parse_key_file("# only a comment\n\n", "k").unwrap_err();
        assert_eq!(e, KeyError::KeyFileMissingKey { path: "k".into() });
        let e = MasterKey::parse_key_file("", "k").unwrap_err();
        assert_eq!(e, KeyError::KeyFileMissingKey { path: "k".into() });
        // more than one key line
        let e = MasterKey::parse_key_file(&format!("{hex}\n# c\n{hex}\n"), "k").unwrap_err();
        assert_eq!(
            e,
            KeyError::KeyFileMultipleKeys {
                path: "k".into(),
                first_line: 1,
                line: 3
            }
        );
    }

    #[test]
    fn key_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        std::fs::write(&path, master().to_key_file()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load_key_file(&path).err().unwrap().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = MasterKey::load_key_file(&path).unwrap();
        assert_eq!(key.to_key_file(), master().to_key_file());
        let missing = MasterKey::load_key_file(&dir.path().join("nope"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn debug_does_not_leak_secrets() {
        let k = master();
        let d = DiskId([0xA5; 16]);
        let dk = k.disk_key(&d);
        let sk = dk.session_key(ObjectKind::Blob, &d, 1, 1, &[0; 16]);
        let master_hex = to_hex(&k.0);
        let disk_hex = to_hex(&dk.key);
        for s in [format!("{k:?}"), format!("{dk:?}"), format!("{sk:?}")] {
            assert!(!s.contains(&master_hex), "{s}");
            assert!(!s.contains(&disk_hex), "{s}");
            assert!(!s.contains("000102"), "{s}");
        }
        assert!(format!("{dk:?}").contains(&to_hex(&dk.key_id())));
    }

    #[test]
    fn disk_id_display_and_parse() {
        let mut b = [0u8; 16];
        for (i, x) in b.iter_mut().enumerate() {
            *x = 0xA0 + i as u8;
        }
        let id = DiskId(b);
        let s = id.to_string();
        assert_eq!(s, "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf");
        assert_eq!(s.parse::<DiskId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<DiskId>().unwrap(), id);
        let e = "a0a1".parse::<DiskId>().unwrap_err();
        assert!(e.to_string().contains("4 characters"), "{e}");
        let e = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaz"
            .parse::<DiskId>()
            .unwrap_err();
        assert!(e.to_string().contains("character 32"), "{e}");
        let e = format!("{s} ").parse::<DiskId>().unwrap_err();
        assert!(e.to_string().contains("not a hex digit"), "{e}");
        let g1 = DiskId::generate().unwrap();
        let g2 = DiskId::generate().unwrap();
        assert_ne!(g1, g2);
        assert_eq!(g1.to_string().parse::<DiskId>().unwrap(), g1);
        assert!(format!("{g1:?}").contains(&g1.to_string()));
    }

    #[test]
    fn derivations_are_deterministic_and_separated() {
        let k = master();
        let d1 = DiskId([1; 16]);
        let d2 = DiskId([2; 16]);
        assert_eq!(k.disk_key(&d1).key, k.disk_key(&d1).key);
        assert_ne!(k.disk_key(&d1).key, k.disk_key(&d2).key);
        assert_ne!(k.disk_key(&d1).key_id(), k.disk_key(&d2).key_id());
        let other = MasterKey::from_bytes([9; 32]);
        assert_ne!(k.disk_key(&d1).key_id(), other.disk_key(&d1).key_id());
        // key id is not a prefix of the disk key
        let dk = k.disk_key(&d1);
        assert_ne!(&dk.key[..8], &dk.key_id()[..]);
    }

    /// Independent check of the HKDF construction against RFC 5869 test case 1,
    /// so the helpers above are known to compute real HKDF.
    #[test]
    fn hkdf_helper_matches_rfc5869_case1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
        let okm = expand::<42>(&hk, &[&info[..5], &info[5..]]);
        assert_eq!(
            to_hex(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}
