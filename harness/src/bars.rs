//! Progress bars for long steps (drawn on stderr, hidden when it is not a terminal): one bar
//! for single-disk commands ([`Bars`]), one line per disk for runs of many ([`MultiBars`]).

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use replicator_core::progress::Progress;

/// Draws one bar per step.
#[derive(Debug, Default)]
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Bars {
    /// Bars on stderr; `quiet` draws nothing.
    pub fn new(quiet: bool) -> Self {
        Bars {
            bar: Mutex::new(None),
            quiet,
        }
    }

    /// Starts a bar outside the engine (image filling, workloads).
    pub fn start(&self, stage: &str, total: u64) {
        self.begin(stage, total);
    }
}

impl Progress for Bars {
    fn begin(&self, stage: &str, total_bytes: u64) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::new(total_bytes);
        let style = ProgressStyle::with_template(
            "{msg:>18} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(stage.to_owned());
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some(bar);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(slot) = self.bar.lock()
            && let Some(bar) = slot.as_ref()
        {
            bar.inc(bytes);
        }
    }

    fn end(&self) {
        if let Ok(mut slot) = self.bar.lock()
            && let Some(bar) = slot.take()
        {
            bar.finish_and_clear();
        }
    }
}

/// One line per disk under a shared [`MultiProgress`], for runs of many disks at once (the
/// scenario runner): each disk's current step shows as `NAME: STAGE` with its bar, and leaves
/// when the step ends. Drawn on stderr, and hidden when stderr is not a terminal.
#[derive(Debug, Clone)]
pub struct MultiBars {
    multi: Option<MultiProgress>,
}

impl MultiBars {
    /// Bars on stderr; `quiet` (or stderr not a terminal) draws nothing.
    pub fn new(quiet: bool) -> Self {
        let visible = !quiet && std::io::stderr().is_terminal();
        MultiBars {
            multi: visible.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// The [`Progress`] of one disk.
    pub fn disk(&self, name: &str) -> DiskBar {
        DiskBar {
            multi: self.multi.clone(),
            name: name.to_owned(),
            bar: Mutex::new(None),
        }
    }
}

/// One disk's line of a [`MultiBars`].
#[derive(Debug)]
pub struct DiskBar {
    multi: Option<MultiProgress>,
    name: String,
    bar: Mutex<Option<ProgressBar>>,
}

impl DiskBar {
    /// Starts a step outside the engine (filling, workloads, verification).
    pub fn start(&self, stage: &str, total: u64) {
        self.begin(stage, total);
    }
}

impl Progress for DiskBar {
    fn begin(&self, stage: &str, total_bytes: u64) {
        let Some(multi) = &self.multi else {
            return;
        };
        let bar = multi.add(ProgressBar::new(total_bytes));
        let style = ProgressStyle::with_template(
            "{msg:<28} [{bar:24}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(format!("{}: {stage}", self.name));
        if let Ok(mut slot) = self.bar.lock()
            && let Some(old) = slot.replace(bar)
        {
            old.finish_and_clear();
            multi.remove(&old);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(slot) = self.bar.lock()
            && let Some(bar) = slot.as_ref()
        {
            bar.inc(bytes);
        }
    }

    fn end(&self) {
        if let Ok(mut slot) = self.bar.lock()
            && let Some(bar) = slot.take()
        {
            bar.finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
    }
}
