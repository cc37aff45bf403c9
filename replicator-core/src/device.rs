//! Block devices: the only way the core reads or writes a disk.
//!
//! [`BlockDevice`] is positioned, synchronous I/O on a fixed-size byte array. [`FileDevice`] opens
//! an image file or a Linux block device (a loop device, a partition); [`MemDevice`] holds a disk
//! in memory for tests. Trackers wrap a device and are devices themselves.
//!
//! Reads of a [`FileDevice`] go around the page cache (`O_DIRECT`) when the buffer, offset and
//! length allow it ([`DIRECT_ALIGN_BYTES`]; [`AlignedBuf`] gives such buffers): a cycle reads each
//! byte once, so caching it only evicts what the machine's applications use, and a direct read
//! lands in the caller's buffer without a copy. Unaligned edges, and files that refuse
//! `O_DIRECT` (tmpfs), are read through the page cache. Writes of [`DIRECT_WRITE_MIN_BYTES`] or
//! more (a hydrate's) go around the page cache too, through an aligned bounce buffer when the
//! caller's is not aligned; small writes (an application's pages) stay cached.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::bitmap::SECTOR_SIZE;

/// Which I/O operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceOp {
    /// Opening or sizing the device.
    Open,
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush to stable storage.
    Flush,
    /// A discard (the range then reads as zeros).
    Discard,
}

impl std::fmt::Display for DeviceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceOp::Open => "open",
            DeviceOp::Read => "read",
            DeviceOp::Write => "write",
            DeviceOp::Flush => "flush",
            DeviceOp::Discard => "discard",
        })
    }
}

/// A failed device operation, with the device, the operation and the byte range.
#[derive(Debug, thiserror::Error)]
#[error("{op} of {len_bytes} bytes at offset {offset_bytes} on {device}: {detail}")]
pub struct DeviceError {
    /// The device's name (its path, or a test name).
    pub device: String,
    /// What was being done.
    pub op: DeviceOp,
    /// Where.
    pub offset_bytes: u64,
    /// How much.
    pub len_bytes: u64,
    /// What went wrong.
    pub detail: String,
    /// The underlying I/O error, if any.
    #[source]
    pub source: Option<std::io::Error>,
}

impl DeviceError {
    /// An error without an underlying I/O error (a range check, a test fault).
    pub fn new(
        device: &str,
        op: DeviceOp,
        offset_bytes: u64,
        len_bytes: u64,
        detail: impl Into<String>,
    ) -> Self {
        DeviceError {
            device: device.to_owned(),
            op,
            offset_bytes,
            len_bytes,
            detail: detail.into(),
            source: None,
        }
    }

    fn io(
        device: &str,
        op: DeviceOp,
        offset_bytes: u64,
        len_bytes: u64,
        err: std::io::Error,
    ) -> Self {
        DeviceError {
            device: device.to_owned(),
            op,
            offset_bytes,
            len_bytes,
            detail: err.to_string(),
            source: Some(err),
        }
    }
}

/// A disk: a fixed number of bytes, read and written at byte offsets.
///
/// Implementations are safe to call from several threads at once; a write that returns `Ok` is
/// visible to every later read, and durable after the next successful [`BlockDevice::flush`].
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// A name for messages (a path).
    fn name(&self) -> &str;
    /// The size in bytes; a multiple of [`SECTOR_SIZE`].
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from `offset_bytes`. The range must lie within the device.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError>;
    /// Writes `buf` at `offset_bytes`. The range must lie within the device.
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Discards `len_bytes` at `offset_bytes`: afterwards the range reads as zeros, and the
    /// device may give back the space it held (a hole in an image file, an unmapped range on a
    /// thin device). The range must lie within the device. The default writes zeros.
    fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), DeviceError> {
        write_zeros(self, offset_bytes, len_bytes)
    }
}

/// Most bytes of zeros [`write_zeros`] writes at once. 1 MiB.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// Writes `len_bytes` of zeros at `offset_bytes`, in chunks of at most 1 MiB: the
/// discard of devices that have nothing better.
pub fn write_zeros<D: BlockDevice + ?Sized>(
    dev: &D,
    offset_bytes: u64,
    len_bytes: u64,
) -> Result<(), DeviceError> {
    check_range(dev, DeviceOp::Discard, offset_bytes, len_bytes)?;
    let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(len_bytes) as usize];
    let mut done = 0;
    while done < len_bytes {
        let n = ZERO_CHUNK_BYTES.min(len_bytes - done);
        dev.write_at(&zeros[..n as usize], offset_bytes + done)?;
        done += n;
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` lies within a device of `size` bytes.
pub fn check_range<D: BlockDevice + ?Sized>(
    device: &D,
    op: DeviceOp,
    offset_bytes: u64,
    len_bytes: u64,
) -> Result<(), DeviceError> {
    let end = offset_bytes.checked_add(len_bytes);
    match end {
        Some(end) if end <= device.size_bytes() => Ok(()),
        _ => Err(DeviceError::new(
            device.name(),
            op,
            offset_bytes,
            len_bytes,
            format!(
                "range ends past the device end ({} bytes)",
                device.size_bytes()
            ),
        )),
    }
}

/// Writes of at least this many bytes go around the page cache (`O_DIRECT`): a hydrate writes
/// each byte once, and buffered writes of gigabytes cost more CPU in the page cache than the copy
/// into an aligned buffer. Smaller writes (an application's pages) stay cached.
pub const DIRECT_WRITE_MIN_BYTES: u64 = 64 << 10;

/// The largest bounce buffer a direct write of an unaligned buffer copies through, per thread.
pub const DIRECT_WRITE_CHUNK_BYTES: usize = 4 << 20;

thread_local! {
    static BOUNCE: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::zeroed(0));
}

/// Alignment of direct reads: buffer address, file offset and length must all be multiples of it.
/// 4096 covers every logical block size Linux devices use (512 or 4096).
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// A zero-filled byte buffer whose start is aligned to [`DIRECT_ALIGN_BYTES`], so that
/// [`FileDevice`] reads into it directly (no bounce copy). Safe code only: it over-allocates by
/// one alignment and uses the aligned part.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN_BYTES];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        // `align_offset` may give up (usize::MAX); the buffer then just stays unaligned and reads
        // take the page-cache path.
        let start = if start < DIRECT_ALIGN_BYTES { start } else { 0 };
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its capacity: how long [`AlignedBuf::resize`] can make it without reallocating.
    pub fn capacity(&self) -> usize {
        self.storage.len() - self.start
    }

    /// Sets the length to `len` (contents unspecified), reallocating only past the capacity.
    pub fn resize(&mut self, len: usize) {
        if len > self.capacity() {
            *self = AlignedBuf::zeroed(len);
        } else {
            self.len = len;
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// An image file or a block device opened for positioned I/O.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// The same file opened with `O_DIRECT` (read-only, or read-write when `file` is writable),
    /// if the file system allows it.
    direct: Option<File>,
    /// Whether `direct` is writable.
    direct_writes: bool,
    name: String,
    size_bytes: u64,
}

impl FileDevice {
    /// Opens an existing file or block device for reading and writing. Its size must be a
    /// multiple of 512 bytes.
    pub fn open(path: &Path) -> Result<Self, DeviceError> {
        Self::open_with(path, true)
    }

    /// Opens an existing file or block device read-only.
    pub fn open_read_only(path: &Path) -> Result<Self, DeviceError> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, write: bool) -> Result<Self, DeviceError> {
        let name = path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| DeviceError::io(&name, DeviceOp::Open, 0, 0, e))?;
        // Seeking to the end sizes regular files and block devices alike.
        let size_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|e| DeviceError::io(&name, DeviceOp::Open, 0, 0, e))?;
        if !size_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(DeviceError::new(
                &name,
                DeviceOp::Open,
                0,
                size_bytes,
                format!("size {size_bytes} bytes is not a multiple of {SECTOR_SIZE}-byte sectors"),
            ));
        }
        // Refused by some file systems (tmpfs: EINVAL): reads and writes then all use the page
        // cache.
        let direct = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let direct_writes = write && direct.is_some();
        Ok(FileDevice {
            file,
            direct,
            direct_writes,
            name,
            size_bytes,
        })
    }

    /// Whether aligned reads bypass the page cache (the file system accepted `O_DIRECT`).
    pub fn reads_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn read_buffered(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.read_exact_at(buf, offset_bytes).map_err(|e| {
            DeviceError::io(
                &self.name,
                DeviceOp::Read,
                offset_bytes,
                buf.len() as u64,
                e,
            )
        })
    }

    fn write_buffered(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(buf, offset_bytes).map_err(|e| {
            DeviceError::io(
                &self.name,
                DeviceOp::Write,
                offset_bytes,
                buf.len() as u64,
                e,
            )
        })
    }

    /// Writes `buf` (its length and `offset_bytes` aligned) through the `O_DIRECT` handle, from
    /// `buf` itself when its memory is aligned, else through an aligned bounce buffer of at most
    /// [`DIRECT_WRITE_CHUNK_BYTES`]. A file that turns direct writes down is written cached.
    fn write_direct(
        &self,
        direct: &File,
        buf: &[u8],
        offset_bytes: u64,
    ) -> Result<(), DeviceError> {
        let io = |e: std::io::Error, at: u64, n: usize| {
            DeviceError::io(&self.name, DeviceOp::Write, at, n as u64, e)
        };
        let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
        if buf.as_ptr().align_offset(DIRECT_ALIGN_BYTES) == 0 {
            return match direct.write_all_at(buf, offset_bytes) {
                Err(e) if refused(&e) => self.write_buffered(buf, offset_bytes),
                r => r.map_err(|e| io(e, offset_bytes, buf.len())),
            };
        }
        BOUNCE.with(|cell| {
            let mut bounce = cell.borrow_mut();
            let mut done = 0usize;
            while done < buf.len() {
                let n = DIRECT_WRITE_CHUNK_BYTES.min(buf.len() - done);
                bounce.resize(n);
                let chunk = &buf[done..done + n];
                let at = offset_bytes + done as u64;
                bounce.as_mut_slice().copy_from_slice(chunk);
                if bounce.as_slice().as_ptr().align_offset(DIRECT_ALIGN_BYTES) != 0 {
                    // The allocator could not give an aligned buffer: write it cached.
                    self.write_buffered(chunk, at)?;
                } else {
                    match direct.write_all_at(bounce.as_slice(), at) {
                        Err(e) if refused(&e) => self.write_buffered(chunk, at)?,
                        r => r.map_err(|e| io(e, at, n))?,
                    }
                }
                done += n;
            }
            Ok(())
        })
    }

    /// Creates (or truncates) a sparse image file of `size_bytes` and opens it.
    pub fn create_sparse(path: &Path, size_bytes: u64) -> Result<Self, DeviceError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| DeviceError::io(&name, DeviceOp::Open, 0, size_bytes, e))?;
        file.set_len(size_bytes)
            .map_err(|e| DeviceError::io(&name, DeviceOp::Open, 0, size_bytes, e))?;
        drop(file);
        Self::open(path)
    }

    /// The path it was opened from.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.name)
    }
}

impl BlockDevice for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Read, offset_bytes, buf.len() as u64)?;
        let align = DIRECT_ALIGN_BYTES as u64;
        let Some(direct) = &self.direct else {
            return self.read_buffered(buf, offset_bytes);
        };
        // The part of `buf` whose memory and file offset are both aligned goes direct; it exists
        // only when the buffer's misalignment equals the offset's.
        let skew = (align - offset_bytes % align) % align;
        let ptr_skew = buf.as_ptr().align_offset(DIRECT_ALIGN_BYTES) as u64;
        let len = buf.len() as u64;
        if ptr_skew != skew || skew >= len {
            return self.read_buffered(buf, offset_bytes);
        }
        let middle = (len - skew) / align * align;
        if middle == 0 {
            return self.read_buffered(buf, offset_bytes);
        }
        let (head, rest) = buf.split_at_mut(skew as usize);
        let (mid, tail) = rest.split_at_mut(middle as usize);
        self.read_buffered(head, offset_bytes)?;
        let mid_offset = offset_bytes + skew;
        match direct.read_exact_at(mid, mid_offset) {
            Ok(()) => {}
            // A device or file that turns direct reads down after opening: read it cached.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.read_buffered(mid, mid_offset)?;
            }
            Err(e) => {
                return Err(DeviceError::io(
                    &self.name,
                    DeviceOp::Read,
                    mid_offset,
                    middle,
                    e,
                ));
            }
        }
        self.read_buffered(tail, mid_offset + middle)
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Write, offset_bytes, buf.len() as u64)?;
        let align = DIRECT_ALIGN_BYTES as u64;
        let len = buf.len() as u64;
        if let Some(direct) = self.direct.as_ref().filter(|_| self.direct_writes)
            && len >= DIRECT_WRITE_MIN_BYTES
        {
            // Large writes go around the page cache: the aligned middle directly (through an
            // aligned bounce buffer when `buf` itself is not aligned), the edges cached.
            let skew = (align - offset_bytes % align) % align;
            let middle = (len - skew.min(len)) / align * align;
            if middle > 0 {
                let (head, rest) = buf.split_at(skew as usize);
                let (mid, tail) = rest.split_at(middle as usize);
                self.write_buffered(head, offset_bytes)?;
                self.write_direct(direct, mid, offset_bytes + skew)?;
                return self.write_buffered(tail, offset_bytes + skew + middle);
            }
        }
        self.write_buffered(buf, offset_bytes)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.file
            .sync_data()
            .map_err(|e| DeviceError::io(&self.name, DeviceOp::Flush, 0, 0, e))
    }

    /// A hole punched with `fallocate(PUNCH_HOLE | KEEP_SIZE)`, in an image file and on a block
    /// device alike. On a block device the kernel turns it into a write-zeroes request that may
    /// unmap (`blkdev_fallocate`): the range is guaranteed to read back as zeros, which a plain
    /// `BLKDISCARD` does not promise on every device, and no ioctl (unsafe code) is needed. A
    /// loop device serves it by punching a hole in its backing file, as it serves a discard.
    /// Where neither is supported (`EOPNOTSUPP`), zeros are written instead.
    fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Discard, offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        use rustix::fs::{FallocateFlags, fallocate};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset_bytes,
            len_bytes,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                write_zeros(self, offset_bytes, len_bytes)
            }
            Err(e) => Err(DeviceError::io(
                &self.name,
                DeviceOp::Discard,
                offset_bytes,
                len_bytes,
                e.into(),
            )),
        }
    }
}

/// A disk held in memory, for tests and simulation.
#[derive(Debug)]
pub struct MemDevice {
    name: String,
    bytes: RwLock<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled disk of `size_bytes` (rounded up to whole sectors).
    pub fn new(name: &str, size_bytes: u64) -> Self {
        let size = size_bytes.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        MemDevice {
            name: name.to_owned(),
            bytes: RwLock::new(vec![0; usize::try_from(size).unwrap_or(usize::MAX)]),
        }
    }

    /// A copy of the whole disk.
    pub fn snapshot(&self) -> Vec<u8> {
        match self.bytes.read() {
            Ok(b) => b.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl BlockDevice for MemDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        match self.bytes.read() {
            Ok(b) => b.len() as u64,
            Err(poisoned) => poisoned.into_inner().len() as u64,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Read, offset_bytes, buf.len() as u64)?;
        let bytes = self.bytes.read().unwrap_or_else(|p| p.into_inner());
        let start = offset_bytes as usize;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Write, offset_bytes, buf.len() as u64)?;
        let mut bytes = self.bytes.write().unwrap_or_else(|p| p.into_inner());
        let start = offset_bytes as usize;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), DeviceError> {
        check_range(self, DeviceOp::Discard, offset_bytes, len_bytes)?;
        let mut bytes = self.bytes.write().unwrap_or_else(|p| p.into_inner());
        let start = offset_bytes as usize;
        bytes[start..start + len_bytes as usize].fill(0);
        Ok(())
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<D> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
        (**self).read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
        (**self).write_at(buf, offset_bytes)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        (**self).flush()
    }
    fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), DeviceError> {
        (**self).discard(offset_bytes, len_bytes)
    }
}
