//! The storage record reader (a compact message, state, profile or read
//! mark, or an rkyv archive, each validated before use): any bytes read
//! back from a damaged database file are an error, never a panic or
//! undefined behaviour; a record it accepts
//! stores and reads back as itself, and a compact message it accepts
//! (one that points back for its sender too) encodes back to its bytes;
//! a message of schema versions 13 to 15 that the upgrade repacks reads
//! back in the format it is repacked to.
#![no_main]

use kefu_storage::{decode_log_record, encode_log_record, message_round_trip, repack_v15};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = decode_log_record(data) {
        let bytes = encode_log_record(&record).expect("a decoded record encodes");
        assert_eq!(decode_log_record(&bytes).expect("an encoded record decodes"), record);
    }
    if let Ok(bytes) = message_round_trip(data) {
        assert_eq!(bytes, data, "a compact message has one encoding");
    }
    if let Ok(Some(repacked)) = repack_v15(data) {
        assert_eq!(message_round_trip(&repacked).as_ref(), Ok(&repacked), "a repacked message reads back");
    }
});
