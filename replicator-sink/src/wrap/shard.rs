//! Sharding: objects spread over several stores (for example several storage accounts, to stay
//! under each one's ingress cap) by a stable hash of their key.
//!
//! # The mapping (never change it)
//!
//! A key's **home shard** among `n` is `jump(fnv1a64(key), n)`:
//!
//! - `fnv1a64` is 64-bit FNV-1a over the key's UTF-8 bytes: start from `0xcbf29ce484222325`;
//!   for each byte, XOR it in, then multiply by `0x100000001b3` (wrapping).
//! - `jump` is Lamping and Veach's jump consistent hash ("A Fast, Minimal Memory, Consistent Hash
//!   Algorithm", 2014), exactly as published: `b = -1, j = 0; while j < n { b = j;
//!   h = h * 2862933555777941757 + 1 (wrapping); j = floor((b + 1) * (2^31 / ((h >> 33) + 1))) }`,
//!   in IEEE double precision; the answer is `b`.
//!
//! Objects written by one version must be found by every later one, so this mapping is pinned by
//! golden tests and must never change. Jump hashing moves only the keys that must move when a
//! shard is added at the end (about 1/n of them): **add new stores at the end of the list, never
//! reorder or remove one.**
//!
//! # Reconfiguration
//!
//! After shards are added, objects written before live in what is no longer their home shard.
//! So the sink never trusts the home shard's "not found" alone:
//!
//! - `get` of a key missing from its home shard looks in every other shard, in order, before
//!   answering not found; if one of them fails (other than not found), that error is returned,
//!   since the object may be there.
//! - a put with [`PutMode::Create`] first lists the key in the other shards and fails with
//!   [`SinkErrorKind::AlreadyExists`] if one holds it; only the create in the home shard itself
//!   is atomic, so two writers racing during a reconfiguration are not both refused. A put with
//!   [`PutMode::Overwrite`] writes to the home shard only; an older copy elsewhere stays shadowed
//!   (gets look in the home shard first) until the key is deleted.
//! - `list` merges every shard's listing, sorted, each key once (the home shard's entry wins).
//! - `delete` deletes from every shard.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;

use crate::key::validate_prefix;
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind, validate_key};

/// The most shards one [`ShardSink`] spreads over.
pub const MAX_SHARDS: usize = 1024;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of `key`'s bytes; part of the pinned mapping (see the module docs).
pub fn fnv1a64(key: &str) -> u64 {
    key.bytes().fold(FNV_OFFSET_BASIS, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// Jump consistent hash of `hash` into `buckets` (at least 1); part of the pinned mapping.
pub fn jump_consistent_hash(mut hash: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        hash = hash.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((hash >> 33) + 1) as f64)) as i64;
    }
    u32::try_from(b).unwrap_or(0)
}

/// The home shard of `key` among `shards` (at least 1).
pub fn home_shard(key: &str, shards: usize) -> usize {
    let buckets = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
    jump_consistent_hash(fnv1a64(key), buckets) as usize
}

/// A sink over several stores, each object in its key's home shard; see the module docs.
pub struct ShardSink {
    shards: Vec<Arc<dyn Sink>>,
}

impl fmt::Debug for ShardSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardSink")
            .field("shards", &self.shards)
            .finish()
    }
}

impl ShardSink {
    /// Spreads over `shards`, in this order (append new ones; never reorder). Fails with
    /// [`SinkErrorKind::InvalidConfig`] for none or more than [`MAX_SHARDS`].
    pub fn new(shards: Vec<Arc<dyn Sink>>) -> Result<Self, SinkError> {
        if shards.is_empty() || shards.len() > MAX_SHARDS {
            return Err(SinkError::new(
                SinkErrorKind::InvalidConfig,
                "open",
                "shard",
                format!(
                    "a shard sink needs 1 to {MAX_SHARDS} stores, was given {}",
                    shards.len()
                ),
            ));
        }
        Ok(ShardSink { shards })
    }

    /// The stores, in order.
    pub fn shards(&self) -> &[Arc<dyn Sink>] {
        &self.shards
    }

    /// The index of `key`'s home shard.
    pub fn home_of(&self, key: &str) -> usize {
        home_shard(key, self.shards.len())
    }

    fn home(&self, key: &str) -> (usize, &Arc<dyn Sink>) {
        let index = self.home_of(key);
        // `home_shard` is below the shard count, and there is at least one.
        let shard = self.shards.get(index).unwrap_or(&self.shards[0]);
        (index, shard)
    }

    fn others(&self, home: usize) -> impl Iterator<Item = (usize, &Arc<dyn Sink>)> {
        self.shards
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != home)
    }
}

#[async_trait]
impl Sink for ShardSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        let (home, shard) = self.home(key);
        if mode == PutMode::Create {
            let lists = self
                .others(home)
                .map(|(i, s)| async move { (i, s.list(key).await) });
            for (i, listed) in join_all(lists).await {
                let listed = listed.map_err(|e| {
                    SinkError::new(
                        e.kind(),
                        "put",
                        key,
                        format!("checking shard {i} for an older copy before a create: {e}"),
                    )
                })?;
                if listed.iter().any(|m| m.key == key) {
                    return Err(SinkError::new(
                        SinkErrorKind::AlreadyExists,
                        "put",
                        key,
                        format!(
                            "the object exists in shard {i}, not in its home shard {home} (it \
                             was written before the shard set changed)"
                        ),
                    ));
                }
            }
        }
        shard.put(key, data, mode).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        let (home, shard) = self.home(key);
        match shard.get(key).await {
            Err(e) if e.is_not_found() => {}
            result => return result,
        }
        for (_, other) in self.others(home) {
            match other.get(key).await {
                Err(e) if e.is_not_found() => {}
                result => return result,
            }
        }
        Err(SinkError::new(
            SinkErrorKind::NotFound,
            "get",
            key,
            format!(
                "neither in its home shard {home} nor in any other of the {} shards",
                self.shards.len()
            ),
        ))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        validate_prefix(prefix)?;
        let lists = self.shards.iter().map(|s| s.list(prefix));
        let mut all: Vec<(ObjectMeta, bool)> = Vec::new();
        for (i, listed) in join_all(lists).await.into_iter().enumerate() {
            all.extend(listed?.into_iter().map(|m| {
                let away = self.home_of(&m.key) != i;
                (m, away)
            }));
        }
        // Sorted by key, the home shard's entry first; then keep the first of each key.
        all.sort_by(|(a, a_away), (b, b_away)| a.key.cmp(&b.key).then(a_away.cmp(b_away)));
        all.dedup_by(|(later, _), (first, _)| later.key == first.key);
        Ok(all.into_iter().map(|(m, _)| m).collect())
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        let deletes = self.shards.iter().map(|s| s.delete(key));
        join_all(deletes).await.into_iter().collect()
    }

    fn describe(&self) -> String {
        let shards: Vec<String> = self.shards.iter().map(|s| s.describe()).collect();
        format!("shard[{}]", shards.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn jump_hash_matches_the_reference_implementation() {
        // Outputs of the paper's C++ code, as other implementations test against them.
        for (hash, buckets, bucket) in [
            (1, 1, 0),
            (42, 57, 43),
            (256, 1024, 520),
            (3_735_883_980, 1, 0),
            (3_735_883_980, 666, 361),
            (16_045_690_984_833_335_023, 255, 237),
            (10_863_919_174_838_991, 11, 6),
            (2_016_238_256_797_177_309, 11, 3),
        ] {
            assert_eq!(
                jump_consistent_hash(hash, buckets),
                bucket,
                "jump({hash}, {buckets})"
            );
        }
    }

    #[test]
    fn adding_a_shard_moves_only_keys_to_the_new_one() {
        for i in 0..2000 {
            let key = format!("k/{i}");
            let before = home_shard(&key, 4);
            let after = home_shard(&key, 5);
            assert!(after == before || after == 4, "{key}: {before} -> {after}");
        }
    }
}
