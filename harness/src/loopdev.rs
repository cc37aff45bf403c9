//! Loop devices, through `losetup`: made over sparse backing files, attached with direct I/O
//! where the backing file system allows it, and detached on every way out of the process.
//!
//! Every attached [`LoopDevice`] is in a process-wide registry until it is detached. Dropping one
//! detaches it; SIGINT or SIGTERM (a handler thread, installed with the first attach) detaches
//! every registered device and exits with 128 + the signal; a panic on the main thread (a panic
//! hook, also installed with the first attach) detaches them all before the process unwinds or
//! aborts. A device is detached only while sysfs still shows our backing file behind it, so a
//! late drop never detaches a device another process attached since. `losetup -d` of a device
//! still open elsewhere marks it to detach on its last close (the kernel's autoclear), so an exit
//! path never waits for other users.
//!
//! Test hook: with `HARNESS_TEST_PANIC_AFTER_LOOP_ATTACH=1` in the environment the first attach
//! panics right after it registered its device, so a test can check that a panicking harness
//! leaves no loop device behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Attempts of `losetup --find` before giving up: concurrent attaches (other processes, other
/// tests) can pick the same free device, and all but one then fail with "busy".
const ATTACH_ATTEMPTS_MAX: u32 = 40;
/// Wait after the first failed attempt; doubles up to [`ATTACH_RETRY_WAIT_MAX`].
const ATTACH_RETRY_WAIT: Duration = Duration::from_millis(5);
const ATTACH_RETRY_WAIT_MAX: Duration = Duration::from_millis(200);
/// How long the panic hook waits for the registry lock (the panicking thread may hold it).
const HOOK_LOCK_WAIT: Duration = Duration::from_millis(500);
/// The environment variable of the panic test hook.
pub const PANIC_HOOK_ENV: &str = "HARNESS_TEST_PANIC_AFTER_LOOP_ATTACH";

/// An attached device, as the registry knows it.
#[derive(Clone, Debug)]
struct Entry {
    path: PathBuf,
    backing: PathBuf,
}

static REGISTRY: Mutex<BTreeMap<u64, Entry>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static HANDLERS: Once = Once::new();
static PANIC_TEST_HOOK: Once = Once::new();

fn registry() -> MutexGuard<'static, BTreeMap<u64, Entry>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// An attached loop device; detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    id: u64,
    path: PathBuf,
    backing: PathBuf,
    direct_io: bool,
}

impl LoopDevice {
    /// Creates (or truncates) `backing` as a sparse file of `size_bytes` (a positive multiple of
    /// 512) and attaches it.
    pub fn create(backing: &Path, size_bytes: u64) -> Result<Self> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
            bail!(
                "a loop device's size must be a positive multiple of 512 bytes, not {size_bytes} \
                 (for {})",
                backing.display()
            );
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(backing)
            .with_context(|| format!("creating the backing file {}", backing.display()))?;
        file.set_len(size_bytes)
            .with_context(|| format!("sizing {} to {size_bytes} bytes", backing.display()))?;
        drop(file);
        Self::attach(backing)
    }

    /// Attaches `image` to a free loop device, with direct I/O when the backing file system
    /// allows it (else buffered, said through tracing).
    pub fn attach(image: &Path) -> Result<Self> {
        install_handlers();
        let backing = std::fs::canonicalize(image)
            .with_context(|| format!("finding the backing file {}", image.display()))?;
        let dev = {
            // Held across losetup: a signal handler that detaches everything waits for the
            // device to be registered, so none escapes it.
            let mut reg = registry();
            let path = losetup_attach(&backing)?;
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            reg.insert(
                id,
                Entry {
                    path: path.clone(),
                    backing: backing.clone(),
                },
            );
            let direct_io = sysfs_loop_attr(&path, "dio").is_some_and(|v| v == "1");
            LoopDevice {
                id,
                path,
                backing,
                direct_io,
            }
        };
        if !dev.direct_io {
            tracing::info!(
                device = %dev.path.display(),
                backing = %dev.backing.display(),
                "direct I/O is not available over this backing file; the loop device uses \
                 buffered I/O (slower at deep queues)"
            );
        }
        if std::env::var_os(PANIC_HOOK_ENV).is_some_and(|v| v == "1") {
            PANIC_TEST_HOOK.call_once(|| {
                panic!(
                    "{PANIC_HOOK_ENV}=1: panicking after attaching {} (a test hook)",
                    dev.path.display()
                )
            });
        }
        Ok(dev)
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing file (canonical path).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Whether the loop device does direct I/O on its backing file.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Detaches now, reporting a failure (dropping detaches too, but can only log one).
    #[allow(dead_code)] // for callers that must know, like the scenario runner
    pub fn detach(self) -> Result<()> {
        // Under the lock: a signal handler never exits between the removal and the detach.
        let mut reg = registry();
        let result = match reg.remove(&self.id) {
            Some(e) => detach_entry(&e),
            None => Ok(()),
        };
        drop(reg);
        std::mem::forget(self);
        result
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Under the lock, as in `detach`. Gone from the registry: a signal or panic handler
        // detached it already.
        let mut reg = registry();
        let Some(entry) = reg.remove(&self.id) else {
            return;
        };
        if let Err(e) = detach_entry(&entry) {
            tracing::warn!(device = %entry.path.display(), "{e:#}; run losetup -d by hand");
        }
    }
}

/// Runs `losetup --find --show`, retrying when another attach took the device it found, and
/// without direct I/O when the backing file system refuses it.
fn losetup_attach(backing: &Path) -> Result<PathBuf> {
    let mut wait = ATTACH_RETRY_WAIT;
    let mut direct = true;
    let mut last = String::new();
    for _ in 0..ATTACH_ATTEMPTS_MAX {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct {
            cmd.arg("--direct-io=on");
        }
        let out = cmd
            .arg(backing)
            .output()
            .context("running losetup (install util-linux, and run as root)")?;
        if out.status.success() {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if !path.starts_with("/dev/") {
                bail!(
                    "losetup printed an unexpected device name {}",
                    path.display()
                );
            }
            return Ok(path);
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let lower = last.to_ascii_lowercase();
        if lower.contains("permission denied") || lower.contains("operation not permitted") {
            bail!(
                "losetup could not attach {}: {last} (loop devices need root)",
                backing.display()
            );
        }
        if direct && lower.contains("direct") {
            tracing::info!(backing = %backing.display(), "losetup refused direct I/O ({last}); attaching with buffered I/O");
            direct = false;
            continue;
        }
        // "failed to set up loop device: Device or resource busy" and the like: another attach
        // took the device between losetup's find and its setup.
        // Real time: the retry waits for other processes, not for anything simulated.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(wait);
        wait = (wait * 2).min(ATTACH_RETRY_WAIT_MAX);
    }
    bail!(
        "losetup could not attach {} after {ATTACH_ATTEMPTS_MAX} attempts: {last}",
        backing.display()
    )
}

/// `/sys/block/<loopN>/loop/<attr>`, trimmed, if the device is attached.
fn sysfs_loop_attr(dev: &Path, attr: &str) -> Option<String> {
    let name = dev.file_name()?;
    let p = Path::new("/sys/block").join(name).join("loop").join(attr);
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

/// Detaches the device of `entry` if it still has our backing file behind it.
fn detach_entry(entry: &Entry) -> Result<()> {
    match sysfs_loop_attr(&entry.path, "backing_file") {
        Some(b) if Path::new(&b) == entry.backing => {}
        // Detached already, or reused by someone else since: not ours to touch.
        _ => return Ok(()),
    }
    let out = Command::new("losetup")
        .arg("-d")
        .arg(&entry.path)
        .output()
        .context("running losetup -d")?;
    if !out.status.success() {
        bail!(
            "could not detach the loop device {} (over {}): {}",
            entry.path.display(),
            entry.backing.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Detaches every registered device (the registry is emptied); returns how many were detached
/// and the failures.
fn detach_all(reg: &mut BTreeMap<u64, Entry>) -> (usize, Vec<String>) {
    let entries = std::mem::take(reg);
    let mut failures = Vec::new();
    for e in entries.values() {
        if let Err(err) = detach_entry(e) {
            failures.push(format!("{err:#}"));
        }
    }
    (entries.len(), failures)
}

/// Devices attached now by this process (for messages and tests).
#[allow(dead_code)] // for callers that report them, like the scenario runner
pub fn attached() -> Vec<PathBuf> {
    registry().values().map(|e| e.path.clone()).collect()
}

/// Installs, once per process, the SIGINT/SIGTERM handler thread and the panic hook that detach
/// every registered device.
fn install_handlers() {
    HANDLERS.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            prev(info);
            // Only the main thread's panic ends the process; another thread's is caught (by
            // tokio, a scope) or leaves the devices to their owners' drops.
            if std::thread::current().name() != Some("main") {
                return;
            }
            // The panicking thread may hold the lock itself: wait a little, never forever.
            let mut waited = Duration::ZERO;
            let step = Duration::from_millis(10);
            loop {
                match REGISTRY.try_lock() {
                    Ok(mut reg) => {
                        report_exit("a panic", detach_all(&mut reg));
                        return;
                    }
                    Err(std::sync::TryLockError::Poisoned(p)) => {
                        report_exit("a panic", detach_all(&mut p.into_inner()));
                        return;
                    }
                    Err(std::sync::TryLockError::WouldBlock) if waited < HOOK_LOCK_WAIT => {
                        // Real time: waiting for another thread's short critical section.
                        #[allow(clippy::disallowed_methods)]
                        std::thread::sleep(step);
                        waited += step;
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {
                        eprintln!(
                            "harness: panicking with the loop-device registry locked; check \
                             `losetup -a` for devices left attached"
                        );
                        return;
                    }
                }
            }
        }));
        if let Err(e) = start_signal_thread() {
            tracing::warn!(
                "cannot watch for SIGINT/SIGTERM ({e}): they would leave loop devices attached"
            );
        }
    });
}

fn report_exit(why: &str, (count, failures): (usize, Vec<String>)) {
    if count > 0 {
        eprintln!(
            "harness: {why}: detached {} loop device(s)",
            count - failures.len()
        );
    }
    for f in failures {
        eprintln!("harness: {f}");
    }
}

/// Registers for SIGINT and SIGTERM now (so none is missed once an attach returned) and starts
/// the thread that waits for them.
fn start_signal_thread() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (int, term) = {
        let _in_runtime = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    std::thread::Builder::new()
        .name("loop-signals".into())
        .spawn(move || signal_thread(rt, int, term))?;
    Ok(())
}

/// Waits for SIGINT or SIGTERM, detaches every registered device and exits with 128 + signal.
fn signal_thread(
    rt: tokio::runtime::Runtime,
    mut int: tokio::signal::unix::Signal,
    mut term: tokio::signal::unix::Signal,
) {
    let signo = rt.block_on(async {
        tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        }
    });
    let name = if signo == libc::SIGINT {
        "interrupted (SIGINT)"
    } else {
        "terminated (SIGTERM)"
    };
    report_exit(name, detach_all(&mut registry()));
    std::process::exit(128 + signo);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root and losetup, or a failure that says how to get them.
    fn require_root() {
        let uid = Command::new("id").arg("-u").output().expect("id");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "loop device tests need root (sudo scripts/test.sh)"
        );
        assert!(
            Command::new("losetup").arg("--version").output().is_ok(),
            "losetup is missing: apt-get install -y mount"
        );
    }

    /// `losetup -j BACKING`: the devices attached over it, by anyone.
    fn attached_over(backing: &Path) -> String {
        let out = Command::new("losetup")
            .arg("-j")
            .arg(backing)
            .output()
            .expect("losetup -j");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn sixty_four_loop_devices_at_once_then_none_left() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..64)
            .map(|i| dir.path().join(format!("disk-{i:02}.img")))
            .collect();
        // Eight threads attach eight each, concurrently, racing for free devices.
        let devices: Vec<LoopDevice> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .chunks(8)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|f| LoopDevice::create(f, 1 << 20))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("attach thread").expect("attach"))
                .collect()
        });
        assert_eq!(devices.len(), 64);
        let mut paths: Vec<&Path> = devices.iter().map(|d| d.path()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 64, "every device is distinct");
        for d in &devices {
            let shown = attached_over(d.backing());
            assert!(
                shown.starts_with(&format!("{}:", d.path().display())),
                "{shown}"
            );
            assert_eq!(
                sysfs_loop_attr(d.path(), "backing_file").as_deref(),
                Some(d.backing().to_str().unwrap())
            );
        }
        drop(devices);
        for f in &files {
            assert_eq!(attached_over(f), "", "{} is still attached", f.display());
        }
    }

    #[test]
    fn create_makes_a_sparse_file_uses_direct_io_and_detach_reports() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sparse.img");
        let d = LoopDevice::create(&f, 64 << 20).unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "the backing file is sparse");
        // ext4 and tmpfs both take direct I/O on this machine.
        assert!(
            d.direct_io(),
            "{} attached without direct I/O",
            d.path().display()
        );
        assert!(attached().contains(&d.path().to_path_buf()));
        let p = d.path().to_path_buf();
        d.detach().unwrap();
        assert!(!attached().contains(&p));
        assert_eq!(attached_over(&f), "");
        let e = LoopDevice::create(&f, 1000).unwrap_err().to_string();
        assert!(
            e.contains("multiple of 512") && e.contains("sparse.img"),
            "{e}"
        );
    }

    #[test]
    fn a_device_detached_by_the_handlers_is_not_detached_again_by_its_drop() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        let da = LoopDevice::create(&a, 1 << 20).unwrap();
        let path_a = da.path().to_path_buf();
        // What the signal and panic handlers do: everything registered goes.
        let mine: BTreeMap<u64, Entry> = registry()
            .iter()
            .filter(|(id, _)| **id == da.id)
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        let mut only_mine = mine;
        let (n, failures) = detach_all(&mut only_mine);
        registry().remove(&da.id);
        assert_eq!((n, failures.len()), (1, 0));
        assert_eq!(attached_over(&a), "");
        // Someone else's device now holds the same node; the late drop must leave it alone.
        std::fs::File::create(&b).unwrap().set_len(1 << 20).unwrap();
        let same_node = Command::new("losetup")
            .arg(&path_a)
            .arg(&b)
            .status()
            .unwrap()
            .success();
        let stranger = if same_node {
            path_a.clone()
        } else {
            // Another process took the node in the meantime: anywhere will do.
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&b)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        };
        drop(da);
        let shown = attached_over(&b);
        let _ = Command::new("losetup").arg("-d").arg(&stranger).status();
        assert!(
            shown.starts_with(&format!("{}:", stranger.display())),
            "a late drop detached a device it did not own: {shown:?}"
        );
        assert_eq!(attached_over(&b), "");
    }
}
