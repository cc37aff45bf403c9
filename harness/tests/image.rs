//! `harness image` as an operator runs it: same seed, same bytes; an existing file is refused
//! without `--force`; a bad size is refused with exit code 2.

use std::path::Path;
use std::process::{Command, Output};

fn image(out: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_harness"))
        .arg("image")
        .arg("--out")
        .arg(out)
        .args(["--quiet"])
        .args(extra)
        .output()?)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn same_seed_same_bytes_and_overwrite_only_with_force() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let o = image(&a, &["--size", "8M", "--seed", "5"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("8.0 MiB (seed 5)"));
    let o = image(&b, &["--size", "8M", "--seed", "5"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(&a)?;
    assert_eq!(first.len(), 8 << 20);
    assert_eq!(first, std::fs::read(&b)?);
    // Every kind of content is there: zero segments and non-zero ones.
    let zero_mib = first
        .chunks(1 << 20)
        .filter(|c| c.iter().all(|&x| x == 0))
        .count();
    assert!(zero_mib < 8, "all zero");

    let o = image(&b, &["--size", "8M", "--seed", "6"])?;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already exists; pass --force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        first,
        std::fs::read(&b)?,
        "a refused run must not touch the file"
    );

    let o = image(&b, &["--size", "4M", "--seed", "6", "--force"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let second = std::fs::read(&b)?;
    assert_eq!(second.len(), 4 << 20);
    assert_ne!(&first[..4 << 20], second.as_slice());
    Ok(())
}

#[test]
fn bad_sizes_are_refused_with_exit_code_2() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("x.img");
    for (size, says) in [
        ("1000", "positive multiple of 512"),
        ("0", "positive multiple of 512"),
        ("4Q", "unknown size unit"),
        ("lots", "invalid value 'lots' for '--size"),
    ] {
        let o = image(&out, &["--size", size])?;
        assert_eq!(o.status.code(), Some(2), "--size {size}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "--size {size}: {}", stderr(&o));
        assert!(!out.exists(), "--size {size} left a file");
    }
    Ok(())
}
