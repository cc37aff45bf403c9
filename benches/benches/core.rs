//! Micro-benchmarks of the engine's CPU-bound building blocks: the sector bitmap (`bitmap/*`,
//! `bitmap_random_4KiB/*`) and the blob format (`blob/*`, `codec/*`).
//!
//! * `bitmap_random_4KiB/{mark,extents}/{256GiB,64TiB}`: 10 million 4 KiB writes at random
//!   (with repeats; 1 million under `--test`) marked into a fresh bitmap, then its extents
//!   iterated; the throughput is writes (or extents) per second, and the bitmap's memory is
//!   printed once per disk (about 4.6 GiB for the 64 TiB disk: nearly every write lands in a
//!   2 MiB chunk of its own).
//! * `codec/{encode,decode}/{content}/{size}`: one blob of 64 KiB, 1 MiB or 4 MiB of text,
//!   binary records, random, zero or a realistic mix, encoded (CRC-32, zstd 1, AES-256-GCM) and
//!   decoded; the throughput counts the disk bytes the blob covers.
//!
//! `cargo run --release -p replicator-benches --bin figures` prints the same figures as tables.
//!
//! Run with `cargo bench -p replicator-benches --bench core`; `-- --test` runs each once.

// Benchmarks are test code: a failed setup should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The bitmap's memory is reported beside criterion's figures.
#![allow(clippy::print_stderr)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use replicator_benches::pipeline::timed;
use replicator_benches::{
    BLOCK_BYTES, BlockKind, DataGen, blob_layout, kind_bytes, random_block_offsets,
    scattered_offsets,
};
use replicator_core::bitmap::{SECTOR_SIZE, SectorBitmap};
use replicator_core::format::{self, Expect, Session};
use replicator_core::keys::{DiskId, MasterKey};

const TIB: u64 = 1 << 40;
const MIB: usize = 1 << 20;
/// Writes marked per bitmap.
const WRITES: usize = 10_000;
/// Bytes per write.
const WRITE_BYTES: u64 = 16 << 10;
/// The blob span: `ShipConfig::default().blob_span_bytes_max`.
const BLOB_BYTES: usize = 4 * MIB;
/// zstd level: `ShipConfig::default().zstd_level`.
const ZSTD_LEVEL: i32 = 1;

/// 10k scattered 16 KiB writes on a 1 TiB disk, 4 KiB-aligned (file-system blocks), so a write
/// often straddles a 2 MiB chunk of the bitmap or shares one with another write.
fn scattered_writes(seed: u64) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    scattered_offsets(&mut rng, TIB - WRITE_BYTES, WRITES, 4096)
}

fn marked(offsets: &[u64]) -> SectorBitmap {
    let mut bm = SectorBitmap::new(TIB / SECTOR_SIZE);
    for &off in offsets {
        bm.mark_bytes(off, WRITE_BYTES).unwrap();
    }
    bm
}

fn bench_bitmap(c: &mut Criterion) {
    let writes_a = scattered_writes(1);
    let writes_b = scattered_writes(2);
    let a = marked(&writes_a);
    let b = marked(&writes_b);
    let extent_count = a.extents().count() as u64;
    let encoded = a.encode();

    let mut g = c.benchmark_group("bitmap");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    // First, while the group has no throughput set: a per-element rate means nothing here.
    g.bench_function("full_64TiB", |bch| {
        bch.iter(|| SectorBitmap::full(black_box(64 * TIB / SECTOR_SIZE)));
    });

    g.throughput(Throughput::Elements(WRITES as u64));
    g.bench_function("mark_10k_scattered_16KiB_on_1TiB", |bch| {
        bch.iter(|| marked(black_box(&writes_a)));
    });

    g.throughput(Throughput::Elements(extent_count));
    g.bench_function("extents_iter", |bch| {
        bch.iter(|| black_box(&a).extents().map(|e| e.sector_count).sum::<u64>());
    });

    // Union and difference work on a clone of `a` made outside the timed part. Throughput counts
    // the writes recorded in both operands (20k).
    g.throughput(Throughput::Elements(2 * WRITES as u64));
    g.bench_function("union_with", |bch| {
        bch.iter_batched_ref(
            || a.clone(),
            |x| x.union_with(black_box(&b)).unwrap(),
            BatchSize::SmallInput,
        );
    });
    g.bench_function("difference_with", |bch| {
        bch.iter_batched_ref(
            || a.clone(),
            |x| x.difference_with(black_box(&b)).unwrap(),
            BatchSize::SmallInput,
        );
    });

    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode", |bch| bch.iter(|| black_box(&a).encode()));
    g.bench_function("decode", |bch| {
        bch.iter(|| SectorBitmap::decode(black_box(&encoded)).unwrap());
    });
    g.finish();
}

/// Random 4 KiB writes marked per bitmap in `bitmap_random_4KiB/*`.
const RANDOM_WRITES: usize = 10_000_000;
/// The same under `-- --test` (CI runs each benchmark once): the 64 TiB case at 10 million writes
/// takes about a minute and 5 GiB there.
const RANDOM_WRITES_TEST: usize = 1_000_000;
const GIB: u64 = 1 << 30;

fn mark_random(disk_bytes: u64, offsets: &[u64]) -> SectorBitmap {
    let mut bm = SectorBitmap::new(disk_bytes / SECTOR_SIZE);
    for &off in offsets {
        bm.mark_bytes(black_box(off), 4096).unwrap();
    }
    bm
}

fn bench_bitmap_random(c: &mut Criterion) {
    let writes = if std::env::args().any(|a| a == "--test") {
        RANDOM_WRITES_TEST
    } else {
        RANDOM_WRITES
    };
    let mut g = c.benchmark_group("bitmap_random_4KiB");
    // One iteration marks 10 million writes (seconds on a 64 TiB disk): few, flat samples.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    for (i, (label, disk_bytes)) in [("256GiB", 256 * GIB), ("64TiB", 64 * TIB)]
        .into_iter()
        .enumerate()
    {
        let mut rng = ChaCha8Rng::seed_from_u64(0xb17 + i as u64);
        let offsets = random_block_offsets(&mut rng, disk_bytes, writes, 4096);
        g.throughput(Throughput::Elements(writes as u64));
        g.bench_function(format!("mark/{label}"), |bch| {
            bch.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        // The bitmap is dropped after the timer stops: freeing is not marking.
                        let (bm, took) = timed(|| mark_random(disk_bytes, &offsets));
                        drop(bm);
                        took
                    })
                    .sum()
            });
        });
        let bm = mark_random(disk_bytes, &offsets);
        let extents = bm.extents().count() as u64;
        eprintln!(
            "bitmap_random_4KiB/{label}: {writes} writes, {} MiB marked in {extents} extents; \
             memory {:.1} MiB (SectorBitmap::memory_bytes)",
            (bm.count() * SECTOR_SIZE) >> 20,
            bm.memory_bytes() as f64 / (1u64 << 20) as f64
        );
        g.throughput(Throughput::Elements(extents));
        g.bench_function(format!("extents/{label}"), |bch| {
            bch.iter(|| {
                black_box(&bm)
                    .extents()
                    .map(|e| e.sector_count)
                    .sum::<u64>()
            });
        });
    }
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let (key, disk, session) = session();
    let disk_key = key.disk_key(&disk);
    let mut g = c.benchmark_group("codec");
    g.measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    let kinds: [(&str, Option<BlockKind>); 5] = [
        ("text", Some(BlockKind::Text)),
        ("binary", Some(BlockKind::Binary)),
        ("random", Some(BlockKind::Random)),
        ("zero", Some(BlockKind::Zero)),
        ("mix", None),
    ];
    // Each blob has its own sequence number: the session refuses to encrypt other bytes under a
    // nonce it already used.
    let mut seq = 0u32;
    for (name, kind) in kinds {
        for (label, len) in [("64KiB", 64 << 10), ("1MiB", MIB), ("4MiB", 4 * MIB)] {
            seq += 1;
            let bytes = match kind {
                Some(k) => kind_bytes(k, len, len as u64),
                None => DataGen::new(len as u64).bytes(len),
            };
            let (extents, data) = blob_layout(&[(1 << 30, &bytes)]);
            g.throughput(Throughput::Bytes(len as u64));
            g.bench_function(format!("encode/{name}/{label}"), |bch| {
                bch.iter(|| {
                    session
                        .encode_blob(seq, black_box(&extents), black_box(&data), ZSTD_LEVEL)
                        .unwrap()
                });
            });
            let obj = session
                .encode_blob(seq, &extents, &data, ZSTD_LEVEL)
                .unwrap();
            let expect = Expect {
                disk_id: disk,
                cycle: session.cycle(),
                attempt: Some(session.attempt()),
                seq: Some(seq),
                tag: Some(obj.tag),
            };
            let decoded = format::decode_blob(&disk_key, &obj.bytes, &expect).unwrap();
            assert_eq!(decoded.data.as_ref(), data.as_slice());
            g.bench_function(format!("decode/{name}/{label}"), |bch| {
                bch.iter(|| {
                    format::decode_blob(&disk_key, black_box(&obj.bytes), &expect).unwrap()
                });
            });
        }
    }
    g.finish();
}

/// A fixed session, as the source opens one per cycle attempt.
fn session() -> (MasterKey, DiskId, Session) {
    let key = MasterKey::from_bytes([0x5a; 32]);
    let disk = DiskId([0x11; 16]);
    let session = Session::new(&key.disk_key(&disk), disk, 7, 1, [0x33; 16]);
    (key, disk, session)
}

/// One blob's input: its extents and the data extents' bytes.
struct BlobCase {
    name: &'static str,
    extents: Vec<replicator_core::format::BlobExtent>,
    data: Vec<u8>,
}

fn blob_cases() -> Vec<BlobCase> {
    // Contiguous: 4 MiB of realistic content at 1 GiB into the disk.
    let contiguous = DataGen::new(10).bytes(BLOB_BYTES);
    let (extents, data) = blob_layout(&[(1 << 30, &contiguous)]);
    let one = BlobCase {
        name: "contiguous_4MiB",
        extents,
        data,
    };

    // Scattered: 256 writes of 16 KiB, sorted as the bitmap yields them.
    let mut dgen = DataGen::new(11);
    let mut offsets = scattered_offsets(dgen.rng(), TIB, BLOB_BYTES / (16 << 10), 16 << 10);
    offsets.sort_unstable();
    let bufs: Vec<Vec<u8>> = offsets.iter().map(|_| dgen.bytes(16 << 10)).collect();
    let segments: Vec<(u64, &[u8])> = offsets
        .iter()
        .zip(&bufs)
        .map(|(&o, b)| (o, b.as_slice()))
        .collect();
    let (extents, data) = blob_layout(&segments);
    let scattered = BlobCase {
        name: "scattered_256x16KiB",
        extents,
        data,
    };
    vec![one, scattered]
}

fn bench_blob(c: &mut Criterion) {
    let (key, disk, session) = session();
    let disk_key = key.disk_key(&disk);
    let mut g = c.benchmark_group("blob");
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));
    // Throughput counts the disk bytes the blob covers (zero blocks included): that is the rate
    // at which the source gets through changed sectors.
    g.throughput(Throughput::Bytes(BLOB_BYTES as u64));
    for (seq, case) in blob_cases().into_iter().enumerate() {
        let seq = seq as u32;
        let span: u64 = case.extents.iter().map(|e| e.sector_count).sum::<u64>() * SECTOR_SIZE;
        assert_eq!(span, BLOB_BYTES as u64, "{}", case.name);
        assert_eq!(case.data.len() % BLOCK_BYTES, 0);
        g.bench_function(format!("encode_blob/{}", case.name), |bch| {
            bch.iter(|| {
                session
                    .encode_blob(
                        seq,
                        black_box(&case.extents),
                        black_box(&case.data),
                        ZSTD_LEVEL,
                    )
                    .unwrap()
            });
        });
        let obj = session
            .encode_blob(seq, &case.extents, &case.data, ZSTD_LEVEL)
            .unwrap();
        let expect = Expect {
            disk_id: disk,
            cycle: session.cycle(),
            attempt: Some(session.attempt()),
            seq: Some(seq),
            tag: Some(obj.tag),
        };
        let decoded = format::decode_blob(&disk_key, &obj.bytes, &expect).unwrap();
        assert_eq!(decoded.data.as_ref(), case.data.as_slice());
        g.bench_function(format!("decode_blob/{}", case.name), |bch| {
            bch.iter(|| format::decode_blob(&disk_key, black_box(&obj.bytes), &expect).unwrap());
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_bitmap,
    bench_bitmap_random,
    bench_blob,
    bench_codec
);
criterion_main!(benches);
