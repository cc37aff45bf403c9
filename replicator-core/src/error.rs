//! The core's error type. Its [`ErrorKind`] tells a caller what to do: retry later, fix the
//! input or configuration, or treat the cycle as failed because data did not verify.

use std::path::PathBuf;

use replicator_sink::SinkError;

use crate::bitmap::{BitmapError, Extent};
use crate::device::DeviceError;
use crate::format::FormatError;

/// What a caller should do about an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A passing failure (a sink timeout): retry later; nothing was lost.
    Transient,
    /// Data failed a check (authentication, checksum, reconciliation, a missing blob): the cycle
    /// failed and its sectors are carried into the next one.
    CycleFailed,
    /// The input or configuration is wrong (a wrong key, a size mismatch, bad arguments).
    InvalidInput,
    /// Local I/O or persisted state failed; fix the machine and re-run.
    Io,
}

/// An error of the replication core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A block device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A cache sink operation failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// An object from the cache failed a check; nothing of it was written.
    #[error("object `{key}` failed verification: {source}")]
    Object {
        /// The object's key in the sink.
        key: String,
        /// The check that failed.
        #[source]
        source: FormatError,
    },
    /// An authenticated object whose contents do not fit the disk or each other.
    #[error("object `{key}` is inconsistent: {detail}")]
    Manifest {
        /// The object's key.
        key: String,
        /// What does not fit.
        detail: String,
    },
    /// What the target wrote differs from what the source said changed.
    #[error(transparent)]
    Reconcile(Box<ReconcileFailure>),
    /// A sector bitmap is invalid or does not fit the disk.
    #[error("sector bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    /// A key file or key problem.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Persisted state (a state directory file) is unreadable or could not be written.
    #[error("state file {path}: {detail}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
        /// The I/O error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// Bad input or configuration, with what to do about it.
    #[error("{0}")]
    InvalidInput(String),
    /// The operating system's random generator failed.
    #[error("cannot draw random bytes from the operating system: {0}")]
    Random(String),
    /// The copy-on-write space of a frozen cycle ran out; the cycle was abandoned and its
    /// sectors carried into the next one.
    #[error(
        "copy-on-write space for the frozen cycle exceeded {limit_bytes} bytes; the cycle was abandoned and its sectors go into the next cycle"
    )]
    CowExhausted {
        /// The limit that was hit.
        limit_bytes: u64,
    },
}

impl Error {
    /// What the caller should do.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Sink(e) if e.is_transient() => ErrorKind::Transient,
            Error::Sink(e) if e.is_not_found() => ErrorKind::CycleFailed,
            Error::Sink(_) => ErrorKind::Io,
            Error::Object { source, .. } if source.is_wrong_key() => ErrorKind::InvalidInput,
            Error::Object { .. }
            | Error::Manifest { .. }
            | Error::Reconcile { .. }
            | Error::CowExhausted { .. } => ErrorKind::CycleFailed,
            Error::Device(_) | Error::State { .. } | Error::Random(_) => ErrorKind::Io,
            Error::Bitmap(_) | Error::Key(_) | Error::InvalidInput(_) => ErrorKind::InvalidInput,
        }
    }

    pub(crate) fn state(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::State {
            path: path.into(),
            detail: detail.into(),
            source: None,
        }
    }

    pub(crate) fn state_io(path: impl Into<PathBuf>, what: &str, err: std::io::Error) -> Self {
        Error::State {
            path: path.into(),
            detail: format!("{what}: {err}"),
            source: Some(err),
        }
    }
}

/// Reconciliation found the target's sectors differ from the source's bitmap.
#[derive(Debug, thiserror::Error)]
#[error(
    "cycle {cycle}: reconciliation failed ({stage}): {missing_sectors} sectors the source \
     changed were not {verb}{first_missing}, {extra_sectors} sectors {verb} that the source did \
     not change{first_extra}{cause}"
)]
pub struct ReconcileFailure {
    /// The cycle.
    pub cycle: u64,
    /// `before writing` (coverage of the verified blobs) or `after writing` (the target's
    /// tracker).
    pub stage: &'static str,
    /// `covered by verified blobs` or `written`.
    pub verb: &'static str,
    /// Sectors in the source bitmap and not on the target side.
    pub missing_sectors: u64,
    /// Sectors on the target side and not in the source bitmap.
    pub extra_sectors: u64,
    /// `, first at sectors A..B`, or empty.
    pub first_missing: String,
    /// `, first at sectors A..B`, or empty.
    pub first_extra: String,
    /// `; ...` naming blobs that could not be used, or empty.
    pub cause: String,
}

/// A fresh random salt for a session.
pub(crate) fn fresh_salt() -> Result<[u8; 16]> {
    crate::format::Session::generate_salt().map_err(|e| Error::Random(e.to_string()))
}

/// `, first at sectors A..B` for messages.
pub(crate) fn first_extent_note(e: Option<Extent>) -> String {
    match e {
        Some(e) => format!(
            ", first at sectors {}..{} (bytes {}..{})",
            e.start_sector,
            e.end_sector(),
            e.offset_bytes(),
            e.offset_bytes() + e.len_bytes()
        ),
        None => String::new(),
    }
}

/// A `Result` of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
