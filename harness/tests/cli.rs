//! The harness as an operator runs it: separate processes for each side over one cache, exit
//! codes, messages, and the demo on image files and on loop devices.

use std::path::Path;
use std::process::{Command, Output};

fn harness(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> anyhow::Result<String> {
    let o = harness(args)?;
    anyhow::ensure!(
        o.status.success(),
        "harness {args:?} failed with {:?}:\n{}",
        o.status.code(),
        text(&o)
    );
    Ok(text(&o))
}

fn code(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let o = harness(args)?;
    Ok((o.status.code().unwrap_or(-1), text(&o)))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `qemu-img compare` of two raw images: 0 identical, 1 different (its own exit codes).
fn qemu_img_compare(a: &Path, b: &Path) -> anyhow::Result<i32> {
    let o = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run qemu-img ({e}): scripts/test.sh installs it (apt-get install -y \
                 --no-install-recommends qemu-utils)"
            )
        })?;
    let c = o.status.code().unwrap_or(-1);
    anyhow::ensure!(
        c == 0 || c == 1,
        "qemu-img compare failed ({c}): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(c)
}

#[test]
fn separate_processes_ship_hydrate_verify_and_heal() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt, key, cache, sst, tst) = (
        d.join("src.img"),
        d.join("tgt.img"),
        d.join("key"),
        d.join("cache"),
        d.join("src-state"),
        d.join("tgt-state"),
    );
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(16 << 20)?;
    }
    let out = ok(&["keygen", "--out", &s(&key)])?;
    assert!(out.contains("wrote a new master key"), "{out}");
    let (c, out) = code(&["keygen", "--out", &s(&key)])?;
    assert_eq!(c, 2, "keygen never overwrites: {out}");

    ok(&[
        "write",
        "--source",
        &s(&src),
        "--state",
        &s(&sst),
        "--pattern",
        "log",
        "--bytes",
        "1M",
    ])?;
    let out = ok(&[
        "ship",
        "--source",
        &s(&src),
        "--sink",
        &s(&cache),
        "--state",
        &s(&sst),
        "--key-file",
        &s(&key),
    ])?;
    assert!(out.contains("shipped cycle 1 (initial"), "{out}");
    let out = ok(&[
        "hydrate",
        "--target",
        &s(&tgt),
        "--sink",
        &s(&cache),
        "--state",
        &s(&tst),
        "--key-file",
        &s(&key),
    ])?;
    assert!(out.contains("applied cycle 1"), "{out}");
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;

    // A delta, corrupted in the cache: hydrate fails with exit 1 and names the blob.
    ok(&[
        "write",
        "--source",
        &s(&src),
        "--state",
        &s(&sst),
        "--pattern",
        "innodb",
        "--bytes",
        "2M",
        "--seed",
        "5",
    ])?;
    let out = ok(&[
        "ship",
        "--source",
        &s(&src),
        "--sink",
        &s(&cache),
        "--state",
        &s(&sst),
        "--key-file",
        &s(&key),
    ])?;
    assert!(out.contains("shipped cycle 2 (delta"), "{out}");
    let blob = walk_files(&cache.join("disks"))?
        .into_iter()
        .find(|p| s(p).contains("/blobs/00000000000000000002/"));
    let blob = blob.ok_or_else(|| anyhow::anyhow!("no blob of cycle 2 in the cache"))?;
    let mut bytes = std::fs::read(&blob)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&blob, bytes)?;
    let (c, out) = code(&[
        "hydrate",
        "--target",
        &s(&tgt),
        "--sink",
        &s(&cache),
        "--state",
        &s(&tst),
        "--key-file",
        &s(&key),
    ])?;
    assert_eq!(c, 1, "{out}");
    assert!(
        out.contains("cycle 2 FAILED") && out.contains("authentication failed"),
        "{out}"
    );
    let (c, out) = code(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("DIFFERENT") && out.contains("offset"), "{out}");

    // The next ship carries the failed cycle's sectors; hydrate heals.
    let out = ok(&[
        "ship",
        "--source",
        &s(&src),
        "--sink",
        &s(&cache),
        "--state",
        &s(&sst),
        "--key-file",
        &s(&key),
    ])?;
    assert!(out.contains("failed on the target"), "{out}");
    ok(&[
        "hydrate",
        "--target",
        &s(&tgt),
        "--sink",
        &s(&cache),
        "--state",
        &s(&tst),
        "--key-file",
        &s(&key),
    ])?;
    let out = ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    assert!(out.contains("identical"), "{out}");
    let out = ok(&["status", "--state", &s(&tst), "--sink", &s(&cache)])?;
    assert!(out.contains("committed cycle 3"), "{out}");
    let out = ok(&["status", "--state", &s(&sst)])?;
    assert!(out.contains("next cycle 4"), "{out}");

    // Garbage collection: a leftover of an abandoned attempt is listed by a dry run, then removed.
    let disk_dir = std::fs::read_dir(cache.join("disks"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no disk"))??
        .path();
    let leftover = disk_dir.join("blobs/00000000000000000099/00000000000000000005/0000000000");
    std::fs::create_dir_all(
        leftover
            .parent()
            .ok_or_else(|| anyhow::anyhow!("no parent"))?,
    )?;
    std::fs::write(&leftover, b"abandoned")?;
    let out = ok(&["gc", "--sink", &s(&cache), "--state", &s(&sst), "--dry-run"])?;
    assert!(
        out.contains("would remove")
            && out.contains("00000000000000000099")
            && out.contains("abandoned attempt"),
        "{out}"
    );
    assert!(leftover.exists(), "a dry run removes nothing");
    let out = ok(&["gc", "--sink", &s(&cache), "--state", &s(&sst)])?;
    assert!(out.contains("removed"), "{out}");
    assert!(!leftover.exists());
    Ok(())
}

#[test]
fn bad_usage_and_bad_input_exit_2_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (c, out) = code(&[
        "ship",
        "--source",
        "/nonexistent/disk",
        "--sink",
        &s(&d.join("c")),
        "--state",
        &s(&d.join("st")),
        "--key-file",
        "/nonexistent/key",
    ])?;
    assert_eq!(c, 2, "{out}");
    assert!(
        out.contains("/nonexistent/key") && out.contains("keygen"),
        "{out}"
    );
    let bad_key = d.join("bad.key");
    std::fs::write(&bad_key, "# replicator master key v1\nnot-hex\n")?;
    let img = d.join("img");
    std::fs::File::create(&img)?.set_len(1 << 20)?;
    // A key file others can read is refused before it is even parsed.
    let ship_with_bad_key = || {
        code(&[
            "ship",
            "--source",
            &s(&img),
            "--sink",
            &s(&d.join("c")),
            "--state",
            &s(&d.join("st")),
            "--key-file",
            &s(&bad_key),
        ])
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bad_key, std::fs::Permissions::from_mode(0o644))?;
        let (c, out) = ship_with_bad_key()?;
        assert_eq!(c, 2, "{out}");
        assert!(
            out.contains("mode 0644") && out.contains("chmod 600"),
            "{out}"
        );
        std::fs::set_permissions(&bad_key, std::fs::Permissions::from_mode(0o600))?;
    }
    let (c, out) = code(&[
        "ship",
        "--source",
        &s(&img),
        "--sink",
        &s(&d.join("c")),
        "--state",
        &s(&d.join("st")),
        "--key-file",
        &s(&bad_key),
    ])?;
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("bad.key:2") && out.contains("hex"), "{out}");
    let (c, out) = code(&[
        "ship",
        "--source",
        &s(&img),
        "--sink",
        "gopher://x",
        "--state",
        &s(&d.join("st")),
        "--key-file",
        &s(&bad_key),
    ])?;
    assert_eq!(c, 2, "{out}");
    let (c, _) = code(&["frobnicate"])?;
    assert_eq!(c, 2);
    let (c, out) = code(&["verify", "--source", &s(&img), "--target", "/nonexistent/t"])?;
    assert_eq!(c, 2, "{out}");
    let odd = d.join("odd");
    std::fs::File::create(&odd)?.set_len(1000)?;
    let (c, out) = code(&["verify", "--source", &s(&img), "--target", &s(&odd)])?;
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("multiple of 512"), "{out}");
    Ok(())
}

#[test]
fn hydrate_with_a_wrong_key_exits_2_and_says_so() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt, cache) = (d.join("s"), d.join("t"), d.join("c"));
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(4 << 20)?;
    }
    ok(&["keygen", "--out", &s(&d.join("k1"))])?;
    ok(&["keygen", "--out", &s(&d.join("k2"))])?;
    ok(&[
        "ship",
        "--source",
        &s(&src),
        "--sink",
        &s(&cache),
        "--state",
        &s(&d.join("ss")),
        "--key-file",
        &s(&d.join("k1")),
    ])?;
    let (c, out) = code(&[
        "hydrate",
        "--target",
        &s(&tgt),
        "--sink",
        &s(&cache),
        "--state",
        &s(&d.join("ts")),
        "--key-file",
        &s(&d.join("k2")),
    ])?;
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("wrong key"), "{out}");
    Ok(())
}

#[test]
fn demo_on_image_files_exits_0_with_the_table() -> anyhow::Result<()> {
    let out = ok(&[
        "demo", "--size", "32M", "--churn", "2M", "--rounds", "3", "--quiet",
    ])?;
    for needle in [
        "cycle",
        "changed",
        "blob bytes",
        "ratio",
        "throughput",
        "next delta",
        "initial",
        "innodb",
        "postgres",
        "log append",
        "cutover",
        "byte-identical",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(!out.contains("DIFFERENT"), "{out}");
    Ok(())
}

/// Loop devices need root; CI runs as root. Not root is a failure with instructions, not a skip.
#[test]
fn demo_on_loop_devices_exits_0_and_detaches_them() -> anyhow::Result<()> {
    let uid = Command::new("id").arg("-u").output()?;
    anyhow::ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "this test attaches loop devices and must run as root (run the test command with sudo)"
    );
    let dir = tempfile::tempdir()?;
    let out = ok(&[
        "demo",
        "--loop",
        "--size",
        "32M",
        "--churn",
        "2M",
        "--rounds",
        "2",
        "--quiet",
        "--dir",
        &s(dir.path()),
    ])?;
    assert!(out.contains("/dev/loop"), "{out}");
    assert!(out.contains("byte-identical"), "{out}");
    // The demo's own devices (their images are in its directory) must all be detached; other
    // tests may attach devices of their own meanwhile.
    let after = Command::new("losetup").arg("-a").output()?;
    let listed = String::from_utf8_lossy(&after.stdout).into_owned();
    let mine: Vec<&str> = listed
        .lines()
        .filter(|l| l.contains(&s(dir.path())))
        .collect();
    assert!(mine.is_empty(), "loop devices leaked: {mine:?}");
    Ok(())
}

fn walk_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    Ok(out)
}

#[test]
fn ship_follow_runs_the_schedule_and_ctrl_c_leaves_a_safe_state() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt, key, cache, sst, tst) = (
        d.join("s"),
        d.join("t"),
        d.join("k"),
        d.join("c"),
        d.join("ss"),
        d.join("ts"),
    );
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(8 << 20)?;
    }
    ok(&["keygen", "--out", &s(&key)])?;
    ok(&[
        "write",
        "--source",
        &s(&src),
        "--state",
        &s(&sst),
        "--bytes",
        "1M",
    ])?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "ship",
            "--follow",
            "--source",
            &s(&src),
            "--sink",
            &s(&cache),
            "--state",
            &s(&sst),
            "--key-file",
            &s(&key),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    // Initial copy, then the first delta at once, then a wait of 1 h by the formula.
    while let Some(line) = lines.next().transpose()? {
        seen.push(line.clone());
        if line.starts_with("next Delta cycle in") {
            break;
        }
    }
    let joined = seen.join("\n");
    assert!(joined.contains("shipped cycle 1 (initial"), "{joined}");
    assert!(joined.contains("shipped cycle 2 (delta"), "{joined}");
    assert!(joined.contains("next Delta cycle in 1h 00m"), "{joined}");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let rest: Vec<String> = lines.collect::<Result<_, _>>()?;
    let status = child.wait()?;
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        rest.join("\n").contains("stopped between cycles"),
        "{rest:?}"
    );
    // The state is usable: the next run ships cycle 3, and the target catches up.
    ok(&[
        "write",
        "--source",
        &s(&src),
        "--state",
        &s(&sst),
        "--bytes",
        "1M",
        "--seed",
        "3",
    ])?;
    let out = ok(&[
        "ship",
        "--source",
        &s(&src),
        "--sink",
        &s(&cache),
        "--state",
        &s(&sst),
        "--key-file",
        &s(&key),
    ])?;
    assert!(out.contains("shipped cycle 3"), "{out}");
    ok(&[
        "hydrate",
        "--target",
        &s(&tgt),
        "--sink",
        &s(&cache),
        "--state",
        &s(&tst),
        "--key-file",
        &s(&key),
    ])?;
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    Ok(())
}

#[test]
fn ship_resync_repairs_a_target_written_outside_replication() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt, key, cache, sst, tst) = (
        d.join("src.img"),
        d.join("tgt.img"),
        d.join("key"),
        d.join("cache"),
        d.join("src-state"),
        d.join("tgt-state"),
    );
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(8 << 20)?;
    }
    ok(&["keygen", "--out", &s(&key)])?;
    let write = |seed: &str| {
        ok(&[
            "write",
            "--source",
            &s(&src),
            "--state",
            &s(&sst),
            "--pattern",
            "innodb",
            "--bytes",
            "1M",
            "--seed",
            seed,
        ])
    };
    let ship = |extra: &[&str]| {
        let mut args = vec![
            "ship",
            "--source",
            &s(&src),
            "--sink",
            &s(&cache),
            "--state",
            &s(&sst),
            "--key-file",
            &s(&key),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&refs)
    };
    let hydrate = || {
        ok(&[
            "hydrate",
            "--target",
            &s(&tgt),
            "--sink",
            &s(&cache),
            "--state",
            &s(&tst),
            "--key-file",
            &s(&key),
        ])
    };
    write("1")?;
    ship(&[])?;
    hydrate()?;
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    // Someone writes to the target image directly.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&tgt)?;
        f.write_all_at(&[0x5A; 8192], 3 << 20)?;
    }
    let (c, out) = code(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    assert_eq!(c, 1, "{out}");
    // A comparison no one here wrote agrees.
    assert_eq!(
        qemu_img_compare(&src, &tgt)?,
        1,
        "qemu-img sees the difference too"
    );
    let out = ship(&["--resync", "--resync-block-size", "16384"])?;
    assert!(
        out.contains("no cycle shipped") && out.contains("resync request 1"),
        "{out}"
    );
    let out = hydrate()?;
    assert!(
        out.contains("put digest catalog 1 (answering resync request 1)"),
        "{out}"
    );
    let out = ship(&[])?;
    assert!(
        out.contains("checksum resync") && out.contains("1 blocks differed"),
        "{out}"
    );
    hydrate()?;
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    assert_eq!(
        qemu_img_compare(&src, &tgt)?,
        0,
        "qemu-img finds the images identical"
    );
    // Tracking goes on as before.
    write("2")?;
    let out = ship(&[])?;
    assert!(out.contains("(delta"), "{out}");
    hydrate()?;
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    Ok(())
}

#[test]
fn the_hrl_tracker_ships_logged_writes_from_separate_processes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt, key, cache, sst, tst, log) = (
        d.join("src.img"),
        d.join("tgt.img"),
        d.join("key"),
        d.join("cache"),
        d.join("src-state"),
        d.join("tgt-state"),
        d.join("src.img.hrl"),
    );
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(8 << 20)?;
    }
    ok(&["keygen", "--out", &s(&key)])?;
    let write = |seed: &str, tracker: &str| {
        code(&[
            "write",
            "--source",
            &s(&src),
            "--state",
            &s(&sst),
            "--pattern",
            "postgres",
            "--bytes",
            "512K",
            "--seed",
            seed,
            "--tracker",
            tracker,
            "--tracker-state",
            &s(&log),
        ])
    };
    let ship = || {
        ok(&[
            "ship",
            "--source",
            &s(&src),
            "--sink",
            &s(&cache),
            "--state",
            &s(&sst),
            "--key-file",
            &s(&key),
            "--tracker",
            "hrl",
            "--tracker-state",
            &s(&log),
        ])
    };
    let hydrate = || {
        ok(&[
            "hydrate",
            "--target",
            &s(&tgt),
            "--sink",
            &s(&cache),
            "--state",
            &s(&tst),
            "--key-file",
            &s(&key),
        ])
    };
    let out = ship()?;
    assert!(out.contains("shipped cycle 1 (initial"), "{out}");
    hydrate()?;
    for seed in ["1", "2"] {
        let (c, out) = write(seed, "hrl")?;
        assert_eq!(c, 0, "{out}");
        // The log next to the disk holds the writes' data until the target acknowledges them.
        let logged: u64 = std::fs::read_dir(&log)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".hrl"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(logged >= 512 << 10, "{logged} bytes logged");
        let out = ship()?;
        assert!(out.contains("(delta"), "{out}");
        hydrate()?;
        ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    }
    // Writing through another tracker than the one the disk is shipped with is refused.
    let (c, out) = write("3", "cbt")?;
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("shipped with the hrl tracker"), "{out}");
    Ok(())
}

#[test]
fn a_key_rotation_keeps_unapplied_cycles_readable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt, cache, sst, tst) = (
        d.join("src.img"),
        d.join("tgt.img"),
        d.join("cache"),
        d.join("src-state"),
        d.join("tgt-state"),
    );
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(4 << 20)?;
    }
    let (k1, k2) = (d.join("k1"), d.join("k2"));
    ok(&["keygen", "--out", &s(&k1)])?;
    ok(&["keygen", "--out", &s(&k2)])?;
    let write = |seed: &str| {
        ok(&[
            "write",
            "--source",
            &s(&src),
            "--state",
            &s(&sst),
            "--bytes",
            "256K",
            "--seed",
            seed,
        ])
    };
    let ship = |keys: &[&Path]| {
        let mut args = vec![
            "ship".to_owned(),
            "--source".into(),
            s(&src),
            "--sink".into(),
        ];
        args.extend([s(&cache), "--state".into(), s(&sst)]);
        for k in keys {
            args.extend(["--key-file".to_owned(), s(k)]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        code(&refs)
    };
    let hydrate = |keys: &[&Path]| {
        let mut args = vec![
            "hydrate".to_owned(),
            "--target".into(),
            s(&tgt),
            "--sink".into(),
        ];
        args.extend([s(&cache), "--state".into(), s(&tst)]);
        for k in keys {
            args.extend(["--key-file".to_owned(), s(k)]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        code(&refs)
    };
    write("1")?;
    assert_eq!(ship(&[&k1])?.0, 0);
    write("2")?;
    assert_eq!(ship(&[&k1])?.0, 0);
    // Rotate to k2 with cycles 1 and 2 still unapplied.
    write("3")?;
    let (c, out) = ship(&[&k2, &k1])?;
    assert_eq!(c, 0, "{out}");
    // The target without the old key says so and applies nothing.
    let (c, out) = hydrate(&[&k2])?;
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("wrong key"), "{out}");
    let (c, out) = hydrate(&[&k2, &k1])?;
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("applied cycle 3"), "{out}");
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    // Once everything under k1 was applied and acknowledged, k2 alone goes on.
    write("4")?;
    let (c, out) = ship(&[&k2, &k1])?;
    assert_eq!(c, 0, "{out}");
    let (c, out) = hydrate(&[&k2])?;
    assert_eq!(c, 0, "{out}");
    ok(&["verify", "--source", &s(&src), "--target", &s(&tgt)])?;
    Ok(())
}
