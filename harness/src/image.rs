//! `harness image`: writes a realistic file-system-like disk image (text, binary records, random
//! and sparse zero segments, from a seed) for benchmarks and side-by-side comparisons with other
//! tools (`benches/compare.sh`).

use std::io::ErrorKind as IoErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use replicator_core::device::{BlockDevice, FileDevice};
use replicator_core::progress::Progress;

use crate::bars::Bars;
use crate::commands::{UsageError, parse_size};
use crate::table;
use crate::workload::fill_image;

/// Arguments of `harness image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// The image file to write; an existing file is refused unless `--force`.
    #[arg(long)]
    out: PathBuf,
    /// Size of the image, e.g. 512M, 4G (a positive multiple of 512 bytes).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
    /// Seed of the content: the same seed and size give the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replace an existing regular file at `--out`.
    #[arg(long)]
    force: bool,
    /// Draw no progress bar.
    #[arg(long)]
    quiet: bool,
}

fn usage(msg: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg))
}

/// Checks the size and what is at `out` before anything is written.
fn check_args(out: &Path, size: u64, force: bool) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(usage(format!(
            "--size {size} bytes must be a positive multiple of 512 bytes (e.g. 512M, 4G)"
        )));
    }
    match std::fs::symlink_metadata(out) {
        Ok(meta) if !meta.file_type().is_file() => Err(usage(format!(
            "{} exists and is not a regular file; harness image writes only image files",
            out.display()
        ))),
        Ok(_) if !force => Err(usage(format!(
            "{} already exists; pass --force to replace it",
            out.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == IoErrorKind::NotFound => Ok(()),
        Err(e) => Err(usage(format!("cannot look at {}: {e}", out.display()))),
    }
}

/// Creates the sparse file: with `force` it replaces a regular file, else it must be new (checked
/// again at creation, so a file that appeared meanwhile is not overwritten either).
fn create(out: &Path, size: u64, force: bool) -> Result<FileDevice> {
    if !force {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)
            .map_err(|e| {
                if e.kind() == IoErrorKind::AlreadyExists {
                    usage(format!(
                        "{} already exists; pass --force to replace it",
                        out.display()
                    ))
                } else {
                    usage(format!("cannot create {}: {e}", out.display()))
                }
            })?;
    }
    FileDevice::create_sparse(out, size)
        .map_err(|e| usage(format!("cannot create the image {}: {e}", out.display())))
}

/// `harness image`.
pub fn run(args: ImageArgs) -> Result<ExitCode> {
    check_args(&args.out, args.size, args.force)?;
    let dev = create(&args.out, args.size, args.force)?;
    let bars = Bars::new(args.quiet);
    bars.start("image", dev.size_bytes());
    let filled = fill_image(&dev, args.seed, |n| bars.advance(n));
    bars.end();
    filled.with_context(|| format!("writing the image {}", args.out.display()))?;
    let meta = std::fs::metadata(&args.out)
        .with_context(|| format!("reading the size of {}", args.out.display()))?;
    // st_blocks counts 512-byte units whatever the file system's block size.
    let allocated = meta.blocks().saturating_mul(512);
    println!(
        "wrote {}: {} (seed {}), {} allocated, {} left sparse (zero segments)",
        args.out.display(),
        table::bytes(args.size),
        args.seed,
        table::bytes(allocated),
        table::bytes(args.size.saturating_sub(allocated)),
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn message(r: Result<()>) -> String {
        let err = r.unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        format!("{err:#}")
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("img");
        assert!(message(check_args(&out, 0, false)).contains("positive multiple of 512"));
        assert!(message(check_args(&out, 1000, false)).contains("--size 1000"));
        assert!(check_args(&out, 4096, false).is_ok());
    }

    #[test]
    fn existing_files_need_force_and_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("img");
        std::fs::write(&out, b"keep").unwrap();
        assert!(message(check_args(&out, 4096, false)).contains("--force"));
        assert!(message(create(&out, 4096, false).map(drop)).contains("already exists"));
        assert_eq!(std::fs::read(&out).unwrap(), b"keep");
        assert!(check_args(&out, 4096, true).is_ok());
        assert!(message(check_args(dir.path(), 4096, true)).contains("not a regular file"));
    }
}
