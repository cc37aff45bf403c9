//! The single-step commands: keygen, ship, hydrate, verify, status, write. With `--json`, ship,
//! hydrate, verify and status print one JSON object (per cycle, with `ship --follow`) on stdout
//! instead of their lines of text.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use replicator_core::ErrorKind;
use replicator_core::clock::{Clock, SystemClock};
use replicator_core::device::{BlockDevice, FileDevice};
use replicator_core::gc::{GcPolicy, plan_gc, run_gc};
use replicator_core::keys::{DiskId, KeyError, MasterKey};
use replicator_core::schedule::{Next, SchedulePolicy, Scheduler};
use replicator_core::source::{Compression, ShipConfig, ShipOutcome, ShipReport, ship_cycle};
use replicator_core::state::{
    SOURCE_FILE, SourceState, StateDir, TARGET_FILE, TargetState, read_json_file,
};
use replicator_core::target::{
    HydrateConfig, HydrateReport, Target, discover_disks, hydrate as hydrate_cycles,
};
use replicator_core::verify::verify_devices;
use replicator_sink::Sink;
use serde_json::{Value, json};

use crate::bars::Bars;
use crate::fio::{self, FioJob};
use crate::sinks::SinkArgs;
use crate::table;
use crate::trackers::{TrackerArgs, TrackerKind, WriterTrackerArgs, open_source, open_writable};
use crate::workload::{Pattern, WorkloadSpec, run_workload};

/// A usage or input problem: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A failed cycle or verification: exit code 1, after the report was printed.
#[derive(Debug)]
pub struct Failed(pub String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

/// Maps an error to the documented exit code: 2 for bad usage or input, else 1.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<replicator_core::Error>() {
            return if e.kind() == ErrorKind::InvalidInput {
                2
            } else {
                1
            };
        }
        if let Some(e) = cause.downcast_ref::<replicator_sink::SinkError>() {
            return if e.kind() == replicator_sink::SinkErrorKind::InvalidConfig {
                2
            } else {
                1
            };
        }
    }
    1
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Reads a master key file, with errors naming the file and line.
pub fn read_key(path: &Path) -> Result<MasterKey> {
    MasterKey::load_key_file(path).map_err(|e| match e {
        KeyError::KeyFileRead { .. } => usage(format!(
            "{e}; create one with `harness keygen --out {}`",
            path.display()
        )),
        other => usage(other.to_string()),
    })
}

/// Reads the key files of a command: the first is the current key, the others previous keys
/// still read after a rotation.
pub fn read_keys(paths: &[PathBuf]) -> Result<MasterKey> {
    let Some((current, previous)) = paths.split_first() else {
        return Err(usage("give the master key file with --key-file"));
    };
    let previous = previous
        .iter()
        .map(|p| read_key(p))
        .collect::<Result<Vec<_>>>()?;
    Ok(read_key(current)?.with_previous(previous))
}

/// `harness keygen`.
pub fn keygen(out: &Path) -> Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = MasterKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            usage(format!(
                "cannot create key file {}: {e} (it is never overwritten)",
                out.display()
            ))
        })?;
    file.write_all(key.to_key_file().as_bytes())?;
    file.sync_all()?;
    println!(
        "wrote a new master key to {}; keep it safe: without it the cache cannot be read",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn open_device(path: &Path, what: &str) -> Result<FileDevice> {
    FileDevice::open(path).map_err(|e| usage(format!("cannot open the {what}: {e}")))
}

/// Arguments of `harness ship`.
#[derive(Debug, clap::Args)]
pub struct ShipArgs {
    /// The source disk: an image file or a block device.
    #[arg(long)]
    source: PathBuf,
    #[command(flatten)]
    sink: SinkArgs,
    /// The source side's state directory (tracker, pending cycles).
    #[arg(long)]
    state: PathBuf,
    /// The master key file (see `harness keygen`). Give it again with older key files after a
    /// key rotation: the first encrypts new cycles, the others still read what they wrote.
    #[arg(long, required = true)]
    key_file: Vec<PathBuf>,
    #[command(flatten)]
    tracker: TrackerArgs,
    /// Keep shipping on the schedule (first delta at once, then min(max(1h, d/2), 12h) after
    /// each delta) until Ctrl-C, which stops between cycles, or, pressed twice, at once; both
    /// leave a state the next run resumes from.
    #[arg(long)]
    follow: bool,
    /// zstd level for blobs.
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    /// When blobs are compressed: `adaptive` stores a blob uncompressed when the cores fall
    /// behind the disk (so compression never slows the copy; the sink's bytes grow instead);
    /// `zstd` compresses every blob.
    #[arg(long, value_enum, default_value_t = CompressionArg::Adaptive)]
    compression: CompressionArg,
    /// Repair by checksums: ask the target for the digests of what it holds, then ship only the
    /// blocks that differ (run hydrate on the target in between). Also done on its own when
    /// tracking was lost or the target was replaced or restored.
    #[arg(long)]
    resync: bool,
    /// Block size of the resync's digests, in bytes (a power of two, 4 KiB to 64 MiB).
    #[arg(long, default_value_t = 65536)]
    resync_block_size: u32,
    /// Print the outcome as one JSON object on stdout (one per line with --follow); notes go
    /// to stderr.
    #[arg(long)]
    json: bool,
}

/// A line for people: on stdout, or on stderr when stdout carries JSON.
fn say(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// A ship outcome as JSON.
pub fn ship_json(outcome: &ShipOutcome) -> Value {
    match outcome {
        ShipOutcome::Shipped(r) => json!({
            "outcome": "shipped",
            "cycle": r.cycle,
            "base_cycle": r.base_cycle,
            "kind": match (&r.resync, r.initial) {
                (Some(_), _) => "checksum resync",
                (None, true) => "initial",
                (None, false) => "delta",
            },
            "epoch": r.epoch,
            "changed_bytes": r.changed_bytes(),
            "zero_bytes": r.zero_bytes,
            "blob_count": r.blob_count,
            "stored_bytes": r.stored_bytes,
            "blobs_kept_up": r.blobs_kept_up,
            "compression_ratio": (r.stored_bytes > 0)
                .then(|| r.changed_bytes() as f64 / r.stored_bytes as f64),
            "duration_s": r.finished.since(r.started).as_secs_f64(),
            "churn_bytes_per_s": r.churn_bytes_per_s(),
            "interval_ms": r.interval_ms,
            "fold_ratio": r.fold_ratio(),
            "acked": r.acked,
            "carried_from_failed": r.carried_from_failed,
            "resync": r.resync.as_ref().map(|x| json!({
                "reason": x.reason,
                "target_cycle": x.target_cycle,
                "block_bytes": x.block_bytes,
                "bytes_read": x.bytes_read,
                "bytes_compared": x.bytes_compared,
                "blocks_differing": x.blocks_differing,
                "bytes_differing": x.bytes_differing,
                "superseded": x.superseded,
            })),
        }),
        ShipOutcome::AwaitingCatalog { reason, request } => json!({
            "outcome": "awaiting catalog",
            "reason": reason.to_string(),
            "request": request,
        }),
    }
}

/// `ship --compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionArg {
    /// zstd unless the cores fall behind the disk.
    Adaptive,
    /// zstd for every blob.
    Zstd,
}

/// Prints a ship outcome as text or as one JSON line (with the cache's metrics).
fn report_outcome(outcome: &ShipOutcome, json: bool, cache: Option<&str>) {
    if json {
        let mut v = ship_json(outcome);
        if let (Some(c), Some(o)) = (cache, v.as_object_mut()) {
            o.insert("cache".into(), Value::from(c));
        }
        println!("{v}");
        return;
    }
    print_outcome(outcome);
    if let Some(c) = cache {
        println!("cache: {c}");
    }
}

fn print_outcome(outcome: &ShipOutcome) {
    match outcome {
        ShipOutcome::Shipped(r) => print_ship(r),
        ShipOutcome::AwaitingCatalog { reason, request } => println!(
            "no cycle shipped: a checksum resync is owed ({reason}); resync request {request} is \
             in the cache: run hydrate on the target, then ship again"
        ),
    }
}

fn print_ship(r: &ShipReport) {
    let kind = match (&r.resync, r.initial) {
        (Some(_), _) => "checksum resync",
        (None, true) => "initial",
        (None, false) => "delta",
    };
    println!(
        "shipped cycle {} ({kind}, base {}): {} changed in {} blobs, {} stored, {} zero; took {}",
        r.cycle,
        r.base_cycle,
        table::bytes(r.changed_bytes()),
        r.blob_count,
        table::bytes(r.stored_bytes),
        table::bytes(r.zero_bytes),
        table::duration(r.finished.since(r.started))
    );
    if r.blobs_kept_up > 0 {
        println!(
            "  {} of {} blobs stored uncompressed: the cores were behind the disk (--compression zstd compresses every blob)",
            r.blobs_kept_up, r.blob_count
        );
    }
    if let Some(churn) = r.churn_bytes_per_s() {
        let fold = r
            .fold_ratio()
            .map(|f| format!(", {f:.2} bytes written per byte shipped"))
            .unwrap_or_default();
        println!(
            "  churn {}/s over the {} since the previous cycle{fold}",
            table::bytes(churn as u64),
            table::duration(std::time::Duration::from_millis(r.interval_ms.unwrap_or(0)))
        );
    }
    if !r.acked.is_empty() {
        println!("  target acknowledged cycles {:?}", r.acked);
    }
    if !r.carried_from_failed.is_empty() {
        println!(
            "  cycles {:?} failed on the target; their sectors went into this cycle",
            r.carried_from_failed
        );
    }
    if let Some(x) = &r.resync {
        println!(
            "  resync ({}): read {}, compared {} in {} blocks against the target's cycle {}; \
             {} blocks differed ({}) and were shipped",
            x.reason,
            table::bytes(x.bytes_read),
            table::bytes(x.bytes_compared),
            table::bytes(u64::from(x.block_bytes)),
            x.target_cycle,
            x.blocks_differing,
            table::bytes(x.bytes_differing),
        );
        if !x.superseded.is_empty() {
            println!("  it replaces unapplied cycles {:?}", x.superseded);
        }
    }
}

/// `harness ship`.
pub async fn ship(args: ShipArgs) -> Result<ExitCode> {
    tracing::debug!("ship: started");
    let key = read_keys(&args.key_file)?;
    let stack = args.sink.open()?;
    let sink = &stack.sink;
    let (mut source, report) = open_source(&args.tracker, &args.state, &args.source)?;
    tracing::debug!("ship: source opened");
    if report.unclean {
        eprintln!(
            "note: the previous run stopped uncleanly; {} activity-log regions were marked changed",
            report.regions_recovered
        );
    }
    if let Some(reason) = &report.lost {
        let note = format!(
            "note: the {} tracker lost track of changes ({reason}); a checksum resync against \
             the target's digests replaces the next delta",
            source.tracker().kind()
        );
        say(args.json, &note);
    }
    let cfg = ShipConfig {
        zstd_level: args.zstd_level,
        compression: match args.compression {
            CompressionArg::Adaptive => Compression::Adaptive,
            CompressionArg::Zstd => Compression::Zstd,
        },
        resync_block_bytes: args.resync_block_size,
        ..ShipConfig::default()
    };
    if args.resync {
        source.request_resync("requested by the operator (ship --resync)")?;
    }
    let bars = Bars::new(false);
    let clock = SystemClock;
    if !args.follow {
        let r = ship_cycle(&mut source, sink.as_ref(), &key, &clock, &cfg, &bars).await?;
        report_outcome(&r, args.json, Some(&stack.report()));
        return Ok(ExitCode::SUCCESS);
    }
    let policy = SchedulePolicy::default();
    let mut sched = Scheduler::new(policy, clock.now(), source.state().next_cycle > 1);
    let mut interrupts = Box::pin(tokio::signal::ctrl_c());
    while let Next::Run { kind, at } = sched.next() {
        tokio::select! {
            _ = clock.sleep_until(at) => {}
            _ = &mut interrupts => {
                say(args.json, "stopped between cycles; the state is saved");
                return Ok(ExitCode::SUCCESS);
            }
        }
        let started = clock.now();
        let result = tokio::select! {
            r = ship_cycle(&mut source, sink.as_ref(), &key, &clock, &cfg, &bars) => r,
            _ = &mut interrupts => {
                say(args.json, "interrupted mid-cycle: the cycle is abandoned (no manifest was written); its sectors ship next time");
                return Ok(ExitCode::SUCCESS);
            }
        };
        let ok = match &result {
            Ok(r) => {
                report_outcome(r, args.json, None);
                // Waiting for the target's catalog: try again at the retry interval.
                r.shipped().is_some()
            }
            Err(e) if e.kind() == ErrorKind::InvalidInput => return Err(usage(e.to_string())),
            Err(e) => {
                eprintln!("cycle failed: {e}");
                false
            }
        };
        let finished = clock.now();
        sched.record(kind, started, finished, ok);
        if let Some(warning) = sched.churn_warning() {
            eprintln!("warning: {warning}");
        }
        if let Next::Run { kind, at } = sched.next()
            && at > finished
        {
            // The gap the schedule chose, from the end of this cycle.
            say(
                args.json,
                &format!(
                    "next {kind:?} cycle in {}",
                    table::duration(at.since(finished))
                ),
            );
        }
        interrupts = Box::pin(tokio::signal::ctrl_c());
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `harness hydrate`.
#[derive(Debug, clap::Args)]
pub struct HydrateArgs {
    /// The target disk: an image file or a block device of the source's size.
    #[arg(long)]
    target: PathBuf,
    #[command(flatten)]
    sink: SinkArgs,
    /// The target side's state directory.
    #[arg(long)]
    state: PathBuf,
    /// The master key file. Give it again with older key files after a key rotation: cycles
    /// shipped under those still apply.
    #[arg(long, required = true)]
    key_file: Vec<PathBuf>,
    /// The disk to hydrate (32 hex digits); needed only when the cache holds several disks and
    /// this state directory is new.
    #[arg(long)]
    disk: Option<String>,
    /// Answer a resync request by reading the whole target again instead of trusting the kept
    /// digest catalog (use it when the target may have been written outside replication).
    #[arg(long)]
    reread_catalog: bool,
    /// Print the outcome as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// A hydrate report as JSON.
pub fn hydrate_json(r: &HydrateReport) -> Value {
    json!({
        "applied": r.applied.iter().map(|a| json!({
            "cycle": a.cycle,
            "base_cycle": a.base_cycle,
            "bytes_written": a.sectors_written * 512,
            "blob_count": a.blob_count,
            "blob_bytes": a.blob_bytes,
            "duration_s": a.finished.since(a.started).as_secs_f64(),
            "reconciled": true,
        })).collect::<Vec<_>>(),
        "failed": r.failed.as_ref().map(|f| json!({
            "cycle": f.cycle,
            "error": f.error.to_string(),
        })),
        "committed_cycle": r.committed_cycle,
        "waiting_cycles": r.waiting_cycles,
        "catalog": r.catalog.as_ref().map(|c| json!({
            "number": c.number,
            "answers_request": c.answers_request,
            "committed_cycle": c.committed_cycle,
            "block_bytes": c.block_bytes,
            "blocks": c.blocks,
            "bytes_read": c.bytes_read,
        })),
    })
}

/// Finds which disk a target state directory follows.
pub async fn resolve_disk(state: &Path, disk: Option<&str>, sink: &dyn Sink) -> Result<DiskId> {
    if let Some(d) = disk {
        return d.parse().map_err(|e| usage(format!("--disk {d}: {e}")));
    }
    if let Some(s) = read_json_file::<TargetState>(&state.join(TARGET_FILE))? {
        return s
            .disk_id
            .parse()
            .map_err(|e| usage(format!("{}: bad disk_id: {e}", state.display())));
    }
    let disks = discover_disks(sink).await?;
    match disks.as_slice() {
        [one] => Ok(*one),
        [] => Err(usage(format!(
            "the cache {} holds no disk yet; run `harness ship` first",
            sink.describe()
        ))),
        many => Err(usage(format!(
            "the cache holds {} disks; choose one with --disk ({})",
            many.len(),
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Prints a hydrate report; returns whether a cycle failed.
pub fn print_hydrate(r: &HydrateReport) -> bool {
    for a in &r.applied {
        println!(
            "applied cycle {} (base {}): {} written from {} blobs ({}), reconciled; took {}",
            a.cycle,
            a.base_cycle,
            table::bytes(a.sectors_written * 512),
            a.blob_count,
            table::bytes(a.blob_bytes),
            table::duration(a.finished.since(a.started))
        );
    }
    if let Some(f) = &r.failed {
        println!("cycle {} FAILED: {}", f.cycle, f.error);
        println!(
            "  the target stays at cycle {}; the source will resend these sectors in its next cycle",
            r.committed_cycle
        );
        return true;
    }
    if r.applied.is_empty() {
        println!(
            "nothing to apply; the target is at cycle {}",
            r.committed_cycle
        );
    }
    if !r.waiting_cycles.is_empty() {
        println!(
            "  cycles {:?} wait for a cycle this target does not have",
            r.waiting_cycles
        );
    }
    if let Some(c) = &r.catalog {
        let why = if c.answers_request == 0 {
            "unasked: no cycle in the cache applies here, so the source must resync".to_owned()
        } else {
            format!("answering resync request {}", c.answers_request)
        };
        println!(
            "put digest catalog {} ({why}): {} blocks of {} as of cycle {}, {} read",
            c.number,
            c.blocks,
            table::bytes(u64::from(c.block_bytes)),
            c.committed_cycle,
            table::bytes(c.bytes_read)
        );
    }
    false
}

/// `harness hydrate`.
pub async fn hydrate(args: HydrateArgs) -> Result<ExitCode> {
    tracing::debug!("hydrate: started");
    let key = read_keys(&args.key_file)?;
    let stack = args.sink.open()?;
    let sink = &stack.sink;
    let disk = resolve_disk(&args.state, args.disk.as_deref(), sink.as_ref()).await?;
    let device = open_device(&args.target, "target")?;
    let mut target = Target::open(&args.state, device, disk)?;
    tracing::debug!("hydrate: target opened");
    let bars = Bars::new(false);
    let r = hydrate_cycles(
        &mut target,
        sink.as_ref(),
        &key,
        &SystemClock,
        &HydrateConfig {
            catalog_reread: args.reread_catalog,
            ..HydrateConfig::default()
        },
        &bars,
    )
    .await?;
    let failed = if args.json {
        let mut v = hydrate_json(&r);
        if let Some(o) = v.as_object_mut() {
            o.insert("cache".into(), Value::from(stack.report()));
        }
        println!("{v}");
        r.failed.is_some()
    } else {
        print_hydrate(&r)
    };
    if failed {
        return Err(anyhow::Error::new(Failed(format!(
            "cycle {} failed",
            r.failed.as_ref().map_or(0, |f| f.cycle)
        ))));
    }
    Ok(ExitCode::SUCCESS)
}

/// `harness verify`; with `json`, the result as one JSON object.
pub fn verify(source: &Path, target: &Path, json: bool) -> Result<ExitCode> {
    let a = FileDevice::open_read_only(source)
        .map_err(|e| usage(format!("cannot open the source: {e}")))?;
    let b = FileDevice::open_read_only(target)
        .map_err(|e| usage(format!("cannot open the target: {e}")))?;
    let bars = Bars::new(false);
    let r = verify_devices(&a, &b, &bars)?;
    if json {
        println!(
            "{}",
            json!({
                "identical": r.identical(),
                "compared_bytes": r.compared_bytes,
                "differing_bytes": r.differing_bytes,
                "first_differences": r.first_differences.iter().map(|d| json!({
                    "offset_bytes": d.offset_bytes,
                    "len_bytes": d.len_bytes,
                })).collect::<Vec<_>>(),
            })
        );
        if r.identical() {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(anyhow::Error::new(Failed("the disks differ".into())));
    }
    if r.identical() {
        println!("identical: {} compared", table::bytes(r.compared_bytes));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "DIFFERENT: {} bytes differ; first differences:",
        r.differing_bytes
    );
    for d in &r.first_differences {
        println!(
            "  offset {} (sector {}), {} bytes",
            d.offset_bytes,
            d.offset_bytes / 512,
            d.len_bytes
        );
    }
    Err(anyhow::Error::new(Failed("the disks differ".into())))
}

/// Arguments of `harness status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// A source, target or kernel tracker state directory.
    #[arg(long)]
    state: PathBuf,
    /// Also list the disk's cycles in this cache.
    #[arg(long)]
    sink: Option<String>,
    /// Also show the kernel tracker with this state directory (its running daemon, or what it
    /// saved).
    #[arg(long)]
    tracker_state: Option<PathBuf>,
    /// Print the state as one JSON object: `source` and `target` (the state files' fields),
    /// `kernel_tracker` (the running tracker's figures), `cache_cycles`.
    #[arg(long)]
    json: bool,
}

/// A kernel tracker's state directory as JSON: the running daemon's figures, or that none runs.
fn kernel_json(dir: &Path) -> Value {
    match crate::ktrack::client::query_status(dir) {
        Ok(info) => json!({ "running": true, "state_dir": dir, "info": info }),
        Err(_) => json!({
            "running": false,
            "state_dir": dir,
            "state_file_present": dir.join(crate::ktrack::state::STATE_FILE).exists(),
        }),
    }
}

async fn cache_cycles(url: String, disk: &str) -> Result<Vec<u64>> {
    let sink = crate::sinks::open(&[url], None, "UTC", 1, None)?.sink;
    let id: DiskId = disk
        .parse()
        .map_err(|e| usage(format!("bad disk id: {e}")))?;
    let manifests = sink
        .list(&replicator_core::layout::manifests_prefix(&id))
        .await?;
    Ok(manifests
        .iter()
        .filter_map(|m| replicator_core::layout::cycle_of_key(&m.key))
        .collect())
}

/// `harness status`.
pub async fn status(args: StatusArgs) -> Result<ExitCode> {
    let source: Option<SourceState> = read_json_file(&args.state.join(SOURCE_FILE))?;
    let target: Option<TargetState> = read_json_file(&args.state.join(TARGET_FILE))?;
    let kernel = args.state.join(crate::ktrack::state::STATE_FILE).exists();
    if source.is_none() && target.is_none() && !kernel {
        return Err(usage(format!(
            "{} holds no source, target or kernel tracker state",
            args.state.display()
        )));
    }
    if args.json {
        let disk = source
            .as_ref()
            .map(|s| s.disk_id.clone())
            .or_else(|| target.as_ref().map(|t| t.disk_id.clone()));
        let cycles = match (args.sink, &disk) {
            (Some(url), Some(d)) => Some(cache_cycles(url, d).await?),
            _ => None,
        };
        let tracker_dir = args
            .tracker_state
            .clone()
            .or_else(|| kernel.then(|| args.state.clone()));
        println!(
            "{}",
            json!({
                "state_dir": args.state,
                "source": source,
                "target": target,
                "kernel_tracker": tracker_dir.as_deref().map(kernel_json),
                "cache_cycles": cycles,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    if kernel {
        crate::ktrack::status(&args.state)?;
    }
    let mut disk = None;
    if let Some(s) = &source {
        println!("source disk {} ({})", s.disk_id, table::bytes(s.disk_bytes));
        println!(
            "  next cycle {}, attempts {}, acknowledged through cycle {}",
            s.next_cycle, s.attempts, s.acked_cycle
        );
        let pending: Vec<u64> = s.pending.iter().map(|p| p.cycle).collect();
        println!("  shipped, awaiting acknowledgement: {pending:?}");
        if let Some(f) = &s.in_flight {
            println!(
                "  cycle {} (attempt {}) was interrupted; the next ship settles it",
                f.cycle, f.attempt
            );
        }
        println!(
            "  tracker: {} (generation {})",
            s.tracker_kind.as_deref().unwrap_or("none yet"),
            s.tracker_generation.as_deref().unwrap_or("-")
        );
        match &s.resync {
            Some(r) => println!("  tracking lost: a checksum resync is owed ({})", r.reason),
            None => println!("  tracking intact as far as this source knows"),
        }
        disk = Some(s.disk_id.clone());
    }
    if let Some(t) = &target {
        println!("target of disk {}", t.disk_id);
        println!(
            "  committed cycle {} (acknowledged: {})",
            t.committed_cycle, t.committed_acked
        );
        if let Some(c) = t.applying_cycle {
            println!(
                "  cycle {c} is partly applied: the target is NOT consistent until hydrate completes it or a later cycle"
            );
        }
        if !t.failed_cycles.is_empty() {
            println!(
                "  failed here (superseded by later cycles): {:?}",
                t.failed_cycles
            );
        }
        disk = Some(t.disk_id.clone());
    }
    if let Some(dir) = &args.tracker_state {
        crate::ktrack::status(dir)?;
    }
    if let (Some(url), Some(disk)) = (args.sink, disk) {
        let cycles = cache_cycles(url.clone(), &disk).await?;
        println!("cache {url}: committed cycles present {cycles:?}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `harness write`.
#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// The source disk.
    #[arg(long)]
    source: PathBuf,
    /// The source side's state directory (the tracker lives there).
    #[arg(long)]
    state: PathBuf,
    #[command(flatten)]
    tracker: WriterTrackerArgs,
    /// The write pattern: innodb (16 KiB random pages), postgres (8 KiB), log (sequential
    /// appends), zipf (16 KiB pages, a hot spot), overwrite (the whole disk once), zero (pages of
    /// zeros), discard (64 KiB-1 MiB discards).
    #[arg(long, value_enum, default_value_t = Pattern::Innodb)]
    pattern: Pattern,
    /// Bytes to write or discard, e.g. 64M, 1G (default 64M unless --ops is given).
    #[arg(long, value_parser = parse_size, conflicts_with = "ops")]
    bytes: Option<u64>,
    /// Operations (writes and discards) instead of bytes.
    #[arg(long)]
    ops: Option<u64>,
    /// At most this many bytes per second, e.g. 8M (default: as fast as the disk goes).
    #[arg(long, value_parser = parse_size)]
    rate: Option<u64>,
    /// Seed of the write offsets and contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The zipf pattern's exponent (default 1.1).
    #[arg(long)]
    zipf_exponent: Option<f64>,
    /// Run fio with this `rw` (randwrite, write, randrw, trim, randtrim, ...) instead of a
    /// built-in pattern, over the first --bytes of the disk (default all of it). fio writes to
    /// the device itself, so only the kernel tracker sees it: needs --tracker kernel.
    #[arg(long, conflicts_with_all = ["ops", "zipf_exponent"])]
    fio: Option<String>,
    /// fio's block size.
    #[arg(long, default_value = "16K", value_parser = parse_size, requires = "fio")]
    fio_bs: u64,
    /// fio's queue depth.
    #[arg(long, default_value_t = 32, requires = "fio")]
    fio_iodepth: u32,
}

/// Parses `4096`, `64K`, `16M`, `1G`, `2T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => {
            let unit = t[i..]
                .trim_end_matches(['i', 'B', 'b'])
                .to_ascii_uppercase();
            let mult: u64 = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => {
                    return Err(format!(
                        "unknown size unit `{other}` in `{s}`; use K, M, G or T"
                    ));
                }
            };
            (&t[..i], mult)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 64M or 1G"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// `harness write`.
pub fn write(args: WriteArgs) -> Result<ExitCode> {
    let known: Option<SourceState> = read_json_file(&args.state.join(SOURCE_FILE))?;
    let chosen = args.tracker.tracker;
    let chosen_name = match chosen {
        TrackerKind::Cbt => "cbt",
        TrackerKind::Hrl => "hrl",
        TrackerKind::Kernel => "kernel",
    };
    if let Some(kind) = known.and_then(|s| s.tracker_kind)
        && kind != chosen_name
    {
        let hint = if kind == "kernel" {
            format!(
                "the kernel tracker sees writes made by any program: pass --tracker kernel to \
                 write to {} directly",
                args.source.display()
            )
        } else {
            format!("pass --tracker {kind} (and the --tracker-state given to ship, if any)")
        };
        return Err(usage(format!(
            "{} is shipped with the {kind} tracker, not {chosen_name}: {hint}; writing through \
             another tracker would replace its state",
            args.state.display(),
        )));
    }
    if let Some(rw) = &args.fio {
        return write_fio(&args, rw, chosen);
    }
    let spec = WorkloadSpec {
        pattern: args.pattern,
        bytes: match (args.bytes, args.ops) {
            (None, None) => Some(64 << 20),
            (b, _) => b,
        },
        ops: args.ops,
        rate_bytes_per_s: args.rate,
        seed: args.seed,
        zipf_exponent: args.zipf_exponent,
    };
    let disk = FileDevice::open_read_only(&args.source)
        .map_err(|e| usage(format!("cannot open the source: {e}")))?
        .size_bytes();
    spec.validate(disk).map_err(|e| usage(format!("{e:#}")))?;
    if chosen == TrackerKind::Kernel {
        // Straight to the device, like any application: the running `harness track` sees it.
        let device = FileDevice::open(&args.source)
            .map_err(|e| usage(format!("cannot open the source: {e}")))?;
        let r = run_workload(&device, &spec)
            .with_context(|| format!("writing to {}", args.source.display()))?;
        print_workload(&spec, &r);
        println!("the kernel tracker marks what it saw for the next cycle");
        return Ok(ExitCode::SUCCESS);
    }
    let ((source, _), writer) = open_writable(
        chosen,
        args.tracker.tracker_state.as_deref(),
        &args.state,
        &args.source,
    )?;
    let tracker = source.tracker();
    let r = run_workload(writer.as_ref(), &spec)
        .with_context(|| format!("writing to {}", args.source.display()))?;
    tracker.checkpoint()?;
    print_workload(&spec, &r);
    println!(
        "{} now marked for the next cycle",
        table::bytes(tracker.current()?.count() * 512)
    );
    Ok(ExitCode::SUCCESS)
}

fn print_workload(spec: &WorkloadSpec, r: &crate::workload::WorkloadReport) {
    let mut line = format!(
        "wrote {} in {} {} writes",
        table::bytes(r.bytes_written),
        r.writes,
        spec.pattern.name()
    );
    if r.discards > 0 {
        line.push_str(&format!(
            ", discarded {} in {} discards",
            table::bytes(r.bytes_discarded),
            r.discards
        ));
    }
    println!("{line} in {} ms", r.elapsed_ms);
}

/// `harness write --fio RW`: fio on the device, seen by the kernel tracker.
fn write_fio(args: &WriteArgs, rw: &str, tracker: TrackerKind) -> Result<ExitCode> {
    if tracker != TrackerKind::Kernel {
        return Err(usage(
            "--fio writes to the device itself, which only the kernel tracker sees: pass \
             --tracker kernel (with `harness track` running on the device)",
        ));
    }
    let disk = FileDevice::open_read_only(&args.source)
        .map_err(|e| usage(format!("cannot open the source: {e}")))?
        .size_bytes();
    let size = args.bytes.unwrap_or(disk).min(disk) / args.fio_bs * args.fio_bs;
    let job = FioJob {
        rw: rw.to_owned(),
        bs: args.fio_bs,
        size,
        iodepth: args.fio_iodepth,
        rate_bytes_per_s: args.rate,
        runtime_s: None,
        seed: args.seed,
        direct: true,
    };
    job.validate().map_err(|e| usage(format!("{e:#}")))?;
    let workdir = args.state.join("fio");
    let r = fio::run(&job, &args.source, &workdir)?;
    println!(
        "fio {rw}: wrote {} in {} writes, trimmed {} in {} trims, in {} ms (job file {})",
        table::bytes(r.bytes_written),
        r.writes,
        table::bytes(r.bytes_trimmed),
        r.trims,
        r.runtime_ms,
        r.job_file.display()
    );
    println!("the kernel tracker marks what it saw for the next cycle");
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `harness gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    sink: SinkArgs,
    /// The source side's state directory (it decides what the target may still need).
    #[arg(long)]
    state: PathBuf,
    /// Acknowledged cycles to keep as recovery points, newest first.
    #[arg(long, default_value_t = GcPolicy::default().retain_cycles)]
    retain: u64,
    /// List what would be removed, and remove nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `harness gc`.
pub async fn gc(args: GcArgs) -> Result<ExitCode> {
    let stack = args.sink.open()?;
    let sink = &stack.sink;
    // Holding the source's lock: no ship can start an attempt whose blobs would look abandoned.
    let dir = StateDir::open(&args.state)?;
    let state: SourceState = dir.read_json(SOURCE_FILE)?.ok_or_else(|| {
        usage(format!(
            "{} holds no source state; run `harness ship` first",
            args.state.display()
        ))
    })?;
    let disk: DiskId = state
        .disk_id
        .parse()
        .map_err(|e| usage(format!("bad disk id in {}: {e}", args.state.display())))?;
    let policy = GcPolicy {
        retain_cycles: args.retain,
    };
    let plan = plan_gc(sink.as_ref(), &disk, &state, policy).await?;
    for item in &plan.items {
        println!(
            "{} {} ({}, {})",
            if args.dry_run {
                "would remove"
            } else {
                "remove"
            },
            item.key,
            item.reason,
            table::bytes(item.size_bytes)
        );
    }
    if args.dry_run {
        println!(
            "dry run: {} objects, {} would be freed",
            plan.items.len(),
            table::bytes(plan.bytes())
        );
        return Ok(ExitCode::SUCCESS);
    }
    let report = run_gc(sink.as_ref(), &plan).await;
    println!(
        "removed {} objects, freed {}",
        report.removed,
        table::bytes(report.bytes)
    );
    for (key, error) in &report.failed {
        eprintln!("could not remove {key}: {error} (retried next time)");
    }
    if report.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow::Error::new(Failed(format!(
            "{} objects could not be removed",
            report.failed.len()
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn usage_errors_exit_2_and_failures_1() {
        assert_eq!(exit_code_for(&usage("bad")), 2);
        assert_eq!(exit_code_for(&anyhow::Error::new(Failed("x".into()))), 1);
        let wrapped = usage("bad").context("while doing y");
        assert_eq!(exit_code_for(&wrapped), 2);
        assert_eq!(exit_code_for(&anyhow::anyhow!("plain failure")), 1);
    }
}
