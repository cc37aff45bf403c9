//! The step loop: one seed drives the workload, the clock, the sink's faults, the devices'
//! volatile caches and the crashes of either side; after every step the target is checked
//! against a model of what the source held at each shipped cycle's freeze.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::clock::{SimClock, Timestamp};
use replicator_core::device::BlockDevice;
use replicator_core::keys::MasterKey;
use replicator_core::progress::NoProgress;
use replicator_core::source::{Compression, ShipConfig, ShipOutcome, Source, ship_cycle};
use replicator_core::target::{HydrateConfig, Target, hydrate};
use replicator_core::tracker::{CbtTracker, TrackerConfig};
use replicator_sink::LocalDirSink;
use replicator_sink::wrap::{Fault, FaultCounts, FaultRule, FaultSink, OpKind, Trigger};

use crate::device::SimDevice;
use crate::listing::LaggyListSink;

const SECTOR_BYTES: usize = 512;

/// 2 MiB and 256 KiB: the bitmap's 2 MiB chunks meet at a boundary inside the disk.
pub const DISK_BYTES: u64 = (2 << 20) + (256 << 10);

/// Steps kept for a failure report.
pub const TRACE_STEPS_KEPT: usize = 24;

/// Sink operations between a planned cut and a crash, at most.
const CUT_OPS_MAX: u64 = 24;

/// How the simulated world is deliberately broken, to show the checks can fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Broken {
    /// Nothing is broken.
    #[default]
    Nothing,
    /// The target's device acknowledges flushes without persisting: a crash loses writes the
    /// engine was promised were durable. The engine is not designed to survive it.
    TargetFlushLies,
}

/// Settings of one simulated run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Steps of the random phase.
    pub steps: u64,
    /// Ship-and-hydrate rounds allowed after the source is quiesced and faults stop, before a
    /// run that has not converged fails.
    pub final_rounds_max: u64,
    /// A deliberately broken set-up, or none.
    pub broken: Broken,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            steps: 300,
            final_rounds_max: 16,
            broken: Broken::Nothing,
        }
    }
}

/// What a run that held every invariant did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Steps run, the final rounds included.
    pub steps: u64,
    /// Cycles shipped (resync cycles included).
    pub cycles_shipped: u64,
    /// Cycles the target applied and committed.
    pub cycles_applied: u64,
    /// Crashes of the source, of the target.
    pub source_crashes: u64,
    /// Crashes of the target (power cuts mid-hydration included).
    pub target_crashes: u64,
    /// Ship-and-hydrate rounds the final sync took.
    pub final_rounds: u64,
    /// Faults the sink injected.
    pub faults: FaultCounts,
    /// Objects hidden from listings.
    pub listings_missed: u64,
    /// BLAKE3 over every step's outcome and the final disks: equal for equal seeds.
    pub trace_hash: String,
}

/// A broken invariant (or a run that could not go on), with what reproduces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimFailure {
    /// The seed.
    pub seed: u64,
    /// The step it was found at.
    pub step: u64,
    /// The run's settings.
    pub config: SimConfig,
    /// What broke.
    pub message: String,
    /// The last steps, oldest first.
    pub last_steps: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation failed: seed {} at step {}: {}",
            self.seed, self.step, self.message
        )?;
        writeln!(f, "last {} steps:", self.last_steps.len())?;
        for line in &self.last_steps {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "reproduce: cargo run --release -p replicator-sim -- --seed {} --steps {}{}",
            self.seed,
            self.config.steps,
            match self.config.broken {
                Broken::Nothing => "",
                Broken::TargetFlushLies => " --broken target-flush-lies",
            }
        )
    }
}

impl std::error::Error for SimFailure {}

/// One shipped attempt's content: the source as of its freeze.
#[derive(Debug)]
struct Snapshot {
    attempt: u64,
    hash: blake3::Hash,
    image: Arc<Vec<u8>>,
}

/// The model: the source's content now, and its content at the freeze of every cycle attempt
/// the target may still apply (or holds).
#[derive(Debug)]
struct Model {
    current: Vec<u8>,
    /// By cycle; a cycle may have several attempts, only one of which can be in the cache.
    shipped: BTreeMap<u64, Vec<Snapshot>>,
    /// The highest committed cycle the target has shown.
    committed: u64,
}

impl Model {
    fn record(&mut self, cycle: u64, attempt: u64) {
        let image = Arc::new(self.current.clone());
        let hash = blake3::hash(&image);
        self.shipped.entry(cycle).or_default().push(Snapshot {
            attempt,
            hash,
            image,
        });
    }
}

type Tracked = CbtTracker<Arc<SimDevice>>;

/// The kinds of steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Write,
    Flush,
    Ship,
    Hydrate,
    CrashSource,
    CrashSourceMidShip,
    CrashTarget,
    CrashTargetMidHydrate,
    AdvanceClock,
    ToggleFaults,
}

const STEP_WEIGHTS: &[(Step, u32)] = &[
    (Step::Write, 30),
    (Step::Flush, 4),
    (Step::Ship, 20),
    (Step::Hydrate, 20),
    (Step::CrashSource, 3),
    (Step::CrashSourceMidShip, 3),
    (Step::CrashTarget, 3),
    (Step::CrashTargetMidHydrate, 4),
    (Step::AdvanceClock, 6),
    (Step::ToggleFaults, 4),
];

fn pick_step(rng: &mut ChaCha8Rng) -> Step {
    let total: u32 = STEP_WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut draw = rng.random_range(0..total);
    for (step, weight) in STEP_WEIGHTS {
        if draw < *weight {
            return *step;
        }
        draw -= weight;
    }
    Step::Write
}

/// Fault probabilities drawn once per seed.
#[derive(Clone, Copy, Debug)]
struct FaultPlan {
    p: f64,
    delay_max_s: u64,
    list_miss: f64,
}

struct World {
    seed: u64,
    cfg: SimConfig,
    rng: ChaCha8Rng,
    // Dropped last: the state directories and the cache live in it.
    dir: tempfile::TempDir,
    clock: SimClock,
    lag: Arc<LaggyListSink>,
    sink: Arc<FaultSink>,
    key: MasterKey,
    src_dev: Arc<SimDevice>,
    tgt_dev: Arc<SimDevice>,
    source: Option<Source<Tracked>>,
    target: Option<Target<Arc<SimDevice>>>,
    ship_cfg: ShipConfig,
    hydrate_cfg: HydrateConfig,
    plan: FaultPlan,
    faults_on: bool,
    model: Model,
    step: u64,
    trace: VecDeque<String>,
    /// Texts of the engine's errors in the current step.
    errors: Vec<String>,
    hasher: blake3::Hasher,
    /// Whether the target may have changed since its content was last checked.
    target_dirty: bool,
    cycles_shipped: u64,
    cycles_applied: u64,
    source_crashes: u64,
    target_crashes: u64,
}

/// A temporary directory in memory when the machine has one (the engine fsyncs its state).
fn temp_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("replicator-sim-")
            .tempdir_in(shm)
    {
        return Ok(dir);
    }
    tempfile::Builder::new().prefix("replicator-sim-").tempdir()
}

/// Runs one seed. `Err` names the seed, the step and the broken invariant.
pub fn run(seed: u64, cfg: SimConfig) -> Result<SimReport, Box<SimFailure>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| setup_failure(seed, cfg, format!("cannot start a runtime: {e}")))?;
    let mut world = World::new(seed, cfg).map_err(|e| setup_failure(seed, cfg, e))?;
    rt.block_on(world.run())
}

fn setup_failure(seed: u64, config: SimConfig, message: impl fmt::Display) -> Box<SimFailure> {
    Box::new(SimFailure {
        seed,
        step: 0,
        config,
        message: format!("set-up: {message}"),
        last_steps: Vec::new(),
    })
}

impl World {
    fn new(seed: u64, cfg: SimConfig) -> anyhow::Result<World> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dir = temp_dir()?;
        // The source starts with random, text-like and zero regions.
        let mut content = vec![0u8; DISK_BYTES as usize];
        for (i, chunk) in content.chunks_mut(64 << 10).enumerate() {
            match i % 3 {
                0 => rng.fill_bytes(chunk),
                1 => chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"replica "[j % 8]),
                _ => {}
            }
        }
        let src_dev = Arc::new(SimDevice::with_content("sim-source", content.clone()));
        let tgt_content = vec![0u8; DISK_BYTES as usize];
        let tgt_dev = Arc::new(SimDevice::with_content("sim-target", tgt_content.clone()));
        if cfg.broken == Broken::TargetFlushLies {
            tgt_dev.set_flush_persists(false);
        }
        let clock = SimClock::new(Timestamp::from_unix_ms(1_700_000_000_000));
        let local = LocalDirSink::create(dir.path().join("cache"))?;
        let lag = Arc::new(LaggyListSink::new(Arc::new(local), rng.next_u64()));
        let sink = Arc::new(FaultSink::new(
            Arc::clone(&lag) as _,
            Arc::new(clock.clone()),
            rng.next_u64(),
        ));
        let (source, _) = Source::open(
            &dir.path().join("src-state"),
            Arc::clone(&src_dev),
            TrackerConfig::default(),
        )?;
        let target = Target::open(
            &dir.path().join("tgt-state"),
            Arc::clone(&tgt_dev),
            source.disk_id(),
        )?;
        let ship_cfg = ShipConfig {
            blob_span_bytes_max: [16u64 << 10, 64 << 10, 256 << 10][rng.random_range(0..3)],
            // One put at a time: the order of sink operations, hence of fault draws, is the seed's.
            puts_in_flight_max: 1,
            blobs_queued_max: 1,
            // Stored bytes that depend on timing would make the seed's runs differ.
            compression: Compression::Zstd,
            unacked_cycles_max: 6,
            resync_block_bytes: 16 << 10,
            ..ShipConfig::default()
        };
        let hydrate_cfg = HydrateConfig {
            cycles_max: rng.random_range(0..3),
            // Some seeds stage nothing: blobs are fetched and verified again for writing.
            staging_bytes_max: if rng.random_bool(0.3) { 0 } else { 8 << 30 },
            catalog_reread: rng.random_bool(0.2),
            // One get at a time: the order of sink operations is the seed's.
            decode_threads: 1,
            ..HydrateConfig::default()
        };
        let plan = FaultPlan {
            p: rng.random_range(0.005..0.06),
            delay_max_s: rng.random_range(1..600),
            list_miss: rng.random_range(0.0..0.5),
        };
        let mut model = Model {
            current: tgt_content,
            shipped: BTreeMap::new(),
            committed: 0,
        };
        // Cycle 0 is the target as it starts.
        model.record(0, 0);
        model.current = content;
        let mut world = World {
            seed,
            cfg,
            rng,
            dir,
            clock,
            lag,
            sink,
            key: MasterKey::from_bytes([7u8; 32]),
            src_dev,
            tgt_dev,
            source: Some(source),
            target: Some(target),
            ship_cfg,
            hydrate_cfg,
            plan,
            faults_on: false,
            model,
            step: 0,
            trace: VecDeque::new(),
            errors: Vec::new(),
            hasher: blake3::Hasher::new(),
            target_dirty: true,
            cycles_shipped: 0,
            cycles_applied: 0,
            source_crashes: 0,
            target_crashes: 0,
        };
        world.hasher.update(&seed.to_le_bytes());
        let on = world.rng.random_bool(0.7);
        world.set_faults(on)?;
        Ok(world)
    }

    fn fail(&self, message: impl fmt::Display) -> Box<SimFailure> {
        Box::new(SimFailure {
            seed: self.seed,
            step: self.step,
            config: self.cfg,
            message: message.to_string(),
            last_steps: self.trace.iter().cloned().collect(),
        })
    }

    /// Records a step: its line goes into the trace hash; the errors' texts (which name random
    /// disk ids) only into the report.
    fn note(&mut self, line: String) {
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        if self.trace.len() == TRACE_STEPS_KEPT {
            self.trace.pop_front();
        }
        let errors = std::mem::take(&mut self.errors);
        if errors.is_empty() {
            self.trace.push_back(line);
        } else {
            self.trace
                .push_back(format!("{line}\n      errors: {}", errors.join("\n      ")));
        }
    }

    fn src_state_dir(&self) -> PathBuf {
        self.dir.path().join("src-state")
    }

    fn tgt_state_dir(&self) -> PathBuf {
        self.dir.path().join("tgt-state")
    }

    fn set_faults(&mut self, on: bool) -> anyhow::Result<()> {
        self.sink.clear_rules();
        self.faults_on = on;
        if !on {
            self.lag.set_miss_probability(0.0);
            self.lag.settle();
            return Ok(());
        }
        let p = self.plan.p;
        let delay = Duration::from_secs(self.plan.delay_max_s);
        for rule in [
            FaultRule::new(OpKind::Put, Fault::Delay(delay), Trigger::Probability(p)),
            FaultRule::new(OpKind::Put, Fault::Transient, Trigger::Probability(p)),
            FaultRule::new(OpKind::Put, Fault::TornPut, Trigger::Probability(p)),
            FaultRule::new(OpKind::Put, Fault::LostAck, Trigger::Probability(p)),
            FaultRule::new(OpKind::Get, Fault::Transient, Trigger::Probability(p)),
            FaultRule::new(OpKind::Get, Fault::CorruptRead, Trigger::Probability(p)),
            FaultRule::new(
                OpKind::List,
                Fault::Transient,
                Trigger::Probability(p / 2.0),
            ),
            FaultRule::new(OpKind::Delete, Fault::Transient, Trigger::Probability(p)),
        ] {
            self.sink.add_rule(rule)?;
        }
        self.lag.set_miss_probability(self.plan.list_miss);
        Ok(())
    }

    async fn run(&mut self) -> Result<SimReport, Box<SimFailure>> {
        while self.step < self.cfg.steps {
            self.step += 1;
            let kind = pick_step(&mut self.rng);
            let outcome = self.do_step(kind).await.map_err(|e| self.fail(e))?;
            let line = format!(
                "#{} {:?}: {} [{}]",
                self.step,
                kind,
                outcome,
                self.target_line()
            );
            self.note(line);
            self.check()?;
        }
        let final_rounds = self.converge().await?;
        self.hasher.update(self.src_dev.visible().as_slice());
        self.hasher.update(self.tgt_dev.visible().as_slice());
        Ok(SimReport {
            seed: self.seed,
            steps: self.step,
            cycles_shipped: self.cycles_shipped,
            cycles_applied: self.cycles_applied,
            source_crashes: self.source_crashes,
            target_crashes: self.target_crashes,
            final_rounds,
            faults: self.sink.counts(),
            listings_missed: self.lag.missed(),
            trace_hash: self.hasher.finalize().to_hex().to_string(),
        })
    }

    fn target_line(&self) -> String {
        match &self.target {
            Some(t) => {
                let s = t.state();
                format!(
                    "target committed {} applying {:?} failed {:?}",
                    s.committed_cycle, s.applying_cycle, s.failed_cycles
                )
            }
            None => "no target".into(),
        }
    }

    async fn do_step(&mut self, kind: Step) -> anyhow::Result<String> {
        Ok(match kind {
            Step::Write => self.write()?,
            Step::Flush => {
                self.src_dev.flush()?;
                "source device flushed".into()
            }
            Step::Ship => self.ship().await?,
            Step::Hydrate => self.hydrate().await?,
            Step::CrashSource => self.crash_source()?,
            Step::CrashSourceMidShip => {
                // The source stops after some sink operations: later ones never happen.
                let skip = self.rng.random_range(0..CUT_OPS_MAX);
                self.cut_sink_after(skip)?;
                let shipped = self.ship().await?;
                let crashed = self.crash_source()?;
                let on = self.faults_on;
                self.set_faults(on)?;
                format!("cut after {skip} sink ops: {shipped}; {crashed}")
            }
            Step::CrashTarget => self.crash_target()?,
            Step::CrashTargetMidHydrate => {
                let writes = self.rng.random_range(0..64);
                self.tgt_dev.cut_power_after(Some(writes));
                let hydrated = self.hydrate().await?;
                let crashed = self.crash_target()?;
                format!("power cut after {writes} writes: {hydrated}; {crashed}")
            }
            Step::AdvanceClock => {
                let secs = self.rng.random_range(1..4 * 3600);
                self.clock.advance(Duration::from_secs(secs));
                self.lag.settle();
                format!("clock +{secs}s, listings settled")
            }
            Step::ToggleFaults => {
                let on = !self.faults_on;
                self.set_faults(on)?;
                format!("faults {}", if on { "on" } else { "off" })
            }
        })
    }

    /// Every sink operation after the next `skip` fails, as if the machine had stopped.
    fn cut_sink_after(&mut self, skip: u64) -> anyhow::Result<()> {
        self.sink.clear_rules();
        for op in [OpKind::Put, OpKind::Get, OpKind::List, OpKind::Delete] {
            // One countdown per kind: the cut lands after `skip` operations of each kind.
            self.sink.add_rule(FaultRule::new(
                op,
                Fault::Permanent,
                Trigger::Countdown {
                    skip,
                    times: u64::MAX,
                },
            ))?;
        }
        Ok(())
    }

    fn source(&mut self) -> anyhow::Result<&mut Source<Tracked>> {
        self.source
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the source is not open"))
    }

    fn write(&mut self) -> anyhow::Result<String> {
        let writes = self.rng.random_range(1..=4);
        let mut sectors = 0;
        for _ in 0..writes {
            let len = self.rng.random_range(1..=16 * 1024u64);
            let off = self.rng.random_range(0..DISK_BYTES - len);
            let mut data = vec![0u8; len as usize];
            match self.rng.random_range(0..10) {
                0..=6 => self.rng.fill_bytes(&mut data),
                7 => data.fill(self.rng.random()),
                _ => {}
            }
            let source = self.source()?;
            source.tracker().write_tracked(&data, off)?;
            self.model.current[off as usize..(off + len) as usize].copy_from_slice(&data);
            sectors += len.div_ceil(SECTOR_BYTES as u64);
        }
        Ok(format!("{writes} writes, ~{sectors} sectors"))
    }

    async fn ship(&mut self) -> anyhow::Result<String> {
        let source = self
            .source
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the source is not open"))?;
        let attempts_before = source.state().attempts;
        let result = ship_cycle(
            source,
            self.sink.as_ref(),
            &self.key,
            &self.clock,
            &self.ship_cfg,
            &NoProgress,
        )
        .await;
        let state = source.state();
        let attempts_after = state.attempts;
        // The cycle an attempt was made for: the report's; after a failure, either the one given
        // up (its manifest may be in the cache and be applied) or, when it left no manifest, the
        // one still next.
        let cycles = match &result {
            Ok(ShipOutcome::Shipped(r)) => vec![r.cycle],
            _ => vec![state.next_cycle.saturating_sub(1), state.next_cycle],
        };
        if attempts_after > attempts_before {
            if attempts_after != attempts_before + 1 {
                anyhow::bail!(
                    "one ship made {} attempts",
                    attempts_after - attempts_before
                );
            }
            // Nothing wrote since the freeze: the model is the source as of it.
            for cycle in cycles {
                self.model.record(cycle, attempts_after);
            }
        }
        Ok(match result {
            Ok(ShipOutcome::Shipped(r)) => {
                self.cycles_shipped += 1;
                format!(
                    "shipped cycle {} (attempt {attempts_after}) on {}, {} sectors{}",
                    r.cycle,
                    r.base_cycle,
                    r.changed_sectors,
                    if r.resync.is_some() { ", resync" } else { "" }
                )
            }
            Ok(ShipOutcome::AwaitingCatalog { request, .. }) => {
                format!("awaiting catalog (request {request})")
            }
            Err(e) => {
                self.errors.push(format!("ship: {e}"));
                format!("ship failed ({:?})", e.kind())
            }
        })
    }

    async fn hydrate(&mut self) -> anyhow::Result<String> {
        let target = self
            .target
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the target is not open"))?;
        self.target_dirty = true;
        let result = hydrate(
            target,
            self.sink.as_ref(),
            &self.key,
            &self.clock,
            &self.hydrate_cfg,
            &NoProgress,
        )
        .await;
        Ok(match result {
            Ok(r) => {
                self.cycles_applied += r.applied.len() as u64;
                let applied: Vec<u64> = r.applied.iter().map(|a| a.cycle).collect();
                format!(
                    "hydrated: applied {applied:?}, failed {:?}, waiting {:?}{}",
                    r.failed.as_ref().map(|f| (f.cycle, f.error.kind())),
                    r.waiting_cycles,
                    if r.catalog.is_some() {
                        ", catalog sent"
                    } else {
                        ""
                    }
                )
            }
            Err(e) => {
                self.errors.push(format!("hydrate: {e}"));
                format!("hydrate failed ({:?})", e.kind())
            }
        })
    }

    fn crash_source(&mut self) -> anyhow::Result<String> {
        drop(self.source.take());
        let lost = self.src_dev.crash(&mut self.rng);
        self.source_crashes += 1;
        // The source holds what its disk holds after the crash: writes never flushed may be gone.
        self.model.current = self.src_dev.visible();
        let (source, report) = Source::open(
            &self.src_state_dir(),
            Arc::clone(&self.src_dev),
            TrackerConfig::default(),
        )?;
        self.source = Some(source);
        Ok(format!(
            "source crashed: kept {} of {} unflushed sectors; reopened (unclean {}, regions {}, \
             lost {})",
            lost.kept_sectors,
            lost.dirty_sectors,
            report.unclean,
            report.regions_recovered,
            report.lost.is_some()
        ))
    }

    fn crash_target(&mut self) -> anyhow::Result<String> {
        drop(self.target.take());
        let lost = self.tgt_dev.crash(&mut self.rng);
        self.target_crashes += 1;
        self.target_dirty = true;
        let disk = self
            .source
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the source is not open"))?
            .disk_id();
        self.target = Some(Target::open(
            &self.tgt_state_dir(),
            Arc::clone(&self.tgt_dev),
            disk,
        )?);
        Ok(format!(
            "target crashed: kept {} of {} unflushed sectors; reopened",
            lost.kept_sectors, lost.dirty_sectors
        ))
    }

    /// The invariants, after every step.
    fn check(&mut self) -> Result<(), Box<SimFailure>> {
        let Some(target) = &self.target else {
            return Err(self.fail("the target is not open"));
        };
        let state = target.state();
        let committed = state.committed_cycle;
        let applying = state.applying_cycle;
        // Cycles never apply out of order or twice: the committed cycle only moves forward.
        if committed < self.model.committed {
            return Err(self.fail(format!(
                "the target's committed cycle went back from {} to {committed}",
                self.model.committed
            )));
        }
        if !self.model.shipped.contains_key(&committed) {
            return Err(self.fail(format!(
                "the target committed cycle {committed}, which the source never shipped"
            )));
        }
        if let Some(a) = applying
            && a <= committed
        {
            return Err(self.fail(format!(
                "the target applies cycle {a} on top of committed cycle {committed}"
            )));
        }
        self.model.committed = committed;
        // Older cycles can never be held again.
        self.model.shipped = self.model.shipped.split_off(&committed);
        if !self.target_dirty {
            return Ok(());
        }
        self.target_dirty = false;
        let shipped = &self.model.shipped;
        let verdict = self.tgt_dev.with_visible(|bytes| match applying {
            // The target holds exactly a state the source had at the committed cycle's freeze.
            None => {
                let hash = blake3::hash(bytes);
                let attempts = shipped.get(&committed).map(Vec::as_slice).unwrap_or(&[]);
                if attempts.iter().any(|s| s.hash == hash) {
                    Ok(())
                } else {
                    let first = attempts
                        .iter()
                        .map(|s| (s.attempt, first_difference(bytes, &s.image)))
                        .collect::<Vec<_>>();
                    Err(format!(
                        "the target claims cycle {committed} but holds none of its attempts' \
                         contents (attempt, first differing sector): {first:?}"
                    ))
                }
            }
            // Mid-cycle, every sector is one the source had at a cycle from the committed one on:
            // no unverified byte.
            Some(_) => {
                for (i, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
                    let at = i * SECTOR_BYTES..(i + 1) * SECTOR_BYTES;
                    let known = shipped
                        .values()
                        .flatten()
                        .any(|s| s.image[at.clone()] == *sector);
                    if !known {
                        return Err(format!(
                            "target sector {i} holds bytes the source never shipped from \
                             cycle {committed} on"
                        ));
                    }
                }
                Ok(())
            }
        });
        verdict.map_err(|m| self.fail(m))
    }

    /// Faults off, the source quiesced: ship and hydrate until the disks are byte-identical.
    async fn converge(&mut self) -> Result<u64, Box<SimFailure>> {
        self.set_faults(false).map_err(|e| self.fail(e))?;
        self.tgt_dev.cut_power_after(None);
        // One ship and one hydrate per round must be able to catch up.
        self.hydrate_cfg.cycles_max = 0;
        for round in 1..=self.cfg.final_rounds_max {
            self.step += 1;
            let shipped = self.ship().await.map_err(|e| self.fail(e))?;
            self.check()?;
            let hydrated = self.hydrate().await.map_err(|e| self.fail(e))?;
            let line = format!(
                "#{} final round {round}: {shipped}; {hydrated} [{}]",
                self.step,
                self.target_line()
            );
            self.note(line);
            self.check()?;
            // Settled: the target committed the last shipped cycle and applies nothing.
            let last_shipped = self
                .source
                .as_ref()
                .filter(|s| s.state().in_flight.is_none())
                .map(|s| s.state().next_cycle - 1);
            let settled = self.target.as_ref().is_some_and(|t| {
                t.state().applying_cycle.is_none()
                    && Some(t.state().committed_cycle) == last_shipped
            });
            let identical = self.tgt_dev.visible() == self.src_dev.visible();
            if identical && settled {
                return Ok(round);
            }
        }
        let first = first_difference(&self.tgt_dev.visible(), &self.src_dev.visible());
        Err(self.fail(format!(
            "no convergence after {} final rounds with faults off and the source quiesced; first \
             differing sector: {first:?}",
            self.cfg.final_rounds_max
        )))
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR_BYTES)
        .zip(b.chunks(SECTOR_BYTES))
        .position(|(x, y)| x != y)
}
