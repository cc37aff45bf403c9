//! Digest catalogs: per-block digests of a disk, for checksum resync (as DRBD's `csums` and
//! Azure's resync compare blocks instead of copying them).
//!
//! The target keeps a catalog of what it applied in its state directory (`catalog.bin`) and keeps
//! it current lazily: every applied cycle's sectors are added to `catalog-dirty.bmap` before they
//! are written, and only those blocks are read again when a catalog is asked for. The source
//! reads its own disk once, digests each block and ships only the blocks whose digest differs.
//!
//! A digest is BLAKE3 of the block's bytes, truncated to 16 bytes. Both sides compute it the
//! same way over the same block boundaries (the last block may be short).

use std::path::Path;

use crate::bitmap::{SECTOR_SIZE, SectorBitmap};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{CATALOG_BLOCK_BYTES_MAX, CATALOG_BLOCK_BYTES_MIN, DIGEST_BYTES};
use crate::progress::Progress;
use crate::state::write_atomic;

/// Default bytes per digested block: 64 KiB.
pub const DEFAULT_BLOCK_BYTES: u32 = 64 << 10;
/// Bytes read from the device per call while digesting: 4 MiB.
const READ_CHUNK_BYTES: u64 = 4 << 20;
const FILE_MAGIC: &[u8; 8] = b"RPLCTLG1";
const FILE_FIXED_LEN: usize = 8 + 8 + 4 + 8 + 8;

/// One block's digest.
pub type Digest = [u8; DIGEST_BYTES];

/// The digest of one block's bytes.
pub fn block_digest(data: &[u8]) -> Digest {
    let full = blake3::hash(data);
    let mut d = [0u8; DIGEST_BYTES];
    d.copy_from_slice(&full.as_bytes()[..DIGEST_BYTES]);
    d
}

/// Checks a block size given by a user or a peer.
pub fn check_block_bytes(block_bytes: u32) -> Result<()> {
    if !block_bytes.is_power_of_two()
        || !(CATALOG_BLOCK_BYTES_MIN..=CATALOG_BLOCK_BYTES_MAX).contains(&block_bytes)
    {
        return Err(Error::InvalidInput(format!(
            "resync block size {block_bytes} is not a power of two from {CATALOG_BLOCK_BYTES_MIN} \
             to {CATALOG_BLOCK_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

/// The digests of a disk as of a committed cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestCatalog {
    /// The committed cycle the digests describe.
    pub cycle: u64,
    pub block_bytes: u32,
    pub disk_bytes: u64,
    pub digests: Vec<Digest>,
}

impl DigestCatalog {
    /// Number of blocks of a disk.
    pub fn block_count(disk_bytes: u64, block_bytes: u32) -> u64 {
        disk_bytes.div_ceil(u64::from(block_bytes))
    }

    /// Reads all of `dev` and digests every block. Returns the catalog and the bytes read.
    pub fn build<D: BlockDevice + ?Sized>(
        dev: &D,
        block_bytes: u32,
        cycle: u64,
        progress: &dyn Progress,
    ) -> Result<(Self, u64)> {
        check_block_bytes(block_bytes)?;
        let disk_bytes = dev.size_bytes();
        let count = Self::block_count(disk_bytes, block_bytes);
        let mut digests = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        progress.begin("digest catalog", disk_bytes);
        let mut read = 0u64;
        for_each_block(dev, block_bytes, 0, count, |_, data| {
            digests.push(block_digest(data));
            read += data.len() as u64;
            progress.advance(data.len() as u64);
            Ok(())
        })?;
        progress.end();
        Ok((
            DigestCatalog {
                cycle,
                block_bytes,
                disk_bytes,
                digests,
            },
            read,
        ))
    }

    /// Digests again every block holding a sector of `dirty`, reading only those. Returns the
    /// bytes read.
    pub fn refresh<D: BlockDevice + ?Sized>(
        &mut self,
        dev: &D,
        dirty: &SectorBitmap,
        cycle: u64,
    ) -> Result<u64> {
        let per_block = u64::from(self.block_bytes) / SECTOR_SIZE;
        let count = self.digests.len() as u64;
        let mut read = 0u64;
        let mut next_block = 0u64;
        for e in dirty.extents() {
            let first = (e.start_sector / per_block).max(next_block);
            let last = (e.start_sector + e.sector_count)
                .div_ceil(per_block)
                .min(count);
            if first >= last {
                continue;
            }
            let digests = &mut self.digests;
            for_each_block(dev, self.block_bytes, first, last, |i, data| {
                if let Some(d) = digests.get_mut(i as usize) {
                    *d = block_digest(data);
                }
                read += data.len() as u64;
                Ok(())
            })?;
            next_block = last;
        }
        self.cycle = cycle;
        Ok(read)
    }

    /// Loads a catalog file; `None` if there is none or it does not fit `disk_bytes`. A damaged
    /// file is an error naming it.
    pub fn load(path: &Path, disk_bytes: u64) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::state_io(path, "cannot read", e)),
        };
        let bad = |why: String| Error::state(path, format!("damaged digest catalog: {why}"));
        if bytes.len() < FILE_FIXED_LEN + 4 {
            return Err(bad(format!("{} bytes is too short", bytes.len())));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(bad(format!(
                "checksum {stored:#010x} stored, {computed:#010x} computed"
            )));
        }
        if &body[0..8] != FILE_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let cycle = u64_at(8);
        let block_bytes = u32::from_le_bytes([body[16], body[17], body[18], body[19]]);
        let file_disk_bytes = u64_at(20);
        let count = u64_at(28);
        check_block_bytes(block_bytes).map_err(|e| bad(e.to_string()))?;
        if file_disk_bytes != disk_bytes {
            return Ok(None);
        }
        if count != Self::block_count(disk_bytes, block_bytes)
            || (body.len() - FILE_FIXED_LEN) as u64 != count.saturating_mul(DIGEST_BYTES as u64)
        {
            return Err(bad(format!("{count} digests do not fit its length")));
        }
        let digests = body[FILE_FIXED_LEN..]
            .chunks_exact(DIGEST_BYTES)
            .map(|c| {
                let mut d = [0u8; DIGEST_BYTES];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(Some(DigestCatalog {
            cycle,
            block_bytes,
            disk_bytes,
            digests,
        }))
    }

    /// Writes the catalog file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = Vec::with_capacity(FILE_FIXED_LEN + self.digests.len() * DIGEST_BYTES + 4);
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&self.cycle.to_le_bytes());
        out.extend_from_slice(&self.block_bytes.to_le_bytes());
        out.extend_from_slice(&self.disk_bytes.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        write_atomic(path, &out)
    }
}

/// Reads blocks `[first, last)` of `dev` in large chunks and calls `f(index, bytes)` per block.
fn for_each_block<D: BlockDevice + ?Sized>(
    dev: &D,
    block_bytes: u32,
    first: u64,
    last: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let disk_bytes = dev.size_bytes();
    let block = u64::from(block_bytes);
    let per_chunk = (READ_CHUNK_BYTES / block).max(1);
    let mut buf = Vec::new();
    let mut i = first;
    while i < last {
        let n = per_chunk.min(last - i);
        let start = i * block;
        let end = ((i + n) * block).min(disk_bytes);
        buf.resize((end - start) as usize, 0);
        dev.read_at(&mut buf, start)?;
        for (k, data) in buf.chunks(block as usize).enumerate() {
            f(i + k as u64, data)?;
        }
        i += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use crate::progress::NoProgress;

    #[test]
    fn refresh_matches_a_full_build_after_writes() -> Result<()> {
        let dev = MemDevice::new("d", 1 << 20);
        let (mut cat, read) = DigestCatalog::build(&dev, 4096, 0, &NoProgress)?;
        assert_eq!(read, 1 << 20);
        assert_eq!(cat.digests.len(), 256);
        dev.write_at(&[7u8; 1024], 8192 + 512)?;
        dev.write_at(&[9u8; 512], (1 << 20) - 512)?;
        let mut dirty = SectorBitmap::new((1 << 20) / SECTOR_SIZE);
        dirty.mark_bytes(8192 + 512, 1024)?;
        dirty.mark_bytes((1 << 20) - 512, 512)?;
        let read = cat.refresh(&dev, &dirty, 3)?;
        assert_eq!(read, 2 * 4096, "only the two touched blocks are read");
        let (full, _) = DigestCatalog::build(&dev, 4096, 3, &NoProgress)?;
        assert_eq!(cat, full);
        Ok(())
    }

    #[test]
    fn file_round_trip_and_damage_is_named() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::state_io("tmp", "tempdir", e))?;
        let path = dir.path().join("catalog.bin");
        // A short last block.
        let dev = MemDevice::new("d", 3 * 4096 + 512);
        let (cat, _) = DigestCatalog::build(&dev, 4096, 5, &NoProgress)?;
        assert_eq!(cat.digests.len(), 4);
        cat.save(&path)?;
        assert_eq!(DigestCatalog::load(&path, 3 * 4096 + 512)?, Some(cat));
        assert_eq!(DigestCatalog::load(&path, 4096)?, None, "another size");
        let mut bytes = std::fs::read(&path).map_err(|e| Error::state_io(&path, "read", e))?;
        bytes[12] ^= 1;
        std::fs::write(&path, &bytes).map_err(|e| Error::state_io(&path, "write", e))?;
        let err = DigestCatalog::load(&path, 3 * 4096 + 512)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("catalog.bin") && err.contains("checksum"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn block_sizes_are_checked() {
        assert!(check_block_bytes(4096).is_ok());
        assert!(check_block_bytes(1 << 16).is_ok());
        assert!(check_block_bytes(512).is_err());
        assert!(check_block_bytes(5000).is_err());
        assert!(check_block_bytes(128 << 20).is_err());
    }
}
