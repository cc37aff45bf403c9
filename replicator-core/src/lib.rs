//! The replication engine: track what changed on a disk, ship it through an untrusted cache as
//! authenticated, encrypted blobs, hydrate it into a target, and prove the target equals the
//! source.
//!
//! The engine does I/O only through three traits: [`device::BlockDevice`] for disks,
//! [`replicator_sink::Sink`] for the cache, and [`clock::Clock`] for time. The cycle logic is
//! plain functions over them: [`source::ship_cycle`] and [`target::hydrate`].

pub mod assess;
pub mod bitmap;
pub mod catalog;
/// Time, injected: re-exported from `replicator_sink::clock`, where the sink wrappers need it too.
pub use replicator_sink::clock;
pub mod device;
pub mod error;
pub mod format;
pub mod gc;
pub mod keys;
pub mod layout;
pub mod pipeline;
pub mod progress;
pub mod schedule;
pub mod source;
pub mod state;
pub mod target;
pub mod tracker;
pub mod verify;

pub use error::{Error, ErrorKind, Result};
