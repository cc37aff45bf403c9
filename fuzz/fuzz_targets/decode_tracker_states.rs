//! Raw bytes into the parsers of the other trackers' persisted states, which a restart reads
//! back: the kernel tracker's `ktrack.state` (`tracker::kernel_state::decode`) and the HRL
//! tracker's `hrl.state` (`tracker::hrl::reencode_state`). Byte 0 picks the parser.
//!
//! Must hold: never panics; whatever parses re-encodes to bytes that parse to the same state
//! (kernel state: equal values; HRL state: equal bytes on the second round).

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator_core::tracker::hrl::reencode_state;
use replicator_core::tracker::kernel_state::{decode, encode};

/// The disk the HRL seeds' state is for.
const HRL_DISK_BYTES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        let Ok(state) = decode(bytes) else { return };
        let again = encode(&state);
        assert_eq!(decode(&again).expect("a re-encoded state parses"), state);
    } else {
        let once = match reencode_state(bytes, HRL_DISK_BYTES) {
            Ok(b) => b,
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        };
        let twice = reencode_state(&once, HRL_DISK_BYTES).expect("a re-encoded state parses");
        assert_eq!(once, twice, "hrl.state encoding is not stable");
    }
});
