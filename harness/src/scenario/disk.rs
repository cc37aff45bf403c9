//! One disk of a scenario: its source and target, its tracker, and its steps (workloads, ship,
//! faults, hydrate, verify), recorded cycle by cycle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use harness::scenario::spec::{self, Backing, DiskGroup, DiskName, Fault, Fill, Tracker};
use replicator_core::clock::Clock;
use replicator_core::device::{BlockDevice, FileDevice};
use replicator_core::keys::DiskId;
use replicator_core::progress::Progress;
use replicator_core::schedule::SchedulePolicy;
use replicator_core::source::{ShipConfig, ShipOutcome, ShipReport, Source, ship_cycle};
use replicator_core::target::{HydrateConfig, HydrateReport, Target, hydrate};
use replicator_core::tracker::ChangeTracker;
use replicator_core::verify::verify_devices;
use serde::Serialize;

use super::Ctx;
use super::faults::{self, DiskFault, FaultEvent};
use crate::bars::DiskBar;
use crate::ktrack::{DaemonConfig, KernelTracker, RunningDaemon, daemon};
use crate::loopdev::LoopDevice;
use crate::trackers::{AnySource, TrackerKind, open_writable};
use crate::workload::{self, WorkloadSpec, fill_image, run_workload};

/// What a step of the scenario is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// The workloads before a delta cycle: run on every disk before any ships, so that the
    /// disks' cycles start together and share the bandwidth from the start.
    Writes,
    /// Cycle 0: the initial full copy.
    Initial,
    /// A delta cycle after the scenario's workloads.
    Delta,
    /// A round after the cycles, without writes, while the disk is not identical.
    Heal,
    /// The end: verification only.
    Final,
}

/// One step of one disk, as the report shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CycleRecord {
    /// The scenario's step: 0 the initial copy, 1..=cycles the deltas, then heal rounds.
    pub step: u32,
    /// `initial`, `delta` or `heal`.
    pub kind: String,
    /// Bytes the workloads wrote before the cycle, and how long they took.
    pub workload_bytes: u64,
    pub workload_s: f64,
    /// The engine's cycle number shipped, if one was.
    pub cycle: Option<u64>,
    /// `initial`, `delta` or `checksum resync`.
    pub ship_kind: Option<String>,
    /// Bytes in the cycle's changed sectors.
    pub changed_bytes: u64,
    /// Bytes stored in the cache for it (blobs and manifest).
    pub stored_bytes: u64,
    /// Changed bytes found all-zero (stored without data).
    pub zero_bytes: u64,
    pub blob_count: u32,
    /// Changed bytes per stored byte.
    pub compression_ratio: Option<f64>,
    /// Stage durations, seconds: ship (freeze, read, encode, put, manifest), hydrate (get,
    /// verify, apply, reconcile, acknowledge), verify (compare source and target).
    pub ship_s: f64,
    pub hydrate_s: f64,
    pub verify_s: f64,
    /// Changed bytes over ship plus hydrate time.
    pub throughput_bytes_per_s: Option<f64>,
    /// The source's churn since the previous cycle, bytes per second.
    pub churn_bytes_per_s: Option<f64>,
    /// When the next delta would run by the schedule, `min(max(1 h, ship / 2), 12 h)`, seconds
    /// after this one (0 after the initial copy: the first delta runs at once).
    pub next_delta_s: Option<f64>,
    /// Why the ship failed, if it did.
    pub ship_error: Option<String>,
    /// Cycles applied and reconciled on the target in this step.
    pub applied: Vec<u64>,
    /// The reconciliation's result: `reconciled`, `nothing to apply`, or what failed.
    pub reconciliation: String,
    /// The cycle the target reported failed, if one did.
    pub failed_cycle: Option<u64>,
    /// Why hydrate failed as a whole (not a cycle's verification), if it did.
    pub hydrate_error: Option<String>,
    /// The target's committed cycle after the step.
    pub committed_cycle: u64,
    /// Whether the target was byte-identical to the source after the step.
    pub identical: Option<bool>,
    /// The faults injected in this step.
    pub faults: Vec<String>,
}

/// The source side as this process holds it: the tracked source and where writes go.
struct SourceSide {
    source: AnySource,
    writer: Arc<dyn BlockDevice>,
}

/// One disk. Fields drop in order: the source (a tracker client) and the target before the
/// tracker daemon, and the loop devices last.
pub struct Disk {
    side: Option<SourceSide>,
    target: Option<Target<FileDevice>>,
    daemon: Option<RunningDaemon>,
    pub name: String,
    pub index: usize,
    pub group: DiskGroup,
    pub disk_id: DiskId,
    pub source_dev: PathBuf,
    pub target_dev: PathBuf,
    dir: PathBuf,
    /// Bytes written by the last `Writes` step and how long it took, for the next cycle.
    written: (u64, f64),
    pub records: Vec<CycleRecord>,
    pub events: Vec<FaultEvent>,
    /// The final comparison: identical, differing bytes, and qemu-img's verdict if asked.
    pub final_identical: Option<bool>,
    pub final_differing_bytes: u64,
    pub qemu_img_identical: Option<bool>,
    _loops: Vec<LoopDevice>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.name)
            .field("source", &self.source_dev)
            .field("target", &self.target_dev)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A seed for `what` of disk `index`, from the scenario's seed.
pub fn derive_seed(seed: u64, index: usize, what: u64) -> u64 {
    let mut x = seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ what.rotate_left(32);
    // splitmix64's finalizer: nearby inputs give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn tracker_kind(t: Tracker) -> TrackerKind {
    match t {
        Tracker::Cbt => TrackerKind::Cbt,
        Tracker::Hrl => TrackerKind::Hrl,
        Tracker::Kernel => TrackerKind::Kernel,
    }
}

impl Disk {
    fn source_state(&self) -> PathBuf {
        self.dir.join("source-state")
    }
    fn target_state(&self) -> PathBuf {
        self.dir.join("target-state")
    }
    fn tracker_state(&self) -> PathBuf {
        self.dir.join("tracker-state")
    }

    /// Makes the disk's images (and loop devices), fills the source, starts its tracker and
    /// opens both sides.
    pub fn setup(ctx: &Ctx, work: &Path, name: DiskName) -> Result<Disk> {
        let group = ctx.scenario.disks[name.group].get_ref().clone();
        let dir = work.join("disks").join(&name.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bar = ctx.bars.disk(&name.name);
        let src_img = dir.join("source.img");
        let tgt_img = dir.join("target.img");
        FileDevice::create_sparse(&src_img, group.size.0)?;
        FileDevice::create_sparse(&tgt_img, group.size.0)?;
        let mut loops = Vec::new();
        let (source_dev, target_dev) = match group.backing {
            Backing::File => (src_img, tgt_img),
            Backing::Loop => {
                let ls = LoopDevice::attach(&src_img)?;
                let source_dev = ls.path().to_path_buf();
                loops.push(ls);
                let lt = LoopDevice::attach(&tgt_img)?;
                let target_dev = lt.path().to_path_buf();
                loops.push(lt);
                (source_dev, target_dev)
            }
        };
        if group.fill == Fill::FsLike {
            let raw = FileDevice::open(&source_dev)?;
            let seed = group
                .fill_seed
                .unwrap_or_else(|| derive_seed(ctx.scenario.seed, name.index, 0xf111));
            bar.start("fill source", raw.size_bytes());
            fill_image(&raw, seed, |n| bar.advance(n))?;
            bar.end();
        }
        let mut disk = Disk {
            side: None,
            target: None,
            daemon: None,
            name: name.name,
            index: name.index,
            group,
            disk_id: DiskId([0; 16]),
            source_dev,
            target_dev,
            dir,
            written: (0, 0.0),
            records: Vec::new(),
            events: Vec::new(),
            final_identical: None,
            final_differing_bytes: 0,
            qemu_img_identical: None,
            _loops: loops,
        };
        if disk.group.tracker == Tracker::Kernel {
            disk.daemon = Some(daemon::start(&DaemonConfig {
                device: disk.source_dev.clone(),
                state_dir: disk.tracker_state(),
                checkpoint_interval: Duration::from_secs(daemon::CHECKPOINT_SECS_DEFAULT),
                buffer_kb_per_cpu: daemon::BUFFER_KB_PER_CPU_DEFAULT,
                verbose: false,
            })?);
        }
        disk.open_source()?;
        disk.disk_id = disk
            .side
            .as_ref()
            .map(|s| s.source.disk_id())
            .context("the source side did not open")?;
        disk.open_target()?;
        Ok(disk)
    }

    fn open_source(&mut self) -> Result<()> {
        let state = self.source_state();
        let side = match self.group.tracker {
            Tracker::Cbt | Tracker::Hrl => {
                let ((source, _), writer) = open_writable(
                    tracker_kind(self.group.tracker),
                    None,
                    &state,
                    &self.source_dev,
                )?;
                SourceSide { source, writer }
            }
            Tracker::Kernel => {
                let dir = self.tracker_state();
                let dev = self.source_dev.clone();
                let (source, _) = Source::open_with(&state, |_| {
                    let (t, r) = KernelTracker::connect(&dir, &dev)?;
                    Ok((Arc::new(t) as Arc<dyn ChangeTracker>, r))
                })?;
                let writer: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&self.source_dev)?);
                SourceSide { source, writer }
            }
        };
        self.side = Some(side);
        Ok(())
    }

    fn open_target(&mut self) -> Result<()> {
        let device = FileDevice::open(&self.target_dev)?;
        self.target = Some(Target::open(&self.target_state(), device, self.disk_id)?);
        Ok(())
    }

    fn side(&mut self) -> Result<&mut SourceSide> {
        self.side.as_mut().context("the source side is closed")
    }

    fn target(&mut self) -> Result<&mut Target<FileDevice>> {
        self.target.as_mut().context("the target side is closed")
    }

    /// Whether the disk needs no heal round: its last step left the target identical.
    pub fn settled(&self) -> bool {
        self.records
            .last()
            .is_some_and(|r| r.identical == Some(true))
    }

    /// Runs one step. Cycle failures (a ship or a hydrate that fails) are recorded, not
    /// returned: the scenario goes on and must heal. What is returned is a failure of the
    /// scenario's own machinery (a workload, a device, a child process).
    pub fn step(
        &mut self,
        ctx: &Ctx,
        step: u32,
        kind: StepKind,
        faults: &[DiskFault],
    ) -> Result<()> {
        let bar = ctx.bars.disk(&self.name);
        match kind {
            StepKind::Final => return self.final_check(ctx, &bar),
            StepKind::Writes => {
                let t0 = ctx.clock.now();
                let bytes = self.run_workloads(ctx, step, &bar)?;
                self.written = (bytes, secs(ctx.clock.now().since(t0)));
                return Ok(());
            }
            StepKind::Initial | StepKind::Delta | StepKind::Heal => {}
        }
        let mut rec = CycleRecord {
            step,
            kind: match kind {
                StepKind::Initial => "initial",
                StepKind::Delta => "delta",
                StepKind::Heal | StepKind::Final | StepKind::Writes => "heal",
            }
            .to_owned(),
            ..CycleRecord::default()
        };
        (rec.workload_bytes, rec.workload_s) = std::mem::take(&mut self.written);

        // Ship, after a killed attempt if one is planned.
        if let Some(f) = faults.iter().find(|f| f.is_kill(spec::Side::Ship)) {
            self.side = None;
            let event = faults::kill_side(ctx, self, f)?;
            rec.faults.push(event.detail.clone());
            self.events.push(event);
            self.open_source()?;
        }
        let t0 = ctx.clock.now();
        let shipped = self.ship(ctx, &bar);
        let ship_took = ctx.clock.now().since(t0);
        rec.ship_s = secs(ship_took);
        match shipped {
            Ok(r) => {
                rec.cycle = Some(r.cycle);
                rec.ship_kind = Some(
                    match (&r.resync, r.initial) {
                        (Some(_), _) => "checksum resync",
                        (None, true) => "initial",
                        (None, false) => "delta",
                    }
                    .to_owned(),
                );
                rec.changed_bytes = r.changed_bytes();
                rec.stored_bytes = r.stored_bytes;
                rec.zero_bytes = r.zero_bytes;
                rec.blob_count = r.blob_count;
                rec.compression_ratio =
                    (r.stored_bytes > 0).then(|| r.changed_bytes() as f64 / r.stored_bytes as f64);
                rec.churn_bytes_per_s = r.churn_bytes_per_s();
                rec.next_delta_s = Some(if kind == StepKind::Initial {
                    0.0
                } else {
                    secs(SchedulePolicy::default().delta_interval(ship_took))
                });
                for f in faults.iter().filter(|f| f.is_blob_damage()) {
                    let event = ctx
                        .runtime
                        .block_on(faults::damage_blob(ctx, self, f, r.cycle))?;
                    rec.faults.push(event.detail.clone());
                    self.events.push(event);
                }
            }
            Err(e) => rec.ship_error = Some(format!("{e:#}")),
        }

        // Hydrate, after a killed attempt if one is planned.
        if let Some(f) = faults.iter().find(|f| f.is_kill(spec::Side::Hydrate)) {
            self.target = None;
            let event = faults::kill_side(ctx, self, f)?;
            rec.faults.push(event.detail.clone());
            self.events.push(event);
            self.open_target()?;
        }
        let t0 = ctx.clock.now();
        let hydrated = self.hydrate(ctx, &bar);
        let hydrate_took = ctx.clock.now().since(t0);
        rec.hydrate_s = secs(hydrate_took);
        match hydrated {
            Ok(h) => {
                rec.applied = h.applied.iter().map(|a| a.cycle).collect();
                rec.reconciliation = match (&h.failed, h.applied.is_empty()) {
                    (Some(f), _) => format!("cycle {} failed: {}", f.cycle, f.error),
                    (None, true) => "nothing to apply".to_owned(),
                    (None, false) => "reconciled".to_owned(),
                };
                rec.failed_cycle = h.failed.as_ref().map(|f| f.cycle);
            }
            Err(e) => {
                rec.reconciliation = "hydrate failed".to_owned();
                rec.hydrate_error = Some(format!("{e:#}"));
            }
        }
        rec.committed_cycle = self.target()?.state().committed_cycle;
        let busy = ship_took + hydrate_took;
        rec.throughput_bytes_per_s =
            (!busy.is_zero()).then(|| rec.changed_bytes as f64 / busy.as_secs_f64());

        let t0 = ctx.clock.now();
        let (identical, _) = self.compare(&bar)?;
        rec.verify_s = secs(ctx.clock.now().since(t0));
        rec.identical = Some(identical);
        self.records.push(rec);
        Ok(())
    }

    /// Compares source and target byte for byte: whether identical, and the differing bytes.
    fn compare(&mut self, bar: &DiskBar) -> Result<(bool, u64)> {
        let reader = FileDevice::open_read_only(&self.source_dev)?;
        let target = self.target()?;
        let r = verify_devices(&reader, target.device(), bar)?;
        Ok((r.identical(), r.differing_bytes))
    }

    fn final_check(&mut self, ctx: &Ctx, bar: &DiskBar) -> Result<()> {
        let (identical, differing) = self.compare(bar)?;
        self.final_identical = Some(identical);
        self.final_differing_bytes = differing;
        if ctx.scenario.expect.qemu_img_compare {
            self.qemu_img_identical = Some(qemu_img_compare(&self.source_dev, &self.target_dev)?);
        }
        Ok(())
    }

    fn run_workloads(&mut self, ctx: &Ctx, step: u32, bar: &DiskBar) -> Result<u64> {
        let me = DiskName {
            name: self.name.clone(),
            group: ctx
                .scenario
                .disks
                .iter()
                .position(|g| g.get_ref().name == self.group.name)
                .unwrap_or(0),
            index: self.index,
        };
        let mut written = 0;
        for (i, w) in ctx.scenario.workloads.iter().enumerate() {
            let w = w.get_ref();
            let in_cycle = w.cycles.as_ref().is_none_or(|c| c.contains(&step));
            let on_disk = w
                .disks
                .as_ref()
                .is_none_or(|sel| sel.iter().any(|s| ctx.scenario.selects(s, &me)));
            if !(in_cycle && on_disk) {
                continue;
            }
            let seed = derive_seed(
                ctx.scenario.seed,
                self.index,
                (u64::from(step) << 16) | i as u64,
            );
            if let Some(job) = &w.fio {
                let fio_job = crate::fio::FioJob {
                    rw: job.rw.clone(),
                    bs: job.bs.0,
                    size: job.size.0,
                    iodepth: job.iodepth,
                    rate_bytes_per_s: job.rate_bytes_per_s.map(|r| r.0),
                    runtime_s: job.runtime_s,
                    // fio takes a seed below 2^32.
                    seed: job.seed.unwrap_or(seed) & 0xffff_ffff,
                    direct: job.direct,
                };
                bar.start(&format!("fio {}", job.rw), job.size.0);
                let report = crate::fio::run(&fio_job, &self.source_dev, &self.dir)
                    .with_context(|| format!("fio on {}", self.source_dev.display()))?;
                bar.end();
                written += report.bytes_written + report.bytes_trimmed;
                continue;
            }
            let Some(pattern) = w.pattern else {
                bail!("workload {i} has neither `pattern` nor `fio`");
            };
            let spec = WorkloadSpec {
                pattern: match pattern {
                    spec::Pattern::Innodb => workload::Pattern::Innodb,
                    spec::Pattern::Postgres => workload::Pattern::Postgres,
                    spec::Pattern::Log => workload::Pattern::Log,
                    spec::Pattern::Zipf => workload::Pattern::Zipf,
                    spec::Pattern::Overwrite => workload::Pattern::Overwrite,
                    spec::Pattern::Zero => workload::Pattern::Zero,
                    spec::Pattern::Discard => workload::Pattern::Discard,
                },
                bytes: w.bytes.map(|b| b.0),
                ops: w.ops,
                rate_bytes_per_s: w.rate_bytes_per_s.map(|r| r.0),
                seed: w.seed.unwrap_or(seed),
                zipf_exponent: w.zipf_exponent,
            };
            bar.start(
                &format!("write {}", spec.pattern.name()),
                spec.bytes.unwrap_or(0),
            );
            let writer = Arc::clone(&self.side()?.writer);
            let report = run_workload(writer.as_ref(), &spec)?;
            bar.advance(report.bytes_written + report.bytes_discarded);
            bar.end();
            written += report.bytes_written + report.bytes_discarded;
        }
        // Like an application at a consistency point: the writes reach the device.
        self.side()?.writer.flush()?;
        Ok(written)
    }

    fn ship(&mut self, ctx: &Ctx, bar: &DiskBar) -> Result<ShipReport> {
        let cfg = ShipConfig {
            compression: ctx.scenario.compression.compression(),
            ..ShipConfig::default()
        };
        let sink = Arc::clone(&ctx.stack.sink);
        let handle = ctx.runtime.clone();
        let outcome = {
            let side = self.side()?;
            handle.block_on(ship_cycle(
                &mut side.source,
                sink.as_ref(),
                &ctx.key,
                &ctx.clock,
                &cfg,
                bar,
            ))?
        };
        if let ShipOutcome::AwaitingCatalog { .. } = outcome {
            // The target answers the resync request on its next hydrate; then ship again.
            let target = self.target()?;
            handle.block_on(hydrate(
                target,
                sink.as_ref(),
                &ctx.key,
                &ctx.clock,
                &HydrateConfig::default(),
                bar,
            ))?;
            let side = self.side()?;
            let again = handle.block_on(ship_cycle(
                &mut side.source,
                sink.as_ref(),
                &ctx.key,
                &ctx.clock,
                &cfg,
                bar,
            ))?;
            return Ok(again.into_shipped()?);
        }
        Ok(outcome.into_shipped()?)
    }

    fn hydrate(&mut self, ctx: &Ctx, bar: &DiskBar) -> Result<HydrateReport> {
        let sink = Arc::clone(&ctx.stack.sink);
        let handle = ctx.runtime.clone();
        let target = self.target()?;
        Ok(handle.block_on(hydrate(
            target,
            sink.as_ref(),
            &ctx.key,
            &ctx.clock,
            &HydrateConfig::default(),
            bar,
        ))?)
    }

    /// The command line of a side run as a child process (`harness ship` or `hydrate`).
    pub fn side_command(&self, ctx: &Ctx, side: spec::Side) -> std::process::Command {
        let mut cmd = std::process::Command::new(&ctx.exe);
        match side {
            spec::Side::Ship => {
                cmd.arg("ship")
                    .arg("--compression")
                    .arg(ctx.scenario.compression.arg())
                    .arg("--source")
                    .arg(&self.source_dev)
                    .arg("--state")
                    .arg(self.source_state())
                    .arg("--tracker")
                    .arg(match self.group.tracker {
                        Tracker::Cbt => "cbt",
                        Tracker::Hrl => "hrl",
                        Tracker::Kernel => "kernel",
                    });
                if self.group.tracker == Tracker::Kernel {
                    cmd.arg("--tracker-state").arg(self.tracker_state());
                }
            }
            spec::Side::Hydrate => {
                cmd.arg("hydrate")
                    .arg("--target")
                    .arg(&self.target_dev)
                    .arg("--state")
                    .arg(self.target_state())
                    .arg("--disk")
                    .arg(self.disk_id.to_string());
            }
        }
        cmd.arg("--sink")
            .arg(&ctx.sink_url)
            .arg("--key-file")
            .arg(&ctx.key_file)
            .arg("--throttle-utc-offset")
            .arg(&ctx.scenario.sink.utc_offset);
        if let Some(t) = &ctx.scenario.sink.throttle {
            cmd.arg("--throttle").arg(t.get_ref());
        }
        if let Some(a) = ctx.scenario.sink.attempts {
            cmd.arg("--sink-attempts").arg(a.to_string());
        }
        cmd
    }

    /// Where a child process's output goes.
    pub fn log_path(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }
}

/// `qemu-img compare -f raw -F raw A B`: true when identical.
fn qemu_img_compare(a: &Path, b: &Path) -> Result<bool> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run qemu-img ({e}): install it with `apt-get install -y \
                 --no-install-recommends qemu-utils`, or drop `expect.qemu_img_compare`"
            )
        })?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "qemu-img compare {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

impl DiskFault {
    fn is_kill(&self, side: spec::Side) -> bool {
        matches!(&self.fault, Fault::Kill { side: s, .. } if *s == side)
    }
    fn is_blob_damage(&self) -> bool {
        matches!(
            &self.fault,
            Fault::CorruptBlob { .. } | Fault::LoseBlob { .. }
        )
    }
}
