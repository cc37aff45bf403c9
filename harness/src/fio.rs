//! fio workloads: the job file the harness writes for a [`FioJob`], and a run of it with fio's
//! JSON report read back. fio is a Debian package the harness does not install (scripts/test.sh
//! does); it writes to the device node itself, like any application, so the kernel tracker sees
//! its bios and an image file's writes are seen on the next ship's checksum pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// fio's `rw=` values the harness accepts.
pub const RW_KINDS: [&str; 9] = [
    "read",
    "write",
    "trim",
    "randread",
    "randwrite",
    "randtrim",
    "rw",
    "randrw",
    "trimwrite",
];

/// One fio job.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct FioJob {
    /// fio's `rw`: randwrite, write, randrw, trim, randtrim, trimwrite, ... (see [`RW_KINDS`]).
    pub rw: String,
    /// Block size in bytes (a multiple of 512).
    pub bs: u64,
    /// Bytes of the device the job covers, from offset 0 (a multiple of `bs`).
    pub size: u64,
    /// I/Os in flight: 1 uses the `psync` engine, more use `libaio`.
    pub iodepth: u32,
    /// fio's `rate` (bytes per second, reads and writes each); none: unlimited.
    pub rate_bytes_per_s: Option<u64>,
    /// Run this long, going over `size` again as needed (`time_based`); none: once over `size`.
    pub runtime_s: Option<u64>,
    /// fio's `randseed`: the same seed gives the same offsets.
    pub seed: u64,
    /// `direct=1` (O_DIRECT).
    pub direct: bool,
}

/// What fio reported for the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FioReport {
    /// Bytes written.
    pub bytes_written: u64,
    /// Write I/Os.
    pub writes: u64,
    /// Bytes trimmed (discarded).
    pub bytes_trimmed: u64,
    /// Trim I/Os.
    pub trims: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Read I/Os.
    pub reads: u64,
    /// The job's run time in milliseconds, as fio measured it.
    pub runtime_ms: u64,
    /// The job file that ran.
    pub job_file: PathBuf,
}

impl FioJob {
    /// Checks the options; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !RW_KINDS.contains(&self.rw.as_str()) {
            bail!(
                "fio job: `rw` is {:?}; use one of {}",
                self.rw,
                RW_KINDS.join(", ")
            );
        }
        if self.bs == 0 || !self.bs.is_multiple_of(512) {
            bail!(
                "fio job: `bs` {} must be a positive multiple of 512 bytes",
                self.bs
            );
        }
        if self.size == 0 || !self.size.is_multiple_of(self.bs) {
            bail!(
                "fio job: `size` {} must be a positive multiple of `bs` ({})",
                self.size,
                self.bs
            );
        }
        if self.iodepth == 0 {
            bail!("fio job: `iodepth` must be at least 1");
        }
        if self.rate_bytes_per_s == Some(0) {
            bail!("fio job: `rate_bytes_per_s` must be at least 1 (or unset for no limit)");
        }
        if self.runtime_s == Some(0) {
            bail!("fio job: `runtime_s` must be at least 1 (or unset to go once over `size`)");
        }
        Ok(())
    }

    /// The I/O engine: trims go through the synchronous engine (fio issues them as
    /// `BLKDISCARD`), deep queues through libaio.
    fn engine(&self) -> &'static str {
        if self.rw.contains("trim") || self.iodepth == 1 {
            "psync"
        } else {
            "libaio"
        }
    }
}

/// The `.fio` job file text for `job` on `device`. fio splits `filename` at `:`, so colons in
/// the path are escaped.
pub fn job_file(job: &FioJob, device: &Path) -> String {
    let filename = device.display().to_string().replace(':', "\\:");
    let mut out = String::new();
    out.push_str("; written by the replicator harness\n");
    out.push_str("[global]\n");
    out.push_str(&format!("filename={filename}\n"));
    out.push_str(&format!("ioengine={}\n", job.engine()));
    out.push_str(&format!("direct={}\n", u8::from(job.direct)));
    out.push_str(&format!("bs={}\n", job.bs));
    out.push_str(&format!("size={}\n", job.size));
    out.push_str(&format!("iodepth={}\n", job.iodepth));
    out.push_str(&format!("randseed={}\n", job.seed));
    if let Some(rate) = job.rate_bytes_per_s {
        out.push_str(&format!("rate={rate}\n"));
    }
    if let Some(runtime) = job.runtime_s {
        out.push_str(&format!("runtime={runtime}\ntime_based=1\n"));
    }
    out.push_str("\n[harness]\n");
    out.push_str(&format!("rw={}\n", job.rw));
    out
}

/// The fio command, or a message saying how to install it.
fn fio_command() -> Result<Command> {
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(Command::new("fio")),
        Ok(o) => bail!(
            "`fio --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "fio is not installed; scripts/test.sh installs it: apt-get install -y \
             --no-install-recommends fio"
        ),
        Err(e) => Err(e).context("running fio"),
    }
}

/// Writes the job file for `job` on `device` into `workdir` (`harness.fio`), runs
/// `fio --output-format=json` on it, and reads back what it did (`fio.json` beside it).
pub fn run(job: &FioJob, device: &Path, workdir: &Path) -> Result<FioReport> {
    job.validate()?;
    let mut cmd = fio_command()?;
    std::fs::create_dir_all(workdir)
        .with_context(|| format!("creating the fio work directory {}", workdir.display()))?;
    let job_path = workdir.join("harness.fio");
    let json_path = workdir.join("fio.json");
    std::fs::write(&job_path, job_file(job, device))
        .with_context(|| format!("writing {}", job_path.display()))?;
    let out = cmd
        .arg("--output-format=json")
        .arg(format!("--output={}", json_path.display()))
        .arg(&job_path)
        .output()
        .context("running fio")?;
    let json = std::fs::read_to_string(&json_path).unwrap_or_default();
    if !out.status.success() {
        bail!(
            "fio failed ({}) on {} with {}: {}{}",
            out.status,
            device.display(),
            job_path.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            job_error(&json)
                .map(|e| format!(" (job error {e})"))
                .unwrap_or_default()
        );
    }
    let mut report = parse_report(&json)
        .with_context(|| format!("reading fio's report {}", json_path.display()))?;
    report.job_file = job_path;
    Ok(report)
}

fn job_error(json: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(json_start(json)).ok()?;
    v.get("jobs")?.get(0)?.get("error")?.as_i64()
}

/// fio may print notes before the JSON document.
fn json_start(text: &str) -> &str {
    text.find('{').map_or(text, |i| &text[i..])
}

/// Reads bytes, I/Os and run time from fio's JSON report (the sum over its jobs).
pub fn parse_report(json: &str) -> Result<FioReport> {
    let v: serde_json::Value =
        serde_json::from_str(json_start(json)).context("fio's output is not JSON")?;
    let jobs = v
        .get("jobs")
        .and_then(|j| j.as_array())
        .context("fio's report has no `jobs` array")?;
    if jobs.is_empty() {
        bail!("fio's report lists no jobs");
    }
    let mut r = FioReport::default();
    for (i, j) in jobs.iter().enumerate() {
        let num = |dir: &str, field: &str| -> Result<u64> {
            j.get(dir)
                .and_then(|d| d.get(field))
                .and_then(|n| n.as_u64())
                .with_context(|| format!("fio's report: job {i} has no `{dir}.{field}`"))
        };
        if let Some(e) = j.get("error").and_then(|e| e.as_i64())
            && e != 0
        {
            bail!("fio's report: job {i} ended with error {e}");
        }
        r.bytes_written += num("write", "io_bytes")?;
        r.writes += num("write", "total_ios")?;
        r.bytes_trimmed += num("trim", "io_bytes")?;
        r.trims += num("trim", "total_ios")?;
        r.bytes_read += num("read", "io_bytes")?;
        r.reads += num("read", "total_ios")?;
        let runtime = j
            .get("job_runtime")
            .and_then(|n| n.as_u64())
            .with_context(|| format!("fio's report: job {i} has no `job_runtime`"))?;
        r.runtime_ms = r.runtime_ms.max(runtime);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> FioJob {
        FioJob {
            rw: "randwrite".into(),
            bs: 16384,
            size: 64 << 20,
            iodepth: 32,
            rate_bytes_per_s: Some(8 << 20),
            runtime_s: Some(30),
            seed: 7,
            direct: true,
        }
    }

    #[test]
    fn job_file_text_for_given_options() {
        assert_eq!(
            job_file(&job(), Path::new("/dev/loop3")),
            "; written by the replicator harness\n\
             [global]\n\
             filename=/dev/loop3\n\
             ioengine=libaio\n\
             direct=1\n\
             bs=16384\n\
             size=67108864\n\
             iodepth=32\n\
             randseed=7\n\
             rate=8388608\n\
             runtime=30\n\
             time_based=1\n\
             \n\
             [harness]\n\
             rw=randwrite\n"
        );
        let once = FioJob {
            rw: "trim".into(),
            iodepth: 1,
            rate_bytes_per_s: None,
            runtime_s: None,
            direct: false,
            ..job()
        };
        let text = job_file(&once, Path::new("/tmp/a:b.img"));
        assert!(text.contains("filename=/tmp/a\\:b.img\n"), "{text}");
        assert!(text.contains("ioengine=psync\n") && text.contains("direct=0\n"));
        assert!(
            !text.contains("rate=") && !text.contains("runtime="),
            "{text}"
        );
        assert!(text.ends_with("[harness]\nrw=trim\n"), "{text}");
    }

    #[test]
    fn bad_options_name_the_field() {
        let bad = |f: fn(&mut FioJob)| {
            let mut j = job();
            f(&mut j);
            j.validate().unwrap_err().to_string()
        };
        assert!(bad(|j| j.rw = "scribble".into()).contains("`rw`"));
        assert!(bad(|j| j.bs = 1000).contains("`bs`"));
        assert!(bad(|j| j.size = 16385).contains("`size`"));
        assert!(bad(|j| j.iodepth = 0).contains("`iodepth`"));
        assert!(bad(|j| j.rate_bytes_per_s = Some(0)).contains("`rate_bytes_per_s`"));
        assert!(bad(|j| j.runtime_s = Some(0)).contains("`runtime_s`"));
        job().validate().unwrap();
    }

    #[test]
    fn report_sums_directions_and_rejects_damage() {
        let json = r#"note: a line fio printed first
{"fio version":"fio-3.33","jobs":[{"jobname":"harness","error":0,"job_runtime":1234,
 "read":{"io_bytes":0,"total_ios":0},"write":{"io_bytes":8388608,"total_ios":512},
 "trim":{"io_bytes":1048576,"total_ios":16}}]}"#;
        let r = parse_report(json).unwrap();
        assert_eq!(
            (
                r.bytes_written,
                r.writes,
                r.bytes_trimmed,
                r.trims,
                r.runtime_ms
            ),
            (8 << 20, 512, 1 << 20, 16, 1234)
        );
        assert!(parse_report("{}").unwrap_err().to_string().contains("jobs"));
        let failed = json.replace("\"error\":0", "\"error\":25");
        assert!(
            parse_report(&failed)
                .unwrap_err()
                .to_string()
                .contains("error 25")
        );
        let missing = json.replace("\"total_ios\":512", "\"x\":1");
        assert!(
            parse_report(&missing)
                .unwrap_err()
                .to_string()
                .contains("write.total_ios")
        );
    }
}
