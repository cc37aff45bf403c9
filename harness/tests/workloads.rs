//! Loop devices never leak (a harness interrupted with SIGINT, one that panics right after an
//! attach), and every built-in workload replicates: written through the CBT and HRL trackers with
//! `harness write`, shipped, hydrated, and the target verified identical by `harness verify` and
//! `qemu-img compare`.
#![allow(clippy::disallowed_methods)] // these tests wait for real processes and devices

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const HARNESS: &str = env!("CARGO_BIN_EXE_harness");
const MIB: u64 = 1 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> Result<String> {
    let o = Command::new(HARNESS).args(args).output()?;
    ensure!(
        o.status.success(),
        "harness {args:?} exited {:?}:\n{}",
        o.status.code(),
        text(&o)
    );
    Ok(text(&o))
}

fn require_root() -> Result<()> {
    let uid = Command::new("id").arg("-u").output()?;
    ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "these tests attach loop devices: run them as root (sudo scripts/test.sh)"
    );
    Ok(())
}

/// `losetup -j FILE`: devices attached over the file, by anyone.
fn attached_over(file: &Path) -> Result<String> {
    let o = Command::new("losetup")
        .arg("-j")
        .arg(file)
        .output()
        .context("running losetup (apt-get install -y mount)")?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Polls until neither file has a loop device over it (the kernel detaches a device marked
/// for it when its last user closes it, as the process exits).
fn none_attached_over(files: &[&Path]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = String::new();
        for f in files {
            left.push_str(&attached_over(f)?);
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            // Clean up for the next test, then fail.
            for line in left.lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
            bail!("loop devices were left attached:\n{left}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_interrupted_demo_on_loop_devices_leaves_none_attached() -> Result<()> {
    require_root()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path().canonicalize()?;
    let (src, tgt) = (d.join("source.img"), d.join("target.img"));
    let mut child = Command::new(HARNESS)
        .args([
            "demo", "--loop", "--quiet", "--size", "512M", "--rounds", "50",
        ])
        .args(["--dir", &s(&d)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Interrupt once both devices are attached, mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    while attached_over(&src)?.is_empty() || attached_over(&tgt)?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the demo never attached its loop devices"
        );
        if let Some(status) = child.try_wait()? {
            bail!(
                "the demo ended ({status}) before it was interrupted:\n{}",
                text(&child.wait_with_output()?)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(kill.success(), "kill -INT failed");
    let out = child.wait_with_output()?;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(130), "exit 128 + SIGINT:\n{log}");
    assert!(
        log.contains("interrupted (SIGINT): detached 2 loop device(s)"),
        "{log}"
    );
    none_attached_over(&[&src, &tgt])
}

#[test]
fn a_demo_that_panics_after_attaching_leaves_none_attached() -> Result<()> {
    require_root()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path().canonicalize()?;
    let out = Command::new(HARNESS)
        .args([
            "demo",
            "--loop",
            "--quiet",
            "--size",
            "64M",
            "--dir",
            &s(&d),
        ])
        .env("HARNESS_TEST_PANIC_AFTER_LOOP_ATTACH", "1")
        .output()?;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(101), "a panic exits 101:\n{log}");
    assert!(log.contains("a test hook"), "{log}");
    assert!(log.contains("a panic: detached 1 loop device(s)"), "{log}");
    none_attached_over(&[&d.join("source.img"), &d.join("target.img")])
}

/// One source image shipped to a target image through `tracker`, every pattern written in turn.
fn every_pattern_replicates(tracker: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt) = (d.join("src.img"), d.join("tgt.img"));
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(32 * MIB)?;
    }
    let key = d.join("key");
    ok(&["keygen", "--out", &s(&key)])?;
    let (src_s, tgt_s, sst, tst) = (s(&src), s(&tgt), s(&d.join("sst")), s(&d.join("tst")));
    let (cache, key_s) = (s(&d.join("cache")), s(&key));
    let ship = |what: &str| -> Result<String> {
        let out = ok(&[
            "ship",
            "--source",
            &src_s,
            "--state",
            &sst,
            "--sink",
            &cache,
            "--key-file",
            &key_s,
            "--tracker",
            tracker,
        ])
        .with_context(|| format!("shipping after {what}"))?;
        let h = ok(&[
            "hydrate",
            "--target",
            &tgt_s,
            "--state",
            &tst,
            "--sink",
            &cache,
            "--key-file",
            &key_s,
        ])?;
        let v = ok(&["verify", "--source", &src_s, "--target", &tgt_s])
            .with_context(|| format!("verifying after {what}"))?;
        ensure!(v.contains("identical"), "{what}: {v}");
        let c = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw", &src_s, &tgt_s])
            .status()
            .context("running qemu-img (apt-get install -y --no-install-recommends qemu-utils)")?;
        ensure!(
            c.success(),
            "{what}: qemu-img compare says the images differ"
        );
        Ok(format!("{out}{h}"))
    };
    ship("the initial copy")?;
    for (pattern, amount) in [
        ("overwrite", ["--bytes", "1G"]),
        ("innodb", ["--ops", "300"]),
        ("postgres", ["--bytes", "2M"]),
        ("log", ["--ops", "100"]),
        ("zipf", ["--ops", "400"]),
        ("zero", ["--ops", "200"]),
        ("discard", ["--ops", "30"]),
    ] {
        let out = ok(&[
            "write",
            "--source",
            &s(&src),
            "--state",
            &s(&d.join("sst")),
            "--tracker",
            tracker,
            "--pattern",
            pattern,
            amount[0],
            amount[1],
            "--seed",
            "5",
        ])?;
        assert!(out.contains("now marked for the next cycle"), "{out}");
        if pattern == "discard" {
            assert!(out.contains("in 30 discards"), "{out}");
        }
        let shipped = ship(pattern)?;
        assert!(shipped.contains("shipped cycle"), "{pattern}: {shipped}");
    }
    Ok(())
}

#[test]
fn every_pattern_replicates_through_the_cbt_tracker() -> Result<()> {
    every_pattern_replicates("cbt")
}

#[test]
fn every_pattern_replicates_through_the_hrl_tracker() -> Result<()> {
    every_pattern_replicates("hrl")
}

#[test]
fn write_refuses_bad_workloads_with_messages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.img");
    std::fs::File::create(&src)?.set_len(8 * MIB)?;
    let st = s(&dir.path().join("sst"));
    let run = |extra: &[&str]| -> Result<(Option<i32>, String)> {
        let o = Command::new(HARNESS)
            .args(["write", "--source", &s(&src), "--state", &st])
            .args(extra)
            .output()?;
        Ok((o.status.code(), text(&o)))
    };
    let (code, out) = run(&["--fio", "randwrite"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--tracker kernel"), "{out}");
    let (code, out) = run(&["--pattern", "innodb", "--zipf-exponent", "1.2"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("`zipf_exponent`"), "{out}");
    let (code, out) = run(&["--bytes", "1M", "--ops", "3"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--ops"), "{out}");
    // fio missing: the message says how to install it.
    let o = Command::new(HARNESS)
        .args(["write", "--source", &s(&src), "--state", &st])
        .args(["--tracker", "kernel", "--fio", "randwrite"])
        .env("PATH", dir.path())
        .output()?;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("fio is not installed") && out.contains("apt-get install -y"),
        "{out}"
    );
    Ok(())
}
