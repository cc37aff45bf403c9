//! The local-directory sink: each object is a file under a root directory, its key the relative
//! path. Puts write a temporary file under `<root>/.tmp/`, fsync it, then rename it into place
//! (or hard-link it, for [`PutMode::Create`], which fails atomically if the name exists) and fsync
//! the directory, so an object is either wholly there and durable or not there at all.
//!
//! Objects of [`DIRECT_IO_MIN_BYTES`] or more (blobs) are written and read with `O_DIRECT`: a cycle
//! writes or reads each once, so going through the page cache would only cost a copy per byte and
//! evict what the machine's applications cache. Reads land in aligned buffers from the sink's
//! pool; writes go straight from the caller's bytes when they are aligned (the core encodes blobs
//! into aligned buffers), else through one aligned copy. A file system that refuses `O_DIRECT`
//! (tmpfs) is served through the page cache as before.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::buf::{ALIGN_BYTES, BufPool, PooledBuf, is_aligned};
use crate::key::{validate_key, validate_prefix};
use crate::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind};

const TMP_DIR: &str = ".tmp";

/// Objects at least this large are written and read with `O_DIRECT`.
pub const DIRECT_IO_MIN_BYTES: usize = 64 << 10;

/// Freed read buffers the sink keeps for the next gets.
const POOL_KEEP: usize = 16;

/// A sink on a local directory (the embedded default).
#[derive(Debug, Clone)]
pub struct LocalDirSink {
    root: Arc<PathBuf>,
    /// Buffers of gets (and of aligned copies of puts), reused.
    pool: Arc<BufPool>,
}

impl LocalDirSink {
    /// Opens the sink at `root`, creating the directory if it does not exist.
    pub fn create(root: impl AsRef<Path>) -> Result<Self, SinkError> {
        let root = root.as_ref().to_path_buf();
        let shown = root.display().to_string();
        fs::create_dir_all(root.join(TMP_DIR)).map_err(|e| SinkError::io("open", &shown, e))?;
        let meta = fs::metadata(&root).map_err(|e| SinkError::io("open", &shown, e))?;
        if !meta.is_dir() {
            return Err(SinkError::new(
                SinkErrorKind::InvalidConfig,
                "open",
                &shown,
                "the sink path is not a directory",
            ));
        }
        sweep_abandoned_tmp(&root.join(TMP_DIR));
        Ok(LocalDirSink {
            root: Arc::new(root),
            pool: BufPool::new(POOL_KEEP),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds the object under `key` (the key must be valid).
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    async fn blocking<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, SinkError>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T, SinkError> + Send + 'static,
    {
        let root = Arc::clone(&self.root);
        tokio::task::spawn_blocking(move || f(&root))
            .await
            .map_err(|e| SinkError::new(SinkErrorKind::Permanent, op, key, e.to_string()))?
    }
}

/// `<pid>-<24 hex digits>`: the writer's process id lets a later opener remove what a killed
/// writer left behind, and never what a live one is writing.
fn tmp_name() -> Result<String, io::Error> {
    let mut raw = [0u8; 12];
    getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}-{hex}", std::process::id()))
}

/// Removes temporary files of puts whose writer process is gone (killed between writing and
/// renaming). Files of live processes, and names without a process id, are left alone; a
/// failure to remove is only logged: this is housekeeping.
fn sweep_abandoned_tmp(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        if let Err(e) = fs::remove_file(entry.path()) {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an abandoned temporary file");
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn put_blocking(
    root: &Path,
    key: &str,
    data: &[u8],
    mode: PutMode,
    pool: &Arc<BufPool>,
) -> Result<(), SinkError> {
    let io_err = |e| SinkError::io("put", key, e);
    if !root.join(TMP_DIR).is_dir() {
        return Err(SinkError::new(
            SinkErrorKind::Permanent,
            "put",
            key,
            format!(
                "the sink directory {} is gone or unreadable",
                root.display()
            ),
        ));
    }
    let final_path = root.join(key);
    let parent = final_path.parent().unwrap_or(root).to_path_buf();
    // Makes the key's directories, their entries durable up to the root.
    let make_parent = || -> io::Result<()> {
        fs::create_dir_all(&parent)?;
        let mut dir = parent.as_path();
        while let Some(up) = dir.parent() {
            sync_dir(up)?;
            if up == root {
                break;
            }
            dir = up;
        }
        Ok(())
    };
    let tmp = root.join(TMP_DIR).join(tmp_name().map_err(io_err)?);
    let result = (|| {
        if !write_direct(&tmp, data, pool)? {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
        }
        let place = || match mode {
            PutMode::Overwrite => fs::rename(&tmp, &final_path),
            PutMode::Create => fs::hard_link(&tmp, &final_path),
        };
        // A delete that empties a directory removes it (see `delete_blocking`), also while
        // this put makes it or moves into it: then both are done again.
        let mut attempts = 0;
        let placed = loop {
            let placed = (|| {
                if !parent.is_dir() {
                    make_parent()?;
                }
                place()
            })();
            match placed {
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 8 && tmp.exists() => {
                    attempts += 1;
                }
                placed => break placed,
            }
        };
        if mode == PutMode::Create {
            fs::remove_file(&tmp)?;
        }
        placed
    })();
    if result.is_err() {
        // Best effort: a leftover temporary file is invisible to readers and listing.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)?;
    sync_dir(&parent).map_err(io_err)
}

/// Whether opening with `O_DIRECT` failed because the file system does not take it (tmpfs says
/// `EINVAL`): then the page cache serves instead.
fn direct_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Opens `path` with `opts` and `O_DIRECT`; None when the file system refuses direct I/O.
fn open_direct(opts: &mut OpenOptions, path: &Path) -> io::Result<Option<File>> {
    match opts.custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if direct_refused(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `data` into the new file `tmp` and syncs it: its whole aligned blocks with `O_DIRECT`,
/// the last partial block through the page cache. False, with nothing created, when `data` is
/// small or the file system refuses direct I/O.
fn write_direct(tmp: &Path, data: &[u8], pool: &Arc<BufPool>) -> io::Result<bool> {
    if data.len() < DIRECT_IO_MIN_BYTES {
        return Ok(false);
    }
    let Some(file) = open_direct(OpenOptions::new().write(true).create_new(true), tmp)? else {
        return Ok(false);
    };
    let whole = data.len() / ALIGN_BYTES * ALIGN_BYTES;
    let copy;
    let body = if is_aligned(data) {
        &data[..whole]
    } else {
        let mut buf = pool.take(whole);
        buf.as_mut_slice().copy_from_slice(&data[..whole]);
        copy = buf;
        copy.as_slice()
    };
    file.write_all_at(body, 0)?;
    // The last partial block through the page cache (cutting a padded block back with a
    // truncate costs a metadata update, slower than this small copy); the sync covers both.
    if whole < data.len() {
        OpenOptions::new()
            .write(true)
            .open(tmp)?
            .write_all_at(&data[whole..], whole as u64)?;
    }
    file.sync_all()?;
    Ok(true)
}

/// Reads the whole of `file` (`len` bytes) into an aligned pooled buffer with `O_DIRECT`. None
/// when the file system refuses direct reads of it.
fn read_direct(path: &Path, pool: &Arc<BufPool>) -> io::Result<Option<PooledBuf>> {
    let Some(file) = open_direct(OpenOptions::new().read(true), path)? else {
        return Ok(None);
    };
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::other("the object is larger than this machine's address space"))?;
    if len < DIRECT_IO_MIN_BYTES {
        return Ok(None);
    }
    let padded = len.div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
    let mut buf = pool.take(padded);
    if !buf.is_aligned() {
        return Ok(None);
    }
    let mut got = 0usize;
    // The last block is read whole; the file ends inside it, so that read comes back short.
    while got < padded {
        match file.read_at(&mut buf.as_mut_slice()[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if direct_refused(&e) && got == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    if got != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the object is {len} bytes but {got} could be read; it changed while read"),
        ));
    }
    buf.truncate(len);
    Ok(Some(buf))
}

fn get_blocking(root: &Path, key: &str, pool: &Arc<BufPool>) -> Result<Bytes, SinkError> {
    let path = root.join(key);
    let io_err = |e| SinkError::io("get", key, e);
    if let Some(buf) = read_direct(&path, pool).map_err(io_err)? {
        return Ok(buf.into_bytes());
    }
    let mut file = File::open(&path).map_err(io_err)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(io_err)?;
    Ok(Bytes::from(buf))
}

fn list_blocking(root: &Path, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
    // Start the walk at the deepest directory the prefix names completely.
    let start_rel = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let start = if start_rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(start_rel)
    };
    let mut out = Vec::new();
    let mut stack = vec![(start, start_rel.to_owned())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SinkError::io("list", prefix, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| SinkError::io("list", prefix, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let key = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            // An entry deleted since the directory was read (a concurrent delete, such as the
            // source's garbage collection) is not listed rather than failing the list.
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SinkError::io("list", prefix, e)),
            };
            if file_type.is_dir() {
                // Descend only where keys below can still match the prefix.
                let dir_key = format!("{key}/");
                if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                    stack.push((entry.path(), key));
                }
            } else if file_type.is_file() && key.starts_with(prefix) {
                let size_bytes = match entry.metadata() {
                    Ok(m) => m.len(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(SinkError::io("list", prefix, e)),
                };
                out.push(ObjectMeta { key, size_bytes });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn delete_blocking(root: &Path, key: &str) -> Result<(), SinkError> {
    let path = root.join(key);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SinkError::io("delete", key, e)),
    }
    // An object store has no directories: the key's directories go with their last object, or
    // they would pile up (one per cycle) and every listing would walk them. A directory that is
    // not empty (or already gone) stays and ends the climb; a put racing for it makes it again.
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) || fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[async_trait]
impl Sink for LocalDirSink {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), SinkError> {
        validate_key("put", key)?;
        let owned = key.to_owned();
        let pool = Arc::clone(&self.pool);
        self.blocking("put", key, move |root| {
            put_blocking(root, &owned, &data, mode, &pool)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        validate_key("get", key)?;
        let owned = key.to_owned();
        let pool = Arc::clone(&self.pool);
        self.blocking("get", key, move |root| get_blocking(root, &owned, &pool))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        validate_prefix(prefix)?;
        let owned = prefix.to_owned();
        self.blocking("list", prefix, move |root| list_blocking(root, &owned))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), SinkError> {
        validate_key("delete", key)?;
        let owned = key.to_owned();
        self.blocking("delete", key, move |root| delete_blocking(root, &owned))
            .await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_sizes(dir: &Path) -> Vec<bool> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sink = LocalDirSink::create(dir).unwrap();
        let pool = BufPool::new(2);
        let mut aligned_gets = Vec::new();
        for (i, len) in [
            0,
            100,
            DIRECT_IO_MIN_BYTES - 1,
            DIRECT_IO_MIN_BYTES,
            DIRECT_IO_MIN_BYTES + 1,
            (1 << 20) + 4095,
            3 << 20,
        ]
        .into_iter()
        .enumerate()
        {
            let content: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
            // Aligned bytes (as the core encodes blobs) and unaligned ones (a slice one byte in).
            let mut aligned = pool.take(len);
            aligned.as_mut_slice().copy_from_slice(&content);
            let mut shifted = vec![0u8; len + 1];
            shifted[1..].copy_from_slice(&content);
            let unaligned = Bytes::from(shifted).slice(1..);
            for (name, data) in [("a", aligned.into_bytes()), ("u", unaligned)] {
                let key = format!("d/{name}{len}");
                rt.block_on(sink.put(&key, data, PutMode::Create)).unwrap();
                assert_eq!(fs::metadata(sink.path_of(&key)).unwrap().len(), len as u64);
                let got = rt.block_on(sink.get(&key)).unwrap();
                assert!(got == content, "{key}: {len} bytes came back changed");
                aligned_gets.push(is_aligned(&got) && len >= DIRECT_IO_MIN_BYTES);
            }
        }
        assert_eq!(
            fs::read_dir(dir.join(TMP_DIR)).unwrap().count(),
            0,
            "no temporary file is left"
        );
        aligned_gets
    }

    #[test]
    fn objects_of_every_size_round_trip_with_direct_io() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let direct = round_trip_sizes(dir.path());
        // The three sizes of 64 KiB or more, each put aligned and unaligned, were read directly
        // into aligned buffers (this crate's directory is on a disk file system).
        assert_eq!(direct.iter().filter(|&&d| d).count(), 8, "{direct:?}");
    }

    #[test]
    fn objects_round_trip_on_tmpfs_too() {
        // tmpfs took O_DIRECT only from Linux 6.6 on; older kernels refuse it (EINVAL) and the
        // sink falls back to the page cache. Either way every object must come back whole.
        let shm = Path::new("/dev/shm");
        assert!(
            shm.is_dir(),
            "/dev/shm (tmpfs) is needed for this test: mount it (mount -t tmpfs tmpfs /dev/shm)"
        );
        let dir = tempfile::tempdir_in(shm).unwrap();
        round_trip_sizes(dir.path());
    }

    #[test]
    fn listing_while_objects_are_deleted_never_fails() {
        // A target lists a disk's manifests while the source's garbage collection deletes old
        // ones: an object gone between the directory read and its size is simply not listed.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join(TMP_DIR)).unwrap();
        let objects = root.join("d/manifests");
        fs::create_dir_all(&objects).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (objects, stop) = (objects.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    for i in 0..64 {
                        fs::write(objects.join(i.to_string()), b"m").unwrap();
                    }
                    for i in 0..64 {
                        fs::remove_file(objects.join(i.to_string())).unwrap();
                    }
                }
            })
        };
        let mut seen = 0usize;
        let result = (0..3000)
            .try_for_each(|_| list_blocking(&root, "d/manifests/").map(|l| seen += l.len()));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        churn.join().unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert!(seen > 0, "the lists saw objects");
    }

    #[test]
    fn temporary_files_of_dead_writers_are_swept_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(TMP_DIR);
        fs::create_dir_all(&tmp).unwrap();
        // A pid above any Linux pid_max: its writer is certainly gone.
        let dead = tmp.join("4294967295-00112233445566778899aabb");
        let live = tmp.join(format!("{}-00112233445566778899aabb", std::process::id()));
        let unknown = tmp.join("00112233445566778899aabb");
        for f in [&dead, &live, &unknown] {
            fs::write(f, b"partial").unwrap();
        }
        LocalDirSink::create(dir.path()).unwrap();
        assert!(!dead.exists(), "a dead writer's file is removed");
        assert!(live.exists() && unknown.exists(), "others are left alone");
    }

    #[test]
    fn a_directory_goes_with_its_last_object_and_comes_back_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sink = LocalDirSink::create(dir.path()).unwrap();
        rt.block_on(async {
            for key in [
                "d/blobs/1/1/0",
                "d/blobs/1/1/1",
                "d/blobs/2/1/0",
                "d/acks/1",
            ] {
                sink.put(key, Bytes::from_static(b"x"), PutMode::Create)
                    .await
                    .unwrap();
            }
            sink.delete("d/blobs/1/1/0").await.unwrap();
            assert!(
                dir.path().join("d/blobs/1/1").is_dir(),
                "one object is left in it"
            );
            sink.delete("d/blobs/1/1/1").await.unwrap();
            assert!(
                !dir.path().join("d/blobs/1").exists(),
                "emptied directories go"
            );
            assert!(dir.path().join("d/blobs/2/1/0").is_file(), "others stay");
            sink.delete("d/blobs/2/1/0").await.unwrap();
            sink.delete("d/acks/1").await.unwrap();
            assert!(!dir.path().join("d").exists(), "up to the root");
            assert!(
                dir.path().join(TMP_DIR).is_dir(),
                "the root and its .tmp stay"
            );
            // Deleting what is gone is fine, and a put makes the directories again.
            sink.delete("d/acks/1").await.unwrap();
            sink.put("d/acks/2", Bytes::from_static(b"y"), PutMode::Overwrite)
                .await
                .unwrap();
            assert_eq!(
                sink.get("d/acks/2").await.unwrap(),
                Bytes::from_static(b"y")
            );
            let listed = sink.list("d/").await.unwrap();
            assert_eq!(listed.len(), 1);
        });
    }

    #[test]
    fn puts_and_deletes_racing_for_one_directory_never_fail() {
        // The source's collection deletes acknowledgements while the target puts the next one
        // into the same directory: a delete may remove the directory a put has just made.
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(LocalDirSink::create(dir.path()).unwrap());
        let workers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        for i in 0..300 {
                            let key = format!("d/acks/{name}{i}");
                            let mode = if i % 2 == 0 {
                                PutMode::Create
                            } else {
                                PutMode::Overwrite
                            };
                            sink.put(&key, Bytes::from_static(b"x"), mode).await?;
                            sink.delete(&key).await?;
                        }
                        Ok::<(), SinkError>(())
                    })
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap().unwrap();
        }
    }
}
