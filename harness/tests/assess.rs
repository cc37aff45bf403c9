//! `harness assess` against a loop device under an fio load of known rate and write size: the
//! measured rate and write size match what fio was told, and the verdict is the one the tier
//! table gives for them. Needs root (loop devices) and fio, which scripts/test.sh installs.
#![allow(clippy::print_stdout)] // the measured figures are printed for the test log
#![allow(clippy::disallowed_methods)] // waits in real time for fio to get going

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn attach(image: &Path) -> Result<Loop> {
    let o = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(image)
        .output()
        .context("running losetup")?;
    ensure!(
        o.status.success(),
        "losetup failed (run the tests as root: sudo scripts/test.sh): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned()))
}

#[test]
fn assess_measures_an_fio_load_of_known_rate_and_gives_the_tier_verdict() -> Result<()> {
    let fio_found = Command::new("sh")
        .args(["-c", "command -v fio"])
        .output()?
        .status
        .success();
    ensure!(
        fio_found,
        "fio is missing: scripts/test.sh installs it (apt-get install -y --no-install-recommends fio)"
    );
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)?.set_len(256 << 20)?;
    let dev = attach(&image)?;
    // 4 MiB/s of 16 KiB random writes for longer than the assessment samples.
    let mut fio = Command::new("fio")
        .args([
            "--name=known-rate",
            // One process: killing it stops the writer (a forked job would outlive it and keep
            // the loop device open past its detach).
            "--thread",
            &format!("--filename={}", dev.0),
            "--rw=randwrite",
            "--bs=16k",
            "--direct=1",
            "--ioengine=psync",
            "--rate=4m",
            "--time_based",
            "--runtime=12",
            "--output-format=terse",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fio")?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "assess",
            "--device",
            &dev.0,
            "--interval",
            "1s",
            "--duration",
            "8s",
            "--window",
            "2s",
            "--json",
        ])
        .output()?;
    let _ = fio.kill();
    let _ = fio.wait();
    ensure!(
        out.status.success(),
        "assess failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let disk = &report["disks"][0];
    let mut rates: Vec<f64> = disk["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["write_bytes_per_s"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let want = 4.0 * 1024.0 * 1024.0;
    let avg = disk["sizing"]["avg_write_bytes"].as_f64().unwrap_or(0.0);
    println!(
        "median {:.2} MB/s (fio: {:.2}), sized {:.2} MB/s, {:.1} KiB per write, verdict {}",
        median / 1e6,
        want / 1e6,
        disk["sizing"]["write_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
        avg / 1024.0,
        disk["verdict"]
    );
    ensure!(rates.len() == 8, "{} intervals", rates.len());
    ensure!(
        (median - want).abs() < want * 0.25,
        "measured {median:.0} B/s, fio writes {want:.0}"
    );
    ensure!(
        (avg - 16384.0).abs() < 16384.0 * 0.1,
        "average write {avg} bytes"
    );
    // ~4.2 MB/s x 1.3 in 16 KiB writes: over standard's 4 MB/s, well under premium's 35.
    ensure!(
        disk["verdict"] == serde_json::json!({"FitsOnly": {"tier": "premium"}}),
        "verdict {}",
        disk["verdict"]
    );
    Ok(())
}
