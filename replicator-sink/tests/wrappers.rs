//! The sink wrappers: each against the conformance suite, alone and nested, and each doing what
//! it promises. Every wait runs on a `SimClock`, so the run takes no real time.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use replicator_sink::clock::{Clock, SimClock, Timestamp};
use replicator_sink::conformance::{self, Capabilities};
use replicator_sink::wrap::metrics::LATENCY_BUCKETS;
use replicator_sink::wrap::shard::{fnv1a64, home_shard};
use replicator_sink::wrap::{
    Fault, FaultRule, FaultSink, MetricsSink, OpKind, RetryBudgetPolicy, RetryPolicy, RetrySink,
    ShardSink, ThrottleConfig, ThrottleSink, Trigger, UtcOffset,
};
use replicator_sink::{
    LocalDirSink, ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind, validate_key,
};

/// 2024-01-15 00:00:00 UTC.
const DAY_START_UNIX_S: u64 = 1_705_276_800;

/// `h:m:s` on the test day, UTC.
fn at(h: u64, m: u64, s: u64) -> Timestamp {
    Timestamp(Duration::from_secs(
        DAY_START_UNIX_S + h * 3600 + m * 60 + s,
    ))
}

fn clock_at(t: Timestamp) -> (SimClock, Arc<dyn Clock>) {
    let clock = SimClock::new(t);
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    (clock, shared)
}

/// A scratch directory, in memory where the machine has one: the conformance suite fsyncs
/// thousands of small files, which tmpfs makes free.
fn scratch() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    Ok(if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    })
}

fn local(dir: &Path, name: &str) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(Arc::new(LocalDirSink::create(dir.join(name))?))
}

fn data(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// A large payload whose bytes do not matter (cheap to make, even unoptimized).
fn filler(len: usize) -> Bytes {
    Bytes::from(vec![0u8; len])
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An in-memory sink whose operations complete without yielding, so that the interleaving of
/// concurrent callers depends on the wrappers alone.
#[derive(Debug, Default)]
struct MemSink {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

#[async_trait]
impl Sink for MemSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        let mut objects = lock(&self.objects);
        if mode == PutMode::Create && objects.contains_key(key) {
            return Err(SinkError::new(SinkErrorKind::AlreadyExists, "put", key, ""));
        }
        objects.insert(key.to_owned(), data);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| SinkError::new(SinkErrorKind::NotFound, "get", key, ""))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        Ok(lock(&self.objects)
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size_bytes: v.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    fn describe(&self) -> String {
        "mem".into()
    }
}

fn generous_budget() -> RetryBudgetPolicy {
    RetryBudgetPolicy {
        retry_ratio: 0.5,
        tokens_max: 1000,
        tokens_initial: 100,
    }
}

// ---------------------------------------------------------------------------------------------
// Conformance
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retry_sink_passes_conformance() -> anyhow::Result<()> {
    let dir = scratch()?;
    let (_, clock) = clock_at(at(0, 0, 0));
    let sink = RetrySink::new(local(dir.path(), "s")?, clock, RetryPolicy::default())?;
    conformance::check_all(&sink, Capabilities::default()).await?;
    Ok(())
}

#[tokio::test]
async fn throttle_sink_passes_conformance() -> anyhow::Result<()> {
    let dir = scratch()?;
    let (sim, clock) = clock_at(at(12, 0, 0));
    let config = ThrottleConfig::parse("08:00-20:00=100Mbit/s,*=unlimited")?;
    let sink = ThrottleSink::new(local(dir.path(), "s")?, clock, config)?;
    conformance::check_all(&sink, Capabilities::default()).await?;
    // The payloads went through the limit: simulated time passed.
    assert!(sim.now().since(at(12, 0, 0)) > Duration::from_millis(100));
    Ok(())
}

#[tokio::test]
async fn shard_sink_passes_conformance_with_three_shards() -> anyhow::Result<()> {
    let dir = scratch()?;
    let shards = vec![
        local(dir.path(), "a")?,
        local(dir.path(), "b")?,
        local(dir.path(), "c")?,
    ];
    let sink = ShardSink::new(shards.clone())?;
    conformance::check_all(&sink, Capabilities::default()).await?;
    // Every shard took a share of the listing check's 1200 objects.
    for shard in &shards {
        let held = shard.list("ls/").await?.len();
        assert!((300..=500).contains(&held), "{}: {held}", shard.describe());
    }
    Ok(())
}

#[tokio::test]
async fn fault_sink_with_only_delays_passes_conformance() -> anyhow::Result<()> {
    let dir = scratch()?;
    let (_, clock) = clock_at(at(0, 0, 0));
    let sink = FaultSink::new(local(dir.path(), "s")?, clock, 1);
    for op in [OpKind::Put, OpKind::Get, OpKind::List, OpKind::Delete] {
        let delay = Fault::Delay(Duration::from_millis(20));
        sink.add_rule(FaultRule::new(op, delay, Trigger::Probability(0.5)))?;
    }
    conformance::check_all(&sink, Capabilities::default()).await?;
    assert!(sink.counts().delays > 100, "{}", sink.counts());
    Ok(())
}

#[tokio::test]
async fn metrics_sink_passes_conformance() -> anyhow::Result<()> {
    let dir = scratch()?;
    let (_, clock) = clock_at(at(0, 0, 0));
    let sink = MetricsSink::new(local(dir.path(), "s")?, clock);
    conformance::check_all(&sink, Capabilities::default()).await?;
    let m = sink.snapshot();
    assert!(m.put.ok > 1200, "{m}");
    assert_eq!(m.put.errors.invalid_key, 5, "{m}");
    Ok(())
}

/// metrics(retry(throttle(shard([faults(local) x 3])))), with transient faults and lost
/// acknowledgements under every shard: the stack as a whole still keeps the contract.
#[tokio::test]
async fn nested_wrappers_pass_conformance_over_faulty_shards() -> anyhow::Result<()> {
    let dir = scratch()?;
    let (_, clock) = clock_at(at(9, 0, 0));
    let mut faults = Vec::new();
    let mut shards: Vec<Arc<dyn Sink>> = Vec::new();
    for i in 0..3u64 {
        let f = Arc::new(FaultSink::new(
            local(dir.path(), &format!("shard-{i}"))?,
            Arc::clone(&clock),
            100 + i,
        ));
        for op in [OpKind::Put, OpKind::Get, OpKind::List, OpKind::Delete] {
            f.add_rule(FaultRule::new(
                op,
                Fault::Transient,
                Trigger::Probability(0.02),
            ))?;
        }
        f.add_rule(FaultRule::new(
            OpKind::Put,
            Fault::LostAck,
            Trigger::Probability(0.02),
        ))?;
        f.add_rule(FaultRule::new(
            OpKind::Get,
            Fault::Delay(Duration::from_millis(40)),
            Trigger::Probability(0.2),
        ))?;
        faults.push(Arc::clone(&f));
        shards.push(f);
    }
    let shard = Arc::new(ShardSink::new(shards)?);
    let throttle = Arc::new(ThrottleSink::new(
        shard,
        Arc::clone(&clock),
        ThrottleConfig::parse("08:00-20:00=100Mbit/s,*=unlimited")?,
    )?);
    let policy = RetryPolicy {
        attempts_max: 8,
        jitter_seed: 7,
        budget: generous_budget(),
        ..RetryPolicy::default()
    };
    let retry = Arc::new(RetrySink::new(throttle, Arc::clone(&clock), policy)?);
    let metrics = MetricsSink::new(Arc::clone(&retry) as Arc<dyn Sink>, clock);
    assert!(
        metrics
            .describe()
            .starts_with("metrics(retry(throttle(shard[faults(file://"),
        "{}",
        metrics.describe()
    );

    conformance::check_all(&metrics, Capabilities::default()).await?;

    let injected: u64 = faults.iter().map(|f| f.counts().failures()).sum();
    let lost_acks: u64 = faults.iter().map(|f| f.counts().lost_acks).sum();
    assert!(injected > 20 && lost_acks > 5, "injected {injected}");
    // Each lost acknowledgement failed one put to one shard, which the retry sink retried
    // (other faults can coincide in one fan-out operation, so they are not counted exactly).
    assert!(retry.stats().retries >= lost_acks, "{}", retry.stats());
    let m = metrics.snapshot();
    assert_eq!(m.put.errors.transient + m.get.errors.transient, 0, "{m}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Retry
// ---------------------------------------------------------------------------------------------

/// local -> faults -> metrics (to count the attempts that reach the store) -> retry.
struct RetryStack {
    _dir: tempfile::TempDir,
    sim: SimClock,
    local: Arc<dyn Sink>,
    faults: Arc<FaultSink>,
    attempts: Arc<MetricsSink>,
    retry: RetrySink,
}

fn retry_stack(policy: RetryPolicy) -> anyhow::Result<RetryStack> {
    let dir = scratch()?;
    let (sim, clock) = clock_at(at(0, 0, 0));
    let local = local(dir.path(), "s")?;
    let faults = Arc::new(FaultSink::new(Arc::clone(&local), Arc::clone(&clock), 9));
    let attempts = Arc::new(MetricsSink::new(
        Arc::clone(&faults) as Arc<dyn Sink>,
        Arc::clone(&clock),
    ));
    let retry = RetrySink::new(Arc::clone(&attempts) as Arc<dyn Sink>, clock, policy)?;
    Ok(RetryStack {
        _dir: dir,
        sim,
        local,
        faults,
        attempts,
        retry,
    })
}

#[tokio::test]
async fn transient_faults_are_retried_until_they_succeed() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy::default())?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Put,
        Fault::Transient,
        Trigger::times(3),
    ))?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Transient,
        Trigger::times(2),
    ))?;
    let payload = data(1000, 1);
    s.retry
        .put("a/b", payload.clone(), PutMode::Overwrite)
        .await?;
    assert_eq!(s.retry.get("a/b").await?, payload);

    assert_eq!(s.faults.counts().transient, 5);
    assert_eq!(s.attempts.snapshot().put.operations(), 4);
    assert_eq!(s.attempts.snapshot().get.operations(), 3);
    let stats = s.retry.stats();
    assert_eq!((stats.operations, stats.retries, stats.gave_up), (2, 5, 0));
    // The backoffs were waited on the clock, each at least half of 200, 400, 800 ms.
    let waited = s.sim.now().since(at(0, 0, 0));
    assert_eq!(waited, stats.backoff_total);
    assert!(
        waited >= Duration::from_millis(100 + 200 + 400 + 100 + 200),
        "{waited:?}"
    );
    Ok(())
}

#[tokio::test]
async fn permanent_faults_and_definite_answers_are_not_retried() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy::default())?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Put,
        Fault::Permanent,
        Trigger::once(),
    ))?;
    let err = s
        .retry
        .put("p/q", data(10, 0), PutMode::Overwrite)
        .await
        .err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::Permanent));

    let not_found = s.retry.get("p/missing").await.err();
    assert_eq!(not_found.map(|e| e.kind()), Some(SinkErrorKind::NotFound));

    s.retry.put("p/r", data(10, 0), PutMode::Create).await?;
    let exists = s.retry.put("p/r", data(10, 1), PutMode::Create).await.err();
    assert_eq!(exists.map(|e| e.kind()), Some(SinkErrorKind::AlreadyExists));

    let invalid = s.retry.put("P/R", data(1, 0), PutMode::Create).await.err();
    assert_eq!(invalid.map(|e| e.kind()), Some(SinkErrorKind::InvalidKey));

    assert_eq!(s.retry.stats().retries, 0);
    let reached = s.attempts.snapshot();
    assert_eq!((reached.put.operations(), reached.get.operations()), (3, 1));
    assert_eq!(s.sim.now(), at(0, 0, 0), "nothing waited");
    Ok(())
}

#[tokio::test]
async fn retries_give_up_after_attempts_max_and_say_so() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy {
        attempts_max: 3,
        ..RetryPolicy::default()
    })?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Delete,
        Fault::Transient,
        Trigger::always(),
    ))?;
    let err = s
        .retry
        .delete("gone/soon")
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("delete succeeded through an always-failing store"))?;
    assert!(err.is_transient());
    assert!(
        err.to_string().contains("gave up after 3 attempts"),
        "{err}"
    );
    assert_eq!(err.key(), "gone/soon");
    assert_eq!(s.attempts.snapshot().delete.operations(), 3);
    assert_eq!(s.retry.stats().gave_up, 1);
    Ok(())
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy {
        attempts_max: 5,
        budget: RetryBudgetPolicy {
            retry_ratio: 0.1,
            tokens_max: 10,
            tokens_initial: 2,
        },
        ..RetryPolicy::default()
    })?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Put,
        Fault::Transient,
        Trigger::always(),
    ))?;
    let mut refused = 0;
    for i in 0..100 {
        let err = s
            .retry
            .put(&format!("storm/{i}"), data(10, 0), PutMode::Overwrite)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("put {i} succeeded through a failing store"))?;
        assert!(err.is_transient(), "{err}");
        if err.to_string().contains("retry budget is exhausted") {
            refused += 1;
        }
    }
    // Without the budget, 100 operations would make 500 attempts. With it, retries are the 2
    // initial tokens plus 0.1 per operation.
    let stats = s.retry.stats();
    assert!(stats.retries <= 2 + 10, "{stats}");
    assert_eq!(s.attempts.snapshot().put.operations(), 100 + stats.retries);
    assert!(refused >= 85, "{refused} refused; {stats}");
    assert_eq!(stats.budget_refusals, refused);

    // Once the store recovers, operations go through again.
    s.faults.clear_rules();
    s.retry
        .put("storm/over", data(10, 0), PutMode::Overwrite)
        .await?;
    Ok(())
}

#[tokio::test]
async fn days_of_backoff_run_instantly_on_a_sim_clock() -> anyhow::Result<()> {
    #[allow(clippy::disallowed_methods)] // measures that no real time passes
    let real_start = std::time::Instant::now();
    let s = retry_stack(RetryPolicy {
        attempts_max: 30,
        delay_first: Duration::from_secs(60),
        delay_max: Duration::from_secs(6 * 3600),
        multiplier: 2.0,
        jitter_seed: 3,
        budget: generous_budget(),
    })?;
    s.retry
        .put("long/outage", data(100, 2), PutMode::Overwrite)
        .await?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Transient,
        Trigger::times(20),
    ))?;
    assert_eq!(s.retry.get("long/outage").await?, data(100, 2));
    // 1, 2, 4 ... 256 minutes, then 11 times the 6-hour cap: 74.5 hours before jitter, at
    // least half of it after.
    let waited = s.sim.now().since(at(0, 0, 0));
    assert!(waited > Duration::from_secs(36 * 3600), "{waited:?}");
    assert!(waited <= Duration::from_secs(75 * 3600), "{waited:?}");
    assert!(real_start.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[tokio::test]
async fn jitter_is_deterministic_from_the_seed() -> anyhow::Result<()> {
    async fn waited_with(seed: u64) -> anyhow::Result<Duration> {
        let s = retry_stack(RetryPolicy {
            jitter_seed: seed,
            ..RetryPolicy::default()
        })?;
        s.faults.add_rule(FaultRule::new(
            OpKind::List,
            Fault::Transient,
            Trigger::times(5),
        ))?;
        s.retry.list("").await?;
        Ok(s.sim.now().since(at(0, 0, 0)))
    }
    assert_eq!(waited_with(1).await?, waited_with(1).await?);
    assert_ne!(waited_with(1).await?, waited_with(2).await?);
    Ok(())
}

#[tokio::test]
async fn a_create_whose_acknowledgement_was_lost_succeeds_on_retry() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy::default())?;
    s.faults
        .add_rule(FaultRule::new(OpKind::Put, Fault::LostAck, Trigger::once()))?;
    let manifest = data(3000, 5);
    s.retry
        .put("m/00000001", manifest.clone(), PutMode::Create)
        .await?;
    assert_eq!(s.faults.counts().lost_acks, 1);
    assert_eq!(s.retry.stats().ambiguous_creates, 1);
    assert_eq!(s.local.get("m/00000001").await?, manifest);
    // A create by someone else is still refused.
    let other = s
        .retry
        .put("m/00000001", data(3000, 6), PutMode::Create)
        .await
        .err();
    assert_eq!(other.map(|e| e.kind()), Some(SinkErrorKind::AlreadyExists));
    Ok(())
}

#[tokio::test]
async fn a_create_after_a_torn_attempt_is_already_exists_not_success() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy::default())?;
    s.faults
        .add_rule(FaultRule::new(OpKind::Put, Fault::TornPut, Trigger::once()))?;
    let manifest = data(3000, 5);
    let err = s
        .retry
        .put("m/00000002", manifest.clone(), PutMode::Create)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a create over a torn object succeeded"))?;
    assert_eq!(err.kind(), SinkErrorKind::AlreadyExists, "{err}");
    assert!(
        err.to_string().contains("is not the one being put"),
        "{err}"
    );
    // What is stored is the torn prefix, which the core's authentication rejects.
    let stored = s.local.get("m/00000002").await?;
    assert!(stored.len() < manifest.len());
    assert_eq!(stored, manifest.slice(..stored.len()));
    Ok(())
}

#[tokio::test]
async fn an_ambiguous_create_that_cannot_be_read_back_stays_transient() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy::default())?;
    s.faults
        .add_rule(FaultRule::new(OpKind::Put, Fault::LostAck, Trigger::once()))?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Permanent,
        Trigger::once(),
    ))?;
    let err = s
        .retry
        .put("m/00000003", data(10, 1), PutMode::Create)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("an unverifiable create succeeded"))?;
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("ambiguous create"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throttle
// ---------------------------------------------------------------------------------------------

fn throttle_at(spec: &str, t: Timestamp) -> anyhow::Result<(SimClock, ThrottleSink)> {
    let (sim, clock) = clock_at(t);
    let config = ThrottleConfig::parse(spec)?;
    Ok((
        sim,
        ThrottleSink::new(Arc::new(MemSink::default()), clock, config)?,
    ))
}

/// The simulated time one put of `len` bytes takes, starting at `t`.
async fn put_takes(spec: &str, t: Timestamp, len: usize) -> anyhow::Result<Duration> {
    let (sim, sink) = throttle_at(spec, t)?;
    sink.put("t/obj", filler(len), PutMode::Overwrite).await?;
    Ok(sim.now().since(t))
}

fn assert_near(got: Duration, want: Duration, within: Duration) {
    let diff = got.abs_diff(want);
    assert!(
        diff <= within,
        "took {got:?}, expected {want:?} ± {within:?}"
    );
}

#[tokio::test]
async fn hundred_megabit_moves_12_5_megabytes_in_one_simulated_second() -> anyhow::Result<()> {
    let t = at(12, 0, 0);
    let took = put_takes("100Mbit/s", t, 12_500_000).await?;
    assert_near(took, Duration::from_secs(1), Duration::from_micros(1));

    // Gets are charged too, once their payload arrives.
    let (sim, sink) = throttle_at("100Mbit/s", t)?;
    sink.inner()
        .put("t/big", filler(12_500_000), PutMode::Overwrite)
        .await?;
    assert_eq!(sink.get("t/big").await?.len(), 12_500_000);
    assert_near(
        sim.now().since(t),
        Duration::from_secs(1),
        Duration::from_micros(1),
    );
    // Metadata is not.
    sink.list("t/").await?;
    sink.delete("t/big").await?;
    assert_near(
        sim.now().since(t),
        Duration::from_secs(1),
        Duration::from_micros(1),
    );
    Ok(())
}

#[tokio::test]
async fn the_schedule_switches_to_unlimited_at_20_00() -> anyhow::Result<()> {
    let spec = "08:00-20:00=100Mbit/s,*=unlimited";
    let office = put_takes(spec, at(14, 0, 0), 12_500_000).await?;
    assert_near(office, Duration::from_secs(1), Duration::from_micros(1));
    let night = put_takes(spec, at(21, 0, 0), 12_500_000).await?;
    assert_eq!(night, Duration::ZERO);
    let early = put_takes(spec, at(7, 59, 0), 12_500_000).await?;
    assert_eq!(early, Duration::ZERO);
    // A transfer half a second before 20:00 is slow until 20:00, then free. A chunk in
    // flight at 20:00 finishes at the old rate.
    let crossing = put_takes(
        spec,
        at(19, 59, 59).plus(Duration::from_millis(500)),
        25_000_000,
    )
    .await?;
    let chunk = Duration::from_secs_f64(ThrottleConfig::CHUNK_BYTES_DEFAULT as f64 / 12.5e6);
    assert!(crossing >= Duration::from_millis(500), "{crossing:?}");
    assert!(
        crossing <= Duration::from_millis(500) + chunk,
        "{crossing:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_utc_offset_shifts_the_schedule() -> anyhow::Result<()> {
    let schedule = "08:00-20:00=100Mbit/s,*=unlimited";
    for (offset, utc_time, slow) in [
        ("+02:00", at(19, 0, 0), false), // 21:00 local
        ("+02:00", at(7, 0, 0), true),   // 09:00 local
        ("-05:00", at(2, 0, 0), false),  // 21:00 local, the day before
        ("-05:00", at(14, 0, 0), true),  // 09:00 local
    ] {
        let (sim, clock) = clock_at(utc_time);
        let config = ThrottleConfig::parse(schedule)?.with_utc_offset(UtcOffset::parse(offset)?);
        let sink = ThrottleSink::new(Arc::new(MemSink::default()), clock, config)?;
        sink.put("t/obj", filler(12_500_000), PutMode::Overwrite)
            .await?;
        let took = sim.now().since(utc_time);
        let want = if slow {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        assert_near(took, want, Duration::from_micros(1));
    }
    Ok(())
}

#[tokio::test]
async fn two_concurrent_users_get_equal_shares() -> anyhow::Result<()> {
    let t = at(12, 0, 0);
    let (sim, sink) = throttle_at("10MB/s", t)?;
    let user = |name: &'static str| {
        let sink = &sink;
        let sim = &sim;
        async move {
            sink.put(name, filler(20_000_000), PutMode::Overwrite)
                .await
                .map(|()| sim.now().since(t))
        }
    };
    let (a, b) = tokio::join!(user("users/a"), user("users/b"));
    let (a, b) = (a?, b?);
    // Alone, each would take 2 s; sharing the link, both take about 4 s.
    assert_near(a, Duration::from_secs(4), Duration::from_millis(100));
    assert_near(b, Duration::from_secs(4), Duration::from_millis(100));
    Ok(())
}

#[tokio::test]
async fn a_big_put_does_not_starve_small_ones() -> anyhow::Result<()> {
    let t = at(12, 0, 0);
    let (sim, sink) = throttle_at("10MB/s", t)?;
    let big = async {
        sink.put("big/one", filler(100_000_000), PutMode::Overwrite)
            .await
            .map(|()| sim.now().since(t))
    };
    let small = async {
        for i in 0..10 {
            sink.put(&format!("small/{i}"), filler(1_000_000), PutMode::Overwrite)
                .await?;
        }
        Ok::<_, SinkError>(sim.now().since(t))
    };
    let (big, small) = tokio::join!(big, small);
    // The small puts' 10 MB took half the link: 2 s, not the 11 s of waiting behind the big one.
    assert_near(small?, Duration::from_secs(2), Duration::from_millis(100));
    assert_near(big?, Duration::from_secs(11), Duration::from_millis(100));
    Ok(())
}

#[test]
fn a_bad_schedule_gives_a_clear_error() {
    let err = ThrottleConfig::parse("08:00-20:00=100Mbit/s,*=fast").err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some(
            "invalid throttle schedule `08:00-20:00=100Mbit/s,*=fast`: at column 25, expected \
             a rate: `unlimited` or a number and a unit, like `100Mbit/s` or `12.5MB/s`, found \
             `fast`"
        )
    );
    let err = ThrottleConfig::parse("8:00-20:00=100Mbit/s").err();
    assert_eq!(
        err.map(|e| (e.column, e.found)),
        Some((1, "8:00".to_owned()))
    );
}

// ---------------------------------------------------------------------------------------------
// Shard
// ---------------------------------------------------------------------------------------------

const DISK: &str = "0123456789abcdef0123456789abcdef";

/// Keys, their FNV-1a 64 hash, and their home shard among 2, 3, 5 and 8. Computed once by an
/// independent implementation of the documented mapping; if this test fails, the mapping
/// changed and objects already stored would be looked for in the wrong shard.
const GOLDEN: &[(&str, u64, [usize; 4])] = &[
    ("a", 0xaf63dc4c8601ec8c, [1, 2, 2, 2]),
    ("rt/big", 0xc981489f2f2548a2, [1, 1, 4, 7]),
    (
        "disks/0123456789abcdef0123456789abcdef/blobs/00000000000000000007/00000000000000000001/0000000000",
        0xbddd132e0eaf4b24,
        [0, 0, 0, 6],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/blobs/00000000000000000007/00000000000000000001/0000000001",
        0xbddd142e0eaf4cd7,
        [0, 2, 4, 5],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/blobs/00000000000000000007/00000000000000000001/0000000002",
        0xbddd152e0eaf4e8a,
        [1, 2, 4, 4],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/blobs/00000000000000000007/00000000000000000001/0000000003",
        0xbddd162e0eaf503d,
        [1, 2, 2, 7],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/blobs/00000000000000000007/00000000000000000001/0000000005",
        0xbddd102e0eaf460b,
        [1, 1, 4, 5],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/manifests/00000000000000000001",
        0x33a37e0b662ab513,
        [1, 1, 1, 1],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/manifests/00000000000000000003",
        0x33a3800b662ab879,
        [0, 0, 0, 7],
    ),
    (
        "disks/0123456789abcdef0123456789abcdef/acks/00000000000000000003",
        0xf6a0c7222f15b9c3,
        [1, 1, 1, 1],
    ),
];

#[tokio::test]
async fn keys_land_in_their_golden_home_shards() -> anyhow::Result<()> {
    for &(key, hash, homes) in GOLDEN {
        assert_eq!(fnv1a64(key), hash, "{key}");
        for (shards, home) in [2, 3, 5, 8].into_iter().zip(homes) {
            assert_eq!(home_shard(key, shards), home, "{key} among {shards}");
        }
    }
    // And the sink puts them there.
    let dir = scratch()?;
    let stores = vec![
        local(dir.path(), "a")?,
        local(dir.path(), "b")?,
        local(dir.path(), "c")?,
    ];
    let sink = ShardSink::new(stores.clone())?;
    for &(key, _, homes) in GOLDEN {
        sink.put(key, data(10, 0), PutMode::Create).await?;
        for (i, store) in stores.iter().enumerate() {
            let held = store.get(key).await.is_ok();
            assert_eq!(held, i == homes[1], "{key} in shard {i}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn keys_spread_evenly_over_shards() -> anyhow::Result<()> {
    let stores: Vec<Arc<MemSink>> = (0..4).map(|_| Arc::new(MemSink::default())).collect();
    let sink = ShardSink::new(
        stores
            .iter()
            .map(|s| Arc::clone(s) as Arc<dyn Sink>)
            .collect(),
    )?;
    for i in 0..1000u64 {
        let key = format!(
            "disks/{DISK}/blobs/{:020}/{:020}/{:010}",
            i / 100,
            1,
            i % 100
        );
        sink.put(&key, data(1, 0), PutMode::Overwrite).await?;
    }
    let counts: Vec<usize> = futures::future::join_all(stores.iter().map(|s| s.list("")))
        .await
        .into_iter()
        .map(|l| l.map(|l| l.len()))
        .collect::<Result<_, _>>()?;
    assert_eq!(counts.iter().sum::<usize>(), 1000);
    for held in &counts {
        assert!(
            (200..=300).contains(held),
            "uneven spread over 4 shards: {counts:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_object_put_with_two_shards_is_found_after_reconfiguring_to_three() -> anyhow::Result<()>
{
    let dir = scratch()?;
    let (a, b, c) = (
        local(dir.path(), "a")?,
        local(dir.path(), "b")?,
        local(dir.path(), "c")?,
    );
    let keys: Vec<String> = (0..60)
        .map(|i| format!("disks/{DISK}/blobs/{i:010}"))
        .collect();
    let two = ShardSink::new(vec![Arc::clone(&a), Arc::clone(&b)])?;
    for (i, key) in keys.iter().enumerate() {
        two.put(key, data(i + 1, 3), PutMode::Create).await?;
    }

    let three = ShardSink::new(vec![a, b, Arc::clone(&c)])?;
    let moved: Vec<&String> = keys.iter().filter(|k| three.home_of(k) == 2).collect();
    assert!(
        moved.len() >= 10,
        "only {} keys moved to the new shard",
        moved.len()
    );
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(three.get(key).await?, data(i + 1, 3), "{key}");
    }
    let listed = three.list("disks/").await?;
    let listed_keys: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
    let mut sorted: Vec<&str> = keys.iter().map(String::as_str).collect();
    sorted.sort();
    assert_eq!(listed_keys, sorted);

    // A create of a key that lives in its old shard is refused, not duplicated.
    let moved_key = moved[0].as_str();
    let err = three
        .put(moved_key, data(5, 9), PutMode::Create)
        .await
        .err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::AlreadyExists));
    assert!(c.get(moved_key).await.is_err());

    // An overwrite goes to the new home; gets and lists see it there, listing it once.
    three.put(moved_key, data(5, 9), PutMode::Overwrite).await?;
    assert_eq!(three.get(moved_key).await?, data(5, 9));
    assert_eq!(c.get(moved_key).await?, data(5, 9));
    let listed = three.list(moved_key).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size_bytes, 5, "the home shard's copy is listed");

    // Delete removes every copy.
    three.delete(moved_key).await?;
    for shard in three.shards() {
        assert!(shard.get(moved_key).await.is_err(), "{}", shard.describe());
    }
    let err = three.get(moved_key).await.err();
    assert_eq!(
        err.as_ref().map(|e| (e.kind(), e.key())),
        Some((SinkErrorKind::NotFound, moved_key))
    );
    Ok(())
}

#[tokio::test]
async fn a_get_does_not_answer_not_found_while_a_shard_is_failing() -> anyhow::Result<()> {
    let dir = scratch()?;
    let (_, clock) = clock_at(at(0, 0, 0));
    let a = local(dir.path(), "a")?;
    let b = Arc::new(FaultSink::new(local(dir.path(), "b")?, clock, 1));
    let sink = ShardSink::new(vec![a, Arc::clone(&b) as Arc<dyn Sink>])?;
    let key = GOLDEN[2].0; // home shard 0 of 2
    assert_eq!(sink.home_of(key), 0);
    b.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Transient,
        Trigger::once(),
    ))?;
    let err = sink.get(key).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::Transient));
    let err = sink.get(key).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::NotFound));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

fn fault_sink(
    seed: u64,
) -> anyhow::Result<(tempfile::TempDir, SimClock, Arc<dyn Sink>, FaultSink)> {
    let dir = scratch()?;
    let (sim, clock) = clock_at(at(0, 0, 0));
    let store = local(dir.path(), "s")?;
    let faults = FaultSink::new(Arc::clone(&store), clock, seed);
    Ok((dir, sim, store, faults))
}

#[tokio::test]
async fn injected_errors_fail_without_reaching_the_store() -> anyhow::Result<()> {
    let (_dir, _, store, faults) = fault_sink(1)?;
    faults.add_rule(
        FaultRule::new(OpKind::Put, Fault::Transient, Trigger::once()).on_keys_containing("x"),
    )?;
    faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Permanent,
        Trigger::once(),
    ))?;
    let err = faults.put("a/x", data(4, 0), PutMode::Create).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::Transient));
    assert!(
        store.get("a/x").await.is_err(),
        "the failed put reached the store"
    );
    faults.put("a/x", data(4, 0), PutMode::Create).await?;
    let err = faults.get("a/x").await.err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::Permanent));
    assert_eq!(faults.get("a/x").await?, data(4, 0));
    let counts = faults.counts();
    assert_eq!(
        (counts.transient, counts.permanent, counts.failures()),
        (1, 1, 2)
    );
    Ok(())
}

#[tokio::test]
async fn delays_wait_on_the_injected_clock() -> anyhow::Result<()> {
    let (_dir, sim, _, faults) = fault_sink(1)?;
    faults.add_rule(FaultRule::new(
        OpKind::List,
        Fault::Delay(Duration::from_secs(3)),
        Trigger::always(),
    ))?;
    faults.add_rule(FaultRule::new(
        OpKind::List,
        Fault::Transient,
        Trigger::once(),
    ))?;
    // Both rules fire: the delay, then the error.
    assert!(faults.list("").await.is_err());
    assert_eq!(sim.now(), at(0, 0, 3));
    faults.list("").await?;
    assert_eq!(sim.now(), at(0, 0, 6));
    let counts = faults.counts();
    assert_eq!(
        (counts.delays, counts.delay_total),
        (2, Duration::from_secs(6))
    );
    assert_eq!(counts.transient, 1);
    Ok(())
}

#[tokio::test]
async fn a_torn_upload_leaves_a_truncated_object() -> anyhow::Result<()> {
    let (_dir, _, store, faults) = fault_sink(4)?;
    faults.add_rule(FaultRule::new(OpKind::Put, Fault::TornPut, Trigger::once()))?;
    let blob = data(4096, 7);
    let err = faults
        .put("b/0001", blob.clone(), PutMode::Overwrite)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a torn put reported success"))?;
    assert!(err.is_transient());
    assert!(err.to_string().contains("torn upload"), "{err}");
    let stored = store.get("b/0001").await?;
    assert!(stored.len() < blob.len());
    assert_eq!(stored, blob.slice(..stored.len()));
    assert_eq!(faults.counts().torn_puts, 1);
    Ok(())
}

#[tokio::test]
async fn a_lost_acknowledgement_stores_the_object_but_reports_failure() -> anyhow::Result<()> {
    let (_dir, _, store, faults) = fault_sink(1)?;
    faults.add_rule(FaultRule::new(OpKind::Put, Fault::LostAck, Trigger::once()))?;
    let err = faults
        .put("b/0002", data(100, 1), PutMode::Create)
        .await
        .err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::Transient));
    assert_eq!(store.get("b/0002").await?, data(100, 1));
    assert_eq!(faults.counts().lost_acks, 1);
    Ok(())
}

#[tokio::test]
async fn a_corrupted_read_flips_exactly_one_bit() -> anyhow::Result<()> {
    let (_dir, _, _, faults) = fault_sink(1)?;
    faults.put("b/0003", data(1000, 2), PutMode::Create).await?;
    faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::CorruptRead,
        Trigger::once(),
    ))?;
    let bad = faults.get("b/0003").await?;
    let flipped: u32 = bad
        .iter()
        .zip(data(1000, 2).iter())
        .map(|(x, y)| (x ^ y).count_ones())
        .sum();
    assert_eq!((bad.len(), flipped), (1000, 1));
    assert_eq!(faults.get("b/0003").await?, data(1000, 2));
    assert_eq!(faults.counts().corrupt_reads, 1);
    Ok(())
}

#[tokio::test]
async fn rules_match_by_operation_key_and_countdown() -> anyhow::Result<()> {
    let (_dir, _, _, faults) = fault_sink(1)?;
    faults.add_rule(
        FaultRule::new(
            OpKind::Put,
            Fault::Transient,
            Trigger::Countdown { skip: 2, times: 2 },
        )
        .on_keys_containing("blob"),
    )?;
    let mut outcomes = Vec::new();
    for i in 0..6 {
        faults
            .put(&format!("manifest/{i}"), data(1, 0), PutMode::Overwrite)
            .await?;
        faults.get(&format!("manifest/{i}")).await?;
        let put = faults
            .put(&format!("blob/{i}"), data(1, 0), PutMode::Overwrite)
            .await;
        outcomes.push(put.is_ok());
    }
    assert_eq!(outcomes, [true, true, false, false, true, true]);
    assert_eq!(faults.counts().transient, 2);
    Ok(())
}

#[tokio::test]
async fn probabilistic_faults_are_deterministic_from_the_seed() -> anyhow::Result<()> {
    async fn pattern(seed: u64) -> anyhow::Result<(Vec<bool>, Vec<u8>)> {
        let (_dir, _, _, faults) = fault_sink(seed)?;
        faults.put("p/obj", data(64, 0), PutMode::Create).await?;
        faults.add_rule(FaultRule::new(
            OpKind::Get,
            Fault::Transient,
            Trigger::Probability(0.3),
        ))?;
        faults.add_rule(FaultRule::new(
            OpKind::Get,
            Fault::CorruptRead,
            Trigger::Probability(0.3),
        ))?;
        let mut failed = Vec::new();
        let mut corrupted_first_bytes = Vec::new();
        for _ in 0..200 {
            match faults.get("p/obj").await {
                Ok(got) => {
                    failed.push(false);
                    if got != data(64, 0) {
                        let first = got.iter().zip(data(64, 0).iter()).position(|(a, b)| a != b);
                        corrupted_first_bytes.push(first.unwrap_or(0) as u8);
                    }
                }
                Err(_) => failed.push(true),
            }
        }
        let fails = failed.iter().filter(|&&f| f).count();
        assert!((30..=90).contains(&fails), "{fails} of 200 at p = 0.3");
        Ok((failed, corrupted_first_bytes))
    }
    assert_eq!(pattern(5).await?, pattern(5).await?);
    assert_ne!(pattern(5).await?, pattern(6).await?);
    Ok(())
}

#[tokio::test]
async fn a_fault_that_cannot_happen_to_an_operation_is_refused() -> anyhow::Result<()> {
    let (_dir, _, _, faults) = fault_sink(1)?;
    let err = faults
        .add_rule(FaultRule::new(OpKind::Get, Fault::TornPut, Trigger::once()))
        .err();
    assert_eq!(err.map(|e| e.kind()), Some(SinkErrorKind::InvalidConfig));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_time_operations_on_a_sim_clock_with_delays_underneath() -> anyhow::Result<()> {
    let (_dir, sim, _, faults) = fault_sink(1)?;
    let faults = Arc::new(faults);
    faults.add_rule(FaultRule::new(
        OpKind::Put,
        Fault::Delay(Duration::from_secs(2)),
        Trigger::always(),
    ))?;
    faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Delay(Duration::from_millis(250)),
        Trigger::always(),
    ))?;
    faults.add_rule(
        FaultRule::new(OpKind::Get, Fault::Transient, Trigger::once()).on_keys_containing("flaky"),
    )?;
    let clock: Arc<dyn Clock> = Arc::new(sim.clone());
    let metrics = MetricsSink::new(Arc::clone(&faults) as Arc<dyn Sink>, clock);

    metrics.put("m/a", data(100, 0), PutMode::Create).await?;
    metrics.put("m/b", data(50, 0), PutMode::Create).await?;
    let exists = metrics.put("m/b", data(50, 0), PutMode::Create).await;
    assert!(exists.is_err());
    metrics.get("m/a").await?;
    metrics.get("m/b").await?;
    assert!(metrics.get("m/missing").await.is_err());
    assert!(metrics.get("m/flaky").await.is_err());
    assert_eq!(metrics.list("m/").await?.len(), 2);
    metrics.delete("m/a").await?;

    let m = metrics.snapshot();
    assert_eq!((m.bytes_in, m.bytes_out), (150, 150));
    assert_eq!((m.put.ok, m.put.errors.already_exists), (2, 1));
    assert_eq!(m.put.latency.count, 3);
    assert_eq!(
        (m.put.latency.min, m.put.latency.max),
        (Duration::from_secs(2), Duration::from_secs(2))
    );
    assert_eq!(m.put.latency.sum, Duration::from_secs(6));
    let mut put_buckets = [0u64; LATENCY_BUCKETS];
    put_buckets[7] = 3; // up to 5 s
    assert_eq!(m.put.latency.buckets, put_buckets);

    assert_eq!(m.get.ok, 2);
    assert_eq!((m.get.errors.not_found, m.get.errors.transient), (1, 1));
    assert_eq!(m.get.operations(), 4);
    assert_eq!(m.get.latency.mean(), Duration::from_millis(250));
    let mut get_buckets = [0u64; LATENCY_BUCKETS];
    get_buckets[5] = 4; // up to 500 ms
    assert_eq!(m.get.latency.buckets, get_buckets);

    assert_eq!((m.list.ok, m.delete.ok), (1, 1));
    assert_eq!(m.list.latency.max, Duration::ZERO);
    assert_eq!(sim.now().since(at(0, 0, 0)), Duration::from_secs(7));

    let report = m.to_string();
    assert!(report.contains("bytes in 150, bytes out 150"), "{report}");
    assert!(report.contains("1 not found, 1 transient"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("put") && l.contains("2.0s")),
        "{report}"
    );
    Ok(())
}

#[tokio::test]
async fn metrics_outside_retry_see_one_call_with_its_backoff() -> anyhow::Result<()> {
    let s = retry_stack(RetryPolicy::default())?;
    s.faults.add_rule(FaultRule::new(
        OpKind::Get,
        Fault::Transient,
        Trigger::times(2),
    ))?;
    s.local.put("r/x", data(10, 0), PutMode::Create).await?;
    let clock: Arc<dyn Clock> = Arc::new(s.sim.clone());
    let outer = MetricsSink::new(Arc::new(s.retry) as Arc<dyn Sink>, clock);
    outer.get("r/x").await?;
    let seen = outer.snapshot();
    assert_eq!((seen.get.ok, seen.get.errors.total()), (1, 0));
    assert_eq!(seen.get.latency.max, s.sim.now().since(at(0, 0, 0)));
    let attempts = s.attempts.snapshot();
    assert_eq!((attempts.get.ok, attempts.get.errors.transient), (1, 2));
    Ok(())
}
