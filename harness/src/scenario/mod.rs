//! `harness scenario FILE`: runs a scenario file (see `spec` and docs/SCENARIOS.md) and checks
//! its expectations.
//!
//! Every disk gets a source and a target (loop devices or image files) in the work directory,
//! and all share one cache, one bandwidth throttle (so a schedule is shared fairly) and one
//! master key. Cycle by cycle, up to `concurrency` disks at a time each run their workloads,
//! ship, take the faults planned for that cycle, hydrate and verify. Then heal rounds run
//! without writes while a disk is not identical, and the expectations are checked. The report
//! is written as JSON and summed up as a table; a failed expectation is named and exits 1.

mod disk;
mod faults;
mod report;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use harness::scenario::spec::{self, Scenario};
use replicator_core::clock::{Clock, SystemClock};
use replicator_core::keys::MasterKey;
use replicator_sink::wrap::RetryPolicy;
use tokio::sync::Semaphore;

use crate::bars::MultiBars;
use crate::commands::{Failed, UsageError};
use crate::sinks::{SinkStack, StackOptions};
use disk::{Disk, StepKind};
use report::Report;

/// Arguments of `harness scenario`.
#[derive(Debug, clap::Args)]
pub struct ScenarioArgs {
    /// The scenario file (TOML; every field is described in docs/SCENARIOS.md).
    file: PathBuf,
    /// The work directory (images, states, cache); default: a temporary directory, removed at
    /// the end.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Where to write the JSON report; default: beside the work directory, as `WORK.json`.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// What every disk's steps share.
pub(crate) struct Ctx {
    pub scenario: Scenario,
    /// Disks in a step right now, and the most there ever were (checked against the limit).
    pub busy: AtomicUsize,
    pub busy_max: AtomicUsize,
    pub key: MasterKey,
    pub key_file: PathBuf,
    pub stack: SinkStack,
    /// The cache's URL, for child processes.
    pub sink_url: String,
    pub clock: SystemClock,
    pub bars: MultiBars,
    pub runtime: tokio::runtime::Handle,
    /// This program, to run a side as a child process.
    pub exe: PathBuf,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("scenario", &self.scenario.name)
            .field("sink_url", &self.sink_url)
            .finish_non_exhaustive()
    }
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Reads and checks a scenario file.
pub fn load(file: &Path) -> Result<Scenario> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("cannot read the scenario {}: {e}", file.display())))?;
    spec::parse(&text, &file.display().to_string()).map_err(|e| usage(e.to_string()))
}

fn write_key(path: &Path) -> Result<MasterKey> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = MasterKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the key file {}", path.display()))?;
    file.write_all(key.to_key_file().as_bytes())?;
    file.sync_all()?;
    Ok(key)
}

/// `harness scenario`.
pub async fn run(args: ScenarioArgs) -> Result<ExitCode> {
    let scenario = load(&args.file)?;
    let temp;
    let work = match &args.work {
        Some(w) => {
            std::fs::create_dir_all(w).with_context(|| format!("creating {}", w.display()))?;
            std::path::absolute(w)?
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix(&format!("replicator-scenario-{}-", scenario.name))
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let report_path = args
        .report
        .clone()
        .unwrap_or_else(|| work.with_extension("json"));
    let bars = MultiBars::new(args.quiet || args.json);
    // On Ctrl-C the run stops: disks between steps are dropped at once, those in a step when it
    // ends, and dropping a disk detaches its loop devices.
    let report = tokio::select! {
        r = execute(scenario, &args.file, &work, bars) => r?,
        _ = tokio::signal::ctrl_c() => {
            return Err(anyhow::Error::new(Failed(
                "interrupted: the scenario stopped before its end".into(),
            )));
        }
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&report_path, format!("{json}\n"))
        .with_context(|| format!("writing the report {}", report_path.display()))?;
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.summary());
        println!("report: {}", report_path.display());
    }
    if report.passed {
        return Ok(ExitCode::SUCCESS);
    }
    let failed: Vec<String> = report
        .expectations
        .iter()
        .filter(|e| !e.passed)
        .map(|e| format!("{} (expected {}, got {})", e.name, e.expected, e.actual))
        .collect();
    Err(anyhow::Error::new(Failed(format!(
        "scenario {}: {} expectation(s) failed: {}",
        report.scenario,
        failed.len(),
        failed.join("; ")
    ))))
}

/// Runs `scenario` in `work` and returns its report (expectations checked).
async fn execute(scenario: Scenario, file: &Path, work: &Path, bars: MultiBars) -> Result<Report> {
    let clock = SystemClock;
    let started = clock.now();
    let sink_url = match &scenario.sink.url {
        Some(u) if u.contains("://") || Path::new(u).is_absolute() => u.clone(),
        Some(u) => work.join(u).display().to_string(),
        None => work.join("cache").display().to_string(),
    };
    // Two fault layers: rules armed for the whole run, and rules armed for one cycle.
    let stack = crate::sinks::open_stack(&StackOptions {
        urls: std::slice::from_ref(&sink_url),
        throttle: scenario
            .sink
            .throttle
            .as_ref()
            .map(|t| t.get_ref().as_str()),
        utc_offset: &scenario.sink.utc_offset,
        attempts: scenario
            .sink
            .attempts
            .unwrap_or(RetryPolicy::default().attempts_max),
        record_puts: None,
        fault_layers: 2,
        fault_seed: scenario.seed,
    })?;
    let key_file = work.join("master.key");
    let key = write_key(&key_file)?;
    let ctx = Arc::new(Ctx {
        key,
        key_file,
        stack,
        sink_url,
        clock,
        bars,
        runtime: tokio::runtime::Handle::current(),
        exe: std::env::current_exe().context("finding this program, to run sides as children")?,
        scenario,
        busy: AtomicUsize::new(0),
        busy_max: AtomicUsize::new(0),
    });
    let mut plan = faults::Plan::new(&ctx.scenario);
    let names = ctx.scenario.disk_names();
    let limit = Arc::new(Semaphore::new(ctx.scenario.concurrency as usize));

    // Set up every disk, `concurrency` at a time.
    let mut handles = Vec::with_capacity(names.len());
    for name in names {
        let ctx = Arc::clone(&ctx);
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let work = work.to_path_buf();
        handles.push(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            Disk::setup(&ctx, &work, name)
        }));
    }
    let mut disks = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for h in handles {
        match h.await? {
            Ok(d) => disks.push(d),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e.context("setting up the disks"));
    }
    plan.arm_run_wide(&ctx, &disks)?;

    let cycles = ctx.scenario.cycles;
    for step in 0..=cycles {
        let kind = if step == 0 {
            StepKind::Initial
        } else {
            StepKind::Delta
        };
        if kind == StepKind::Delta {
            disks = each_disk(disks, &ctx, &limit, &plan, step, StepKind::Writes, |_| true).await?;
        }
        plan.arm_cycle(&ctx, &disks, step)?;
        disks = each_disk(disks, &ctx, &limit, &plan, step, kind, |_| true).await?;
        plan.disarm_cycle(&ctx);
    }
    let mut heal_rounds = 0;
    for round in 1..=ctx.scenario.heal_rounds {
        if disks.iter().all(Disk::settled) {
            break;
        }
        heal_rounds = round;
        disks = each_disk(
            disks,
            &ctx,
            &limit,
            &plan,
            cycles + round,
            StepKind::Heal,
            |d| !d.settled(),
        )
        .await?;
    }
    disks = each_disk(
        disks,
        &ctx,
        &limit,
        &plan,
        cycles + heal_rounds + 1,
        StepKind::Final,
        |_| true,
    )
    .await?;
    let took = ctx.clock.now().since(started);
    Ok(Report::build(
        &ctx,
        file,
        work,
        &disks,
        &plan,
        heal_rounds,
        took,
    ))
}

/// Runs one step on every disk `which` selects, up to the concurrency limit at a time, each in
/// a thread of its own (their reads, writes and child processes block). Returns the disks in
/// their order; fails with the first disk's error after all have finished.
async fn each_disk(
    disks: Vec<Disk>,
    ctx: &Arc<Ctx>,
    limit: &Arc<Semaphore>,
    plan: &faults::Plan,
    step: u32,
    kind: StepKind,
    which: impl Fn(&Disk) -> bool,
) -> Result<Vec<Disk>> {
    let mut handles = Vec::with_capacity(disks.len());
    let mut idle = Vec::new();
    for mut d in disks {
        if !which(&d) {
            idle.push(d);
            continue;
        }
        let ctx = Arc::clone(ctx);
        let faults = match kind {
            StepKind::Initial | StepKind::Delta => plan.for_disk(&d.name, step),
            StepKind::Writes | StepKind::Heal | StepKind::Final => Vec::new(),
        };
        let permit = Arc::clone(limit).acquire_owned().await?;
        handles.push(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let now = ctx.busy.fetch_add(1, Ordering::SeqCst) + 1;
            ctx.busy_max.fetch_max(now, Ordering::SeqCst);
            let r = d.step(&ctx, step, kind, &faults);
            ctx.busy.fetch_sub(1, Ordering::SeqCst);
            (d, r)
        }));
    }
    let mut out = idle;
    let mut first_error = None;
    for h in handles {
        let (d, r) = h.await?;
        if let Err(e) = r {
            first_error.get_or_insert(e.context(format!("disk {}", d.name)));
        }
        out.push(d);
    }
    out.sort_by_key(|d| d.index);
    match first_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
