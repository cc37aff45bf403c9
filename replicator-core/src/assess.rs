//! Churn assessment: will a disk's write rate fit the replication tier before replicating it?
//!
//! As the reference appliance does: sample the disk's cumulative write counters (what iostat and
//! `/proc/diskstats` read) at an interval (20 s), turn consecutive samples into write MB/s, write
//! IOPS and average write size, keep the peak of each window (10 minutes), take a percentile of
//! those peaks (P95) times a comfort factor (1.3, from 1.0 to 2.0), and compare the result with a
//! tier table: per-disk churn limits by average write size, and a per-VM limit, for each tier.
//! The table is data ([`TierTable`], serde) the user can replace; [`TierTable::default`] holds the
//! reference service's published figures.
//!
//! Pure functions over samples: the harness samples a device; tests feed recorded samples.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bytes in a (decimal) megabyte, the unit of the tier table's rates.
pub const MB: f64 = 1_000_000.0;

/// One reading of a disk's cumulative write counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSample {
    /// When it was taken, milliseconds on any monotonic scale.
    pub at_ms: u64,
    /// Write requests completed since the device appeared.
    pub writes: u64,
    /// 512-byte sectors written since the device appeared.
    pub sectors_written: u64,
}

/// The rates between two consecutive samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub start_ms: u64,
    pub end_ms: u64,
    pub write_bytes_per_s: f64,
    pub write_iops: f64,
    /// Average bytes per write request (iostat's wareq-sz); 0 without writes.
    pub avg_write_bytes: f64,
}

/// Rates between consecutive samples. Counters that go backwards (the device was re-attached)
/// or samples out of time order are an error naming the sample.
pub fn intervals(samples: &[DiskSample]) -> Result<Vec<Interval>> {
    let mut out = Vec::with_capacity(samples.len().saturating_sub(1));
    for (i, pair) in samples.windows(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        if b.at_ms <= a.at_ms {
            return Err(Error::InvalidInput(format!(
                "sample {} is not later than sample {i} ({} ms after {} ms)",
                i + 1,
                b.at_ms,
                a.at_ms
            )));
        }
        if b.writes < a.writes || b.sectors_written < a.sectors_written {
            return Err(Error::InvalidInput(format!(
                "the write counters went backwards between samples {i} and {} (the device was \
                 reset or re-attached): start the assessment again",
                i + 1
            )));
        }
        let secs = (b.at_ms - a.at_ms) as f64 / 1000.0;
        let writes = (b.writes - a.writes) as f64;
        let bytes = (b.sectors_written - a.sectors_written) as f64 * 512.0;
        out.push(Interval {
            start_ms: a.at_ms,
            end_ms: b.at_ms,
            write_bytes_per_s: bytes / secs,
            write_iops: writes / secs,
            avg_write_bytes: if writes > 0.0 { bytes / writes } else { 0.0 },
        });
    }
    Ok(out)
}

/// The peaks of one window: each figure's own maximum over the window's intervals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowPeak {
    pub start_ms: u64,
    pub write_bytes_per_s: f64,
    pub write_iops: f64,
    /// The average write size of the interval with the peak throughput.
    pub avg_write_bytes: f64,
}

/// Groups intervals into windows of `window_ms` (by their start, from the first one) and keeps
/// the peak of each.
pub fn window_peaks(intervals: &[Interval], window_ms: u64) -> Vec<WindowPeak> {
    let Some(first) = intervals.first() else {
        return Vec::new();
    };
    let window_ms = window_ms.max(1);
    let mut peaks: Vec<WindowPeak> = Vec::new();
    for iv in intervals {
        let w = (iv.start_ms - first.start_ms) / window_ms;
        let start_ms = first.start_ms + w * window_ms;
        match peaks.last_mut() {
            Some(p) if p.start_ms == start_ms => {
                if iv.write_bytes_per_s > p.write_bytes_per_s {
                    p.write_bytes_per_s = iv.write_bytes_per_s;
                    p.avg_write_bytes = iv.avg_write_bytes;
                }
                p.write_iops = p.write_iops.max(iv.write_iops);
            }
            _ => peaks.push(WindowPeak {
                start_ms,
                write_bytes_per_s: iv.write_bytes_per_s,
                write_iops: iv.write_iops,
                avg_write_bytes: iv.avg_write_bytes,
            }),
        }
    }
    peaks
}

/// The nearest-rank percentile `p` (0 < p <= 100) of `values`; 0 for none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// How to size from samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssessConfig {
    /// Time between samples: 20 s.
    pub interval_ms: u64,
    /// Peak window: 10 minutes.
    pub window_ms: u64,
    /// Percentile of the window peaks: 95.
    pub percentile: f64,
    /// Headroom multiplied in: 1.3 (1.0 to 2.0).
    pub comfort: f64,
}

impl Default for AssessConfig {
    fn default() -> Self {
        AssessConfig {
            interval_ms: 20_000,
            window_ms: 600_000,
            percentile: 95.0,
            comfort: 1.3,
        }
    }
}

impl AssessConfig {
    /// Refuses settings outside their ranges, naming the setting.
    pub fn validate(&self) -> Result<()> {
        if !(1.0..=2.0).contains(&self.comfort) {
            return Err(Error::InvalidInput(format!(
                "comfort factor {} is outside 1.0 to 2.0",
                self.comfort
            )));
        }
        if !(self.percentile > 0.0 && self.percentile <= 100.0) {
            return Err(Error::InvalidInput(format!(
                "percentile {} is outside (0, 100]",
                self.percentile
            )));
        }
        if self.interval_ms == 0 || self.window_ms < self.interval_ms {
            return Err(Error::InvalidInput(format!(
                "the window ({} ms) must be at least one sampling interval ({} ms), which must \
                 not be 0",
                self.window_ms, self.interval_ms
            )));
        }
        Ok(())
    }
}

/// What a disk must be sized for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sizing {
    /// Percentile of the window peaks times the comfort factor.
    pub write_bytes_per_s: f64,
    pub write_iops: f64,
    /// The average write size at the sized percentile (not multiplied).
    pub avg_write_bytes: f64,
    /// Window peaks the percentile was taken over.
    pub windows: usize,
}

/// Sizes a disk from its window peaks.
pub fn size(peaks: &[WindowPeak], cfg: &AssessConfig) -> Sizing {
    let rates: Vec<f64> = peaks.iter().map(|p| p.write_bytes_per_s).collect();
    let iops: Vec<f64> = peaks.iter().map(|p| p.write_iops).collect();
    let rate = percentile(&rates, cfg.percentile);
    // The write size that goes with the chosen throughput peak.
    let avg = peaks
        .iter()
        .find(|p| p.write_bytes_per_s == rate)
        .map_or(0.0, |p| p.avg_write_bytes);
    Sizing {
        write_bytes_per_s: rate * cfg.comfort,
        write_iops: percentile(&iops, cfg.percentile) * cfg.comfort,
        avg_write_bytes: avg,
        windows: peaks.len(),
    }
}

/// One row of a tier: from this average write size up, a disk may churn this much.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TierRow {
    /// Smallest average write size (bytes) the row applies to.
    pub min_write_bytes: u64,
    /// Churn one disk may have, MB/s (10^6 bytes).
    pub disk_mb_per_s: f64,
}

/// A replication tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    /// Rows by ascending `min_write_bytes`; a write size below the first row uses the first.
    pub rows: Vec<TierRow>,
    /// Churn one VM (all its disks) may have, MB/s.
    pub vm_mb_per_s: f64,
}

/// The tiers to compare with, cheapest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TierTable {
    pub tiers: Vec<Tier>,
}

impl Default for TierTable {
    /// The reference service's published churn limits: standard disks (and P10/P15) and premium
    /// P30 and above, per average I/O size; 54 MB/s per VM on standard cache storage, 100 MB/s
    /// with high churn (premium).
    fn default() -> Self {
        let row = |kib: u64, mb: f64| TierRow {
            min_write_bytes: kib * 1024,
            disk_mb_per_s: mb,
        };
        TierTable {
            tiers: vec![
                Tier {
                    name: "standard".into(),
                    rows: vec![row(8, 2.0), row(16, 4.0), row(24, 6.0), row(32, 10.0)],
                    vm_mb_per_s: 54.0,
                },
                Tier {
                    name: "premium".into(),
                    rows: vec![row(8, 20.0), row(16, 35.0), row(24, 50.0)],
                    vm_mb_per_s: 100.0,
                },
            ],
        }
    }
}

impl TierTable {
    /// Refuses an empty table or a tier without rows or with rows out of order, naming it.
    pub fn validate(&self) -> Result<()> {
        if self.tiers.is_empty() {
            return Err(Error::InvalidInput("the tier table has no tiers".into()));
        }
        for t in &self.tiers {
            if t.rows.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "tier {:?} has no rows",
                    t.name
                )));
            }
            if t.rows
                .windows(2)
                .any(|w| w[0].min_write_bytes >= w[1].min_write_bytes)
            {
                return Err(Error::InvalidInput(format!(
                    "tier {:?}: rows must go by strictly increasing min_write_bytes",
                    t.name
                )));
            }
            if t.vm_mb_per_s <= 0.0 || t.rows.iter().any(|r| r.disk_mb_per_s <= 0.0) {
                return Err(Error::InvalidInput(format!(
                    "tier {:?}: every limit must be positive",
                    t.name
                )));
            }
        }
        Ok(())
    }
}

/// How a disk compares with one tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TierFit {
    pub tier: String,
    /// The per-disk limit for the disk's write size, MB/s.
    pub disk_limit_mb_per_s: f64,
    pub vm_limit_mb_per_s: f64,
    /// (limit - need) / limit of the tighter limit: negative when it does not fit.
    pub margin: f64,
    pub fits: bool,
}

/// The verdict for one disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// Fits the first (cheapest) tier.
    Fits { tier: String },
    /// Fits only a more expensive tier.
    FitsOnly { tier: String },
    /// Exceeds every tier: exclude the disk and copy it separately.
    ExceedsAll,
}

/// Compares a disk's sizing with every tier.
pub fn judge(sizing: &Sizing, table: &TierTable) -> (Verdict, Vec<TierFit>) {
    let need = sizing.write_bytes_per_s / MB;
    let fits: Vec<TierFit> = table
        .tiers
        .iter()
        .map(|t| {
            let row = t
                .rows
                .iter()
                .rev()
                .find(|r| sizing.avg_write_bytes >= r.min_write_bytes as f64)
                .or(t.rows.first());
            let disk_limit = row.map_or(0.0, |r| r.disk_mb_per_s);
            let limit = disk_limit.min(t.vm_mb_per_s);
            let margin = if limit > 0.0 {
                (limit - need) / limit
            } else {
                -1.0
            };
            TierFit {
                tier: t.name.clone(),
                disk_limit_mb_per_s: disk_limit,
                vm_limit_mb_per_s: t.vm_mb_per_s,
                margin,
                fits: need <= limit,
            }
        })
        .collect();
    let verdict = match fits.iter().position(|f| f.fits) {
        Some(0) => Verdict::Fits {
            tier: fits[0].tier.clone(),
        },
        Some(i) => Verdict::FitsOnly {
            tier: fits[i].tier.clone(),
        },
        None => Verdict::ExceedsAll,
    };
    (verdict, fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every 20 s of a disk writing `mb_s` MB/s in `kib` KiB writes for `minutes`, with a
    /// one-interval burst of `burst` times that rate every 5 minutes.
    fn recorded(mb_s: f64, kib: f64, minutes: u64, burst: f64) -> Vec<DiskSample> {
        let mut s = DiskSample {
            at_ms: 0,
            writes: 1000,
            sectors_written: 8000,
        };
        let mut out = vec![s];
        for i in 1..=(minutes * 3) {
            let rate = if i % 15 == 0 { mb_s * burst } else { mb_s };
            let bytes = rate * MB * 20.0;
            s.at_ms += 20_000;
            s.sectors_written += (bytes / 512.0) as u64;
            s.writes += (bytes / (kib * 1024.0)) as u64;
            out.push(s);
        }
        out
    }

    #[test]
    fn the_story_mysql_disk_fits_only_on_premium() {
        // 8.3 MB/s of 17 KB writes (iostat: wkB/s 8543, wareq-sz 17), for an hour.
        let samples = recorded(8.3, 17.0, 60, 1.0);
        let iv = intervals(&samples).unwrap();
        assert_eq!(iv.len(), 180);
        assert!((iv[0].write_bytes_per_s / MB - 8.3).abs() < 0.01);
        assert!((iv[0].avg_write_bytes / 1024.0 - 17.0).abs() < 0.05);
        let peaks = window_peaks(&iv, 600_000);
        assert_eq!(peaks.len(), 6);
        let sizing = size(&peaks, &AssessConfig::default());
        assert!((sizing.write_bytes_per_s / MB - 8.3 * 1.3).abs() < 0.05);
        let (verdict, fits) = judge(&sizing, &TierTable::default());
        // 17 KB writes: standard's 16 KB row allows 4 MB/s, premium's 35 MB/s.
        assert_eq!(
            verdict,
            Verdict::FitsOnly {
                tier: "premium".into()
            }
        );
        assert_eq!(fits[0].disk_limit_mb_per_s, 4.0);
        assert!(fits[0].margin < -1.0, "{fits:?}");
        assert!(fits[1].margin > 0.5, "{fits:?}");
    }

    #[test]
    fn bursts_are_sized_by_the_percentile_of_window_peaks() {
        // 1 MB/s of 64 KiB writes with a 30x burst in one interval of every window: each 10-min
        // window's peak is the burst.
        let samples = recorded(1.0, 64.0, 60, 30.0);
        let peaks = window_peaks(&intervals(&samples).unwrap(), 600_000);
        assert!(
            peaks
                .iter()
                .all(|p| (p.write_bytes_per_s / MB - 30.0).abs() < 0.1)
        );
        let cfg = AssessConfig {
            comfort: 1.0,
            ..AssessConfig::default()
        };
        let sizing = size(&peaks, &cfg);
        assert!((sizing.write_bytes_per_s / MB - 30.0).abs() < 0.1);
        // 30 MB/s of 64 KiB writes: over standard (10), under premium (50).
        let (v, _) = judge(&sizing, &TierTable::default());
        assert_eq!(
            v,
            Verdict::FitsOnly {
                tier: "premium".into()
            }
        );
        // A quiet disk fits standard; a very busy one nothing.
        let quiet = size(
            &window_peaks(&intervals(&recorded(0.5, 32.0, 30, 1.0)).unwrap(), 600_000),
            &AssessConfig::default(),
        );
        assert!(matches!(
            judge(&quiet, &TierTable::default()).0,
            Verdict::Fits { .. }
        ));
        let busy = size(
            &window_peaks(&intervals(&recorded(60.0, 64.0, 30, 1.0)).unwrap(), 600_000),
            &AssessConfig::default(),
        );
        assert_eq!(judge(&busy, &TierTable::default()).0, Verdict::ExceedsAll);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&v, 100.0), 20.0);
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        assert_eq!(percentile(&[], 95.0), 0.0);
    }

    #[test]
    fn bad_samples_and_settings_are_named() {
        let a = DiskSample {
            at_ms: 0,
            writes: 10,
            sectors_written: 10,
        };
        let back = DiskSample {
            at_ms: 1000,
            writes: 5,
            sectors_written: 10,
        };
        let err = intervals(&[a, back]).unwrap_err().to_string();
        assert!(
            err.contains("backwards") && err.contains("samples 0 and 1"),
            "{err}"
        );
        let same = DiskSample { at_ms: 0, ..a };
        assert!(
            intervals(&[a, same])
                .unwrap_err()
                .to_string()
                .contains("sample 1")
        );
        let cfg = AssessConfig {
            comfort: 2.5,
            ..AssessConfig::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("comfort"));
        let mut table = TierTable::default();
        table.tiers[1].rows.reverse();
        assert!(
            table
                .validate()
                .unwrap_err()
                .to_string()
                .contains("premium")
        );
        assert!(TierTable::default().validate().is_ok());
        assert!(AssessConfig::default().validate().is_ok());
    }
}
