//! The object-store sink: a [`Sink`] over any [`object_store::ObjectStore`] (Azure Blob Storage,
//! S3 and S3-compatible stores, memory), under a key prefix.
//!
//! This module owns how the sink contract is kept on stores that are not file systems:
//!
//! - **Names.** The object for key `k` is `<prefix>/k` (just `k` without a prefix). Only names
//!   that are valid keys are listed; anything else under the prefix is ignored.
//! - **Atomic put.** A put of at most [`MULTIPART_THRESHOLD_BYTES`] is one request, which the
//!   stores apply atomically. A larger [`PutMode::Overwrite`] goes up as a multipart upload
//!   (parts of [`MULTIPART_PART_BYTES`], at most [`MULTIPART_CONCURRENCY`] in flight): the stores
//!   show nothing until the final commit (S3 `CompleteMultipartUpload`, Azure `Put Block List`),
//!   and a failed upload is aborted, so no partial object is ever visible. An upload cut short by
//!   a crash can leave invisible parts behind: S3 keeps them until a lifecycle rule removes
//!   incomplete uploads (configure one), Azure drops uncommitted blocks after a week.
//! - **Conditional put.** With [`CreateStrategy::Conditional`] a [`PutMode::Create`] is one
//!   request with `If-None-Match: *`, which Azure, AWS S3 and the memory store apply atomically:
//!   of concurrent creates exactly one wins. object_store's multipart API cannot carry that
//!   precondition, so a create is always a single request, of at most [`MAX_SINGLE_PUT_BYTES`]
//!   (far above any manifest). Some S3-compatible servers ignore `If-None-Match` on a put and
//!   overwrite silently; Garage 2.5 does (the `garage.rs` test
//!   `garage_ignores_if_none_match_on_put` shows it). For those, set `AWS_CONDITIONAL_PUT=disabled`,
//!   which selects [`CreateStrategy::CheckThenPut`]: a `HEAD` first, `AlreadyExists` if the object
//!   is there, otherwise a plain put. That refuses a create over an existing object but is not
//!   atomic (two racing creates can both succeed, the last one's bytes winning), so such a sink
//!   reports `Capabilities { atomic_create: false }`.
//! - **List.** object_store lists whole path segments; the contract's prefix is a plain string.
//!   The sink lists the deepest directory the prefix names completely, follows every page (S3
//!   pages at 1000 names, Azure at 5000), keeps the names that start with the prefix, and sorts.
//! - **Errors** name the operation and the key (not the prefixed name) and carry a
//!   [`SinkErrorKind`]: not found; already exists (a failed create precondition); transient for
//!   connection failures, timeouts, throttling and 5xx answers; permanent for refused
//!   credentials, missing buckets or containers and other 4xx answers; invalid config for what
//!   the store cannot do as configured.
//! - **Retries.** object_store retries failed requests itself; [`retry_config`] keeps that short
//!   ([`RETRY_MAX`] attempts within [`RETRY_TIMEOUT`]) because the callers above the sink retry
//!   with their own backoff and schedule: retrying for minutes inside one request would hide an
//!   outage from them and hold a pipeline slot.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};

use crate::conformance::Capabilities;
use crate::key::{validate_key, validate_prefix};
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind};

/// Objects larger than this go up as multipart uploads; smaller ones in one request.
pub const MULTIPART_THRESHOLD_BYTES: usize = 8 << 20;
/// The size of every part of a multipart upload but the last (S3 needs at least 5 MiB).
pub const MULTIPART_PART_BYTES: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
pub const MULTIPART_CONCURRENCY: usize = 4;
/// The largest object put in a single request, which every conditional create is. Azure and S3
/// accept about 5 GiB in one request, but a request that large would outlast
/// [`REQUEST_TIMEOUT`] on most links; manifests, the only objects created conditionally, are
/// far smaller.
pub const MAX_SINGLE_PUT_BYTES: usize = 256 << 20;
/// Attempts object_store makes for one request beyond the first.
pub const RETRY_MAX: usize = 3;
/// Time after which object_store stops retrying a request.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
/// First wait between retries; doubles up to [`RETRY_BACKOFF_MAX`].
pub const RETRY_BACKOFF_INIT: Duration = Duration::from_millis(100);
/// Longest wait between retries.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Time to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for one whole request, body included (a multipart part is one request).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// object_store's retry policy for sinks: a few quick retries, not minutes of them.
pub fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: RETRY_BACKOFF_INIT,
            max_backoff: RETRY_BACKOFF_MAX,
            base: 2.0,
        },
        max_retries: RETRY_MAX,
        retry_timeout: RETRY_TIMEOUT,
    }
}

/// HTTP client options for sinks (timeouts). Settings from the environment apply on top.
pub fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
}

/// How a [`PutMode::Create`] is carried out; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateStrategy {
    /// One put with the store's create-if-absent precondition: atomic.
    Conditional,
    /// `HEAD`, then a plain put if absent: refuses existing objects, but two racing creates can
    /// both succeed. For stores that ignore or reject conditional puts.
    CheckThenPut,
}

/// A sink on an object store, under a key prefix.
#[derive(Clone)]
pub struct ObjectStoreSink {
    store: Arc<dyn ObjectStore>,
    /// `"<prefix>/"`, or empty for none.
    prefix: String,
    create: CreateStrategy,
    description: String,
}

impl fmt::Debug for ObjectStoreSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreSink")
            .field("sink", &self.description)
            .field("create", &self.create)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreSink {
    /// A sink storing key `k` as `<prefix>/k` in `store`. The prefix (empty for none) follows
    /// the key rules; `description` is what [`Sink::describe`] returns and must hold no secret.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        create: CreateStrategy,
        description: impl Into<String>,
    ) -> Result<Self, SinkError> {
        let description = description.into();
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key("open", prefix).map_err(|e| {
                SinkError::new(
                    SinkErrorKind::InvalidConfig,
                    "open",
                    &description,
                    format!("bad key prefix `{prefix}`: {e}"),
                )
            })?;
        }
        Ok(ObjectStoreSink {
            store,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            create,
            description,
        })
    }

    /// What this sink promises, for the conformance suite.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: self.create == CreateStrategy::Conditional,
        }
    }

    /// The object name of `key` (already validated).
    fn location(&self, op: &'static str, key: &str) -> Result<Path, SinkError> {
        let name = format!("{}{key}", self.prefix);
        Path::parse(&name)
            .map_err(|e| SinkError::new(SinkErrorKind::InvalidKey, op, key, e.to_string()))
    }

    fn error(&self, op: &'static str, key: &str, err: object_store::Error) -> SinkError {
        let kind = classify(op, &err);
        let hint = match (&err, op) {
            (object_store::Error::NotFound { .. }, "put" | "list") => {
                "; does the bucket or container exist?"
            }
            (
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
                _,
            ) => "; check the credentials",
            _ => "",
        };
        SinkError::new(
            kind,
            op,
            key,
            format!("{}: {}{hint}", self.description, error_chain(&err)),
        )
    }

    /// A plain put: one request, or a multipart upload above the threshold.
    async fn upload(&self, key: &str, location: &Path, data: Bytes) -> Result<(), SinkError> {
        if data.len() <= MULTIPART_THRESHOLD_BYTES {
            self.store
                .put(location, PutPayload::from(data))
                .await
                .map_err(|e| self.error("put", key, e))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(location)
            .await
            .map_err(|e| self.error("put", key, e))?;
        let mut guard = AbortOnDrop(Some(upload));
        let result = match guard.0.as_mut() {
            Some(upload) => upload_parts(upload.as_mut(), &data).await,
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                guard.0 = None;
                Ok(())
            }
            Err(err) => {
                if let Some(mut upload) = guard.0.take()
                    && let Err(abort) = upload.abort().await
                {
                    tracing::warn!(key, error = %abort, "aborting a failed multipart upload failed; its parts stay invisible until the store expires them");
                }
                Err(self.error("put", key, err))
            }
        }
    }

    async fn create(&self, key: &str, location: &Path, data: Bytes) -> Result<(), SinkError> {
        match self.create {
            CreateStrategy::Conditional => {
                if data.len() > MAX_SINGLE_PUT_BYTES {
                    return Err(SinkError::new(
                        SinkErrorKind::Permanent,
                        "put",
                        key,
                        format!(
                            "{}: a create-if-absent put is one request, limited to {MAX_SINGLE_PUT_BYTES} bytes; this object has {}",
                            self.description,
                            data.len()
                        ),
                    ));
                }
                self.store
                    .put_opts(
                        location,
                        PutPayload::from(data),
                        object_store::PutMode::Create.into(),
                    )
                    .await
                    .map_err(|e| self.error("put", key, e))?;
                Ok(())
            }
            CreateStrategy::CheckThenPut => match self.store.head(location).await {
                Ok(_) => Err(SinkError::new(
                    SinkErrorKind::AlreadyExists,
                    "put",
                    key,
                    format!("{}: the object exists", self.description),
                )),
                Err(object_store::Error::NotFound { .. }) => self.upload(key, location, data).await,
                Err(e) => Err(self.error("put", key, e)),
            },
        }
    }
}

/// Sends the parts of `data` (all but the last of [`MULTIPART_PART_BYTES`]), at most
/// [`MULTIPART_CONCURRENCY`] at a time, then commits the upload.
async fn upload_parts(
    upload: &mut dyn MultipartUpload,
    data: &Bytes,
) -> Result<(), object_store::Error> {
    let starts = (0..data.len()).step_by(MULTIPART_PART_BYTES);
    {
        // `put_part` numbers parts in call order, so parts are created in order and may finish
        // in any order.
        let parts = futures::stream::iter(starts).map(|start| {
            let end = (start + MULTIPART_PART_BYTES).min(data.len());
            upload.put_part(PutPayload::from(data.slice(start..end)))
        });
        parts
            .buffer_unordered(MULTIPART_CONCURRENCY)
            .try_for_each(|()| futures::future::ready(Ok(())))
            .await?;
    }
    upload.complete().await?;
    Ok(())
}

/// Aborts a multipart upload still held when the put future is dropped (cancelled), so its parts
/// do not linger on stores that keep them.
struct AbortOnDrop(Option<Box<dyn MultipartUpload>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(mut upload) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

/// The error and its sources, joined: object_store keeps the useful part (the status and the
/// store's message) in the sources.
fn error_chain(err: &object_store::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Maps an object_store error to what the caller can do about it.
fn classify(op: &'static str, err: &object_store::Error) -> SinkErrorKind {
    use object_store::Error as E;
    match err {
        E::NotFound { .. } if op == "get" => SinkErrorKind::NotFound,
        // A put or list that finds nothing is missing its bucket or container.
        E::NotFound { .. } => SinkErrorKind::Permanent,
        E::AlreadyExists { .. } | E::Precondition { .. } if op == "put" => {
            SinkErrorKind::AlreadyExists
        }
        E::NotSupported { .. } | E::NotImplemented { .. } | E::UnknownConfigurationKey { .. } => {
            SinkErrorKind::InvalidConfig
        }
        E::Generic { source, .. } => classify_generic(source.as_ref()),
        _ => SinkErrorKind::Permanent,
    }
}

/// object_store reports transport failures and unexpected HTTP statuses as `Generic`, after its
/// own retries. Its retry error type is private: transport failures are found as
/// [`object_store::client::HttpError`] in the source chain, statuses in the message
/// ("status code: 503 ...").
fn classify_generic(err: &(dyn std::error::Error + 'static)) -> SinkErrorKind {
    let mut text = String::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return SinkErrorKind::Transient;
        }
        text.push_str(&s.to_string());
        text.push('\n');
        source = s.source();
    }
    if let Some(status) = status_in(&text) {
        return if status >= 500 || status == 408 || status == 429 {
            SinkErrorKind::Transient
        } else {
            SinkErrorKind::Permanent
        };
    }
    const TRANSIENT_CODES: [&str; 4] = ["SlowDown", "ServerBusy", "InternalError", "Timeout"];
    if TRANSIENT_CODES.iter().any(|code| text.contains(code)) {
        SinkErrorKind::Transient
    } else {
        SinkErrorKind::Permanent
    }
}

fn status_in(text: &str) -> Option<u16> {
    const MARK: &str = "status code: ";
    let at = text.find(MARK)? + MARK.len();
    text.get(at..at + 3)?.parse().ok()
}

#[async_trait]
impl Sink for ObjectStoreSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        let location = self.location("put", key)?;
        match mode {
            PutMode::Overwrite => self.upload(key, &location, data).await,
            PutMode::Create => self.create(key, &location, data).await,
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        let location = self.location("get", key)?;
        let result = self
            .store
            .get(&location)
            .await
            .map_err(|e| self.error("get", key, e))?;
        let size = result.meta.size;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.error("get", key, e))?;
        if bytes.len() as u64 != size {
            return Err(SinkError::new(
                SinkErrorKind::Transient,
                "get",
                key,
                format!(
                    "{}: read {} bytes of an object of {size}",
                    self.description,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        validate_prefix(prefix)?;
        // object_store lists whole segments: list the deepest directory the prefix names, then
        // filter by the string prefix.
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let dir_name = format!("{}{dir}", self.prefix);
        let dir_name = dir_name.trim_end_matches('/');
        let dir_path = if dir_name.is_empty() {
            None
        } else {
            Some(Path::parse(dir_name).map_err(|e| {
                SinkError::new(SinkErrorKind::InvalidKey, "list", prefix, e.to_string())
            })?)
        };
        let mut stream = self.store.list(dir_path.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(|e| self.error("list", prefix, e))?
        {
            let Some(key) = meta.location.as_ref().strip_prefix(self.prefix.as_str()) else {
                continue;
            };
            if key.starts_with(prefix) && validate_key("list", key).is_ok() {
                out.push(ObjectMeta {
                    key: key.to_owned(),
                    size_bytes: meta.size,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        let location = self.location("delete", key)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_found_in_messages() {
        assert_eq!(
            status_in("Server returned non-2xx status code: 503 Service Unavailable: x"),
            Some(503)
        );
        assert_eq!(status_in("no status here"), None);
    }

    #[test]
    fn generic_errors_are_classified_by_status() {
        let e =
            std::io::Error::other("Server returned non-2xx status code: 503 Service Unavailable");
        assert_eq!(classify_generic(&e), SinkErrorKind::Transient);
        let e = std::io::Error::other("Server returned non-2xx status code: 400 Bad Request");
        assert_eq!(classify_generic(&e), SinkErrorKind::Permanent);
        let e = std::io::Error::other("<Code>SlowDown</Code>");
        assert_eq!(classify_generic(&e), SinkErrorKind::Transient);
    }

    #[test]
    fn prefixes_follow_the_key_rules() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        for bad in ["Upper", "a//b", "../x"] {
            let err = ObjectStoreSink::new(
                Arc::clone(&store),
                bad,
                CreateStrategy::Conditional,
                "memory://",
            )
            .err()
            .map(|e| e.kind());
            assert_eq!(err, Some(SinkErrorKind::InvalidConfig), "{bad}");
        }
        assert!(
            ObjectStoreSink::new(store, "/a/b/", CreateStrategy::Conditional, "memory://").is_ok()
        );
    }
}
