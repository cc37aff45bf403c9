//! The object-store sink on a real Garage (S3-compatible), started by testkit. Garage must be
//! installed (`scripts/setup-tools.sh`); without it these tests fail saying so.

mod common;

use bytes::Bytes;
use replicator_sink::conformance::Capabilities;
use replicator_sink::url::open_object_sink;
use replicator_sink::{PutMode, Sink};
use testkit::{Garage, StoreServer};

/// More objects than two S3 listing pages (1000 names each).
const MORE_THAN_TWO_PAGES: usize = 2500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_passes_conformance() -> anyhow::Result<()> {
    let garage = Garage::start().await?;
    common::conformance(&garage).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_multipart_round_trip() -> anyhow::Result<()> {
    let garage = Garage::start().await?;
    common::multipart_round_trip(&garage).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_lists_more_than_one_page() -> anyhow::Result<()> {
    let garage = Garage::start().await?;
    common::many_objects_listed(&garage, MORE_THAN_TWO_PAGES).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_down_fails_clearly_and_nothing_partial_survives() -> anyhow::Result<()> {
    let mut garage = Garage::start().await?;
    common::down_and_back(&mut garage).await
}

/// Why Garage sinks check before creating (`AWS_CONDITIONAL_PUT=disabled`, `atomic_create:
/// false`): Garage 2.5 ignores `If-None-Match: *` on a put and overwrites. If this fails, Garage
/// has learnt conditional puts: drop the setting in testkit's `Garage::env` and report
/// `atomic_create: true`.
#[tokio::test]
async fn garage_ignores_if_none_match_on_put() -> anyhow::Result<()> {
    let garage = Garage::start().await?;
    // The store as object_store builds it by default, sending If-None-Match on creates.
    let env: Vec<(String, String)> = garage
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_CONDITIONAL_PUT")
        .collect();
    let sink = open_object_sink(&format!("{}/probe", garage.url()), &env)?;
    assert_eq!(sink.capabilities(), Capabilities::default());
    sink.put("obj", Bytes::from_static(b"first"), PutMode::Create)
        .await?;
    let second = sink
        .put("obj", Bytes::from_static(b"second"), PutMode::Create)
        .await;
    assert!(
        second.is_ok(),
        "Garage refused a conditional create over an existing object ({second:?}): it now \
         honours If-None-Match, so Garage sinks can create atomically"
    );
    assert_eq!(sink.get("obj").await?.as_ref(), b"second");
    Ok(())
}

#[tokio::test]
async fn garage_handle_gives_url_and_env_and_cleans_up() -> anyhow::Result<()> {
    let garage = Garage::start().await?;
    assert_eq!(garage.url(), "s3://replicator");
    let env = garage.env();
    assert!(env.iter().any(|(k, v)| k == "AWS_REGION" && v == "garage"));
    let pid = garage.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    drop(garage);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the server outlived its handle"
    );
    Ok(())
}
