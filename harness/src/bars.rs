//! Progress bars for long steps (drawn on stderr, hidden when it is not a terminal).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
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
