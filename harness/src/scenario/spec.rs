//! The scenario file: what `harness scenario FILE` runs, as TOML. Documented field by field in
//! docs/SCENARIOS.md.
//!
//! Parsing is strict: an unknown field, a value of the wrong type or out of its bounds, a name
//! that refers to nothing, is an error naming the file, the line and column, and the field. This
//! module knows no device, sink or process (the runner in `scenario/mod.rs` does), so the fuzz
//! target `parse_scenario` reaches it through the harness's small library target.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// Disks replicated at once unless the scenario says otherwise: the reference appliance's
/// parallel-disk limit.
pub const CONCURRENCY_DEFAULT: u32 = 52;
/// The largest concurrency limit accepted.
pub const CONCURRENCY_MAX: u32 = 1024;
/// The most disks one scenario may describe, all groups together.
pub const DISKS_MAX: u64 = 4096;
/// The most delta cycles one scenario may run.
pub const CYCLES_MAX: u32 = 1000;
/// The most heal rounds after the cycles.
pub const HEAL_ROUNDS_MAX: u32 = 20;
/// Heal rounds run when a scenario does not say.
pub const HEAL_ROUNDS_DEFAULT: u32 = 3;
/// The largest disk accepted (64 TiB, the reference service's limit).
pub const DISK_BYTES_MAX: u64 = 64 << 40;
/// The most entries of each list (workloads, faults, disk groups).
pub const ENTRIES_MAX: usize = 1024;

/// A size in bytes, written as an integer or a string with a binary unit: `4096`, `"64K"`,
/// `"16M"`, `"1G"`, `"2T"` (`"16MiB"` too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// Parses the string form.
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit.trim_end_matches("iB").trim_end_matches('B') {
            "" => 1,
            "K" | "k" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => {
                return Err(format!(
                    "`{s}` is not a size: use bytes or a number with K, M, G or T (binary units), \
                     like \"16M\""
                ));
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size like 4096, \"64K\" or \"16M\""))?;
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes as an integer, or a string like \"16M\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name for reports.
    pub name: String,
    /// What it shows, for people.
    #[serde(default)]
    pub description: String,
    /// The seed every fill, workload and seeded fault derives from unless it has its own.
    #[serde(default = "seed_default")]
    pub seed: u64,
    /// Delta cycles after the initial copy (cycle 0).
    pub cycles: u32,
    /// Disks replicated at once.
    #[serde(default = "concurrency_default")]
    pub concurrency: u32,
    /// Rounds of ship and hydrate without writes after the last cycle, run only while a disk
    /// still has a failed or unapplied cycle or differs.
    #[serde(default = "heal_rounds_default")]
    pub heal_rounds: u32,
    /// When ships compress blobs: `adaptive` (the default, as `harness ship`) or `zstd` (every
    /// blob, so that the bytes stored depend on the data alone, as `stored_bytes_max` wants).
    #[serde(default)]
    pub compression: CompressionSpec,
    /// The cache every disk shares.
    #[serde(default)]
    pub sink: SinkSpec,
    /// Disk groups.
    #[serde(rename = "disk")]
    pub disks: Vec<Spanned<DiskGroup>>,
    /// Writes before each delta cycle.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<Spanned<Workload>>,
    /// Faults to inject.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Spanned<Fault>>,
    /// What must hold at the end.
    #[serde(default)]
    pub expect: Expect,
}

fn seed_default() -> u64 {
    1
}
fn concurrency_default() -> u32 {
    CONCURRENCY_DEFAULT
}
fn heal_rounds_default() -> u32 {
    HEAL_ROUNDS_DEFAULT
}
fn one_u32() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn utc() -> String {
    "UTC".to_owned()
}
fn iodepth_default() -> u32 {
    16
}

/// The shared cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// A directory, `file:///path`, `memory://`, `az://container/prefix` or
    /// `s3://bucket/prefix`; default: `cache/` in the work directory.
    pub url: Option<String>,
    /// A bandwidth schedule shared fairly by all disks, e.g. `08:00-20:00=100Mbit/s,*=unlimited`.
    pub throttle: Option<Spanned<String>>,
    /// The time zone of `throttle`, as an offset from UTC.
    #[serde(default = "utc")]
    pub utc_offset: String,
    /// Attempts per cache operation on transient failures (1: no retries).
    pub attempts: Option<u32>,
}

impl Default for SinkSpec {
    fn default() -> Self {
        SinkSpec {
            url: None,
            throttle: None,
            utc_offset: utc(),
            attempts: None,
        }
    }
}

/// Where a disk lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// A loop device over a sparse image file (as root).
    #[default]
    Loop,
    /// A sparse image file.
    File,
}

/// When ships compress blobs ([`replicator_core::source::Compression`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionSpec {
    /// zstd unless the cores fall behind the disk: what a ship stores then depends on timing.
    #[default]
    Adaptive,
    /// zstd for every blob.
    Zstd,
}

impl CompressionSpec {
    /// The ship setting.
    pub fn compression(self) -> replicator_core::source::Compression {
        match self {
            CompressionSpec::Adaptive => replicator_core::source::Compression::Adaptive,
            CompressionSpec::Zstd => replicator_core::source::Compression::Zstd,
        }
    }

    /// The value of `harness ship --compression`.
    pub fn arg(self) -> &'static str {
        match self {
            CompressionSpec::Adaptive => "adaptive",
            CompressionSpec::Zstd => "zstd",
        }
    }
}

/// A source's change tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracker {
    /// Marks the writes the scenario makes through it.
    #[default]
    Cbt,
    /// Logs the writes made through it with their data.
    Hrl,
    /// The kernel's block events for a loop device: writes by any process (fio).
    Kernel,
}

/// What a source disk holds before the initial copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fill {
    /// File-system-like content: text, binary records, random and zero regions.
    #[default]
    FsLike,
    /// Nothing written (all zero).
    Zero,
}

/// A group of identical disks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskGroup {
    /// The group's name: the disk's name when `count` is 1, else the prefix of `NAME-00`, ...
    pub name: String,
    /// Each disk's size, a multiple of 512.
    pub size: Size,
    /// How many disks.
    #[serde(default = "one_u32")]
    pub count: u32,
    /// Loop device (default) or image file.
    #[serde(default)]
    pub backing: Backing,
    /// The change tracker.
    #[serde(default)]
    pub tracker: Tracker,
    /// The initial content.
    #[serde(default)]
    pub fill: Fill,
    /// The seed of the initial content (default: from the scenario's seed and the disk).
    pub fill_seed: Option<u64>,
}

/// A built-in write pattern (the names of the harness's workload generators).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// 16 KiB random page writes.
    Innodb,
    /// 8 KiB random page writes.
    Postgres,
    /// Sequential appends to a log region.
    Log,
    /// Writes at Zipf-distributed offsets (hot spots).
    Zipf,
    /// Overwrites of the same region.
    Overwrite,
    /// Zero writes.
    Zero,
    /// Discards.
    Discard,
}

impl Pattern {
    /// The name as written in a scenario.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Innodb => "innodb",
            Pattern::Postgres => "postgres",
            Pattern::Log => "log",
            Pattern::Zipf => "zipf",
            Pattern::Overwrite => "overwrite",
            Pattern::Zero => "zero",
            Pattern::Discard => "discard",
        }
    }
}

/// An fio job run against a disk's device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FioJob {
    /// fio's `rw`: `write`, `randwrite`, `rw`, `randrw`, `trim`, `randtrim`.
    pub rw: String,
    /// Block size.
    pub bs: Size,
    /// Bytes to write (fio's `size`, from offset 0).
    pub size: Size,
    /// Queue depth.
    #[serde(default = "iodepth_default")]
    pub iodepth: u32,
    /// Rate limit.
    pub rate_bytes_per_s: Option<Size>,
    /// Stop after this many seconds.
    pub runtime_s: Option<u64>,
    /// Seed of fio's offsets and data (default: from the scenario's seed).
    pub seed: Option<u64>,
    /// O_DIRECT.
    #[serde(default = "yes")]
    pub direct: bool,
}

/// The fio `rw` modes a scenario may use: they write (or discard), so a cycle has changes.
pub const FIO_RW_MODES: [&str; 6] = ["write", "randwrite", "rw", "randrw", "trim", "randtrim"];

/// Writes before some delta cycles on some disks: a built-in pattern or an fio job.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// The delta cycles (1 to `cycles`) it runs before; default every one.
    pub cycles: Option<Vec<u32>>,
    /// The disk groups (or single disks) it writes; default all.
    pub disks: Option<Vec<String>>,
    /// A built-in pattern (exclusive with `fio`).
    pub pattern: Option<Pattern>,
    /// Bytes to write per cycle.
    pub bytes: Option<Size>,
    /// Writes per cycle (instead of `bytes`).
    pub ops: Option<u64>,
    /// Rate limit of the writes.
    pub rate_bytes_per_s: Option<Size>,
    /// Seed (default: from the scenario's seed, the disk and the cycle).
    pub seed: Option<u64>,
    /// The exponent of the `zipf` pattern.
    pub zipf_exponent: Option<f64>,
    /// An fio job (exclusive with `pattern`).
    pub fio: Option<FioJob>,
}

/// A cache operation kind, for sink faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkOp {
    Put,
    Get,
    List,
    Delete,
}

/// The error a sink fault returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkErrorKind {
    /// Retried by the retry layer, within its attempts.
    #[default]
    Transient,
    /// Not retried: the operation fails.
    Permanent,
}

/// Which side a kill fault stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// `harness ship`, killed after its Nth put.
    Ship,
    /// `harness hydrate`, killed after its Nth get (blobs are applied as they arrive).
    Hydrate,
}

/// A fault to inject.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// Cache operations fail: on a countdown (`after` pass, then `times` fail) or with a
    /// seeded `probability`; during cycle `cycle` only, or the whole run; on one disk's
    /// objects or all.
    SinkError {
        /// The operation.
        op: SinkOp,
        /// The error.
        #[serde(default)]
        error: SinkErrorKind,
        /// The cycle it is armed for (default: all).
        cycle: Option<u32>,
        /// The disk whose objects it hits (default: all).
        disk: Option<String>,
        /// Matching operations let through first.
        #[serde(default)]
        after: u64,
        /// Failures after that.
        #[serde(default = "one_u64")]
        times: u64,
        /// Instead of the countdown: the probability of each matching operation to fail.
        probability: Option<f64>,
    },
    /// One blob of a disk's cycle gets a byte flipped in the cache between ship and hydrate.
    CorruptBlob {
        /// The disk.
        disk: String,
        /// The cycle.
        cycle: u32,
    },
    /// One blob of a disk's cycle is deleted from the cache between ship and hydrate.
    LoseBlob {
        /// The disk.
        disk: String,
        /// The cycle.
        cycle: u32,
    },
    /// A side runs as a child process (`harness ship` or `harness hydrate`) and is killed with
    /// SIGKILL at a step; the scenario then runs it again, and it must heal.
    Kill {
        /// Ship or hydrate.
        side: Side,
        /// The disk.
        disk: String,
        /// The cycle.
        cycle: u32,
        /// The step: the number of cache operations (puts for ship, gets for hydrate) done
        /// before the kill.
        after_ops: u64,
    },
}

impl Fault {
    /// The disk a fault names, if any.
    pub fn disk(&self) -> Option<&str> {
        match self {
            Fault::SinkError { disk, .. } => disk.as_deref(),
            Fault::CorruptBlob { disk, .. }
            | Fault::LoseBlob { disk, .. }
            | Fault::Kill { disk, .. } => Some(disk),
        }
    }

    /// The cycle a fault is for, if one.
    pub fn cycle(&self) -> Option<u32> {
        match self {
            Fault::SinkError { cycle, .. } => *cycle,
            Fault::CorruptBlob { cycle, .. }
            | Fault::LoseBlob { cycle, .. }
            | Fault::Kill { cycle, .. } => Some(*cycle),
        }
    }

    /// A short name for reports.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Fault::SinkError { .. } => "sink-error",
            Fault::CorruptBlob { .. } => "corrupt-blob",
            Fault::LoseBlob { .. } => "lose-blob",
            Fault::Kill { .. } => "kill",
        }
    }
}

/// What must hold at the end. Each failed expectation is named in the report.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every target byte-identical to its source at the end (`harness verify`'s compare).
    #[serde(default = "yes")]
    pub identical: bool,
    /// Also `qemu-img compare -f raw -F raw` of every pair.
    #[serde(default)]
    pub qemu_img_compare: bool,
    /// Exactly this many cycle applications failed on the targets, all disks together.
    pub failed_cycles: Option<u64>,
    /// Every disk whose target failed a cycle committed a later one.
    #[serde(default = "yes")]
    pub healed: bool,
    /// Every target's committed cycle is at least this at the end.
    pub committed_cycle_min: Option<u64>,
    /// At most this many bytes stored in the cache by all ships together.
    pub stored_bytes_max: Option<Size>,
    /// Every fault fired (a kill reached its step, a blob was there to corrupt or lose, a sink
    /// rule failed an operation).
    #[serde(default = "yes")]
    pub faults_fired: bool,
    /// Fairness: in every delta cycle, between the disks that shipped the same number of bytes
    /// in it, the slowest ship takes at most this many times as long as the fastest.
    pub ship_time_spread_max: Option<f64>,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            identical: true,
            qemu_img_compare: false,
            failed_cycles: None,
            healed: true,
            committed_cycle_min: None,
            stored_bytes_max: None,
            faults_fired: true,
            ship_time_spread_max: None,
        }
    }
}

/// One disk of a scenario, with its group expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskName {
    /// `NAME` or `NAME-07`.
    pub name: String,
    /// The group's index in the file.
    pub group: usize,
    /// The disk's index among all disks.
    pub index: usize,
}

/// A scenario file that could not be read: the file, where in it, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The file, as given.
    pub file: String,
    /// 1-based line and column, when known.
    pub line_col: Option<(usize, usize)>,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_col {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for SpecError {}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut upto = offset.min(text.len());
    while !text.is_char_boundary(upto) {
        upto -= 1;
    }
    let before = &text[..upto];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Parses and checks a scenario. `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Scenario, SpecError> {
    let scenario: Scenario = toml::from_str(text).map_err(|e| SpecError {
        file: file.to_owned(),
        line_col: e.span().map(|s| line_col(text, s.start)),
        message: e.message().trim().to_owned(),
    })?;
    scenario.check().map_err(|(span, message)| SpecError {
        file: file.to_owned(),
        line_col: span.map(|s| line_col(text, s.start)),
        message,
    })?;
    Ok(scenario)
}

type Check = Result<(), (Option<Range<usize>>, String)>;

fn at<T>(s: &Spanned<T>, msg: String) -> (Option<Range<usize>>, String) {
    (Some(s.span()), msg)
}

impl Scenario {
    /// Every disk, groups expanded, in file order.
    pub fn disk_names(&self) -> Vec<DiskName> {
        let mut out = Vec::new();
        for (g, group) in self.disks.iter().enumerate() {
            let group = group.get_ref();
            if group.count == 1 {
                out.push(DiskName {
                    name: group.name.clone(),
                    group: g,
                    index: out.len(),
                });
                continue;
            }
            let width = group.count.saturating_sub(1).to_string().len().max(2);
            for i in 0..group.count {
                out.push(DiskName {
                    name: format!("{}-{i:0width$}", group.name),
                    group: g,
                    index: out.len(),
                });
            }
        }
        out
    }

    /// Whether a workload's `disks` entry `sel` selects `disk`: its group's name or its own.
    pub fn selects(&self, sel: &str, disk: &DiskName) -> bool {
        disk.name == sel
            || self
                .disks
                .get(disk.group)
                .is_some_and(|g| g.get_ref().name == sel)
    }

    fn check(&self) -> Check {
        let top = |msg: String| Err((None, msg));
        if self.name.trim().is_empty() {
            return top("`name` is empty".into());
        }
        if self.cycles > CYCLES_MAX {
            return top(format!("`cycles` is {}; at most {CYCLES_MAX}", self.cycles));
        }
        if self.concurrency == 0 || self.concurrency > CONCURRENCY_MAX {
            return top(format!(
                "`concurrency` is {}; it must be 1 to {CONCURRENCY_MAX}",
                self.concurrency
            ));
        }
        if self.heal_rounds > HEAL_ROUNDS_MAX {
            return top(format!(
                "`heal_rounds` is {}; at most {HEAL_ROUNDS_MAX}",
                self.heal_rounds
            ));
        }
        if self.disks.is_empty() {
            return top("no `[[disk]]`: a scenario needs at least one disk".into());
        }
        for (what, n) in [
            ("[[disk]]", self.disks.len()),
            ("[[workload]]", self.workloads.len()),
            ("[[fault]]", self.faults.len()),
        ] {
            if n > ENTRIES_MAX {
                return top(format!("{n} `{what}` entries; at most {ENTRIES_MAX}"));
            }
        }
        if let Some(a) = self.sink.attempts
            && !(1..=100).contains(&a)
        {
            return top(format!("`sink.attempts` is {a}; it must be 1 to 100"));
        }
        if let Some(t) = &self.sink.throttle {
            replicator_sink::wrap::RateSchedule::parse(t.get_ref())
                .map_err(|e| at(t, format!("`sink.throttle`: {e}")))?;
        }
        replicator_sink::wrap::UtcOffset::parse(&self.sink.utc_offset)
            .map_err(|e| (None, format!("`sink.utc_offset`: {e}")))?;
        self.check_disks()?;
        let names = self.disk_names();
        let group_names: BTreeSet<&str> = self
            .disks
            .iter()
            .map(|g| g.get_ref().name.as_str())
            .collect();
        let known = |n: &str| group_names.contains(n) || names.iter().any(|d| d.name == n);
        for w in &self.workloads {
            self.check_workload(w, &known)?;
        }
        for f in &self.faults {
            self.check_fault(f, &names)?;
        }
        if self
            .faults
            .iter()
            .any(|f| matches!(f.get_ref(), Fault::Kill { .. }))
            && self
                .sink
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("memory:"))
        {
            return top(
                "a `kill` fault runs a side as another process, which cannot see a `memory://` \
                 sink: use a directory"
                    .into(),
            );
        }
        if let Some(s) = self.expect.ship_time_spread_max
            && !(s.is_finite() && s >= 1.0)
        {
            return top(format!(
                "`expect.ship_time_spread_max` is {s}; it is a ratio of at least 1.0"
            ));
        }
        Ok(())
    }

    fn check_disks(&self) -> Check {
        let mut total = 0u64;
        let mut seen = BTreeSet::new();
        for g in &self.disks {
            let d = g.get_ref();
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(at(
                    g,
                    format!(
                        "disk `name` {:?} must be letters, digits, `-` and `_`",
                        d.name
                    ),
                ));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(at(g, format!("disk `name` {:?} is used twice", d.name)));
            }
            if d.size.0 == 0 || !d.size.0.is_multiple_of(512) || d.size.0 > DISK_BYTES_MAX {
                return Err(at(
                    g,
                    format!(
                        "disk {:?}: `size` {} must be a positive multiple of 512, at most 64 TiB",
                        d.name, d.size.0
                    ),
                ));
            }
            // The log pattern and the workloads need room: a few 64 KiB writes.
            if d.size.0 < 1 << 20 {
                return Err(at(
                    g,
                    format!("disk {:?}: `size` must be at least 1M", d.name),
                ));
            }
            if d.count == 0 {
                return Err(at(
                    g,
                    format!("disk {:?}: `count` must be at least 1", d.name),
                ));
            }
            if d.tracker == Tracker::Kernel && d.backing != Backing::Loop {
                return Err(at(
                    g,
                    format!(
                        "disk {:?}: the kernel tracker follows a block device: `backing` must be \
                         \"loop\"",
                        d.name
                    ),
                ));
            }
            total += u64::from(d.count);
        }
        if total > DISKS_MAX {
            return Err((None, format!("{total} disks in all; at most {DISKS_MAX}")));
        }
        // Names of expanded disks must not collide with another group's name.
        let names = self.disk_names();
        let mut all = BTreeSet::new();
        for n in &names {
            if !all.insert(n.name.as_str()) {
                let g = &self.disks[n.group];
                return Err(at(g, format!("disk name {:?} is used twice", n.name)));
            }
        }
        Ok(())
    }

    fn check_workload(&self, w: &Spanned<Workload>, known: &dyn Fn(&str) -> bool) -> Check {
        let wl = w.get_ref();
        let err = |msg: String| Err(at(w, format!("workload: {msg}")));
        match (&wl.pattern, &wl.fio) {
            (None, None) => return err("give `pattern` or `fio`".into()),
            (Some(_), Some(_)) => return err("give `pattern` or `fio`, not both".into()),
            _ => {}
        }
        if let Some(cycles) = &wl.cycles {
            if cycles.is_empty() {
                return err("`cycles` is empty".into());
            }
            if let Some(c) = cycles.iter().find(|&&c| c == 0 || c > self.cycles) {
                return err(format!(
                    "`cycles` names cycle {c}; delta cycles are 1 to {}",
                    self.cycles
                ));
            }
        }
        if let Some(disks) = &wl.disks {
            if disks.is_empty() {
                return err("`disks` is empty".into());
            }
            if let Some(d) = disks.iter().find(|d| !known(d)) {
                return err(format!(
                    "`disks` names {d:?}, which is no disk or disk group"
                ));
            }
        }
        if let Some(p) = wl.pattern {
            if wl.bytes.is_some() == wl.ops.is_some() {
                return err(format!(
                    "pattern {:?} needs exactly one of `bytes` and `ops`",
                    p.name()
                ));
            }
            if wl.zipf_exponent.is_some() && p != Pattern::Zipf {
                return err("`zipf_exponent` is for the zipf pattern only".into());
            }
            if let Some(e) = wl.zipf_exponent
                && !(e.is_finite() && e > 0.0 && e <= 10.0)
            {
                return err(format!(
                    "`zipf_exponent` is {e}; it must be above 0, at most 10"
                ));
            }
        } else if wl.bytes.is_some()
            || wl.ops.is_some()
            || wl.zipf_exponent.is_some()
            || wl.rate_bytes_per_s.is_some()
            || wl.seed.is_some()
        {
            return err(
                "`bytes`, `ops`, `rate_bytes_per_s`, `seed` and `zipf_exponent` go with \
                 `pattern`; an fio job has its own in `fio`"
                    .into(),
            );
        }
        if let Some(job) = &wl.fio {
            if !FIO_RW_MODES.contains(&job.rw.as_str()) {
                return err(format!(
                    "fio `rw` {:?} is not one of {}",
                    job.rw,
                    FIO_RW_MODES.join(", ")
                ));
            }
            if job.bs.0 == 0 || !job.bs.0.is_multiple_of(512) || job.bs.0 > 64 << 20 {
                return err(format!(
                    "fio `bs` {} must be a positive multiple of 512, at most 64M",
                    job.bs.0
                ));
            }
            if job.size.0 == 0 {
                return err("fio `size` must be positive".into());
            }
            if job.iodepth == 0 || job.iodepth > 1024 {
                return err(format!("fio `iodepth` {} must be 1 to 1024", job.iodepth));
            }
            // fio writes the device directly: only the kernel tracker sees that.
            for d in self.disk_names() {
                let selected = wl
                    .disks
                    .as_ref()
                    .is_none_or(|sel| sel.iter().any(|s| self.selects(s, &d)));
                let group = self.disks[d.group].get_ref();
                if selected && group.tracker != Tracker::Kernel {
                    return err(format!(
                        "fio writes disk {:?} directly, which only the kernel tracker sees; give \
                         its group `tracker = \"kernel\"` or leave it out of `disks`",
                        d.name
                    ));
                }
                if selected && job.size.0 > group.size.0 {
                    return err(format!(
                        "fio `size` {} is larger than disk {:?} ({} bytes)",
                        job.size.0, d.name, group.size.0
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_fault(&self, f: &Spanned<Fault>, names: &[DiskName]) -> Check {
        let fault = f.get_ref();
        let err = |msg: String| Err(at(f, format!("fault {}: {msg}", fault.kind_name())));
        if let Some(d) = fault.disk()
            && !names.iter().any(|n| n.name == d)
        {
            return err(format!("`disk` {d:?} is no disk of this scenario"));
        }
        if let Some(c) = fault.cycle()
            && c > self.cycles
        {
            return err(format!(
                "`cycle` {c} is past the last cycle ({}; 0 is the initial copy)",
                self.cycles
            ));
        }
        match fault {
            Fault::SinkError {
                probability,
                times,
                after,
                ..
            } => {
                if let Some(p) = probability {
                    if !(p.is_finite() && (0.0..=1.0).contains(p)) {
                        return err(format!("`probability` {p} must be 0 to 1"));
                    }
                    if *after != 0 || *times != 1 {
                        return err(
                            "give `probability` or `after`/`times` (a countdown), not both".into(),
                        );
                    }
                }
                if *times == 0 {
                    return err("`times` must be at least 1".into());
                }
            }
            Fault::Kill {
                after_ops, disk, ..
            } => {
                if *after_ops == 0 {
                    return err("`after_ops` must be at least 1".into());
                }
                let tracker = names
                    .iter()
                    .find(|n| n.name == *disk)
                    .map(|n| self.disks[n.group].get_ref().tracker);
                if tracker == Some(Tracker::Hrl) {
                    return err(
                        "a kill fault runs `harness ship` in another process; use the cbt or \
                         kernel tracker for this disk"
                            .into(),
                    );
                }
            }
            Fault::CorruptBlob { .. } | Fault::LoseBlob { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASIC: &str = r#"
name = "t"
cycles = 2

[[disk]]
name = "db"
size = "8M"

[[workload]]
pattern = "innodb"
bytes = "1M"
"#;

    #[test]
    fn a_small_scenario_parses_with_defaults() -> Result<(), SpecError> {
        let s = parse(BASIC, "t.toml")?;
        assert_eq!(s.concurrency, CONCURRENCY_DEFAULT);
        assert_eq!(s.disks[0].get_ref().size, Size(8 << 20));
        assert_eq!(s.disks[0].get_ref().tracker, Tracker::Cbt);
        assert_eq!(s.compression, CompressionSpec::Adaptive);
        assert!(s.expect.identical);
        assert_eq!(s.disk_names()[0].name, "db");
        Ok(())
    }

    #[test]
    fn an_unknown_field_is_named_with_its_line() {
        let text = BASIC.replace("bytes = \"1M\"", "bytes = \"1M\"\nbites = 3");
        let e = parse(&text, "t.toml").err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.starts_with("t.toml:12:"), "{e}");
        assert!(e.contains("bites"), "{e}");
    }

    #[test]
    fn compression_is_adaptive_or_zstd_and_a_bad_one_is_named() -> Result<(), SpecError> {
        let text = BASIC.replace("cycles = 2", "cycles = 2\ncompression = \"zstd\"");
        assert_eq!(parse(&text, "t.toml")?.compression, CompressionSpec::Zstd);
        let text = BASIC.replace("cycles = 2", "cycles = 2\ncompression = \"lz4\"");
        let e = parse(&text, "t.toml").err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.starts_with("t.toml:4:") && e.contains("lz4"), "{e}");
        Ok(())
    }

    #[test]
    fn a_bad_size_names_the_value() {
        let text = BASIC.replace("\"8M\"", "\"8Q\"");
        let e = parse(&text, "t.toml").err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("t.toml:7:") && e.contains("8Q"), "{e}");
    }

    #[test]
    fn groups_expand_to_numbered_disks() -> Result<(), SpecError> {
        let text = BASIC.replace("size = \"8M\"", "size = \"8M\"\ncount = 64");
        let s = parse(&text, "t.toml")?;
        let names = s.disk_names();
        assert_eq!(names.len(), 64);
        assert_eq!(names[0].name, "db-00");
        assert_eq!(names[63].name, "db-63");
        assert!(s.selects("db", &names[5]));
        Ok(())
    }

    #[test]
    fn faults_are_checked_against_the_disks_and_cycles() {
        let bad_disk =
            format!("{BASIC}\n[[fault]]\nkind = \"lose-blob\"\ndisk = \"nope\"\ncycle = 1\n");
        let e = parse(&bad_disk, "t.toml").err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("\"nope\"")),
            "{e:?}"
        );
        let bad_cycle = format!(
            "{BASIC}\n[[fault]]\nkind = \"kill\"\nside = \"ship\"\ndisk = \"db\"\ncycle = 9\nafter_ops = 1\n"
        );
        let e = parse(&bad_cycle, "t.toml").err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("cycle` 9")),
            "{e:?}"
        );
        let unknown = format!(
            "{BASIC}\n[[fault]]\nkind = \"lose-blob\"\ndisk = \"db\"\ncycle = 1\nwhen = 2\n"
        );
        let e = parse(&unknown, "t.toml").err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("when")), "{e:?}");
        let ok = format!("{BASIC}\n[[fault]]\nkind = \"sink-error\"\nop = \"put\"\ntimes = 2\n");
        assert!(parse(&ok, "t.toml").is_ok());
    }

    #[test]
    fn fio_needs_the_kernel_tracker_and_a_throttle_must_parse() {
        let fio = format!(
            "{BASIC}\n[[workload]]\nfio = {{ rw = \"randwrite\", bs = \"4K\", size = \"1M\" }}\n"
        );
        let e = parse(&fio, "t.toml").err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("kernel")), "{e:?}");
        let throttle = BASIC.replace("cycles = 2", "cycles = 2\n[sink]\nthrottle = \"fast\"");
        let e = parse(&throttle, "t.toml").err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("t.toml:5:") && e.contains("throttle")),
            "{e:?}"
        );
    }

    #[test]
    fn the_documented_example_parses() -> Result<(), SpecError> {
        let doc = include_str!("../../../docs/SCENARIOS.md");
        let start = doc.find("```toml\n").map(|i| i + 8).unwrap_or(0);
        let len = doc[start..].find("```").unwrap_or(0);
        let s = parse(&doc[start..start + len], "docs/SCENARIOS.md")?;
        assert_eq!(s.name, "example");
        assert_eq!(s.disk_names().len(), 2);
        assert_eq!(s.faults.len(), 1);
        Ok(())
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
