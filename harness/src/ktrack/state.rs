//! `ktrack.state`: the kernel tracker's persisted state. Its byte format is in
//! `replicator_core::tracker::kernel_state` (with every other format, and fuzzed there).

pub use replicator_core::tracker::kernel_state::*;
