//! Garbage collection keeps what a target may still need and removes the rest.

mod common;

use std::collections::BTreeSet;

use bytes::Bytes;
use common::World;
use replicator_core::gc::{GcPolicy, GcReason, plan_gc, run_gc};
use replicator_core::layout;
use replicator_sink::{PutMode, Sink};

/// The cycles that have a manifest, and those that have blobs, in the cache.
async fn cycles_in_cache(w: &World) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let disk = w.source.disk_id();
    let manifests = w
        .sink
        .list(&layout::manifests_prefix(&disk))
        .await?
        .iter()
        .filter_map(|m| layout::cycle_of_key(&m.key))
        .collect();
    let blobs = w
        .sink
        .list(&format!("{}blobs/", layout::disk_prefix(&disk)))
        .await?
        .iter()
        .filter_map(|m| m.key.split('/').nth(3).and_then(|c| c.parse().ok()))
        .collect();
    Ok((manifests, blobs))
}

#[tokio::test]
async fn acknowledged_cycles_go_beyond_the_retained_ones_and_pending_ones_stay()
-> anyhow::Result<()> {
    let mut w = World::new(31)?;
    w.ship_cfg.gc = GcPolicy { retain_cycles: 2 };
    for _ in 0..5 {
        w.churn(10)?;
        w.ship().await?;
        w.hydrate().await?;
    }
    // Cycles 1-5 acknowledged; shipping 6 collects all but the newest two acknowledged ones.
    w.churn(10)?;
    w.ship().await?;
    let (manifests, blobs) = cycles_in_cache(&w).await?;
    assert_eq!(
        manifests,
        BTreeSet::from([4, 5, 6]),
        "retained 4 and 5, pending 6"
    );
    assert_eq!(blobs, BTreeSet::from([4, 5, 6]));
    assert!(
        w.sink
            .list(&layout::acks_prefix(&w.source.disk_id()))
            .await?
            .is_empty(),
        "processed acks removed"
    );
    // Pending cycles are never collected, however many.
    w.churn(10)?;
    w.ship().await?;
    w.churn(10)?;
    w.ship().await?;
    let (manifests, _) = cycles_in_cache(&w).await?;
    assert!(
        manifests.is_superset(&BTreeSet::from([6, 7, 8])),
        "{manifests:?}"
    );
    let r = w.hydrate().await?;
    assert_eq!(r.applied.len(), 3);
    assert!(w.identical());
    Ok(())
}

#[tokio::test]
async fn leftovers_of_abandoned_attempts_and_failed_cycles_are_found_and_removed()
-> anyhow::Result<()> {
    let mut w = World::new(32)?;
    w.ship_cfg.gc = GcPolicy { retain_cycles: 0 };
    w.ship().await?;
    w.hydrate().await?;
    let disk = w.source.disk_id();
    // A cycle that fails on the target (its blob deleted) and is superseded.
    w.churn(20)?;
    let failed = w.ship().await?;
    let blobs = w.blob_keys(failed.cycle).await?;
    w.sink.delete(&blobs[0]).await?;
    assert!(w.hydrate().await?.failed.is_some());
    // An attempt that died before its manifest, and a stray earlier attempt of a committed cycle.
    let orphan = layout::blob_key(&disk, 9, 77, 0);
    let stray = layout::blob_key(&disk, 1, 0, 3);
    for key in [&orphan, &stray] {
        w.sink
            .put(key, Bytes::from_static(b"leftover"), PutMode::Overwrite)
            .await?;
    }

    // Dry run: the plan names everything with its reason and deletes nothing.
    let plan = plan_gc(
        w.sink.as_ref(),
        &disk,
        w.source.state(),
        GcPolicy { retain_cycles: 0 },
    )
    .await?;
    let reason_of = |key: &str| plan.items.iter().find(|i| i.key == key).map(|i| i.reason);
    assert_eq!(reason_of(&orphan), Some(GcReason::AbandonedAttempt));
    assert_eq!(reason_of(&stray), Some(GcReason::AbandonedAttempt));
    assert!(
        w.sink.get(&orphan).await.is_ok(),
        "a plan alone removes nothing"
    );
    // Cycle 2 is still pending until the source reads its failure.
    assert_eq!(reason_of(&layout::manifest_key(&disk, failed.cycle)), None);

    // The next ship reads the failure, carries the sectors, and collects the failed cycle.
    w.churn(5)?;
    w.ship().await?;
    let plan = plan_gc(
        w.sink.as_ref(),
        &disk,
        w.source.state(),
        GcPolicy { retain_cycles: 0 },
    )
    .await?;
    assert!(
        plan.items.is_empty(),
        "ship already collected: {:?}",
        plan.items
    );
    let (manifests, blob_cycles) = cycles_in_cache(&w).await?;
    assert!(
        !manifests.contains(&failed.cycle) && !blob_cycles.contains(&failed.cycle),
        "{manifests:?} {blob_cycles:?}"
    );
    assert!(w.sink.get(&orphan).await.is_err() && w.sink.get(&stray).await.is_err());
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert!(w.identical());

    // run_gc reports what it removed.
    let extra = layout::blob_key(&disk, 1, 5, 0);
    w.sink
        .put(&extra, Bytes::from_static(b"12345"), PutMode::Overwrite)
        .await?;
    let plan = plan_gc(
        w.sink.as_ref(),
        &disk,
        w.source.state(),
        GcPolicy { retain_cycles: 0 },
    )
    .await?;
    let report = run_gc(w.sink.as_ref(), &plan).await;
    assert!(
        report.removed >= 1 && report.bytes >= 5 && report.failed.is_empty(),
        "{report:?}"
    );
    Ok(())
}
