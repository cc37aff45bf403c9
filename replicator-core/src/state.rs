//! State directories: what each side remembers between runs, written so a crash at any instant
//! leaves either the old or the new state, never a mix.
//!
//! A state directory is held by one process at a time (an exclusive lock on `lock`). Every file is
//! replaced atomically: written to a temporary name, fsynced, renamed over the old one, and the
//! directory fsynced. JSON files carry a `version`; bitmaps use the checksummed bitmap encoding.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::bitmap::SectorBitmap;
use crate::error::{Error, Result};

/// The version written in every JSON state file.
pub const STATE_VERSION: u32 = 1;

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Opens (creating if needed) and locks the directory. Fails at once if another process
    /// holds it.
    pub fn open(path: &Path) -> Result<Self> {
        fs::create_dir_all(path)
            .map_err(|e| Error::state_io(path, "cannot create the state directory", e))?;
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::state_io(&lock_path, "cannot open the lock file", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::state(
                    &lock_path,
                    "the state directory is in use by another process; wait for it or stop it",
                ));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::state_io(&lock_path, "cannot lock", e));
            }
        }
        Ok(StateDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Reads a JSON file, or `None` if it does not exist.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        read_json_file(&self.file(name))
    }

    /// Replaces a JSON file atomically.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let path = self.file(name);
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::state(&path, format!("cannot serialize: {e}")))?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)
    }

    /// Reads a bitmap file, checking it belongs to a disk of `disk_sectors`.
    pub fn read_bitmap(&self, name: &str, disk_sectors: u64) -> Result<SectorBitmap> {
        let path = self.file(name);
        let bytes = fs::read(&path).map_err(|e| Error::state_io(&path, "cannot read", e))?;
        let bitmap = SectorBitmap::decode(&bytes)
            .map_err(|e| Error::state(&path, format!("damaged bitmap: {e}")))?;
        if bitmap.disk_sectors() != disk_sectors {
            return Err(Error::state(
                &path,
                format!(
                    "bitmap is for a disk of {} sectors, this disk has {disk_sectors}",
                    bitmap.disk_sectors()
                ),
            ));
        }
        Ok(bitmap)
    }

    /// Replaces a bitmap file atomically.
    pub fn write_bitmap(&self, name: &str, bitmap: &SectorBitmap) -> Result<()> {
        write_atomic(&self.file(name), &bitmap.encode())
    }

    /// Removes a file; a missing file is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.file(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::state_io(&path, "cannot remove", e)),
        }
    }
}

/// Reads a JSON state file without taking the directory's lock (for status displays), or `None`
/// if it does not exist.
pub fn read_json_file<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::state_io(path, "cannot read", e)),
    };
    let value: T = serde_json::from_slice(&bytes).map_err(|e| {
        Error::state(
            path,
            format!(
                "not valid state at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    Ok(Some(value))
}

/// The source side's state file in a state directory.
pub const SOURCE_FILE: &str = "source.json";
/// The target side's state file in a state directory.
pub const TARGET_FILE: &str = "target.json";

/// Writes `bytes` to `path` atomically and durably (temporary file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| Error::state_io(path, "cannot write", e))
}

/// A source cycle shipped but not yet acknowledged by the target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingCycle {
    /// The cycle number.
    pub cycle: u64,
    /// The target cycle it applies on top of.
    pub base_cycle: u64,
    /// The tracker epoch it froze (told to the tracker when the target acknowledges it).
    #[serde(default)]
    pub epoch: u64,
}

/// A cycle whose blobs were being written when the source stopped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InFlightCycle {
    /// The cycle number.
    pub cycle: u64,
    /// The attempt that was writing it.
    pub attempt: u64,
    /// Its base cycle.
    pub base_cycle: u64,
    /// The tracker epoch it froze.
    #[serde(default)]
    pub epoch: u64,
}

/// A checksum resync the source owes the target: until it is done, no delta is shipped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResyncState {
    /// Why (lost tracking, a generation mismatch, the operator asked).
    pub reason: String,
    /// The number of the digest-catalog request put in the cache for it, once put.
    #[serde(default)]
    pub requested: Option<u64>,
}

/// `source.json`: the source side's memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceState {
    /// Always [`STATE_VERSION`].
    pub version: u32,
    /// The disk's id (32 hex digits).
    pub disk_id: String,
    /// The source disk's size when first shipped.
    pub disk_bytes: u64,
    /// The number the next cycle gets (1 = the initial copy).
    pub next_cycle: u64,
    /// Cycle attempts started so far; each attempt gets a new number (nonce safety).
    pub attempts: u64,
    /// The newest cycle the target acknowledged as applied (0 = none).
    pub acked_cycle: u64,
    /// Shipped cycles awaiting the target's acknowledgement, oldest first. The sectors of each
    /// are in `pending-<cycle>.bmap`.
    pub pending: Vec<PendingCycle>,
    /// A cycle whose blobs were being written, if the source stopped mid-cycle.
    pub in_flight: Option<InFlightCycle>,
    /// The kind of tracker the disk was last shipped with (`cbt`, `hrl`, `kernel`).
    #[serde(default)]
    pub tracker_kind: Option<String>,
    /// That tracker state's generation: another one means its marks cannot be trusted.
    #[serde(default)]
    pub tracker_generation: Option<String>,
    /// The target state's generation, from its acknowledgements: another one means the target
    /// was replaced or restored.
    #[serde(default)]
    pub target_generation: Option<String>,
    /// A checksum resync to do before the next delta.
    #[serde(default)]
    pub resync: Option<ResyncState>,
    /// Resync requests put in the cache so far (the next one gets this number plus one).
    #[serde(default)]
    pub requests_put: u64,
    /// The newest target catalog already dealt with.
    #[serde(default)]
    pub catalog_seen: u64,
    /// When the last shipped cycle froze the tracker, Unix milliseconds (churn per interval).
    #[serde(default)]
    pub last_freeze_unix_ms: Option<u64>,
}

/// `target.json`: the target side's memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetState {
    /// Always [`STATE_VERSION`].
    pub version: u32,
    /// The disk's id (32 hex digits).
    pub disk_id: String,
    /// The newest cycle applied and reconciled (0 = none): the target holds the source as of
    /// that cycle's freeze.
    pub committed_cycle: u64,
    /// When it was committed, Unix milliseconds.
    pub committed_unix_ms: u64,
    /// Whether the acknowledgement of `committed_cycle` is known to be in the cache.
    pub committed_acked: bool,
    /// A cycle being applied: set before its first byte is written, cleared when it commits.
    /// While set, the target holds a mix of two cycles and must not be used.
    pub applying_cycle: Option<u64>,
    /// Cycles that failed verification here; never applied, superseded by later cycles.
    pub failed_cycles: Vec<u64>,
    /// This target state's generation (32 hex digits), made with it and sent in every
    /// acknowledgement and catalog: a source that sees another one knows the target was replaced.
    #[serde(default)]
    pub generation: Option<String>,
    /// Digest catalogs put in the cache so far (the next one gets this number plus one).
    #[serde(default)]
    pub catalogs_published: u64,
    /// The newest resync request answered with a catalog.
    #[serde(default)]
    pub answered_request: u64,
    /// The committed cycle at which a catalog was last sent unasked (the target could apply
    /// nothing in the cache), so it is sent once per cycle, not at every hydrate.
    #[serde(default)]
    pub stuck_catalog_at: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_is_refused_with_a_clear_error()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let first = StateDir::open(dir.path())?;
        let second = StateDir::open(dir.path());
        let msg = second.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("in use by another process"), "{msg}");
        drop(first);
        assert!(StateDir::open(dir.path()).is_ok());
        Ok(())
    }

    #[test]
    fn damaged_json_names_file_and_line() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        fs::write(state.file("target.json"), "{\n  \"version\": 1,\n  oops\n}")?;
        let err = state
            .read_json::<TargetState>("target.json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("target.json") && err.contains("line 3"),
            "{err}"
        );
        Ok(())
    }
}
