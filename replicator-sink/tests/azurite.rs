//! The object-store sink on a real Azurite (Azure Blob Storage emulator), started by testkit.
//! Azurite must be installed (`scripts/setup-tools.sh`); without it these tests fail saying so.

mod common;

use testkit::{Azurite, StoreServer};

/// More objects than one Azure listing page (5000 names).
const MORE_THAN_A_PAGE: usize = 5100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_passes_conformance() -> anyhow::Result<()> {
    let azurite = Azurite::start().await?;
    common::conformance(&azurite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_multipart_round_trip() -> anyhow::Result<()> {
    let azurite = Azurite::start().await?;
    common::multipart_round_trip(&azurite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_lists_more_than_one_page() -> anyhow::Result<()> {
    let azurite = Azurite::start().await?;
    common::many_objects_listed(&azurite, MORE_THAN_A_PAGE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_down_fails_clearly_and_nothing_partial_survives() -> anyhow::Result<()> {
    let mut azurite = Azurite::start().await?;
    common::down_and_back(&mut azurite).await
}

#[tokio::test]
async fn azurite_handle_gives_url_and_env_and_cleans_up() -> anyhow::Result<()> {
    let azurite = Azurite::start().await?;
    assert_eq!(azurite.url(), "az://replicator");
    let env = azurite.env();
    assert!(
        env.iter()
            .any(|(k, v)| k == "AZURE_STORAGE_USE_EMULATOR" && v == "true")
    );
    let pid = azurite.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    drop(azurite);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the server outlived its handle"
    );
    Ok(())
}
