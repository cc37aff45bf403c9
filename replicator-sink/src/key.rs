//! Object key rules, shared by every backend so that a key valid on one is valid on all.

use crate::{SinkError, SinkErrorKind};

/// The longest key accepted, in bytes (well under every object store's limit).
pub const MAX_KEY_LEN: usize = 512;

/// Checks `key` against the rules in the [`crate::Sink`] contract.
pub fn validate_key(op: &'static str, key: &str) -> Result<(), SinkError> {
    let bad = |why: &str| Err(SinkError::new(SinkErrorKind::InvalidKey, op, key, why));
    if key.is_empty() {
        return bad("the key is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("the key is longer than 512 bytes");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return bad("the key has an empty segment (leading, trailing or double `/`)");
        }
        if segment == "." || segment == ".." {
            return bad("the key has a `.` or `..` segment");
        }
        if segment.starts_with('.') {
            return bad("a key segment may not start with `.` (reserved for temporary files)");
        }
        if let Some(c) = segment.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        }) {
            return bad(&format!(
                "the key has the character {c:?}; allowed are a-z 0-9 . _ -"
            ));
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a key-like string that may end with `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), SinkError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    validate_key("list", trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_layout_keys() {
        for key in ["a", "disks/00ff/cycles/00000001/manifest", "x-1_2.blob"] {
            assert!(validate_key("put", key).is_ok(), "{key}");
        }
    }

    #[test]
    fn rejects_bad_keys_with_reason() {
        for key in ["", "/a", "a/", "a//b", "a/../b", "A", "a b", "a/.tmp", "é"] {
            let err = validate_key("put", key).err();
            assert_eq!(
                err.map(|e| e.kind()),
                Some(SinkErrorKind::InvalidKey),
                "{key:?} should be rejected"
            );
        }
        assert!(validate_key("put", &"a".repeat(MAX_KEY_LEN + 1)).is_err());
    }
}
