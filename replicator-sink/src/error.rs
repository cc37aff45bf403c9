//! Sink errors: what failed, on which key, and whether retrying can help.

use std::fmt;

/// What kind of failure a [`SinkError`] is; tells the caller what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// No object under the key. Retrying does not help.
    NotFound,
    /// A [`crate::PutMode::Create`] found an object already there.
    AlreadyExists,
    /// The key breaks the key rules; nothing was done.
    InvalidKey,
    /// The sink URL or configuration is wrong.
    InvalidConfig,
    /// A failure that may pass: timeouts, throttling, connection resets. Retry with backoff.
    Transient,
    /// A failure that will not pass by retrying: permissions, a full disk, a broken store.
    Permanent,
}

/// An error from a sink operation.
#[derive(Debug, thiserror::Error)]
pub struct SinkError {
    kind: SinkErrorKind,
    op: &'static str,
    key: String,
    detail: String,
    #[source]
    source: Option<std::io::Error>,
}

impl SinkError {
    /// Builds an error of `kind` for operation `op` on `key`.
    pub fn new(
        kind: SinkErrorKind,
        op: &'static str,
        key: &str,
        detail: impl Into<String>,
    ) -> Self {
        SinkError {
            kind,
            op,
            key: key.to_owned(),
            detail: detail.into(),
            source: None,
        }
    }

    /// Wraps an I/O error, classifying it: missing files are [`SinkErrorKind::NotFound`],
    /// interruptions and timeouts [`SinkErrorKind::Transient`], the rest permanent.
    pub fn io(op: &'static str, key: &str, err: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => SinkErrorKind::NotFound,
            K::AlreadyExists => SinkErrorKind::AlreadyExists,
            K::Interrupted | K::TimedOut | K::WouldBlock | K::ConnectionReset => {
                SinkErrorKind::Transient
            }
            _ => SinkErrorKind::Permanent,
        };
        SinkError {
            kind,
            op,
            key: key.to_owned(),
            detail: err.to_string(),
            source: Some(err),
        }
    }

    pub(crate) fn invalid_url(url: &str, detail: &str) -> Self {
        SinkError::new(SinkErrorKind::InvalidConfig, "open", url, detail)
    }

    /// The kind of failure.
    pub fn kind(&self) -> SinkErrorKind {
        self.kind
    }

    /// The operation that failed: `put`, `get`, `list`, `delete` or `open`.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The key (or prefix, or URL) the operation was on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == SinkErrorKind::Transient
    }

    /// Whether the error says the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == SinkErrorKind::NotFound
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            SinkErrorKind::NotFound => "not found",
            SinkErrorKind::AlreadyExists => "already exists",
            SinkErrorKind::InvalidKey => "invalid key",
            SinkErrorKind::InvalidConfig => "invalid sink configuration",
            SinkErrorKind::Transient => "transient failure",
            SinkErrorKind::Permanent => "failed",
        };
        write!(f, "sink {} `{}`: {what}", self.op, self.key)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}
