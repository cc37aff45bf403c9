//! Scenarios every real object-storage server runs (see `azurite.rs`, `garage.rs`).

// These tests measure real servers in real time.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use replicator_sink::object::{MULTIPART_PART_BYTES, MULTIPART_THRESHOLD_BYTES};
use replicator_sink::{PutMode, SinkError, SinkErrorKind, conformance};
use testkit::StoreServer;

/// Puts in flight at once when filling a listing.
const FILL_CONCURRENCY: usize = 32;
/// How long an operation on a stopped server may take to fail (object_store's retries
/// included).
const DOWN_ANSWER_MAX: Duration = Duration::from_secs(30);

/// Deterministic, incompressible-looking bytes.
pub fn pattern(len: usize, seed: u32) -> Bytes {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The whole conformance suite on a fresh prefix, with the server's capabilities.
pub async fn conformance(server: &impl StoreServer) -> anyhow::Result<()> {
    let sink = server.object_sink("conformance")?;
    ensure!(
        sink.capabilities() == server.capabilities(),
        "the sink opened from the server's settings promises {:?}, the server {:?}",
        sink.capabilities(),
        server.capabilities()
    );
    conformance::check_all(&sink, server.capabilities()).await?;
    Ok(())
}

/// An object of several multipart parts comes back whole; a small overwrite replaces it.
pub async fn multipart_round_trip(server: &impl StoreServer) -> anyhow::Result<()> {
    let sink = server.sink_at("multipart")?;
    let len = 2 * MULTIPART_PART_BYTES + MULTIPART_THRESHOLD_BYTES / 2 + 4321;
    let data = pattern(len, 7);
    sink.put("big/obj", data.clone(), PutMode::Overwrite)
        .await?;
    let got = sink.get("big/obj").await?;
    ensure!(got == data, "got {} bytes back, put {len}", got.len());
    let listed = sink.list("big/").await?;
    ensure!(
        listed.len() == 1 && listed[0].size_bytes == len as u64,
        "listed {listed:?}"
    );
    sink.put("big/obj", Bytes::from_static(b"small"), PutMode::Overwrite)
        .await?;
    ensure!(sink.get("big/obj").await?.as_ref() == b"small");
    // A create of a multipart-sized object refuses an existing key too.
    let err = sink
        .put("big/obj", data, PutMode::Create)
        .await
        .err()
        .map(|e| e.kind());
    ensure!(
        err == Some(SinkErrorKind::AlreadyExists),
        "create over an object gave {err:?}"
    );
    Ok(())
}

/// `count` objects under one prefix come back in one listing, across the server's pages.
pub async fn many_objects_listed(server: &impl StoreServer, count: usize) -> anyhow::Result<()> {
    let sink = server.sink_at("many")?;
    let keys: Vec<String> = (0..count).map(|i| format!("objs/{i:06}")).collect();
    futures::stream::iter(keys.iter())
        .map(|key| sink.put(key, Bytes::from_static(b"x"), PutMode::Overwrite))
        .buffer_unordered(FILL_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    sink.put("objt", Bytes::from_static(b"outside"), PutMode::Overwrite)
        .await?;
    let listed = sink.list("objs/").await?;
    let got: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
    ensure!(
        got.len() == count,
        "listed {} of {count} objects",
        got.len()
    );
    ensure!(
        got.iter().zip(&keys).all(|(a, b)| a == b),
        "listing out of order"
    );
    // A string prefix inside the last segment: objs/0001xx.
    let some = sink.list("objs/0001").await?;
    ensure!(
        some.len() == 100.min(count.saturating_sub(100)),
        "prefix objs/0001 matched {}",
        some.len()
    );
    ensure!(sink.list("obj").await?.len() == count + 1);
    Ok(())
}

/// While the server is down every operation fails soon, as a transient error naming its key;
/// after a restart an upload cut by the crash is absent or whole, never partial, and acknowledged
/// objects are there.
pub async fn down_and_back(server: &mut impl StoreServer) -> anyhow::Result<()> {
    let sink = server.sink_at("down")?;
    let kept = pattern(1000, 1);
    sink.put("kept/obj", kept.clone(), PutMode::Create).await?;
    // Let an emulator that saves lazily save it: only the crash should lose anything.
    let window = server.crash_loss_window();
    if !window.is_zero() {
        tokio::time::sleep(window + Duration::from_secs(1)).await;
    }

    // A multipart upload the crash cuts short.
    let big = pattern(6 * MULTIPART_PART_BYTES, 2);
    let uploading = {
        let sink = sink.clone();
        let big = big.clone();
        tokio::spawn(async move { sink.put("torn/big", big, PutMode::Overwrite).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.kill();
    let torn = uploading.await?;
    if let Err(e) = &torn {
        check_down_error(e, "put", "torn/big")?;
    }

    expect_down(
        sink.put("x/y", Bytes::from_static(b"v"), PutMode::Overwrite),
        "put",
        "x/y",
    )
    .await?;
    expect_down(
        sink.put("x/c", Bytes::from_static(b"v"), PutMode::Create),
        "put",
        "x/c",
    )
    .await?;
    expect_down(sink.get("kept/obj"), "get", "kept/obj").await?;
    expect_down(sink.list("kept/"), "list", "kept/").await?;
    expect_down(sink.delete("kept/obj"), "delete", "kept/obj").await?;

    server.restart().await.context("restarting the server")?;
    let sink = server.sink_at("down")?;
    match sink.get("torn/big").await {
        Ok(got) => ensure!(
            got == big,
            "after the crash torn/big holds {} bytes, neither nothing nor the {} put",
            got.len(),
            big.len()
        ),
        Err(e) if e.is_not_found() => ensure!(
            torn.is_err() || !window.is_zero(),
            "a put acknowledged before the crash was lost"
        ),
        Err(e) => return Err(e.into()),
    }
    for meta in sink.list("torn/").await? {
        ensure!(
            meta.size_bytes == big.len() as u64,
            "a partial object is listed: {meta:?}"
        );
    }
    ensure!(
        sink.get("kept/obj").await? == kept,
        "an object put before the crash changed"
    );
    sink.put("after/obj", Bytes::from_static(b"back"), PutMode::Create)
        .await?;
    ensure!(sink.get("after/obj").await?.as_ref() == b"back");
    Ok(())
}

async fn expect_down<T: std::fmt::Debug>(
    op: impl Future<Output = Result<T, SinkError>>,
    name: &str,
    key: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let result = op.await;
    let took = started.elapsed();
    ensure!(
        took < DOWN_ANSWER_MAX,
        "{name} {key} on a stopped server took {took:?}"
    );
    match result {
        Ok(v) => anyhow::bail!("{name} {key} on a stopped server succeeded: {v:?}"),
        Err(e) => check_down_error(&e, name, key),
    }
}

fn check_down_error(e: &SinkError, op: &str, key: &str) -> anyhow::Result<()> {
    let text = e.to_string();
    ensure!(
        e.kind() == SinkErrorKind::Transient,
        "{op} {key} on a stopped server: expected a transient error, got {text}"
    );
    ensure!(
        e.op() == op && e.key() == key && text.contains(key),
        "the error does not name {op} and {key}: {text}"
    );
    Ok(())
}
