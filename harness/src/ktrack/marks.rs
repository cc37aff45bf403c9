//! The marks of a tracked device in epochs, and how trace lines, freezes, releases and lost
//! tracking change them. Pure state: the daemon holds it under a lock, drains before it freezes,
//! and persists it.

use std::path::Path;

use replicator_core::bitmap::SectorBitmap;

use super::parse::TraceLine;
use super::proto::ErrorKind;

/// The epoch a cycle froze, owned by the connection that froze it.
#[derive(Debug)]
pub(super) struct FrozenEpoch {
    pub(super) epoch: u64,
    pub(super) bitmap: SectorBitmap,
    pub(super) lost: bool,
    pub(super) owner: u64,
}

/// The current epoch's marks, the frozen epoch, and whether tracking is lost; with the reader's
/// progress (markers seen, failure) and counts for status.
#[derive(Debug)]
pub(super) struct Marks {
    pub(super) epoch: u64,
    pub(super) current: SectorBitmap,
    pub(super) frozen: Option<FrozenEpoch>,
    pub(super) lost: Option<String>,
    /// Tracking was lost after the frozen epoch was frozen: its release cannot clear the loss.
    pub(super) lost_while_frozen: bool,
    pub(super) acked_epoch: u64,
    pub(super) seen_marker: u64,
    pub(super) reader_failed: Option<String>,
    pub(super) lost_events_seen: u64,
    pub(super) change_events: u64,
    pub(super) dirty: bool,
    /// Whether the last persisted state said lost: a new loss is persisted at once.
    pub(super) persisted_lost: bool,
}

impl Marks {
    pub(super) fn set_lost(&mut self, reason: String) {
        if self.lost.is_none() {
            tracing::warn!(%reason, "tracking lost: the whole disk is marked");
        } else {
            tracing::debug!(%reason, "tracking lost again");
        }
        if self.frozen.is_some() {
            self.lost_while_frozen = true;
        }
        self.current = SectorBitmap::full(self.current.disk_sectors());
        self.dirty = true;
        if self.lost.is_none() {
            self.lost = Some(reason);
        }
    }

    /// Applies one trace line of device `major:minor` (markers are the reader's business).
    pub(super) fn apply(&mut self, line: &TraceLine, dev: (u32, u32), dev_path: &Path) {
        match line {
            TraceLine::Change {
                major,
                minor,
                start_sector,
                sector_count,
            } => {
                if (*major, *minor) == dev {
                    self.mark(*start_sector, *sector_count);
                }
            }
            TraceLine::Lost(n) => self.set_lost(format!(
                "the kernel overwrote {n} block events of {} before they were read ([LOST {n} \
                 EVENTS] in the trace); raise --buffer-kb or lower the write rate",
                dev_path.display()
            )),
            TraceLine::Malformed(l) => self.set_lost(format!(
                "a block event line could not be parsed, so its range is unknown: {}",
                l.trim()
            )),
            TraceLine::Marker(_) | TraceLine::NoChange | TraceLine::Other => {}
        }
    }

    /// Freezes the current epoch for connection `conn`: (epoch, lost reason, marks).
    pub(super) fn freeze(
        &mut self,
        conn: u64,
    ) -> Result<(u64, Option<String>, SectorBitmap), ReqError> {
        if let Some(f) = &self.frozen {
            return Err(invalid(format!(
                "epoch {} is already frozen by another cycle; wait for it to end",
                f.epoch
            )));
        }
        let sectors = self.current.disk_sectors();
        if self.lost.is_some() {
            self.current = SectorBitmap::full(sectors);
        }
        let bitmap = std::mem::replace(&mut self.current, SectorBitmap::new(sectors));
        let epoch = self.epoch;
        self.epoch += 1;
        self.lost_while_frozen = false;
        self.frozen = Some(FrozenEpoch {
            epoch,
            bitmap: bitmap.clone(),
            lost: self.lost.is_some(),
            owner: conn,
        });
        self.dirty = true;
        Ok((epoch, self.lost.clone(), bitmap))
    }

    fn mark(&mut self, start_sector: u64, sector_count: u64) {
        let disk = self.current.disk_sectors();
        self.change_events += 1;
        self.dirty = true;
        if start_sector >= disk {
            return;
        }
        let n = sector_count.min(disk - start_sector);
        if let Err(e) = self.current.mark_sectors(start_sector, n) {
            self.set_lost(format!(
                "sectors {start_sector}+{n} could not be marked: {e}"
            ));
        }
    }
}

/// A request's failure, as the protocol reports it.
#[derive(Debug)]
pub(super) struct ReqError {
    pub(super) kind: ErrorKind,
    pub(super) message: String,
}

pub(super) fn invalid(message: impl Into<String>) -> ReqError {
    ReqError {
        kind: ErrorKind::Invalid,
        message: message.into(),
    }
}

pub(super) fn io_err(e: anyhow::Error) -> ReqError {
    ReqError {
        kind: ErrorKind::Io,
        message: format!("{e:#}"),
    }
}

/// Ends the frozen epoch of `conn`. Returns the epoch and whether the loss was cleared.
pub(super) fn release_marks(
    m: &mut Marks,
    conn: u64,
    committed: bool,
) -> Result<Option<(u64, bool)>, ReqError> {
    let Some(f) = m.frozen.take() else {
        return Ok(None);
    };
    if f.owner != conn {
        let epoch = f.epoch;
        m.frozen = Some(f);
        return Err(invalid(format!(
            "epoch {epoch} was frozen by another connection; only its cycle may release it"
        )));
    }
    let mut cleared = false;
    if !committed {
        m.current.union_with(&f.bitmap).map_err(|e| {
            invalid(format!(
                "the frozen bitmap does not fit the current one: {e}"
            ))
        })?;
    } else if f.lost && !m.lost_while_frozen && m.lost.is_some() {
        // The cycle that saw the loss compared the whole disk.
        m.lost = None;
        cleared = true;
    }
    m.lost_while_frozen = false;
    m.dirty = true;
    Ok(Some((f.epoch, cleared)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ktrack::parse::parse_line;

    const DEV: (u32, u32) = (7, 0);

    fn marks(sectors: u64) -> Marks {
        Marks {
            epoch: 1,
            current: SectorBitmap::new(sectors),
            frozen: None,
            lost: None,
            lost_while_frozen: false,
            acked_epoch: 0,
            seen_marker: 0,
            reader_failed: None,
            lost_events_seen: 0,
            change_events: 0,
            dirty: false,
            persisted_lost: false,
        }
    }

    fn apply(m: &mut Marks, line: &str) {
        m.apply(&parse_line(line), DEV, Path::new("/dev/loop0"));
    }

    fn sectors(b: &SectorBitmap) -> Vec<(u64, u64)> {
        b.extents()
            .map(|e| (e.start_sector, e.sector_count))
            .collect()
    }

    #[test]
    fn a_write_queued_before_a_freeze_and_completed_after_it_is_in_the_next_epoch_too()
    -> Result<(), String> {
        let mut m = marks(2048);
        apply(
            &mut m,
            "  dd-21656 [001] ..... 9921.907373: block_bio_queue: 7,0 WS 80 + 8 [dd]",
        );
        // Not changes: a read, a flush, another device.
        apply(
            &mut m,
            "  dd-1 [001] ..... 9921.9: block_bio_queue: 7,0 RS 200 + 8 [dd]",
        );
        apply(
            &mut m,
            "  fs-1 [001] ..... 9921.9: block_bio_queue: 7,0 FWS 0 + 0 [fs]",
        );
        apply(
            &mut m,
            "  dd-1 [001] ..... 9921.9: block_bio_queue: 7,1 WS 300 + 8 [dd]",
        );
        // The drain reached the freeze's marker here.
        let (epoch, lost, frozen) = m.freeze(1).map_err(|e| e.message)?;
        assert_eq!((epoch, lost), (1, None));
        assert_eq!(sectors(&frozen), vec![(80, 8)]);
        // The write completes after the freeze, maybe after the cycle read sector 80.
        apply(
            &mut m,
            "  ksoftirqd/1-22 [001] ..s.. 9921.916158: block_rq_complete: 7,0 WS () 80 + 8 be,0,4 [0]",
        );
        release_marks(&mut m, 1, true).map_err(|e| e.message)?;
        assert_eq!(
            sectors(&m.current),
            vec![(80, 8)],
            "the completion ships sector 80 again in the next cycle"
        );
        let (epoch, _, next) = m.freeze(2).map_err(|e| e.message)?;
        assert_eq!((epoch, sectors(&next)), (2, vec![(80, 8)]));
        Ok(())
    }

    #[test]
    fn lost_tracking_is_reported_by_freezes_until_a_committed_cycle_compared_the_disk()
    -> Result<(), String> {
        let mut m = marks(4096);
        apply(&mut m, "CPU:1 [LOST 3920 EVENTS]");
        let (_, lost, frozen) = m.freeze(1).map_err(|e| e.message)?;
        let reason = lost.ok_or("the freeze must report the loss")?;
        assert!(
            reason.contains("3920") && reason.contains("--buffer-kb"),
            "{reason}"
        );
        assert_eq!(frozen.count(), 4096, "the whole disk");
        // A failed cycle clears nothing.
        release_marks(&mut m, 1, false).map_err(|e| e.message)?;
        let (_, lost, frozen) = m.freeze(1).map_err(|e| e.message)?;
        assert!(lost.is_some() && frozen.count() == 4096);
        // Lost again while that cycle runs: its commit cannot vouch for what came after it.
        apply(
            &mut m,
            "  dd-1 [000] ..... 1.5: block_bio_queue: 7,0 WS 77 + [dd]",
        );
        release_marks(&mut m, 1, true).map_err(|e| e.message)?;
        assert!(m.lost.is_some(), "a loss after the freeze stays");
        let (_, lost, _) = m.freeze(1).map_err(|e| e.message)?;
        assert!(lost.is_some());
        release_marks(&mut m, 1, true).map_err(|e| e.message)?;
        assert!(
            m.lost.is_none(),
            "a committed cycle frozen while lost clears it"
        );
        apply(
            &mut m,
            "  dd-1 [000] ..... 1.6: block_bio_complete: 7,0 WS 16 + 16 [0]",
        );
        let (_, lost, frozen) = m.freeze(1).map_err(|e| e.message)?;
        assert_eq!((lost, sectors(&frozen)), (None, vec![(16, 16)]));
        Ok(())
    }

    #[test]
    fn only_the_freezing_connection_releases_and_a_second_freeze_waits() -> Result<(), String> {
        let mut m = marks(64);
        apply(
            &mut m,
            "  dd-1 [000] ..... 1.5: block_bio_queue: 7,0 DS 8 + 8 [blkdiscard]",
        );
        m.freeze(1).map_err(|e| e.message)?;
        assert!(m.freeze(2).is_err());
        assert!(release_marks(&mut m, 2, false).is_err());
        assert!(m.frozen.is_some());
        assert_eq!(
            release_marks(&mut m, 1, false).map_err(|e| e.message)?,
            Some((1, false))
        );
        assert_eq!(
            sectors(&m.current),
            vec![(8, 8)],
            "a failed cycle's marks go back"
        );
        Ok(())
    }
}
