//! A row of the conversation index (`storage/src/runs.rs`) as a read takes
//! it apart: the key's last seq (the first 8 bytes, little-endian) and the
//! value (the rest). Any bytes are an error or the run's entries, never a
//! panic; an accepted value encodes back to itself.
#![no_main]

use kefu_storage::run_round_trip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((last, value)) = data.split_first_chunk::<8>() else { return };
    if let Ok(again) = run_round_trip(u64::from_le_bytes(*last), value) {
        assert_eq!(again, value, "an accepted run encodes back to itself");
    }
});
