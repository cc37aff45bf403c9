//! The HRL-style change tracker (as Hyper-V Replica does): a [`BlockDevice`] wrapper that logs
//! every write — offset, length, data, CRC-32 — in an append-only log next to the disk before the
//! write reaches the device, and serves a frozen epoch's sectors from that log.
//!
//! # The log
//! A directory the caller names (`<image>.hrl/`, or the `tracker/` directory `Source::open_with`
//! hands out) holds `hrl.state` and one *segment* file per epoch, `seg-<epoch>.hrl`, created at
//! the epoch's first write. A write appends one record per [`RECORD_DATA_BYTES_MAX`] piece and
//! `fdatasync`s the segment, then writes the device, all under the tracker lock: a freeze never
//! splits a write, and a record on disk always precedes its device write. Writes that do not
//! cover whole sectors are widened to whole sectors (the neighbouring bytes read from the device
//! under the lock), so records and the device agree sector by sector. A discard of whole sectors
//! is one header-only *zero record* (the range reads as zeros), logged before the device
//! discards it.
//!
//! # Epochs and frozen reads: point in time without copy-on-write
//! [`ChangeTracker::freeze`] flushes the device and cuts the current segment: later writes go to
//! the next epoch's segment. The frozen epoch's sectors come from an in-memory index of its
//! records (coalesced: the last write wins per sector), so the cycle ships the disk exactly as of
//! the freeze while writes go on. Sectors marked only in a bitmap — carried back from a failed
//! cycle, [`ChangeTracker::mark_all`], or dropped from the log by an overflow — are read from the
//! device (live, not point in time: a later write to one ships again in the next cycle). Where a
//! sector is both logged and marked, the log wins: it holds the last write before the freeze.
//!
//! # Truncation only after acknowledgement
//! A committed release keeps the frozen epoch's segments; they are deleted only when the target
//! acknowledges the cycle ([`ChangeTracker::acknowledged`]). An uncommitted release puts the frozen
//! epoch back: its segments join the current epoch's (the newer records win), so everything ships
//! again, still point in time, in the next freeze.
//!
//! # Overflow
//! The segments not yet acknowledged may hold at most [`HrlConfig::log_limit`] bytes (half the
//! disk by default, as the reference does), and the index at most
//! [`HrlConfig::index_entries_max`] entries. A write that would pass either limit makes the
//! current epoch *overflow*: the device is flushed, the epoch's logged sectors become bitmap marks
//! (persisted in `hrl.state`), its segments are deleted, and until the next freeze each write
//! appends only a small *mark record* (no data) before going to the device. Writers never fail
//! for lack of log space; the cycle that ships an overflowed epoch reads those sectors from the
//! device, so it is not point in time for them.
//!
//! # Crashes
//! On open every segment of the epochs not yet shipped is scanned; the first record that fails
//! its structure or CRC ends that segment, which is cut there (counted in
//! [`OpenReport::log_tails_cut`]). A torn record's device write never began (the device is written
//! only after the record is synced), so that write is simply absent: not marked, not shipped, and
//! not on the device. A valid record's device write may have been cut short by the crash (or lost
//! from a volatile device cache), so after an unclean stop the open *redoes* the logged writes of
//! the epochs not yet frozen-and-flushed onto the device, oldest first, and flushes it: the device
//! then holds what the log says ([`OpenReport::records_redone`]). A frozen epoch found on open was
//! never committed and is merged back. The state file says whether the last stop was clean
//! ([`ChangeTracker::checkpoint`] flushes the device and records it; the next write clears it).
//!
//! # Bounded memory
//! The index holds at most [`HrlConfig::index_entries_max`] entries (about 64 bytes each) for the
//! frozen and current epochs together; segments of committed epochs are not indexed. Bitmaps grow
//! with the marked chunks, as everywhere.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::bitmap::{SECTOR_SIZE, SectorBitmap};
use crate::device::{BlockDevice, DeviceOp, check_range};
use crate::error::{Error, Result};
use crate::state::write_atomic;
use crate::tracker::{ChangeTracker, Frozen, GENERATION_LEN, Generation, OpenReport};

/// Magic of a segment file's header.
pub const SEGMENT_MAGIC: [u8; 8] = *b"RPLHRLS1";
/// Bytes of a segment header: magic, generation, epoch, CRC-32.
pub const SEGMENT_HEADER_LEN: u64 = 36;
/// Magic of a log record.
pub const RECORD_MAGIC: [u8; 4] = *b"HRLR";
/// Bytes of a record header (a mark record is only this).
pub const RECORD_HEADER_LEN: u64 = 36;
/// Most data bytes in one record; longer writes are logged as several records. 4 MiB.
pub const RECORD_DATA_BYTES_MAX: u64 = 4 << 20;
/// Record kind: the header is followed by `len_bytes` of data.
pub const RECORD_KIND_DATA: u8 = 1;
/// Record kind: a write of `len_bytes` at `offset_bytes` whose data is not logged (an overflowed
/// epoch).
pub const RECORD_KIND_MARK: u8 = 2;
/// Record kind: `len_bytes` at `offset_bytes` were discarded (or zeroed) and read as zeros; the
/// header only, like a mark record, whatever the length.
pub const RECORD_KIND_ZERO: u8 = 3;
const STATE_MAGIC: [u8; 8] = *b"RPLHRLT1";
const STATE_FILE: &str = "hrl.state";
/// Longest lost-tracking reason kept in the state.
const LOST_REASON_BYTES_MAX: usize = 1024;
const FLAG_CLEAN: u8 = 1;
const FLAG_CURRENT_OVERFLOWED: u8 = 2;
const FLAG_FROZEN_OVERFLOWED: u8 = 4;
const FLAG_LOST: u8 = 8;
const FLAGS_KNOWN: u8 = FLAG_CLEAN | FLAG_CURRENT_OVERFLOWED | FLAG_FROZEN_OVERFLOWED | FLAG_LOST;
/// Data read per step while checking or redoing a record.
const SCAN_CHUNK_BYTES: u64 = 1 << 20;

/// The name of epoch `epoch`'s segment file: `seg-` and 20 zero-padded digits, so names sort.
pub fn segment_file_name(epoch: u64) -> String {
    format!("seg-{epoch:020}.hrl")
}

/// The epoch of a segment file name, if it is one.
pub fn segment_epoch(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".hrl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How large the log may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLimit {
    /// This percentage of the disk's size.
    PercentOfDisk(u8),
    /// This many bytes.
    Bytes(u64),
}

/// Limits of an [`HrlTracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HrlConfig {
    /// Most bytes the segments not yet acknowledged may hold (headers included); a write past it
    /// makes the current epoch overflow to bitmap marks. 50% of the disk.
    pub log_limit: LogLimit,
    /// Most index entries (frozen and current epochs together); past it the current epoch
    /// overflows too. 1 Mi entries (about 64 MiB).
    pub index_entries_max: usize,
    /// Mark records an overflowed epoch's segment may collect before they are folded into
    /// `hrl.state` and the segment emptied. 4096.
    pub overflow_marks_max: u64,
}

impl Default for HrlConfig {
    fn default() -> Self {
        HrlConfig {
            log_limit: LogLimit::PercentOfDisk(50),
            index_entries_max: 1 << 20,
            overflow_marks_max: 4096,
        }
    }
}

impl HrlConfig {
    /// The log limit in bytes for a disk of `disk_bytes`.
    pub fn log_bytes_max(&self, disk_bytes: u64) -> u64 {
        match self.log_limit {
            LogLimit::PercentOfDisk(p) => {
                let v = u128::from(disk_bytes) * u128::from(p) / 100;
                u64::try_from(v).unwrap_or(u64::MAX)
            }
            LogLimit::Bytes(b) => b,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The segment format: encoders and the parser (pure, over bytes or a file)
// ---------------------------------------------------------------------------------------------

/// A segment file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The generation of the tracker state that wrote it.
    pub generation: Generation,
    /// The epoch whose writes it logs.
    pub epoch: u64,
}

/// One valid record, as found in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// [`RECORD_KIND_DATA`], [`RECORD_KIND_MARK`] or [`RECORD_KIND_ZERO`].
    pub kind: u8,
    /// The epoch (always the segment's).
    pub epoch: u64,
    /// Where the write went on the device (sector-aligned).
    pub offset_bytes: u64,
    /// Its length (whole sectors, not zero).
    pub len_bytes: u64,
    /// Where the record starts in the segment.
    pub at: u64,
}

impl LogRecord {
    /// Where its data starts in the segment.
    pub fn data_at(&self) -> u64 {
        self.at + RECORD_HEADER_LEN
    }

    /// Its bytes in the segment, header included.
    pub fn stored_len(&self) -> u64 {
        RECORD_HEADER_LEN
            + if self.kind == RECORD_KIND_DATA {
                self.len_bytes
            } else {
                0
            }
    }

    fn start_sector(&self) -> u64 {
        self.offset_bytes / SECTOR_SIZE
    }

    fn sector_count(&self) -> u64 {
        self.len_bytes / SECTOR_SIZE
    }
}

/// Where and why the valid part of a segment ends before the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Offset of the first invalid byte (the start of the record that failed).
    pub offset_bytes: u64,
    /// What was wrong with it.
    pub reason: String,
}

/// A decoded segment: its header, its valid records in order, where they end, and the tail that
/// was not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedSegment {
    /// The header.
    pub header: SegmentHeader,
    /// Valid records, in file order.
    pub records: Vec<LogRecord>,
    /// Bytes of header and valid records: the segment is cut here.
    pub valid_bytes: u64,
    /// Set when bytes follow the valid records.
    pub torn: Option<TornTail>,
}

/// A segment header that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Fewer bytes than a header.
    #[error("segment header at offset 0 is truncated: {found} of {SEGMENT_HEADER_LEN} bytes")]
    Truncated {
        /// Bytes present.
        found: u64,
    },
    /// Not a segment.
    #[error("segment header at offset 0 has magic {found:02x?}, not `RPLHRLS1`")]
    BadMagic {
        /// What was there.
        found: [u8; 8],
    },
    /// The header's CRC does not match.
    #[error(
        "segment header at offset 0 fails its CRC (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadCrc {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
}

/// Encodes a segment header.
pub fn encode_segment_header(header: &SegmentHeader) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..24].copy_from_slice(&header.generation.0);
    h[24..32].copy_from_slice(&header.epoch.to_le_bytes());
    let crc = crc32fast::hash(&h[0..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_header(kind: u8, epoch: u64, offset_bytes: u64, len_bytes: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4] = kind;
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&offset_bytes.to_le_bytes());
    h[24..32].copy_from_slice(&len_bytes.to_le_bytes());
    h
}

/// Appends a data record for `data` written at `offset_bytes` to `out`.
pub fn encode_data_record(out: &mut Vec<u8>, epoch: u64, offset_bytes: u64, data: &[u8]) {
    let h = record_header(RECORD_KIND_DATA, epoch, offset_bytes, data.len() as u64);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h);
    crc.update(data);
    out.extend_from_slice(&h);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(data);
}

/// Appends a mark record (a write of `len_bytes` at `offset_bytes`, data not logged) to `out`.
pub fn encode_mark_record(out: &mut Vec<u8>, epoch: u64, offset_bytes: u64, len_bytes: u64) {
    let h = record_header(RECORD_KIND_MARK, epoch, offset_bytes, len_bytes);
    out.extend_from_slice(&h);
    out.extend_from_slice(&crc32fast::hash(&h).to_le_bytes());
}

/// Appends a zero record (`len_bytes` at `offset_bytes` discarded: they read as zeros) to `out`.
pub fn encode_zero_record(out: &mut Vec<u8>, epoch: u64, offset_bytes: u64, len_bytes: u64) {
    let h = record_header(RECORD_KIND_ZERO, epoch, offset_bytes, len_bytes);
    out.extend_from_slice(&h);
    out.extend_from_slice(&crc32fast::hash(&h).to_le_bytes());
}

/// Positioned reads, from a file or from bytes.
trait ReadAt {
    fn read_exact_at_pos(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_exact_at_pos(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        let src = usize::try_from(pos)
            .ok()
            .and_then(|p| self.get(p..p.checked_add(buf.len())?))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for File {
    fn read_exact_at_pos(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, pos)
    }
}

enum ScanError {
    Header(SegmentError),
    Io(std::io::Error),
}

/// What a scan found after the records.
struct ScanEnd {
    header: SegmentHeader,
    valid_bytes: u64,
    torn: Option<TornTail>,
}

/// Reads and checks the header of the segment of `len` bytes in `src`.
fn read_segment_header<S: ReadAt + ?Sized>(
    src: &S,
    len: u64,
) -> std::result::Result<SegmentHeader, ScanError> {
    if len < SEGMENT_HEADER_LEN {
        return Err(ScanError::Header(SegmentError::Truncated { found: len }));
    }
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    src.read_exact_at_pos(&mut h, 0).map_err(ScanError::Io)?;
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[0..8]);
    if magic != SEGMENT_MAGIC {
        return Err(ScanError::Header(SegmentError::BadMagic { found: magic }));
    }
    let stored = le_u32(&h[32..36]);
    let computed = crc32fast::hash(&h[0..32]);
    if stored != computed {
        return Err(ScanError::Header(SegmentError::BadCrc { stored, computed }));
    }
    let mut generation = [0u8; GENERATION_LEN];
    generation.copy_from_slice(&h[8..24]);
    Ok(SegmentHeader {
        generation: Generation(generation),
        epoch: le_u64(&h[24..32]),
    })
}

/// Scans the segment of `len` bytes in `src`: checks the header, then each record in order, and
/// hands each valid one to `on_record`. The first record failing its structure or CRC ends the
/// valid part. Nothing is allocated from a declared length: data is checked in chunks of at most
/// [`SCAN_CHUNK_BYTES`] after its length was checked against what is present.
fn scan_segment<S: ReadAt + ?Sized>(
    src: &S,
    len: u64,
    disk_bytes: u64,
    mut on_record: impl FnMut(&LogRecord) -> std::io::Result<()>,
) -> std::result::Result<ScanEnd, ScanError> {
    let header = read_segment_header(src, len)?;
    let mut pos = SEGMENT_HEADER_LEN;
    let mut chunk = Vec::new();
    let torn = loop {
        if pos == len {
            break None;
        }
        let tear = |reason: String| {
            Some(TornTail {
                offset_bytes: pos,
                reason,
            })
        };
        if len - pos < RECORD_HEADER_LEN {
            break tear(format!(
                "a record header needs {RECORD_HEADER_LEN} bytes, {} remain",
                len - pos
            ));
        }
        let mut rh = [0u8; RECORD_HEADER_LEN as usize];
        src.read_exact_at_pos(&mut rh, pos).map_err(ScanError::Io)?;
        if rh[0..4] != RECORD_MAGIC {
            break tear("bad record magic".into());
        }
        let kind = rh[4];
        if !matches!(kind, RECORD_KIND_DATA | RECORD_KIND_MARK | RECORD_KIND_ZERO) {
            break tear(format!("unknown record kind {kind}"));
        }
        if rh[5..8] != [0, 0, 0] {
            break tear("reserved record bytes are not zero".into());
        }
        let rec = LogRecord {
            kind,
            epoch: le_u64(&rh[8..16]),
            offset_bytes: le_u64(&rh[16..24]),
            len_bytes: le_u64(&rh[24..32]),
            at: pos,
        };
        if rec.epoch != header.epoch {
            break tear(format!(
                "record of epoch {} in the segment of epoch {}",
                rec.epoch, header.epoch
            ));
        }
        if rec.len_bytes == 0
            || !rec.offset_bytes.is_multiple_of(SECTOR_SIZE)
            || !rec.len_bytes.is_multiple_of(SECTOR_SIZE)
        {
            break tear(format!(
                "record range {}+{} is not whole sectors",
                rec.offset_bytes, rec.len_bytes
            ));
        }
        if rec
            .offset_bytes
            .checked_add(rec.len_bytes)
            .is_none_or(|end| end > disk_bytes)
        {
            break tear(format!(
                "record range {}+{} passes the disk end ({disk_bytes} bytes)",
                rec.offset_bytes, rec.len_bytes
            ));
        }
        if kind == RECORD_KIND_DATA && rec.len_bytes > RECORD_DATA_BYTES_MAX {
            break tear(format!(
                "record data of {} bytes is over the {RECORD_DATA_BYTES_MAX}-byte limit",
                rec.len_bytes
            ));
        }
        let stored_len = rec.stored_len();
        if len - pos < stored_len {
            break tear(format!(
                "record needs {stored_len} bytes, {} remain",
                len - pos
            ));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&rh[0..32]);
        if kind == RECORD_KIND_DATA {
            let mut at = rec.data_at();
            let end = at + rec.len_bytes;
            while at < end {
                let n = (end - at).min(SCAN_CHUNK_BYTES) as usize;
                chunk.resize(n, 0);
                src.read_exact_at_pos(&mut chunk, at)
                    .map_err(ScanError::Io)?;
                crc.update(&chunk);
                at += n as u64;
            }
        }
        let stored = le_u32(&rh[32..36]);
        if crc.finalize() != stored {
            break tear("record CRC mismatch".into());
        }
        on_record(&rec).map_err(ScanError::Io)?;
        pos += stored_len;
    };
    Ok(ScanEnd {
        header,
        valid_bytes: torn.as_ref().map_or(len, |t| t.offset_bytes),
        torn,
    })
}

/// Decodes a segment held in `bytes`, for a disk of `disk_bytes`. The header must be valid; the
/// records are read up to the first that fails its structure or CRC, which is reported as the
/// torn tail (not an error: that is how a crash mid-append looks). Never panics; allocates only
/// for records actually present.
pub fn decode_segment(
    bytes: &[u8],
    disk_bytes: u64,
) -> std::result::Result<DecodedSegment, SegmentError> {
    let mut records = Vec::new();
    match scan_segment(bytes, bytes.len() as u64, disk_bytes, |r| {
        records.push(*r);
        Ok(())
    }) {
        Ok(end) => Ok(DecodedSegment {
            header: end.header,
            records,
            valid_bytes: end.valid_bytes,
            torn: end.torn,
        }),
        Err(ScanError::Header(e)) => Err(e),
        // Reads from bytes stay within the length given, so this does not happen; report it as
        // a truncated header rather than panic.
        Err(ScanError::Io(_)) => Err(SegmentError::Truncated {
            found: bytes.len() as u64,
        }),
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

// ---------------------------------------------------------------------------------------------
// The in-memory index
// ---------------------------------------------------------------------------------------------

/// Where a logged run's contents are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// In segment `seg` (an epoch) at byte `at` for the first sector, then consecutive.
    Log { seg: u64, at: u64 },
    /// Zeros: the run was discarded.
    Zero,
}

impl Src {
    /// The source of the sector `sectors` after the first.
    fn advance(self, sectors: u64) -> Src {
        match self {
            Src::Log { seg, at } => Src::Log {
                seg,
                at: at + sectors * SECTOR_SIZE,
            },
            Src::Zero => Src::Zero,
        }
    }
}

/// A run of logged sectors ending before sector `end`, and where its contents are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    end: u64,
    src: Src,
}

/// Where a frozen read finds a run of sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadFrom {
    /// In the log: segment `seg` at byte `at`.
    Log(u64, u64),
    /// Zeros (a logged discard).
    Zero,
    /// On the device (not logged).
    Device,
}

/// A run of sectors `[lo, hi)` and where a frozen read finds it.
type Run = (u64, u64, ReadFrom);

/// Logged sectors, coalesced: start sector -> piece. Pieces never overlap; a newer write replaces
/// the overlapped parts of older ones.
#[derive(Clone, Debug, Default)]
struct Index {
    map: BTreeMap<u64, Piece>,
}

impl Index {
    fn len(&self) -> usize {
        self.map.len()
    }

    /// Removes `[start, end)`, splitting pieces that straddle it.
    fn remove(&mut self, start: u64, end: u64) {
        if let Some((&s, &p)) = self.map.range(..start).next_back()
            && p.end > start
        {
            self.map.insert(s, Piece { end: start, ..p });
            if p.end > end {
                self.map.insert(
                    end,
                    Piece {
                        end: p.end,
                        src: p.src.advance(end - s),
                    },
                );
            }
        }
        let inside: Vec<(u64, Piece)> = self.map.range(start..end).map(|(k, p)| (*k, *p)).collect();
        for (s, p) in inside {
            self.map.remove(&s);
            if p.end > end {
                self.map.insert(
                    end,
                    Piece {
                        end: p.end,
                        src: p.src.advance(end - s),
                    },
                );
            }
        }
    }

    /// Sectors `[start, end)` now come from `src`.
    fn insert(&mut self, start: u64, end: u64, src: Src) {
        self.remove(start, end);
        self.map.insert(start, Piece { end, src });
    }

    /// `newer` on top of `self`.
    fn overlay(&mut self, newer: &Index) {
        for (&s, p) in &newer.map {
            self.insert(s, p.end, p.src);
        }
    }

    /// `[start, end)` cut into runs: from the log, zeros, or gaps on the device.
    fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut pos = start;
        let first = self
            .map
            .range(..=start)
            .next_back()
            .filter(|(_, p)| p.end > start)
            .map_or(start, |(k, _)| *k);
        for (&s, p) in self.map.range(first..end) {
            let lo = s.max(pos);
            let hi = p.end.min(end);
            if lo >= hi {
                continue;
            }
            if lo > pos {
                out.push((pos, lo, ReadFrom::Device));
            }
            let from = match p.src.advance(lo - s) {
                Src::Log { seg, at } => ReadFrom::Log(seg, at),
                Src::Zero => ReadFrom::Zero,
            };
            out.push((lo, hi, from));
            pos = hi;
        }
        if pos < end {
            out.push((pos, end, ReadFrom::Device));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The tracker
// ---------------------------------------------------------------------------------------------

/// One epoch's changes (or several merged, after an uncommitted release).
#[derive(Debug)]
struct View {
    /// Sectors whose last write is logged with its data (or as a discard).
    index: Index,
    /// The sectors of `index`.
    logged: SectorBitmap,
    /// Sectors marked without data: carried back, `mark_all`, overflow.
    marks: SectorBitmap,
    /// The log overflowed in this epoch: no data records, writes are marked only.
    overflowed: bool,
}

impl View {
    fn new(sectors: u64) -> Self {
        View {
            index: Index::default(),
            logged: SectorBitmap::new(sectors),
            marks: SectorBitmap::new(sectors),
            overflowed: false,
        }
    }

    fn bitmap(&self) -> Result<SectorBitmap> {
        let mut b = self.logged.clone();
        b.union_with(&self.marks)?;
        Ok(b)
    }

    /// Every logged sector becomes a plain mark.
    fn drop_data(&mut self) -> Result<()> {
        self.marks.union_with(&self.logged)?;
        self.logged.clear();
        self.index = Index::default();
        Ok(())
    }
}

#[derive(Debug)]
struct FrozenView {
    epoch: u64,
    view: View,
    /// Frozen while tracking was lost: a committed release clears the lost state.
    lost: bool,
}

#[derive(Debug)]
struct Segment {
    len: u64,
    /// Open for segments of the frozen and current epochs; committed ones are only deleted.
    file: Option<File>,
}

#[derive(Debug)]
struct Inner {
    /// The current epoch.
    epoch: u64,
    /// Segments up to this epoch shipped in committed cycles (kept until acknowledged).
    committed_epoch: u64,
    /// Segments up to this epoch are acknowledged (deleted).
    acked_epoch: u64,
    lost: Option<String>,
    /// `hrl.state` says the tracker stopped cleanly; the next write must clear it first.
    clean: bool,
    current: View,
    frozen: Option<FrozenView>,
    /// Every segment on disk, by epoch.
    segments: BTreeMap<u64, Segment>,
    /// Their total size.
    log_bytes: u64,
    /// Mark records in the current (overflowed) segment since the state last held them.
    overflow_marks: u64,
    /// An append failed part-way: the current segment must be cut back before the next one.
    tail_dirty: bool,
    /// Bytes written into the current epoch (not persisted: a restart starts counting anew).
    bytes_written: u64,
}

impl Inner {
    /// The first epoch of the current view's segments.
    fn current_first(&self) -> u64 {
        self.frozen
            .as_ref()
            .map_or(self.committed_epoch, |f| f.epoch)
            + 1
    }

    fn index_entries(&self) -> usize {
        self.current.index.len() + self.frozen.as_ref().map_or(0, |f| f.view.index.len())
    }
}

/// What a record logs.
#[derive(Clone, Copy)]
enum Entry<'a> {
    /// A write of this data.
    Data(&'a [u8]),
    /// A discard of this many bytes.
    Zero(u64),
}

/// How a write was logged.
enum Logged {
    /// Data records: (start sector, sector count, data position) in the current segment.
    Data(Vec<(u64, u64, u64)>),
    /// A zero record (a discard).
    Zero,
    /// A mark record.
    Mark,
}

/// The HRL-style tracker over a device `D`. See the module documentation.
#[derive(Debug)]
pub struct HrlTracker<D: BlockDevice> {
    dev: D,
    name: String,
    cfg: HrlConfig,
    dir: PathBuf,
    generation: Generation,
    log_bytes_max: u64,
    inner: Mutex<Inner>,
}

/// What `hrl.state` holds.
#[derive(Debug)]
struct State {
    generation: Generation,
    disk_bytes: u64,
    epoch: u64,
    frozen_epoch: Option<u64>,
    committed_epoch: u64,
    acked_epoch: u64,
    clean: bool,
    current_overflowed: bool,
    frozen_overflowed: bool,
    lost: Option<String>,
    marks: SectorBitmap,
    frozen_marks: Option<SectorBitmap>,
}

impl<D: BlockDevice> HrlTracker<D> {
    /// Opens the write-log tracker kept in `dir` (created if new) for `dev`: reads `hrl.state`,
    /// cuts torn segment tails, redoes logged writes after an unclean stop, merges back a frozen
    /// epoch that never committed. A damaged state loses tracking (reported, whole disk marked)
    /// rather than failing; a state made for another disk size is an
    /// [`Error::InvalidInput`] naming the file.
    pub fn open(dev: D, dir: &Path, cfg: HrlConfig) -> Result<(Self, OpenReport)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::state_io(dir, "cannot create the write-log directory", e))?;
        let disk_bytes = dev.size_bytes();
        let sectors = disk_bytes / SECTOR_SIZE;
        let state_path = dir.join(STATE_FILE);
        let found = list_segments(dir)?;
        let mut report = OpenReport::default();
        let fresh = |lost: Option<String>| -> Result<State> {
            Ok(State {
                generation: Generation::generate()?,
                disk_bytes,
                epoch: 1,
                frozen_epoch: None,
                committed_epoch: 0,
                acked_epoch: 0,
                clean: true,
                current_overflowed: false,
                frozen_overflowed: false,
                marks: if lost.is_some() {
                    SectorBitmap::full(sectors)
                } else {
                    SectorBitmap::new(sectors)
                },
                lost,
                frozen_marks: None,
            })
        };
        let mut doomed: Vec<PathBuf> = Vec::new();
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => match decode_state(&bytes, &state_path, disk_bytes) {
                Ok(s) => s,
                // A resized or swapped device is the operator's to sort out, not ours to guess.
                Err(e @ Error::InvalidInput(_)) => return Err(e),
                Err(e) => {
                    let reason = format!("the write-log state could not be read ({e})");
                    tracing::warn!(path = %state_path.display(), %reason, "tracking lost");
                    doomed.extend(found.values().cloned());
                    fresh(Some(reason))?
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if found.is_empty() {
                    fresh(None)?
                } else {
                    let reason = format!(
                        "{} is missing but {} log segments are there",
                        state_path.display(),
                        found.len()
                    );
                    tracing::warn!(%reason, "tracking lost");
                    doomed.extend(found.values().cloned());
                    fresh(Some(reason))?
                }
            }
            Err(e) => return Err(Error::state_io(&state_path, "cannot read", e)),
        };
        report.unclean = !state.clean;
        report.frozen_merged = state.frozen_epoch.is_some();
        let mut lost = state.lost.clone();
        let mut current = View::new(sectors);
        current.marks = state.marks.clone();
        if let Some(f) = &state.frozen_marks {
            current.marks.union_with(f)?;
        }
        current.overflowed = state.current_overflowed;
        let frozen_end = state.frozen_epoch.unwrap_or(state.committed_epoch);
        let mut segments = BTreeMap::new();
        let mut log_bytes = 0u64;
        // Data records to redo after an unclean stop, oldest first.
        let mut redo: Vec<LogRecord> = Vec::new();
        let redo_wanted = !state.clean;
        if doomed.is_empty() {
            for (&epoch, path) in &found {
                if epoch <= state.acked_epoch {
                    // Acknowledged; its deletion was interrupted.
                    doomed.push(path.clone());
                    continue;
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::state_io(path, "cannot open", e))?;
                let len = file
                    .metadata()
                    .map_err(|e| Error::state_io(path, "cannot stat", e))?
                    .len();
                if epoch <= state.committed_epoch {
                    // Shipped in a committed cycle: kept only until acknowledged.
                    segments.insert(epoch, Segment { len, file: None });
                    log_bytes += len;
                    continue;
                }
                if epoch > state.epoch {
                    let reason = format!(
                        "log segment {} is newer than the state's epoch {}",
                        path.display(),
                        state.epoch
                    );
                    tracing::warn!(%reason, "tracking lost");
                    lost.get_or_insert(reason);
                    doomed.push(path.clone());
                    continue;
                }
                // Not shipped: the frozen epoch's (merged back now) or the current one's.
                let header = match read_segment_header(&file, len) {
                    Ok(h) => h,
                    Err(ScanError::Io(e)) => {
                        return Err(Error::state_io(path, "cannot read log segment", e));
                    }
                    Err(ScanError::Header(_)) if len <= SEGMENT_HEADER_LEN => {
                        // Created but its header never fully written: records are appended only
                        // after the header is synced, so none can be lost with it.
                        tracing::warn!(path = %path.display(), "removing a log segment whose header was torn");
                        report.log_tails_cut += 1;
                        report.log_bytes_cut += len;
                        doomed.push(path.clone());
                        continue;
                    }
                    Err(ScanError::Header(e)) => {
                        let reason = format!("log segment {}: {e}", path.display());
                        tracing::warn!(%reason, "tracking lost");
                        lost.get_or_insert(reason);
                        doomed.push(path.clone());
                        continue;
                    }
                };
                if header.generation != state.generation || header.epoch != epoch {
                    let reason = format!(
                        "log segment {} belongs to generation {} epoch {}, not {} epoch {epoch}",
                        path.display(),
                        header.generation,
                        header.epoch,
                        state.generation
                    );
                    tracing::warn!(%reason, "tracking lost");
                    lost.get_or_insert(reason);
                    doomed.push(path.clone());
                    continue;
                }
                let overflowed =
                    state.current_overflowed || (epoch <= frozen_end && state.frozen_overflowed);
                let scan = scan_segment(&file, len, disk_bytes, |r| {
                    let (s, n) = (r.start_sector(), r.sector_count());
                    let logged = match r.kind {
                        RECORD_KIND_DATA => Some(Src::Log {
                            seg: epoch,
                            at: r.data_at(),
                        }),
                        RECORD_KIND_ZERO => Some(Src::Zero),
                        _ => None,
                    };
                    let bits = if let Some(src) = logged.filter(|_| !overflowed) {
                        current.index.insert(s, s + n, src);
                        if redo_wanted {
                            redo.push(*r);
                        }
                        current.logged.mark_sectors(s, n)
                    } else {
                        // The last write of these sectors is not in the log: the device has it.
                        current.index.remove(s, s + n);
                        current
                            .logged
                            .clear_sectors(s, n)
                            .and_then(|()| current.marks.mark_sectors(s, n))
                    };
                    bits.map_err(std::io::Error::other)
                });
                let end = match scan {
                    Ok(end) => end,
                    Err(ScanError::Io(e)) => {
                        return Err(Error::state_io(path, "cannot read log segment", e));
                    }
                    Err(ScanError::Header(e)) => {
                        return Err(Error::state(
                            path,
                            format!("log segment changed while read: {e}"),
                        ));
                    }
                };
                if let Some(torn) = &end.torn {
                    tracing::warn!(
                        path = %path.display(),
                        offset = torn.offset_bytes,
                        reason = %torn.reason,
                        cut_bytes = len - end.valid_bytes,
                        "cutting the torn tail of a log segment"
                    );
                    file.set_len(end.valid_bytes)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| Error::state_io(path, "cannot cut the torn tail", e))?;
                    report.log_tails_cut += 1;
                    report.log_bytes_cut += len - end.valid_bytes;
                }
                if overflowed {
                    // Its records are marks now (persisted below); the segment goes.
                    doomed.push(path.clone());
                    continue;
                }
                log_bytes += end.valid_bytes;
                segments.insert(
                    epoch,
                    Segment {
                        len: end.valid_bytes,
                        file: Some(file),
                    },
                );
            }
        }
        if lost.is_some() {
            // Nothing of it can be vouched for: every sector ships from the device.
            current.drop_data()?;
            current.marks = SectorBitmap::full(sectors);
        }
        // Redo: the device then holds what the log says, whatever the crash cut short.
        let mut chunk = Vec::new();
        for r in &redo {
            if r.kind == RECORD_KIND_ZERO {
                dev.discard(r.offset_bytes, r.len_bytes)?;
                report.records_redone += 1;
                continue;
            }
            let Some(file) = segments.get(&r.epoch).and_then(|s| s.file.as_ref()) else {
                continue;
            };
            let mut at = 0u64;
            while at < r.len_bytes {
                let n = (r.len_bytes - at).min(SCAN_CHUNK_BYTES) as usize;
                chunk.resize(n, 0);
                file.read_exact_at(&mut chunk, r.data_at() + at)
                    .map_err(|e| {
                        Error::state_io(
                            dir.join(segment_file_name(r.epoch)),
                            "cannot read a record to redo",
                            e,
                        )
                    })?;
                dev.write_at(&chunk, r.offset_bytes + at)?;
                at += n as u64;
            }
            report.records_redone += 1;
        }
        dev.flush()?;
        report.lost = lost.clone();
        let name = format!("hrl({})", dev.name());
        let log_bytes_max = cfg.log_bytes_max(disk_bytes);
        let tracker = HrlTracker {
            dev,
            name,
            cfg,
            dir: dir.to_path_buf(),
            generation: state.generation,
            log_bytes_max,
            inner: Mutex::new(Inner {
                bytes_written: 0,
                epoch: state.epoch,
                committed_epoch: state.committed_epoch,
                acked_epoch: state.acked_epoch,
                lost,
                clean: true,
                current,
                frozen: None,
                segments,
                log_bytes,
                overflow_marks: 0,
                tail_dirty: false,
            }),
        };
        {
            // The merged state first, then the segments it no longer needs.
            let inner = tracker.lock();
            tracker.save(&inner)?;
        }
        for path in &doomed {
            remove_file(path)?;
        }
        if !doomed.is_empty() {
            sync_dir(dir)?;
        }
        Ok((tracker, report))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device underneath.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an epoch is frozen.
    pub fn is_frozen(&self) -> bool {
        self.lock().frozen.is_some()
    }

    /// Bytes of all segments on disk (what the log limit counts).
    pub fn log_bytes(&self) -> u64 {
        self.lock().log_bytes
    }

    /// The log limit in bytes.
    pub fn log_bytes_max(&self) -> u64 {
        self.log_bytes_max
    }

    /// Whether the current epoch overflowed to bitmap marks.
    pub fn overflowed(&self) -> bool {
        self.lock().current.overflowed
    }

    /// Epochs whose segments are on disk, oldest first.
    pub fn segment_epochs(&self) -> Vec<u64> {
        self.lock().segments.keys().copied().collect()
    }

    fn seg_path(&self, epoch: u64) -> PathBuf {
        self.dir.join(segment_file_name(epoch))
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Persists the state (atomic replace).
    fn save(&self, inner: &Inner) -> Result<()> {
        let state = State {
            generation: self.generation,
            disk_bytes: self.dev.size_bytes(),
            epoch: inner.epoch,
            frozen_epoch: inner.frozen.as_ref().map(|f| f.epoch),
            committed_epoch: inner.committed_epoch,
            acked_epoch: inner.acked_epoch,
            clean: inner.clean,
            current_overflowed: inner.current.overflowed,
            frozen_overflowed: inner.frozen.as_ref().is_some_and(|f| f.view.overflowed),
            lost: inner.lost.clone(),
            marks: inner.current.marks.clone(),
            frozen_marks: inner.frozen.as_ref().map(|f| f.view.marks.clone()),
        };
        write_atomic(&self.state_path(), &encode_state(&state))
    }

    /// Deletes the segments of epochs in `range` (the state no longer needs them).
    fn delete_segments(&self, inner: &mut Inner, epochs: Vec<u64>) -> Result<()> {
        if epochs.is_empty() {
            return Ok(());
        }
        for epoch in epochs {
            if let Some(seg) = inner.segments.remove(&epoch) {
                inner.log_bytes = inner.log_bytes.saturating_sub(seg.len);
                drop(seg.file);
                remove_file(&self.seg_path(epoch))?;
            }
        }
        sync_dir(&self.dir)
    }

    /// Widens a write to whole sectors, reading the partly written sectors' other bytes from the
    /// device. Returns the aligned offset and the data.
    fn widen<'a>(
        &self,
        buf: &'a [u8],
        offset_bytes: u64,
    ) -> Result<(u64, std::borrow::Cow<'a, [u8]>)> {
        let len = buf.len() as u64;
        if offset_bytes.is_multiple_of(SECTOR_SIZE) && len.is_multiple_of(SECTOR_SIZE) {
            return Ok((offset_bytes, std::borrow::Cow::Borrowed(buf)));
        }
        let start = offset_bytes / SECTOR_SIZE * SECTOR_SIZE;
        let end = (offset_bytes + len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let mut wide = vec![0u8; (end - start) as usize];
        let s = SECTOR_SIZE as usize;
        self.dev.read_at(&mut wide[..s], start)?;
        if end - start > SECTOR_SIZE {
            let last = wide.len() - s;
            self.dev.read_at(&mut wide[last..], end - SECTOR_SIZE)?;
        }
        let skip = (offset_bytes - start) as usize;
        wide[skip..skip + buf.len()].copy_from_slice(buf);
        Ok((start, std::borrow::Cow::Owned(wide)))
    }

    /// Makes the current epoch overflow: flush the device, turn its logged sectors into marks,
    /// persist that, delete its segments.
    fn overflow(&self, inner: &mut Inner, why: &str) -> Result<()> {
        self.dev.flush()?;
        let saved_marks = inner.current.marks.clone();
        let saved_index = std::mem::take(&mut inner.current.index);
        let saved_logged = inner.current.logged.clone();
        inner.current.drop_data()?;
        inner.current.overflowed = true;
        if let Err(e) = self.save(inner) {
            inner.current.marks = saved_marks;
            inner.current.index = saved_index;
            inner.current.logged = saved_logged;
            inner.current.overflowed = false;
            return Err(e);
        }
        let first = inner.current_first();
        let doomed: Vec<u64> = inner.segments.range(first..).map(|(e, _)| *e).collect();
        self.delete_segments(inner, doomed)?;
        inner.overflow_marks = 0;
        tracing::warn!(
            tracker = %self.name,
            epoch = inner.epoch,
            %why,
            "the write log overflowed: this epoch falls back to bitmap marks, and its cycle reads \
             those sectors from the device (not point in time)"
        );
        Ok(())
    }

    /// Creates the current epoch's segment if it has none.
    fn ensure_segment(&self, inner: &mut Inner) -> Result<()> {
        let epoch = inner.epoch;
        if inner.segments.contains_key(&epoch) {
            return Ok(());
        }
        let path = self.seg_path(epoch);
        let header = encode_segment_header(&SegmentHeader {
            generation: self.generation,
            epoch,
        });
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::state_io(&path, "cannot create", e))?;
        file.write_all_at(&header, 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::state_io(&path, "cannot write the header", e))?;
        sync_dir(&self.dir)?;
        inner.segments.insert(
            epoch,
            Segment {
                len: SEGMENT_HEADER_LEN,
                file: Some(file),
            },
        );
        inner.log_bytes += SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// Appends the records of a write of `data` at `start` (aligned) to the current segment and
    /// syncs it; overflows first if the data would pass a limit.
    fn log_write(&self, inner: &mut Inner, start: u64, data: &[u8]) -> Result<Logged> {
        self.log_entry(inner, start, Entry::Data(data))
    }

    /// Appends the record of `entry` at `start` (aligned) to the current segment and syncs it.
    fn log_entry(&self, inner: &mut Inner, start: u64, entry: Entry<'_>) -> Result<Logged> {
        let (len, data_bytes, pieces) = match entry {
            Entry::Data(data) => (
                data.len() as u64,
                data.len() as u64,
                (data.len() as u64).div_ceil(RECORD_DATA_BYTES_MAX),
            ),
            Entry::Zero(len) => (len, 0, 1),
        };
        if !inner.current.overflowed {
            let header = if inner.segments.contains_key(&inner.epoch) {
                0
            } else {
                SEGMENT_HEADER_LEN
            };
            let bytes = data_bytes + pieces * RECORD_HEADER_LEN + header;
            // Each insert adds at most two entries (the new piece and a split remainder).
            let entries = inner.index_entries() as u64 + 2 * pieces;
            if inner.log_bytes.saturating_add(bytes) > self.log_bytes_max {
                self.overflow(inner, "the log reached its byte limit")?;
            } else if entries > self.cfg.index_entries_max as u64 {
                self.overflow(inner, "the log index reached its entry limit")?;
            }
        }
        self.ensure_segment(inner)?;
        let epoch = inner.epoch;
        let path = self.seg_path(epoch);
        let Inner {
            segments,
            tail_dirty,
            current,
            log_bytes,
            ..
        } = inner;
        let seg = segments
            .get_mut(&epoch)
            .ok_or_else(|| Error::state(&path, "the current segment is not open"))?;
        let file = seg
            .file
            .as_ref()
            .ok_or_else(|| Error::state(&path, "the current segment is not open"))?;
        if *tail_dirty {
            file.set_len(seg.len)
                .and_then(|()| file.sync_data())
                .map_err(|e| Error::state_io(&path, "cannot cut back a failed append", e))?;
            *tail_dirty = false;
        }
        let mut bytes = Vec::new();
        let logged = match entry {
            _ if current.overflowed => {
                encode_mark_record(&mut bytes, epoch, start, len);
                Logged::Mark
            }
            Entry::Zero(len) => {
                encode_zero_record(&mut bytes, epoch, start, len);
                Logged::Zero
            }
            Entry::Data(data) => {
                bytes.reserve(data.len() + RECORD_HEADER_LEN as usize * 2);
                let mut placed = Vec::new();
                for (i, piece) in data.chunks(RECORD_DATA_BYTES_MAX as usize).enumerate() {
                    let offset = start + i as u64 * RECORD_DATA_BYTES_MAX;
                    let data_at = seg.len + bytes.len() as u64 + RECORD_HEADER_LEN;
                    encode_data_record(&mut bytes, epoch, offset, piece);
                    placed.push((
                        offset / SECTOR_SIZE,
                        piece.len() as u64 / SECTOR_SIZE,
                        data_at,
                    ));
                }
                Logged::Data(placed)
            }
        };
        if let Err(e) = file
            .write_all_at(&bytes, seg.len)
            .and_then(|()| file.sync_data())
        {
            *tail_dirty = true;
            return Err(Error::state_io(&path, "cannot append to the write log", e));
        }
        seg.len += bytes.len() as u64;
        *log_bytes += bytes.len() as u64;
        Ok(logged)
    }

    /// Records a logged write in the current view.
    fn note_write(&self, inner: &mut Inner, start: u64, len: u64, logged: &Logged) -> Result<()> {
        let epoch = inner.epoch;
        match logged {
            Logged::Data(placed) => {
                for &(s, n, at) in placed {
                    inner
                        .current
                        .index
                        .insert(s, s + n, Src::Log { seg: epoch, at });
                    inner.current.logged.mark_sectors(s, n)?;
                }
            }
            Logged::Zero => {
                let (s, n) = (start / SECTOR_SIZE, len / SECTOR_SIZE);
                inner.current.index.insert(s, s + n, Src::Zero);
                inner.current.logged.mark_sectors(s, n)?;
            }
            Logged::Mark => {
                let (s, n) = (start / SECTOR_SIZE, len / SECTOR_SIZE);
                inner.current.index.remove(s, s + n);
                inner.current.logged.clear_sectors(s, n)?;
                inner.current.marks.mark_sectors(s, n)?;
                inner.overflow_marks += 1;
            }
        }
        Ok(())
    }

    /// Folds an overflowed segment's mark records into the state and empties the segment.
    fn fold_marks(&self, inner: &mut Inner) -> Result<()> {
        self.save(inner)?;
        let epoch = inner.epoch;
        let path = self.seg_path(epoch);
        if let Some(seg) = inner.segments.get_mut(&epoch)
            && let Some(file) = seg.file.as_ref()
            && seg.len > SEGMENT_HEADER_LEN
        {
            file.set_len(SEGMENT_HEADER_LEN)
                .and_then(|()| file.sync_data())
                .map_err(|e| Error::state_io(&path, "cannot empty", e))?;
            inner.log_bytes = inner.log_bytes.saturating_sub(seg.len - SEGMENT_HEADER_LEN);
            seg.len = SEGMENT_HEADER_LEN;
        }
        inner.overflow_marks = 0;
        Ok(())
    }

    /// Writes through the tracker like [`BlockDevice::write_at`] and returns the epoch the write
    /// was logged in: it ships in the cycle that freezes that epoch. The record is on disk before
    /// the device is written.
    pub fn write_tracked(&self, buf: &[u8], offset_bytes: u64) -> Result<u64> {
        check_range(self, DeviceOp::Write, offset_bytes, buf.len() as u64)?;
        let mut inner = self.lock();
        if buf.is_empty() {
            return Ok(inner.epoch);
        }
        let (start, data) = self.widen(buf, offset_bytes)?;
        let len = data.len() as u64;
        if inner.clean {
            inner.clean = false;
            if let Err(e) = self.save(&inner) {
                inner.clean = true;
                return Err(e);
            }
        }
        let logged = self.log_write(&mut inner, start, &data)?;
        if let Err(e) = self.dev.write_at(&data, start) {
            self.after_failed_write(&mut inner, start, len, logged);
            return Err(e.into());
        }
        self.note_write(&mut inner, start, len, &logged)?;
        inner.bytes_written = inner.bytes_written.saturating_add(buf.len() as u64);
        if inner.current.overflowed && inner.overflow_marks >= self.cfg.overflow_marks_max {
            self.fold_marks(&mut inner)?;
        }
        Ok(inner.epoch)
    }

    /// Discards through the tracker like [`BlockDevice::discard`]: a zero record (header only,
    /// whatever the length) is logged before the device discards the range, and the frozen
    /// epoch's reads give zeros for it. A range that is not whole sectors is logged and written
    /// as zeros instead. Returns the epoch it was logged in.
    pub fn discard_tracked(&self, offset_bytes: u64, len_bytes: u64) -> Result<u64> {
        check_range(self, DeviceOp::Discard, offset_bytes, len_bytes)?;
        if !offset_bytes.is_multiple_of(SECTOR_SIZE) || !len_bytes.is_multiple_of(SECTOR_SIZE) {
            let mut done = 0;
            let mut epoch = self.epoch()?;
            let zeros = vec![0u8; len_bytes.min(RECORD_DATA_BYTES_MAX) as usize];
            while done < len_bytes {
                let n = (len_bytes - done).min(RECORD_DATA_BYTES_MAX);
                epoch = self.write_tracked(&zeros[..n as usize], offset_bytes + done)?;
                done += n;
            }
            return Ok(epoch);
        }
        let mut inner = self.lock();
        if len_bytes == 0 {
            return Ok(inner.epoch);
        }
        if inner.clean {
            inner.clean = false;
            if let Err(e) = self.save(&inner) {
                inner.clean = true;
                return Err(e);
            }
        }
        let logged = self.log_entry(&mut inner, offset_bytes, Entry::Zero(len_bytes))?;
        if let Err(e) = self.dev.discard(offset_bytes, len_bytes) {
            self.after_failed_write(&mut inner, offset_bytes, len_bytes, logged);
            return Err(e.into());
        }
        self.note_write(&mut inner, offset_bytes, len_bytes, &logged)?;
        inner.bytes_written = inner.bytes_written.saturating_add(len_bytes);
        if inner.current.overflowed && inner.overflow_marks >= self.cfg.overflow_marks_max {
            self.fold_marks(&mut inner)?;
        }
        Ok(inner.epoch)
    }

    /// The device refused a logged write: its sectors now hold something the log does not say.
    /// Log what they hold instead (read back), so log and device agree again; if even that
    /// fails, tracking is lost.
    fn after_failed_write(&self, inner: &mut Inner, start: u64, len: u64, logged: Logged) {
        let outcome = (|| -> Result<()> {
            match logged {
                Logged::Mark => self.note_write(inner, start, len, &Logged::Mark),
                Logged::Data(_) | Logged::Zero => {
                    // In bounded steps: a discard can be far longer than any write.
                    let mut now = vec![0u8; len.min(RECORD_DATA_BYTES_MAX) as usize];
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(RECORD_DATA_BYTES_MAX);
                        let buf = &mut now[..n as usize];
                        self.dev.read_at(buf, start + done)?;
                        let again = self.log_write(inner, start + done, buf)?;
                        self.note_write(inner, start + done, n, &again)?;
                        done += n;
                    }
                    Ok(())
                }
            }
        })();
        if let Err(e) = outcome {
            let reason = format!(
                "a failed device write at offset {start} ({len} bytes) could not be logged as \
                 what the device holds ({e})"
            );
            tracing::warn!(tracker = %self.name, %reason, "tracking lost");
            inner.lost.get_or_insert(reason);
            let _ = self.save(inner);
        }
    }
}

impl<D: BlockDevice> ChangeTracker for HrlTracker<D> {
    fn kind(&self) -> &'static str {
        "hrl"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn disk_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }

    fn generation(&self) -> Generation {
        self.generation
    }

    fn epoch(&self) -> Result<u64> {
        Ok(self.lock().epoch)
    }

    fn current(&self) -> Result<SectorBitmap> {
        self.lock().current.bitmap()
    }

    fn mark_all(&self) -> Result<()> {
        let mut inner = self.lock();
        let sectors = self.dev.size_bytes() / SECTOR_SIZE;
        inner.current.marks = SectorBitmap::full(sectors);
        self.save(&inner)
    }

    fn carry(&self, sectors: &SectorBitmap) -> Result<()> {
        let mut inner = self.lock();
        inner.current.marks.union_with(sectors)?;
        self.save(&inner)
    }

    fn freeze(&self) -> Result<Frozen> {
        let mut inner = self.lock();
        if let Some(f) = &inner.frozen {
            return Err(Error::InvalidInput(format!(
                "{}: epoch {} is already frozen by a running cycle",
                self.name, f.epoch
            )));
        }
        // The frozen epoch's writes are durable on the device from here on, so a crash needs
        // to redo only later epochs.
        self.dev.flush()?;
        let sectors = self.dev.size_bytes() / SECTOR_SIZE;
        let mut view = std::mem::replace(&mut inner.current, View::new(sectors));
        let lost = inner.lost.clone();
        if lost.is_some() {
            // A resync: every sector from the device, whatever the log says.
            view.drop_data()?;
            view.marks = SectorBitmap::full(sectors);
        }
        let bitmap = view.bitmap()?;
        let epoch = inner.epoch;
        inner.frozen = Some(FrozenView {
            epoch,
            view,
            lost: lost.is_some(),
        });
        inner.epoch += 1;
        inner.overflow_marks = 0;
        if let Err(e) = self.save(&inner) {
            if let Some(f) = inner.frozen.take() {
                inner.current = f.view;
            }
            inner.epoch = epoch;
            return Err(e);
        }
        Ok(Frozen {
            epoch,
            bitmap,
            lost,
            bytes_written: Some(std::mem::take(&mut inner.bytes_written)),
        })
    }

    /// Reads `buf.len()` bytes at `offset_bytes` as the frozen epoch has them: logged sectors
    /// from the log (as of the freeze), the others from the device.
    fn read_frozen(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        let inner = self.lock();
        let Some(frozen) = inner.frozen.as_ref() else {
            return Err(Error::InvalidInput(format!(
                "{}: no epoch is frozen",
                self.name
            )));
        };
        if !offset_bytes.is_multiple_of(SECTOR_SIZE)
            || !(buf.len() as u64).is_multiple_of(SECTOR_SIZE)
        {
            return Err(Error::InvalidInput(format!(
                "{}: frozen reads must be sector-aligned (offset {offset_bytes}, length {})",
                self.name,
                buf.len()
            )));
        }
        check_range(&self.dev, DeviceOp::Read, offset_bytes, buf.len() as u64)?;
        let start = offset_bytes / SECTOR_SIZE;
        let end = start + buf.len() as u64 / SECTOR_SIZE;
        for (lo, hi, from) in frozen.view.index.runs(start, end) {
            let dst = &mut buf
                [((lo - start) * SECTOR_SIZE) as usize..((hi - start) * SECTOR_SIZE) as usize];
            match from {
                ReadFrom::Device => self.dev.read_at(dst, lo * SECTOR_SIZE)?,
                ReadFrom::Zero => dst.fill(0),
                ReadFrom::Log(seg, at) => {
                    let path = self.seg_path(seg);
                    let file = inner
                        .segments
                        .get(&seg)
                        .and_then(|s| s.file.as_ref())
                        .ok_or_else(|| {
                            Error::state(&path, "log segment of the frozen epoch is not open")
                        })?;
                    file.read_exact_at(dst, at).map_err(|e| {
                        Error::state_io(
                            &path,
                            &format!("cannot read logged sectors at offset {at}"),
                            e,
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Ends the frozen epoch. Committed: its marks are dropped, its segments kept until the
    /// target acknowledges the cycle. Otherwise it merges back into the current epoch.
    fn release(&self, committed: bool) -> Result<()> {
        let mut inner = self.lock();
        let Some(frozen) = inner.frozen.take() else {
            return Ok(());
        };
        if committed {
            inner.committed_epoch = frozen.epoch;
            if frozen.lost {
                // The cycle that saw the loss shipped the whole disk's differences.
                inner.lost = None;
            }
            for seg in inner.segments.range_mut(..=frozen.epoch) {
                seg.1.file = None;
            }
            return self.save(&inner);
        }
        let first = inner.committed_epoch + 1;
        let sectors = self.dev.size_bytes() / SECTOR_SIZE;
        let newer = std::mem::replace(&mut inner.current, View::new(sectors));
        let mut older = frozen.view;
        let mut doomed = Vec::new();
        let merged = if newer.overflowed || older.overflowed {
            // The older epoch's segments hold nothing the marks do not: they go.
            doomed = inner
                .segments
                .range(first..=frozen.epoch)
                .map(|(e, _)| *e)
                .collect();
            older.drop_data()?;
            let mut merged = newer;
            merged.marks.union_with(&older.marks)?;
            merged
        } else {
            older.index.overlay(&newer.index);
            older.logged.union_with(&newer.logged)?;
            older.marks.union_with(&newer.marks)?;
            older
        };
        inner.current = merged;
        self.save(&inner)?;
        self.delete_segments(&mut inner, doomed)
    }

    /// The target applied the cycle that froze `epoch`: segments up to it (and up to the last
    /// committed epoch) are deleted.
    fn acknowledged(&self, epoch: u64) -> Result<()> {
        let mut inner = self.lock();
        let upto = epoch.min(inner.committed_epoch);
        if upto <= inner.acked_epoch {
            return Ok(());
        }
        inner.acked_epoch = upto;
        self.save(&inner)?;
        let doomed: Vec<u64> = inner.segments.range(..=upto).map(|(e, _)| *e).collect();
        self.delete_segments(&mut inner, doomed)
    }

    /// A clean stop point: flushes the device and records that nothing is pending.
    fn checkpoint(&self) -> Result<()> {
        let mut inner = self.lock();
        self.dev.flush()?;
        if inner.current.overflowed && inner.overflow_marks > 0 {
            self.fold_marks(&mut inner)?;
        }
        let was = inner.clean;
        inner.clean = true;
        if let Err(e) = self.save(&inner) {
            inner.clean = was;
            return Err(e);
        }
        Ok(())
    }
}

super::write_through_device!(HrlTracker);

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Segment files in `dir`, by epoch; other names are ignored.
fn list_segments(dir: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::state_io(dir, "cannot list the write log", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::state_io(dir, "cannot list the write log", e))?;
        let name = entry.file_name();
        if let Some(epoch) = name.to_str().and_then(segment_epoch) {
            out.insert(epoch, entry.path());
        }
    }
    Ok(out)
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::state_io(path, "cannot delete", e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::state_io(dir, "cannot sync the directory", e))
}

fn encode_state(s: &State) -> Vec<u8> {
    let marks = s.marks.encode();
    let frozen = s.frozen_marks.as_ref().map(SectorBitmap::encode);
    let mut reason = s.lost.as_deref().unwrap_or("").as_bytes();
    if reason.len() > LOST_REASON_BYTES_MAX {
        reason = &reason[..LOST_REASON_BYTES_MAX];
    }
    let mut flags = 0u8;
    if s.clean {
        flags |= FLAG_CLEAN;
    }
    if s.current_overflowed {
        flags |= FLAG_CURRENT_OVERFLOWED;
    }
    if s.frozen_overflowed {
        flags |= FLAG_FROZEN_OVERFLOWED;
    }
    if s.lost.is_some() {
        flags |= FLAG_LOST;
    }
    let mut out = Vec::with_capacity(96 + reason.len() + marks.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&s.generation.0);
    out.extend_from_slice(&s.disk_bytes.to_le_bytes());
    out.extend_from_slice(&s.epoch.to_le_bytes());
    out.extend_from_slice(&s.frozen_epoch.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&s.committed_epoch.to_le_bytes());
    out.extend_from_slice(&s.acked_epoch.to_le_bytes());
    out.push(flags);
    out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(&(marks.len() as u64).to_le_bytes());
    out.extend_from_slice(&marks);
    let frozen = frozen.unwrap_or_default();
    out.extend_from_slice(&(frozen.len() as u64).to_le_bytes());
    out.extend_from_slice(&frozen);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes `hrl.state`. Damage is [`Error::State`] naming the file and offset; a state for
/// another disk size is [`Error::InvalidInput`].
/// Parses `hrl.state` bytes for a disk of `disk_bytes` and encodes what it read again (public
/// for the fuzz target: the result must parse to the same bytes once more).
pub fn reencode_state(bytes: &[u8], disk_bytes: u64) -> Result<Vec<u8>> {
    decode_state(bytes, Path::new(STATE_FILE), disk_bytes).map(|s| encode_state(&s))
}

fn decode_state(bytes: &[u8], path: &Path, disk_bytes: u64) -> Result<State> {
    let bad = |at: usize, why: &str| {
        Error::state(
            path,
            format!("damaged write-log state at offset {at}: {why}"),
        )
    };
    const FIXED: usize = 8 + GENERATION_LEN + 8 * 5 + 1 + 4;
    if bytes.len() < FIXED + 8 + 8 + 4 {
        return Err(bad(0, "too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if le_u32(crc) != crc32fast::hash(body) {
        return Err(bad(body.len(), "CRC mismatch"));
    }
    if body[0..8] != STATE_MAGIC {
        return Err(bad(0, "bad magic"));
    }
    let mut pos = 8usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let s = body
            .get(*pos..pos.saturating_add(n))
            .ok_or_else(|| bad(*pos, "truncated"))?;
        *pos += n;
        Ok(s)
    };
    let mut g = [0u8; GENERATION_LEN];
    g.copy_from_slice(take(&mut pos, GENERATION_LEN)?);
    let stored_disk = le_u64(take(&mut pos, 8)?);
    if stored_disk != disk_bytes {
        return Err(Error::InvalidInput(format!(
            "{}: this write log tracks a disk of {stored_disk} bytes but the device has \
             {disk_bytes}; was the device resized or swapped? Use the log directory that belongs \
             to this disk",
            path.display()
        )));
    }
    let epoch_at = pos;
    let epoch = le_u64(take(&mut pos, 8)?);
    let frozen_epoch = le_u64(take(&mut pos, 8)?);
    let committed_epoch = le_u64(take(&mut pos, 8)?);
    let acked_epoch = le_u64(take(&mut pos, 8)?);
    if epoch == 0
        || (frozen_epoch != 0 && frozen_epoch.checked_add(1) != Some(epoch))
        || committed_epoch >= epoch
        || (frozen_epoch != 0 && committed_epoch >= frozen_epoch)
        || acked_epoch > committed_epoch
    {
        return Err(bad(
            epoch_at,
            &format!(
                "inconsistent epochs (current {epoch}, frozen {frozen_epoch}, committed \
                 {committed_epoch}, acknowledged {acked_epoch})"
            ),
        ));
    }
    let flags_at = pos;
    let flags = take(&mut pos, 1)?[0];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(bad(flags_at, &format!("unknown flags {flags:#04x}")));
    }
    let reason_len = le_u32(take(&mut pos, 4)?) as usize;
    if reason_len > LOST_REASON_BYTES_MAX {
        return Err(bad(pos - 4, "lost reason too long"));
    }
    let reason = String::from_utf8_lossy(take(&mut pos, reason_len)?).into_owned();
    let bitmap = |pos: &mut usize, what: &str| -> Result<Option<SectorBitmap>> {
        let at = *pos;
        let len = usize::try_from(le_u64(take(pos, 8)?)).map_err(|_| bad(at, "length overflow"))?;
        if len == 0 {
            return Ok(None);
        }
        let b = SectorBitmap::decode(take(pos, len)?)
            .map_err(|e| bad(at + 8, &format!("{what}: {e}")))?;
        if b.disk_sectors() != disk_bytes / SECTOR_SIZE {
            return Err(bad(
                at + 8,
                &format!("{what} is for {} sectors", b.disk_sectors()),
            ));
        }
        Ok(Some(b))
    };
    let marks =
        bitmap(&mut pos, "marks bitmap")?.ok_or_else(|| bad(pos, "marks bitmap missing"))?;
    let frozen_marks = bitmap(&mut pos, "frozen marks bitmap")?;
    if frozen_marks.is_some() != (frozen_epoch != 0) {
        return Err(bad(pos, "frozen marks do not match the frozen epoch"));
    }
    if pos != body.len() {
        return Err(bad(pos, "trailing bytes"));
    }
    Ok(State {
        generation: Generation(g),
        disk_bytes,
        epoch,
        frozen_epoch: (frozen_epoch != 0).then_some(frozen_epoch),
        committed_epoch,
        acked_epoch,
        clean: flags & FLAG_CLEAN != 0,
        current_overflowed: flags & FLAG_CURRENT_OVERFLOWED != 0,
        frozen_overflowed: flags & FLAG_FROZEN_OVERFLOWED != 0,
        lost: (flags & FLAG_LOST != 0).then_some(reason),
        marks,
        frozen_marks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(ix: &Index) -> Vec<(u64, u64, u64, u64)> {
        ix.map
            .iter()
            .map(|(s, p)| match p.src {
                Src::Log { seg, at } => (*s, p.end, seg, at),
                Src::Zero => (*s, p.end, u64::MAX, 0),
            })
            .collect()
    }

    fn log(seg: u64, at: u64) -> Src {
        Src::Log { seg, at }
    }

    #[test]
    fn index_last_write_wins_and_splits() {
        let mut ix = Index::default();
        ix.insert(0, 10, log(1, 1000));
        ix.insert(4, 6, log(2, 5000));
        assert_eq!(
            pieces(&ix),
            vec![(0, 4, 1, 1000), (4, 6, 2, 5000), (6, 10, 1, 1000 + 6 * 512)]
        );
        ix.insert(2, 8, log(3, 9000));
        assert_eq!(
            pieces(&ix),
            vec![(0, 2, 1, 1000), (2, 8, 3, 9000), (8, 10, 1, 1000 + 8 * 512)]
        );
        assert_eq!(
            ix.runs(1, 12),
            vec![
                (1, 2, ReadFrom::Log(1, 1000 + 512)),
                (2, 8, ReadFrom::Log(3, 9000)),
                (8, 10, ReadFrom::Log(1, 1000 + 8 * 512)),
                (10, 12, ReadFrom::Device)
            ]
        );
        // A discard over part of it: zeros there, the log's data either side.
        ix.insert(3, 5, Src::Zero);
        assert_eq!(
            ix.runs(2, 9),
            vec![
                (2, 3, ReadFrom::Log(3, 9000)),
                (3, 5, ReadFrom::Zero),
                (5, 8, ReadFrom::Log(3, 9000 + 3 * 512)),
                (8, 9, ReadFrom::Log(1, 1000 + 8 * 512)),
            ]
        );
        ix.insert(4, 6, log(4, 100));
        assert_eq!(
            ix.runs(3, 6),
            vec![(3, 4, ReadFrom::Zero), (4, 6, ReadFrom::Log(4, 100))]
        );
        ix.remove(0, 20);
        assert!(ix.map.is_empty());
        assert_eq!(ix.runs(3, 5), vec![(3, 5, ReadFrom::Device)]);
    }

    #[test]
    fn segment_round_trip_and_torn_tail() {
        let g = Generation([9; GENERATION_LEN]);
        let mut seg = encode_segment_header(&SegmentHeader {
            generation: g,
            epoch: 3,
        })
        .to_vec();
        encode_data_record(&mut seg, 3, 512, &[7u8; 1024]);
        encode_mark_record(&mut seg, 3, 4096, 512);
        encode_zero_record(&mut seg, 3, 8192, 1 << 19);
        let whole = seg.len() as u64;
        let d = decode_segment(&seg, 1 << 20).unwrap();
        assert_eq!(d.header.epoch, 3);
        assert_eq!(d.records.len(), 3);
        assert_eq!(d.records[2].kind, RECORD_KIND_ZERO);
        assert_eq!(d.records[2].len_bytes, 1 << 19);
        assert_eq!(d.records[2].stored_len(), RECORD_HEADER_LEN);
        assert_eq!(d.valid_bytes, whole);
        assert!(d.torn.is_none());
        // Cut mid-record: the records before it stay.
        let cut = &seg[..seg.len() - 10];
        let d = decode_segment(cut, 1 << 20).unwrap();
        assert_eq!(d.records.len(), 2);
        assert_eq!(d.torn.as_ref().map(|t| t.offset_bytes), Some(d.valid_bytes));
        // A flipped data byte ends the log at that record.
        let mut flipped = seg.clone();
        flipped[(SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 5) as usize] ^= 1;
        let d = decode_segment(&flipped, 1 << 20).unwrap();
        assert!(d.records.is_empty());
        assert_eq!(d.valid_bytes, SEGMENT_HEADER_LEN);
        // A record past the disk end is structure damage.
        let d = decode_segment(&seg, 4096).unwrap();
        assert_eq!(d.records.len(), 1);
        assert!(d.torn.unwrap().reason.contains("disk end"));
        assert!(matches!(
            decode_segment(&seg[..10], 1 << 20),
            Err(SegmentError::Truncated { found: 10 })
        ));
    }

    #[test]
    fn state_round_trip_and_damage() {
        let sectors = 2048;
        let mut marks = SectorBitmap::new(sectors);
        marks.mark_sectors(5, 3).unwrap();
        let s = State {
            generation: Generation([1; GENERATION_LEN]),
            disk_bytes: sectors * 512,
            epoch: 5,
            frozen_epoch: Some(4),
            committed_epoch: 3,
            acked_epoch: 2,
            clean: true,
            current_overflowed: false,
            frozen_overflowed: true,
            lost: Some("why".into()),
            marks: marks.clone(),
            frozen_marks: Some(SectorBitmap::new(sectors)),
        };
        let bytes = encode_state(&s);
        let p = Path::new("x/hrl.state");
        let d = decode_state(&bytes, p, sectors * 512).unwrap();
        assert_eq!(d.epoch, 5);
        assert_eq!(d.frozen_epoch, Some(4));
        assert_eq!(d.lost.as_deref(), Some("why"));
        assert!(d.clean && d.frozen_overflowed && !d.current_overflowed);
        assert_eq!(d.marks.count(), 3);
        assert!(matches!(
            decode_state(&bytes, p, 4096),
            Err(Error::InvalidInput(m)) if m.contains("hrl.state")
        ));
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        let e = decode_state(&bad, p, sectors * 512)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hrl.state") && e.contains("offset"), "{e}");
    }
}
