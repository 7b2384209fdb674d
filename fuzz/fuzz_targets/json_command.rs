//! The JSON command decoder (`kefu.v1.json`): any bytes, never a panic; a
//! command it accepts encodes and decodes back to itself.
#![no_main]

use kefu_proto::client::{Codec, Encoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Codec::Json.decode_client(data) {
        let mut enc = Encoder::new();
        let bytes = Codec::Json.encode_client(&frame, &mut enc).to_vec();
        let back = Codec::Json.decode_client(&bytes).expect("an encoded command decodes");
        assert_eq!(back, frame, "a command survives a round trip");
    }
});
