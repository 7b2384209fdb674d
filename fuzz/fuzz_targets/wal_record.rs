//! The write-ahead log's redo records (`storage/src/redo.rs`), as replay
//! reads them after their checksum matched: any payload is an error or a
//! list of ops, never a panic; an accepted payload encodes back to itself.
#![no_main]

use kefu_storage::redo_round_trip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(again) = redo_round_trip(data) {
        assert_eq!(again, data, "an accepted record encodes back to itself");
    }
});
