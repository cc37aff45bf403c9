//! `harness assess`: sample block devices' write counters and say, per disk, whether its churn
//! fits the replication tiers before replicating it (the maths is `replicator_core::assess`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use replicator_core::assess::{
    self, AssessConfig, DiskSample, Interval, MB, Sizing, TierFit, TierTable, Verdict,
};
use replicator_core::clock::{Clock, SystemClock};
use serde::Serialize;

use crate::commands::UsageError;
use crate::ktrack::device::BlockDev;

/// Arguments of `harness assess`.
#[derive(Debug, clap::Args)]
pub struct AssessArgs {
    /// A block device to assess (repeat for the disks of one machine).
    #[arg(long = "device", required = true)]
    devices: Vec<PathBuf>,
    /// Time between samples of the device's counters.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    interval: Duration,
    /// How long to sample.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    duration: Duration,
    /// The peak of each window of this length is kept.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    window: Duration,
    /// Percentile of the window peaks to size for.
    #[arg(long, default_value_t = 95.0)]
    percentile: f64,
    /// Headroom multiplied in, 1.0 to 2.0.
    #[arg(long, default_value_t = 1.3)]
    comfort: f64,
    /// A JSON tier table replacing the built-in one (the `tiers` of `--json` output show the
    /// shape: name, rows of min_write_bytes and disk_mb_per_s, vm_mb_per_s).
    #[arg(long)]
    tiers: Option<PathBuf>,
    /// Print the result as JSON for tools.
    #[arg(long)]
    json: bool,
}

/// Parses `500ms`, `20s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} needs a unit: ms, s, m or h"))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m or h"
            ));
        }
    };
    if ms == 0 {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(Duration::from_millis(ms))
}

#[derive(Debug, Serialize)]
struct DiskReport {
    device: String,
    samples: Vec<DiskSample>,
    intervals: Vec<Interval>,
    sizing: Sizing,
    verdict: Verdict,
    tiers: Vec<TierFit>,
}

#[derive(Debug, Serialize)]
struct Report {
    config: AssessConfig,
    disks: Vec<DiskReport>,
    /// All disks together against each tier's per-VM limit.
    vm_total_mb_per_s: f64,
    vm_fits: Vec<(String, bool)>,
    tier_table: TierTable,
}

/// Runs the assessment.
pub async fn run(args: AssessArgs) -> Result<ExitCode> {
    let cfg = AssessConfig {
        interval_ms: args.interval.as_millis() as u64,
        window_ms: args.window.as_millis() as u64,
        percentile: args.percentile,
        comfort: args.comfort,
    };
    cfg.validate().map_err(|e| UsageError(e.to_string()))?;
    let table = match &args.tiers {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str::<TierTable>(&text).map_err(|e| {
                UsageError(format!(
                    "{}:{}:{}: not a tier table: {e}",
                    path.display(),
                    e.line(),
                    e.column()
                ))
            })?
        }
        None => TierTable::default(),
    };
    table.validate().map_err(|e| UsageError(e.to_string()))?;
    let mut devs = Vec::new();
    for d in &args.devices {
        devs.push(BlockDev::resolve(d).map_err(|e| UsageError(format!("{e:#}")))?);
    }
    let rounds = (args.duration.as_millis() / args.interval.as_millis().max(1)).max(1) as u64;
    let clock = SystemClock;
    let started = clock.now();
    let mut samples: Vec<Vec<DiskSample>> = vec![Vec::new(); devs.len()];
    if !args.json {
        eprintln!(
            "sampling {} device(s) every {:?} for {:?} ({rounds} intervals)",
            devs.len(),
            args.interval,
            args.duration
        );
    }
    for i in 0..=rounds {
        let deadline = started.plus(args.interval * i as u32);
        clock.sleep_until(deadline).await;
        let at_ms = clock.now().since(started).as_millis() as u64;
        for (d, dev) in devs.iter().enumerate() {
            let c = dev
                .counters()
                .with_context(|| format!("reading the counters of {}", dev.path.display()))?;
            samples[d].push(DiskSample {
                at_ms,
                writes: c.writes,
                sectors_written: c.sectors_written,
            });
        }
    }
    let mut disks = Vec::new();
    for (dev, samples) in devs.iter().zip(samples) {
        let intervals = assess::intervals(&samples)?;
        let peaks = assess::window_peaks(&intervals, cfg.window_ms);
        let sizing = assess::size(&peaks, &cfg);
        let (verdict, tiers) = assess::judge(&sizing, &table);
        disks.push(DiskReport {
            device: dev.path.display().to_string(),
            samples,
            intervals,
            sizing,
            verdict,
            tiers,
        });
    }
    let vm_total = disks
        .iter()
        .map(|d| d.sizing.write_bytes_per_s)
        .sum::<f64>()
        / MB;
    let vm_fits = table
        .tiers
        .iter()
        .map(|t| (t.name.clone(), vm_total <= t.vm_mb_per_s))
        .collect();
    let report = Report {
        config: cfg,
        disks,
        vm_total_mb_per_s: vm_total,
        vm_fits,
        tier_table: table,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &Report) {
    for d in &r.disks {
        println!("{}", d.device);
        print_chart(&d.intervals);
        println!(
            "  sized for {:.2} MB/s, {:.0} write IOPS, {:.1} KiB per write (P{} of {} window \
             peaks x {})",
            d.sizing.write_bytes_per_s / MB,
            d.sizing.write_iops,
            d.sizing.avg_write_bytes / 1024.0,
            r.config.percentile,
            d.sizing.windows,
            r.config.comfort
        );
        for t in &d.tiers {
            println!(
                "  {:<10} limit {:>6.1} MB/s per disk at this write size, {:>6.1} per VM: {} \
                 (margin {:+.0}%)",
                t.tier,
                t.disk_limit_mb_per_s,
                t.vm_limit_mb_per_s,
                if t.fits { "fits" } else { "EXCEEDS" },
                t.margin * 100.0
            );
        }
        let verdict = match &d.verdict {
            Verdict::Fits { tier } => format!("fits the {tier} tier"),
            Verdict::FitsOnly { tier } => format!("fits only on the {tier} tier"),
            Verdict::ExceedsAll => {
                "exceeds every tier: exclude it from replication and copy it separately".into()
            }
        };
        println!("  verdict: {verdict}");
    }
    let fits: Vec<String> = r
        .vm_fits
        .iter()
        .map(|(t, ok)| format!("{t} {}", if *ok { "fits" } else { "EXCEEDS" }))
        .collect();
    println!(
        "all disks together: {:.2} MB/s against the per-VM limits: {}",
        r.vm_total_mb_per_s,
        fits.join(", ")
    );
}

/// One bar per interval: its write MB/s, scaled to the largest.
fn print_chart(intervals: &[Interval]) {
    const WIDTH: f64 = 50.0;
    // At most 40 rows: neighbouring intervals are merged by their maximum.
    let per_row = intervals.len().div_ceil(40).max(1);
    let rows: Vec<(u64, f64)> = intervals
        .chunks(per_row)
        .map(|c| {
            (
                c[0].start_ms,
                c.iter().map(|i| i.write_bytes_per_s).fold(0.0, f64::max) / MB,
            )
        })
        .collect();
    let top = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    for (at, mb) in rows {
        let n = if top > 0.0 {
            (mb / top * WIDTH).round() as usize
        } else {
            0
        };
        println!(
            "  {:>7.1}s |{:<50}| {mb:.2} MB/s",
            at as f64 / 1000.0,
            "#".repeat(n)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_only() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("20").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
    }
}
