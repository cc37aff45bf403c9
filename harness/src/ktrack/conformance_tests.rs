//! The kernel tracker against the tracker conformance suite every tracker passes: a loop device
//! written with `O_DIRECT` (so each write is exactly its sectors, as an application's would be),
//! tracked by an in-process daemon, restarted cleanly and by a crash. Needs root, like
//! `harness track`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use replicator_core::bitmap::SECTOR_SIZE;
use replicator_core::device::{BlockDevice, FileDevice};
use replicator_core::tracker::ChangeTracker;
use replicator_core::tracker::conformance::{self, Capabilities, FrozenReads, TrackerFixture};
use replicator_core::{Error, Result};

use super::client::KernelTracker;
use super::daemon::{self, DaemonConfig, RunningDaemon};
use crate::loopdev::LoopDevice;

const DISK_BYTES: u64 = 2 << 20;
const ALIGN: usize = 4096;

struct KernelFixture {
    client: Option<Arc<KernelTracker>>,
    daemon: Option<RunningDaemon>,
    device: File,
    dev_path: PathBuf,
    state_dir: PathBuf,
    // Dropped last: the loop device before its image's directory.
    _loop: LoopDevice,
    _dir: tempfile::TempDir,
}

fn io(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{what}: {e}"))
}

/// A buffer of `len` bytes at an address direct I/O accepts.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + ALIGN];
    let skew = v.as_ptr() as usize % ALIGN;
    let start = if skew == 0 { 0 } else { ALIGN - skew };
    (v, start)
}

impl KernelFixture {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let image = dir.path().join("disk.img");
        File::create(&image)?.set_len(DISK_BYTES)?;
        let lo = LoopDevice::attach(&image)?;
        let dev_path = lo.path().to_path_buf();
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev_path)?;
        let mut f = KernelFixture {
            client: None,
            daemon: None,
            device,
            dev_path,
            state_dir: dir.path().join("kst"),
            _loop: lo,
            _dir: dir,
        };
        f.start().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(f)
    }

    fn start(&mut self) -> Result<()> {
        let daemon = daemon::start(&DaemonConfig {
            device: self.dev_path.clone(),
            state_dir: self.state_dir.clone(),
            checkpoint_interval: Duration::from_secs(daemon::CHECKPOINT_SECS_DEFAULT),
            buffer_kb_per_cpu: daemon::BUFFER_KB_PER_CPU_DEFAULT,
            verbose: false,
        })
        .map_err(|e| io("starting the tracker", format!("{e:#}")))?;
        self.daemon = Some(daemon);
        let (client, _) = KernelTracker::connect(&self.state_dir, &self.dev_path)?;
        self.client = Some(Arc::new(client));
        Ok(())
    }

    fn stop(&mut self, crash: bool) -> Result<()> {
        // The client's connection goes first: a frozen epoch it held goes back, as after a
        // source that stopped mid-cycle.
        self.client = None;
        if let Some(d) = self.daemon.take() {
            let stopped = if crash { d.crash() } else { d.stop() };
            stopped.map_err(|e| io("stopping the tracker", format!("{e:#}")))?;
        }
        Ok(())
    }

    fn client(&self) -> Result<&Arc<KernelTracker>> {
        self.client
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("the tracker is not running".into()))
    }
}

impl TrackerFixture for KernelFixture {
    fn tracker(&self) -> Arc<dyn ChangeTracker> {
        match &self.client {
            Some(c) => Arc::clone(c) as Arc<dyn ChangeTracker>,
            None => unreachable!("the fixture always holds a client between operations"),
        }
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<()> {
        // Exactly the sectors the bytes fall in, read, patched and written back with O_DIRECT.
        let lo = offset_bytes / SECTOR_SIZE * SECTOR_SIZE;
        let hi = (offset_bytes + data.len() as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let len = (hi - lo) as usize;
        let (mut v, at) = aligned(len);
        let buf = &mut v[at..at + len];
        self.device
            .read_exact_at(buf, lo)
            .map_err(|e| io("reading the sectors a write patches", e))?;
        let skip = (offset_bytes - lo) as usize;
        buf[skip..skip + data.len()].copy_from_slice(data);
        self.device
            .write_all_at(buf, lo)
            .map_err(|e| io("writing the device", e))
    }

    fn discard(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        if !offset_bytes.is_multiple_of(SECTOR_SIZE) || !len_bytes.is_multiple_of(SECTOR_SIZE) {
            return self.write(offset_bytes, &vec![0u8; len_bytes as usize]);
        }
        // As an application discards: the kernel sees a write-zeroes request on the device.
        let dev = FileDevice::open(&self.dev_path)?;
        Ok(dev.discard(offset_bytes, len_bytes)?)
    }

    fn settle(&mut self) -> Result<()> {
        // Every request drains the trace first.
        self.client()?.current().map(|_| ())
    }

    fn restart_clean(&mut self) -> Result<()> {
        self.stop(false)?;
        self.start()
    }

    fn crash_restart(&mut self) -> Result<()> {
        self.stop(true)?;
        self.start()
    }

    fn read_device(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        let lo = offset_bytes / SECTOR_SIZE * SECTOR_SIZE;
        let hi = (offset_bytes + buf.len() as u64).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let len = (hi - lo) as usize;
        let (mut v, at) = aligned(len);
        let tmp = &mut v[at..at + len];
        self.device
            .read_exact_at(tmp, lo)
            .map_err(|e| io("reading the device", e))?;
        let skip = (offset_bytes - lo) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Frozen reads go to the live device.
            frozen_reads: FrozenReads::Live,
            restarts: true,
            exact_after_crash: true,
            // A crash after writes the daemon had not persisted is detected from the device's
            // counters and reported as lost tracking.
            lost_after_crash: true,
        }
    }
}

impl Drop for KernelFixture {
    fn drop(&mut self) {
        let _ = self.stop(false);
    }
}

#[test]
fn the_kernel_tracker_conforms() -> anyhow::Result<()> {
    anyhow::ensure!(
        // The effective uid, from the process's status.
        std::fs::read_to_string("/proc/self/status")?
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "the kernel tracker's conformance test attaches a loop device and reads tracefs: run it \
         as root (sudo scripts/test.sh)"
    );
    for seed in 0..8u64 {
        let mut fixture = KernelFixture::new()?;
        conformance::run(&mut fixture, seed, 80)?;
    }
    Ok(())
}
