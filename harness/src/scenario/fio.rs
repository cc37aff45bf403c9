//! fio jobs of a scenario: one fio process writing a disk's device directly (so only the kernel
//! tracker sees the writes), with its seed, and the bytes it wrote from its JSON output.
//!
//! The harness's fio module (`harness/src/fio.rs`, `fio::run`) takes over this once merged; the
//! job's fields are the same.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use harness::scenario::spec::FioJob;

/// Runs `job` against `device` (seeded by `seed`), logging to `workdir`; returns bytes written
/// (or trimmed).
pub fn run(job: &FioJob, seed: u64, device: &Path, workdir: &Path) -> Result<u64> {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=scenario")
        .arg(format!("--filename={}", device.display()))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs.0))
        .arg(format!("--size={}", job.size.0))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg("--ioengine=libaio")
        .arg(format!("--direct={}", u8::from(job.direct)))
        // fio takes a seed below 2^32.
        .arg(format!("--randseed={}", seed & 0xffff_ffff))
        .arg("--allrandrepeat=1")
        .arg("--end_fsync=1")
        .arg("--output-format=json");
    if let Some(rate) = job.rate_bytes_per_s {
        cmd.arg(format!("--rate={}", rate.0));
    }
    if let Some(s) = job.runtime_s {
        cmd.arg(format!("--runtime={s}"));
    }
    let out = cmd.output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run fio ({e}): install it with `apt-get install -y --no-install-recommends fio`"
        )
    })?;
    let log = workdir.join("fio.log");
    let _ = std::fs::write(&log, &out.stderr);
    if !out.status.success() {
        bail!(
            "fio {} failed ({}): {}",
            job.rw,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reading fio's JSON output (its stderr is in {})",
            log.display()
        )
    })?;
    let job0 = &json["jobs"][0];
    let bytes = job0["write"]["io_bytes"].as_u64().unwrap_or(0)
        + job0["trim"]["io_bytes"].as_u64().unwrap_or(0);
    Ok(bytes)
}
