//! The cache as the harness opens it: one or more backends (sharded by key), a bandwidth
//! schedule, retries of transient failures, and metrics for the report.

use std::sync::Arc;

use anyhow::Result;
use replicator_core::clock::{Clock, SystemClock};
use replicator_sink::wrap::{
    MetricsSink, RetryPolicy, RetrySink, ShardSink, ThrottleConfig, ThrottleSink, UtcOffset,
};
use replicator_sink::{Sink, open_sink};

use crate::commands::UsageError;

/// Cache options shared by every command that talks to the cache.
#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// The cache: a directory, file:///path, memory://, az://container/prefix or
    /// s3://bucket/prefix (credentials from the usual AZURE_STORAGE_* / AWS_* variables).
    /// Repeat to spread objects over several stores by a stable hash of their keys; always give
    /// them in the same order, and add new ones at the end.
    #[arg(long = "sink", required = true)]
    pub urls: Vec<String>,
    /// Bandwidth limit by time of day for blob uploads and downloads, e.g.
    /// `08:00-20:00=100Mbit/s,*=unlimited`.
    #[arg(long)]
    pub throttle: Option<String>,
    /// The time zone of --throttle, as an offset from UTC (`+02:00`, `UTC`).
    #[arg(long, default_value = "UTC")]
    pub throttle_utc_offset: String,
    /// Attempts per cache operation on transient failures (1 = no retries), with jittered
    /// exponential backoff within a shared retry budget.
    #[arg(long, default_value_t = RetryPolicy::default().attempts_max)]
    pub sink_attempts: u32,
}

/// The opened cache, with the metrics of everything done through it.
#[derive(Debug)]
pub struct SinkStack {
    /// The sink to use.
    pub sink: Arc<dyn Sink>,
    metrics: Arc<MetricsSink>,
}

impl SinkStack {
    /// One line per operation kind: counts, bytes, errors, latency.
    pub fn report(&self) -> String {
        self.metrics.snapshot().to_string()
    }
}

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(UsageError(e.to_string()))
}

/// Opens `metrics(retry(throttle(shard(backends))))` on the system clock.
pub fn open(
    urls: &[String],
    throttle: Option<&str>,
    utc_offset: &str,
    attempts: u32,
) -> Result<SinkStack> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut backends = Vec::with_capacity(urls.len());
    for url in urls {
        backends.push(open_sink(url).map_err(usage)?);
    }
    let mut sink: Arc<dyn Sink> = match backends.len() {
        1 => backends.remove(0),
        _ => Arc::new(ShardSink::new(backends).map_err(usage)?),
    };
    if let Some(spec) = throttle {
        let offset = UtcOffset::parse(utc_offset).map_err(usage)?;
        let config = ThrottleConfig::parse(spec)
            .map_err(usage)?
            .with_utc_offset(offset);
        sink = Arc::new(ThrottleSink::new(sink, Arc::clone(&clock), config).map_err(usage)?);
    }
    let policy = RetryPolicy {
        attempts_max: attempts,
        ..RetryPolicy::default()
    };
    sink = Arc::new(RetrySink::new(sink, Arc::clone(&clock), policy).map_err(usage)?);
    let metrics = Arc::new(MetricsSink::new(sink, clock));
    Ok(SinkStack {
        sink: Arc::clone(&metrics) as Arc<dyn Sink>,
        metrics,
    })
}

impl SinkArgs {
    /// Opens the cache these options describe.
    pub fn open(&self) -> Result<SinkStack> {
        open(
            &self.urls,
            self.throttle.as_deref(),
            &self.throttle_utc_offset,
            self.sink_attempts,
        )
    }
}
