//! End-to-end cycles: a source shipped through a local cache into a target, with the failures
//! the design must survive. Every test checks the exact failure and that the next cycle heals it.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{DISK_BYTES, FailingDevice, World};
use replicator_core::ErrorKind;
use replicator_core::device::{BlockDevice, MemDevice};
use replicator_core::format::FormatError;
use replicator_core::keys::MasterKey;
use replicator_core::progress::NoProgress;
use replicator_core::target::{HydrateConfig, Target, hydrate};
use replicator_core::tracker::ChangeTracker;
use replicator_core::{Error, layout};
use replicator_sink::wrap::{Fault, OpKind};
use replicator_sink::{PutMode, Sink};

#[tokio::test]
async fn clean_multi_cycle_run_ends_identical() -> anyhow::Result<()> {
    let mut w = World::new(1)?;
    let first = w.ship().await?;
    assert!(first.initial);
    assert_eq!(
        first.changed_sectors,
        DISK_BYTES / 512,
        "the initial copy covers the whole disk"
    );
    assert!(first.zero_bytes > 0, "zero regions ship without data");
    let r = w.hydrate().await?;
    assert_eq!(r.applied.len(), 1);
    assert!(w.identical());
    for round in 0..5 {
        w.churn(40)?;
        let shipped = w.ship().await?;
        assert!(!shipped.initial);
        assert!(shipped.changed_sectors > 0 && shipped.changed_sectors < DISK_BYTES / 512 / 2);
        let r = w.hydrate().await?;
        assert!(r.failed.is_none(), "round {round}: {:?}", r.failed);
        assert_eq!(r.applied.len(), 1);
        assert_eq!(
            r.applied[0].sectors_written, shipped.changed_sectors,
            "reconciled sector count"
        );
        assert!(w.identical(), "round {round}: target differs from source");
    }
    Ok(())
}

/// Flips one byte in the middle of a stored object.
fn flip_byte(path: &std::path::Path) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(path, bytes)?;
    Ok(())
}

#[tokio::test]
async fn flipped_byte_in_a_blob_fails_the_cycle_writes_nothing_then_heals() -> anyhow::Result<()> {
    let mut w = World::new(2)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(60)?;
    let shipped = w.ship().await?;
    let blobs = w.blob_keys(shipped.cycle).await?;
    assert!(blobs.len() >= 2, "want several blobs, got {}", blobs.len());
    let victim = blobs[blobs.len() - 1].clone();
    flip_byte(&w.cache_path().join(&victim))?;
    let before = w.tgt_disk.snapshot();

    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("a corrupt blob was accepted"))?;
    assert_eq!(failed.cycle, shipped.cycle);
    let msg = failed.error.to_string();
    assert!(msg.contains(&victim), "the error names the blob: {msg}");
    assert!(
        matches!(
            &failed.error,
            Error::Object {
                source: FormatError::AuthenticationFailed,
                ..
            }
        ) || matches!(&failed.error, Error::Reconcile(_)),
        "{msg}"
    );
    assert_eq!(
        r.committed_cycle,
        shipped.cycle - 1,
        "committed cycle did not move"
    );
    assert!(
        w.tgt_disk.snapshot() == before,
        "nothing of the failed cycle was written"
    );

    // The source learns of the failure and carries the sectors into its next cycle.
    w.churn(5)?;
    let healed = w.ship().await?;
    assert_eq!(healed.carried_from_failed, vec![shipped.cycle]);
    assert_eq!(
        healed.base_cycle,
        shipped.cycle - 1,
        "the new cycle applies on the last good one"
    );
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert_eq!(r.committed_cycle, healed.cycle);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn deleted_blob_fails_reconciliation_then_heals() -> anyhow::Result<()> {
    let mut w = World::new(3)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(60)?;
    let shipped = w.ship().await?;
    let blobs = w.blob_keys(shipped.cycle).await?;
    w.sink.delete(&blobs[0]).await?;
    let before = w.tgt_disk.snapshot();
    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("a missing blob went unnoticed"))?;
    let Error::Reconcile(rf) = &failed.error else {
        anyhow::bail!("expected a reconciliation failure, got {}", failed.error);
    };
    assert_eq!(rf.stage, "before writing");
    assert!(rf.missing_sectors > 0 && rf.extra_sectors == 0);
    assert!(
        rf.cause.contains(&blobs[0]) && rf.cause.contains("not found"),
        "{}",
        rf.cause
    );
    assert!(w.tgt_disk.snapshot() == before, "nothing was written");
    assert_eq!(failed.error.kind(), ErrorKind::CycleFailed);

    w.ship().await?;
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}

/// Replaces the object at `dst` with the bytes of `src_bytes`, then checks hydration rejects it
/// without writing, and that the next cycle heals.
async fn expect_rejected(
    w: &mut World,
    dst: &str,
    src_bytes: Bytes,
    why: &str,
) -> anyhow::Result<()> {
    w.sink.put(dst, src_bytes, PutMode::Overwrite).await?;
    let before = w.tgt_disk.snapshot();
    let committed = w.target.as_ref().map(|t| t.state().committed_cycle);
    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("{why}: the substituted blob was accepted"))?;
    let msg = failed.error.to_string();
    assert!(
        msg.contains("misplaced") || msg.contains("authentication failed"),
        "{why}: {msg}"
    );
    assert!(w.tgt_disk.snapshot() == before, "{why}: bytes were written");
    assert_eq!(Some(r.committed_cycle), committed, "{why}");
    w.ship().await?;
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{why}: {:?}", r.failed);
    assert!(w.identical(), "{why}");
    Ok(())
}

#[tokio::test]
async fn blobs_moved_to_another_position_cycle_or_disk_are_rejected() -> anyhow::Result<()> {
    let mut w = World::new(4)?;
    let initial = w.ship().await?;
    let old_blobs = w.blob_keys(initial.cycle).await?;
    let old_blob = w.sink.get(&old_blobs[0]).await?;
    w.hydrate().await?;

    // Another position in the same cycle.
    w.churn(60)?;
    let c = w.ship().await?;
    let blobs = w.blob_keys(c.cycle).await?;
    let other = w.sink.get(&blobs[1]).await?;
    expect_rejected(&mut w, &blobs[0], other, "swapped position").await?;

    // The same position, replayed from an older cycle.
    w.churn(60)?;
    let c = w.ship().await?;
    let blobs = w.blob_keys(c.cycle).await?;
    expect_rejected(
        &mut w,
        &blobs[0],
        old_blob,
        "replayed from the initial cycle",
    )
    .await?;

    // A blob of another disk replicated with the same master key.
    let mut other_world = World::new(5)?;
    let foreign = other_world.ship().await?;
    let foreign_blobs = other_world.blob_keys(foreign.cycle).await?;
    let foreign_blob = other_world.sink.get(&foreign_blobs[0]).await?;
    w.churn(60)?;
    let c = w.ship().await?;
    let blobs = w.blob_keys(c.cycle).await?;
    expect_rejected(&mut w, &blobs[0], foreign_blob, "from another disk").await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_key_gets_a_clear_error_and_changes_nothing() -> anyhow::Result<()> {
    let mut w = World::new(6)?;
    w.ship().await?;
    let target = w
        .target
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no target"))?;
    let wrong = MasterKey::from_bytes([8u8; 32]);
    let err = hydrate(
        target,
        w.sink.as_ref(),
        &wrong,
        &w.clock,
        &HydrateConfig::default(),
        &NoProgress,
    )
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("hydrate with a wrong key succeeded"))?;
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(
        msg.contains("wrong key") && msg.contains("key file"),
        "{msg}"
    );
    assert_eq!(target.state().committed_cycle, 0);
    assert!(
        target.state().failed_cycles.is_empty(),
        "a wrong key must not fail the cycle"
    );
    assert!(
        w.sink
            .list(&layout::acks_prefix(&w.source.disk_id()))
            .await?
            .is_empty(),
        "no acknowledgement written"
    );
    // With the right key it applies.
    let r = w.hydrate().await?;
    assert_eq!(r.applied.len(), 1);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_crash_in_the_middle_of_hydration_then_a_rerun_converges() -> anyhow::Result<()> {
    let mut w = World::new(7)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(80)?;
    let shipped = w.ship().await?;
    let state_dir = w.dir.path().join("tgt-state");
    let disk = w.source.disk_id();

    // The target "crashes" after writing part of the cycle.
    drop(w.target.take());
    let failing = Arc::new(FailingDevice::new(
        Arc::clone(&w.tgt_disk),
        (shipped.changed_bytes() / 3) as i64,
    ));
    {
        let mut crashed = Target::open(&state_dir, Arc::clone(&failing), disk)?;
        let err = hydrate(
            &mut crashed,
            w.sink.as_ref(),
            &w.key,
            &w.clock,
            &HydrateConfig::default(),
            &NoProgress,
        )
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the failing device did not fail"))?;
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        assert_eq!(
            crashed.state().applying_cycle,
            Some(shipped.cycle),
            "marked as partly applied"
        );
        assert_eq!(crashed.state().committed_cycle, shipped.cycle - 1);
    }
    assert!(!w.identical(), "the crash left the target half-written");

    // Restart with a healthy device: the cycle is re-applied from the cache.
    let mut restarted = Target::open(&state_dir, Arc::clone(&w.tgt_disk), disk)?;
    let r = hydrate(
        &mut restarted,
        w.sink.as_ref(),
        &w.key,
        &w.clock,
        &HydrateConfig::default(),
        &NoProgress,
    )
    .await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert_eq!(r.committed_cycle, shipped.cycle);
    assert_eq!(restarted.state().applying_cycle, None);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_lost_acknowledgement_is_written_again_on_the_next_run() -> anyhow::Result<()> {
    let mut w = World::new(8)?;
    w.ship().await?;
    // The ack put fails after the cycle committed (a crash between commit and ack).
    w.fault(OpKind::Put, Fault::Transient, "/acks/", 1)?;
    let err = w
        .hydrate()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("ack fault not seen"))?;
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(
        w.target.as_ref().map(|t| t.state().committed_cycle),
        Some(1)
    );
    assert_eq!(
        w.target.as_ref().map(|t| t.state().committed_acked),
        Some(false)
    );
    let r = w.hydrate().await?;
    assert!(
        r.applied.is_empty(),
        "the committed cycle is not applied twice"
    );
    assert_eq!(
        w.target.as_ref().map(|t| t.state().committed_acked),
        Some(true)
    );
    let next = w.ship().await?;
    assert_eq!(next.acked, vec![1], "the source saw the acknowledgement");
    Ok(())
}

#[tokio::test]
async fn a_failed_ship_keeps_its_sectors_for_the_next_cycle() -> anyhow::Result<()> {
    let mut w = World::new(9)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(50)?;
    let marked = w.source.tracker().current()?.count();
    w.fault(OpKind::Put, Fault::Transient, "/manifests/", 1)?;
    let err = w
        .ship()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("manifest fault not seen"))?;
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(
        w.source.tracker().current()?.count(),
        marked,
        "sectors went back to the tracker"
    );
    assert!(w.source.state().in_flight.is_none());
    let r = w.hydrate().await?;
    assert!(r.applied.is_empty(), "no manifest, no cycle");
    let shipped = w.ship().await?;
    assert_eq!(shipped.changed_sectors, marked);
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn target_of_another_size_is_refused_before_writing() -> anyhow::Result<()> {
    let mut w = World::new(10)?;
    w.ship().await?;
    let small = Arc::new(MemDevice::new("small", DISK_BYTES / 2));
    let dir = tempfile::tempdir()?;
    let mut t = Target::open(dir.path(), Arc::clone(&small), w.source.disk_id())?;
    let err = hydrate(
        &mut t,
        w.sink.as_ref(),
        &w.key,
        &w.clock,
        &HydrateConfig::default(),
        &NoProgress,
    )
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("size mismatch accepted"))?;
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("bytes"), "{err}");
    assert!(small.snapshot().iter().all(|&b| b == 0));
    Ok(())
}

#[tokio::test]
async fn sectors_reach_the_target_only_through_verified_blobs() -> anyhow::Result<()> {
    // A tampered manifest (its bytes flipped) fails the cycle without writing.
    let mut w = World::new(11)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(20)?;
    let shipped = w.ship().await?;
    let key = layout::manifest_key(&w.source.disk_id(), shipped.cycle);
    flip_byte(&w.cache_path().join(&key))?;
    let before = w.tgt_disk.snapshot();
    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("tampered manifest accepted"))?;
    assert!(failed.error.to_string().contains(&key), "{}", failed.error);
    assert!(w.tgt_disk.snapshot() == before);
    w.ship().await?;
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_source_restart_loses_no_mark() -> anyhow::Result<()> {
    let mut w = World::new(12)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(30)?;
    let marked = w.source.tracker().current()?;
    // Reopen the source state as after a crash: the tracker was never checkpointed after the
    // writes, so its activity log must bring the marks back.
    let dir = w.dir.path().join("src-state");
    let src_disk = Arc::clone(&w.src_disk);
    let tmp_disk = Arc::new(MemDevice::new("placeholder", DISK_BYTES));
    let (placeholder, _) = {
        let other = tempfile::tempdir()?;
        replicator_core::source::Source::open(other.path(), tmp_disk, Default::default())?
    };
    let old = std::mem::replace(&mut w.source, placeholder);
    drop(old);
    let (reopened, report) =
        replicator_core::source::Source::open(&dir, src_disk, Default::default())?;
    assert!(
        report.unclean,
        "the activity log shows writes after the last checkpoint"
    );
    let mut missing = marked.clone();
    missing.difference_with(&reopened.tracker().current()?)?;
    assert!(
        missing.is_empty(),
        "{} marked sectors lost in the restart",
        missing.count()
    );
    w.source = reopened;
    w.ship().await?;
    let r = w.hydrate().await?;
    assert!(r.failed.is_none());
    assert!(w.identical());
    let _ = w.src_disk.size_bytes();
    Ok(())
}

#[tokio::test]
async fn a_cycle_too_large_to_stage_is_fetched_again_and_verified_again() -> anyhow::Result<()> {
    let mut w = World::new(13)?;
    w.ship().await?;
    let cfg = HydrateConfig {
        staging_bytes_max: 0,
        ..HydrateConfig::default()
    };
    let target = w
        .target
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("no target"))?;
    let r = hydrate(target, w.sink.as_ref(), &w.key, &w.clock, &cfg, &NoProgress).await?;
    assert_eq!(r.applied.len(), 1);
    let staging = w.dir.path().join("tgt-state").join("staging");
    let staged = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(staged, 0, "nothing staged locally");
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_source_crash_after_the_manifest_before_its_state_is_saved_is_settled()
-> anyhow::Result<()> {
    let mut w = World::new(14)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(30)?;
    let shipped = w.ship().await?;
    // Rewind source.json to what it held while the cycle was in flight: the manifest is in the
    // cache but the state never recorded the cycle as shipped.
    let state_dir = w.dir.path().join("src-state");
    let other = tempfile::tempdir()?;
    let (placeholder, _) = replicator_core::source::Source::open(
        other.path(),
        Arc::new(MemDevice::new("placeholder", DISK_BYTES)),
        Default::default(),
    )?;
    drop(std::mem::replace(&mut w.source, placeholder));
    let path = state_dir.join("source.json");
    let mut state: replicator_core::state::SourceState =
        serde_json::from_slice(&std::fs::read(&path)?)?;
    let pending = state
        .pending
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no pending cycle"))?;
    assert_eq!(pending.cycle, shipped.cycle);
    state.next_cycle = shipped.cycle;
    state.in_flight = Some(replicator_core::state::InFlightCycle {
        cycle: shipped.cycle,
        attempt: state.attempts,
        base_cycle: pending.base_cycle,
        epoch: pending.epoch,
    });
    std::fs::write(&path, serde_json::to_vec(&state)?)?;
    std::fs::remove_file(state_dir.join(format!("pending-{}.bmap", shipped.cycle)))?;

    let (reopened, _) = replicator_core::source::Source::open(
        &state_dir,
        Arc::clone(&w.src_disk),
        Default::default(),
    )?;
    w.source = reopened;
    w.churn(10)?;
    let next = w.ship().await?;
    assert_eq!(
        next.cycle,
        shipped.cycle + 1,
        "the committed cycle was adopted, not shipped again"
    );
    assert_eq!(next.base_cycle, shipped.cycle);
    let r = w.hydrate().await?;
    let applied: Vec<u64> = r.applied.iter().map(|a| a.cycle).collect();
    assert_eq!(applied, vec![shipped.cycle, next.cycle]);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_sink_outage_in_the_middle_of_a_cycle_fails_it_cleanly_and_the_next_heals()
-> anyhow::Result<()> {
    let mut w = World::new(15)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(80)?;
    let marked = w.source.tracker().current()?.count();
    // The cache goes away after two blobs of the cycle went up.
    w.sink.add_rule(
        replicator_sink::wrap::FaultRule::new(
            OpKind::Put,
            Fault::Permanent,
            replicator_sink::wrap::Trigger::Countdown {
                skip: 2,
                times: u64::MAX,
            },
        )
        .on_keys_containing("/blobs/"),
    )?;
    let err = w
        .ship()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the outage went unnoticed"))?;
    assert!(
        err.to_string().contains("/blobs/"),
        "the error names the object: {err}"
    );
    assert_eq!(
        w.source.tracker().current()?.count(),
        marked,
        "no mark lost"
    );
    assert!(w.source.state().in_flight.is_none());
    let disk = w.source.disk_id();
    assert!(
        w.sink
            .list(&layout::manifests_prefix(&disk))
            .await?
            .iter()
            .all(|m| layout::cycle_of_key(&m.key) == Some(1)),
        "no manifest of the failed cycle"
    );
    let r = w.hydrate().await?;
    assert!(
        r.applied.is_empty() && r.failed.is_none(),
        "nothing to apply, nothing failed"
    );

    // The cache comes back; an outage while hydrating is retried later, not a failed cycle.
    w.sink.clear_rules();
    let shipped = w.ship().await?;
    assert_eq!(shipped.changed_sectors, marked);
    w.fault(OpKind::Get, Fault::Transient, "/blobs/", 1)?;
    let err = w
        .hydrate()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the get fault went unnoticed"))?;
    let kind = err.downcast_ref::<Error>().map(Error::kind);
    assert_eq!(kind, Some(ErrorKind::Transient), "{err}");
    assert!(
        w.target
            .as_ref()
            .is_some_and(|t| t.state().failed_cycles.is_empty()),
        "a transient outage does not fail the cycle"
    );
    let r = w.hydrate().await?;
    assert_eq!(r.committed_cycle, shipped.cycle);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn a_torn_upload_or_a_corrupted_read_is_caught_by_authentication_and_heals()
-> anyhow::Result<()> {
    let mut w = World::new(16)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(40)?;
    // A backend that breaks atomicity: the put fails but leaves a truncated object behind.
    w.fault(OpKind::Put, Fault::TornPut, "/blobs/", 1)?;
    assert!(w.ship().await.is_err());
    let shipped = w.ship().await?;
    // A read that flips a bit.
    w.fault(OpKind::Get, Fault::CorruptRead, "/blobs/", 1)?;
    let before = w.tgt_disk.snapshot();
    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("a corrupted read was accepted"))?;
    assert_eq!(failed.cycle, shipped.cycle);
    assert!(w.tgt_disk.snapshot() == before, "nothing written");
    w.ship().await?;
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}

/// Found by the simulation: a torn manifest put left an object under the cycle number, and every
/// later attempt's create-only manifest put collided with it, forever.
#[tokio::test]
async fn a_torn_manifest_put_does_not_stall_later_cycles() -> anyhow::Result<()> {
    for fault in [Fault::TornPut, Fault::LostAck] {
        let mut w = World::new(31)?;
        w.ship().await?;
        w.hydrate().await?;
        w.churn(20)?;
        w.fault(OpKind::Put, fault, "manifests", 1)?;
        assert!(w.ship().await.is_err(), "{fault:?}: the manifest put fails");
        w.hydrate().await?;
        w.churn(20)?;
        for _ in 0..4 {
            let _ = w.ship_outcome().await?;
            w.hydrate().await?;
        }
        assert!(w.identical(), "{fault:?}: the disks converge");
    }
    Ok(())
}
