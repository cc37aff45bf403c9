//! Metrics: bytes in and out, operations, errors by kind, and latency per operation kind, of the
//! sink it wraps, timed with the injected [`Clock`] and read as a [`MetricsSnapshot`].

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{OpKind, lock};
use crate::clock::{Clock, Timestamp};
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind};

/// The upper bounds (inclusive) of the latency histogram's buckets; one more bucket holds what
/// is slower than the last.
pub const LATENCY_BUCKET_BOUNDS: [Duration; 10] = [
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(60),
];

/// The number of histogram buckets: one per bound, and one for slower.
pub const LATENCY_BUCKETS: usize = LATENCY_BUCKET_BOUNDS.len() + 1;

/// Latencies of one operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Operations timed.
    pub count: u64,
    /// The fastest (zero when none).
    pub min: Duration,
    /// The slowest.
    pub max: Duration,
    /// Their sum.
    pub sum: Duration,
    /// Counts per bucket: `buckets[i]` counts latencies up to `LATENCY_BUCKET_BOUNDS[i]` (and
    /// above the previous bound); the last counts the slower ones.
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl LatencyHistogram {
    /// Adds one latency.
    pub fn record(&mut self, latency: Duration) {
        self.min = if self.count == 0 {
            latency
        } else {
            self.min.min(latency)
        };
        self.max = self.max.max(latency);
        self.sum = self.sum.saturating_add(latency);
        self.count += 1;
        let bucket = LATENCY_BUCKET_BOUNDS
            .iter()
            .position(|&bound| latency <= bound)
            .unwrap_or(LATENCY_BUCKET_BOUNDS.len());
        if let Some(slot) = self.buckets.get_mut(bucket) {
            *slot += 1;
        }
    }

    /// The mean latency (zero when none).
    pub fn mean(&self) -> Duration {
        match u32::try_from(self.count) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.sum / n,
            Err(_) => Duration::from_secs_f64(self.sum.as_secs_f64() / self.count as f64),
        }
    }
}

/// Errors by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// [`SinkErrorKind::NotFound`].
    pub not_found: u64,
    /// [`SinkErrorKind::AlreadyExists`].
    pub already_exists: u64,
    /// [`SinkErrorKind::InvalidKey`].
    pub invalid_key: u64,
    /// [`SinkErrorKind::InvalidConfig`].
    pub invalid_config: u64,
    /// [`SinkErrorKind::Transient`].
    pub transient: u64,
    /// [`SinkErrorKind::Permanent`].
    pub permanent: u64,
}

impl ErrorCounts {
    /// Counts one error of `kind`.
    pub fn record(&mut self, kind: SinkErrorKind) {
        let slot = match kind {
            SinkErrorKind::NotFound => &mut self.not_found,
            SinkErrorKind::AlreadyExists => &mut self.already_exists,
            SinkErrorKind::InvalidKey => &mut self.invalid_key,
            SinkErrorKind::InvalidConfig => &mut self.invalid_config,
            SinkErrorKind::Transient => &mut self.transient,
            SinkErrorKind::Permanent => &mut self.permanent,
        };
        *slot += 1;
    }

    /// All errors.
    pub fn total(&self) -> u64 {
        self.not_found
            + self.already_exists
            + self.invalid_key
            + self.invalid_config
            + self.transient
            + self.permanent
    }
}

impl fmt::Display for ErrorCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("not found", self.not_found),
            ("already exists", self.already_exists),
            ("invalid key", self.invalid_key),
            ("invalid config", self.invalid_config),
            ("transient", self.transient),
            ("permanent", self.permanent),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

/// The metrics of one operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpMetrics {
    /// Operations that succeeded.
    pub ok: u64,
    /// Operations that failed, by kind.
    pub errors: ErrorCounts,
    /// Latencies of all of them, failed ones included.
    pub latency: LatencyHistogram,
}

impl OpMetrics {
    /// Operations finished, successful or not.
    pub fn operations(&self) -> u64 {
        self.ok + self.errors.total()
    }
}

/// Everything a [`MetricsSink`] has measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Puts.
    pub put: OpMetrics,
    /// Gets.
    pub get: OpMetrics,
    /// Lists.
    pub list: OpMetrics,
    /// Deletes.
    pub delete: OpMetrics,
    /// Payload bytes of successful puts (into the sink).
    pub bytes_in: u64,
    /// Payload bytes of successful gets (out of the sink).
    pub bytes_out: u64,
}

impl MetricsSnapshot {
    /// The metrics of `op`.
    pub fn op(&self, op: OpKind) -> &OpMetrics {
        match op {
            OpKind::Put => &self.put,
            OpKind::Get => &self.get,
            OpKind::List => &self.list,
            OpKind::Delete => &self.delete,
        }
    }

    fn op_mut(&mut self, op: OpKind) -> &mut OpMetrics {
        match op {
            OpKind::Put => &mut self.put,
            OpKind::Get => &mut self.get,
            OpKind::List => &mut self.list,
            OpKind::Delete => &mut self.delete,
        }
    }
}

impl fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bytes in {}, bytes out {}",
            self.bytes_in, self.bytes_out
        )?;
        writeln!(
            f,
            "{:<6} {:>8} {:>8} {:>10} {:>10} {:>10}  errors",
            "op", "ok", "failed", "min", "mean", "max"
        )?;
        for op in [OpKind::Put, OpKind::Get, OpKind::List, OpKind::Delete] {
            let m = self.op(op);
            writeln!(
                f,
                "{:<6} {:>8} {:>8} {:>10} {:>10} {:>10}  {}",
                op.name(),
                m.ok,
                m.errors.total(),
                format!("{:.1?}", m.latency.min),
                format!("{:.1?}", m.latency.mean()),
                format!("{:.1?}", m.latency.max),
                m.errors
            )?;
        }
        write!(f, "latency buckets (up to")?;
        for bound in LATENCY_BUCKET_BOUNDS {
            write!(f, " {bound:?}")?;
        }
        write!(f, ", slower):")?;
        for op in [OpKind::Put, OpKind::Get, OpKind::List, OpKind::Delete] {
            write!(f, "\n  {:<6} {:?}", op.name(), self.op(op).latency.buckets)?;
        }
        Ok(())
    }
}

/// A sink that measures the sink it wraps; see the module docs.
pub struct MetricsSink {
    inner: Arc<dyn Sink>,
    clock: Arc<dyn Clock>,
    state: Mutex<MetricsSnapshot>,
}

impl fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsSink")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl MetricsSink {
    /// Wraps `inner`, timing operations with `clock`.
    pub fn new(inner: Arc<dyn Sink>, clock: Arc<dyn Clock>) -> Self {
        MetricsSink {
            inner,
            clock,
            state: Mutex::new(MetricsSnapshot::default()),
        }
    }

    /// Everything measured so far.
    pub fn snapshot(&self) -> MetricsSnapshot {
        *lock(&self.state)
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &Arc<dyn Sink> {
        &self.inner
    }

    fn record<T>(
        &self,
        op: OpKind,
        started: Timestamp,
        result: &Result<T, SinkError>,
        payload_bytes: u64,
    ) {
        let latency = self.clock.now().since(started);
        let mut state = lock(&self.state);
        match result {
            Ok(_) => {
                state.op_mut(op).ok += 1;
                match op {
                    OpKind::Put => state.bytes_in += payload_bytes,
                    OpKind::Get => state.bytes_out += payload_bytes,
                    OpKind::List | OpKind::Delete => {}
                }
            }
            Err(e) => state.op_mut(op).errors.record(e.kind()),
        }
        state.op_mut(op).latency.record(latency);
    }
}

#[async_trait]
impl Sink for MetricsSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        let started = self.clock.now();
        let len = data.len() as u64;
        let result = self.inner.put(key, data, mode).await;
        self.record(OpKind::Put, started, &result, len);
        result
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        let started = self.clock.now();
        let result = self.inner.get(key).await;
        let len = result.as_ref().map_or(0, |d| d.len() as u64);
        self.record(OpKind::Get, started, &result, len);
        result
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        let started = self.clock.now();
        let result = self.inner.list(prefix).await;
        self.record(OpKind::List, started, &result, 0);
        result
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        let started = self.clock.now();
        let result = self.inner.delete(key).await;
        self.record(OpKind::Delete, started, &result, 0);
        result
    }

    fn describe(&self) -> String {
        format!("metrics({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_their_buckets() {
        let mut h = LatencyHistogram::default();
        for ms in [0, 1, 2, 700, 5_000, 120_000] {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count, 6);
        assert_eq!(h.min, Duration::ZERO);
        assert_eq!(h.max, Duration::from_secs(120));
        assert_eq!(h.sum, Duration::from_millis(125_703));
        assert_eq!(h.buckets, [2, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1]);
        assert_eq!(LatencyHistogram::default().mean(), Duration::ZERO);
    }
}
