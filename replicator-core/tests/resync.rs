//! Checksum resync: when tracking is lost, a generation does not match, the target was replaced
//! or restored, or the operator asks, the source compares per-block digests with the target's
//! catalog and ships only the blocks that differ, never a full re-seed.

mod common;

use std::sync::Arc;

use common::{DISK_BYTES, World};
use replicator_core::device::{BlockDevice, MemDevice};
use replicator_core::source::{ShipOutcome, ShipReport};
use replicator_core::tracker::ChangeTracker;
use replicator_sink::Sink;

/// Ships, and when the source waits for the target's catalog, hydrates once (the target answers)
/// and ships again. Returns the shipped report.
async fn ship_through_resync(w: &mut World) -> anyhow::Result<ShipReport> {
    match w.ship_outcome().await? {
        ShipOutcome::Shipped(r) => Ok(r),
        ShipOutcome::AwaitingCatalog { .. } => {
            let h = w.hydrate().await?;
            anyhow::ensure!(h.catalog.is_some(), "the target did not answer: {h:?}");
            w.ship().await
        }
    }
}

async fn seeded(seed: u64) -> anyhow::Result<World> {
    let mut w = World::new(seed)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(20)?;
    w.ship().await?;
    w.hydrate().await?;
    anyhow::ensure!(w.identical());
    Ok(w)
}

#[tokio::test]
async fn lost_tracking_resyncs_only_the_blocks_that_differ() -> anyhow::Result<()> {
    let mut w = seeded(41).await?;
    w.churn(10)?;
    // The tracker's checkpoint is damaged while the source is down: its marks are gone.
    let report = w.reopen_source(|dir| {
        let ckpt = dir.join("tracker/tracker.ckpt");
        let mut bytes = std::fs::read(&ckpt)?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xFF;
        std::fs::write(&ckpt, bytes)?;
        std::fs::remove_file(dir.join("tracker/tracker.al"))?;
        Ok(())
    })?;
    let reason = report.lost.unwrap_or_default();
    assert!(reason.contains("checkpoint"), "{reason}");
    // Before the target answers, nothing is shipped and a request is in the cache.
    let ShipOutcome::AwaitingCatalog { reason, request } = w.ship_outcome().await? else {
        anyhow::bail!("a lost tracker must not ship a delta");
    };
    assert!(reason.contains("tracking was lost"), "{reason}");
    assert_eq!(request, 1);
    // Asking again does not put a second request.
    assert!(matches!(
        w.ship_outcome().await?,
        ShipOutcome::AwaitingCatalog { request: 1, .. }
    ));
    let h = w.hydrate().await?;
    let cat = h.catalog.ok_or_else(|| anyhow::anyhow!("no catalog"))?;
    assert_eq!(cat.answers_request, 1);
    assert_eq!(
        cat.bytes_read, DISK_BYTES,
        "the first catalog reads the target once"
    );
    let r = w.ship().await?;
    let x = r
        .resync
        .clone()
        .ok_or_else(|| anyhow::anyhow!("not a resync"))?;
    assert_eq!(x.bytes_read, DISK_BYTES, "the source reads its disk once");
    assert!(x.blocks_differing > 0, "the churn must show up");
    assert!(
        x.bytes_differing < DISK_BYTES / 4,
        "a partial resync, not a re-seed: {} of {DISK_BYTES} bytes",
        x.bytes_differing
    );
    let h = w.hydrate().await?;
    assert!(h.failed.is_none(), "{:?}", h.failed);
    assert!(w.identical());
    // Tracking is trusted again: the next delta is an ordinary one.
    w.churn(5)?;
    let r = w.ship().await?;
    assert!(r.resync.is_none());
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn operator_resync_repairs_a_target_changed_behind_our_back() -> anyhow::Result<()> {
    let mut w = seeded(42).await?;
    // Someone writes to the target disk directly: no cycle knows of it.
    w.tgt_disk.write_at(&[0xEE; 4096], 3 << 20)?;
    w.tgt_disk.write_at(&[0xDD; 512], 5 << 20)?;
    assert!(!w.identical());
    w.source.request_resync("requested by the operator")?;
    let r = ship_through_resync(&mut w).await?;
    let x = r.resync.ok_or_else(|| anyhow::anyhow!("not a resync"))?;
    // The target's kept catalog does not know of writes outside cycles, so it is rebuilt only if
    // asked to verify; here it was built fresh by the first request, so both blocks differ.
    assert_eq!(x.blocks_differing, 2, "{x:?}");
    assert_eq!(x.bytes_differing, 2 * 65536);
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn writes_outside_cycles_need_a_reread_catalog() -> anyhow::Result<()> {
    let mut w = seeded(48).await?;
    w.source.request_resync("first")?;
    ship_through_resync(&mut w).await?;
    w.hydrate().await?;
    // Written behind replication's back after the catalog was made: the kept catalog cannot
    // know, so a resync from it finds nothing; a catalog read anew finds the block.
    w.tgt_disk.write_at(&[0xAB; 4096], 1 << 20)?;
    w.source.request_resync("trusting the kept catalog")?;
    let r = ship_through_resync(&mut w).await?;
    assert_eq!(r.resync.map(|x| x.blocks_differing), Some(0));
    w.hydrate().await?;
    assert!(!w.identical());
    w.source.request_resync("verify the target")?;
    let ShipOutcome::AwaitingCatalog { .. } = w.ship_outcome().await? else {
        anyhow::bail!("expected a request");
    };
    let target = w
        .target
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no target"))?;
    let cfg = replicator_core::target::HydrateConfig {
        catalog_reread: true,
        ..Default::default()
    };
    let h = replicator_core::target::hydrate(
        target,
        w.sink.as_ref(),
        &w.key,
        &w.clock,
        &cfg,
        &replicator_core::progress::NoProgress,
    )
    .await?;
    assert_eq!(h.catalog.map(|c| c.bytes_read), Some(DISK_BYTES));
    let r = w.ship().await?;
    assert_eq!(r.resync.map(|x| x.blocks_differing), Some(1));
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn the_kept_catalog_reads_only_blocks_written_since() -> anyhow::Result<()> {
    let mut w = seeded(43).await?;
    w.source.request_resync("first")?;
    ship_through_resync(&mut w).await?;
    w.hydrate().await?;
    // A few small deltas, then another resync: the target reads only the blocks those touched.
    for _ in 0..2 {
        w.churn(3)?;
        w.ship().await?;
        w.hydrate().await?;
    }
    w.source.request_resync("second")?;
    let ShipOutcome::AwaitingCatalog { .. } = w.ship_outcome().await? else {
        anyhow::bail!("expected a request");
    };
    let h = w.hydrate().await?;
    let cat = h.catalog.ok_or_else(|| anyhow::anyhow!("no catalog"))?;
    assert!(
        cat.bytes_read > 0 && cat.bytes_read < DISK_BYTES / 2,
        "refresh read {} bytes",
        cat.bytes_read
    );
    let r = w.ship().await?;
    let x = r.resync.ok_or_else(|| anyhow::anyhow!("not a resync"))?;
    assert_eq!(x.blocks_differing, 0, "nothing differs: {x:?}");
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_replaced_target_is_resynced_not_reseeded() -> anyhow::Result<()> {
    let mut w = seeded(44).await?;
    // Enough cycles that the initial copy was collected: a blank target cannot replay the chain.
    for _ in 0..2 {
        w.churn(4)?;
        w.ship().await?;
        w.hydrate().await?;
    }
    w.churn(10)?;
    w.ship().await?;
    // The target is replaced by a blank disk with a new state: it cannot apply anything.
    let fresh = w.dir.path().join("tgt-state-2");
    w.replace_target(&fresh, Arc::new(MemDevice::new("target2", DISK_BYTES)))?;
    let h = w.hydrate().await?;
    assert!(h.applied.is_empty());
    let cat = h
        .catalog
        .ok_or_else(|| anyhow::anyhow!("a stuck target must send its catalog unasked"))?;
    assert_eq!((cat.answers_request, cat.committed_cycle), (0, 0));
    // Sent once per committed cycle, not at every hydrate.
    assert!(w.hydrate().await?.catalog.is_none());
    let r = w.ship().await?;
    let x = r.resync.ok_or_else(|| anyhow::anyhow!("not a resync"))?;
    assert!(x.reason.contains("replaced"), "{}", x.reason);
    assert_eq!(r.base_cycle, 0);
    assert_eq!(x.superseded, vec![5], "the unapplied delta is replaced");
    // Zero blocks match a blank disk's digests: only the data is shipped.
    assert!(x.bytes_differing < DISK_BYTES, "{x:?}");
    let h = w.hydrate().await?;
    assert!(h.failed.is_none(), "{:?}", h.failed);
    assert!(w.identical());
    w.churn(5)?;
    w.ship().await?;
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_restored_target_is_resynced_from_where_it_is() -> anyhow::Result<()> {
    let mut w = seeded(45).await?;
    // Back up the target (disk and state) at cycle 2.
    let backup_state = w.dir.path().join("tgt-backup");
    copy_dir(&w.dir.path().join("tgt-state"), &backup_state)?;
    let backup_disk = w.tgt_disk.snapshot();
    for _ in 0..4 {
        w.churn(4)?;
        w.ship().await?;
        w.hydrate().await?;
    }
    assert!(w.identical());
    // Restore it: disk and state as of cycle 2. The cycles after 2 were collected.
    let restored = Arc::new(MemDevice::new("restored", DISK_BYTES));
    restored.write_at(&backup_disk, 0)?;
    w.replace_target(&backup_state, restored)?;
    w.churn(2)?;
    w.ship().await?;
    let r = ship_through_resync_stuck(&mut w).await?;
    let x = r.resync.ok_or_else(|| anyhow::anyhow!("not a resync"))?;
    assert!(
        x.reason.contains("restored") || x.reason.contains("cannot apply"),
        "{}",
        x.reason
    );
    assert_eq!(r.base_cycle, 2);
    assert!(x.bytes_differing < DISK_BYTES / 2, "{x:?}");
    let h = w.hydrate().await?;
    assert!(h.failed.is_none(), "{:?}", h.failed);
    assert!(w.identical());
    Ok(())
}

/// Hydrates (the stuck target sends its catalog unasked), then ships.
async fn ship_through_resync_stuck(w: &mut World) -> anyhow::Result<ShipReport> {
    let h = w.hydrate().await?;
    anyhow::ensure!(
        h.catalog.is_some(),
        "the stuck target sent no catalog: {h:?}"
    );
    w.ship().await
}

#[tokio::test]
async fn tracker_state_of_another_generation_forces_a_resync() -> anyhow::Result<()> {
    let mut w = seeded(46).await?;
    w.churn(6)?;
    // The tracker's state is swapped for a fresh one (as if it came from another disk).
    let report = w.reopen_source(|dir| {
        std::fs::remove_dir_all(dir.join("tracker"))?;
        Ok(())
    })?;
    let reason = report.lost.unwrap_or_default();
    assert!(reason.contains("generation"), "{reason}");
    let r = ship_through_resync(&mut w).await?;
    assert!(r.resync.is_some());
    w.hydrate().await?;
    assert!(
        w.identical(),
        "the churn the fresh tracker never saw is shipped"
    );
    Ok(())
}

#[tokio::test]
async fn a_generation_change_in_acknowledgements_is_reported() -> anyhow::Result<()> {
    let mut w = seeded(47).await?;
    w.churn(4)?;
    w.ship().await?;
    // The target state is made anew at the same cycle, with the same disk: another generation.
    let state = w.dir.path().join("tgt-state");
    w.target = None;
    let path = state.join("target.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    json["generation"] = serde_json::Value::String("ab".repeat(16));
    std::fs::write(&path, serde_json::to_vec(&json)?)?;
    let disk = Arc::clone(&w.tgt_disk);
    w.replace_target(&state, disk)?;
    w.hydrate().await?;
    let outcome = w.ship_outcome().await?;
    let ShipOutcome::AwaitingCatalog { reason, .. } = outcome else {
        anyhow::bail!("a new target generation must force a resync: {outcome:?}");
    };
    assert!(reason.contains("generation changed"), "{reason}");
    w.hydrate().await?;
    w.ship().await?;
    w.hydrate().await?;
    assert!(w.identical());
    let _ = w.source.tracker().current()?;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dst)?;
        } else if entry.file_name() != "lock" && entry.file_name() != ".lock" {
            std::fs::copy(entry.path(), dst)?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_cycle_the_cache_lost_is_healed_by_a_resync_not_a_stall() -> anyhow::Result<()> {
    let mut w = seeded(49).await?;
    // A delta is shipped, then the cache loses it (rolled back) before the target applied it.
    w.churn(6)?;
    let lost = w.ship().await?;
    let disk = w.source.disk_id();
    for key in w.blob_keys(lost.cycle).await? {
        w.sink.delete(&key).await?;
    }
    w.sink
        .delete(&replicator_core::layout::manifest_key(&disk, lost.cycle))
        .await?;
    // The source chains the next delta on the lost one; the target can apply neither.
    w.churn(3)?;
    let next = w.ship().await?;
    assert_eq!(next.base_cycle, lost.cycle);
    let h = w.hydrate().await?;
    assert!(h.applied.is_empty(), "{h:?}");
    let cat = h
        .catalog
        .ok_or_else(|| anyhow::anyhow!("a stuck target must say so with its catalog"))?;
    assert_eq!(cat.answers_request, 0);
    let r = w.ship().await?;
    let x = r.resync.ok_or_else(|| anyhow::anyhow!("not a resync"))?;
    assert!(x.reason.contains("cannot apply"), "{}", x.reason);
    assert_eq!(x.superseded, vec![lost.cycle, next.cycle]);
    assert!(x.bytes_differing < DISK_BYTES / 2, "{x:?}");
    let h = w.hydrate().await?;
    assert!(h.failed.is_none(), "{:?}", h.failed);
    assert!(w.identical());
    Ok(())
}
