//! The parallel stages of a cycle, and their bounds.
//!
//! Source: a producer cuts the frozen sectors into blob groups (numbered in order: seq numbers do
//! not depend on timing); [`encode_blobs`] reads each group (large reads split into pieces read at
//! once, so the device sees a deep queue), finds its all-zero runs, checksums, compresses and
//! encrypts it on `threads` worker threads, and hands the encoded blobs to the putter **in seq
//! order**, so the sink sees the same puts in the same order whatever the timing. A worker that
//! finishes ahead of its turn parks its blob (up to [`parked_max`] of them) and takes the next
//! group, so a cheap blob (mostly zeros, or stored raw) does not leave a core idle behind a dear
//! one; only with the parking full does it wait. Bytes in flight are bounded by the worker count,
//! the queues and the parked blobs, never by the disk size.
//!
//! Copies: a group is read straight into an aligned buffer (no copy with `O_DIRECT`); zero runs
//! are cut out by moving the data behind them down in place; the encoder then writes the
//! (compressed) body once into the object, which is encrypted in place.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use bytes::Bytes;
use replicator_sink::buf::{BufPool, PooledBuf};

use crate::bitmap::{Extent, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::format::{BlobExtent, ExtentKind, Session};
use crate::keys::DiskId;
use crate::layout;
use crate::tracker::ChangeTracker;

/// Granularity of all-zero detection inside an extent: 4 KiB.
pub const ZERO_DETECT_BYTES: u64 = 4096;

/// Largest single read of a group: longer extents are read as several pieces at once.
pub const READ_PIECE_BYTES: u64 = 4 << 20;

/// Whether every byte of `bytes` is zero. Word-wise, so it runs near memory speed.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    let whole = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0);
    whole && chunks.remainder().iter().all(|&b| b == 0)
}

/// Cuts the all-zero runs out of the data read for `extents` (`buf` holds their bytes, in order)
/// at [`ZERO_DETECT_BYTES`] granularity, merging neighbours of one kind, and moves the data
/// extents' bytes to the front of `buf`, in place. Returns the blob extents, the length of the
/// data now at the front of `buf`, and the number of zero bytes.
pub fn compact_zero_runs(extents: &[Extent], buf: &mut [u8]) -> (Vec<BlobExtent>, usize, u64) {
    let mut out: Vec<BlobExtent> = Vec::new();
    let mut data_len = 0usize;
    let mut zero_bytes = 0u64;
    let mut pos = 0usize;
    let sector = SECTOR_SIZE as usize;
    let step = (ZERO_DETECT_BYTES / SECTOR_SIZE) as usize;
    for e in extents {
        let mut s = 0usize;
        let n = e.sector_count as usize;
        while s < n {
            let k = step.min(n - s);
            let from = pos + s * sector;
            let len = k * sector;
            let kind = if is_zero(&buf[from..from + len]) {
                zero_bytes += len as u64;
                ExtentKind::Zero
            } else {
                if from != data_len {
                    buf.copy_within(from..from + len, data_len);
                }
                data_len += len;
                ExtentKind::Data
            };
            let start = e.start_sector + s as u64;
            match out.last_mut() {
                Some(last)
                    if last.kind == kind && last.start_sector + last.sector_count == start =>
                {
                    last.sector_count += k as u64;
                }
                _ => out.push(BlobExtent {
                    start_sector: start,
                    sector_count: k as u64,
                    kind,
                }),
            }
            s += k;
        }
        pos += n * sector;
    }
    (out, data_len, zero_bytes)
}

/// Reads the frozen `extents` into `buf` (their bytes back to back), as pieces of at most
/// [`READ_PIECE_BYTES`] spread over up to `depth` threads, so that many small extents (a delta)
/// keep the device's queue full. One piece (an initial copy's 4 MiB group) is one read: the
/// workers reading groups side by side keep the queue busy then.
pub fn read_extents<T: ChangeTracker + ?Sized>(
    tracker: &T,
    extents: &[Extent],
    buf: &mut [u8],
    depth: usize,
) -> Result<()> {
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
    let mut rest = buf;
    for e in extents {
        let mut offset = e.offset_bytes();
        let mut left = e.len_bytes();
        while left > 0 {
            let n = left.min(READ_PIECE_BYTES);
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n as usize);
            pieces.push((offset, piece));
            rest = tail;
            offset += n;
            left -= n;
        }
    }
    let threads = depth.clamp(1, pieces.len().max(1));
    if threads == 1 {
        for (offset, piece) in pieces {
            tracker.read_frozen(piece, offset)?;
        }
        return Ok(());
    }
    // Contiguous runs of pieces per thread: neighbours stay in one thread's sequential order.
    let per = pieces.len().div_ceil(threads);
    let mut shares: Vec<Vec<(u64, &mut [u8])>> = Vec::new();
    let mut it = pieces.into_iter().peekable();
    while it.peek().is_some() {
        shares.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                s.spawn(move || -> Result<()> {
                    for (offset, piece) in share {
                        tracker.read_frozen(piece, offset)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut first: Result<()> = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidInput("a read thread panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// The number of worker threads to use when a config says 0: the machine's cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// One encoded blob, ready to put.
#[derive(Debug)]
pub struct EncodedBlob {
    pub seq: u32,
    pub bytes: Bytes,
    pub tag: [u8; 16],
    /// Sectors' bytes the blob covers, zero runs included.
    pub span_bytes: u64,
    pub zero_bytes: u64,
    /// Compression skipped to keep up with the disk ([`Compression::Adaptive`]).
    pub kept_up: bool,
}

/// A blob group for the encoders: its extents, and its bytes if the producer read them already.
#[derive(Debug)]
pub struct Job {
    pub seq: u32,
    pub group: Vec<Extent>,
    pub data: Option<Vec<u8>>,
}

/// A group whose bytes were read, on its way from a reader to an encoder.
struct ReadJob {
    seq: u32,
    group: Vec<Extent>,
    data: ReadData,
}

enum ReadData {
    /// Read by the producer (a checksum resync compares while it reads).
    Produced(Vec<u8>),
    /// Read by a reader thread into an aligned buffer.
    Read(PooledBuf),
}

/// Settings of [`encode_blobs`].
#[derive(Clone, Copy, Debug)]
pub struct EncodeSettings {
    pub cycle: u64,
    pub attempt: u64,
    pub disk: DiskId,
    pub zstd_level: i32,
    pub compression: Compression,
    /// Encoding threads (at least 1).
    pub threads: usize,
    /// Reading threads (at least 1).
    pub read_threads: usize,
    /// Reads in flight per reading thread (at least 1).
    pub read_depth: usize,
    /// Nice levels the encoders run below the thread that starts them (0: the same).
    pub encoder_nice: i32,
}

/// Lowers the calling thread's scheduling priority by `steps` nice levels (up to the lowest,
/// 19); Linux keeps a nice value per thread. The thread cannot raise it again without
/// privilege, so only threads that end with their work call this.
pub fn lower_thread_priority(steps: i32) -> std::io::Result<()> {
    if steps <= 0 {
        return Ok(());
    }
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid))?;
    rustix::process::setpriority_process(Some(tid), now.saturating_add(steps).min(19))?;
    Ok(())
}

/// How blob bodies are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Every blob at the zstd level (kept only if smaller): the stored bytes depend on the data
    /// alone.
    Zstd,
    /// At the zstd level while the encoders keep up with the readers. A group taken while at
    /// least half as many read groups as there are encoders wait behind it (the readers are
    /// ahead of the cores), and while the putter has room, is stored uncompressed: the cores,
    /// not the disk or the sink, are then what limits the copy, and storing it raw lets it go at
    /// the disk's pace. When the sink is the slower side, every blob is compressed. The stored
    /// bytes depend on timing; the data never does.
    #[default]
    Adaptive,
}

/// Whether [`Compression::Adaptive`] stores the group an encoder just took raw: at least half as
/// many groups as there are encoders wait behind it (the readers are ahead of the cores), and
/// the putter's queue has room (else the sink is the slower side, and compressing costs nothing).
fn store_raw(compression: Compression, behind: usize, encoders: usize, putter_room: usize) -> bool {
    compression == Compression::Adaptive && 2 * behind >= encoders.max(1) && putter_room > 0
}

/// Hands the seq numbers out in order and lets workers send only in that order.
struct SendOrder {
    next: Mutex<u32>,
    turn: Condvar,
}

/// Encoded blobs finished ahead of their turn, at most: two per encoder.
pub fn parked_max(threads: usize) -> usize {
    2 * threads.max(1)
}

/// The encoders' hand-off to the putter: in seq order, with blobs finished early parked.
struct Handoff {
    state: Mutex<HandoffState>,
    turn: Condvar,
    parked_max: usize,
}

struct HandoffState {
    next: u32,
    parked: BTreeMap<u32, EncodedBlob>,
}

/// Runs `produce` on this thread, which submits blob groups (seq numbers 0, 1, 2... in order)
/// through the function it is given (false: stop producing). `settings.read_threads` readers
/// read the groups that carry no data (each group into its own aligned buffer, so the disk keeps
/// a read going while the encoders compute); `settings.threads` encoders cut zero runs, encode
/// and send each blob into `tx` in seq order. Returns `produce`'s result, or the first error of
/// any stage.
pub fn encode_blobs<T, P, R>(
    tracker: &T,
    session: &Session,
    settings: EncodeSettings,
    tx: &tokio::sync::mpsc::Sender<EncodedBlob>,
    produce: P,
) -> Result<R>
where
    T: ChangeTracker + ?Sized,
    P: FnOnce(&mut dyn FnMut(Job) -> bool) -> Result<R>,
{
    let threads = settings.threads.max(1);
    let readers = settings.read_threads.max(1);
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(readers);
    let job_rx = Mutex::new(job_rx);
    // Read groups waiting for an encoder: one per encoder, so each finds the next one ready.
    let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<ReadJob>(threads);
    let read_rx = Mutex::new(read_rx);
    // Read groups handed on and not yet taken by an encoder, a reader blocked on a full queue
    // included.
    let read_waiting = AtomicUsize::new(0);
    // Read buffers: one per reader, one per queued group, one per encoder.
    let buffers = BufPool::new(readers + 2 * threads);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let order = Handoff {
        state: Mutex::new(HandoffState {
            next: 0,
            parked: BTreeMap::new(),
        }),
        turn: Condvar::new(),
        parked_max: parked_max(threads),
    };
    let read_order = SendOrder {
        next: Mutex::new(0),
        turn: Condvar::new(),
    };
    // Stops every stage and wakes the threads waiting for their turn, so they see it.
    let halt = || {
        stop.store(true, Ordering::SeqCst);
        // Taking each lock once orders the store before a waiter's next look at `stop`: one
        // that looked just before still goes to sleep before this wakes it.
        drop(order.state.lock().unwrap_or_else(PoisonError::into_inner));
        order.turn.notify_all();
        drop(
            read_order
                .next
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        read_order.turn.notify_all();
    };
    let fail = |e: Error| {
        let mut f = failure.lock().unwrap_or_else(PoisonError::into_inner);
        f.get_or_insert(e);
        drop(f);
        halt();
    };
    let produced = std::thread::scope(|s| {
        for _ in 0..readers {
            let read_tx = read_tx.clone();
            let (job_rx, buffers, stop, fail, read_order, halt, read_waiting) = (
                &job_rx,
                &buffers,
                &stop,
                &fail,
                &read_order,
                &halt,
                &read_waiting,
            );
            s.spawn(move || {
                loop {
                    let job = {
                        let rx = job_rx.lock().unwrap_or_else(PoisonError::into_inner);
                        rx.recv()
                    };
                    let Ok(job) = job else { break };
                    if stop.load(Ordering::SeqCst) {
                        // Drain, so that the producer never blocks on a full queue.
                        continue;
                    }
                    let data = match job.data {
                        Some(data) => ReadData::Produced(data),
                        None => {
                            let span: u64 = job.group.iter().map(Extent::len_bytes).sum();
                            let mut buf = buffers.take(span as usize);
                            tracing::trace!(seq = job.seq, span, "group read begins");
                            if let Err(e) = read_extents(
                                tracker,
                                &job.group,
                                buf.as_mut_slice(),
                                settings.read_depth,
                            ) {
                                fail(e);
                                continue;
                            }
                            ReadData::Read(buf)
                        }
                    };
                    let seq = job.seq;
                    tracing::trace!(seq, "group read");
                    let read = ReadJob {
                        seq,
                        group: job.group,
                        data,
                    };
                    let sent = send_in_order(read_order, stop, seq, || {
                        read_waiting.fetch_add(1, Ordering::SeqCst);
                        read_tx.send(read).is_ok()
                    });
                    if !sent {
                        halt();
                    }
                }
            });
        }
        drop(read_tx);
        for _ in 0..threads {
            s.spawn(|| {
                if let Err(e) = lower_thread_priority(settings.encoder_nice) {
                    tracing::debug!(error = %e, "cannot lower an encoder's priority");
                }
                loop {
                    let job = {
                        let rx = read_rx.lock().unwrap_or_else(PoisonError::into_inner);
                        rx.recv()
                    };
                    let Ok(job) = job else { break };
                    // Groups waiting behind this one.
                    let behind = read_waiting
                        .fetch_sub(1, Ordering::SeqCst)
                        .saturating_sub(1);
                    if stop.load(Ordering::SeqCst) {
                        continue;
                    }
                    let keep_up = store_raw(settings.compression, behind, threads, tx.capacity());
                    let seq = job.seq;
                    tracing::trace!(seq, keep_up, "group encode begins");
                    match encode_job(session, &settings, job, keep_up) {
                        Ok(blob) => {
                            tracing::trace!(seq, "group encoded");
                            if !hand_off(&order, &stop, blob, |b| tx.blocking_send(b).is_ok()) {
                                halt();
                            }
                        }
                        Err(e) => fail(e),
                    }
                }
            });
        }
        let mut submit = |job: Job| -> bool {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            job_tx.send(job).is_ok() && !stop.load(Ordering::SeqCst)
        };
        let r = produce(&mut submit);
        drop(job_tx);
        r
    });
    if let Some(e) = failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(e);
    }
    produced
}

/// Waits for `seq`'s turn, then runs `send` (which says whether the next stage took it). False
/// when the cycle stops.
///
/// The readers' hand-off goes in seq order and the readers take their work from a queue in seq
/// order: so the item a waiting reader waits for is always held by a reader that is working,
/// never stuck in a queue behind it.
fn send_in_order(
    order: &SendOrder,
    stop: &AtomicBool,
    seq: u32,
    send: impl FnOnce() -> bool,
) -> bool {
    let mut next = order.next.lock().unwrap_or_else(PoisonError::into_inner);
    while *next != seq {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        next = order
            .turn
            .wait(next)
            .unwrap_or_else(PoisonError::into_inner);
    }
    // Holding the turn (not the lock: see `hand_off`) keeps the queue in seq order.
    drop(next);
    let sent = send();
    *order.next.lock().unwrap_or_else(PoisonError::into_inner) = seq.wrapping_add(1);
    order.turn.notify_all();
    sent
}

/// Sends `blob` if it is its turn, then every parked blob whose turn follows; parks it if its turn
/// has not come and the parking has room; else waits. False when the cycle stops or `send` fails.
///
/// No deadlock: groups reach the encoders in seq order, so the blob whose turn it is is always
/// held by an encoder that is working (or parked), never stuck in a queue behind a waiting one.
/// The lock is never held while sending: only the turn's holder sends until it moves the turn
/// on, and a send blocked on a full queue must not keep [`encode_blobs`]' halt from the lock.
fn hand_off(
    order: &Handoff,
    stop: &AtomicBool,
    blob: EncodedBlob,
    mut send: impl FnMut(EncodedBlob) -> bool,
) -> bool {
    let mut st = order.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        if st.next == blob.seq {
            break;
        }
        if st.parked.len() < order.parked_max {
            st.parked.insert(blob.seq, blob);
            return true;
        }
        st = order.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
    }
    drop(st);
    let mut blob = blob;
    loop {
        if !send(blob) {
            return false;
        }
        let mut st = order.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.next = st.next.wrapping_add(1);
        let next = st.next;
        let parked = st.parked.remove(&next);
        drop(st);
        order.turn.notify_all();
        match parked {
            Some(b) => blob = b,
            None => return true,
        }
    }
}

/// Encodes one group; `keep_up`: store the body uncompressed.
fn encode_job(
    session: &Session,
    settings: &EncodeSettings,
    job: ReadJob,
    keep_up: bool,
) -> Result<EncodedBlob> {
    let span: u64 = job.group.iter().map(Extent::len_bytes).sum();
    let mut data = job.data;
    let bytes: &mut [u8] = match &mut data {
        ReadData::Produced(v) => v.as_mut_slice(),
        ReadData::Read(buf) => buf.as_mut_slice(),
    };
    let (extents, data_len, zero_bytes) = compact_zero_runs(&job.group, bytes);
    let obj = session
        .encode_blob_as(
            job.seq,
            &extents,
            &bytes[..data_len],
            (!keep_up).then_some(settings.zstd_level),
        )
        .map_err(|e| Error::Object {
            key: layout::blob_key(&settings.disk, settings.cycle, settings.attempt, job.seq),
            source: e,
        })?;
    Ok(EncodedBlob {
        seq: job.seq,
        bytes: obj.bytes,
        tag: obj.tag,
        span_bytes: span,
        zero_bytes,
        kept_up: keep_up && data_len > 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_compression_goes_raw_only_when_reads_wait_and_the_putter_has_room() {
        use Compression::{Adaptive, Zstd};
        // One encoder: raw only with a group waiting behind the one taken.
        assert!(!store_raw(Adaptive, 0, 1, 4));
        assert!(store_raw(Adaptive, 1, 1, 4));
        // Two encoders: one group behind; eight: four.
        assert!(!store_raw(Adaptive, 0, 2, 4));
        assert!(store_raw(Adaptive, 1, 2, 4));
        assert!(!store_raw(Adaptive, 3, 8, 4));
        assert!(store_raw(Adaptive, 4, 8, 4));
        // A putter with no room: the sink is behind, so compress.
        assert!(!store_raw(Adaptive, 8, 2, 0));
        // Zstd always compresses.
        assert!(!store_raw(Zstd, 8, 2, 4));
    }

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4099] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for i in [0, len / 2, len.saturating_sub(1)] {
                if i < len {
                    b[i] = 1;
                    assert!(!is_zero(&b), "len {len} byte {i}");
                    b[i] = 0;
                }
            }
        }
    }

    #[test]
    fn compaction_keeps_data_in_order_and_drops_zero_blocks() {
        let extents = [Extent::new(0, 16), Extent::new(100, 8)];
        let mut buf = vec![0u8; 24 * 512];
        buf[8 * 512] = 7; // second 4 KiB block of the first extent
        buf[16 * 512 + 3] = 9; // the second extent
        let (out, len, zeros) = compact_zero_runs(&extents, &mut buf);
        assert_eq!(len, 16 * 512);
        assert_eq!(zeros, 8 * 512);
        assert_eq!(buf[0], 7);
        assert_eq!(buf[8 * 512 + 3], 9);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].kind, ExtentKind::Zero);
        assert_eq!((out[1].start_sector, out[1].sector_count), (8, 8));
        assert_eq!((out[2].start_sector, out[2].sector_count), (100, 8));
    }

    #[test]
    fn an_encoder_thread_lowers_its_own_priority_only() {
        let own = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let before = own();
        let (inside_before, inside_after, unchanged) = std::thread::spawn(move || {
            let b = own();
            lower_thread_priority(0).unwrap();
            let unchanged = own() == b;
            lower_thread_priority(3).unwrap();
            (b, own(), unchanged)
        })
        .join()
        .unwrap();
        assert!(unchanged, "0 steps change nothing");
        assert_eq!(inside_after, (inside_before + 3).min(19));
        assert_eq!(own(), before, "the calling thread keeps its priority");
    }
}
