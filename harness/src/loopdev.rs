//! Loop devices, through `losetup`: attached for the length of a run, detached on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// An attached loop device; detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `image` to a free loop device with direct I/O.
    pub fn attach(image: &Path) -> Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(image)
            .output()
            .context("running losetup (install util-linux, and run as root)")?;
        if !out.status.success() {
            bail!(
                "losetup could not attach {}: {} (loop devices need root)",
                image.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !path.starts_with("/dev/") {
            bail!(
                "losetup printed an unexpected device name {}",
                path.display()
            );
        }
        Ok(LoopDevice { path })
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let status = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !matches!(status, Ok(s) if s.success()) {
            tracing::warn!(device = %self.path.display(), "could not detach the loop device; run losetup -d by hand");
        }
    }
}
