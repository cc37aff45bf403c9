//! `LaggyListSink`: a sink whose listings may miss objects put recently, as eventually
//! consistent object stores' listings do. Gets, puts and deletes are exact; only `list` lags.
//! An object stays "fresh" (each listing hides it with a seeded probability) until `settle`.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_sink::{ObjectMeta, PutMode, Sink, SinkError};

struct LagState {
    fresh: BTreeSet<String>,
    rng: ChaCha8Rng,
    /// Probability that one listing misses one fresh object; 0 turns the lag off.
    miss_probability: f64,
    /// Objects hidden from listings so far.
    missed: u64,
}

/// A sink wrapper whose listings miss recently put objects; see the module docs.
pub struct LaggyListSink {
    inner: Arc<dyn Sink>,
    state: Mutex<LagState>,
}

impl fmt::Debug for LaggyListSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaggyListSink")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl LaggyListSink {
    /// Wraps `inner`, with the lag off; draws come from a generator seeded with `seed`.
    pub fn new(inner: Arc<dyn Sink>, seed: u64) -> Self {
        LaggyListSink {
            inner,
            state: Mutex::new(LagState {
                fresh: BTreeSet::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
                miss_probability: 0.0,
                missed: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LagState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the probability that a listing misses a fresh object (clamped to 0..=1).
    pub fn set_miss_probability(&self, p: f64) {
        self.lock().miss_probability = p.clamp(0.0, 1.0);
    }

    /// Every object put so far becomes visible to listings.
    pub fn settle(&self) {
        self.lock().fresh.clear();
    }

    /// Objects hidden from listings so far.
    pub fn missed(&self) -> u64 {
        self.lock().missed
    }
}

#[async_trait]
impl Sink for LaggyListSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        let result = self.inner.put(key, data, mode).await;
        // Even a failed put may have stored something (a torn or unacknowledged upload).
        let mut st = self.lock();
        if st.miss_probability > 0.0 {
            st.fresh.insert(key.to_owned());
        }
        result
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        let listed = self.inner.list(prefix).await?;
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.miss_probability <= 0.0 || st.fresh.is_empty() {
            return Ok(listed);
        }
        let mut shown = Vec::with_capacity(listed.len());
        for meta in listed {
            if st.fresh.contains(&meta.key) && st.rng.random_bool(st.miss_probability) {
                st.missed += 1;
                continue;
            }
            shown.push(meta);
        }
        Ok(shown)
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        let result = self.inner.delete(key).await;
        self.lock().fresh.remove(key);
        result
    }

    fn describe(&self) -> String {
        format!("laggy-list({})", self.inner.describe())
    }
}
