//! Shared fixtures for the criterion benchmarks in `benches/`: a seeded generator of realistic disk
//! content, scattered write patterns, and the blob extent layout the source builds from disk data.
//!
//! The content is neither all-zero (which compresses to nothing and hides the cost of the body)
//! nor pure random (which never compresses): a disk is cut into 4 KiB blocks, and runs of 1 to 16
//! blocks are filled with one of
//!
//! * **text**: log and config lines from a small vocabulary, with numbers and timestamps;
//! * **structured binary**: fixed-size records of counters, small integers, pointer-like values
//!   that share their high bits, and zero padding (database pages, executables);
//! * **random**: already compressed or encrypted data;
//! * **zero**: unallocated or freshly trimmed space.
//!
//! Everything is derived from a seed through [`ChaCha8Rng`], so every run measures the same bytes.

pub mod pipeline;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::bitmap::{Extent, SECTOR_SIZE};
use replicator_core::device::{BlockDevice, DeviceError};
use replicator_core::format::BlobExtent;
use replicator_core::source::split_zero_runs;

/// The unit of content: one file-system block.
pub const BLOCK_BYTES: usize = 4096;

/// Longest run of blocks that share one kind of content.
pub const RUN_BLOCKS_MAX: usize = 16;

/// What one 4 KiB block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Log- and config-like text.
    Text,
    /// Records of integers, pointers and padding.
    Binary,
    /// Incompressible bytes.
    Random,
    /// All zero.
    Zero,
}

/// Relative weights of the block kinds (they need not add up to anything in particular).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentMix {
    /// Weight of [`BlockKind::Text`].
    pub text: u32,
    /// Weight of [`BlockKind::Binary`].
    pub binary: u32,
    /// Weight of [`BlockKind::Random`].
    pub random: u32,
    /// Weight of [`BlockKind::Zero`].
    pub zero: u32,
}

impl Default for ContentMix {
    /// 35 % text, 30 % structured binary, 15 % random, 20 % zero: a used file-system or database
    /// volume. zstd level 1 compresses the non-zero part of it about 2.5 : 1.
    fn default() -> Self {
        ContentMix {
            text: 35,
            binary: 30,
            random: 15,
            zero: 20,
        }
    }
}

impl ContentMix {
    fn pick(&self, rng: &mut ChaCha8Rng) -> BlockKind {
        let total = self.text + self.binary + self.random + self.zero;
        if total == 0 {
            return BlockKind::Zero;
        }
        let mut x = rng.random_range(0..total);
        for (w, kind) in [
            (self.text, BlockKind::Text),
            (self.binary, BlockKind::Binary),
            (self.random, BlockKind::Random),
        ] {
            if x < w {
                return kind;
            }
            x -= w;
        }
        BlockKind::Zero
    }
}

const WORDS: &[&str] = &[
    "the",
    "replica",
    "sector",
    "cycle",
    "block",
    "disk",
    "page",
    "commit",
    "checkpoint",
    "innodb",
    "buffer",
    "pool",
    "flush",
    "write",
    "read",
    "index",
    "table",
    "row",
    "user",
    "order",
    "status=ok",
    "status=error",
    "WARN",
    "INFO",
    "DEBUG",
    "GET",
    "POST",
    "/api/v1/orders",
    "/api/v1/users",
    "200",
    "404",
    "503",
    "json",
    "config",
    "server",
    "client",
    "timeout",
    "retry",
    "latency_ms",
    "connection",
];

/// A seeded generator of realistic disk content.
#[derive(Debug, Clone)]
pub struct DataGen {
    rng: ChaCha8Rng,
    mix: ContentMix,
    kind: BlockKind,
    run_left: usize,
    /// Record counter of the structured-binary blocks, so ids increase as in a real table.
    record_id: u64,
}

impl DataGen {
    /// A generator with the default [`ContentMix`].
    pub fn new(seed: u64) -> Self {
        Self::with_mix(seed, ContentMix::default())
    }

    /// A generator with the given mix.
    pub fn with_mix(seed: u64, mix: ContentMix) -> Self {
        DataGen {
            rng: ChaCha8Rng::seed_from_u64(seed),
            mix,
            kind: BlockKind::Zero,
            run_left: 0,
            record_id: 1,
        }
    }

    /// The generator's random source, for picking offsets from the same seed.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// The kind of the next block: runs of 1 to [`RUN_BLOCKS_MAX`] blocks share a kind.
    fn next_kind(&mut self) -> BlockKind {
        if self.run_left == 0 {
            self.kind = self.mix.pick(&mut self.rng);
            self.run_left = self.rng.random_range(1..=RUN_BLOCKS_MAX);
        }
        self.run_left -= 1;
        self.kind
    }

    /// Fills `buf` block by block (a partial last block is filled like a whole one, cut short).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for block in buf.chunks_mut(BLOCK_BYTES) {
            let kind = self.next_kind();
            self.fill_block(kind, block);
        }
    }

    /// `len` bytes of fresh content.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf);
        buf
    }

    /// Fills `buf` with content of `kind`.
    pub fn fill_block(&mut self, kind: BlockKind, buf: &mut [u8]) {
        match kind {
            BlockKind::Text => fill_text(&mut self.rng, buf),
            BlockKind::Binary => fill_binary(&mut self.rng, &mut self.record_id, buf),
            BlockKind::Random => self.rng.fill_bytes(buf),
            BlockKind::Zero => buf.fill(0),
        }
    }
}

fn fill_text(rng: &mut ChaCha8Rng, buf: &mut [u8]) {
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let mut pos = 0;
    while pos < buf.len() {
        // A log line: timestamp, level or verb, a few words, a number.
        line.clear();
        line.extend_from_slice(
            format!(
                "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z ",
                rng.random_range(1..=30),
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..60),
                rng.random_range(0..1000),
            )
            .as_bytes(),
        );
        for _ in 0..rng.random_range(3..12) {
            line.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            line.push(b' ');
        }
        line.extend_from_slice(rng.random_range(0..100_000u32).to_string().as_bytes());
        line.push(b'\n');
        let n = line.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&line[..n]);
        pos += n;
    }
}

fn fill_binary(rng: &mut ChaCha8Rng, record_id: &mut u64, buf: &mut [u8]) {
    // 64-byte records: id, timestamp, two small integers, a flag word, two pointers into one
    // heap (shared high bits), and zero padding.
    let heap: u64 = 0x0000_7f3a_0000_0000 | (rng.random::<u64>() & 0xffff_f000);
    let base_ts: u64 = 1_795_000_000_000 + rng.random_range(0..1_000_000);
    let mut rec = [0u8; 64];
    for (i, out) in buf.chunks_mut(64).enumerate() {
        rec.fill(0);
        rec[0..8].copy_from_slice(&record_id.to_le_bytes());
        *record_id += 1;
        let ts = base_ts + i as u64 * rng.random_range(1..50);
        rec[8..16].copy_from_slice(&ts.to_le_bytes());
        rec[16..20].copy_from_slice(&rng.random_range(0..1000u32).to_le_bytes());
        rec[20..24].copy_from_slice(&rng.random_range(0..16u32).to_le_bytes());
        rec[24..28].copy_from_slice(&(1u32 << rng.random_range(0..4)).to_le_bytes());
        let p1 = heap + (rng.random_range(0..1u64 << 20) & !7);
        let p2 = heap + (rng.random_range(0..1u64 << 20) & !7);
        rec[32..40].copy_from_slice(&p1.to_le_bytes());
        rec[40..48].copy_from_slice(&p2.to_le_bytes());
        let n = out.len();
        out.copy_from_slice(&rec[..n]);
    }
}

/// Fills the whole device with realistic content from `seed`, 1 MiB at a time.
pub fn fill_device(dev: &dyn BlockDevice, seed: u64) -> Result<(), DeviceError> {
    let mut dgen = DataGen::new(seed);
    let size = dev.size_bytes();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < size {
        let n = buf
            .len()
            .min(usize::try_from(size - offset).unwrap_or(usize::MAX));
        let chunk = &mut buf[..n];
        dgen.fill(chunk);
        dev.write_at(chunk, offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// `count` distinct offsets of `write_bytes`-long writes aligned to `write_bytes` within a disk of
/// `disk_bytes`, in random order (as an application issues them). Writes never overlap.
///
/// # Panics
/// If the disk has fewer than `count` slots of `write_bytes`.
pub fn scattered_offsets(
    rng: &mut ChaCha8Rng,
    disk_bytes: u64,
    count: usize,
    write_bytes: u64,
) -> Vec<u64> {
    let slots = disk_bytes / write_bytes;
    assert!(
        slots >= count as u64,
        "a {disk_bytes}-byte disk has only {slots} slots of {write_bytes} bytes, {count} wanted"
    );
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let slot = rng.random_range(0..slots);
        if seen.insert(slot) {
            out.push(slot * write_bytes);
        }
    }
    out
}

/// `count` offsets of `block_bytes`-long writes aligned to `block_bytes`, drawn uniformly at random
/// over a disk of `disk_bytes` with repeats (as random writes come: some hit a block twice).
pub fn random_block_offsets(
    rng: &mut ChaCha8Rng,
    disk_bytes: u64,
    count: usize,
    block_bytes: u64,
) -> Vec<u64> {
    let blocks = disk_bytes / block_bytes;
    (0..count)
        .map(|_| rng.random_range(0..blocks) * block_bytes)
        .collect()
}

/// `len` bytes of one kind of content only, from `seed`.
pub fn kind_bytes(kind: BlockKind, len: usize, seed: u64) -> Vec<u8> {
    let mut mix = ContentMix {
        text: 0,
        binary: 0,
        random: 0,
        zero: 0,
    };
    match kind {
        BlockKind::Text => mix.text = 1,
        BlockKind::Binary => mix.binary = 1,
        BlockKind::Random => mix.random = 1,
        BlockKind::Zero => mix.zero = 1,
    }
    DataGen::with_mix(seed, mix).bytes(len)
}

/// Lays disk data out as a blob, exactly as a cycle does (through
/// `replicator_core::source::split_zero_runs`). `segments` are `(offset_bytes, bytes)` pairs,
/// sorted by offset, non-overlapping, sector-aligned. Returns the extents and the data extents'
/// bytes concatenated (what `Session::encode_blob` takes).
pub fn blob_layout(segments: &[(u64, &[u8])]) -> (Vec<BlobExtent>, Vec<u8>) {
    let extents: Vec<Extent> = segments
        .iter()
        .map(|&(offset, bytes)| Extent::new(offset / SECTOR_SIZE, bytes.len() as u64 / SECTOR_SIZE))
        .collect();
    let buf: Vec<u8> = segments
        .iter()
        .flat_map(|&(_, bytes)| bytes.iter().copied())
        .collect();
    let (blob_extents, data, _zero_bytes) = split_zero_runs(&extents, &buf);
    (blob_extents, data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use replicator_core::format::ExtentKind;

    #[test]
    fn content_is_deterministic_and_mixed() {
        let a = DataGen::new(42).bytes(4 << 20);
        let b = DataGen::new(42).bytes(4 << 20);
        assert_eq!(a, b);
        let zero_blocks = a
            .chunks(BLOCK_BYTES)
            .filter(|c| c.iter().all(|&x| x == 0))
            .count();
        let blocks = a.len() / BLOCK_BYTES;
        // The default mix is 20 % zero blocks; runs make it lumpy, so allow a wide band.
        assert!(
            zero_blocks > blocks / 20 && zero_blocks < blocks / 2,
            "{zero_blocks}"
        );
    }

    #[test]
    fn layout_splits_zero_blocks_and_merges_neighbours() {
        let mut buf = vec![0u8; 4 * BLOCK_BYTES];
        buf[BLOCK_BYTES] = 1;
        buf[2 * BLOCK_BYTES] = 1;
        let (extents, data) = blob_layout(&[(8192, &buf)]);
        assert_eq!(extents.len(), 3);
        assert_eq!(extents[0].kind, ExtentKind::Zero);
        assert_eq!(extents[1].kind, ExtentKind::Data);
        assert_eq!(extents[1].start_sector, 16 + 8);
        assert_eq!(extents[1].sector_count, 16);
        assert_eq!(data.len(), 2 * BLOCK_BYTES);
    }

    #[test]
    fn random_offsets_are_aligned_and_inside_the_disk() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let offs = random_block_offsets(&mut rng, 1 << 30, 10_000, 4096);
        assert_eq!(offs.len(), 10_000);
        assert!(offs.iter().all(|o| o % 4096 == 0 && *o < 1 << 30));
        let set: std::collections::HashSet<_> = offs.iter().collect();
        // About n²/2N = 190 repeats are expected among 262,144 blocks.
        assert!(set.len() > 9_700 && set.len() < 10_000, "{}", set.len());
    }

    #[test]
    fn kind_bytes_hold_one_kind() {
        assert!(
            kind_bytes(BlockKind::Zero, 1 << 16, 1)
                .iter()
                .all(|&b| b == 0)
        );
        let text = kind_bytes(BlockKind::Text, 1 << 16, 1);
        assert!(text.iter().all(|b| b.is_ascii()), "text is ASCII");
        assert_eq!(text, kind_bytes(BlockKind::Text, 1 << 16, 1));
        let random = kind_bytes(BlockKind::Random, 1 << 16, 1);
        assert!(random.iter().filter(|&&b| b == 0).count() < 1 << 10);
    }

    #[test]
    fn offsets_are_distinct_and_aligned() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let offs = scattered_offsets(&mut rng, 1 << 30, 1000, 16384);
        let set: std::collections::HashSet<_> = offs.iter().collect();
        assert_eq!(set.len(), 1000);
        assert!(offs.iter().all(|o| o % 16384 == 0 && *o < 1 << 30));
    }
}
