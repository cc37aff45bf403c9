//! Bounded memory, measured: shipping and hydrating a disk whose every byte changed (a delta far
//! larger than the pipeline's in-flight budget) peaks at the same memory for a 32 MiB and a
//! 256 MiB disk, well under a fixed budget. Both disks are larger than what the pipelines hold
//! at once (workers, blobs fetched ahead, queued and in-flight puts), so both fill them. Each command reports its peak RSS at the end.
#![allow(clippy::print_stdout)] // the figures are printed for the test log

use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;
/// Generous for a debug build: 4 queued + 4 in-flight blobs of 4 MiB, their compressed copies,
/// read buffers, the runtime and the binary itself.
const BUDGET_BYTES: u64 = 192 * MIB;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the harness; returns its output and the peak RSS it reported.
fn run(args: &[&str]) -> anyhow::Result<(String, u64)> {
    let o = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .output()?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    anyhow::ensure!(o.status.success(), "harness {args:?} failed:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("peak memory (RSS): "))
        .ok_or_else(|| anyhow::anyhow!("no peak memory line in:\n{out}"))?;
    let text = line.trim_start_matches("peak memory (RSS): ");
    let mut words = text.split_whitespace();
    let value: f64 = words.next().unwrap_or("").parse()?;
    let unit = match words.next().unwrap_or("") {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => anyhow::bail!("unknown unit {other:?} in {line:?}"),
    };
    Ok((out, (value * unit) as u64))
}

/// (ship peak, hydrate peak) for an initial copy of a `size`-byte disk of random data.
fn replicate(dir: &Path, size: u64) -> anyhow::Result<(u64, u64)> {
    let (src, tgt, key) = (dir.join("src.img"), dir.join("tgt.img"), dir.join("key"));
    std::fs::File::create(&tgt)?.set_len(size)?;
    {
        use std::io::Write;
        // Incompressible content: every byte of the delta goes through the pipeline as data.
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ size;
        let mut block = vec![0u8; MIB as usize];
        for _ in 0..size / MIB {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["keygen", "--out", &s(&key)])
        .output()?;
    anyhow::ensure!(o.status.success(), "keygen failed");
    let cache = dir.join("cache");
    let (_, ship) = run(&[
        "ship",
        "--source",
        &s(&src),
        "--sink",
        &s(&cache),
        "--state",
        &s(&dir.join("sst")),
        "--key-file",
        &s(&key),
    ])?;
    let (_, hydrate) = run(&[
        "hydrate",
        "--target",
        &s(&tgt),
        "--sink",
        &s(&cache),
        "--state",
        &s(&dir.join("tst")),
        "--key-file",
        &s(&key),
    ])?;
    Ok((ship, hydrate))
}

#[test]
fn peak_memory_follows_the_pipeline_budget_not_the_disk_size() -> anyhow::Result<()> {
    let small_dir = tempfile::tempdir()?;
    let large_dir = tempfile::tempdir()?;
    let (ship_small, hydrate_small) = replicate(small_dir.path(), 32 * MIB)?;
    let (ship_large, hydrate_large) = replicate(large_dir.path(), 256 * MIB)?;
    println!(
        "peak RSS: ship {} / {} MiB, hydrate {} / {} MiB (32 MiB / 256 MiB disk)",
        ship_small / MIB,
        ship_large / MIB,
        hydrate_small / MIB,
        hydrate_large / MIB
    );
    for (what, peak) in [("ship", ship_large), ("hydrate", hydrate_large)] {
        assert!(
            peak <= BUDGET_BYTES,
            "{what} of a 256 MiB delta peaked at {} MiB, over the {} MiB budget",
            peak / MIB,
            BUDGET_BYTES / MIB
        );
    }
    // Eight times the disk, not eight times the memory: at most 48 MiB more.
    for (what, small, large) in [
        ("ship", ship_small, ship_large),
        ("hydrate", hydrate_small, hydrate_large),
    ] {
        assert!(
            large <= small + 48 * MIB,
            "{what}: {} MiB for 256 MiB against {} MiB for 32 MiB: memory grows with the disk",
            large / MIB,
            small / MIB
        );
    }
    Ok(())
}
