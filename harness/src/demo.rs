//! `harness demo`: the whole product in one run, on image files or loop devices.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use replicator_core::clock::{Clock, SystemClock};
use replicator_core::device::{BlockDevice, FileDevice};
use replicator_core::keys::MasterKey;
use replicator_core::progress::Progress;
use replicator_core::schedule::SchedulePolicy;
use replicator_core::source::{ShipConfig, ShipOutcome, Source, ship_cycle};
use replicator_core::target::{HydrateConfig, Target, hydrate};
use replicator_core::tracker::ChangeTracker;
use replicator_core::verify::verify_devices;
use replicator_sink::Sink;
use replicator_sink::wrap::RetryPolicy;

use crate::bars::Bars;
use crate::commands::{Failed, UsageError, parse_size};
use crate::ktrack::{DaemonConfig, KernelTracker, RunningDaemon, daemon};
use crate::loopdev::LoopDevice;
use crate::table::{self, Row};
use crate::trackers::{AnySource, TrackerKind, open_writable};
use crate::workload::{Pattern, fill_image, run_pattern};

/// Arguments of `harness demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Size of the source disk (sparse), e.g. 1G, 256M.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Rounds of writes, each followed by a delta cycle, hydration and verification.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Bytes written per round.
    #[arg(long, default_value = "48M", value_parser = parse_size)]
    churn: u64,
    /// Seed of the image contents and the writes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Working directory (images, cache, state); default: a temporary directory removed after.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The cache: a directory, file:///path, memory://, az://container/prefix or
    /// s3://bucket/prefix (credentials from the usual AZURE_STORAGE_* / AWS_* variables).
    /// Default: a directory in the working directory.
    #[arg(long)]
    sink: Option<String>,
    /// Bandwidth limit by time of day (UTC) for the cache, e.g. `08:00-20:00=100Mbit/s,*=unlimited`.
    #[arg(long)]
    throttle: Option<String>,
    /// Run on Linux loop devices over the image files (needs root and losetup).
    #[arg(long = "loop")]
    loop_devices: bool,
    /// The source's change tracker: `cbt` marks the demo's writes as they pass through it;
    /// `kernel` (needs --loop) writes to the loop device like an application and follows the
    /// kernel's block events, as `harness track` does.
    #[arg(long, value_enum, default_value_t = TrackerKind::Cbt)]
    tracker: TrackerKind,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

struct Disks {
    source: PathBuf,
    target: PathBuf,
    _loops: Vec<LoopDevice>,
}

fn make_disks(dir: &Path, size: u64, use_loop: bool) -> Result<Disks> {
    if size == 0 || !size.is_multiple_of(512) {
        bail!(crate::commands::UsageError(format!(
            "--size {size} must be a positive multiple of 512 bytes"
        )));
    }
    let src = dir.join("source.img");
    let tgt = dir.join("target.img");
    if !use_loop {
        FileDevice::create_sparse(&src, size)?;
        FileDevice::create_sparse(&tgt, size)?;
        return Ok(Disks {
            source: src,
            target: tgt,
            _loops: Vec::new(),
        });
    }
    let ls = LoopDevice::create(&src, size)?;
    let lt = LoopDevice::create(&tgt, size)?;
    for l in [&ls, &lt] {
        tracing::info!(
            device = %l.path().display(),
            backing = %l.backing().display(),
            direct_io = l.direct_io(),
            "attached a loop device"
        );
    }
    Ok(Disks {
        source: ls.path().to_path_buf(),
        target: lt.path().to_path_buf(),
        _loops: vec![ls, lt],
    })
}

/// The source side of a demo: the tracked source, where workloads write, and where the source
/// is read for verification. Fields drop in order: the source (a tracker client) before the
/// tracker daemon it talks to.
struct DemoSource {
    source: AnySource,
    writer: Arc<dyn BlockDevice>,
    reader: Arc<dyn BlockDevice>,
    _daemon: Option<RunningDaemon>,
}

fn open_demo_source(kind: TrackerKind, dir: &Path, disk: &Path) -> Result<DemoSource> {
    let state = dir.join("source-state");
    match kind {
        TrackerKind::Cbt | TrackerKind::Hrl => {
            // Writes go through the tracker, which is also a block device.
            let ((source, _), writer) = open_writable(kind, None, &state, disk)?;
            Ok(DemoSource {
                source,
                writer,
                reader: Arc::new(FileDevice::open_read_only(disk)?),
                _daemon: None,
            })
        }
        TrackerKind::Kernel => {
            // The daemon `harness track` runs, in-process; the workload writes to the device
            // node like any application, and the tracker sees it in the kernel's events.
            let tracker_dir = dir.join("tracker-state");
            let daemon = daemon::start(&DaemonConfig {
                device: disk.to_path_buf(),
                state_dir: tracker_dir.clone(),
                checkpoint_interval: Duration::from_secs(daemon::CHECKPOINT_SECS_DEFAULT),
                buffer_kb_per_cpu: daemon::BUFFER_KB_PER_CPU_DEFAULT,
                verbose: false,
            })?;
            let (source, _) = Source::open_with(&state, |_| {
                let (t, r) = KernelTracker::connect(&tracker_dir, disk)?;
                Ok((Arc::new(t) as Arc<dyn ChangeTracker>, r))
            })?;
            let device: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(disk)?);
            Ok(DemoSource {
                source,
                writer: Arc::clone(&device),
                reader: device,
                _daemon: Some(daemon),
            })
        }
    }
}

/// Runs the demo. Exit 0 only if the target ends byte-identical to the source after every cycle.
pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.tracker == TrackerKind::Kernel && !args.loop_devices {
        bail!(UsageError(
            "--tracker kernel follows a Linux block device: add --loop (as root)".into()
        ));
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("replicator-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let bars = Bars::new(args.quiet);
    let clock = SystemClock;
    // The sink first: a bad URL is refused before any image is made.
    let urls = match &args.sink {
        Some(url) => vec![url.clone()],
        None => vec![dir.join("cache").display().to_string()],
    };
    let stack = crate::sinks::open(
        &urls,
        args.throttle.as_deref(),
        "UTC",
        RetryPolicy::default().attempts_max,
        None,
    )?;
    let sink: Arc<dyn Sink> = Arc::clone(&stack.sink);
    let disks = make_disks(&dir, args.size, args.loop_devices)?;
    println!(
        "replicator demo: {} source {} -> target {} via cache {}",
        table::bytes(args.size),
        disks.source.display(),
        disks.target.display(),
        sink.describe()
    );

    {
        let raw = FileDevice::open(&disks.source)?;
        bars.start("fill source", raw.size_bytes());
        fill_image(&raw, args.seed, |n| bars.advance(n))?;
        bars.end();
    }

    let key = MasterKey::generate()?;
    let mut demo = open_demo_source(args.tracker, &dir, &disks.source)?;
    let source = &mut demo.source;
    println!(
        "tracker: {} ({})",
        source.tracker().kind(),
        match args.tracker {
            TrackerKind::Cbt => "the demo's writes pass through it",
            TrackerKind::Hrl =>
                "the demo's writes are logged with their data, then shipped from the log",
            TrackerKind::Kernel => "the kernel's block events for the source device",
        }
    );
    let mut target = Target::open(
        &dir.join("target-state"),
        FileDevice::open(&disks.target)?,
        source.disk_id(),
    )?;
    let cfg = ShipConfig::default();
    let policy = SchedulePolicy::default();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let mut log_cursor = 0u64;
    let patterns = [Pattern::Innodb, Pattern::Postgres, Pattern::Log];

    println!("{}", table::header());
    let mut rows = Vec::new();
    let mut all_identical = true;
    for round in 0..=args.rounds + 1 {
        // Round 0 is the initial copy; the last one is the cutover with writes stopped.
        let (kind, pattern) = if round == 0 {
            ("initial".to_owned(), None)
        } else if round == args.rounds + 1 {
            ("cutover".to_owned(), None)
        } else {
            let p = patterns[(round as usize - 1) % patterns.len()];
            (p.name().to_owned(), Some(p))
        };
        if let Some(p) = pattern {
            bars.start(&format!("write {}", p.name()), args.churn);
            run_pattern(
                demo.writer.as_ref(),
                p,
                args.churn,
                &mut rng,
                &mut log_cursor,
            )?;
            // Like an application before a consistency point: the writes reach the device.
            demo.writer.flush()?;
            bars.advance(args.churn);
            bars.end();
        }
        let ship_started = clock.now();
        let mut outcome = ship_cycle(source, sink.as_ref(), &key, &clock, &cfg, &bars).await?;
        if let ShipOutcome::AwaitingCatalog { reason, .. } = &outcome {
            // The target answers the resync request on its next hydrate; then ship again.
            println!("checksum resync owed ({reason}); asking the target for its digests");
            hydrate(
                &mut target,
                sink.as_ref(),
                &key,
                &clock,
                &HydrateConfig::default(),
                &bars,
            )
            .await?;
            outcome = ship_cycle(source, sink.as_ref(), &key, &clock, &cfg, &bars).await?;
        }
        let shipped = outcome.into_shipped()?;
        let ship_took = clock.now().since(ship_started);
        let hydrate_started = clock.now();
        let hydrated = hydrate(
            &mut target,
            sink.as_ref(),
            &key,
            &clock,
            &HydrateConfig::default(),
            &bars,
        )
        .await?;
        let hydrate_took = clock.now().since(hydrate_started);
        if let Some(f) = &hydrated.failed {
            println!("cycle {} failed on the target: {}", f.cycle, f.error);
            all_identical = false;
        }
        let report = verify_devices(demo.reader.as_ref(), target.device(), &bars)?;
        let identical = report.identical();
        if !identical {
            all_identical = false;
            for d in &report.first_differences {
                println!(
                    "  differs at offset {} ({} bytes)",
                    d.offset_bytes, d.len_bytes
                );
            }
        }
        let next_delta_in = if round == 0 {
            Some(Duration::ZERO)
        } else if round == args.rounds + 1 {
            None
        } else {
            Some(policy.delta_interval(ship_took))
        };
        let row = Row {
            cycle: shipped.cycle,
            kind,
            changed_bytes: shipped.changed_bytes(),
            blob_bytes: shipped.stored_bytes,
            ship: ship_took,
            hydrate: hydrate_took,
            next_delta_in,
            verified: Some(identical),
        };
        println!("{}", table::line(&row));
        rows.push(row);
    }
    let changed: u64 = rows.iter().skip(1).map(|r| r.changed_bytes).sum();
    let stored: u64 = rows.iter().skip(1).map(|r| r.blob_bytes).sum();
    println!(
        "deltas: {} changed, {} stored in the cache; ratio {:.2}; \"next delta\" is min(max(1h, ship time / 2), 12h)",
        table::bytes(changed),
        table::bytes(stored),
        if stored == 0 {
            0.0
        } else {
            changed as f64 / stored as f64
        }
    );
    println!("cache: {}", stack.report());
    if args.dir.is_some() {
        println!("kept {}", dir.display());
    }
    if !all_identical {
        return Err(anyhow::Error::new(Failed(
            "the target is not identical to the source".into(),
        )));
    }
    println!("target is byte-identical to the source after every cycle");
    Ok(ExitCode::SUCCESS)
}
