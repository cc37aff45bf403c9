//! The sink conformance suite: checks that a [`Sink`] keeps the contract written on the trait.
//!
//! Every backend's tests call [`check_all`] on a fresh, empty sink. The checks are public so that
//! crates embedding their own backend can run them too.

use bytes::Bytes;

use crate::{PutMode, Sink, SinkErrorKind};

/// A broken promise: which check failed and what was seen.
#[derive(Debug, thiserror::Error)]
#[error("sink conformance check `{check}` failed on {sink}: {detail}")]
pub struct ConformanceFailure {
    /// The check's name.
    pub check: &'static str,
    /// The sink's description.
    pub sink: String,
    /// What was expected and what was seen.
    pub detail: String,
}

type Outcome = Result<(), ConformanceFailure>;

fn fail(check: &'static str, sink: &dyn Sink, detail: String) -> ConformanceFailure {
    ConformanceFailure {
        check,
        sink: sink.describe(),
        detail,
    }
}

/// What a backend can and cannot promise, where backends really differ. Every check runs on
/// every backend; a capability only changes what a check expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `PutMode::Create` is atomic: of concurrent creates exactly one wins. A backend without it
    /// still refuses a create over an object that already exists (checked, not raced).
    pub atomic_create: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            atomic_create: true,
        }
    }
}

/// Runs every check against `sink`, which must start empty.
pub async fn check_all(sink: &dyn Sink, caps: Capabilities) -> Outcome {
    round_trips(sink).await?;
    not_found(sink).await?;
    overwrite_and_create(sink).await?;
    listing(sink).await?;
    delete_missing(sink).await?;
    invalid_keys(sink).await?;
    if caps.atomic_create {
        concurrent_create(sink).await?;
    }
    Ok(())
}

/// Empty, small and multi-megabyte objects come back byte for byte.
pub async fn round_trips(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "round_trips";
    let big: Vec<u8> = (0..(9u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (key, data) in [
        ("rt/empty", Vec::new()),
        ("rt/small", b"hello sink".to_vec()),
        ("rt/big", big),
    ] {
        sink.put(key, Bytes::from(data.clone()), PutMode::Overwrite)
            .await
            .map_err(|e| fail(CHECK, sink, format!("put {key}: {e}")))?;
        let got = sink
            .get(key)
            .await
            .map_err(|e| fail(CHECK, sink, format!("get {key}: {e}")))?;
        if got.as_ref() != data.as_slice() {
            return Err(fail(
                CHECK,
                sink,
                format!("{key}: got {} bytes back, put {}", got.len(), data.len()),
            ));
        }
    }
    Ok(())
}

/// A missing object is `NotFound`, naming the key.
pub async fn not_found(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "not_found";
    match sink.get("nf/missing").await {
        Err(e) if e.kind() == SinkErrorKind::NotFound && e.key() == "nf/missing" => Ok(()),
        Err(e) => Err(fail(
            CHECK,
            sink,
            format!("expected NotFound naming the key, got {e}"),
        )),
        Ok(_) => Err(fail(CHECK, sink, "get of a missing key succeeded".into())),
    }
}

/// `Overwrite` replaces; `Create` refuses an existing key and leaves it unchanged.
pub async fn overwrite_and_create(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "overwrite_and_create";
    let put = |data: &'static [u8], mode| sink.put("ow/obj", Bytes::from_static(data), mode);
    put(b"one", PutMode::Create)
        .await
        .map_err(|e| fail(CHECK, sink, format!("first create: {e}")))?;
    put(b"two", PutMode::Overwrite)
        .await
        .map_err(|e| fail(CHECK, sink, format!("overwrite: {e}")))?;
    match put(b"three", PutMode::Create).await {
        Err(e) if e.kind() == SinkErrorKind::AlreadyExists => {}
        other => {
            return Err(fail(
                CHECK,
                sink,
                format!("create over an existing key gave {other:?}"),
            ));
        }
    }
    let got = sink
        .get("ow/obj")
        .await
        .map_err(|e| fail(CHECK, sink, format!("get: {e}")))?;
    if got.as_ref() != b"two" {
        return Err(fail(
            CHECK,
            sink,
            format!("expected the overwritten value, got {got:?}"),
        ));
    }
    Ok(())
}

/// Listing by prefix returns every matching key once, sorted, with sizes.
pub async fn listing(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "listing";
    let mut expected = Vec::new();
    for i in 0..1200u32 {
        let key = format!("ls/a/{:02}/obj-{i:05}", i % 7);
        sink.put(
            &key,
            Bytes::from(vec![1u8; (i % 5) as usize]),
            PutMode::Overwrite,
        )
        .await
        .map_err(|e| fail(CHECK, sink, format!("put {key}: {e}")))?;
        expected.push((key, u64::from(i % 5)));
    }
    sink.put("ls/ab", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .map_err(|e| fail(CHECK, sink, format!("put ls/ab: {e}")))?;
    expected.sort();
    let listed = sink
        .list("ls/a/")
        .await
        .map_err(|e| fail(CHECK, sink, format!("list: {e}")))?;
    let got: Vec<(String, u64)> = listed.into_iter().map(|m| (m.key, m.size_bytes)).collect();
    if got != expected {
        return Err(fail(
            CHECK,
            sink,
            format!(
                "list ls/a/ returned {} objects, expected {}",
                got.len(),
                expected.len()
            ),
        ));
    }
    let partial = sink
        .list("ls/a")
        .await
        .map_err(|e| fail(CHECK, sink, format!("list: {e}")))?;
    if partial.len() != expected.len() + 1 {
        return Err(fail(
            CHECK,
            sink,
            format!(
                "plain prefix ls/a matched {} objects, expected {}",
                partial.len(),
                expected.len() + 1
            ),
        ));
    }
    let two = sink
        .list("ls/a/02/")
        .await
        .map_err(|e| fail(CHECK, sink, format!("list: {e}")))?;
    if two.iter().any(|m| !m.key.starts_with("ls/a/02/")) || two.is_empty() {
        return Err(fail(
            CHECK,
            sink,
            "list ls/a/02/ returned keys outside the prefix".into(),
        ));
    }
    let none = sink
        .list("ls/zzz/")
        .await
        .map_err(|e| fail(CHECK, sink, format!("list: {e}")))?;
    if !none.is_empty() {
        return Err(fail(
            CHECK,
            sink,
            "list of an unused prefix returned objects".into(),
        ));
    }
    Ok(())
}

/// Deleting a missing key succeeds; a deleted key is then `NotFound`.
pub async fn delete_missing(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "delete_missing";
    sink.delete("del/never")
        .await
        .map_err(|e| fail(CHECK, sink, format!("delete of missing key: {e}")))?;
    sink.put("del/obj", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .map_err(|e| fail(CHECK, sink, format!("put: {e}")))?;
    sink.delete("del/obj")
        .await
        .map_err(|e| fail(CHECK, sink, format!("delete: {e}")))?;
    match sink.get("del/obj").await {
        Err(e) if e.is_not_found() => Ok(()),
        other => Err(fail(
            CHECK,
            sink,
            format!("get after delete gave {other:?}"),
        )),
    }
}

/// Invalid keys are refused before any I/O.
pub async fn invalid_keys(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "invalid_keys";
    for key in ["", "../escape", "a//b", "UPPER", ".hidden"] {
        match sink
            .put(key, Bytes::from_static(b"x"), PutMode::Overwrite)
            .await
        {
            Err(e) if e.kind() == SinkErrorKind::InvalidKey => {}
            other => return Err(fail(CHECK, sink, format!("put {key:?} gave {other:?}"))),
        }
    }
    Ok(())
}

/// Of many concurrent `Create` puts to one key, exactly one wins and its bytes are stored whole.
pub async fn concurrent_create(sink: &dyn Sink) -> Outcome {
    const CHECK: &str = "concurrent_create";
    const WRITERS: u8 = 8;
    let puts =
        (0..WRITERS).map(|i| sink.put("cc/obj", Bytes::from(vec![i; 256 * 1024]), PutMode::Create));
    let results = futures_join_all(puts).await;
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i)
        .collect();
    if winners.len() != 1 {
        return Err(fail(
            CHECK,
            sink,
            format!("{} concurrent creates succeeded, expected 1", winners.len()),
        ));
    }
    if let Some(e) = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .find(|e| e.kind() != SinkErrorKind::AlreadyExists)
    {
        return Err(fail(
            CHECK,
            sink,
            format!("a losing create failed with {e}, expected AlreadyExists"),
        ));
    }
    let got = sink
        .get("cc/obj")
        .await
        .map_err(|e| fail(CHECK, sink, format!("get: {e}")))?;
    let winner = winners.first().copied().unwrap_or_default() as u8;
    if got.len() != 256 * 1024 || got.iter().any(|&b| b != winner) {
        return Err(fail(
            CHECK,
            sink,
            "the stored object is not the winner's bytes".into(),
        ));
    }
    Ok(())
}

async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    // Polls all futures concurrently on the current task.
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<T>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
