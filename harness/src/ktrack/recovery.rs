//! What a starting tracker finds in its state directory: the marks it can trust, a device it
//! must refuse, or a gap in tracking (a reboot, a re-attached device, counters that moved).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use replicator_core::bitmap::SectorBitmap;
use replicator_core::tracker::Generation;

use super::device::{BlockDev, WriteCounters};
use super::state::{self, TrackState};

/// What a start found in the state directory.
pub(super) struct Loaded {
    pub(super) generation: Generation,
    pub(super) epoch: u64,
    pub(super) acked_epoch: u64,
    pub(super) current: SectorBitmap,
    pub(super) lost: Option<String>,
    pub(super) started: String,
}

/// Checks a persisted state against the device it is opened for: another device is refused.
fn check_identity(s: &TrackState, dev: &BlockDev, path: &Path) -> Result<()> {
    let d = &s.device;
    let here = dev.describe();
    let fix = "use the state directory that belongs to that device, or a new one";
    if d.size_bytes != dev.size_bytes {
        bail!(
            "{} tracks a device of {} bytes, but {here} has {} bytes; {fix}",
            path.display(),
            d.size_bytes,
            dev.size_bytes
        );
    }
    match (&d.backing_file, &dev.backing_file) {
        (Some(a), Some(b)) if a != b => bail!(
            "{} tracks the loop device over {a}, but {here} is attached to {b}; {fix}",
            path.display()
        ),
        (Some(a), None) => bail!(
            "{} tracks the loop device over {a}, but {here} is not a loop device; {fix}",
            path.display()
        ),
        (None, Some(_)) => bail!(
            "{} tracks the disk {}:{}, but {here} is a loop device; {fix}",
            path.display(),
            d.major,
            d.minor
        ),
        (None, None) if (d.major, d.minor) != (dev.major, dev.minor) => bail!(
            "{} tracks the disk {}:{}, not {here}; {fix}",
            path.display(),
            d.major,
            d.minor
        ),
        _ => Ok(()),
    }
}

/// Why the persisted marks cannot be trusted now, if they cannot.
fn gap_reason(
    s: &TrackState,
    dev: &BlockDev,
    boot: &[u8; 16],
    now: WriteCounters,
) -> Option<String> {
    let d = &s.device;
    if &d.boot_id != boot {
        return Some(
            "the machine restarted since the tracker's last checkpoint: writes made before or \
             during the restart cannot be ruled out"
                .into(),
        );
    }
    if (d.major, d.minor, d.diskseq) != (dev.major, dev.minor, dev.diskseq) {
        return Some(format!(
            "the device was attached anew since the tracker's last checkpoint (it was {}:{} with \
             disk sequence {}, it is {}:{} with {}): writes while it was detached cannot be ruled \
             out",
            d.major, d.minor, d.diskseq, dev.major, dev.minor, dev.diskseq
        ));
    }
    if d.counters != now {
        return Some(format!(
            "the device's write counters moved while the tracker was not running: {} at its \
             last checkpoint, {} now (/sys/dev/block/{}:{}/stat), so those writes were not \
             tracked",
            d.counters, now, dev.major, dev.minor
        ));
    }
    None
}

pub(super) fn load(
    path: &Path,
    dev: &BlockDev,
    boot: &[u8; 16],
    now: WriteCounters,
) -> Result<Loaded> {
    let sectors = dev.size_bytes / 512;
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                generation: Generation::generate()?,
                epoch: 1,
                acked_epoch: 0,
                current: SectorBitmap::new(sectors),
                lost: None,
                started: "a new tracker state".into(),
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let s = match state::decode(&bytes) {
        Ok(s) => s,
        Err(why) => {
            let reason = format!(
                "the tracker state {} is damaged ({why}), so its marks cannot be trusted",
                path.display()
            );
            return Ok(Loaded {
                generation: Generation::generate()?,
                epoch: 1,
                acked_epoch: 0,
                current: SectorBitmap::full(sectors),
                lost: Some(reason),
                started: "a damaged tracker state, made anew".into(),
            });
        }
    };
    check_identity(&s, dev, path)?;
    let mut current = s.current.clone();
    if let Some(f) = &s.frozen {
        // Its cycle never released it: its sectors ship again.
        current
            .union_with(&f.bitmap)
            .map_err(|e| anyhow!("{}: frozen bitmap: {e}", path.display()))?;
    }
    let gap = gap_reason(&s, dev, boot, now);
    let started = match (&gap, s.clean_stop) {
        (Some(_), _) => "a restart after a gap in tracking".to_owned(),
        (None, true) => "a clean restart: the marks are complete".to_owned(),
        (None, false) => "a restart after an unclean stop; the device's write counters have not \
                          moved since the last checkpoint, so no write was missed"
            .to_owned(),
    };
    let lost = gap.or(s.lost.clone());
    if lost.is_some() {
        current = SectorBitmap::full(sectors);
    }
    Ok(Loaded {
        generation: s.generation,
        epoch: s.epoch,
        acked_epoch: s.acked_epoch,
        current,
        lost,
        started,
    })
}
