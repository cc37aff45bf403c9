//! The local-directory sink against the conformance suite, plus its crash-safety details.

use bytes::Bytes;
use replicator_sink::{LocalDirSink, PutMode, Sink, SinkErrorKind, conformance, open_sink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dir_sink_passes_conformance() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = LocalDirSink::create(dir.path())?;
    conformance::check_all(&sink, conformance::Capabilities::default()).await?;
    Ok(())
}

#[tokio::test]
async fn leftover_temporary_files_are_invisible() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = LocalDirSink::create(dir.path())?;
    // A put torn by a crash leaves only a temporary file behind.
    std::fs::write(dir.path().join(".tmp").join("torn"), b"partial")?;
    sink.put("a/b", Bytes::from_static(b"whole"), PutMode::Overwrite)
        .await?;
    let listed = sink.list("").await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, "a/b");
    Ok(())
}

#[tokio::test]
async fn open_sink_parses_urls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("file://{}", dir.path().display());
    let sink = open_sink(&url)?;
    sink.put("k", Bytes::from_static(b"v"), PutMode::Create)
        .await?;
    let plain = open_sink(&dir.path().display().to_string())?;
    assert_eq!(plain.get("k").await?.as_ref(), b"v");
    for bad in ["", "file://relative", "gopher://x"] {
        let err = open_sink(bad).err().map(|e| e.kind());
        assert_eq!(err, Some(SinkErrorKind::InvalidConfig), "{bad:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_sink_that_is_down_fails_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = LocalDirSink::create(dir.path())?;
    // The store's directory disappears under us.
    std::fs::remove_dir_all(dir.path())?;
    let err = sink
        .put("x/y", Bytes::from_static(b"v"), PutMode::Create)
        .await
        .err();
    let err = err.ok_or_else(|| anyhow::anyhow!("put into a removed sink succeeded"))?;
    assert!(err.to_string().contains("x/y"), "{err}");
    assert!(sink.get("x/y").await.is_err());
    Ok(())
}
