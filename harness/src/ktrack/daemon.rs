//! The tracker daemon: follows one block device's events in a tracefs instance, keeps the marks in
//! epochs, persists them, and serves cycles over a Unix socket.
//!
//! # Threads
//! - The reader consumes the instance's `trace_pipe` line by line and marks every changing event
//!   (queued and completed) in the current epoch.
//! - Each client connection has a thread that serves its requests ([`super::proto`]).
//! - The housekeeper checks the trace buffer's loss counters every second and checkpoints the
//!   marks every `checkpoint_interval` while they changed.
//!
//! # Draining: a freeze sees every event before it
//! Every operation that freezes, changes or persists the marks first *drains*: it writes a marker
//! with a fresh sequence number into the instance's `trace_marker` and waits until the reader
//! has consumed it. The instance's clock is `global`, so every event recorded before the marker
//! (on any CPU) comes out of `trace_pipe` before it. A write that completed before the freeze has
//! had its `block_rq_complete` (or `block_bio_complete`) recorded, so it is in the frozen epoch;
//! a write that completes after the cycle read its sector records its completion after the
//! freeze, so it is in a later epoch. Extra marks (a queued event landing in the frozen epoch)
//! only ship a sector twice.
//!
//! # Persisting, and proving nothing was missed
//! The state (see [`super::state`]) carries the device's write and discard counters from
//! `/sys/dev/block/M:m/stat`, read *before* the drain that completed the marks it is saved with:
//! every write those counters count had its completion traced before the counters were read,
//! hence before the marker, hence it is in the saved marks. On start, counters that differ from
//! the saved ones mean writes the marks do not hold (the tracker was down, or died after its last
//! checkpoint): tracking is then lost. So are a new boot, a re-attached loop device (a new disk
//! sequence number), a damaged state, a trace buffer that overflowed (per-CPU `overrun` and
//! `dropped events`, or `[LOST N EVENTS]`), a block event line that cannot be parsed, and a reader
//! that stopped. Lost tracking marks the whole disk and is reported by the next freeze; only a
//! committed release of an epoch frozen while lost (and with no new loss since) clears it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use replicator_core::bitmap::SectorBitmap;
use replicator_core::state::write_atomic;
use replicator_core::tracker::Generation;

use super::device::{BlockDev, WriteCounters, boot_id};
use super::marks::{Marks, ReqError, invalid, io_err, release_marks};
use super::parse::{TraceLine, parse_line};
use super::proto::{ErrorKind, Info, Reply, Request, read_frame, write_frame};
use super::recovery::load;
use super::state::{self, DeviceStamp, FrozenState, STATE_FILE, TrackState};
use super::tracefs::Instance;

/// The daemon's socket in its state directory.
pub const SOCKET_FILE: &str = "ktrack.sock";
/// The state directory's lock file.
const LOCK_FILE: &str = "lock";
/// Where per-device locks live (one daemon per device, whatever its state directory).
const DEVICE_LOCK_DIR: &str = "/run/replicator";
/// How long a drain waits for its marker before failing the operation.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the housekeeper checks the trace buffer's loss counters.
pub const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Client connections served at once, at most.
pub const CONNECTIONS_MAX: usize = 16;
/// Bytes read from `trace_pipe` at a time.
const TRACE_READ_BUFFER_BYTES: usize = 64 << 10;
/// Attempts at a final checkpoint whose counters did not move while it was written.
const FINAL_CHECKPOINT_ATTEMPTS: u32 = 3;
/// The first word of the daemon's markers.
const MARKER_PREFIX: &str = "replicator-ktrack";
/// Default trace ring buffer per CPU (KiB): about 100,000 block events.
pub const BUFFER_KB_PER_CPU_DEFAULT: u64 = 8192;
/// Default seconds between checkpoints while the marks change.
pub const CHECKPOINT_SECS_DEFAULT: u64 = 10;

/// What the daemon tracks, where, and how.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The block device node.
    pub device: PathBuf,
    /// The state directory (marks, lock, socket).
    pub state_dir: PathBuf,
    /// Time between checkpoints while the marks change.
    pub checkpoint_interval: Duration,
    /// Trace ring buffer per CPU, KiB.
    pub buffer_kb_per_cpu: u64,
    /// Print a line per freeze and release (the `track` command); quiet in-process.
    pub verbose: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A served connection: a handle on its stream (to shut it down at stop) and its thread.
#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    dev: BlockDev,
    state_path: PathBuf,
    socket_path: PathBuf,
    generation: Generation,
    boot_id: [u8; 16],
    started: String,
    verbose: bool,
    marks: Mutex<Marks>,
    /// Signalled when the reader consumed a marker or failed.
    marker_seen: Condvar,
    /// Held by one drain (and what follows it) at a time.
    drain_lock: Mutex<()>,
    instance: Mutex<Option<Instance>>,
    nonce: String,
    next_marker: AtomicU64,
    /// The reader stops after consuming this marker (0: keep going).
    stop_marker: AtomicU64,
    stopping: AtomicBool,
    /// Wakes the housekeeper at stop.
    wake: (Mutex<bool>, Condvar),
    next_conn: AtomicU64,
    connections: Mutex<HashMap<u64, Connection>>,
}

impl Shared {
    fn write_marker(&self, seq: u64) -> Result<()> {
        let guard = lock(&self.instance);
        let instance = guard
            .as_ref()
            .ok_or_else(|| anyhow!("the tracker is stopping"))?;
        instance.write_marker(&format!("{MARKER_PREFIX} {} {seq}\n", self.nonce))
    }

    fn marker_seq(&self, payload: &str) -> Option<u64> {
        let rest = payload.strip_prefix(MARKER_PREFIX)?.trim();
        let (nonce, seq) = rest.split_once(' ')?;
        if nonce != self.nonce {
            return None;
        }
        seq.trim().parse().ok()
    }

    /// Waits until the reader consumed every event recorded before now. Caller holds
    /// `drain_lock`.
    fn drain(&self) -> Result<()> {
        let seq = self.next_marker.fetch_add(1, Ordering::SeqCst);
        self.write_marker(seq)?;
        let marks = lock(&self.marks);
        let (marks, timeout) = self
            .marker_seen
            .wait_timeout_while(marks, DRAIN_TIMEOUT, |m| {
                m.seen_marker < seq && m.reader_failed.is_none()
            })
            .unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &marks.reader_failed {
            bail!("the trace reader stopped ({f})");
        }
        if timeout.timed_out() {
            bail!(
                "the trace reader did not reach marker {seq} within {} s",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        Ok(())
    }

    /// Marks tracking lost if the device under the tracker changed: resized, or attached anew
    /// (a loop device detached and attached again keeps its numbers, not its disk sequence).
    fn check_device(&self) -> Result<()> {
        let (size_bytes, diskseq) = self.dev.size_and_diskseq()?;
        if (size_bytes, diskseq) != (self.dev.size_bytes, self.dev.diskseq) {
            lock(&self.marks).set_lost(format!(
                "{} changed under the tracker (size {} -> {size_bytes} bytes, disk sequence {} -> \
                 {diskseq}): restart the tracker, with a new state directory if it is another disk",
                self.dev.describe(),
                self.dev.size_bytes,
                self.dev.diskseq
            ));
        }
        Ok(())
    }

    /// Marks tracking lost if the kernel dropped events since the last check.
    fn check_loss(&self) -> Result<()> {
        let total = {
            let guard = lock(&self.instance);
            let Some(instance) = guard.as_ref() else {
                return Ok(());
            };
            instance.lost_events()?
        };
        let mut m = lock(&self.marks);
        if total > m.lost_events_seen {
            let n = total - m.lost_events_seen;
            m.lost_events_seen = total;
            m.set_lost(format!(
                "the kernel's trace buffer overflowed: {n} block events of {} were never read \
                 (per-CPU overrun/dropped counters); raise --buffer-kb or lower the write rate",
                self.dev.path.display()
            ));
        }
        Ok(())
    }

    fn encode(&self, m: &Marks, counters: WriteCounters, clean_stop: bool) -> Vec<u8> {
        let current = if m.lost.is_some() {
            SectorBitmap::full(m.current.disk_sectors())
        } else {
            m.current.clone()
        };
        state::encode(&TrackState {
            generation: self.generation,
            epoch: m.epoch,
            acked_epoch: m.acked_epoch,
            lost: m.lost.clone(),
            clean_stop,
            device: DeviceStamp {
                boot_id: self.boot_id,
                major: self.dev.major,
                minor: self.dev.minor,
                size_bytes: self.dev.size_bytes,
                diskseq: self.dev.diskseq,
                counters,
                backing_file: self.dev.backing_file.clone(),
            },
            current,
            frozen: m.frozen.as_ref().map(|f| FrozenState {
                epoch: f.epoch,
                bitmap: f.bitmap.clone(),
                lost: f.lost,
            }),
        })
    }

    fn write_state(&self, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.state_path, bytes)
            .with_context(|| format!("persisting the marks to {}", self.state_path.display()))
    }

    /// Reads the counters, drains, checks for loss, applies `f`, and (if `persist`) saves the
    /// marks with those counters, all under the drain lock.
    fn drained<T>(
        &self,
        persist: bool,
        f: impl FnOnce(&mut Marks) -> Result<T, ReqError>,
    ) -> Result<T, ReqError> {
        let _drain = lock(&self.drain_lock);
        let counters = self.dev.counters().map_err(io_err)?;
        self.drain().map_err(io_err)?;
        self.check_loss().map_err(io_err)?;
        let (out, bytes) = {
            let mut m = lock(&self.marks);
            let out = f(&mut m)?;
            let bytes = persist.then(|| {
                m.dirty = false;
                m.persisted_lost = m.lost.is_some();
                self.encode(&m, counters, false)
            });
            (out, bytes)
        };
        if let Some(bytes) = bytes
            && let Err(e) = self.write_state(&bytes)
        {
            let mut m = lock(&self.marks);
            m.dirty = true;
            m.persisted_lost = false;
            return Err(io_err(e));
        }
        Ok(out)
    }

    /// Saves a clean-stop state: retried while the counters moved during the save.
    fn final_checkpoint(&self) -> Result<()> {
        let _drain = lock(&self.drain_lock);
        if lock(&self.marks).reader_failed.is_some() {
            // Nothing more can be drained; the state says lost already.
            let counters = self.dev.counters()?;
            let bytes = self.encode(&lock(&self.marks), counters, false);
            return self.write_state(&bytes);
        }
        for _ in 0..FINAL_CHECKPOINT_ATTEMPTS {
            let before = self.dev.counters()?;
            self.drain()?;
            self.check_loss()?;
            let bytes = {
                let mut m = lock(&self.marks);
                m.dirty = false;
                self.encode(&m, before, true)
            };
            self.write_state(&bytes)?;
            if self.dev.counters()? == before {
                return Ok(());
            }
        }
        tracing::warn!(
            "the device kept being written while the tracker stopped; the next start will find the \
             counters moved and report tracking lost"
        );
        Ok(())
    }

    fn info(&self) -> Info {
        let m = lock(&self.marks);
        Info {
            device: self.dev.path.display().to_string(),
            major: self.dev.major,
            minor: self.dev.minor,
            disk_bytes: self.dev.size_bytes,
            backing_file: self.dev.backing_file.clone(),
            generation: self.generation.to_string(),
            epoch: m.epoch,
            frozen_epoch: m.frozen.as_ref().map(|f| f.epoch),
            marked_sectors: if m.lost.is_some() {
                m.current.disk_sectors()
            } else {
                m.current.count()
            },
            lost: m.lost.clone(),
            acked_epoch: m.acked_epoch,
            change_events: m.change_events,
            pid: std::process::id(),
            started: self.started.clone(),
        }
    }

    fn say(&self, line: &str) {
        if self.verbose {
            println!("{line}");
        }
    }

    fn handle(&self, conn: u64, req: Request, body: &[u8]) -> Result<(Reply, Vec<u8>), ReqError> {
        match req {
            Request::Hello => Ok((Reply::Info(self.info()), Vec::new())),
            Request::Status => {
                // Up to date with the events so far, if the reader keeps up; else as it stands.
                if let Err(e) = self.drained(false, |_| Ok(())) {
                    tracing::warn!(error = %e.message, "status without a drain");
                }
                Ok((Reply::Info(self.info()), Vec::new()))
            }
            Request::Current => {
                // The current epoch's own marks; while tracking is lost, the next freeze reports
                // the whole disk whatever they are.
                let bytes = self.drained(false, |m| Ok(m.current.encode()))?;
                Ok((Reply::Bitmap, bytes))
            }
            Request::Freeze => {
                // A freeze refused because an epoch is frozen already must leave that epoch be.
                let frozen_before = lock(&self.marks).frozen.is_some();
                let result = self.drained(true, |m| {
                    let (epoch, lost, bitmap) = m.freeze(conn)?;
                    Ok((epoch, lost, bitmap.encode(), bitmap.count()))
                });
                match result {
                    Ok((epoch, lost, bytes, count)) => {
                        match &lost {
                            Some(reason) => self.say(&format!(
                                "froze epoch {epoch} with tracking lost ({reason}): the whole disk \
                                 ({count} sectors) is marked"
                            )),
                            None => {
                                self.say(&format!("froze epoch {epoch}: {count} sectors marked"))
                            }
                        }
                        Ok((Reply::Frozen { epoch, lost }, bytes))
                    }
                    Err(e) => {
                        // Frozen but not persisted: put the marks back rather than strand them.
                        let mut m = lock(&self.marks);
                        if !frozen_before && m.frozen.as_ref().is_some_and(|f| f.owner == conn) {
                            release_marks(&mut m, conn, false).ok();
                        }
                        Err(e)
                    }
                }
            }
            Request::Release { committed } => {
                let released = self.drained(true, |m| release_marks(m, conn, committed))?;
                if let Some((epoch, cleared)) = released {
                    let what = if committed { "committed" } else { "failed" };
                    self.say(&format!("released epoch {epoch} ({what})"));
                    if cleared {
                        self.say(
                            "tracking is no longer lost: a committed cycle compared the whole disk",
                        );
                    }
                }
                Ok((Reply::Done, Vec::new()))
            }
            Request::Carry => {
                let sectors = SectorBitmap::decode(body)
                    .map_err(|e| invalid(format!("the carried bitmap is damaged: {e}")))?;
                self.drained(true, |m| {
                    m.current.union_with(&sectors).map_err(|e| {
                        invalid(format!(
                            "the carried bitmap does not fit {} ({} sectors): {e}",
                            self.dev.path.display(),
                            m.current.disk_sectors()
                        ))
                    })
                })?;
                Ok((Reply::Done, Vec::new()))
            }
            Request::MarkAll => {
                self.drained(true, |m| {
                    m.current = SectorBitmap::full(m.current.disk_sectors());
                    Ok(())
                })?;
                Ok((Reply::Done, Vec::new()))
            }
            Request::Acknowledged { epoch } => {
                self.drained(true, |m| {
                    m.acked_epoch = m.acked_epoch.max(epoch);
                    Ok(())
                })?;
                Ok((Reply::Done, Vec::new()))
            }
            Request::Checkpoint => {
                self.drained(true, |_| Ok(()))?;
                Ok((Reply::Done, Vec::new()))
            }
        }
    }

    /// A connection went away: an epoch it froze goes back, as after a failed cycle.
    fn release_owned(&self, conn: u64) {
        let owns = lock(&self.marks)
            .frozen
            .as_ref()
            .is_some_and(|f| f.owner == conn);
        if !owns {
            return;
        }
        match self.drained(true, |m| release_marks(m, conn, false)) {
            Ok(Some((epoch, _))) => self.say(&format!(
                "released epoch {epoch} (failed: its cycle's connection closed without a release)"
            )),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e.message, "could not persist the release of a closed connection's epoch; releasing in memory");
                let _ = release_marks(&mut lock(&self.marks), conn, false);
            }
        }
    }
}

/// The reader thread: consumes `trace_pipe` until the stop marker or a failure.
fn read_trace(shared: Arc<Shared>, pipe: File) {
    let mut reader = BufReader::with_capacity(TRACE_READ_BUFFER_BYTES, pipe);
    let mut line = Vec::with_capacity(256);
    let failure = loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break "the trace pipe ended".to_owned(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("reading the trace pipe failed: {e}"),
        }
        let text = String::from_utf8_lossy(&line);
        match parse_line(&text) {
            TraceLine::Marker(payload) => {
                if let Some(seq) = shared.marker_seq(&payload) {
                    {
                        let mut m = lock(&shared.marks);
                        m.seen_marker = m.seen_marker.max(seq);
                    }
                    shared.marker_seen.notify_all();
                    let stop = shared.stop_marker.load(Ordering::SeqCst);
                    if stop != 0 && seq >= stop {
                        return;
                    }
                }
            }
            TraceLine::NoChange | TraceLine::Other => {}
            other => lock(&shared.marks).apply(
                &other,
                (shared.dev.major, shared.dev.minor),
                &shared.dev.path,
            ),
        }
    };
    tracing::error!(%failure, "the trace reader stopped");
    {
        let mut m = lock(&shared.marks);
        m.set_lost(format!("the trace reader stopped: {failure}"));
        m.reader_failed = Some(failure);
    }
    shared.marker_seen.notify_all();
    *lock(&shared.wake.0) = true;
    shared.wake.1.notify_all();
}

fn housekeep(shared: Arc<Shared>, checkpoint_interval: Duration) {
    let ticks_per_checkpoint =
        (checkpoint_interval.as_millis() / LOSS_CHECK_INTERVAL.as_millis().max(1)).max(1);
    let mut ticks = 0u128;
    loop {
        {
            let woken = lock(&shared.wake.0);
            let (woken, _) = shared
                .wake
                .1
                .wait_timeout_while(woken, LOSS_CHECK_INTERVAL, |w| !*w)
                .unwrap_or_else(|p| p.into_inner());
            if *woken {
                return;
            }
        }
        ticks += 1;
        if let Err(e) = shared.check_loss() {
            tracing::warn!(error = %format!("{e:#}"), "could not read the trace buffer's loss counters");
        }
        if let Err(e) = shared.check_device() {
            tracing::warn!(error = %format!("{e:#}"), "could not check the tracked device");
        }
        let (dirty, newly_lost, failed) = {
            let m = lock(&shared.marks);
            (
                m.dirty,
                m.lost.is_some() && !m.persisted_lost,
                m.reader_failed.is_some(),
            )
        };
        if failed {
            continue;
        }
        if dirty && (ticks >= ticks_per_checkpoint || newly_lost) {
            ticks = 0;
            if let Err(e) = shared.drained(true, |_| Ok(())) {
                tracing::warn!(error = %e.message, "periodic checkpoint failed; retrying");
            }
        }
    }
}

fn serve(shared: Arc<Shared>, conn: u64, mut stream: UnixStream) {
    loop {
        let frame = match read_frame::<Request>(&mut stream) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                let reply = Reply::Error {
                    kind: ErrorKind::Invalid,
                    message: format!("bad request: {e}"),
                };
                let _ = write_frame(&mut stream, &reply, b"");
                break;
            }
        };
        let (req, body) = frame;
        let (reply, out) = match shared.handle(conn, req, &body) {
            Ok(r) => r,
            Err(e) => (
                Reply::Error {
                    kind: e.kind,
                    message: e.message,
                },
                Vec::new(),
            ),
        };
        if write_frame(&mut stream, &reply, &out).is_err() {
            break;
        }
    }
    shared.release_owned(conn);
    lock(&shared.connections).remove(&conn);
}

fn accept(shared: Arc<Shared>, listener: UnixListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                continue;
            }
        };
        let mut conns = lock(&shared.connections);
        if conns.len() >= CONNECTIONS_MAX {
            drop(conns);
            let reply = Reply::Error {
                kind: ErrorKind::Io,
                message: format!(
                    "the tracker serves at most {CONNECTIONS_MAX} connections; close one"
                ),
            };
            let _ = write_frame(&mut stream, &reply, b"");
            continue;
        }
        let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let Ok(handle_stream) = stream.try_clone() else {
            continue;
        };
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("ktrack-conn-{conn}"))
            .spawn(move || serve(s, conn, handle_stream));
        match spawned {
            Ok(h) => {
                conns.insert(
                    conn,
                    Connection {
                        stream,
                        thread: Some(h),
                    },
                );
            }
            Err(e) => tracing::warn!(error = %e, "could not start a connection thread"),
        }
    }
}

/// Takes an exclusive lock on `path`, or says who holds it.
fn lock_file(path: &Path, held: impl FnOnce(&str) -> String) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(path).unwrap_or_default();
            bail!("{}", held(holder.trim()))
        }
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// A running tracker daemon; stopped (cleanly) by [`RunningDaemon::stop`] or when dropped.
#[derive(Debug)]
pub struct RunningDaemon {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    housekeeper: Option<JoinHandle<()>>,
    acceptor: Option<JoinHandle<()>>,
    stopped: bool,
    /// Stop without the final checkpoint, as a crash would (tests).
    crash: bool,
    _dir_lock: File,
    _dev_lock: File,
}

/// Starts tracking `cfg.device`, keeping state in `cfg.state_dir`.
pub fn start(cfg: &DaemonConfig) -> Result<RunningDaemon> {
    fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
    let dir_lock = lock_file(&cfg.state_dir.join(LOCK_FILE), |_| {
        format!(
            "another `harness track` is running on {}; stop it first",
            cfg.state_dir.display()
        )
    })?;
    let dev = BlockDev::resolve(&cfg.device)?;
    if dev.size_bytes == 0 || !dev.size_bytes.is_multiple_of(512) {
        bail!(
            "{} has {} bytes, not a positive multiple of 512",
            dev.path.display(),
            dev.size_bytes
        );
    }
    fs::create_dir_all(DEVICE_LOCK_DIR).with_context(|| {
        format!("creating {DEVICE_LOCK_DIR} for the device locks (the tracker runs as root)")
    })?;
    let dev_lock_path =
        PathBuf::from(DEVICE_LOCK_DIR).join(format!("ktrack-{}-{}.lock", dev.major, dev.minor));
    let mut dev_lock = lock_file(&dev_lock_path, |holder| {
        format!(
            "{} is already tracked by another `harness track` ({holder}); one tracker per device",
            dev.describe()
        )
    })?;
    dev_lock.set_len(0).ok();
    let _ = writeln!(
        dev_lock,
        "pid {}, state {}",
        std::process::id(),
        cfg.state_dir.display()
    );
    let boot = boot_id()?;
    let state_path = cfg.state_dir.join(STATE_FILE);

    // Events first, counters second: a write between the two is both traced and counted.
    let instance = Instance::create(
        &format!("replicator-ktrack-{}-{}", dev.major, dev.minor),
        dev.kernel_dev(),
        cfg.buffer_kb_per_cpu,
    )?;
    let pipe = instance.open_pipe()?;
    let lost_events_seen = instance.lost_events()?;
    let now = dev.counters()?;
    let loaded = load(&state_path, &dev, &boot, now)?;
    let mut nonce_bytes = [0u8; 8];
    nonce_bytes.copy_from_slice(&Generation::generate()?.0[..8]);
    let nonce: String = nonce_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let socket_path = cfg.state_dir.join(SOCKET_FILE);
    let shared = Arc::new(Shared {
        dev,
        state_path,
        socket_path: socket_path.clone(),
        generation: loaded.generation,
        boot_id: boot,
        started: loaded.started,
        verbose: cfg.verbose,
        marks: Mutex::new(Marks {
            epoch: loaded.epoch,
            current: loaded.current,
            frozen: None,
            lost: loaded.lost,
            lost_while_frozen: false,
            acked_epoch: loaded.acked_epoch,
            seen_marker: 0,
            reader_failed: None,
            lost_events_seen,
            change_events: 0,
            dirty: true,
            persisted_lost: false,
        }),
        marker_seen: Condvar::new(),
        drain_lock: Mutex::new(()),
        instance: Mutex::new(Some(instance)),
        nonce,
        next_marker: AtomicU64::new(1),
        stop_marker: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        wake: (Mutex::new(false), Condvar::new()),
        next_conn: AtomicU64::new(1),
        connections: Mutex::new(HashMap::new()),
    });
    let mut daemon = RunningDaemon {
        shared: Arc::clone(&shared),
        reader: None,
        housekeeper: None,
        acceptor: None,
        stopped: false,
        crash: false,
        _dir_lock: dir_lock,
        _dev_lock: dev_lock,
    };
    let s = Arc::clone(&shared);
    daemon.reader = Some(
        std::thread::Builder::new()
            .name("ktrack-reader".into())
            .spawn(move || read_trace(s, pipe))
            .context("starting the trace reader thread")?,
    );
    // The first checkpoint: the marks as found, with counters they are complete for.
    shared
        .drained(true, |_| Ok(()))
        .map_err(|e| anyhow!("{}", e.message))?;
    if socket_path.exists() {
        fs::remove_file(&socket_path)
            .with_context(|| format!("removing the stale socket {}", socket_path.display()))?;
    }
    let listener = UnixListener::bind(&socket_path).with_context(|| {
        format!(
            "listening on {} (a socket path must be shorter than 108 bytes)",
            socket_path.display()
        )
    })?;
    fs::set_permissions(&socket_path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", socket_path.display()))?;
    let s = Arc::clone(&shared);
    daemon.acceptor = Some(
        std::thread::Builder::new()
            .name("ktrack-accept".into())
            .spawn(move || accept(s, listener))
            .context("starting the connection thread")?,
    );
    let s = Arc::clone(&shared);
    let interval = cfg.checkpoint_interval;
    daemon.housekeeper = Some(
        std::thread::Builder::new()
            .name("ktrack-housekeeper".into())
            .spawn(move || housekeep(s, interval))
            .context("starting the housekeeping thread")?,
    );
    Ok(daemon)
}

impl RunningDaemon {
    /// The socket clients connect to.
    pub fn socket_path(&self) -> &Path {
        &self.shared.socket_path
    }

    /// The daemon's state, as `status` reports it.
    pub fn info(&self) -> Info {
        self.shared.info()
    }

    /// Why the daemon can no longer track, if it cannot (its trace reader stopped).
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.marks).reader_failed.clone()
    }

    /// Stops: closes the socket and connections (their frozen epochs go back), writes a final
    /// clean checkpoint, stops the reader and removes the trace instance.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Stops like a crash: no final checkpoint, so the state stays as last persisted, marked as
    /// not cleanly stopped (the conformance suite's crash restarts).
    #[cfg(test)]
    pub fn crash(mut self) -> Result<()> {
        self.crash = true;
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor with a connection it will see the stop flag on.
        let _ = UnixStream::connect(&shared.socket_path);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&shared.socket_path);
        let conns: Vec<Connection> = {
            let mut map = lock(&shared.connections);
            map.drain().map(|(_, v)| v).collect()
        };
        for c in conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            if let Some(h) = c.thread {
                let _ = h.join();
            }
        }
        let checkpoint = if self.crash {
            Ok(())
        } else {
            shared.final_checkpoint()
        };
        // Stop the reader after a marker it will consume.
        let stop = shared.next_marker.fetch_add(1, Ordering::SeqCst);
        shared.stop_marker.store(stop, Ordering::SeqCst);
        let reader_failed = lock(&shared.marks).reader_failed.is_some();
        // A reader that failed has returned; one that got the marker returns after it.
        if (reader_failed || shared.write_marker(stop).is_ok())
            && let Some(h) = self.reader.take()
        {
            let _ = h.join();
        }
        *lock(&shared.wake.0) = true;
        shared.wake.1.notify_all();
        if let Some(h) = self.housekeeper.take() {
            let _ = h.join();
        }
        // The reader has closed the pipe: the instance can go.
        drop(lock(&shared.instance).take());
        checkpoint
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %format!("{e:#}"), "the tracker did not stop cleanly");
        }
    }
}
