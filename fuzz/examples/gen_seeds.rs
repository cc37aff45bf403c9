//! Regenerates the committed seed inputs under `fuzz/seeds/<target>/`.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//! ```
//!
//! The golden objects (`blob_v1.bin`, `manifest_v1.bin`, `ack_v1.bin`) are
//! copied from `replicator-core/tests/golden/`; everything else is encoded
//! here with the public encoders under the golden key material, so every
//! object seed decodes in its raw target.

use std::fs;
use std::path::{Path, PathBuf};

use replicator_core::bitmap::SectorBitmap;
use replicator_core::format::{
    Ack, AckStatus, BlobExtent, Catalog, ExtentKind, Manifest, ObjectKind, ResyncRequest, Session,
    decode_ack, decode_blob, decode_manifest,
};
use replicator_core::keys::MasterKey;
use replicator_core::tracker::Generation;
use replicator_core::tracker::hrl::{
    SegmentHeader, encode_data_record, encode_mark_record, encode_segment_header,
    encode_zero_record,
};
use replicator_fuzz::{
    GOLDEN_ATTEMPT, GOLDEN_CYCLE, GOLDEN_SALT, Sealer, golden_disk, golden_disk_key, golden_expect,
    golden_master_bytes, noise,
};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("create seed dir");
    fs::write(d.join(name), bytes).expect("write seed");
    println!("seeds/{target}/{name} ({} bytes)", bytes.len());
}

fn session(salt: [u8; 16]) -> Session {
    Session::new(
        golden_disk_key(),
        golden_disk(),
        GOLDEN_CYCLE,
        GOLDEN_ATTEMPT,
        salt,
    )
}

fn main() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = fuzz.join("seeds");
    let golden = fuzz.join("../replicator-core/tests/golden");
    let read = |name: &str| fs::read(golden.join(name)).expect("read golden file");
    let key = golden_disk_key();
    let sealer = Sealer::golden();

    // --- golden objects, copied verbatim ---------------------------------
    let blob_v1 = read("blob_v1.bin");
    let manifest_v1 = read("manifest_v1.bin");
    let ack_v1 = read("ack_v1.bin");
    decode_blob(key, &blob_v1, &golden_expect()).expect("golden blob decodes");
    decode_manifest(key, &manifest_v1, &golden_expect()).expect("golden manifest decodes");
    decode_ack(key, &ack_v1, &golden_expect()).expect("golden ack decodes");
    write(&seeds, "decode_blob", "blob_v1.bin", &blob_v1);
    write(&seeds, "decode_manifest", "manifest_v1.bin", &manifest_v1);
    write(&seeds, "decode_ack", "ack_v1.bin", &ack_v1);

    // --- more objects under the golden key ---------------------------------
    let s = session(GOLDEN_SALT);
    let raw_data = noise(3 * 512, 11);
    let raw = s
        .encode_blob(
            1,
            &[
                BlobExtent {
                    start_sector: 4096 - 1,
                    sector_count: 2,
                    kind: ExtentKind::Data,
                },
                BlobExtent {
                    start_sector: 5000,
                    sector_count: 1,
                    kind: ExtentKind::Data,
                },
            ],
            &raw_data,
            3,
        )
        .expect("raw blob");
    write(&seeds, "decode_blob", "blob_uncompressed.bin", &raw.bytes);
    let zero = s
        .encode_blob(
            2,
            &[BlobExtent {
                start_sector: 0,
                sector_count: 64,
                kind: ExtentKind::Zero,
            }],
            &[],
            3,
        )
        .expect("zero blob");
    write(&seeds, "decode_blob", "blob_zero_only.bin", &zero.bytes);

    let mut bm = SectorBitmap::new(1 << 21);
    bm.mark_sectors(0, 8).expect("mark");
    bm.mark_sectors(4090, 20).expect("mark");
    let bitmap_bytes = bm.encode();
    let empty_manifest = session([0x11; 16])
        .encode_manifest(&Manifest {
            base_cycle: 0,
            disk_bytes: 1 << 30,
            blobs: vec![],
            bitmap: bitmap_bytes.clone(),
            created_unix_ms: 1,
        })
        .expect("manifest");
    write(
        &seeds,
        "decode_manifest",
        "manifest_no_blobs.bin",
        &empty_manifest.bytes,
    );

    let failed = session([0x11; 16])
        .encode_ack(&Ack {
            status: AckStatus::Failed,
            sectors_written: 0,
            message: "target device is read-only: écrit refusé".into(),
            target_generation: Some([0x22; 16]),
        })
        .expect("ack");
    write(&seeds, "decode_ack", "ack_failed.bin", &failed.bytes);

    let catalog = session(GOLDEN_SALT)
        .encode_catalog(&Catalog {
            target_generation: [0x11; 16],
            committed_cycle: 6,
            answers_request: 2,
            block_bytes: 4096,
            disk_bytes: 5 * 4096 + 1024,
            digests: (0..6u8).map(|i| [i % 2; 16]).collect(),
            created_unix_ms: 1_700_000_000_000,
        })
        .expect("catalog");
    write(&seeds, "decode_catalog", "catalog_small.bin", &catalog.bytes);
    let request = session(GOLDEN_SALT)
        .encode_resync_request(&ResyncRequest {
            block_bytes: 65536,
            reason: "tracking was lost".into(),
            created_unix_ms: 1_700_000_000_000,
        })
        .expect("request");
    write(&seeds, "decode_resync_request", "request.bin", &request.bytes);

    // --- plaintexts for decode_sealed_payload (byte 0: kind % 5, seq / 5) ---
    let with_selector = |sel: u8, plaintext: Vec<u8>| [vec![sel], plaintext].concat();
    let open = |bytes: &[u8]| {
        sealer
            .open(bytes)
            .expect("sealer opens a golden-session object")
    };
    // golden blob is seq 0 and compressed; the raw blob is seq 1 (selector 5)
    write(
        &seeds,
        "decode_sealed_payload",
        "blob_compressed.bin",
        &with_selector(0, open(&blob_v1)),
    );
    write(
        &seeds,
        "decode_sealed_payload",
        "blob_raw_seq1.bin",
        &with_selector(5, open(&raw.bytes)),
    );
    write(
        &seeds,
        "decode_sealed_payload",
        "blob_zero_seq2.bin",
        &with_selector(10, open(&zero.bytes)),
    );
    write(
        &seeds,
        "decode_sealed_payload",
        "manifest.bin",
        &with_selector(1, open(&manifest_v1)),
    );
    write(
        &seeds,
        "decode_sealed_payload",
        "ack.bin",
        &with_selector(2, open(&ack_v1)),
    );
    write(
        &seeds,
        "decode_sealed_payload",
        "catalog.bin",
        &with_selector(3, open(&catalog.bytes)),
    );
    write(
        &seeds,
        "decode_sealed_payload",
        "resync_request.bin",
        &with_selector(4, open(&request.bytes)),
    );
    assert_eq!(
        sealer.seal(ObjectKind::Blob, 0, &open(&blob_v1)),
        blob_v1,
        "the independent sealer reproduces the golden blob"
    );

    // --- bitmaps ------------------------------------------------------------
    write(
        &seeds,
        "decode_bitmap",
        "empty.bin",
        &SectorBitmap::new(1000).encode(),
    );
    write(&seeds, "decode_bitmap", "runs.bin", &bitmap_bytes);
    write(
        &seeds,
        "decode_bitmap",
        "full_max.bin",
        &SectorBitmap::full(u64::MAX).encode(),
    );
    let mut sparse = SectorBitmap::new(3 * 4096 + 7);
    for s in [0, 63, 64, 4095, 4096, 8191, 3 * 4096 + 6] {
        sparse.mark_sectors(s, 1).expect("mark");
    }
    write(&seeds, "decode_bitmap", "sparse.bin", &sparse.encode());

    // --- HRL write-log segments ----------------------------------------------
    let header = encode_segment_header(&SegmentHeader {
        generation: Generation([0x42; 16]),
        epoch: 3,
    });
    let mut seg = header.to_vec();
    write(&seeds, "decode_hrl_log", "header_only.bin", &seg);
    encode_data_record(&mut seg, 3, 4096, &noise(2 * 512, 21));
    encode_mark_record(&mut seg, 3, 0, 64 * 512);
    encode_data_record(&mut seg, 3, 1 << 19, &noise(512, 22));
    write(&seeds, "decode_hrl_log", "three_records.bin", &seg);
    let mut torn = seg[..seg.len() - 100].to_vec();
    write(&seeds, "decode_hrl_log", "torn_data.bin", &torn);
    torn.truncate(header.len() + 20);
    write(&seeds, "decode_hrl_log", "torn_header.bin", &torn);
    let mut garbage = seg.clone();
    garbage.extend_from_slice(b"HRLR");
    garbage.extend_from_slice(&noise(60, 23));
    write(&seeds, "decode_hrl_log", "garbage_tail.bin", &garbage);
    // A discard between two writes: a zero record, header only.
    let mut zeroed = header.to_vec();
    encode_data_record(&mut zeroed, 3, 0, &noise(4 * 512, 24));
    encode_zero_record(&mut zeroed, 3, 512, 1 << 20);
    encode_data_record(&mut zeroed, 3, 1024, &noise(512, 25));
    write(&seeds, "decode_hrl_log", "zero_record.bin", &zeroed);

    // --- key files and disk ids ---------------------------------------------
    let master = MasterKey::from_bytes(golden_master_bytes());
    let file = master.to_key_file();
    write(&seeds, "parse_key_file", "golden.key", file.as_bytes());
    let hex = file.lines().nth(1).expect("key line").to_owned();
    write(
        &seeds,
        "parse_key_file",
        "commented.key",
        format!(
            "# comment\r\n\r\n   {}  \r\n  # trailing\n",
            hex.to_uppercase()
        )
        .as_bytes(),
    );
    write(
        &seeds,
        "parse_key_file",
        "disk_id.txt",
        golden_disk().to_string().as_bytes(),
    );

    // --- scenario files: the shipped scenarios, copied verbatim ---------------
    let scenarios = fuzz.join("../scenarios");
    let mut files: Vec<PathBuf> = fs::read_dir(&scenarios)
        .expect("read scenarios/")
        .map(|e| e.expect("scenarios/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for path in files {
        let text = fs::read_to_string(&path).expect("read scenario");
        let name = path.file_name().expect("file name").to_string_lossy();
        harness::scenario::spec::parse(&text, &name).expect("shipped scenario parses");
        write(&seeds, "parse_scenario", &name, text.as_bytes());
    }

    // --- structured targets: any bytes work; a few fixed ones ---------------
    for (i, len) in [64usize, 256, 1024].into_iter().enumerate() {
        let bytes = noise(len, 100 + i as u64);
        write(
            &seeds,
            "blob_roundtrip_tamper",
            &format!("noise_{len}.bin"),
            &bytes,
        );
        write(
            &seeds,
            "bitmap_roundtrip",
            &format!("noise_{len}.bin"),
            &bytes,
        );
    }

    // --- CBT tracker checkpoints ---------------------------------------------
    {
        use replicator_core::tracker::Generation;
        use replicator_core::tracker::cbt::{Checkpoint, checkpoint_bytes};
        let mut current = SectorBitmap::new(8192);
        current.mark_sectors(8, 100).expect("mark");
        let mut frozen = SectorBitmap::new(8192);
        frozen.mark_sectors(4000, 1).expect("mark");
        let plain = Checkpoint {
            generation: Generation([0x77; 16]),
            epoch: 5,
            lost: None,
            current: current.clone(),
            frozen: Some(frozen),
        };
        write(
            &seeds,
            "decode_tracker_checkpoint",
            "frozen.ckpt",
            &checkpoint_bytes(&plain),
        );
        let lost = Checkpoint {
            lost: Some("the tracker checkpoint could not be read".into()),
            current: SectorBitmap::full(8192),
            frozen: None,
            ..plain
        };
        write(
            &seeds,
            "decode_tracker_checkpoint",
            "lost.ckpt",
            &checkpoint_bytes(&lost),
        );
    }

    // --- kernel tracker and HRL tracker states (selector byte first) ----------
    {
        use replicator_core::device::{BlockDevice, MemDevice};
        use replicator_core::tracker::hrl::{HrlConfig, HrlTracker};
        use replicator_core::tracker::kernel_state::{
            DeviceStamp, FrozenState, TrackState, WriteCounters, encode,
        };
        use replicator_core::tracker::{ChangeTracker, Generation};
        let mut current = SectorBitmap::new(2048);
        current.mark_sectors(8, 24).expect("mark");
        let mut frozen = SectorBitmap::new(2048);
        frozen.mark_sectors(1000, 1).expect("mark");
        let state = TrackState {
            generation: Generation([7; 16]),
            epoch: 5,
            acked_epoch: 3,
            lost: Some("events were dropped".into()),
            clean_stop: true,
            device: DeviceStamp {
                boot_id: [9; 16],
                major: 7,
                minor: 3,
                size_bytes: 2048 * 512,
                diskseq: 42,
                counters: WriteCounters {
                    writes: 1,
                    sectors_written: 2,
                    discards: 3,
                    sectors_discarded: 4,
                },
                backing_file: Some("/tmp/src.img".into()),
            },
            current,
            frozen: Some(FrozenState {
                epoch: 4,
                bitmap: frozen,
                lost: true,
            }),
        };
        write(
            &seeds,
            "decode_tracker_states",
            "ktrack.state",
            &[vec![0u8], encode(&state)].concat(),
        );
        // A real hrl.state: a tracker with a frozen epoch and marks.
        let dir = std::env::temp_dir().join(format!("replicator-seed-hrl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        {
            let dev = MemDevice::new("seed", 1 << 20);
            let (t, _) = HrlTracker::open(dev, &dir, HrlConfig::default()).expect("hrl");
            t.write_at(&[5u8; 4096], 8192).expect("write");
            t.freeze().expect("freeze");
            t.write_at(&[6u8; 512], 0).expect("write");
            t.checkpoint().expect("checkpoint");
        }
        let hrl_state = fs::read(dir.join("hrl.state")).expect("hrl.state");
        let _ = fs::remove_dir_all(&dir);
        write(
            &seeds,
            "decode_tracker_states",
            "hrl.state",
            &[vec![1u8], hrl_state].concat(),
        );
    }
}
