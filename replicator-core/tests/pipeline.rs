//! The parallel pipeline: blobs are the same, in the same seq order, for any number of threads;
//! the single-pass initial copy writes only verified bytes, refuses blobs that overlap, and heals; zero extents the target
//! already holds are not written yet reconcile; `FileDevice` reads (direct or cached, aligned or
//! not) return the file's bytes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{DISK_BYTES, World};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replicator_core::bitmap::{SECTOR_SIZE, SectorBitmap};
use replicator_core::device::{AlignedBuf, BlockDevice, DeviceError, FileDevice, MemDevice};
use replicator_core::format::{self, Expect};
use replicator_core::layout;
use replicator_core::progress::NoProgress;
use replicator_core::source::{Compression, ShipConfig};
use replicator_core::target::{HydrateConfig, Target, hydrate};
use replicator_sink::{PutMode, Sink};

/// (seq, object length, extents, data) of every blob of `cycle`, decoded.
async fn decoded_blobs(
    w: &World,
    cycle: u64,
) -> anyhow::Result<Vec<(u32, usize, Vec<format::BlobExtent>, Vec<u8>)>> {
    Ok(decoded(w, cycle)
        .await?
        .into_iter()
        .map(|(len, b)| (b.header.seq, len, b.extents, b.data.to_vec()))
        .collect())
}

/// (object length, decoded blob) of every blob of `cycle`, in seq order.
async fn decoded(w: &World, cycle: u64) -> anyhow::Result<Vec<(usize, format::DecodedBlob)>> {
    let disk_key = w.key.disk_key(&w.source.disk_id());
    let mut out = Vec::new();
    for key in w.blob_keys(cycle).await? {
        let bytes = w.sink.get(&key).await?;
        let header = format::peek_header(&bytes)?;
        let expect = Expect {
            disk_id: w.source.disk_id(),
            cycle,
            attempt: None,
            seq: Some(header.seq),
            tag: None,
        };
        let blob = format::decode_blob(&disk_key, &bytes, &expect)?;
        out.push((bytes.len(), blob));
    }
    out.sort_by_key(|b| b.1.header.seq);
    Ok(out)
}

/// Blobs whose data zstd level 1 would shrink, stored uncompressed.
fn raw_but_compressible(blobs: &[(usize, format::DecodedBlob)]) -> anyhow::Result<usize> {
    let mut n = 0;
    for (_, b) in blobs {
        if !b.compressed
            && !b.data.is_empty()
            && zstd::bulk::compress(&b.data, 1)?.len() < b.data.len()
        {
            n += 1;
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_compression_stores_blobs_raw_only_when_the_encoders_fall_behind()
-> anyhow::Result<()> {
    for compression in [Compression::Adaptive, Compression::Zstd] {
        let mut w = World::new(43)?;
        // One encoder at zstd 19 is far slower than two readers copying from memory.
        w.ship_cfg = ShipConfig {
            blob_span_bytes_max: 64 << 10,
            zstd_level: 19,
            encode_threads: 1,
            read_threads: 2,
            compression,
            ..w.ship_cfg
        };
        let report = w.ship().await?;
        let blobs = decoded(&w, report.cycle).await?;
        let raw = raw_but_compressible(&blobs)?;
        match compression {
            Compression::Adaptive => {
                assert!(
                    report.blobs_kept_up > 0,
                    "the encoder was behind, yet every blob was compressed"
                );
                assert!(raw > 0, "no compressible blob was stored raw");
                // The report counts every blob not compressed for speed, random data included.
                assert!(
                    raw <= report.blobs_kept_up as usize,
                    "{raw} raw, {report:?}"
                );
                assert!(
                    blobs.iter().any(|(_, b)| b.compressed),
                    "a blob taken while the readers were not yet ahead is compressed"
                );
            }
            Compression::Zstd => {
                assert_eq!(report.blobs_kept_up, 0);
                assert_eq!(raw, 0, "Compression::Zstd stored a compressible blob raw");
            }
        }
        let hydrated = w.hydrate().await?;
        assert!(hydrated.failed.is_none(), "{:?}", hydrated.failed);
        assert!(w.identical(), "{compression:?}: target differs");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_thread_count_gives_the_same_blobs_in_seq_order() -> anyhow::Result<()> {
    let mut reference = None;
    for (threads, readers) in [(1usize, 1usize), (2, 2), (5, 3)] {
        let mut w = World::new(41)?;
        w.ship_cfg = ShipConfig {
            blob_span_bytes_max: 64 << 10,
            encode_threads: threads,
            read_threads: readers,
            read_depth: 3,
            // One put at a time: the order puts start is the order blobs reach the putter.
            puts_in_flight_max: 1,
            // Adaptive compression depends on timing, so object lengths would too.
            compression: Compression::Zstd,
            ..w.ship_cfg
        };
        let initial = w.ship().await?;
        w.hydrate().await?;
        w.churn(80)?;
        let delta = w.ship().await?;
        let mut blobs = Vec::new();
        for cycle in [initial.cycle, delta.cycle] {
            let got = decoded_blobs(&w, cycle).await?;
            let seqs: Vec<u32> = got.iter().map(|b| b.0).collect();
            let want: Vec<u32> = (0..got.len() as u32).collect();
            assert_eq!(seqs, want, "{threads} threads: seqs are 0..n without gaps");
            blobs.push(got);
        }
        let hydrated = w.hydrate().await?;
        assert!(hydrated.failed.is_none(), "{:?}", hydrated.failed);
        assert!(w.identical(), "{threads} threads: target differs");
        match &reference {
            None => reference = Some(blobs),
            Some(r) => assert!(
                *r == blobs,
                "{threads} threads gave other blobs than 1 thread"
            ),
        }
    }
    Ok(())
}

/// A sink that records the order puts start in.
#[derive(Debug)]
struct PutOrder {
    inner: Arc<dyn Sink>,
    keys: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Sink for PutOrder {
    async fn put(
        &self,
        key: &str,
        bytes: bytes::Bytes,
        mode: replicator_sink::PutMode,
    ) -> Result<(), replicator_sink::SinkError> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(key.to_owned());
        self.inner.put(key, bytes, mode).await
    }
    async fn get(&self, key: &str) -> Result<bytes::Bytes, replicator_sink::SinkError> {
        self.inner.get(key).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<replicator_sink::ObjectMeta>, replicator_sink::SinkError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), replicator_sink::SinkError> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        "put-order".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_put_in_seq_order_whatever_the_threads() -> anyhow::Result<()> {
    let w = World::new(42)?;
    let mut source = w.source;
    let sink = PutOrder {
        inner: Arc::clone(&w.sink) as Arc<dyn Sink>,
        keys: std::sync::Mutex::new(Vec::new()),
    };
    let cfg = ShipConfig {
        blob_span_bytes_max: 32 << 10,
        encode_threads: 4,
        puts_in_flight_max: 1,
        ..ShipConfig::default()
    };
    let shipped = replicator_core::source::ship_cycle(
        &mut source,
        &sink,
        &w.key,
        &w.clock,
        &cfg,
        &NoProgress,
    )
    .await?
    .into_shipped()?;
    let keys = sink
        .keys
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let blobs: Vec<&String> = keys.iter().filter(|k| k.contains("/blobs/")).collect();
    assert_eq!(blobs.len() as u32, shipped.blob_count);
    assert!(blobs.len() > 100, "{}", blobs.len());
    let disk = source.disk_id();
    for (seq, key) in blobs.iter().enumerate() {
        let want = layout::blob_key(&disk, shipped.cycle, source.state().attempts, seq as u32);
        assert_eq!(**key, want, "put {seq} out of order");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_of_one_cycle_that_overlap_are_refused_before_the_overlap_is_written()
-> anyhow::Result<()> {
    // The initial copy writes blobs side by side, so the order of two blobs' writes is not the
    // manifest's: blobs that claim the same sectors (only someone holding the key could make
    // them) must be refused, never raced. Forge such a cycle 1 under the real key and attempt.
    let mut w = World::new(44)?;
    w.ship().await?;
    let disk = w.source.disk_id();
    let disk_key = w.key.disk_key(&disk);
    let manifest_key = layout::manifest_key(&disk, 1);
    let attempt = format::peek_header(&w.sink.get(&manifest_key).await?)?.attempt;
    let session = format::Session::new(
        &disk_key,
        disk,
        1,
        attempt,
        format::Session::generate_salt()?,
    );
    let data = |start: u64, count: u64| format::BlobExtent {
        start_sector: start,
        sector_count: count,
        kind: format::ExtentKind::Data,
    };
    // Blob 0: sectors 0..64 of 0xAA; blob 1: sectors 32..96 of 0xBB. Sectors 32..64 are in both.
    let blobs = [
        session.encode_blob(0, &[data(0, 64)], &[0xAA; 64 * 512], 1)?,
        session.encode_blob(1, &[data(32, 64)], &[0xBB; 64 * 512], 1)?,
    ];
    let mut bitmap = SectorBitmap::new(DISK_BYTES / SECTOR_SIZE);
    bitmap.mark_sectors(0, 96)?;
    let manifest = format::Manifest {
        base_cycle: 0,
        disk_bytes: DISK_BYTES,
        blobs: blobs
            .iter()
            .enumerate()
            .map(|(seq, b)| format::ManifestBlob {
                seq: seq as u32,
                object_len: b.bytes.len() as u64,
                tag: b.tag,
                data_bytes: 64 * 512,
            })
            .collect(),
        bitmap: bitmap.encode(),
        created_unix_ms: 1_700_000_000_000,
    };
    for (seq, b) in blobs.iter().enumerate() {
        let key = layout::blob_key(&disk, 1, attempt, seq as u32);
        w.sink
            .put(&key, b.bytes.clone(), PutMode::Overwrite)
            .await?;
    }
    let encoded = session.encode_manifest(&manifest)?;
    w.sink
        .put(&manifest_key, encoded.bytes, PutMode::Overwrite)
        .await?;

    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("overlapping blobs were applied"))?;
    assert_eq!(failed.cycle, 1);
    let msg = failed.error.to_string();
    assert!(
        msg.contains("overlap"),
        "the error says the blobs overlap: {msg}"
    );
    assert_eq!(r.committed_cycle, 0, "nothing committed");
    // One blob claimed the sectors and was written whole; the other wrote nothing.
    let tgt = w.tgt_disk.snapshot();
    let shared = &tgt[32 * 512..64 * 512];
    assert!(
        shared.iter().all(|&b| b == 0xAA) || shared.iter().all(|&b| b == 0xBB),
        "the shared sectors were written by both blobs"
    );
    let first_only = &tgt[..32 * 512];
    let second_only = &tgt[64 * 512..96 * 512];
    assert!(
        first_only.iter().all(|&b| b == 0) || second_only.iter().all(|&b| b == 0),
        "both overlapping blobs were written"
    );
    Ok(())
}

#[tokio::test]
async fn a_corrupt_blob_stops_the_single_pass_initial_copy_which_stays_not_consistent_then_heals()
-> anyhow::Result<()> {
    let mut w = World::new(43)?;
    let shipped = w.ship().await?;
    assert_eq!(shipped.cycle, 1);
    let blobs = w.blob_keys(shipped.cycle).await?;
    assert!(blobs.len() >= 4, "want several blobs, got {}", blobs.len());
    let victim = blobs[blobs.len() / 2].clone();
    let path = w.cache_path().join(&victim);
    let mut bytes = std::fs::read(&path)?;
    let at = bytes.len() - 40;
    bytes[at] ^= 0x20;
    std::fs::write(&path, &bytes)?;

    let r = w.hydrate().await?;
    let failed = r
        .failed
        .ok_or_else(|| anyhow::anyhow!("a corrupt blob was accepted"))?;
    assert_eq!(failed.cycle, 1);
    let msg = failed.error.to_string();
    assert!(msg.contains(&victim), "the error names the blob: {msg}");
    let target = w
        .target
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no target"))?;
    assert_eq!(target.state().committed_cycle, 0, "nothing committed");
    assert_eq!(
        target.state().applying_cycle,
        Some(1),
        "the target says it is not consistent"
    );
    // Written sectors hold verified bytes (the source's), the rest what was there (zeros).
    let (src, tgt) = (w.src_disk.snapshot(), w.tgt_disk.snapshot());
    let foreign = tgt
        .chunks(512)
        .zip(src.chunks(512))
        .filter(|(t, s)| t != s && t.iter().any(|&b| b != 0))
        .count();
    assert_eq!(foreign, 0, "sectors hold bytes that were never verified");
    assert!(
        tgt.iter().any(|&b| b != 0),
        "the verified blobs were written in the single pass"
    );

    let healed = w.ship().await?;
    assert_eq!(healed.carried_from_failed, vec![1]);
    assert_eq!(healed.base_cycle, 0);
    let r = w.hydrate().await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert_eq!(r.committed_cycle, healed.cycle);
    assert_eq!(
        w.target.as_ref().and_then(|t| t.state().applying_cycle),
        None
    );
    assert!(w.identical());
    Ok(())
}

/// A device that counts the bytes written to it within `watch` (a byte range).
#[derive(Debug)]
struct CountingWrites {
    inner: Arc<MemDevice>,
    watch: std::ops::Range<u64>,
    written: Arc<AtomicU64>,
}

impl BlockDevice for CountingWrites {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let lo = offset.max(self.watch.start);
        let hi = (offset + buf.len() as u64).min(self.watch.end);
        self.written
            .fetch_add(hi.saturating_sub(lo), Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
}

#[tokio::test]
async fn zero_extents_the_target_already_holds_are_not_written_but_reconcile() -> anyhow::Result<()>
{
    let mut w = World::new(44)?;
    // Big blobs, so whole zero regions (256 KiB each in the world's image, several in a row
    // here) make zero extents of at least the probe size.
    w.ship_cfg.blob_span_bytes_max = 4 << 20;
    let zero_run = 2u64 << 20;
    let run_at = 4u64 << 20;
    w.src_disk.write_at(&vec![0u8; zero_run as usize], run_at)?;
    let shipped = w.ship().await?;
    assert!(shipped.zero_bytes >= zero_run, "{}", shipped.zero_bytes);

    // A fresh (all-zero) target: zero extents are probed and skipped.
    let written = Arc::new(AtomicU64::new(0));
    let fresh = Arc::new(MemDevice::new("fresh", DISK_BYTES));
    let mut target = Target::open(
        &w.dir.path().join("fresh-state"),
        CountingWrites {
            inner: Arc::clone(&fresh),
            watch: run_at..run_at + zero_run,
            written: Arc::clone(&written),
        },
        w.source.disk_id(),
    )?;
    let r = hydrate(
        &mut target,
        w.sink.as_ref(),
        &w.key,
        &w.clock,
        &HydrateConfig::default(),
        &NoProgress,
    )
    .await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert_eq!(r.applied.len(), 1, "reconciled and committed");
    assert_eq!(fresh.snapshot(), w.src_disk.snapshot());
    assert_eq!(
        written.load(Ordering::SeqCst),
        0,
        "the zero run the fresh target already held was written"
    );

    // A target with garbage where the source is zero: those sectors are written with zeros.
    let dirty = Arc::new(MemDevice::new("dirty", DISK_BYTES));
    let mut junk = vec![0u8; DISK_BYTES as usize];
    ChaCha8Rng::seed_from_u64(5).fill_bytes(&mut junk);
    dirty.write_at(&junk, 0)?;
    let mut target = Target::open(
        &w.dir.path().join("dirty-state"),
        Arc::clone(&dirty),
        w.source.disk_id(),
    )?;
    let r = hydrate(
        &mut target,
        w.sink.as_ref(),
        &w.key,
        &w.clock,
        &HydrateConfig::default(),
        &NoProgress,
    )
    .await?;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert_eq!(dirty.snapshot(), w.src_disk.snapshot());
    Ok(())
}

#[test]
fn file_device_reads_are_the_files_bytes_direct_or_not() -> anyhow::Result<()> {
    // On the build's disk (not /tmp, which may be tmpfs and refuse O_DIRECT).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let path = dir.path().join("img");
    let size = 3u64 << 20;
    let mut content = vec![0u8; size as usize];
    ChaCha8Rng::seed_from_u64(9).fill_bytes(&mut content);
    std::fs::write(&path, &content)?;
    let dev = FileDevice::open(&path)?;
    assert!(
        dev.reads_direct(),
        "the build directory's file system refused O_DIRECT"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let mut aligned = AlignedBuf::zeroed(1 << 20);
    for _ in 0..200 {
        let sectors = 1 + rng.next_u64() % 2048;
        let len = sectors * SECTOR_SIZE;
        let offset = (rng.next_u64() % ((size - len) / SECTOR_SIZE + 1)) * SECTOR_SIZE;
        let skew = (rng.next_u64() % 9) as usize * 512;
        aligned.resize(len as usize + skew);
        let buf = &mut aligned.as_mut_slice()[skew..];
        dev.read_at(buf, offset)?;
        assert!(
            buf == &content[offset as usize..(offset + len) as usize],
            "{len} bytes at {offset} into a buffer {skew} bytes past alignment"
        );
        let mut plain = vec![0u8; len as usize];
        dev.read_at(&mut plain, offset)?;
        assert!(plain == content[offset as usize..(offset + len) as usize]);
    }
    // Written through the page cache, then read direct: the read sees the write.
    let fresh = vec![0xA5u8; 64 << 10];
    dev.write_at(&fresh, 1 << 20)?;
    aligned.resize(64 << 10);
    dev.read_at(aligned.as_mut_slice(), 1 << 20)?;
    assert!(aligned.as_slice() == &fresh[..]);
    Ok(())
}

#[test]
fn file_device_writes_large_and_small_aligned_or_not_land_exactly() -> anyhow::Result<()> {
    // Large writes go direct (through a bounce buffer when unaligned), small ones cached; mixed
    // at random over one file, every byte must end as a model says, read cached and direct.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let path = dir.path().join("img");
    let size = 24u64 << 20;
    let dev = FileDevice::create_sparse(&path, size)?;
    let mut model = vec![0u8; size as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut aligned = AlignedBuf::zeroed(10 << 20);
    for i in 0..300 {
        // Up to 10 MiB, so a write crosses the 4 MiB bounce chunks; as small as one sector.
        let sectors = if i % 3 == 0 {
            1 + rng.next_u64() % 64
        } else {
            1 + rng.next_u64() % (20 << 10)
        };
        let len = sectors * SECTOR_SIZE;
        let offset = (rng.next_u64() % ((size - len) / SECTOR_SIZE + 1)) * SECTOR_SIZE;
        let skew = (rng.next_u64() % 9) as usize * 512;
        aligned.resize(len as usize + skew);
        let buf = &mut aligned.as_mut_slice()[skew..];
        rng.fill_bytes(buf);
        dev.write_at(buf, offset)?;
        model[offset as usize..(offset + len) as usize].copy_from_slice(buf);
        if i % 50 == 0 {
            let mut back = vec![0u8; size as usize];
            dev.read_at(&mut back, 0)?;
            assert!(back == model, "after write {i} ({len} bytes at {offset})");
        }
    }
    dev.flush()?;
    drop(dev);
    assert!(std::fs::read(&path)? == model, "the file after reopening");
    Ok(())
}
