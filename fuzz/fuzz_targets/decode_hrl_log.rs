//! Raw bytes into `tracker::hrl::decode_segment`, the parser of the HRL write-log segments that
//! the tracker reads back after a crash.
//!
//! Must hold: never panics; a decoded segment's valid part starts after the header, its records
//! follow each other with no gap, each is whole sectors of the segment's epoch within the disk,
//! and re-encoding the header and records reproduces the valid bytes exactly; the tail is torn
//! exactly when bytes follow the valid part; decoding the valid part alone finds the same records
//! and no tail.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::tracker::hrl::{
    RECORD_DATA_BYTES_MAX, RECORD_KIND_DATA, RECORD_KIND_MARK, RECORD_KIND_ZERO,
    SEGMENT_HEADER_LEN, decode_segment, encode_data_record, encode_mark_record,
    encode_segment_header, encode_zero_record,
};

/// The disk the records must fit (the seeds' records lie in its first MiB).
const DISK_BYTES: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let seg = match decode_segment(data, DISK_BYTES) {
        Ok(seg) => seg,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let len = data.len() as u64;
    assert!(seg.valid_bytes >= SEGMENT_HEADER_LEN && seg.valid_bytes <= len);
    assert_eq!(seg.torn.is_some(), seg.valid_bytes < len);
    if let Some(t) = &seg.torn {
        assert_eq!(t.offset_bytes, seg.valid_bytes);
        assert!(!t.reason.is_empty());
    }
    let mut again = encode_segment_header(&seg.header).to_vec();
    let mut pos = SEGMENT_HEADER_LEN;
    for r in &seg.records {
        assert_eq!(r.at, pos, "records follow each other");
        assert_eq!(r.epoch, seg.header.epoch);
        assert!(r.len_bytes > 0 && r.offset_bytes % 512 == 0 && r.len_bytes % 512 == 0);
        assert!(r.offset_bytes + r.len_bytes <= DISK_BYTES);
        match r.kind {
            RECORD_KIND_DATA => {
                assert!(r.len_bytes <= RECORD_DATA_BYTES_MAX);
                let d = &data[r.data_at() as usize..(r.data_at() + r.len_bytes) as usize];
                encode_data_record(&mut again, r.epoch, r.offset_bytes, d);
            }
            RECORD_KIND_MARK => encode_mark_record(&mut again, r.epoch, r.offset_bytes, r.len_bytes),
            RECORD_KIND_ZERO => encode_zero_record(&mut again, r.epoch, r.offset_bytes, r.len_bytes),
            k => panic!("record kind {k} decoded"),
        }
        pos += r.stored_len();
    }
    assert_eq!(pos, seg.valid_bytes);
    assert_eq!(&again[..], &data[..seg.valid_bytes as usize], "re-encoding differs");
    let valid = decode_segment(&data[..seg.valid_bytes as usize], DISK_BYTES)
        .expect("the valid part decodes");
    assert_eq!(valid.records, seg.records);
    assert!(valid.torn.is_none());
});
