//! `--json` of ship, hydrate, verify and status: one JSON object on stdout that tools can read,
//! with the figures the text shows.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

fn json(args: &[&str], expect_success: bool) -> Result<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .output()?;
    ensure!(
        o.status.success() == expect_success,
        "harness {args:?} exited {:?}:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "harness {args:?} printed no single JSON object:\n{}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn ship_hydrate_verify_and_status_print_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = |n: &str| s(&dir.path().join(n));
    let (src, tgt, cache, key) = (p("src.img"), p("tgt.img"), p("cache"), p("master.key"));
    let (ss, ts) = (p("src-state"), p("tgt-state"));
    for img in [&src, &tgt] {
        std::fs::File::create(img)?.set_len(4 << 20)?;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["keygen", "--out", &key])
        .output()?;
    ensure!(o.status.success(), "keygen failed");
    let ship = [
        "ship",
        "--source",
        &src,
        "--sink",
        &cache,
        "--state",
        &ss,
        "--key-file",
        &key,
        "--json",
    ];
    let hydrate = [
        "hydrate",
        "--target",
        &tgt,
        "--sink",
        &cache,
        "--state",
        &ts,
        "--key-file",
        &key,
        "--json",
    ];

    let shipped = json(&ship, true)?;
    assert_eq!(shipped["outcome"], "shipped");
    assert_eq!(shipped["kind"], "initial");
    assert_eq!(shipped["cycle"], 1);
    assert_eq!(shipped["changed_bytes"], 4 << 20);
    assert!(shipped["cache"].is_string());
    let hydrated = json(&hydrate, true)?;
    assert_eq!(hydrated["committed_cycle"], 1);
    assert_eq!(hydrated["applied"][0]["cycle"], 1);
    assert_eq!(hydrated["failed"], Value::Null);

    let o = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["write", "--source", &src, "--state", &ss, "--bytes", "256K"])
        .output()?;
    ensure!(o.status.success(), "write failed");
    let delta = json(&ship, true)?;
    assert_eq!(delta["kind"], "delta");
    assert_eq!(delta["base_cycle"], 1);
    assert!(delta["changed_bytes"].as_u64().unwrap_or(0) >= 256 << 10);
    // Before hydrating, the disks differ: exit 1, and still JSON.
    let differ = json(
        &["verify", "--source", &src, "--target", &tgt, "--json"],
        false,
    )?;
    assert_eq!(differ["identical"], false);
    assert!(differ["differing_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(differ["first_differences"][0]["offset_bytes"].is_u64());
    json(&hydrate, true)?;
    let same = json(
        &["verify", "--source", &src, "--target", &tgt, "--json"],
        true,
    )?;
    assert_eq!(same["identical"], true);
    assert_eq!(same["compared_bytes"], 4 << 20);

    let status = json(
        &["status", "--state", &ss, "--sink", &cache, "--json"],
        true,
    )?;
    assert_eq!(status["source"]["next_cycle"], 3);
    assert_eq!(status["target"], Value::Null);
    assert!(
        status["cache_cycles"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );
    let status = json(&["status", "--state", &ts, "--json"], true)?;
    assert_eq!(status["target"]["committed_cycle"], 2);
    Ok(())
}
