//! The object-store sink on object_store's in-memory store (`memory://`): the conformance suite,
//! multipart uploads and prefixes, without a server.

use bytes::Bytes;
use replicator_sink::object::MULTIPART_THRESHOLD_BYTES;
use replicator_sink::url::open_object_sink;
use replicator_sink::{PutMode, conformance, open_sink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_sink_passes_conformance() -> anyhow::Result<()> {
    let sink = open_object_sink("memory://", &[])?;
    conformance::check_all(&sink, sink.capabilities()).await?;
    let prefixed = open_sink("memory://some/prefix")?;
    conformance::check_all(prefixed.as_ref(), conformance::Capabilities::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_sized_objects_round_trip_in_both_modes() -> anyhow::Result<()> {
    let sink = open_sink("memory://mp")?;
    let data: Bytes = (0..(3 * MULTIPART_THRESHOLD_BYTES + 12345))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    sink.put("big/over", data.clone(), PutMode::Overwrite)
        .await?;
    assert_eq!(sink.get("big/over").await?, data);
    sink.put("big/create", data.clone(), PutMode::Create)
        .await?;
    assert_eq!(sink.get("big/create").await?, data);
    let listed = sink.list("big/").await?;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|m| m.size_bytes == data.len() as u64));
    Ok(())
}

#[tokio::test]
async fn each_memory_url_is_a_new_empty_store() -> anyhow::Result<()> {
    let a = open_sink("memory://")?;
    a.put("k", Bytes::from_static(b"v"), PutMode::Create)
        .await?;
    let b = open_sink("memory://")?;
    assert!(b.get("k").await.err().is_some_and(|e| e.is_not_found()));
    assert_eq!(a.describe(), "memory://");
    Ok(())
}
