//! The wire shape of one WebSocket frame (RFC 6455 §5.2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               | Masking-key, if MASK set to 1 |
//! +-------------------------------+-------------------------------+
//! | Masking-key (continued)       |          Payload Data         |
//! +-------------------------------- - - - - - - - - - - - - - - - +
//! ```
//!
//! A header is therefore 2 to [`MAX_HEADER_BYTES`] bytes. This file holds the
//! pieces both directions share: the [`OpCode`]s, [`encode_header`] for the
//! frames the gateway sends, [`apply_mask`] for the XOR that every
//! client-to-server payload carries, and [`ControlFrame`], a fixed-size,
//! ready-to-write ping, pong or close.
//!
//! The receiving side (validation, fragmentation, limits) lives in
//! [`super::decoder`].

use std::fmt;

pub use kefu_proto::ws::{MAX_HEADER_BYTES, OpCode, encode_header};

/// The largest payload a control frame (close, ping, pong) may carry
/// (RFC 6455 §5.5). Control frames must fit in the 7-bit length field so that
/// they can be injected between the fragments of a message cheaply.
pub const MAX_CONTROL_PAYLOAD_BYTES: usize = 125;

/// The longest close reason that fits in a control frame: 125 bytes minus the
/// 2-byte status code.
pub const MAX_CLOSE_REASON_BYTES: usize = MAX_CONTROL_PAYLOAD_BYTES - 2;

/// XORs `buf` with the masking key in place (RFC 6455 §5.3). Masking is its
/// own inverse, so this both masks and unmasks.
///
/// `offset` is the position of `buf[0]` within the frame's payload. The key
/// repeats every 4 bytes from the start of the payload, so a frame that
/// arrives in several reads can be unmasked one chunk at a time, each chunk
/// with its own offset.
///
/// Every byte a client sends passes through here, so it works a 64-bit word
/// at a time: the key is rotated to the chunk's phase once, doubled into a
/// word, and XORed over 8-byte blocks (unaligned loads, so any alignment and
/// length is fine; the compiler turns the loop into SIMD). Only the last
/// 0 to 7 bytes go one at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = mask;
    key.rotate_left(offset % 4);
    let word = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let (blocks, tail) = buf.as_chunks_mut::<8>();
    for block in blocks {
        *block = (u64::from_ne_bytes(*block) ^ word).to_ne_bytes();
    }
    // The blocks covered a multiple of 8 (so of 4) bytes: the tail starts at
    // phase 0 of the rotated key.
    for (byte, k) in tail.iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// A control payload longer than the 125 bytes RFC 6455 §5.5 allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlPayloadTooLong {
    /// The length that was asked for.
    pub len: usize,
}

impl fmt::Display for ControlPayloadTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "control frame payload of {} bytes exceeds the {MAX_CONTROL_PAYLOAD_BYTES}-byte limit",
            self.len
        )
    }
}

impl std::error::Error for ControlPayloadTooLong {}

/// A complete server-side (unmasked) control frame, header and payload, in a
/// fixed inline array: building a pong or a close never allocates, and the
/// value can sit in a connection's write path until the socket is writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlFrame {
    /// 2 header bytes (an unmasked frame of at most 125 bytes needs no
    /// extended length) followed by the payload.
    bytes: [u8; 2 + MAX_CONTROL_PAYLOAD_BYTES],
    /// How many bytes of `bytes` are used; at most 127.
    len: u8,
}

impl ControlFrame {
    /// A ping carrying `payload` (which the peer must echo in its pong).
    pub fn ping(payload: &[u8]) -> Result<ControlFrame, ControlPayloadTooLong> {
        ControlFrame::with_payload(OpCode::Ping, &[payload])
    }

    /// A pong; when answering a ping, `payload` is the ping's payload
    /// (RFC 6455 §5.5.3).
    pub fn pong(payload: &[u8]) -> Result<ControlFrame, ControlPayloadTooLong> {
        ControlFrame::with_payload(OpCode::Pong, &[payload])
    }

    /// A close frame with a status code and a reason. The reason is cut to
    /// the longest prefix that fits in [`MAX_CLOSE_REASON_BYTES`] and ends on
    /// a character boundary, so the frame is always valid UTF-8 and never
    /// too long: closing must not be able to fail.
    ///
    /// `code` should be one a sender may use (see [`super::close`]); 1005 and
    /// 1006 are for local reporting only and never go on the wire.
    pub fn close(code: u16, reason: &str) -> ControlFrame {
        let mut cut = reason.len().min(MAX_CLOSE_REASON_BYTES);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let (reason, _) = reason.as_bytes().split_at(cut);
        // Cannot fail: 2 + cut <= 125.
        ControlFrame::with_payload(OpCode::Close, &[&code.to_be_bytes(), reason])
            .unwrap_or_else(|_| ControlFrame::close_empty())
    }

    /// A close frame with no status code (an empty payload), the answer to a
    /// peer's close that carried none.
    pub fn close_empty() -> ControlFrame {
        let mut bytes = [0; 2 + MAX_CONTROL_PAYLOAD_BYTES];
        bytes[0] = 0x80 | OpCode::Close as u8;
        ControlFrame { bytes, len: 2 }
    }

    /// The frame as it goes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        // `len` is at most 127 by construction; `get` keeps even a broken
        // invariant from panicking.
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// The payload alone (for a close: the code and the reason).
    pub fn payload(&self) -> &[u8] {
        self.as_bytes().get(2..).unwrap_or(&[])
    }

    fn with_payload(opcode: OpCode, parts: &[&[u8]]) -> Result<ControlFrame, ControlPayloadTooLong> {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        if payload_len > MAX_CONTROL_PAYLOAD_BYTES {
            return Err(ControlPayloadTooLong { len: payload_len });
        }
        let mut bytes = [0; 2 + MAX_CONTROL_PAYLOAD_BYTES];
        bytes[0] = 0x80 | opcode as u8;
        // Lossless: payload_len <= 125.
        bytes[1] = payload_len as u8;
        let mut at = 2;
        for part in parts {
            bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(ControlFrame { bytes, len: at as u8 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    fn header(fin: bool, op: OpCode, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = [0u8; MAX_HEADER_BYTES];
        let n = encode_header(&mut out, fin, op, len, mask);
        out[..n].to_vec()
    }

    #[test]
    fn opcode_from_u8_accepts_exactly_the_six_defined_values() {
        for v in 0..=255u8 {
            let op = OpCode::from_u8(v);
            match v {
                0 | 1 | 2 | 8 | 9 | 10 => assert_eq!(op.map(|o| o as u8), Some(v)),
                _ => assert_eq!(op, None, "opcode {v}"),
            }
        }
        assert!(!OpCode::Continuation.is_control());
        assert!(!OpCode::Text.is_control());
        assert!(!OpCode::Binary.is_control());
        assert!(OpCode::Close.is_control());
        assert!(OpCode::Ping.is_control());
        assert!(OpCode::Pong.is_control());
    }

    #[test]
    fn header_uses_the_minimal_length_encoding() {
        assert_eq!(header(true, OpCode::Text, 0, None), [0x81, 0]);
        assert_eq!(header(true, OpCode::Binary, 125, None), [0x82, 125]);
        assert_eq!(header(false, OpCode::Text, 126, None), [0x01, 126, 0, 126]);
        assert_eq!(header(true, OpCode::Binary, 65535, None), [0x82, 126, 0xff, 0xff]);
        assert_eq!(header(true, OpCode::Binary, 65536, None), [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(header(true, OpCode::Continuation, 1 << 32, None), [0x80, 127, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            header(true, OpCode::Binary, (1 << 63) - 1, None),
            [0x82, 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn header_with_mask_appends_the_key() {
        let key = [1, 2, 3, 4];
        assert_eq!(header(true, OpCode::Ping, 0, Some(key)), [0x89, 0x80, 1, 2, 3, 4]);
        assert_eq!(header(true, OpCode::Text, 126, Some(key)), [0x81, 0x80 | 126, 0, 126, 1, 2, 3, 4]);
        let longest = header(false, OpCode::Binary, 1 << 32, Some(key));
        assert_eq!(longest.len(), MAX_HEADER_BYTES);
        assert_eq!(longest[..2], [0x02, 0xff]);
        assert_eq!(longest[10..], key);
    }

    #[test]
    fn apply_mask_matches_the_naive_loop_for_every_length_offset_and_alignment() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let source: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..8 {
            for len in 0..=140 {
                for offset in 0..9 {
                    let mut fast = source.clone();
                    let mut slow = source.clone();
                    apply_mask(&mut fast[start..start + len], key, offset);
                    naive_mask(&mut slow[start..start + len], key, offset);
                    assert_eq!(fast, slow, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn masking_twice_is_the_identity_at_every_offset() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let original: Vec<u8> = (0..=255).collect();
        for offset in 0..16 {
            let mut buf = original.clone();
            apply_mask(&mut buf, key, offset);
            assert_ne!(buf, original);
            apply_mask(&mut buf, key, offset);
            assert_eq!(buf, original, "offset {offset}");
        }
    }

    #[test]
    fn masking_in_chunks_equals_masking_at_once() {
        let key = [9, 8, 7, 6];
        let original: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        for chunk_len in 1..40 {
            let mut chunked = original.clone();
            let mut at = 0;
            for chunk in chunked.chunks_mut(chunk_len) {
                let n = chunk.len();
                apply_mask(chunk, key, at);
                at += n;
            }
            assert_eq!(chunked, whole, "chunk length {chunk_len}");
        }
    }

    #[test]
    fn ping_and_pong_carry_up_to_125_bytes() {
        let ping = ControlFrame::ping(b"hi").unwrap();
        assert_eq!(ping.as_bytes(), [0x89, 2, b'h', b'i']);
        assert_eq!(ping.payload(), b"hi");
        assert_eq!(ControlFrame::pong(&[]).unwrap().as_bytes(), [0x8a, 0]);
        let full = ControlFrame::pong(&[0xab; 125]).unwrap();
        assert_eq!(full.as_bytes().len(), 127);
        assert_eq!(full.as_bytes()[..2], [0x8a, 125]);
        assert_eq!(ControlFrame::ping(&[0; 126]), Err(ControlPayloadTooLong { len: 126 }));
        assert_eq!(ControlFrame::pong(&[0; 4096]), Err(ControlPayloadTooLong { len: 4096 }));
        assert!(ControlPayloadTooLong { len: 126 }.to_string().contains("126 bytes"));
    }

    #[test]
    fn close_carries_code_and_reason() {
        let close = ControlFrame::close(1000, "bye");
        assert_eq!(close.as_bytes(), [0x88, 5, 0x03, 0xe8, b'b', b'y', b'e']);
        assert_eq!(ControlFrame::close(4001, "").as_bytes(), [0x88, 2, 0x0f, 0xa1]);
        assert_eq!(ControlFrame::close_empty().as_bytes(), [0x88, 0]);
        assert_eq!(ControlFrame::close_empty().payload(), b"");
    }

    #[test]
    fn close_reason_is_truncated_on_a_char_boundary() {
        // 123 ASCII bytes fit exactly.
        let exact = "a".repeat(123);
        let frame = ControlFrame::close(1000, &exact);
        assert_eq!(frame.as_bytes().len(), 127);
        assert_eq!(&frame.payload()[2..], exact.as_bytes());

        // 122 ASCII bytes and a 3-byte character: the character must go.
        let straddling = format!("{}€", "a".repeat(122));
        let frame = ControlFrame::close(1000, &straddling);
        assert_eq!(frame.payload().len(), 2 + 122);
        assert!(std::str::from_utf8(&frame.payload()[2..]).is_ok());

        // Only multi-byte characters, far too long.
        let long = "客服".repeat(100);
        let frame = ControlFrame::close(1011, &long);
        let reason = std::str::from_utf8(&frame.payload()[2..]).unwrap();
        assert_eq!(reason.len(), 123); // 41 three-byte characters
        assert!(long.starts_with(reason));
        assert_eq!(frame.as_bytes()[1] as usize, frame.payload().len());
    }
}
