//! A private tracefs instance that records one device's block events.
//!
//! The instance (a directory under `instances/`) has its own ring buffer, clock, event filters
//! and `trace_pipe`, so the global trace buffer and other tracers are untouched. It uses the
//! `global` trace clock: events from every CPU are then ordered correctly against a marker, which
//! is what makes draining by marker sound. Overwrite stays on, so a marker always gets into a full
//! buffer (the overwritten events are counted in the per-CPU `overrun` statistics and reported as
//! `[LOST N EVENTS]`). Removed (events disabled, directory removed) when dropped.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::parse::BLOCK_EVENTS;

/// Where tracefs is mounted.
pub const TRACEFS_ROOT: &str = "/sys/kernel/tracing";

/// Block events the tracker cannot work without; the others are enabled where the kernel has them.
const EVENTS_REQUIRED: [&str; 2] = ["block_bio_queue", "block_rq_complete"];

/// Fields of `per_cpu/cpuN/stats` that count events the reader never saw.
const LOSS_FIELDS: [&str; 3] = ["overrun", "commit overrun", "dropped events"];

/// An instance of tracefs recording the block events of one device.
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
    /// Open while the instance lives; an open file keeps the instance from being removed.
    marker: Option<File>,
    enabled: Vec<PathBuf>,
}

/// Mounts tracefs at [`TRACEFS_ROOT`] unless it is there.
pub fn ensure_mounted() -> Result<PathBuf> {
    let root = PathBuf::from(TRACEFS_ROOT);
    if root.join("instances").is_dir() {
        return Ok(root);
    }
    let out = Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS_ROOT])
        .output()
        .context("running mount to mount tracefs (install util-linux's mount)")?;
    // Another process may have mounted it meanwhile: what counts is whether it is there now.
    if !root.join("instances").is_dir() {
        bail!(
            "tracefs is not mounted at {TRACEFS_ROOT} and mounting it failed ({}): mount it with \
             `mount -t tracefs nodev {TRACEFS_ROOT}` as root, on a kernel with tracing support",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(root)
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

impl Instance {
    /// Creates instance `name` (removing a leftover of that name first: the caller holds the
    /// device's lock, so a leftover belongs to a tracker that died), with `buffer_kb_per_cpu` of
    /// ring buffer per CPU, following the block events of kernel device number `dev`
    /// (`major << 20 | minor`).
    pub fn create(name: &str, dev: u32, buffer_kb_per_cpu: u64) -> Result<Self> {
        let root = ensure_mounted()?;
        let dir = root.join("instances").join(name);
        if dir.exists() {
            tracing::warn!(instance = %dir.display(), "removing a trace instance left by a tracker that did not stop cleanly");
            remove_instance(&dir, &[])?;
        }
        fs::create_dir(&dir).with_context(|| {
            format!(
                "creating the trace instance {} (needs root and a kernel with tracing support)",
                dir.display()
            )
        })?;
        // From here on the instance exists: build the value so that a failure below removes it.
        let marker = OpenOptions::new()
            .write(true)
            .open(dir.join("trace_marker"))
            .with_context(|| format!("opening {}", dir.join("trace_marker").display()));
        let marker = match marker {
            Ok(m) => m,
            Err(e) => {
                let _ = remove_instance(&dir, &[]);
                return Err(e);
            }
        };
        let mut inst = Instance {
            dir,
            marker: Some(marker),
            enabled: Vec::new(),
        };
        inst.configure(dev, buffer_kb_per_cpu)?;
        Ok(inst)
    }

    fn configure(&mut self, dev: u32, buffer_kb_per_cpu: u64) -> Result<()> {
        write_file(&self.dir.join("trace_clock"), "global")?;
        write_file(
            &self.dir.join("buffer_size_kb"),
            &buffer_kb_per_cpu.to_string(),
        )?;
        write_file(&self.dir.join("options/overwrite"), "1")?;
        let filter = format!("dev == {dev}");
        for event in BLOCK_EVENTS {
            let event_dir = self.dir.join("events/block").join(event);
            if !event_dir.is_dir() {
                if EVENTS_REQUIRED.contains(&event) {
                    bail!(
                        "this kernel has no block/{event} trace event ({} is missing); the \
                         kernel tracker needs it",
                        event_dir.display()
                    );
                }
                continue;
            }
            write_file(&event_dir.join("filter"), &filter)?;
            let enable = event_dir.join("enable");
            write_file(&enable, "1")?;
            self.enabled.push(enable);
        }
        write_file(&self.dir.join("tracing_on"), "1")?;
        Ok(())
    }

    /// Opens the instance's `trace_pipe` (a consuming, blocking reader).
    pub fn open_pipe(&self) -> Result<File> {
        let path = self.dir.join("trace_pipe");
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Writes `text` to the instance's `trace_marker`: it appears in `trace_pipe` after every
    /// event recorded before it.
    pub fn write_marker(&self, text: &str) -> Result<()> {
        let path = self.dir.join("trace_marker");
        let Some(mut marker) = self.marker.as_ref() else {
            bail!("{} is closed", path.display());
        };
        marker
            .write_all(text.as_bytes())
            .with_context(|| format!("writing a marker to {}", path.display()))
    }

    /// Events the kernel recorded but the reader will never see, summed over every CPU since the
    /// instance was made (the `overrun`, `commit overrun` and `dropped events` counters).
    pub fn lost_events(&self) -> Result<u64> {
        let per_cpu = self.dir.join("per_cpu");
        let mut total = 0u64;
        let entries =
            fs::read_dir(&per_cpu).with_context(|| format!("listing {}", per_cpu.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", per_cpu.display()))?;
            let stats = entry.path().join("stats");
            let text = fs::read_to_string(&stats)
                .with_context(|| format!("reading {}", stats.display()))?;
            total = total
                .saturating_add(parse_loss_stats(&text).with_context(|| {
                    format!("reading the loss counters of {}", stats.display())
                })?);
        }
        Ok(total)
    }
}

/// Sums the loss counters of one `per_cpu/cpuN/stats` file.
pub fn parse_loss_stats(text: &str) -> Result<u64> {
    let mut total = 0u64;
    let mut found = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if LOSS_FIELDS.contains(&key.trim()) {
            let n: u64 = value
                .trim()
                .parse()
                .with_context(|| format!("`{line}` is not a count"))?;
            total = total.saturating_add(n);
            found += 1;
        }
    }
    if found == 0 {
        bail!("none of the fields {LOSS_FIELDS:?} is present");
    }
    Ok(total)
}

fn remove_instance(dir: &Path, enabled: &[PathBuf]) -> Result<()> {
    for enable in enabled {
        let _ = fs::write(enable, "0");
    }
    fs::remove_dir(dir).with_context(|| {
        format!(
            "removing the trace instance {} (is a process still reading its trace_pipe?)",
            dir.display()
        )
    })
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.marker = None;
        if let Err(e) = remove_instance(&self.dir, &self.enabled) {
            tracing::warn!(error = %format!("{e:#}"), "could not remove the trace instance; remove it with rmdir");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counters_are_summed() -> Result<()> {
        let stats = "entries: 0\noverrun: 3920\ncommit overrun: 1\nbytes: 0\n\
                     oldest event ts: 10050.409892\nnow ts: 10051.1\ndropped events: 2\nread events: 81\n";
        assert_eq!(parse_loss_stats(stats)?, 3923);
        assert!(parse_loss_stats("entries: 0\n").is_err());
        assert!(parse_loss_stats("overrun: many\n").is_err());
        Ok(())
    }
}
