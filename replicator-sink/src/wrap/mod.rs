//! Wrappers around any [`Sink`]: each takes the sink it wraps as an `Arc<dyn Sink>`, is a
//! [`Sink`] itself, forwards every method, keeps the trait's contract and passes the conformance
//! suite. They compose freely.
//!
//! - [`retry::RetrySink`]: retries transient failures with jittered exponential backoff, within
//!   a per-operation attempt limit and a retry budget shared by all operations.
//! - [`throttle::ThrottleSink`]: limits the bytes per second of put and get payloads, by time of
//!   day, fairly between concurrent callers.
//! - [`shard::ShardSink`]: spreads objects over several stores by a stable hash of the key.
//! - [`faults::FaultSink`]: injects errors, delays, torn uploads, lost acknowledgements and
//!   corrupted reads, for tests.
//! - [`metrics::MetricsSink`]: counts bytes, operations and errors and times every operation.
//!
//! # Composing
//!
//! The recommended order, outermost first, is
//! `metrics(retry(throttle(shard([backend, backend, ...]))))`:
//!
//! - **metrics** outermost sees what the caller sees: one latency per call, retries and throttle
//!   waits included. (Put a second one lower down to see the attempts.)
//! - **retry** outside **throttle**, so that every attempt is charged to the bandwidth limit, as
//!   it is on the wire, and so that a retry's backoff does not hold a place in the throttle queue.
//! - **throttle** outside **shard**, so that one limit covers the machine's link to all shards.
//!   Where each store has its own ingress cap instead, throttle each shard.
//! - **shard** innermost, over the backends; a [`faults::FaultSink`] goes around a backend (or
//!   one shard) in tests.
//!
//! Every wrapper that waits or reads the time takes an injected [`crate::clock::Clock`], so the
//! whole stack runs on [`crate::clock::SimClock`] in tests.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub mod faults;
pub mod metrics;
pub mod retry;
pub mod shard;
pub mod throttle;

pub use faults::{Fault, FaultCounts, FaultRule, FaultSink, Trigger};
pub use metrics::{MetricsSink, MetricsSnapshot};
pub use retry::{RetryBudgetPolicy, RetryPolicy, RetrySink, RetryStats};
pub use shard::ShardSink;
pub use throttle::{
    Rate, RateSchedule, ScheduleSpecError, ThrottleConfig, ThrottleSink, UtcOffset,
};

#[cfg(doc)]
use crate::Sink;

/// The kind of a sink operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`Sink::put`].
    Put,
    /// [`Sink::get`].
    Get,
    /// [`Sink::list`].
    List,
    /// [`Sink::delete`].
    Delete,
}

impl OpKind {
    /// The operation's name as [`crate::SinkError::op`] gives it.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::Get => "get",
            OpKind::List => "list",
            OpKind::Delete => "delete",
        }
    }
}

/// Locks `m`. A wrapper never panics while holding one of its locks, and every update under one
/// leaves the state whole, so a poisoned lock's state is still good to use.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
