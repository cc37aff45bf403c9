//! Change trackers: what tells a cycle which sectors of the source changed, and serves the cycle
//! the frozen sectors' contents.
//!
//! Every tracker implements [`ChangeTracker`], and every one passes the same model-based suite,
//! [`conformance`] (run by `tests/tracker_conformance.rs`; public so that trackers outside this
//! crate, like the harness's kernel tracker, run it too). The kinds:
//!
//! - [`cbt::CbtTracker`]: a [`BlockDevice`](crate::device::BlockDevice) wrapper that marks each
//!   write passing through it (VMware CBT style), with copy-on-write for point-in-time frozen
//!   reads and an activity log for crash recovery.
//! - [`hrl::HrlTracker`]: a write log next to the disk (Hyper-V Replica style): every write is
//!   logged (offset, length, data, CRC) before it reaches the device, and the cycle ships the
//!   logged data, point in time without copy-on-write.
//! - The kernel tracker lives in the harness (only the harness knows Linux devices): it follows
//!   the kernel's block tracepoints for writes by any process.
//!
//! # The contract (what the conformance suite checks)
//! - Epochs: marks go into the *current* epoch. [`ChangeTracker::freeze`] atomically ends it and
//!   returns its bitmap; every sector written (completed) before the freeze is in that bitmap or
//!   in an earlier epoch's. A write that completes after the frozen cycle read its sector is in a
//!   later epoch.
//! - [`ChangeTracker::read_frozen`] serves any sector of the frozen bitmap, each read once per
//!   freeze. Trackers that can (CBT, HRL) serve the disk as of the freeze; the kernel tracker
//!   reads the live device (a later write to the sector is then in a later epoch).
//! - [`ChangeTracker::release`]: `committed` drops the frozen marks (the cycle is safely in the
//!   cache); otherwise they return to the current epoch. No mark is ever lost.
//! - [`ChangeTracker::carry`] puts back the sectors of a shipped cycle the target failed.
//! - [`ChangeTracker::acknowledged`]: the target applied the cycle of that epoch and every earlier
//!   one; a tracker may now forget what it kept for them (the HRL log is truncated only then).
//! - Persistence: a persistent tracker's marks survive a restart, clean or not. A tracker that
//!   cannot vouch for its marks (events lost, the tracker was down while the device was written,
//!   its state was damaged) says so in [`Frozen::lost`] with the whole disk marked: the cycle
//!   then compares checksums with the target instead of trusting the bitmap.
//! - [`ChangeTracker::generation`] names the tracker's state; it changes when the state is made
//!   anew, so a source notices tracker state that is not the one it shipped with.

use std::fmt;
use std::str::FromStr;

use crate::bitmap::SectorBitmap;
use crate::error::{Error, Result};

/// Implements [`BlockDevice`](crate::device::BlockDevice) for a tracker that writes pass
/// through: reads, size and flush go to its `dev`; writes go through its `write_tracked` and
/// discards through its `discard_tracked` (marked like writes: the next cycle ships the range,
/// which then reads as zeros), and a tracker error becomes a device error naming the tracker.
macro_rules! write_through_device {
    ($tracker:ident) => {
        impl<D: $crate::device::BlockDevice> $crate::device::BlockDevice for $tracker<D> {
            fn name(&self) -> &str {
                self.dev.name()
            }

            fn size_bytes(&self) -> u64 {
                self.dev.size_bytes()
            }

            fn read_at(
                &self,
                buf: &mut [u8],
                offset_bytes: u64,
            ) -> std::result::Result<(), $crate::device::DeviceError> {
                self.dev.read_at(buf, offset_bytes)
            }

            fn write_at(
                &self,
                buf: &[u8],
                offset_bytes: u64,
            ) -> std::result::Result<(), $crate::device::DeviceError> {
                self.write_tracked(buf, offset_bytes)
                    .map(|_| ())
                    .map_err(|e| match e {
                        $crate::error::Error::Device(d) => d,
                        other => $crate::device::DeviceError::new(
                            &self.name,
                            $crate::device::DeviceOp::Write,
                            offset_bytes,
                            buf.len() as u64,
                            other.to_string(),
                        ),
                    })
            }

            fn flush(&self) -> std::result::Result<(), $crate::device::DeviceError> {
                self.dev.flush()
            }

            fn discard(
                &self,
                offset_bytes: u64,
                len_bytes: u64,
            ) -> std::result::Result<(), $crate::device::DeviceError> {
                self.discard_tracked(offset_bytes, len_bytes)
                    .map(|_| ())
                    .map_err(|e| match e {
                        $crate::error::Error::Device(d) => d,
                        other => $crate::device::DeviceError::new(
                            &self.name,
                            $crate::device::DeviceOp::Discard,
                            offset_bytes,
                            len_bytes,
                            other.to_string(),
                        ),
                    })
            }
        }
    };
}
use write_through_device;

pub mod cbt;
pub mod conformance;
pub mod hrl;
pub mod kernel_state;

pub use cbt::{CbtTracker, TrackerConfig};
pub use hrl::{HrlConfig, HrlTracker, LogLimit};

/// Recovery facts from opening a persistent tracker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The previous run stopped without a clean stop (a crash).
    pub unclean: bool,
    /// CBT: activity-log regions marked whole because of it.
    pub regions_recovered: u64,
    /// A frozen epoch that never committed was merged back.
    pub frozen_merged: bool,
    /// The tracker cannot vouch for its marks (why): the next cycle compares checksums.
    pub lost: Option<String>,
    /// HRL: log segments whose torn or damaged tail was cut off (the first record failing its
    /// checksum or structure ends a segment).
    pub log_tails_cut: u64,
    /// HRL: bytes cut off those tails.
    pub log_bytes_cut: u64,
    /// HRL: logged writes applied to the device again after an unclean stop, so that the device
    /// holds what the log says.
    pub records_redone: u64,
}

/// Bytes of a [`Generation`].
pub const GENERATION_LEN: usize = 16;

/// 16 random bytes naming one incarnation of a tracker's or a target's state. Shown as 32 hex
/// characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub [u8; GENERATION_LEN]);

impl Generation {
    /// A new random generation.
    pub fn generate() -> Result<Self> {
        let mut id = [0u8; GENERATION_LEN];
        getrandom::fill(&mut id)
            .map_err(|e| Error::InvalidInput(format!("no randomness for a generation id: {e}")))?;
        Ok(Self(id))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Generation({self})")
    }
}

impl FromStr for Generation {
    type Err = String;

    /// Exactly 32 hex characters.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.len() != GENERATION_LEN * 2 || !s.is_ascii() {
            return Err(format!(
                "a generation is {} hex characters, got {:?}",
                GENERATION_LEN * 2,
                s.chars().take(80).collect::<String>()
            ));
        }
        let mut out = [0u8; GENERATION_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{s:?} is not hex (at character {})", 2 * i + 1))?;
        }
        Ok(Self(out))
    }
}

/// What [`ChangeTracker::freeze`] hands the cycle.
#[derive(Clone, Debug)]
pub struct Frozen {
    /// The frozen epoch's number.
    pub epoch: u64,
    /// The sectors changed in that epoch (what the cycle must ship).
    pub bitmap: SectorBitmap,
    /// Tracking was lost before this freeze (why): the bitmap is the whole disk, and the cycle
    /// must compare checksums with the target rather than ship it all. Cleared by the first
    /// committed release after it was reported.
    pub lost: Option<String>,
    /// Bytes written into the epoch (each write counted in full, however often it rewrote the
    /// same sectors), if the tracker counts them: with the bitmap, how much writes fold.
    pub bytes_written: Option<u64>,
}

/// A change tracker of one disk. See the module documentation for the contract.
pub trait ChangeTracker: Send + Sync + fmt::Debug {
    /// The kind, for messages and state: `cbt`, `hrl` or `kernel`.
    fn kind(&self) -> &'static str;

    /// What it tracks, for messages (a device name or path).
    fn name(&self) -> &str;

    /// The tracked disk's size.
    fn disk_bytes(&self) -> u64;

    /// The identity of this tracker's state: kept across restarts, new when the state is made.
    fn generation(&self) -> Generation;

    /// The number of the current (unfrozen) epoch.
    fn epoch(&self) -> Result<u64>;

    /// A copy of the current epoch's marks.
    fn current(&self) -> Result<SectorBitmap>;

    /// Marks the whole disk changed (before an initial copy or a checksum resync) and persists it.
    fn mark_all(&self) -> Result<()>;

    /// Puts `sectors` back into the current epoch: a shipped cycle failed on the target.
    fn carry(&self, sectors: &SectorBitmap) -> Result<()>;

    /// Freezes the current epoch: its bitmap becomes the frozen cycle's, and later writes go to a
    /// new epoch. Persisted before it returns. Fails if an epoch is already frozen.
    fn freeze(&self) -> Result<Frozen>;

    /// Reads `buf.len()` bytes at `offset_bytes` (sector-aligned, every sector in the frozen
    /// bitmap) for the frozen cycle.
    fn read_frozen(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()>;

    /// Ends the frozen epoch. `committed`: the cycle is in the cache, so its marks are dropped;
    /// otherwise they go back into the current epoch. No frozen epoch: nothing to do.
    fn release(&self, committed: bool) -> Result<()>;

    /// The target applied the cycle that froze `epoch` (and every earlier one).
    fn acknowledged(&self, epoch: u64) -> Result<()> {
        let _ = epoch;
        Ok(())
    }

    /// Persists the marks now (a clean stop point).
    fn checkpoint(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_text_round_trip() {
        let g = Generation([0xAB; GENERATION_LEN]);
        let s = g.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<Generation>().unwrap(), g);
        assert!("ab".parse::<Generation>().is_err());
        assert!("zz".repeat(16).parse::<Generation>().is_err());
    }
}
