//! The WebSocket frame decoder (RFC 6455, server side): any bytes, in any
//! split into reads, never a panic, every range it hands out inside the
//! input, and the same outcome however the bytes were split: the same
//! messages with the same payloads, and the same close code if it fails.
#![no_main]

use kefu_gateway::ws::decoder::{DataKind, Decoded, Decoder, Limits, Role};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Seen {
    Message(bool, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, Vec<u8>),
    Failed(u16),
}

/// Feeds `input` to a fresh decoder `read` bytes at a time, as a
/// connection's reads would deliver it.
fn decode(input: &[u8], read: usize) -> Vec<Seen> {
    let limits = Limits { max_frame_bytes: 1 << 16, max_message_bytes: 1 << 17 };
    let mut decoder = Decoder::new(Role::Server, limits);
    let (mut buf, mut fed, mut seen) = (Vec::new(), 0, Vec::new());
    let mut message: Option<(bool, Vec<u8>)> = None;
    // Each turn either consumes a byte or feeds one; a bound catches a
    // decoder that would do neither.
    for _ in 0..(4 * input.len() + 64) {
        let (used, result) = decoder.decode(&mut buf);
        assert!(used <= buf.len());
        let event = match result {
            Err(e) => {
                seen.push(Seen::Failed(e.code));
                assert!(decoder.is_failed(), "an error fails the decoder for good");
                return seen;
            }
            Ok(event) => event,
        };
        let bytes = |r: std::ops::Range<usize>| {
            assert!(r.end <= used || r.end <= buf.len(), "a range inside the input");
            buf[r].to_vec()
        };
        match event {
            Decoded::NeedMore => {
                // It may have consumed a header (or payload) before asking.
                buf.drain(..used);
                if fed == input.len() {
                    return seen;
                }
                let next = (fed + read).min(input.len());
                buf.extend_from_slice(&input[fed..next]);
                fed = next;
                continue;
            }
            Decoded::Data { payload, kind, message_start, message_end } => {
                let piece = bytes(payload);
                if message_start {
                    assert!(message.is_none(), "a message starts after the last one ended");
                    message = Some((kind == DataKind::Text, Vec::new()));
                }
                let m = message.as_mut().expect("a piece belongs to a message");
                m.1.extend_from_slice(&piece);
                if message_end {
                    let (text, payload) = message.take().expect("a message in progress");
                    if text {
                        assert!(std::str::from_utf8(&payload).is_ok(), "a whole text message is UTF-8");
                    }
                    seen.push(Seen::Message(text, payload));
                }
            }
            Decoded::Ping { payload } => seen.push(Seen::Ping(bytes(payload))),
            Decoded::Pong { payload } => seen.push(Seen::Pong(bytes(payload))),
            Decoded::Close { code, reason } => {
                seen.push(Seen::Close(code, bytes(reason)));
                return seen;
            }
        }
        buf.drain(..used);
    }
    panic!("the decoder neither consumed nor asked for more");
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let whole = decode(input, input.len().max(1));
    let pieces = decode(input, usize::from(split % 17) + 1);
    assert_eq!(whole, pieces, "the outcome depends on how the bytes were split");
});
