//! Every cycle reports its churn (changed bytes per second of the interval since the previous
//! freeze) and how much writes folded (bytes written per byte of changed sectors shipped).

mod common;

use std::time::Duration;

use common::World;
use replicator_core::device::BlockDevice;

#[tokio::test]
async fn cycles_report_churn_and_fold_ratio() -> anyhow::Result<()> {
    let mut w = World::new(71)?;
    let first = w.ship().await?;
    assert_eq!(first.interval_ms, None, "no earlier freeze");
    w.hydrate().await?;
    // The same 64 KiB rewritten 8 times, 60 s after the previous freeze.
    for i in 0..8u8 {
        w.source.tracker().write_at(&[i + 1; 65536], 1 << 20)?;
    }
    w.clock.advance(Duration::from_secs(60));
    let r = w.ship().await?;
    assert_eq!(r.interval_ms, Some(60_000));
    assert_eq!(r.changed_bytes(), 65536);
    assert_eq!(r.bytes_written, Some(8 * 65536));
    assert_eq!(r.fold_ratio(), Some(8.0));
    let churn = r.churn_bytes_per_s().unwrap_or(0.0);
    assert!((churn - 65536.0 / 60.0).abs() < 1.0, "{churn}");
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}
