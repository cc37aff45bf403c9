//! The kernel tracker: changed-sector tracking for any Linux block device, from the kernel's block
//! tracepoints, so writes by any process (a file system, a database, `dd`) are seen.
//!
//! `harness track` runs [`daemon`] on one device; `harness ship --tracker kernel` talks to it
//! through [`client::KernelTracker`]. The pieces: [`tracefs`] (a private trace instance),
//! [`parse`] (its lines), `marks` (epochs, freezes, releases, lost tracking), [`device`] (sysfs
//! facts and counters), [`state`] (the persisted marks), `recovery` (what a start trusts),
//! [`proto`] (the socket protocol).

pub mod client;
pub mod daemon;
pub mod device;
mod marks;
pub mod parse;
pub mod proto;
mod recovery;
pub mod state;
pub mod tracefs;

#[cfg(test)]
mod conformance_tests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};

pub use client::KernelTracker;
pub use daemon::{DaemonConfig, RunningDaemon};

use crate::table;

/// Arguments of `harness track`.
#[derive(Debug, clap::Args)]
pub struct TrackArgs {
    /// The block device to track: a whole disk or a loop device, e.g. /dev/loop3.
    #[arg(long)]
    device: PathBuf,
    /// The tracker's state directory: its marks, lock and socket. Give the same directory to
    /// `harness ship --tracker kernel --tracker-state DIR`.
    #[arg(long)]
    state: PathBuf,
    /// Seconds between checkpoints of the marks while they change (every freeze, release and
    /// stop also checkpoints).
    #[arg(long, default_value_t = daemon::CHECKPOINT_SECS_DEFAULT)]
    checkpoint_secs: u64,
    /// Kernel trace buffer per CPU, in KiB; an overflow loses events, and so tracking.
    #[arg(long, default_value_t = daemon::BUFFER_KB_PER_CPU_DEFAULT)]
    buffer_kb: u64,
}

/// How often `track` looks at whether its daemon failed.
const FAILURE_POLL: Duration = Duration::from_secs(1);

/// Prints a tracker's state, indented.
pub fn print_info(info: &proto::Info, running: bool) {
    println!(
        "kernel tracker of {} ({}:{}{}), {}",
        info.device,
        info.major,
        info.minor,
        info.backing_file
            .as_deref()
            .map(|b| format!(", over {b}"))
            .unwrap_or_default(),
        table::bytes(info.disk_bytes)
    );
    if running {
        println!(
            "  running (pid {}), started from {}",
            info.pid, info.started
        );
    }
    println!(
        "  generation {}, epoch {}{}, acknowledged through epoch {}",
        info.generation,
        info.epoch,
        info.frozen_epoch
            .map(|e| format!(" (epoch {e} frozen by a cycle)"))
            .unwrap_or_default(),
        info.acked_epoch
    );
    println!(
        "  {} marked for the next cycle",
        table::bytes(info.marked_sectors * 512)
    );
    match &info.lost {
        Some(reason) => println!(
            "  tracking LOST: {reason}; the next cycle covers the whole disk and compares it with \
             the target"
        ),
        None => println!("  tracking intact"),
    }
}

/// The state of the tracker in `dir`: from its daemon if one runs, else from its state file.
pub fn status(dir: &Path) -> Result<()> {
    match client::query_status(dir) {
        Ok(info) => {
            print_info(&info, true);
            return Ok(());
        }
        Err(e) => tracing::debug!(error = %e, "no running tracker"),
    }
    let path = dir.join(state::STATE_FILE);
    let bytes =
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    println!(
        "kernel tracker state {} (no tracker is running: start `harness track --state {}`)",
        path.display(),
        dir.display()
    );
    match state::decode(&bytes) {
        Ok(s) => {
            let info = proto::Info {
                device: "(not running)".into(),
                major: s.device.major,
                minor: s.device.minor,
                disk_bytes: s.device.size_bytes,
                backing_file: s.device.backing_file.clone(),
                generation: s.generation.to_string(),
                epoch: s.epoch,
                frozen_epoch: s.frozen.as_ref().map(|f| f.epoch),
                marked_sectors: if s.lost.is_some() {
                    s.current.disk_sectors()
                } else {
                    s.current.count()
                },
                lost: s.lost.clone(),
                acked_epoch: s.acked_epoch,
                change_events: 0,
                pid: 0,
                started: String::new(),
            };
            print_info(&info, false);
            println!(
                "  last written by {}",
                if s.clean_stop {
                    "a clean stop"
                } else {
                    "a running tracker (it did not stop cleanly, or is starting)"
                }
            );
        }
        Err(why) => println!("  DAMAGED ({why}): the next start makes it anew, with tracking lost"),
    }
    Ok(())
}

/// `harness track`: runs the daemon until SIGTERM or Ctrl-C.
pub async fn run(args: TrackArgs) -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    if args.checkpoint_secs == 0 {
        bail!(crate::commands::UsageError(
            "--checkpoint-secs must be at least 1".into()
        ));
    }
    let cfg = DaemonConfig {
        device: args.device.clone(),
        state_dir: args.state.clone(),
        checkpoint_interval: Duration::from_secs(args.checkpoint_secs),
        buffer_kb_per_cpu: args.buffer_kb,
        verbose: true,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let daemon = daemon::start(&cfg)?;
    let info = daemon.info();
    print_info(&info, true);
    println!(
        "listening on {}; ready (stop with SIGTERM or Ctrl-C)",
        daemon.socket_path().display()
    );
    let mut poll = tokio::time::interval(FAILURE_POLL);
    let failure = loop {
        tokio::select! {
            _ = terminate.recv() => break None,
            _ = interrupt.recv() => break None,
            _ = poll.tick() => {
                if let Some(f) = daemon.failure() {
                    break Some(f);
                }
            }
        }
    };
    let stopped = tokio::task::spawn_blocking(move || daemon.stop()).await?;
    if let Some(f) = failure {
        bail!(
            "the tracker stopped: {f}; tracking is lost and the next cycle compares the whole disk"
        );
    }
    stopped?;
    println!(
        "stopped cleanly; the marks are saved in {}",
        args.state.display()
    );
    Ok(ExitCode::SUCCESS)
}
