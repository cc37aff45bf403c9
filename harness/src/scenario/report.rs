//! A scenario's report: per disk and per cycle what was changed, shipped and applied and how
//! long each stage took, the faults and what became of them, and every expectation with its
//! verdict. Written as JSON; [`Report::summary`] is the table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use harness::scenario::spec::{Backing, Tracker};
use serde::Serialize;

use super::Ctx;
use super::disk::{CycleRecord, Disk};
use super::faults::{FaultEvent, Plan};
use crate::table;

/// One disk's part of the report.
#[derive(Debug, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub disk_id: String,
    pub size_bytes: u64,
    pub tracker: String,
    pub backing: String,
    pub source: String,
    pub target: String,
    pub cycles: Vec<CycleRecord>,
    /// The target's committed cycle at the end.
    pub committed_cycle: u64,
    /// Byte-identical at the end (`harness verify`'s compare), and the bytes that differ.
    pub identical: Option<bool>,
    pub differing_bytes: u64,
    /// `qemu-img compare`'s verdict, when the scenario asks for it.
    pub qemu_img_identical: Option<bool>,
}

/// Sums over every disk and cycle.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub disks: usize,
    pub cycles_shipped: u64,
    pub changed_bytes: u64,
    pub stored_bytes: u64,
    pub compression_ratio: Option<f64>,
    /// Cycles the targets reported failed (a blob failed verification, was missing, ...).
    pub failed_cycles: u64,
    /// Ships and hydrates that failed as a whole (e.g. a permanent cache error).
    pub ship_errors: u64,
    pub hydrate_errors: u64,
    pub heal_rounds: u32,
    /// The most disks that were in a step at once (never above the concurrency limit).
    pub max_concurrent_disks: usize,
    pub duration_s: f64,
}

/// One expectation and its verdict.
#[derive(Debug, Serialize)]
pub struct Expectation {
    pub name: String,
    pub expected: String,
    pub actual: String,
    pub passed: bool,
}

/// The report of one scenario run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub file: String,
    pub description: String,
    pub seed: u64,
    pub work_dir: String,
    pub concurrency: u32,
    pub throttle: Option<String>,
    pub sink: String,
    pub disks: Vec<DiskReport>,
    pub totals: Totals,
    pub faults: Vec<FaultEvent>,
    /// What the cache layer saw: operations, bytes, errors, latencies.
    pub cache_metrics: String,
    pub expectations: Vec<Expectation>,
    pub passed: bool,
}

fn tracker_name(t: Tracker) -> &'static str {
    match t {
        Tracker::Cbt => "cbt",
        Tracker::Hrl => "hrl",
        Tracker::Kernel => "kernel",
    }
}

impl Report {
    /// Builds the report of a finished run and checks the expectations.
    pub fn build(
        ctx: &Ctx,
        file: &Path,
        work: &Path,
        disks: &[Disk],
        plan: &Plan,
        heal_rounds: u32,
        took: Duration,
    ) -> Report {
        let s = &ctx.scenario;
        let mut totals = Totals {
            disks: disks.len(),
            heal_rounds,
            max_concurrent_disks: ctx.busy_max.load(std::sync::atomic::Ordering::SeqCst),
            duration_s: took.as_secs_f64(),
            ..Totals::default()
        };
        let mut faults = plan.sink_events(ctx);
        let mut reports = Vec::with_capacity(disks.len());
        for d in disks {
            for r in &d.records {
                totals.cycles_shipped += u64::from(r.cycle.is_some());
                totals.changed_bytes += r.changed_bytes;
                totals.stored_bytes += r.stored_bytes;
                totals.failed_cycles += u64::from(r.failed_cycle.is_some());
                totals.ship_errors += u64::from(r.ship_error.is_some());
                totals.hydrate_errors += u64::from(r.hydrate_error.is_some());
            }
            faults.extend(d.events.iter().cloned());
            reports.push(DiskReport {
                name: d.name.clone(),
                disk_id: d.disk_id.to_string(),
                size_bytes: d.group.size.0,
                tracker: tracker_name(d.group.tracker).to_owned(),
                backing: match d.group.backing {
                    Backing::Loop => "loop",
                    Backing::File => "file",
                }
                .to_owned(),
                source: d.source_dev.display().to_string(),
                target: d.target_dev.display().to_string(),
                cycles: d.records.clone(),
                committed_cycle: d.records.last().map_or(0, |r| r.committed_cycle),
                identical: d.final_identical,
                differing_bytes: d.final_differing_bytes,
                qemu_img_identical: d.qemu_img_identical,
            });
        }
        faults.sort_by_key(|f| f.index);
        totals.compression_ratio = (totals.stored_bytes > 0)
            .then(|| totals.changed_bytes as f64 / totals.stored_bytes as f64);
        let mut report = Report {
            scenario: s.name.clone(),
            file: file.display().to_string(),
            description: s.description.clone(),
            seed: s.seed,
            work_dir: work.display().to_string(),
            concurrency: s.concurrency,
            throttle: s.sink.throttle.as_ref().map(|t| t.get_ref().clone()),
            sink: ctx.stack.sink.describe(),
            disks: reports,
            totals,
            faults,
            cache_metrics: ctx.stack.report(),
            expectations: Vec::new(),
            passed: false,
        };
        report.expectations = check(ctx, &report);
        report.passed = report.expectations.iter().all(|e| e.passed);
        report
    }

    /// The table for people: per cycle, per disk (or summed over the disks when there are
    /// many), then the faults and the expectations.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {}: {} disk(s), concurrency {}, throttle {}, cache {}",
            self.scenario,
            self.disks.len(),
            self.concurrency,
            self.throttle.as_deref().unwrap_or("none"),
            self.sink
        );
        let _ = writeln!(
            out,
            "{:<14} {:>4} {:<8} {:>5} {:>10} {:>10} {:>6} {:>9} {:>9} {:>11} {:>10}  result",
            "disk",
            "step",
            "kind",
            "cycle",
            "changed",
            "stored",
            "ratio",
            "ship",
            "hydrate",
            "throughput",
            "next delta"
        );
        let per_disk = self.disks.len() <= 8;
        let mut rows: Vec<(String, &CycleRecord)> = Vec::new();
        if per_disk {
            for d in &self.disks {
                rows.extend(d.cycles.iter().map(|r| (d.name.clone(), r)));
            }
        }
        for (name, r) in &rows {
            let _ = writeln!(out, "{}", row(name, r));
        }
        if !per_disk {
            // Summed per step over the disks; the slowest disk's durations.
            let mut steps: BTreeMap<u32, Vec<&CycleRecord>> = BTreeMap::new();
            for d in &self.disks {
                for r in &d.cycles {
                    steps.entry(r.step).or_default().push(r);
                }
            }
            for (step, rs) in steps {
                let sum = CycleRecord {
                    step,
                    kind: rs.first().map(|r| r.kind.clone()).unwrap_or_default(),
                    cycle: rs.iter().filter_map(|r| r.cycle).max(),
                    changed_bytes: rs.iter().map(|r| r.changed_bytes).sum(),
                    stored_bytes: rs.iter().map(|r| r.stored_bytes).sum(),
                    ship_s: rs.iter().map(|r| r.ship_s).fold(0.0, f64::max),
                    hydrate_s: rs.iter().map(|r| r.hydrate_s).fold(0.0, f64::max),
                    next_delta_s: rs.iter().filter_map(|r| r.next_delta_s).reduce(f64::max),
                    identical: Some(rs.iter().all(|r| r.identical == Some(true))),
                    failed_cycle: rs.iter().find_map(|r| r.failed_cycle),
                    ship_error: rs.iter().find_map(|r| r.ship_error.clone()),
                    faults: rs.iter().flat_map(|r| r.faults.clone()).collect(),
                    ..CycleRecord::default()
                };
                let _ = writeln!(out, "{}", row(&format!("{} disks", rs.len()), &sum));
            }
        }
        let t = &self.totals;
        let _ = writeln!(
            out,
            "total: {} cycles shipped, {} changed, {} stored (ratio {}), {} failed cycles, {} \
             ship errors, {} hydrate errors, {} heal rounds, {} disks at once at most, {}",
            t.cycles_shipped,
            table::bytes(t.changed_bytes),
            table::bytes(t.stored_bytes),
            t.compression_ratio
                .map_or("-".to_owned(), |r| format!("{r:.2}")),
            t.failed_cycles,
            t.ship_errors,
            t.hydrate_errors,
            t.heal_rounds,
            t.max_concurrent_disks,
            table::duration(Duration::from_secs_f64(t.duration_s))
        );
        for f in &self.faults {
            let _ = writeln!(
                out,
                "fault {} {}{}{}: {} ({})",
                f.index,
                f.kind,
                f.disk
                    .as_deref()
                    .map(|d| format!(" on {d}"))
                    .unwrap_or_default(),
                f.cycle
                    .map(|c| format!(" at cycle {c}"))
                    .unwrap_or_default(),
                if f.fired { "fired" } else { "DID NOT FIRE" },
                f.detail
            );
        }
        for e in &self.expectations {
            let _ = writeln!(
                out,
                "{} {}: expected {}, got {}",
                if e.passed { "ok  " } else { "FAIL" },
                e.name,
                e.expected,
                e.actual
            );
        }
        let _ = writeln!(
            out,
            "scenario {} {}",
            self.scenario,
            if self.passed { "passed" } else { "FAILED" }
        );
        out
    }
}

fn row(name: &str, r: &CycleRecord) -> String {
    let ratio = r
        .compression_ratio
        .or_else(|| (r.stored_bytes > 0).then(|| r.changed_bytes as f64 / r.stored_bytes as f64))
        .map_or("-".to_owned(), |x| format!("{x:.2}"));
    let result = if let Some(e) = &r.ship_error {
        format!("ship failed: {}", e.lines().next().unwrap_or(""))
    } else if let Some(c) = r.failed_cycle {
        format!("cycle {c} failed on the target")
    } else if let Some(e) = &r.hydrate_error {
        format!("hydrate failed: {}", e.lines().next().unwrap_or(""))
    } else {
        match r.identical {
            Some(true) => "identical".to_owned(),
            Some(false) => "DIFFERENT".to_owned(),
            None => "-".to_owned(),
        }
    };
    let faults = if r.faults.is_empty() {
        String::new()
    } else {
        format!(" [{} fault(s)]", r.faults.len())
    };
    let busy = Duration::from_secs_f64(r.ship_s + r.hydrate_s);
    format!(
        "{:<14} {:>4} {:<8} {:>5} {:>10} {:>10} {:>6} {:>9} {:>9} {:>11} {:>10}  {result}{faults}",
        name,
        r.step,
        r.kind,
        r.cycle.map_or("-".to_owned(), |c| c.to_string()),
        table::bytes(r.changed_bytes),
        table::bytes(r.stored_bytes),
        ratio,
        table::duration(Duration::from_secs_f64(r.ship_s)),
        table::duration(Duration::from_secs_f64(r.hydrate_s)),
        table::rate(r.changed_bytes, busy),
        match r.next_delta_s {
            None => "-".to_owned(),
            Some(0.0) => "at once".to_owned(),
            Some(s) => format!("in {}", table::duration(Duration::from_secs_f64(s))),
        },
    )
}

fn expect(name: &str, expected: String, actual: String, passed: bool) -> Expectation {
    Expectation {
        name: name.to_owned(),
        expected,
        actual,
        passed,
    }
}

/// Checks every expectation of the scenario against the report.
fn check(ctx: &Ctx, r: &Report) -> Vec<Expectation> {
    let e = &ctx.scenario.expect;
    let mut out = Vec::new();
    // Always checked: the runner kept to the concurrency limit.
    let limit = ctx.scenario.concurrency as usize;
    out.push(expect(
        "concurrency",
        format!("at most {limit} disks in a step at once"),
        format!("at most {} at once", r.totals.max_concurrent_disks),
        r.totals.max_concurrent_disks <= limit,
    ));
    if e.identical {
        let differ: Vec<&str> = r
            .disks
            .iter()
            .filter(|d| d.identical != Some(true))
            .map(|d| d.name.as_str())
            .collect();
        out.push(expect(
            "identical",
            "every target byte-identical to its source".into(),
            if differ.is_empty() {
                "all identical".into()
            } else {
                format!("{} differ: {}", differ.len(), differ.join(", "))
            },
            differ.is_empty(),
        ));
    }
    if e.qemu_img_compare {
        let differ: Vec<&str> = r
            .disks
            .iter()
            .filter(|d| d.qemu_img_identical != Some(true))
            .map(|d| d.name.as_str())
            .collect();
        out.push(expect(
            "qemu_img_compare",
            "qemu-img compare -f raw -F raw says identical for every disk".into(),
            if differ.is_empty() {
                "all identical".into()
            } else {
                format!("differ: {}", differ.join(", "))
            },
            differ.is_empty(),
        ));
    }
    if let Some(n) = e.failed_cycles {
        out.push(expect(
            "failed_cycles",
            n.to_string(),
            r.totals.failed_cycles.to_string(),
            r.totals.failed_cycles == n,
        ));
    }
    if e.healed {
        // Every disk that failed a cycle (or a ship or hydrate) committed a later cycle.
        let unhealed: Vec<&str> = r
            .disks
            .iter()
            .filter(|d| {
                let last_trouble = d.cycles.iter().rposition(|c| {
                    c.failed_cycle.is_some() || c.ship_error.is_some() || c.hydrate_error.is_some()
                });
                last_trouble.is_some_and(|i| {
                    let at = d.cycles[i].committed_cycle;
                    !d.cycles[i + 1..]
                        .iter()
                        .any(|c| c.committed_cycle > at && c.identical == Some(true))
                })
            })
            .map(|d| d.name.as_str())
            .collect();
        out.push(expect(
            "healed",
            "every disk with a failed cycle later commits a cycle and is identical".into(),
            if unhealed.is_empty() {
                "all healed".into()
            } else {
                format!("not healed: {}", unhealed.join(", "))
            },
            unhealed.is_empty(),
        ));
    }
    if let Some(min) = e.committed_cycle_min {
        let low: Vec<String> = r
            .disks
            .iter()
            .filter(|d| d.committed_cycle < min)
            .map(|d| format!("{} at {}", d.name, d.committed_cycle))
            .collect();
        out.push(expect(
            "committed_cycle_min",
            format!("every target at cycle {min} or later"),
            if low.is_empty() {
                "all there".into()
            } else {
                low.join(", ")
            },
            low.is_empty(),
        ));
    }
    if let Some(max) = e.stored_bytes_max {
        out.push(expect(
            "stored_bytes_max",
            format!("at most {} bytes stored", max.0),
            format!("{} bytes", r.totals.stored_bytes),
            r.totals.stored_bytes <= max.0,
        ));
    }
    if e.faults_fired {
        let silent: Vec<String> = r
            .faults
            .iter()
            .filter(|f| !f.fired)
            .map(|f| format!("fault {} ({}: {})", f.index, f.kind, f.detail))
            .collect();
        out.push(expect(
            "faults_fired",
            format!("all {} faults fired", r.faults.len()),
            if silent.is_empty() {
                "all fired".into()
            } else {
                silent.join("; ")
            },
            silent.is_empty(),
        ));
    }
    if let Some(max) = e.ship_time_spread_max {
        let (worst, at) = ship_spread(r);
        out.push(expect(
            "ship_time_spread_max",
            format!("slowest / fastest ship of equal deltas at most {max:.2}"),
            match at {
                Some(step) => format!("{worst:.2} (step {step})"),
                None => "no delta shipped the same bytes on two disks".into(),
            },
            at.is_some() && worst <= max,
        ));
    }
    out
}

/// The worst ratio of the slowest to the fastest ship among disks that shipped the same
/// changed bytes in one delta step, and that step.
fn ship_spread(r: &Report) -> (f64, Option<u32>) {
    let mut groups: BTreeMap<(u32, u64), Vec<f64>> = BTreeMap::new();
    for d in &r.disks {
        for c in d
            .cycles
            .iter()
            .filter(|c| c.kind == "delta" && c.cycle.is_some())
        {
            groups
                .entry((c.step, c.changed_bytes))
                .or_default()
                .push(c.ship_s);
        }
    }
    let mut worst = (0.0, None);
    for ((step, _), times) in groups {
        if times.len() < 2 {
            continue;
        }
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        let ratio = if min > 0.0 { max / min } else { f64::INFINITY };
        if worst.1.is_none() || ratio > worst.0 {
            worst = (ratio, Some(step));
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, cycles: Vec<CycleRecord>) -> DiskReport {
        DiskReport {
            name: name.into(),
            disk_id: String::new(),
            size_bytes: 0,
            tracker: "cbt".into(),
            backing: "file".into(),
            source: String::new(),
            target: String::new(),
            cycles,
            committed_cycle: 0,
            identical: Some(true),
            differing_bytes: 0,
            qemu_img_identical: None,
        }
    }

    fn delta(step: u32, changed: u64, ship_s: f64) -> CycleRecord {
        CycleRecord {
            step,
            kind: "delta".into(),
            cycle: Some(u64::from(step) + 1),
            changed_bytes: changed,
            ship_s,
            ..CycleRecord::default()
        }
    }

    fn report(disks: Vec<DiskReport>) -> Report {
        Report {
            scenario: "t".into(),
            file: String::new(),
            description: String::new(),
            seed: 0,
            work_dir: String::new(),
            concurrency: 1,
            throttle: None,
            sink: String::new(),
            disks,
            totals: Totals::default(),
            faults: Vec::new(),
            cache_metrics: String::new(),
            expectations: Vec::new(),
            passed: false,
        }
    }

    #[test]
    fn the_ship_spread_compares_only_equal_deltas_of_one_step() {
        let r = report(vec![
            disk("a", vec![delta(1, 100, 1.0), delta(2, 100, 2.0)]),
            disk("b", vec![delta(1, 100, 3.0), delta(2, 100, 2.5)]),
            // Another delta size: not compared with the others.
            disk("c", vec![delta(1, 999, 30.0), delta(2, 7, 0.1)]),
        ]);
        let (worst, step) = ship_spread(&r);
        assert_eq!(step, Some(1));
        assert!((worst - 3.0).abs() < 1e-9, "{worst}");
        let alone = report(vec![disk("a", vec![delta(1, 100, 1.0)])]);
        assert_eq!(ship_spread(&alone).1, None);
    }
}
