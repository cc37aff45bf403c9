//! The cache as the harness opens it: one or more backends (sharded by key), a bandwidth
//! schedule, retries of transient failures, metrics for the report, and optionally a record of
//! every object put (`--record-puts`), which the kill -9 torture (`benches/torture.sh`) reads to
//! prove that no AES-GCM nonce was used twice under one key.
//!
//! Fault injection: `harness scenario` opens the stack with [`FaultSink`]s around the backends
//! ([`open_stack`]), and every command honours the test hook [`STOP_AFTER_ENV`]: after the Nth
//! put (or get) reached the backend, the process writes a marker file and stops doing anything,
//! so that the scenario runner can kill it with SIGKILL at exactly that step.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use replicator_core::clock::{Clock, SystemClock};
use replicator_core::format::{TAG_LEN, peek_header};
use replicator_sink::wrap::{
    FaultSink, MetricsSink, OpKind, RetryPolicy, RetrySink, ShardSink, ThrottleConfig,
    ThrottleSink, UtcOffset,
};
use replicator_sink::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind, open_sink};

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
    /// Append a line to FILE for every object put into the cache: `begin` before the put and
    /// `done` after it succeeded, each with the key, the header fields that pick the AES-GCM key
    /// and nonce (kind, key id, disk, cycle, attempt, seq, salt) and the GCM tag. For checking
    /// that no nonce is reused (see `benches/torture.sh`).
    #[arg(long, value_name = "FILE")]
    pub record_puts: Option<PathBuf>,
}

/// The opened cache, with the metrics of everything done through it.
#[derive(Debug)]
pub struct SinkStack {
    /// The sink to use.
    pub sink: Arc<dyn Sink>,
    /// The backends (sharded when several), below every wrapper: what the cache really holds.
    pub backend: Arc<dyn Sink>,
    /// The fault injectors, outermost first, when asked for ([`StackOptions::fault_layers`]).
    pub faults: Vec<Arc<FaultSink>>,
    metrics: Arc<MetricsSink>,
}

impl SinkStack {
    /// One line per operation kind: counts, bytes, errors, latency.
    pub fn report(&self) -> String {
        self.metrics.snapshot().to_string()
    }
}

/// How to open the cache: see [`open_stack`].
#[derive(Debug)]
pub struct StackOptions<'a> {
    /// The backends' URLs (sharded when several).
    pub urls: &'a [String],
    /// A bandwidth schedule.
    pub throttle: Option<&'a str>,
    /// The schedule's time zone.
    pub utc_offset: &'a str,
    /// Attempts per operation.
    pub attempts: u32,
    /// Where to record puts.
    pub record_puts: Option<&'a Path>,
    /// Fault injectors to put around the backends (seeded from `fault_seed`), for tests.
    pub fault_layers: usize,
    /// Seed of the fault injectors.
    pub fault_seed: u64,
}

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(UsageError(e.to_string()))
}

/// Opens `metrics(retry(throttle(record(shard(backends)))))` on the system clock; the record
/// layer only with `record_puts`.
pub fn open(
    urls: &[String],
    throttle: Option<&str>,
    utc_offset: &str,
    attempts: u32,
    record_puts: Option<&Path>,
) -> Result<SinkStack> {
    open_stack(&StackOptions {
        urls,
        throttle,
        utc_offset,
        attempts,
        record_puts,
        fault_layers: 0,
        fault_seed: 0,
    })
}

/// Opens `metrics(retry(throttle(record(faults(stop(shard(backends)))))))` on the system clock:
/// the record layer only with `record_puts`, the fault layers only when asked for, and the stop
/// hook only when [`STOP_AFTER_ENV`] is set.
pub fn open_stack(opts: &StackOptions<'_>) -> Result<SinkStack> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut backends = Vec::with_capacity(opts.urls.len());
    for url in opts.urls {
        backends.push(open_sink(url).map_err(usage)?);
    }
    let mut sink: Arc<dyn Sink> = match backends.len() {
        1 => backends.remove(0),
        _ => Arc::new(ShardSink::new(backends).map_err(usage)?),
    };
    let backend = Arc::clone(&sink);
    if let Some(hook) = StopAfter::from_env()? {
        sink = Arc::new(StopAfterSink::new(sink, hook));
    }
    let mut faults = Vec::with_capacity(opts.fault_layers);
    for layer in 0..opts.fault_layers {
        let f = Arc::new(FaultSink::new(
            sink,
            Arc::clone(&clock),
            opts.fault_seed ^ layer as u64,
        ));
        sink = Arc::clone(&f) as Arc<dyn Sink>;
        faults.push(f);
    }
    faults.reverse();
    let (throttle, utc_offset, attempts) = (opts.throttle, opts.utc_offset, opts.attempts);
    if let Some(path) = opts.record_puts {
        sink = Arc::new(RecordPutsSink::open(sink, path)?);
    }
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
        backend,
        faults,
        metrics,
    })
}

/// The fault-injection test hook: `REPLICATOR_TEST_STOP_AFTER=OP:N:MARKER`, with `OP` `put` or
/// `get`. Once the Nth such operation has completed at the backend, the process creates the
/// file `MARKER` and every later cache operation waits forever, so that whoever watches for
/// the marker kills the process at exactly that step (`harness scenario`'s kill faults).
pub const STOP_AFTER_ENV: &str = "REPLICATOR_TEST_STOP_AFTER";

/// The parsed [`STOP_AFTER_ENV`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopAfter {
    /// The operation counted.
    pub op: OpKind,
    /// Operations to complete before stopping.
    pub count: u64,
    /// The file created at the stop.
    pub marker: PathBuf,
}

impl StopAfter {
    /// Parses `OP:N:MARKER`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut parts = spec.splitn(3, ':');
        let op = match parts.next() {
            Some("put") => OpKind::Put,
            Some("get") => OpKind::Get,
            other => return Err(format!("operation {other:?} is not `put` or `get`")),
        };
        let count = parts
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| "the count is not a positive integer".to_owned())?;
        let marker = parts
            .next()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| "the marker file is missing".to_owned())?;
        Ok(StopAfter {
            op,
            count,
            marker: PathBuf::from(marker),
        })
    }

    fn from_env() -> Result<Option<Self>> {
        match std::env::var(STOP_AFTER_ENV) {
            Ok(spec) => StopAfter::parse(&spec).map(Some).map_err(|e| {
                usage(format!(
                    "{STOP_AFTER_ENV}={spec}: {e}; expected OP:N:MARKER (OP put or get)"
                ))
            }),
            Err(_) => Ok(None),
        }
    }
}

/// The sink of the [`STOP_AFTER_ENV`] hook.
#[derive(Debug)]
struct StopAfterSink {
    inner: Arc<dyn Sink>,
    hook: StopAfter,
    done: std::sync::atomic::AtomicU64,
}

impl StopAfterSink {
    fn new(inner: Arc<dyn Sink>, hook: StopAfter) -> Self {
        StopAfterSink {
            inner,
            hook,
            done: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Waits forever once stopped.
    async fn gate(&self) {
        if self.done.load(std::sync::atomic::Ordering::SeqCst) >= self.hook.count {
            std::future::pending::<()>().await;
        }
    }

    /// Counts a completed operation of `op`; at the Nth, marks the stop and waits forever.
    async fn count(&self, op: OpKind) {
        if op != self.hook.op {
            return;
        }
        let n = self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == self.hook.count {
            if let Err(e) = File::create(&self.hook.marker) {
                tracing::error!(marker = %self.hook.marker.display(), error = %e, "cannot create the stop marker");
            }
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl Sink for StopAfterSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        self.gate().await;
        self.inner.put(key, data, mode).await?;
        self.count(OpKind::Put).await;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        self.gate().await;
        let data = self.inner.get(key).await?;
        self.count(OpKind::Get).await;
        Ok(data)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        self.gate().await;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        self.gate().await;
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl SinkArgs {
    /// Opens the cache these options describe.
    pub fn open(&self) -> Result<SinkStack> {
        open(
            &self.urls,
            self.throttle.as_deref(),
            &self.throttle_utc_offset,
            self.sink_attempts,
            self.record_puts.as_deref(),
        )
    }
}

/// Records every put into a file, one line per event, for the nonce-reuse check of the torture.
///
/// A line is `PHASE KEY KIND KEY_ID DISK CYCLE ATTEMPT SEQ SALT TAG`, space-separated: `PHASE` is
/// `begin` (written before the put, so an object that lands just before the process is killed is
/// still on record) or `done` (after the put succeeded); `KIND` is the object kind's name;
/// `KEY_ID`, `SALT` and `TAG` (the last 16 bytes, the GCM tag) are lowercase hex; `DISK` is the
/// disk id; the numbers are decimal. An object whose header cannot be read is recorded as
/// `unparsed KEY REASON...`. Each line is appended with one `write` to a file opened for
/// appending, so several processes can share one record file.
#[derive(Debug)]
pub struct RecordPutsSink {
    inner: Arc<dyn Sink>,
    path: PathBuf,
    file: Mutex<File>,
}

impl RecordPutsSink {
    /// Wraps `inner`, appending to `path` (created if absent).
    pub fn open(inner: Arc<dyn Sink>, path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the put record {}", path.display()))?;
        Ok(RecordPutsSink {
            inner,
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    fn append(&self, key: &str, line: &str) -> Result<(), SinkError> {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(line.as_bytes()).map_err(|e| {
            SinkError::new(
                SinkErrorKind::Permanent,
                "put",
                key,
                format!(
                    "cannot append to the put record {}: {e}",
                    self.path.display()
                ),
            )
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The record line of one put of `data` under `key` in `phase` (`begin` or `done`).
pub fn record_line(phase: &str, key: &str, data: &[u8]) -> String {
    let header = match peek_header(data) {
        Ok(h) => h,
        Err(e) => return format!("unparsed {key} {}\n", e.to_string().replace('\n', " ")),
    };
    let tag = data
        .get(data.len().saturating_sub(TAG_LEN)..)
        .unwrap_or(&[]);
    format!(
        "{phase} {key} {} {} {} {} {} {} {} {}\n",
        header.kind.name().replace(' ', "-"),
        hex(&header.key_id),
        header.disk_id,
        header.cycle,
        header.attempt,
        header.seq,
        hex(&header.salt),
        hex(tag)
    )
}

#[async_trait]
impl Sink for RecordPutsSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        self.append(key, &record_line("begin", key, &data))?;
        self.inner.put(key, data.clone(), mode).await?;
        self.append(key, &record_line("done", key, &data))
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &[u8] = include_bytes!("../../replicator-core/tests/golden/blob_v1.bin");

    #[test]
    fn record_line_names_the_nonce_inputs_and_the_tag() -> Result<()> {
        let h = peek_header(BLOB)?;
        let line = record_line("done", "k/1", BLOB);
        let fields: Vec<&str> = line.trim_end().split(' ').collect();
        let tag = hex(BLOB.get(BLOB.len() - TAG_LEN..).unwrap_or(&[]));
        assert_eq!(fields.len(), 10, "{line}");
        assert_eq!(fields[..3], ["done", "k/1", "blob"]);
        assert_eq!(fields[3], hex(&h.key_id));
        assert_eq!(fields[4], h.disk_id.to_string());
        assert_eq!(
            fields[5..8],
            [h.cycle, h.attempt, u64::from(h.seq)].map(|n| n.to_string())
        );
        assert_eq!(fields[8], hex(&h.salt));
        assert_eq!(fields[9], tag);
        assert!(line.ends_with('\n'));
        Ok(())
    }

    #[test]
    fn the_stop_hook_spec_parses_and_bad_ones_say_why() {
        assert_eq!(
            StopAfter::parse("put:3:/tmp/m"),
            Ok(StopAfter {
                op: OpKind::Put,
                count: 3,
                marker: PathBuf::from("/tmp/m")
            })
        );
        assert!(StopAfter::parse("list:3:/m").is_err_and(|e| e.contains("list")));
        assert!(StopAfter::parse("get:0:/m").is_err_and(|e| e.contains("count")));
        assert!(StopAfter::parse("get:2").is_err_and(|e| e.contains("marker")));
    }

    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // polls a marker another task creates, in real time
    async fn the_stop_hook_marks_the_nth_put_and_then_stops() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let marker = dir.path().join("stopped");
        let store = Arc::new(replicator_sink::LocalDirSink::create(
            dir.path().join("cache"),
        )?);
        let sink = Arc::new(StopAfterSink::new(
            store,
            StopAfter::parse(&format!("put:2:{}", marker.display())).map_err(anyhow::Error::msg)?,
        ));
        sink.put("a/1", Bytes::from_static(b"x"), PutMode::Create)
            .await?;
        assert!(!marker.exists());
        let s = Arc::clone(&sink);
        let second = tokio::spawn(async move {
            s.put("a/2", Bytes::from_static(b"y"), PutMode::Create)
                .await
        });
        for _ in 0..500 {
            if marker.exists() {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert!(marker.exists(), "the marker appears at the 2nd put");
        assert!(!second.is_finished(), "the 2nd put never returns");
        second.abort();
        // The 2nd put reached the backend before the stop; nothing after it does.
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(50), sink.get("a/2")).await;
        assert!(third.is_err(), "operations after the stop wait forever");
        Ok(())
    }

    #[test]
    fn an_object_without_a_header_is_recorded_as_unparsed() {
        let line = record_line("begin", "k/2", b"not an object");
        assert!(line.starts_with("unparsed k/2 "), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[tokio::test]
    async fn puts_are_recorded_before_and_after_and_failed_puts_only_before() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let record = dir.path().join("puts");
        let store = Arc::new(replicator_sink::LocalDirSink::create(
            dir.path().join("cache"),
        )?);
        let sink = RecordPutsSink::open(store, &record)?;
        let data = Bytes::from_static(BLOB);
        sink.put("a/b", data.clone(), PutMode::Create).await?;
        assert!(sink.put("a/b", data, PutMode::Create).await.is_err());
        let text = std::fs::read_to_string(&record)?;
        let phases: Vec<&str> = text
            .lines()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(phases, ["begin", "done", "begin"]);
        Ok(())
    }
}
