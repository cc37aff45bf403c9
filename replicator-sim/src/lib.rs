//! Deterministic simulation of the replicator.
//!
//! One `u64` seed drives everything: the workload written through the source's CBT tracker, a
//! [`SimClock`](replicator_core::clock::SimClock), a [`FaultSink`](replicator_sink::wrap::FaultSink)
//! with seeded probability rules over a [`LaggyListSink`] over a local cache, the volatile caches
//! of both sides' [`SimDevice`]s, and crashes of either side between or inside operations. After
//! every step [`run`] checks the target against a model of what the source held at each shipped
//! cycle's freeze; at the end, with faults off and the source quiesced, it requires the two disks
//! to become byte-identical within a bounded number of rounds. A failure names its seed and step
//! and lists the last steps; the same seed gives the same run.

pub mod device;
pub mod listing;
pub mod sim;

pub use device::{CrashReport, SimDevice};
pub use listing::LaggyListSink;
pub use sim::{Broken, DISK_BYTES, SimConfig, SimFailure, SimReport, run};
