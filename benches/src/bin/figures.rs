//! `figures`: measures the engine's building blocks once and prints markdown tables, for CI logs
//! and the README (criterion's benches give the statistics; this gives one readable page).
//!
//! * **bitmap**: 10 million (quick: 1 million) random 4 KiB writes marked on a 256 GiB and on a
//!   64 TiB disk: ns per write, the extents iterated per second, and the bitmap's memory (its own
//!   estimate and the process's resident-set growth);
//! * **blob codec**: encode (CRC-32, zstd level 1, AES-256-GCM) and decode MB/s per blob size
//!   (64 KiB, 1 MiB, 4 MiB) and content (text, binary records, random, zero, a realistic mix),
//!   over 32 MiB (quick: 8 MiB) of each content cut into blobs, and what the blobs store per
//!   byte of disk;
//! * **pipeline**: `ship_cycle` and `hydrate` through a local-directory cache, for the initial
//!   copy of an in-memory disk and for deltas of 1 % random 16 KiB writes.
//!
//!   cargo run --release -p replicator-benches --bin figures -- [--quick] [--out FILE] [--writes N]
//!
//! `--quick` shortens every measurement for CI (under 30 s in all on 2 cores; the full run takes a
//! few minutes and about 5 GiB of memory for the 64 TiB bitmap); `--writes` sets the bitmap's
//! write count. Everything printed is measured in this run.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a binary that prints its figures

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use replicator_benches::pipeline::{Replication, timed};
use replicator_benches::{BlockKind, DataGen, blob_layout, kind_bytes, random_block_offsets};
use replicator_core::bitmap::{SECTOR_SIZE, SectorBitmap};
use replicator_core::format::{self, Expect, Session};
use replicator_core::keys::{DiskId, MasterKey};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// How long each run is.
#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    out: Option<PathBuf>,
    writes: usize,
}

const USAGE: &str = "usage: figures [--quick] [--out FILE] [--writes N]";

fn parse_args() -> Result<Opts> {
    let mut opts = Opts {
        quick: false,
        out: None,
        writes: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--out" => {
                let path = args.next().context("--out needs a file path")?;
                opts.out = Some(PathBuf::from(path));
            }
            "--writes" => {
                let n = args.next().context("--writes needs a count")?;
                opts.writes = n
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("--writes {n}: give a positive whole number"))?;
            }
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument `{other}`; {USAGE}"),
        }
    }
    if opts.writes == 0 {
        opts.writes = if opts.quick { 1_000_000 } else { 10_000_000 };
    }
    Ok(opts)
}

/// Resident set size of this process, from /proc/self/status.
fn rss_bytes() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line in /proc/self/status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("cannot read `{line}`"))?;
    Ok(kib * KIB)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / MIB as f64)
}

/// GiB from 1 GiB up, else MiB.
fn mib_or_gib(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        mib(bytes as f64)
    }
}

fn size_label(bytes: u64) -> String {
    if bytes >= TIB {
        format!("{} TiB", bytes / TIB)
    } else if bytes >= GIB {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / KIB)
    }
}

/// MB/s (10^6 bytes per second).
fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6
}

fn bitmap_table(opts: &Opts, out: &mut String) -> Result<()> {
    writeln!(
        out,
        "### Sector bitmap: {} random 4 KiB writes\n",
        opts.writes
    )?;
    writeln!(
        out,
        "| disk | marked | ns per write | extents | extents/s | memory (estimate) | RSS growth |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let mut kept = Vec::new();
    for (i, disk_bytes) in [256 * GIB, 64 * TIB].into_iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(0xb17 + i as u64);
        let offsets = random_block_offsets(&mut rng, disk_bytes, opts.writes, 4096);
        let rss_before = rss_bytes()?;
        let mut bm = SectorBitmap::new(disk_bytes / SECTOR_SIZE);
        let (marked, mark_took) = timed(|| -> Result<()> {
            for &off in &offsets {
                bm.mark_bytes(black_box(off), 4096)?;
            }
            Ok(())
        });
        marked?;
        let rss_after = rss_bytes()?;
        let ((extents, sectors), iter_took) = timed(|| {
            bm.extents()
                .fold((0u64, 0u64), |(n, s), e| (n + 1, s + e.sector_count))
        });
        if sectors != bm.count() {
            bail!(
                "the extents cover {sectors} sectors, the bitmap counts {}",
                bm.count()
            );
        }
        writeln!(
            out,
            "| {} | {} | {:.0} | {} | {:.1} M | {} | {} |",
            size_label(disk_bytes),
            mib_or_gib(bm.count() * SECTOR_SIZE),
            mark_took.as_nanos() as f64 / opts.writes as f64,
            extents,
            extents as f64 / iter_took.as_secs_f64().max(1e-9) / 1e6,
            mib_or_gib(bm.memory_bytes() as u64),
            mib_or_gib(rss_after.saturating_sub(rss_before)),
        )?;
        // Kept until both disks are measured, so the second's RSS growth is not hidden by
        // memory the first freed.
        kept.push(bm);
    }
    drop(kept);
    writeln!(out)?;
    Ok(())
}

/// Runs `f` until `min` has passed (at least twice) and returns the time of one run.
fn per_run(min: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    f()?; // warm-up
    let mut runs = 0u32;
    let mut total = Duration::ZERO;
    while runs < 2 || total < min {
        let (r, took) = timed(&mut f);
        r?;
        total += took;
        runs += 1;
    }
    Ok(total / runs)
}

fn codec_table(opts: &Opts, out: &mut String) -> Result<()> {
    let min = if opts.quick {
        Duration::from_millis(150)
    } else {
        Duration::from_secs(1)
    };
    let key = MasterKey::from_bytes([0x5a; 32]);
    let disk = DiskId([0x11; 16]);
    let disk_key = key.disk_key(&disk);
    let session = Session::new(&disk_key, disk, 7, 1, [0x33; 16]);
    writeln!(
        out,
        "### Blob codec (CRC-32, zstd level 1, AES-256-GCM), one thread\n"
    )?;
    writeln!(
        out,
        "Each row encodes and decodes {} of content cut into blobs of the row's size; MB/s counts \
         the disk bytes the blobs cover (a zero run is an extent without data, hence the zero \
         rows' rates); stored is the blobs' size per disk byte.\n",
        mib_or_gib(if opts.quick { 8 * MIB } else { 32 * MIB })
    )?;
    writeln!(
        out,
        "| content | blob | encode MB/s | decode MB/s | stored |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: |")?;
    let kinds: [(&str, Option<BlockKind>); 5] = [
        ("text", Some(BlockKind::Text)),
        ("binary records", Some(BlockKind::Binary)),
        ("random", Some(BlockKind::Random)),
        ("zero", Some(BlockKind::Zero)),
        ("realistic mix", None),
    ];
    // Every cell encodes the same amount of content, cut into blobs of its size, so a small blob
    // size is not judged on one sample. Each blob has its own sequence number: the session
    // refuses to encrypt other bytes under a nonce it already used.
    let corpus_bytes = if opts.quick { 8 * MIB } else { 32 * MIB };
    let mut seq = 0u32;
    for (name, kind) in kinds {
        let corpus = match kind {
            Some(k) => kind_bytes(k, corpus_bytes as usize, 0xc0de),
            None => DataGen::new(0xc0de).bytes(corpus_bytes as usize),
        };
        for block in [64 * KIB, MIB, 4 * MIB] {
            let mut blobs = Vec::new();
            let mut stored = 0u64;
            for (i, piece) in corpus.chunks(block as usize).enumerate() {
                seq += 1;
                let (extents, data) = blob_layout(&[(GIB + i as u64 * block, piece)]);
                let obj = session.encode_blob(seq, &extents, &data, 1)?;
                let expect = Expect {
                    disk_id: disk,
                    cycle: session.cycle(),
                    attempt: Some(session.attempt()),
                    seq: Some(seq),
                    tag: Some(obj.tag),
                };
                let decoded = format::decode_blob(&disk_key, &obj.bytes, &expect)?;
                if decoded.data.as_ref() != data.as_slice() {
                    bail!("{name} {block}: the decoded blob differs from what was encoded");
                }
                stored += obj.bytes.len() as u64;
                blobs.push((seq, extents, data, obj.bytes, expect));
            }
            let enc = per_run(min, || {
                for (seq, extents, data, _, _) in &blobs {
                    black_box(session.encode_blob(*seq, black_box(extents), black_box(data), 1)?);
                }
                Ok(())
            })?;
            let dec = per_run(min, || {
                for (_, _, _, bytes, expect) in &blobs {
                    black_box(format::decode_blob(&disk_key, black_box(bytes), expect)?);
                }
                Ok(())
            })?;
            writeln!(
                out,
                "| {name} | {} | {:.0} | {:.0} | {:.1} % |",
                size_label(block),
                rate(corpus_bytes, enc),
                rate(corpus_bytes, dec),
                stored as f64 * 100.0 / corpus_bytes as f64,
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn pipeline_table(opts: &Opts, out: &mut String) -> Result<()> {
    let (disk_bytes, deltas) = if opts.quick {
        (128 * MIB, 3u32)
    } else {
        (512 * MIB, 10u32)
    };
    writeln!(
        out,
        "### Pipeline: ship and hydrate through a local-directory cache, {} in-memory disk\n",
        size_label(disk_bytes)
    )?;
    writeln!(
        out,
        "| cycle | changed | stored | ship | ship MB/s | hydrate | hydrate MB/s |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let mut rep = Replication::new(disk_bytes, 0xd15c)?;
    let initial = rep.cycle(0)?;
    rep.check_identical()?;
    writeln!(
        out,
        "| initial copy | {} | {} | {:.0} ms | {:.0} | {:.0} ms | {:.0} |",
        mib(initial.changed_bytes as f64),
        mib(initial.stored_bytes as f64),
        initial.ship.as_secs_f64() * 1e3,
        rate(initial.changed_bytes, initial.ship),
        initial.hydrate.as_secs_f64() * 1e3,
        rate(initial.changed_bytes, initial.hydrate),
    )?;
    let churn = rep.churn_bytes();
    let (mut ship, mut hydrate, mut stored) = (Duration::ZERO, Duration::ZERO, 0u64);
    for _ in 0..deltas {
        let p = rep.cycle(churn)?;
        ship += p.ship;
        hydrate += p.hydrate;
        stored += p.stored_bytes;
    }
    rep.check_identical()?;
    let (ship, hydrate) = (ship / deltas, hydrate / deltas);
    writeln!(
        out,
        "| delta, 1 % in 16 KiB writes (mean of {deltas}) | {} | {} | {:.1} ms | {:.0} | {:.1} ms | {:.0} |",
        mib(churn as f64),
        mib(stored as f64 / f64::from(deltas)),
        ship.as_secs_f64() * 1e3,
        rate(churn, ship),
        hydrate.as_secs_f64() * 1e3,
        rate(churn, hydrate),
    )?;
    writeln!(out)?;
    Ok(())
}

fn run(opts: &Opts) -> Result<String> {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        out,
        "Engine figures ({} mode, {} build, {cores} cores); every figure measured in this run.\n",
        if opts.quick { "quick" } else { "full" },
        if cfg!(debug_assertions) {
            "DEBUG (not representative)"
        } else {
            "release"
        },
    )?;
    bitmap_table(opts, &mut out)?;
    codec_table(opts, &mut out)?;
    pipeline_table(opts, &mut out)?;
    Ok(out)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("figures: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (result, took) = timed(|| run(&opts));
    match result {
        Ok(text) => {
            print!("{text}");
            println!("(measured in {:.1} s)", took.as_secs_f64());
            if let Some(path) = &opts.out
                && let Err(e) = std::fs::write(path, &text)
            {
                eprintln!("figures: cannot write {}: {e}", path.display());
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("figures: {e:#}");
            ExitCode::from(1)
        }
    }
}
