//! Choosing a source's change tracker from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use replicator_core::device::FileDevice;
use replicator_core::source::Source;
use replicator_core::tracker::{CbtTracker, ChangeTracker, OpenReport, TrackerConfig};

use crate::commands::UsageError;
use crate::ktrack::KernelTracker;

/// The kinds of change tracker a source can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackerKind {
    /// Writes made through the harness (`harness write`, the demo) are marked as they pass.
    Cbt,
    /// The kernel's block events for the device, from a running `harness track`: writes by any
    /// process.
    Kernel,
}

/// Tracker options of `harness ship`.
#[derive(Debug, clap::Args)]
pub struct TrackerArgs {
    /// What tells a cycle which sectors changed: `cbt` (the harness's own writes), or `kernel`
    /// (every write to a block device, from a running `harness track`).
    #[arg(long, value_enum, default_value_t = TrackerKind::Cbt)]
    pub tracker: TrackerKind,
    /// The kernel tracker's state directory (what `harness track --state` was given).
    #[arg(long, required_if_eq("tracker", "kernel"))]
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
