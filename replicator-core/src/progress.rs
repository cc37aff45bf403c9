//! Progress of long steps, reported to whoever embeds the engine (the harness draws bars).

/// Receives progress of a long step. Implementations must be cheap: `advance` is called per blob
/// or per megabyte.
pub trait Progress: Send + Sync {
    /// A step named `stage` starts; `total_bytes` is its size, 0 if unknown.
    fn begin(&self, stage: &str, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The step ended.
    fn end(&self);
}

/// Ignores progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _stage: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
}
