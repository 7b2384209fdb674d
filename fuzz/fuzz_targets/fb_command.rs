//! The FlatBuffers command decoder (`kefu.v1.fb`: the buffer is verified before anything is read): any bytes, never a panic; a
//! command it accepts encodes and decodes back to itself.
#![no_main]

use kefu_proto::client::{Codec, Encoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Codec::FlatBuffers.decode_client(data) {
        let mut enc = Encoder::new();
        let bytes = Codec::FlatBuffers.encode_client(&frame, &mut enc).to_vec();
        let back = Codec::FlatBuffers.decode_client(&bytes).expect("an encoded command decodes");
        assert_eq!(back, frame, "a command survives a round trip");
    }
});
