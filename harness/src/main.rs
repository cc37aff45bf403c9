//! `harness`: drives the replication engine against image files and Linux loop devices.
//!
//! Exit codes: 0 success; 1 a cycle or a verification failed; 2 bad usage or input.
#![allow(clippy::print_stdout, clippy::print_stderr)] // the binary owns printing

mod assess;
mod bars;
mod commands;
mod demo;
mod fio;
mod image;
mod ktrack;
mod loopdev;
mod memory;
mod scenario;
mod sinks;
mod table;
mod trackers;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Block-level replication: copy a disk once, then only its changed sectors, through an
/// encrypted cache, into a target proven byte-identical.
///
/// The source and target sides keep separate state directories over one sink, so they can run
/// as separate processes or on separate machines. Exit codes: 0 success, 1 a cycle or
/// verification failed, 2 bad usage or input.
#[derive(Debug, Parser)]
#[command(name = "harness", version, about, long_about)]
struct Cli {
    /// Log level filter for diagnostics on stderr (e.g. `info`, `replicator_core=debug`).
    #[arg(long, global = true, default_value = "warn", env = "REPLICATOR_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a full replication demo: make a source image, copy it, churn it, ship deltas,
    /// hydrate, verify, and print a table per cycle. Needs no flags.
    Demo(demo::DemoArgs),
    /// Write a new random master key to a file (mode 0600).
    Keygen {
        /// Where to write the key file; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
    /// Ship one source cycle to the sink: the initial full copy if none yet, else a delta.
    Ship(commands::ShipArgs),
    /// Apply every committed cycle not yet applied to the target, reconcile, acknowledge.
    Hydrate(commands::HydrateArgs),
    /// Compare two disks byte for byte and report the first differing offsets.
    Verify {
        /// The source file or block device.
        #[arg(long)]
        source: PathBuf,
        /// The target file or block device.
        #[arg(long)]
        target: PathBuf,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show the replication state of a source, target or kernel tracker state directory: cycles,
    /// the tracker kind, and whether tracking is lost.
    Status(commands::StatusArgs),
    /// Write a workload to the source through its tracker, so the next ship sees every change.
    Write(commands::WriteArgs),
    /// Remove cache objects no longer needed (acknowledged beyond the retained cycles, superseded,
    /// abandoned attempts, processed acknowledgements). Every ship also does this.
    Gc(commands::GcArgs),
    /// Track a block device's changes from the kernel's block events (as root; tracefs), until
    /// SIGTERM or Ctrl-C: every write by any process is marked, for `ship --tracker kernel`.
    Track(ktrack::TrackArgs),
    /// Sample block devices' write counters and say, per disk, whether its churn fits the
    /// replication tiers (P95 of 10-minute peaks x 1.3 against per-disk and per-VM limits).
    Assess(assess::AssessArgs),
    /// Run a scenario file (TOML, see docs/SCENARIOS.md): disks, workloads, cycles, faults and
    /// expectations; writes a JSON report and a summary, exits 1 naming any failed expectation.
    Scenario(scenario::ScenarioArgs),
    /// Write a realistic file-system-like image (text, binary, random, sparse zero segments).
    Image(image::ImageArgs),
}

/// glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); after that
/// the pipelines' blob buffers of a few MiB come from per-thread arenas that keep freed memory,
/// and the peak RSS creeps up with the number of blobs a run handles instead of staying at the
/// pipelines' in-flight budget (measured: a 256 MiB hydrate peaked at 99 MiB, 48 MiB with the
/// threshold fixed). A fixed 1 MiB threshold gives every large buffer its own mapping, returned
/// to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only tunes the allocator; it runs first thing in main, before any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

fn main() -> ExitCode {
    fix_malloc_mmap_threshold();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let report_memory = matches!(
        cli.command,
        Command::Demo(_) | Command::Ship(_) | Command::Hydrate(_)
    );
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Keygen { out } => commands::keygen(&out),
            Command::Ship(args) => commands::ship(args).await,
            Command::Hydrate(args) => commands::hydrate(args).await,
            Command::Verify {
                source,
                target,
                json,
            } => commands::verify(&source, &target, json),
            Command::Status(args) => commands::status(args).await,
            Command::Write(args) => commands::write(args),
            Command::Gc(args) => commands::gc(args).await,
            Command::Track(args) => ktrack::run(args).await,
            Command::Assess(args) => assess::run(args).await,
            Command::Scenario(args) => scenario::run(args).await,
            Command::Image(args) => image::run(args),
        }
    });
    if report_memory && let Some(peak) = memory::peak_rss_bytes() {
        eprintln!("peak memory (RSS): {}", table::bytes(peak));
    }
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(commands::exit_code_for(&err))
        }
    }
}
