//! Fault injection for tests: a sink wrapper that, by rule, fails, delays, tears, loses the
//! acknowledgement of, or corrupts operations of the sink it wraps.
//!
//! Rules fire on a countdown (let `skip` matching operations through, then fire `times` times)
//! or with a probability drawn from a [`ChaCha8Rng`] seeded by the caller, so the same seed and
//! the same sequence of operations give the same faults. Every random draw is made when the
//! operation is decided, under one lock, in rule order.
//!
//! Two of the faults break the [`Sink`] contract on purpose, as a misbehaving backend would:
//! [`Fault::TornPut`] leaves a truncated object under the key although the put failed, and
//! [`Fault::CorruptRead`] returns bytes that differ from those stored. The replication core must
//! catch both through its authentication.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use super::OpKind;
use super::lock;
use crate::clock::Clock;
use crate::key::validate_prefix;
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind, validate_key};

/// The most rules one [`FaultSink`] holds.
pub const MAX_FAULT_RULES: usize = 64;

/// What a rule does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails with [`SinkErrorKind::Transient`] without reaching the wrapped sink.
    Transient,
    /// Fails with [`SinkErrorKind::Permanent`] without reaching the wrapped sink.
    Permanent,
    /// Waits this long on the clock, then goes on (later rules may still fire).
    Delay(Duration),
    /// Put only: stores a truncated prefix of the data under the key (with the put's mode) and
    /// fails with a transient error; a backend breaking atomicity.
    TornPut,
    /// Put only: stores the data, then fails with a transient error.
    LostAck,
    /// Get only: returns the object with one bit flipped. An empty object cannot be corrupted
    /// and is returned as it is (and not counted).
    CorruptRead,
}

/// When a rule fires, among the operations it matches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// Lets `skip` matching operations through, then fires on the next `times`.
    Countdown {
        /// Matching operations to let through first.
        skip: u64,
        /// Times to fire after that.
        times: u64,
    },
    /// Fires on each matching operation with this probability (0 to 1), drawn from the sink's
    /// seeded generator.
    Probability(f64),
}

impl Trigger {
    /// Fires on the next matching operation only.
    pub fn once() -> Self {
        Trigger::Countdown { skip: 0, times: 1 }
    }

    /// Fires on the next `times` matching operations.
    pub fn times(times: u64) -> Self {
        Trigger::Countdown { skip: 0, times }
    }

    /// Fires on every matching operation.
    pub fn always() -> Self {
        Trigger::Countdown {
            skip: 0,
            times: u64::MAX,
        }
    }
}

/// One fault rule: which operations it matches, what it does and when.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule {
    /// The operation kind it matches.
    pub op: OpKind,
    /// It matches only keys (list prefixes, for [`OpKind::List`]) containing this; empty matches
    /// every key.
    pub key_contains: String,
    /// What it does.
    pub fault: Fault,
    /// When it fires.
    pub trigger: Trigger,
}

impl FaultRule {
    /// A rule for every key of operations of kind `op`.
    pub fn new(op: OpKind, fault: Fault, trigger: Trigger) -> Self {
        FaultRule {
            op,
            key_contains: String::new(),
            fault,
            trigger,
        }
    }

    /// Restricts the rule to keys containing `part`.
    pub fn on_keys_containing(mut self, part: &str) -> Self {
        self.key_contains = part.to_owned();
        self
    }

    fn check(&self) -> Result<(), String> {
        let fits = match self.fault {
            Fault::Transient | Fault::Permanent | Fault::Delay(_) => true,
            Fault::TornPut | Fault::LostAck => self.op == OpKind::Put,
            Fault::CorruptRead => self.op == OpKind::Get,
        };
        if !fits {
            return Err(format!(
                "the fault {:?} cannot happen to a {}",
                self.fault,
                self.op.name()
            ));
        }
        if let Trigger::Probability(p) = self.trigger
            && !(0.0..=1.0).contains(&p)
        {
            return Err(format!("the probability {p} is not between 0 and 1"));
        }
        Ok(())
    }
}

/// How many faults a [`FaultSink`] has injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Operations failed with a transient error (torn puts and lost acknowledgements not
    /// included).
    pub transient: u64,
    /// Operations failed with a permanent error.
    pub permanent: u64,
    /// Delays injected.
    pub delays: u64,
    /// Their total.
    pub delay_total: Duration,
    /// Puts that left a truncated object.
    pub torn_puts: u64,
    /// Puts stored but reported as failed.
    pub lost_acks: u64,
    /// Gets returned with a flipped bit.
    pub corrupt_reads: u64,
}

impl FaultCounts {
    /// Every fault that changed an operation's outcome (delays not included).
    pub fn failures(&self) -> u64 {
        self.transient + self.permanent + self.torn_puts + self.lost_acks + self.corrupt_reads
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "injected: {} transient, {} permanent, {} delays ({:?}), {} torn puts, {} lost acks, \
             {} corrupt reads",
            self.transient,
            self.permanent,
            self.delays,
            self.delay_total,
            self.torn_puts,
            self.lost_acks,
            self.corrupt_reads
        )
    }
}

struct ArmedRule {
    rule: FaultRule,
    matched: u64,
}

struct State {
    rules: Vec<ArmedRule>,
    rng: ChaCha8Rng,
    counts: FaultCounts,
}

/// A fault that ends the search for one operation: the rule's index, the fault, and a random
/// draw for its shape (where to tear, which bit to flip).
type Terminal = (usize, Fault, u64);

/// What happens to one operation: delays first, then at most one terminal fault.
struct Plan {
    delay: Duration,
    terminal: Option<Terminal>,
}

/// A sink that injects faults into the sink it wraps; see the module docs.
pub struct FaultSink {
    inner: Arc<dyn Sink>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl fmt::Debug for FaultSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("FaultSink")
            .field("inner", &self.inner)
            .field("rules", &state.rules.len())
            .field("counts", &state.counts)
            .finish_non_exhaustive()
    }
}

impl FaultSink {
    /// Wraps `inner`, with no rules yet; delays wait on `clock`; probabilities and the shapes of
    /// torn and corrupted objects come from a generator seeded with `seed`.
    pub fn new(inner: Arc<dyn Sink>, clock: Arc<dyn Clock>, seed: u64) -> Self {
        FaultSink {
            inner,
            clock,
            state: Mutex::new(State {
                rules: Vec::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
                counts: FaultCounts::default(),
            }),
        }
    }

    /// Adds a rule, after those already there. For one operation, rules are tried in order:
    /// every matching delay that fires adds its wait, and the first other fault that fires ends
    /// the search (later rules are not consulted, and their countdowns do not advance).
    /// Fails with [`SinkErrorKind::InvalidConfig`] for a fault that cannot happen to the rule's
    /// operation, a probability outside 0 to 1, or more than [`MAX_FAULT_RULES`] rules.
    pub fn add_rule(&self, rule: FaultRule) -> Result<(), SinkError> {
        let invalid = |why: String| {
            SinkError::new(
                SinkErrorKind::InvalidConfig,
                "open",
                &self.inner.describe(),
                format!("fault rule {rule:?}: {why}"),
            )
        };
        rule.check().map_err(invalid)?;
        let mut state = lock(&self.state);
        if state.rules.len() >= MAX_FAULT_RULES {
            return Err(invalid(format!(
                "a fault sink holds at most {MAX_FAULT_RULES} rules"
            )));
        }
        state.rules.push(ArmedRule {
            rule: rule.clone(),
            matched: 0,
        });
        Ok(())
    }

    /// Removes every rule; the counts stay.
    pub fn clear_rules(&self) {
        lock(&self.state).rules.clear();
    }

    /// What has been injected so far.
    pub fn counts(&self) -> FaultCounts {
        lock(&self.state).counts
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &Arc<dyn Sink> {
        &self.inner
    }

    fn plan(&self, op: OpKind, key: &str) -> Plan {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let mut plan = Plan {
            delay: Duration::ZERO,
            terminal: None,
        };
        for (index, armed) in state.rules.iter_mut().enumerate() {
            let rule = &armed.rule;
            if rule.op != op || !key.contains(rule.key_contains.as_str()) {
                continue;
            }
            let fires = match rule.trigger {
                Trigger::Countdown { skip, times } => {
                    let n = armed.matched;
                    armed.matched = n.saturating_add(1);
                    n >= skip && n - skip < times
                }
                Trigger::Probability(p) => {
                    armed.matched = armed.matched.saturating_add(1);
                    probability_fires(state.rng.next_u64(), p)
                }
            };
            if !fires {
                continue;
            }
            match rule.fault {
                Fault::Delay(d) => {
                    plan.delay = plan.delay.saturating_add(d);
                    state.counts.delays += 1;
                    state.counts.delay_total = state.counts.delay_total.saturating_add(d);
                }
                fault => {
                    match fault {
                        Fault::Transient => state.counts.transient += 1,
                        Fault::Permanent => state.counts.permanent += 1,
                        // Counted once they have happened.
                        _ => {}
                    }
                    plan.terminal = Some((index, fault, state.rng.next_u64()));
                    break;
                }
            }
        }
        plan
    }

    fn count(&self, f: impl FnOnce(&mut FaultCounts)) {
        f(&mut lock(&self.state).counts);
    }

    /// Decides the operation's faults and waits out its delays. Returns the injected error, if
    /// the fault is one, or the fault for the caller to apply: its rule, kind and a random draw.
    async fn begin(&self, op: OpKind, key: &str) -> Result<Option<Terminal>, SinkError> {
        let plan = self.plan(op, key);
        if !plan.delay.is_zero() {
            self.clock
                .sleep_until(self.clock.now().plus(plan.delay))
                .await;
        }
        match plan.terminal {
            Some((rule, Fault::Transient, _)) => Err(SinkError::new(
                SinkErrorKind::Transient,
                op.name(),
                key,
                format!("injected transient fault (rule {rule})"),
            )),
            Some((rule, Fault::Permanent, _)) => Err(SinkError::new(
                SinkErrorKind::Permanent,
                op.name(),
                key,
                format!("injected permanent fault (rule {rule})"),
            )),
            other => Ok(other),
        }
    }
}

/// Whether a draw `r` fires a rule of probability `p`.
fn probability_fires(r: u64, p: f64) -> bool {
    if p >= 1.0 {
        return true;
    }
    // `p * 2^64` as a threshold; p < 1, so it fits.
    let threshold = (p * 18_446_744_073_709_551_616.0) as u64;
    r < threshold
}

#[async_trait]
impl Sink for FaultSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        match self.begin(OpKind::Put, key).await? {
            Some((rule, Fault::TornPut, draw)) => {
                let len = data.len() as u64;
                let kept = if len == 0 { 0 } else { draw % len };
                let kept = usize::try_from(kept).unwrap_or(0);
                self.inner.put(key, data.slice(..kept), mode).await?;
                self.count(|c| c.torn_puts += 1);
                Err(SinkError::new(
                    SinkErrorKind::Transient,
                    "put",
                    key,
                    format!(
                        "injected torn upload (rule {rule}): stored {kept} of {len} bytes, \
                         then failed"
                    ),
                ))
            }
            Some((rule, Fault::LostAck, _)) => {
                self.inner.put(key, data, mode).await?;
                self.count(|c| c.lost_acks += 1);
                Err(SinkError::new(
                    SinkErrorKind::Transient,
                    "put",
                    key,
                    format!("injected lost acknowledgement (rule {rule}): the object was stored"),
                ))
            }
            _ => self.inner.put(key, data, mode).await,
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        match self.begin(OpKind::Get, key).await? {
            Some((_, Fault::CorruptRead, draw)) => {
                let data = self.inner.get(key).await?;
                let bits = (data.len() as u64).saturating_mul(8);
                if bits == 0 {
                    return Ok(data);
                }
                let bit = draw % bits;
                let mut bad = data.to_vec();
                if let Some(byte) = usize::try_from(bit / 8).ok().and_then(|i| bad.get_mut(i)) {
                    *byte ^= 1 << (bit % 8);
                }
                self.count(|c| c.corrupt_reads += 1);
                Ok(Bytes::from(bad))
            }
            _ => self.inner.get(key).await,
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        validate_prefix(prefix)?;
        self.begin(OpKind::List, prefix).await?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        self.begin(OpKind::Delete, key).await?;
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        format!("faults({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_that_cannot_happen_are_refused() {
        for (op, fault) in [
            (OpKind::Get, Fault::TornPut),
            (OpKind::List, Fault::LostAck),
            (OpKind::Put, Fault::CorruptRead),
        ] {
            assert!(FaultRule::new(op, fault, Trigger::once()).check().is_err());
        }
        let bad_p = FaultRule::new(OpKind::Get, Fault::Transient, Trigger::Probability(1.5));
        assert!(bad_p.check().is_err());
    }

    #[test]
    fn probability_thresholds_are_exact_at_the_ends() {
        assert!(!probability_fires(0, 0.0));
        assert!(probability_fires(u64::MAX, 1.0));
        assert!(probability_fires(u64::MAX / 4, 0.5));
        assert!(!probability_fires(u64::MAX / 4 * 3, 0.5));
    }
}
