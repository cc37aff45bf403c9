//! A cache that manipulates what it stores: regressions it caught.

mod common;

use replicator_core::layout;
use replicator_sink::Sink;
use replicator_sink::wrap::{Fault, OpKind};

// ---------------------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------------------

/// Damages the last bytes of a blob of `cycle` and hydrates: the cycle fails there. Returns the
/// blob's key and its genuine bytes.
async fn fail_a_cycle(w: &mut common::World, cycle: u64) -> anyhow::Result<(String, Vec<u8>)> {
    let blob = w.blob_keys(cycle).await?.remove(0);
    let path = w.cache_path().join(&blob);
    let genuine = std::fs::read(&path)?;
    let mut damaged = genuine.clone();
    let last = damaged.len() - 1;
    damaged[last - 20] ^= 0x01;
    std::fs::write(&path, &damaged)?;
    Ok((blob, genuine))
}

/// The cache lost a failure report (rolled back over it): the target never put it again, so the
/// source waited for it forever while the target waited for a cycle on the failed one's base.
#[tokio::test]
async fn a_failure_report_lost_by_the_cache_is_put_again() -> anyhow::Result<()> {
    let mut w = common::World::new(21)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(30)?;
    let failed = w.ship().await?;
    let (blob, genuine) = fail_a_cycle(&mut w, failed.cycle).await?;
    let r = w.hydrate().await?;
    assert_eq!(r.failed.map(|f| f.cycle), Some(failed.cycle));
    // The cache goes back to before the failure: the blob genuine again, no failure report.
    std::fs::write(w.cache_path().join(&blob), genuine)?;
    let report = layout::ack_key(&w.source.disk_id(), failed.cycle);
    w.sink.delete(&report).await?;

    w.churn(3)?;
    let chained = w.ship().await?;
    assert_eq!(
        chained.base_cycle, failed.cycle,
        "the source still waits for the failed cycle"
    );
    let r = w.hydrate().await?;
    assert!(r.applied.is_empty() && r.failed.is_none(), "{r:?}");
    assert_eq!(r.waiting_cycles, vec![chained.cycle]);
    assert!(
        w.sink.get(&report).await.is_ok(),
        "the failure report is put again"
    );

    let healed = w.ship().await?;
    assert_eq!(
        healed.carried_from_failed,
        vec![failed.cycle, chained.cycle]
    );
    assert_eq!(healed.base_cycle, failed.cycle - 1);
    let r = w.hydrate().await?;
    assert_eq!(r.committed_cycle, healed.cycle, "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}

/// The put of a failure report failed (a transient cache error): the cycle was already recorded
/// as failed, so later runs skipped it without ever reporting it, and the pair stalled.
#[tokio::test]
async fn a_failure_report_whose_put_failed_is_put_again() -> anyhow::Result<()> {
    let mut w = common::World::new(22)?;
    w.ship().await?;
    w.hydrate().await?;
    w.churn(30)?;
    let failed = w.ship().await?;
    fail_a_cycle(&mut w, failed.cycle).await?;
    w.fault(OpKind::Put, Fault::Transient, "/acks/", 1)?;
    let err = w
        .hydrate()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the failed put went unnoticed"))?;
    assert!(err.to_string().contains("injected"), "{err}");
    let report = layout::ack_key(&w.source.disk_id(), failed.cycle);
    assert!(w.sink.get(&report).await.is_err(), "no failure report yet");

    let r = w.hydrate().await?;
    assert!(r.applied.is_empty() && r.failed.is_none(), "{r:?}");
    assert!(
        w.sink.get(&report).await.is_ok(),
        "the failure report is put again"
    );
    let healed = w.ship().await?;
    assert_eq!(healed.carried_from_failed, vec![failed.cycle]);
    let r = w.hydrate().await?;
    assert_eq!(r.committed_cycle, healed.cycle, "{:?}", r.failed);
    assert!(w.identical());
    Ok(())
}
