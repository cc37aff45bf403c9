//! Key rotation: new cycles are encrypted under the new master key while cycles shipped under the
//! old one stay readable (by the key id in their headers) until they are applied.

mod common;

use common::World;
use replicator_core::ErrorKind;
use replicator_core::keys::MasterKey;

#[tokio::test]
async fn cycles_shipped_before_a_rotation_still_apply_and_new_ones_use_the_new_key()
-> anyhow::Result<()> {
    let mut w = World::new(61)?;
    let old = w.key.clone();
    w.ship().await?;
    w.hydrate().await?;
    // Two deltas shipped under the old key, not yet applied.
    for _ in 0..2 {
        w.churn(5)?;
        w.ship().await?;
    }
    // Rotate: both sides now encrypt under the new key and still read the old one.
    let new = MasterKey::from_bytes([0x42; 32]);
    w.key = new.clone().with_previous(vec![old.clone()]);
    w.churn(5)?;
    let r = w.ship().await?;
    let disk = w.source.disk_id();
    let manifest = std::fs::read(
        w.cache_path()
            .join(replicator_core::layout::manifest_key(&disk, r.cycle)),
    )?;
    let header = replicator_core::format::peek_header(&manifest)?;
    assert_eq!(
        header.key_id,
        new.disk_key(&disk).key_id(),
        "new cycles use the new key"
    );
    let h = w.hydrate().await?;
    assert_eq!(h.applied.len(), 3, "{h:?}");
    assert!(w.identical());
    // The target's acknowledgements (under the new key) are read by the source.
    w.churn(2)?;
    let r = w.ship().await?;
    assert!(!r.acked.is_empty(), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn without_the_previous_key_old_cycles_are_a_wrong_key_not_corruption() -> anyhow::Result<()>
{
    let mut w = World::new(62)?;
    w.ship().await?;
    // The target only has the new key: the cycle shipped under the old one is refused, saying so.
    w.key = MasterKey::from_bytes([0x43; 32]);
    let err = w
        .hydrate()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("hydrate must refuse"))?;
    let core = err
        .downcast_ref::<replicator_core::Error>()
        .ok_or_else(|| anyhow::anyhow!("{err}"))?;
    assert_eq!(core.kind(), ErrorKind::InvalidInput, "{core}");
    assert!(core.to_string().contains("wrong key"), "{core}");
    assert!(w.target.as_ref().map(|t| t.state().committed_cycle) == Some(0));
    Ok(())
}
