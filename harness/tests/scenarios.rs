//! Runs every scenario file under `scenarios/` with the harness binary (as root: loop devices,
//! the kernel tracker's tracefs, fio and qemu-img), and checks how `harness scenario` reports a
//! failed expectation and a malformed file.
#![allow(clippy::print_stderr)] // progress of the scenario loop, shown on failure

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};

fn harness() -> Command {
    Command::new(env!("CARGO_BIN_EXE_harness"))
}

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn run_scenario(file: &Path, dir: &Path, extra: &[&str]) -> Result<Output> {
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    harness()
        .arg("scenario")
        .arg(file)
        .arg("--quiet")
        .arg("--work")
        .arg(dir.join(&name))
        .arg("--report")
        .arg(dir.join(format!("{name}.json")))
        .args(extra)
        .output()
        .with_context(|| format!("running harness scenario {}", file.display()))
}

#[test]
fn every_scenario_in_the_scenarios_directory_passes() -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the shipped scenarios in {}, found {files:?}",
        scenarios_dir().display()
    );
    let dir = tempfile::tempdir()?;
    let mut failures = Vec::new();
    for file in &files {
        let out = run_scenario(file, dir.path(), &[])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            eprintln!("passed: {}", file.display());
            continue;
        }
        // The harness names the failed expectations (or the error) on its last stderr line.
        let why = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("no error line")
            .to_owned();
        eprintln!(
            "FAILED: {} ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            file.display(),
            out.status
        );
        failures.push(format!("{}: {why}", file.display()));
    }
    assert!(
        failures.is_empty(),
        "scenarios failed:\n{}",
        failures.join("\n")
    );
    Ok(())
}

const SMALL: &str = r#"
name = "small"
cycles = 1

[[disk]]
name = "f"
size = "4M"
backing = "file"

[[workload]]
pattern = "postgres"
bytes = "256K"
"#;

#[test]
fn a_failed_expectation_is_named_and_exits_1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("small.toml");
    std::fs::write(&file, format!("{SMALL}\n[expect]\nstored_bytes_max = 1\n"))?;
    let out = run_scenario(&file, dir.path(), &[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("FAIL stored_bytes_max"), "{stdout}");
    assert!(
        stderr.contains("1 expectation(s) failed: stored_bytes_max"),
        "{stderr}"
    );
    // The report says the same.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("small.json"))?)?;
    assert_eq!(report["passed"], false);
    let failed: Vec<&str> = report["expectations"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["passed"] == false)
                .filter_map(|e| e["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(failed, ["stored_bytes_max"]);
    Ok(())
}

#[test]
fn json_mode_prints_the_report_with_every_cycle() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("small.toml");
    std::fs::write(&file, SMALL)?;
    let out = run_scenario(&file, dir.path(), &["--json"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("--json prints exactly the JSON report on stdout")?;
    assert_eq!(report["passed"], true);
    let cycles = report["disks"][0]["cycles"]
        .as_array()
        .context("per-disk cycles")?;
    assert_eq!(cycles.len(), 2, "the initial copy and one delta");
    let delta = &cycles[1];
    assert!(delta["changed_bytes"].as_u64().unwrap_or(0) >= 256 << 10);
    assert!(delta["stored_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(delta["compression_ratio"].as_f64().unwrap_or(0.0) > 1.0);
    // One delta that took seconds: the next is an hour later by the schedule's formula.
    assert_eq!(delta["next_delta_s"].as_f64(), Some(3600.0));
    assert_eq!(delta["reconciliation"], "reconciled");
    assert_eq!(delta["identical"], true);
    Ok(())
}

#[test]
fn a_malformed_scenario_exits_2_naming_file_line_and_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        SMALL.replace("bytes = \"256K\"", "bytes = \"256K\"\ncolour = 1"),
    )?;
    let out = run_scenario(&file, dir.path(), &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:13:", file.display())) && stderr.contains("colour"),
        "{stderr}"
    );
    Ok(())
}
