//! `SimDevice`: a block device with a volatile write cache, as real disks have. Writes are
//! visible at once but reach the durable medium only on `flush`; a crash keeps a seeded random
//! subset of the unflushed sectors (sectors are atomic, their order is not) and drops the rest.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rand::Rng;
use replicator_core::device::{BlockDevice, DeviceError, DeviceOp, check_range};

const SECTOR_BYTES: u64 = 512;

#[derive(Debug)]
struct DevState {
    /// What reads return: the medium with the cache on top.
    visible: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Sectors written since the last flush.
    dirty: BTreeSet<u64>,
    /// False for a broken device that acknowledges flushes without persisting anything.
    flush_persists: bool,
    /// Writes that may still succeed before the power is cut (`None`: no cut planned).
    writes_left: Option<u64>,
}

/// What a crash did to the unflushed sectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Unflushed sectors at the crash.
    pub dirty_sectors: u64,
    /// Those that reached the medium anyway.
    pub kept_sectors: u64,
}

/// A simulated disk with a volatile write cache; see the module docs.
#[derive(Debug)]
pub struct SimDevice {
    name: String,
    size_bytes: u64,
    state: Mutex<DevState>,
}

impl SimDevice {
    /// A device holding `content` (durable), whose length must be a multiple of 512 bytes.
    pub fn with_content(name: &str, content: Vec<u8>) -> Self {
        assert!(
            (content.len() as u64).is_multiple_of(SECTOR_BYTES),
            "a device is whole sectors"
        );
        SimDevice {
            name: name.to_owned(),
            size_bytes: content.len() as u64,
            state: Mutex::new(DevState {
                durable: content.clone(),
                visible: content,
                dirty: BTreeSet::new(),
                flush_persists: true,
                writes_left: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DevState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` over what a read of the whole device returns now.
    pub fn with_visible<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.lock().visible)
    }

    /// A copy of what a read of the whole device returns now.
    pub fn visible(&self) -> Vec<u8> {
        self.lock().visible.clone()
    }

    /// Makes the device break its flush promise (`false`): a deliberately broken set-up.
    pub fn set_flush_persists(&self, persists: bool) {
        self.lock().flush_persists = persists;
    }

    /// Cuts the power after `writes` more successful writes: every later write fails until
    /// [`SimDevice::crash`]. `None` removes the cut.
    pub fn cut_power_after(&self, writes: Option<u64>) {
        self.lock().writes_left = writes;
    }

    /// A crash: every unflushed sector either reached the medium or is lost, each with even
    /// odds drawn from `rng`. The power comes back.
    pub fn crash(&self, rng: &mut impl Rng) -> CrashReport {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut report = CrashReport::default();
        for sector in std::mem::take(&mut st.dirty) {
            let range = sector_range(sector);
            report.dirty_sectors += 1;
            if rng.random_bool(0.5) {
                st.durable[range.clone()].copy_from_slice(&st.visible[range]);
                report.kept_sectors += 1;
            } else {
                st.visible[range.clone()].copy_from_slice(&st.durable[range]);
            }
        }
        st.writes_left = None;
        report
    }
}

fn sector_range(sector: u64) -> std::ops::Range<usize> {
    let start = (sector * SECTOR_BYTES) as usize;
    start..start + SECTOR_BYTES as usize
}

impl BlockDevice for SimDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Read, offset_bytes, buf.len() as u64)?;
        let st = self.lock();
        let start = offset_bytes as usize;
        buf.copy_from_slice(&st.visible[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Write, offset_bytes, buf.len() as u64)?;
        let mut st = self.lock();
        if let Some(left) = st.writes_left.as_mut() {
            if *left == 0 {
                return Err(DeviceError::new(
                    &self.name,
                    DeviceOp::Write,
                    offset_bytes,
                    buf.len() as u64,
                    "simulated power cut",
                ));
            }
            *left -= 1;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let start = offset_bytes as usize;
        st.visible[start..start + buf.len()].copy_from_slice(buf);
        let first = offset_bytes / SECTOR_BYTES;
        let last = (offset_bytes + buf.len() as u64 - 1) / SECTOR_BYTES;
        st.dirty.extend(first..=last);
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.writes_left == Some(0) {
            return Err(DeviceError::new(
                &self.name,
                DeviceOp::Flush,
                0,
                0,
                "simulated power cut",
            ));
        }
        if st.flush_persists {
            for sector in std::mem::take(&mut st.dirty) {
                let range = sector_range(sector);
                st.durable[range.clone()].copy_from_slice(&st.visible[range]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_crash_keeps_flushed_writes_and_some_unflushed_ones() {
        let dev = SimDevice::with_content("d", vec![0u8; 64 * 512]);
        dev.write_at(&[1u8; 512], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2u8; 32 * 512], 512).unwrap();
        let report = dev.crash(&mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(report.dirty_sectors, 32);
        assert!(report.kept_sectors > 0 && report.kept_sectors < 32);
        let after = dev.visible();
        assert!(after[..512].iter().all(|b| *b == 1));
        let kept = after[512..33 * 512]
            .chunks(512)
            .filter(|s| s.iter().all(|b| *b == 2))
            .count();
        assert_eq!(kept as u64, report.kept_sectors);
    }

    #[test]
    fn a_lying_flush_loses_flushed_writes_in_a_crash() {
        let dev = SimDevice::with_content("d", vec![0u8; 64 * 512]);
        dev.set_flush_persists(false);
        dev.write_at(&[1u8; 64 * 512], 0).unwrap();
        dev.flush().unwrap();
        let report = dev.crash(&mut ChaCha8Rng::seed_from_u64(1));
        assert!(report.kept_sectors < 64);
    }

    #[test]
    fn writes_fail_after_a_power_cut_until_the_crash() {
        let dev = SimDevice::with_content("d", vec![0u8; 4 * 512]);
        dev.cut_power_after(Some(1));
        dev.write_at(&[1u8; 512], 0).unwrap();
        assert!(dev.write_at(&[1u8; 512], 512).is_err());
        dev.crash(&mut ChaCha8Rng::seed_from_u64(1));
        dev.write_at(&[1u8; 512], 512).unwrap();
    }
}
