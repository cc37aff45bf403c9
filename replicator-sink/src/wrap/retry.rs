//! Retries of transient sink failures.
//!
//! An operation that fails with a transient error ([`SinkError::is_transient`]) is tried again
//! after an exponential backoff with jitter, up to [`RetryPolicy::attempts_max`] attempts. Every
//! other failure (not found, already exists, invalid key, permanent) is returned at once.
//!
//! Retries are also limited across operations by a **retry budget**, a token bucket shared by
//! every operation of one [`RetrySink`]: each operation's first attempt deposits
//! [`RetryBudgetPolicy::retry_ratio`] of a token (up to [`RetryBudgetPolicy::tokens_max`]), and
//! each retry spends one whole token. Over time retries are thus at most that share of the
//! operations (plus the bucket's burst), so an outage of the store cannot turn into a retry storm
//! that multiplies the load on it. When the bucket is empty, a transient error is returned at
//! once, saying that the budget is exhausted.
//!
//! Waits go through the injected [`Clock`]; the jitter comes from a [`ChaCha8Rng`] seeded by the
//! policy, so a run on [`crate::clock::SimClock`] is deterministic.
//!
//! # Ambiguous creates
//!
//! A put with [`PutMode::Create`] whose attempt failed transiently may still have stored the
//! object (the acknowledgement was lost). A later attempt then fails with
//! [`SinkErrorKind::AlreadyExists`], and that cannot be told apart from another writer having
//! created the key. The retry sink resolves it by reading the stored object back: if it is
//! byte-for-byte the data being put, the earlier attempt landed and the put succeeds; if it
//! differs, the put fails with `AlreadyExists` (saying that an earlier attempt failed); if reading
//! it back fails, the put fails with a transient error that explains the ambiguity.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::lock;
use crate::clock::Clock;
use crate::key::validate_prefix;
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind, validate_key};

/// Thousandths of a token: the bucket's unit, so that deposits can be fractions.
const MILLI: u64 = 1000;

/// The retry budget: how large a share of operations may be retries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudgetPolicy {
    /// Tokens each operation's first attempt deposits; each retry costs one. 0.1 allows one
    /// retry per ten operations in the long run. From 0 to 1, in steps of 0.001.
    pub retry_ratio: f64,
    /// The most tokens the bucket holds: the burst of retries allowed after quiet traffic. At
    /// most [`RetryPolicy::TOKENS_LIMIT`].
    pub tokens_max: u32,
    /// The tokens at start, so that the first failures can be retried before any traffic has
    /// filled the bucket. At most `tokens_max`.
    pub tokens_initial: u32,
}

impl Default for RetryBudgetPolicy {
    fn default() -> Self {
        RetryBudgetPolicy {
            retry_ratio: 0.1,
            tokens_max: 100,
            tokens_initial: 10,
        }
    }
}

/// When and how often a [`RetrySink`] retries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per operation, the first one included (1 never retries). At most
    /// [`RetryPolicy::ATTEMPTS_LIMIT`].
    pub attempts_max: u32,
    /// The backoff before the first retry.
    pub delay_first: Duration,
    /// The longest backoff; the delay grows by `multiplier` per retry up to this.
    pub delay_max: Duration,
    /// The growth of the backoff per retry: 1 or more.
    pub multiplier: f64,
    /// The seed of the jitter generator.
    pub jitter_seed: u64,
    /// The retry budget shared by all operations.
    pub budget: RetryBudgetPolicy,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 6,
            delay_first: Duration::from_millis(200),
            delay_max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter_seed: 0,
            budget: RetryBudgetPolicy::default(),
        }
    }
}

impl RetryPolicy {
    /// The largest [`RetryPolicy::attempts_max`] accepted.
    pub const ATTEMPTS_LIMIT: u32 = 100;
    /// The largest [`RetryBudgetPolicy::tokens_max`] accepted.
    pub const TOKENS_LIMIT: u32 = 1_000_000;
    /// The longest [`RetryPolicy::delay_max`] accepted.
    pub const DELAY_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

    fn check(&self) -> Result<(), String> {
        if self.attempts_max == 0 || self.attempts_max > Self::ATTEMPTS_LIMIT {
            return Err(format!(
                "attempts_max is {}; it must be 1 to {}",
                self.attempts_max,
                Self::ATTEMPTS_LIMIT
            ));
        }
        if self.delay_first > self.delay_max || self.delay_max > Self::DELAY_LIMIT {
            return Err(format!(
                "the delays must satisfy delay_first ({:?}) <= delay_max ({:?}) <= {:?}",
                self.delay_first,
                self.delay_max,
                Self::DELAY_LIMIT
            ));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(format!(
                "the multiplier is {}; it must be a number of at least 1",
                self.multiplier
            ));
        }
        let b = &self.budget;
        if !(0.0..=1.0).contains(&b.retry_ratio) {
            return Err(format!(
                "the budget's retry_ratio is {}; it must be 0 to 1",
                b.retry_ratio
            ));
        }
        if b.tokens_max > Self::TOKENS_LIMIT || b.tokens_initial > b.tokens_max {
            return Err(format!(
                "the budget's tokens must satisfy tokens_initial ({}) <= tokens_max ({}) <= {}",
                b.tokens_initial,
                b.tokens_max,
                Self::TOKENS_LIMIT
            ));
        }
        Ok(())
    }

    /// The backoff before retry number `retry` (1 for the first), before jitter.
    fn backoff(&self, retry: u32) -> Duration {
        let first = self.delay_first.as_secs_f64();
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = first * self.multiplier.powi(exponent);
        if grown.is_finite() && grown < self.delay_max.as_secs_f64() {
            Duration::from_secs_f64(grown)
        } else {
            self.delay_max
        }
    }
}

/// What a [`RetrySink`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryStats {
    /// Operations started.
    pub operations: u64,
    /// Retries made (attempts after the first).
    pub retries: u64,
    /// Operations that failed after [`RetryPolicy::attempts_max`] attempts.
    pub gave_up: u64,
    /// Retries refused because the budget was empty.
    pub budget_refusals: u64,
    /// Creates found already existing after an earlier attempt had failed, resolved by
    /// comparing the stored bytes (see the module docs).
    pub ambiguous_creates: u64,
    /// The total backoff waited.
    pub backoff_total: Duration,
    /// Thousandths of a token in the budget now.
    pub budget_milli_tokens: u64,
}

impl fmt::Display for RetryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} operations, {} retries ({:?} backoff), {} gave up, {} refused by the budget \
             ({}.{:03} tokens left), {} ambiguous creates",
            self.operations,
            self.retries,
            self.backoff_total,
            self.gave_up,
            self.budget_refusals,
            self.budget_milli_tokens / MILLI,
            self.budget_milli_tokens % MILLI,
            self.ambiguous_creates
        )
    }
}

struct State {
    rng: ChaCha8Rng,
    stats: RetryStats,
}

/// A sink that retries the transient failures of the sink it wraps; see the module docs.
pub struct RetrySink {
    inner: Arc<dyn Sink>,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    deposit_milli: u64,
    tokens_max_milli: u64,
    state: Mutex<State>,
}

impl fmt::Debug for RetrySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetrySink")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// How one operation's attempts ended.
struct Outcome<T> {
    result: Result<T, SinkError>,
    attempts: u32,
}

impl RetrySink {
    /// Wraps `inner`; backoffs wait on `clock`. Fails with [`SinkErrorKind::InvalidConfig`] if
    /// the policy is out of its bounds.
    pub fn new(
        inner: Arc<dyn Sink>,
        clock: Arc<dyn Clock>,
        policy: RetryPolicy,
    ) -> Result<Self, SinkError> {
        policy.check().map_err(|why| {
            SinkError::new(
                SinkErrorKind::InvalidConfig,
                "open",
                &inner.describe(),
                format!("retry policy: {why}"),
            )
        })?;
        let deposit_milli = (policy.budget.retry_ratio * MILLI as f64).round() as u64;
        let tokens_max_milli = u64::from(policy.budget.tokens_max) * MILLI;
        Ok(RetrySink {
            clock,
            deposit_milli,
            tokens_max_milli,
            state: Mutex::new(State {
                rng: ChaCha8Rng::seed_from_u64(policy.jitter_seed),
                stats: RetryStats {
                    budget_milli_tokens: u64::from(policy.budget.tokens_initial) * MILLI,
                    ..RetryStats::default()
                },
            }),
            policy,
            inner,
        })
    }

    /// What has been done so far.
    pub fn stats(&self) -> RetryStats {
        lock(&self.state).stats
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &Arc<dyn Sink> {
        &self.inner
    }

    /// Runs `attempt` until it succeeds, fails for good, runs out of attempts or of budget.
    async fn run<T, F, Fut>(&self, op: &'static str, key: &str, mut attempt: F) -> Outcome<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SinkError>>,
    {
        {
            let mut state = lock(&self.state);
            state.stats.operations += 1;
            let tokens = &mut state.stats.budget_milli_tokens;
            *tokens = (*tokens + self.deposit_milli).min(self.tokens_max_milli);
        }
        let started = self.clock.now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match attempt().await {
                Ok(v) => {
                    return Outcome {
                        result: Ok(v),
                        attempts,
                    };
                }
                Err(e) if !e.is_transient() => {
                    return Outcome {
                        result: Err(e),
                        attempts,
                    };
                }
                Err(e) => e,
            };
            let delay = {
                let mut state = lock(&self.state);
                if attempts >= self.policy.attempts_max {
                    state.stats.gave_up += 1;
                    None
                } else if state.stats.budget_milli_tokens < MILLI {
                    state.stats.budget_refusals += 1;
                    return Outcome {
                        result: Err(SinkError::new(
                            SinkErrorKind::Transient,
                            op,
                            key,
                            format!(
                                "not retried: the retry budget is exhausted (retries are limited \
                                 to {} per operation, plus a burst of {}); after {attempts} \
                                 attempt(s) the last error was: {err}",
                                self.policy.budget.retry_ratio, self.policy.budget.tokens_max
                            ),
                        )),
                        attempts,
                    };
                } else {
                    state.stats.budget_milli_tokens -= MILLI;
                    state.stats.retries += 1;
                    let delay = jittered(self.policy.backoff(attempts), state.rng.next_u64());
                    state.stats.backoff_total = state.stats.backoff_total.saturating_add(delay);
                    Some(delay)
                }
            };
            let Some(delay) = delay else {
                let elapsed = self.clock.now().since(started);
                return Outcome {
                    result: Err(SinkError::new(
                        SinkErrorKind::Transient,
                        op,
                        key,
                        format!(
                            "gave up after {attempts} attempts over {elapsed:?} (the retry \
                             policy's attempts_max); the last error was: {err}"
                        ),
                    )),
                    attempts,
                };
            };
            tracing::debug!(op, key, attempts, ?delay, error = %err, "retrying a sink operation");
            self.clock.sleep_until(self.clock.now().plus(delay)).await;
        }
    }

    /// Settles a create that found the key taken after an earlier attempt failed transiently.
    async fn settle_ambiguous_create(
        &self,
        key: &str,
        data: &Bytes,
        attempts: u32,
        already: SinkError,
    ) -> Result<(), SinkError> {
        lock(&self.state).stats.ambiguous_creates += 1;
        // The read-back is an operation of its own, retried under the same policy and budget.
        let stored = self.run("get", key, || self.inner.get(key)).await.result;
        match stored {
            Ok(stored) if stored == *data => Ok(()),
            Ok(stored) => Err(SinkError::new(
                SinkErrorKind::AlreadyExists,
                "put",
                key,
                format!(
                    "attempt {attempts} of a create found the key taken, and the object there \
                     ({} bytes) is not the one being put ({} bytes), so another writer created \
                     it (or an earlier attempt, which failed transiently, left a torn object): \
                     {already}",
                    stored.len(),
                    data.len()
                ),
            )),
            Err(e) => Err(SinkError::new(
                SinkErrorKind::Transient,
                "put",
                key,
                format!(
                    "ambiguous create: attempt {attempts} found the key taken after an earlier \
                     attempt failed transiently (and may have stored it), and reading the object \
                     back to compare failed: {e}"
                ),
            )),
        }
    }
}

/// "Equal jitter": a uniformly drawn wait between half the backoff and all of it, so that
/// concurrent retries spread out while the backoff still grows.
fn jittered(backoff: Duration, draw: u64) -> Duration {
    let ns = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
    let half = ns / 2;
    let span = ns - half;
    let extra = if span == 0 {
        0
    } else {
        draw % span.saturating_add(1)
    };
    Duration::from_nanos(half + extra)
}

#[async_trait]
impl Sink for RetrySink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        let outcome = self
            .run("put", key, || self.inner.put(key, data.clone(), mode))
            .await;
        match outcome.result {
            // Only transient failures are retried, so every attempt before this one failed
            // transiently and may have stored the object.
            Err(e)
                if mode == PutMode::Create
                    && outcome.attempts > 1
                    && e.kind() == SinkErrorKind::AlreadyExists =>
            {
                self.settle_ambiguous_create(key, &data, outcome.attempts, e)
                    .await
            }
            result => result,
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        self.run("get", key, || self.inner.get(key)).await.result
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        validate_prefix(prefix)?;
        self.run("list", prefix, || self.inner.list(prefix))
            .await
            .result
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        self.run("delete", key, || self.inner.delete(key))
            .await
            .result
    }

    fn describe(&self) -> String {
        format!("retry({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_maximum() {
        let policy = RetryPolicy {
            delay_first: Duration::from_millis(100),
            delay_max: Duration::from_secs(1),
            multiplier: 3.0,
            ..RetryPolicy::default()
        };
        let delays: Vec<Duration> = (1..=5).map(|n| policy.backoff(n)).collect();
        assert_eq!(
            delays,
            [100, 300, 900, 1000, 1000].map(Duration::from_millis)
        );
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_backoff() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let backoff = Duration::from_millis(800);
        for _ in 0..1000 {
            let d = jittered(backoff, rng.next_u64());
            assert!(d >= backoff / 2 && d <= backoff, "{d:?}");
        }
        assert_eq!(jittered(Duration::ZERO, 12345), Duration::ZERO);
    }

    #[test]
    fn policies_out_of_bounds_are_refused() {
        let bad = [
            RetryPolicy {
                attempts_max: 0,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                multiplier: 0.5,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                delay_first: Duration::from_secs(60),
                delay_max: Duration::from_secs(1),
                ..RetryPolicy::default()
            },
            RetryPolicy {
                budget: RetryBudgetPolicy {
                    tokens_initial: 5,
                    tokens_max: 1,
                    retry_ratio: 0.1,
                },
                ..RetryPolicy::default()
            },
        ];
        for policy in bad {
            assert!(policy.check().is_err(), "{policy:?}");
        }
        assert!(RetryPolicy::default().check().is_ok());
    }
}
