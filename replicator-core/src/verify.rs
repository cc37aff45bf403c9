//! Byte-for-byte comparison of two devices: the final proof that the target is the source.

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Bytes compared per read.
pub const VERIFY_CHUNK_BYTES: usize = 1 << 20;
/// Differing ranges reported at most.
pub const VERIFY_DIFFS_MAX: usize = 16;

/// A range of bytes that differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Difference {
    /// First differing byte.
    pub offset_bytes: u64,
    /// Length of the differing run (within one compared chunk).
    pub len_bytes: u64,
}

/// The outcome of [`verify_devices`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes compared.
    pub compared_bytes: u64,
    /// Total differing bytes.
    pub differing_bytes: u64,
    /// The first differing ranges, in order, at most [`VERIFY_DIFFS_MAX`].
    pub first_differences: Vec<Difference>,
}

impl VerifyReport {
    /// True if the devices are byte-identical.
    pub fn identical(&self) -> bool {
        self.differing_bytes == 0
    }
}

/// Compares `a` and `b` byte for byte. Devices of different sizes are an input error.
pub fn verify_devices(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    if a.size_bytes() != b.size_bytes() {
        return Err(Error::InvalidInput(format!(
            "cannot compare: {} is {} bytes but {} is {} bytes",
            a.name(),
            a.size_bytes(),
            b.name(),
            b.size_bytes()
        )));
    }
    let size = a.size_bytes();
    let mut report = VerifyReport {
        compared_bytes: 0,
        differing_bytes: 0,
        first_differences: Vec::new(),
    };
    let mut ba = vec![0u8; VERIFY_CHUNK_BYTES];
    let mut bb = vec![0u8; VERIFY_CHUNK_BYTES];
    progress.begin("verify", size);
    let mut offset = 0u64;
    while offset < size {
        let n = VERIFY_CHUNK_BYTES.min((size - offset) as usize);
        a.read_at(&mut ba[..n], offset)?;
        b.read_at(&mut bb[..n], offset)?;
        if ba[..n] != bb[..n] {
            let mut i = 0;
            while i < n {
                if ba[i] == bb[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n && ba[i] != bb[i] {
                    i += 1;
                }
                report.differing_bytes += (i - start) as u64;
                if report.first_differences.len() < VERIFY_DIFFS_MAX {
                    report.first_differences.push(Difference {
                        offset_bytes: offset + start as u64,
                        len_bytes: (i - start) as u64,
                    });
                }
            }
        }
        offset += n as u64;
        report.compared_bytes = offset;
        progress.advance(n as u64);
    }
    progress.end();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use crate::progress::NoProgress;

    #[test]
    fn finds_and_reports_differences() -> Result<()> {
        let a = MemDevice::new("a", 3 << 20);
        let b = MemDevice::new("b", 3 << 20);
        assert!(verify_devices(&a, &b, &NoProgress)?.identical());
        b.write_at(&[1, 1, 1], (1 << 20) + 5)?;
        b.write_at(&[9], (2 << 20) + 100)?;
        let r = verify_devices(&a, &b, &NoProgress)?;
        assert!(!r.identical());
        assert_eq!(r.differing_bytes, 4);
        assert_eq!(
            r.first_differences,
            vec![
                Difference {
                    offset_bytes: (1 << 20) + 5,
                    len_bytes: 3
                },
                Difference {
                    offset_bytes: (2 << 20) + 100,
                    len_bytes: 1
                }
            ]
        );
        let small = MemDevice::new("c", 1 << 20);
        assert!(verify_devices(&a, &small, &NoProgress).is_err());
        Ok(())
    }
}
