//! [`KernelTracker`]: the [`ChangeTracker`] a source uses to ship a device that `harness track`
//! follows. Epochs, marks and persistence are the daemon's, over its socket; frozen reads go to
//! the device directly, with `O_DIRECT`: a file system writes through its own bios, past the
//! block device's page cache, so a buffered read of the device node could return stale data.
//!
//! The kernel tracker reads the live device (the contract allows it): a sector rewritten after
//! the freeze is read with its newer contents, and the rewrite's completion event puts it in a
//! later epoch, so it ships again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use replicator_core::bitmap::{SECTOR_SIZE, SectorBitmap};
use replicator_core::device::{DeviceError, DeviceOp};
use replicator_core::tracker::{ChangeTracker, Frozen, Generation, OpenReport};
use replicator_core::{Error, Result};

use super::daemon::SOCKET_FILE;
use super::device::split_rdev;
use super::proto::{ErrorKind, Info, Reply, Request, read_frame, write_frame};

/// How long a request may take before the client gives up on the daemon (a freeze drains the
/// trace and persists the marks).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes read from the device at a time by a frozen read.
pub const DIRECT_READ_BYTES_MAX: usize = 1 << 20;

/// A client of a running `harness track` daemon.
#[derive(Debug)]
pub struct KernelTracker {
    socket: PathBuf,
    state_dir: PathBuf,
    conn: Mutex<UnixStream>,
    device: File,
    name: String,
    disk_bytes: u64,
    generation: Generation,
    align_bytes: usize,
    frozen_epoch: Mutex<Option<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_running(state_dir: &Path, device: &Path, e: &std::io::Error) -> Error {
    Error::InvalidInput(format!(
        "no kernel tracker is running for {} (cannot connect to {}: {e}); start one with \
         `harness track --device {} --state {}` (as root) and keep it running while the device \
         is in use",
        state_dir.display(),
        state_dir.join(SOCKET_FILE).display(),
        device.display(),
        state_dir.display()
    ))
}

/// Asks the daemon of `state_dir` for its state, if one is running.
pub fn query_status(state_dir: &Path) -> std::io::Result<Info> {
    let mut stream = UnixStream::connect(state_dir.join(SOCKET_FILE))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    write_frame(&mut stream, &Request::Status, b"")?;
    match read_frame::<Reply>(&mut stream)? {
        Some((Reply::Info(info), _)) => Ok(info),
        Some((Reply::Error { message, .. }, _)) => Err(std::io::Error::other(message)),
        other => Err(std::io::Error::other(format!(
            "unexpected reply to status: {other:?}"
        ))),
    }
}

impl KernelTracker {
    /// Connects to the daemon tracking `device` with state in `state_dir`. Fails with
    /// instructions if none runs, or if it tracks another device.
    pub fn connect(state_dir: &Path, device: &Path) -> Result<(Self, OpenReport)> {
        let socket = state_dir.join(SOCKET_FILE);
        let stream =
            UnixStream::connect(&socket).map_err(|e| not_running(state_dir, device, &e))?;
        let meta = std::fs::metadata(device).map_err(|e| {
            Error::InvalidInput(format!("cannot open the source {}: {e}", device.display()))
        })?;
        let device_file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(device)
            .map_err(|e| {
                Error::InvalidInput(format!(
                    "cannot open {} for direct reads: {e}",
                    device.display()
                ))
            })?;
        let mut tracker = KernelTracker {
            socket: socket.clone(),
            state_dir: state_dir.to_path_buf(),
            conn: Mutex::new(stream),
            device: device_file,
            name: device.display().to_string(),
            disk_bytes: 0,
            generation: Generation([0; 16]),
            align_bytes: SECTOR_SIZE as usize,
            frozen_epoch: Mutex::new(None),
        };
        lock(&tracker.conn)
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|e| tracker.transport(e))?;
        let info = match tracker.call(&Request::Hello, b"")? {
            (Reply::Info(info), _) => info,
            (other, _) => return Err(tracker.unexpected("hello", &other)),
        };
        let (major, minor) = split_rdev(meta.rdev());
        if (major, minor) != (info.major, info.minor) {
            return Err(Error::InvalidInput(format!(
                "the kernel tracker in {} follows {} ({}:{}), not {} ({major}:{minor}); give the \
                 tracker state of this device",
                state_dir.display(),
                info.device,
                info.major,
                info.minor,
                device.display()
            )));
        }
        tracker.disk_bytes = info.disk_bytes;
        tracker.generation = info.generation.parse().map_err(|e| {
            Error::InvalidInput(format!(
                "the kernel tracker in {} sent a bad generation: {e}",
                state_dir.display()
            ))
        })?;
        tracker.align_bytes = logical_block_bytes(major, minor);
        let report = OpenReport {
            lost: info.lost.clone(),
            ..OpenReport::default()
        };
        Ok((tracker, report))
    }

    fn transport(&self, e: std::io::Error) -> Error {
        Error::State {
            path: self.socket.clone(),
            detail: format!(
                "the connection to the kernel tracker failed ({e}); is `harness track --state {}` \
                 still running?",
                self.state_dir.display()
            ),
            source: Some(e),
        }
    }

    fn unexpected(&self, what: &str, reply: &Reply) -> Error {
        Error::State {
            path: self.socket.clone(),
            detail: format!("unexpected reply to {what}: {reply:?}"),
            source: None,
        }
    }

    fn call(&self, req: &Request, body: &[u8]) -> Result<(Reply, Vec<u8>)> {
        let mut conn = lock(&self.conn);
        write_frame(&mut *conn, req, body).map_err(|e| self.transport(e))?;
        let reply = read_frame::<Reply>(&mut *conn).map_err(|e| self.transport(e))?;
        let Some((reply, body)) = reply else {
            return Err(self.transport(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the tracker closed the connection",
            )));
        };
        match reply {
            Reply::Error {
                kind: ErrorKind::Invalid,
                message,
            } => Err(Error::InvalidInput(format!(
                "kernel tracker {}: {message}",
                self.state_dir.display()
            ))),
            Reply::Error {
                kind: ErrorKind::Io,
                message,
            } => Err(Error::State {
                path: self.state_dir.clone(),
                detail: format!("the kernel tracker failed: {message}"),
                source: None,
            }),
            other => Ok((other, body)),
        }
    }

    fn call_done(&self, req: &Request, body: &[u8], what: &str) -> Result<()> {
        match self.call(req, body)? {
            (Reply::Done, _) => Ok(()),
            (other, _) => Err(self.unexpected(what, &other)),
        }
    }

    fn decode_bitmap(&self, bytes: &[u8], what: &str) -> Result<SectorBitmap> {
        let bitmap = SectorBitmap::decode(bytes).map_err(|e| Error::State {
            path: self.socket.clone(),
            detail: format!("the {what} bitmap from the kernel tracker is damaged: {e}"),
            source: None,
        })?;
        if bitmap.disk_sectors() != self.disk_bytes / SECTOR_SIZE {
            return Err(Error::State {
                path: self.socket.clone(),
                detail: format!(
                    "the {what} bitmap from the kernel tracker covers {} sectors, the disk has {}",
                    bitmap.disk_sectors(),
                    self.disk_bytes / SECTOR_SIZE
                ),
                source: None,
            });
        }
        Ok(bitmap)
    }

    /// The daemon's state.
    pub fn info(&self) -> Result<Info> {
        match self.call(&Request::Status, b"")? {
            (Reply::Info(info), _) => Ok(info),
            (other, _) => Err(self.unexpected("status", &other)),
        }
    }

    fn read_error(&self, offset_bytes: u64, len_bytes: u64, detail: String) -> Error {
        Error::Device(DeviceError::new(
            &self.name,
            DeviceOp::Read,
            offset_bytes,
            len_bytes,
            detail,
        ))
    }
}

/// The device's logical block size (the alignment direct reads need); 512 if sysfs lacks it.
fn logical_block_bytes(major: u32, minor: u32) -> usize {
    std::fs::read_to_string(format!(
        "/sys/dev/block/{major}:{minor}/queue/logical_block_size"
    ))
    .ok()
    .and_then(|s| s.trim().parse::<usize>().ok())
    .filter(|n| n.is_power_of_two() && *n >= SECTOR_SIZE as usize)
    .unwrap_or(SECTOR_SIZE as usize)
}

impl ChangeTracker for KernelTracker {
    fn kind(&self) -> &'static str {
        "kernel"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    fn generation(&self) -> Generation {
        self.generation
    }

    fn epoch(&self) -> Result<u64> {
        Ok(self.info()?.epoch)
    }

    fn current(&self) -> Result<SectorBitmap> {
        match self.call(&Request::Current, b"")? {
            (Reply::Bitmap, body) => self.decode_bitmap(&body, "current"),
            (other, _) => Err(self.unexpected("current", &other)),
        }
    }

    fn mark_all(&self) -> Result<()> {
        self.call_done(&Request::MarkAll, b"", "mark_all")
    }

    fn carry(&self, sectors: &SectorBitmap) -> Result<()> {
        self.call_done(&Request::Carry, &sectors.encode(), "carry")
    }

    fn freeze(&self) -> Result<Frozen> {
        match self.call(&Request::Freeze, b"")? {
            (Reply::Frozen { epoch, lost }, body) => {
                let bitmap = self.decode_bitmap(&body, "frozen")?;
                *lock(&self.frozen_epoch) = Some(epoch);
                Ok(Frozen {
                    epoch,
                    bitmap,
                    lost,
                    // The daemon sees ranges, queued and completed, not bytes written once.
                    bytes_written: None,
                })
            }
            (other, _) => Err(self.unexpected("freeze", &other)),
        }
    }

    /// Reads the live device with `O_DIRECT` through an aligned buffer.
    fn read_frozen(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        if lock(&self.frozen_epoch).is_none() {
            return Err(Error::InvalidInput(format!(
                "{}: no epoch is frozen",
                self.name
            )));
        }
        let len = buf.len() as u64;
        if !offset_bytes.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::InvalidInput(format!(
                "{}: frozen reads must be sector-aligned (offset {offset_bytes}, length {len})",
                self.name
            )));
        }
        if offset_bytes
            .checked_add(len)
            .is_none_or(|end| end > self.disk_bytes)
        {
            return Err(self.read_error(
                offset_bytes,
                len,
                format!("range ends past the device end ({} bytes)", self.disk_bytes),
            ));
        }
        let align = self.align_bytes as u64;
        let mut bounce = vec![0u8; DIRECT_READ_BYTES_MAX + 3 * self.align_bytes];
        // The first address in `bounce` that direct I/O accepts.
        let skew = bounce.as_ptr() as usize % self.align_bytes;
        let start = if skew == 0 {
            0
        } else {
            self.align_bytes - skew
        };
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(DIRECT_READ_BYTES_MAX as u64);
            let pos = offset_bytes + done;
            // Widen to the device's logical blocks; only the requested bytes are copied out.
            let lo = pos - pos % align;
            let hi = (pos + want).div_ceil(align) * align;
            let span = (hi - lo) as usize;
            let window = &mut bounce[start..start + span];
            self.device.read_exact_at(window, lo).map_err(|e| {
                self.read_error(lo, span as u64, format!("direct read failed: {e}"))
            })?;
            let from = (pos - lo) as usize;
            buf[done as usize..(done + want) as usize]
                .copy_from_slice(&window[from..from + want as usize]);
            done += want;
        }
        Ok(())
    }

    fn release(&self, committed: bool) -> Result<()> {
        self.call_done(&Request::Release { committed }, b"", "release")?;
        *lock(&self.frozen_epoch) = None;
        Ok(())
    }

    fn acknowledged(&self, epoch: u64) -> Result<()> {
        self.call_done(&Request::Acknowledged { epoch }, b"", "acknowledged")
    }

    fn checkpoint(&self) -> Result<()> {
        self.call_done(&Request::Checkpoint, b"", "checkpoint")
    }
}
