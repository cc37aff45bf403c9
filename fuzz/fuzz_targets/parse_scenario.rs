//! Arbitrary text into the scenario file parser (`harness scenario FILE`).
//!
//! Must hold: never panics (including formatting the error); an error names the file and, when
//! it has a position, a line within the text; a scenario that parses is within its documented
//! bounds: 1 to 4096 disks whose expanded names are unique, sizes that are positive multiples
//! of 512, a concurrency of 1 to 1024, and faults naming existing disks and cycles.

#![no_main]

use std::collections::BTreeSet;

use harness::scenario::spec::{self, CONCURRENCY_MAX, DISKS_MAX, Fault};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match spec::parse(&text, "fuzz.toml") {
        Ok(s) => {
            let names = s.disk_names();
            assert!(!names.is_empty() && names.len() as u64 <= DISKS_MAX);
            let unique: BTreeSet<&str> = names.iter().map(|n| n.name.as_str()).collect();
            assert_eq!(unique.len(), names.len(), "disk names collide");
            for g in &s.disks {
                let size = g.get_ref().size.0;
                assert!(size > 0 && size % 512 == 0);
            }
            assert!((1..=CONCURRENCY_MAX).contains(&s.concurrency));
            for f in &s.faults {
                let f = f.get_ref();
                if let Some(d) = f.disk() {
                    assert!(unique.contains(d), "fault names an unknown disk {d}");
                }
                if let Some(c) = f.cycle() {
                    assert!(c <= s.cycles);
                }
                if let Fault::Kill { after_ops, .. } = f {
                    assert!(*after_ops > 0);
                }
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.toml"), "error does not name the file: {msg}");
            if let Some((line, col)) = e.line_col {
                assert!(line >= 1 && col >= 1);
                assert!(line <= text.lines().count() + 1, "line {line} past the text");
            }
        }
    }
});
