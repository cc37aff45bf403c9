//! A scenario's faults: sink errors (rules of the cache's fault layers), blobs corrupted or lost
//! in the cache between ship and hydrate, and a side run as a child process killed with SIGKILL
//! at a step (the [`crate::sinks::STOP_AFTER_ENV`] hook tells when it got there).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use harness::scenario::spec::{self, Fault, Scenario, SinkErrorKind, SinkOp};
use replicator_core::layout;
use replicator_sink::PutMode;
use replicator_sink::wrap::{Fault as SinkFault, FaultRule, OpKind, Trigger};
use serde::Serialize;

use super::Ctx;
use super::disk::{Disk, derive_seed};
use crate::sinks::STOP_AFTER_ENV;

/// How long a killed side may take to reach its step.
const KILL_STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the runner looks for the step's marker.
const KILL_POLL: Duration = Duration::from_millis(5);

/// A fault of the file, planned for one disk's step.
#[derive(Clone, Debug)]
pub struct DiskFault {
    /// Its index among the file's `[[fault]]` entries.
    pub index: usize,
    pub fault: Fault,
}

/// What happened to one planned fault.
#[derive(Clone, Debug, Serialize)]
pub struct FaultEvent {
    /// Its index among the file's `[[fault]]` entries.
    pub index: usize,
    pub kind: String,
    pub disk: Option<String>,
    pub cycle: Option<u32>,
    /// Whether it happened (a kill reached its step, a blob was there to damage, a rule failed
    /// an operation).
    pub fired: bool,
    pub detail: String,
}

/// The faults of a scenario and what became of the sink rules.
#[derive(Debug)]
pub struct Plan {
    faults: Vec<(usize, Fault)>,
    /// Failures injected by the per-cycle layer while each cycle's rules were armed.
    cycle_failures: Vec<(u32, u64, usize)>,
    armed_before: u64,
    armed_cycle: Option<(u32, usize)>,
}

fn sink_rule(fault: &Fault, disk_key: Option<String>) -> Option<FaultRule> {
    let Fault::SinkError {
        op,
        error,
        after,
        times,
        probability,
        ..
    } = fault
    else {
        return None;
    };
    let op = match op {
        SinkOp::Put => OpKind::Put,
        SinkOp::Get => OpKind::Get,
        SinkOp::List => OpKind::List,
        SinkOp::Delete => OpKind::Delete,
    };
    let fault = match error {
        SinkErrorKind::Transient => SinkFault::Transient,
        SinkErrorKind::Permanent => SinkFault::Permanent,
    };
    let trigger = match probability {
        Some(p) => Trigger::Probability(*p),
        None => Trigger::Countdown {
            skip: *after,
            times: *times,
        },
    };
    let rule = FaultRule::new(op, fault, trigger);
    Some(match disk_key {
        Some(k) => rule.on_keys_containing(&k),
        None => rule,
    })
}

fn disk_key(disks: &[Disk], name: Option<&str>) -> Option<String> {
    let name = name?;
    disks
        .iter()
        .find(|d| d.name == name)
        .map(|d| layout::disk_prefix(&d.disk_id))
}

impl Plan {
    /// The faults of `scenario`.
    pub fn new(scenario: &Scenario) -> Self {
        Plan {
            faults: scenario
                .faults
                .iter()
                .enumerate()
                .map(|(i, f)| (i, f.get_ref().clone()))
                .collect(),
            cycle_failures: Vec::new(),
            armed_before: 0,
            armed_cycle: None,
        }
    }

    fn run_wide(&self) -> impl Iterator<Item = &(usize, Fault)> {
        self.faults
            .iter()
            .filter(|(_, f)| matches!(f, Fault::SinkError { cycle: None, .. }))
    }

    /// Arms the sink rules of the whole run (on the outer fault layer).
    pub fn arm_run_wide(&self, ctx: &Ctx, disks: &[Disk]) -> Result<()> {
        for (_, f) in self.run_wide() {
            if let (Some(rule), Some(layer)) = (
                sink_rule(f, disk_key(disks, f.disk())),
                ctx.stack.faults.first(),
            ) {
                layer.add_rule(rule)?;
            }
        }
        Ok(())
    }

    /// Arms the sink rules of cycle `step` (on the inner fault layer).
    pub fn arm_cycle(&mut self, ctx: &Ctx, disks: &[Disk], step: u32) -> Result<()> {
        let Some(layer) = ctx.stack.faults.get(1) else {
            return Ok(());
        };
        let mut n = 0;
        for (_, f) in &self.faults {
            if matches!(f, Fault::SinkError { cycle: Some(c), .. } if *c == step)
                && let Some(rule) = sink_rule(f, disk_key(disks, f.disk()))
            {
                layer.add_rule(rule)?;
                n += 1;
            }
        }
        self.armed_before = layer.counts().failures();
        self.armed_cycle = Some((step, n));
        Ok(())
    }

    /// Disarms the rules of the cycle armed last, noting how many failures they injected.
    pub fn disarm_cycle(&mut self, ctx: &Ctx) {
        let Some(layer) = ctx.stack.faults.get(1) else {
            return;
        };
        if let Some((step, n)) = self.armed_cycle.take() {
            let injected = layer.counts().failures() - self.armed_before;
            self.cycle_failures.push((step, injected, n));
        }
        layer.clear_rules();
    }

    /// The blob and kill faults of disk `name` at `step`.
    pub fn for_disk(&self, name: &str, step: u32) -> Vec<DiskFault> {
        self.faults
            .iter()
            .filter(|(_, f)| {
                !matches!(f, Fault::SinkError { .. })
                    && f.disk() == Some(name)
                    && f.cycle() == Some(step)
            })
            .map(|(index, fault)| DiskFault {
                index: *index,
                fault: fault.clone(),
            })
            .collect()
    }

    /// What became of the sink rules: one event per rule. A cycle's rules fired if the cycle's
    /// layer injected at least one failure per rule; the run's, if the run's layer did.
    pub fn sink_events(&self, ctx: &Ctx) -> Vec<FaultEvent> {
        let run_failures = ctx
            .stack
            .faults
            .first()
            .map_or(0, |l| l.counts().failures());
        let run_rules = self.run_wide().count() as u64;
        self.faults
            .iter()
            .filter_map(|(index, f)| {
                let Fault::SinkError { cycle, disk, .. } = f else {
                    return None;
                };
                let (fired, detail) = match cycle {
                    None => (
                        run_failures >= run_rules && run_failures > 0,
                        format!("{run_failures} failures injected by the run's sink rules"),
                    ),
                    Some(c) => {
                        let (injected, rules) = self
                            .cycle_failures
                            .iter()
                            .find(|(s, _, _)| s == c)
                            .map_or((0, 1), |(_, i, n)| (*i, *n as u64));
                        (
                            injected >= rules && injected > 0,
                            format!("{injected} failures injected by cycle {c}'s sink rules"),
                        )
                    }
                };
                Some(FaultEvent {
                    index: *index,
                    kind: f.kind_name().to_owned(),
                    disk: disk.clone(),
                    cycle: *cycle,
                    fired,
                    detail,
                })
            })
            .collect()
    }
}

/// Corrupts (flips a byte of) or deletes one blob of `cycle` of the disk, in the cache itself,
/// below every wrapper. The blob is chosen from the scenario's seed.
pub async fn damage_blob(ctx: &Ctx, disk: &Disk, f: &DiskFault, cycle: u64) -> Result<FaultEvent> {
    let backend = &ctx.stack.backend;
    let lose = matches!(f.fault, Fault::LoseBlob { .. });
    let mut event = FaultEvent {
        index: f.index,
        kind: f.fault.kind_name().to_owned(),
        disk: Some(disk.name.clone()),
        cycle: f.fault.cycle(),
        fired: false,
        detail: String::new(),
    };
    let prefix = layout::cycle_blobs_prefix(&disk.disk_id, cycle);
    let mut blobs = backend
        .list(&prefix)
        .await
        .with_context(|| format!("listing {prefix}"))?;
    blobs.sort_by(|a, b| a.key.cmp(&b.key));
    if blobs.is_empty() {
        event.detail = format!("cycle {cycle} stored no blob to damage");
        return Ok(event);
    }
    let seed = derive_seed(ctx.scenario.seed, disk.index, 0xb10b ^ f.index as u64);
    let victim = &blobs[(seed % blobs.len() as u64) as usize].key;
    if lose {
        backend
            .delete(victim)
            .await
            .with_context(|| format!("deleting {victim}"))?;
        event.detail = format!("lost blob {victim} of cycle {cycle}");
    } else {
        let data = backend
            .get(victim)
            .await
            .with_context(|| format!("reading {victim}"))?;
        let mut bytes = data.to_vec();
        let at = bytes.len() / 2;
        if let Some(b) = bytes.get_mut(at) {
            *b ^= 0x5a;
        }
        backend
            .put(victim, Bytes::from(bytes), PutMode::Overwrite)
            .await
            .with_context(|| format!("rewriting {victim}"))?;
        event.detail = format!("flipped byte {at} of blob {victim} of cycle {cycle}");
    }
    event.fired = true;
    Ok(event)
}

/// Runs a side of `disk` as a child process and kills it with SIGKILL once it has done the
/// fault's number of cache operations (puts for ship, gets for hydrate). The caller has closed
/// that side in this process and opens it again after.
#[allow(clippy::disallowed_methods)] // waits on a real child process in real time
pub fn kill_side(ctx: &Ctx, disk: &Disk, f: &DiskFault) -> Result<FaultEvent> {
    let Fault::Kill {
        side, after_ops, ..
    } = &f.fault
    else {
        anyhow::bail!("fault {} is not a kill", f.index);
    };
    let (name, op) = match side {
        spec::Side::Ship => ("ship", "put"),
        spec::Side::Hydrate => ("hydrate", "get"),
    };
    let marker = disk.log_path(&format!("{name}-stopped-{}", f.index));
    let _ = std::fs::remove_file(&marker);
    let log_path = disk.log_path(&format!("{name}-killed-{}", f.index));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = disk.side_command(ctx, *side);
    cmd.env(
        STOP_AFTER_ENV,
        format!("{op}:{after_ops}:{}", marker.display()),
    )
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} {name}", ctx.exe.display()))?;
    let started = std::time::Instant::now();
    let outcome = loop {
        if marker.exists() {
            child.kill().context("killing the child")?;
            let status = child.wait()?;
            break Ok(format!(
                "{name} (pid {}) killed with SIGKILL after {after_ops} {op}s ({status})",
                child.id()
            ));
        }
        if let Some(status) = child.try_wait()? {
            break Err(format!(
                "{name} ended ({status}) before its {after_ops}th {op}; see {}",
                log_path.display()
            ));
        }
        if started.elapsed() > KILL_STEP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{name} did not reach its {after_ops}th {op} within {KILL_STEP_TIMEOUT:?}; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(KILL_POLL);
    };
    let (fired, detail) = match outcome {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Ok(FaultEvent {
        index: f.index,
        kind: f.fault.kind_name().to_owned(),
        disk: Some(disk.name.clone()),
        cycle: f.fault.cycle(),
        fired,
        detail,
    })
}
