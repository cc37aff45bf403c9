//! Arbitrary text into `MasterKey::parse_key_file` and `DiskId::from_str`.
//!
//! Must hold: never panics (including formatting the error); a parsed key
//! writes a key file that parses back to the same key; a parsed disk id
//! displays as the lowercased input and parses back to itself.

#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use replicator_core::format::KEY_FILE_COMMENT;
use replicator_core::keys::{DiskId, MasterKey};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    match MasterKey::parse_key_file(&text, "fuzz.key") {
        Ok(key) => {
            let file = key.to_key_file();
            assert!(file.starts_with(KEY_FILE_COMMENT));
            let again = MasterKey::parse_key_file(&file, "fuzz.key").expect("own key file parses");
            assert_eq!(again.to_key_file(), file);
            // the one key line of the input is the key, in either case
            let hex = file.lines().nth(1).expect("key line");
            assert!(text.to_ascii_lowercase().contains(hex));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz.key"),
                "key file error does not name the file: {msg}"
            );
        }
    }

    match DiskId::from_str(&text) {
        Ok(id) => {
            let shown = id.to_string();
            assert_eq!(shown, text.to_ascii_lowercase());
            assert_eq!(DiskId::from_str(&shown), Ok(id));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
