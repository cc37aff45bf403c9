//! The cache sink: where a replication source stages encrypted cycles and a target reads them.
//!
//! This crate owns the [`Sink`] trait and its contract, object key validation, the embedded
//! default backend, [`LocalDirSink`] (a directory on a local file system), the object-store
//! backend, [`ObjectStoreSink`] (Azure Blob Storage, S3, memory), and [`open_sink`], which picks
//! one from a URL. The replication core talks to the cache only through [`Sink`]; it never
//! learns which backend it has.
//!
//! Everything a sink stores is already encrypted and authenticated by the core: a sink is trusted
//! for availability only, never for confidentiality or integrity.

pub mod buf;
pub mod clock;
pub mod conformance;
mod error;
mod key;
mod local;
pub mod object;
pub mod url;
pub mod wrap;

pub use error::{SinkError, SinkErrorKind};
pub use key::{MAX_KEY_LEN, validate_key};
pub use local::LocalDirSink;
pub use object::ObjectStoreSink;
pub use url::open_sink;

use async_trait::async_trait;
use bytes::Bytes;

/// How a [`Sink::put`] treats an object that already exists under the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// Replace any existing object.
    Overwrite,
    /// Create only if no object exists under the key; otherwise fail with
    /// [`SinkErrorKind::AlreadyExists`] and leave the existing object as it was.
    Create,
}

/// One object found by [`Sink::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The full key of the object.
    pub key: String,
    /// Its size in bytes.
    pub size_bytes: u64,
}

/// A store of immutable-ish objects addressed by string keys: a local directory, a bucket, a
/// container.
///
/// # Contract
///
/// Every backend, and every wrapper around one, keeps these promises; the replication core relies
/// on nothing else.
///
/// - **Keys** are validated by [`validate_key`]: 1 to [`MAX_KEY_LEN`] bytes of `[a-z0-9._-]`
///   segments separated by `/`, no empty, `.` or `..` segment, no leading or trailing `/`. An
///   invalid key fails with [`SinkErrorKind::InvalidKey`] before any I/O.
/// - **Atomic put**: after `put` returns `Ok`, a `get` of that key returns exactly the bytes put,
///   and the object survives a crash of the machine (it is durable). Before that, and if `put`
///   fails or the process dies during it, readers see either the previous object or no object
///   under that key, never a partial one.
/// - **Conditional put**: with [`PutMode::Create`], of several concurrent puts to one absent key
///   exactly one succeeds and the others fail with [`SinkErrorKind::AlreadyExists`].
/// - **Not found**: `get` of an absent key fails with [`SinkErrorKind::NotFound`], which names the
///   key; it is not an I/O error and retrying it does not help.
/// - **List** returns every object whose key starts with `prefix` (a plain string prefix, not a
///   directory), sorted by key, each once, with all pages already fetched. Objects being put
///   concurrently may or may not appear; a listed object can be fetched unless it was deleted
///   since.
/// - **Delete** of an absent key succeeds (deletion is idempotent).
/// - **Errors** carry a [`SinkErrorKind`] that tells the caller whether retrying can help
///   ([`SinkError::is_transient`]) and name the key and operation.
/// - Implementations are `Send + Sync` and safe to call concurrently.
#[async_trait]
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`; see the contract for atomicity and [`PutMode`].
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError>;
    /// Returns the whole object stored under `key`.
    async fn get(&self, key: &str) -> Result<Bytes, SinkError>;
    /// Returns every object whose key starts with `prefix`, sorted by key. An object put or
    /// deleted while the list runs may or may not be in it; the list itself does not fail.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError>;
    /// Removes the object under `key`; succeeds if there is none.
    async fn delete(&self, key: &str) -> Result<(), SinkError>;
    /// A short description for messages, e.g. `file:///var/cache/replicator`.
    fn describe(&self) -> String;
}
