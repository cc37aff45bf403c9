//! Choosing a source's change tracker from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use replicator_core::device::{BlockDevice, FileDevice};
use replicator_core::source::Source;
use replicator_core::tracker::hrl::{HrlConfig, HrlTracker};
use replicator_core::tracker::{CbtTracker, ChangeTracker, OpenReport, TrackerConfig};

use crate::commands::UsageError;
use crate::ktrack::KernelTracker;

/// The kinds of change tracker a source can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackerKind {
    /// Writes made through the harness (`harness write`, the demo) are marked as they pass.
    Cbt,
    /// Writes made through the harness are logged with their data (offset, length, data,
    /// checksum) to a write log, as Hyper-V Replica does; a cycle ships the logged data.
    Hrl,
    /// The kernel's block events for the device, from a running `harness track`: writes by any
    /// process.
    Kernel,
}

/// Tracker options of `harness ship`.
#[derive(Debug, clap::Args)]
pub struct TrackerArgs {
    /// What tells a cycle which sectors changed: `cbt` (the harness's own writes, marked),
    /// `hrl` (the harness's own writes, logged with their data), or `kernel` (every write to a
    /// block device, from a running `harness track`).
    #[arg(long, value_enum, default_value_t = TrackerKind::Cbt)]
    pub tracker: TrackerKind,
    /// The kernel tracker's state directory (what `harness track --state` was given); for `hrl`,
    /// where the write log lives (default: `tracker/` in the source's state directory; a
    /// directory next to the disk, e.g. `disk.img.hrl`, works as well).
    #[arg(long, required_if_eq("tracker", "kernel"))]
    pub tracker_state: Option<PathBuf>,
}

/// Tracker options of `harness write`, which writes through the tracker.
#[derive(Debug, clap::Args)]
pub struct WriterTrackerArgs {
    /// The tracker the source is shipped with: `cbt` or `hrl` (a `kernel`-tracked source is
    /// written by any program directly).
    #[arg(long, value_enum, default_value_t = TrackerKind::Cbt)]
    pub tracker: TrackerKind,
    /// For `hrl`: where the write log lives, as given to `harness ship`.
    #[arg(long)]
    pub tracker_state: Option<PathBuf>,
}

/// A source side opened with the chosen tracker.
pub type AnySource = Source<dyn ChangeTracker>;

/// Opens the source side in `state` for the disk at `source`, tracked as `args` say.
pub fn open_source(
    args: &TrackerArgs,
    state: &Path,
    source: &Path,
) -> Result<(AnySource, OpenReport)> {
    let opened = match args.tracker {
        TrackerKind::Cbt => {
            let device = FileDevice::open(source)
                .map_err(|e| UsageError(format!("cannot open the source: {e}")))?;
            Source::open_with(state, |dir| {
                let (t, r) = CbtTracker::open(device, dir, TrackerConfig::default())?;
                Ok((Arc::new(t) as Arc<dyn ChangeTracker>, r))
            })?
        }
        TrackerKind::Hrl => {
            open_writable(args.tracker, args.tracker_state.as_deref(), state, source)?.0
        }
        TrackerKind::Kernel => {
            let Some(dir) = &args.tracker_state else {
                return Err(UsageError(
                    "--tracker kernel needs --tracker-state DIR (the directory `harness track \
                     --state` runs on)"
                        .into(),
                )
                .into());
            };
            Source::open_with(state, |_| {
                let (t, r) = KernelTracker::connect(dir, source)?;
                Ok((Arc::new(t) as Arc<dyn ChangeTracker>, r))
            })?
        }
    };
    Ok(opened)
}

/// Opens the source side with a tracker that writes pass through (`cbt` or `hrl`); returns the
/// source, its open report, and the tracker as the device to write to.
pub fn open_writable(
    kind: TrackerKind,
    tracker_state: Option<&Path>,
    state: &Path,
    source: &Path,
) -> Result<((AnySource, OpenReport), Arc<dyn BlockDevice>)> {
    let device =
        FileDevice::open(source).map_err(|e| UsageError(format!("cannot open the source: {e}")))?;
    let mut writer: Option<Arc<dyn BlockDevice>> = None;
    let opened = match kind {
        TrackerKind::Cbt => Source::open_with(state, |dir| {
            let (t, r) = CbtTracker::open(device, dir, TrackerConfig::default())?;
            let t = Arc::new(t);
            writer = Some(Arc::clone(&t) as Arc<dyn BlockDevice>);
            Ok((t as Arc<dyn ChangeTracker>, r))
        })?,
        TrackerKind::Hrl => Source::open_with(state, |dir| {
            let log_dir = tracker_state.unwrap_or(dir);
            let (t, r) = HrlTracker::open(device, log_dir, HrlConfig::default())?;
            let t = Arc::new(t);
            writer = Some(Arc::clone(&t) as Arc<dyn BlockDevice>);
            Ok((t as Arc<dyn ChangeTracker>, r))
        })?,
        TrackerKind::Kernel => {
            return Err(UsageError(
                "the kernel tracker sees writes made by any program: write to the device directly"
                    .into(),
            )
            .into());
        }
    };
    let writer = writer.ok_or_else(|| UsageError("the tracker was not opened".into()))?;
    Ok((opened, writer))
}
