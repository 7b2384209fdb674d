//! The parts of RFC 6455 framing that both the gateway's transport and the
//! chat core need: a shard's chat service encodes each event once as a
//! complete server WebSocket frame and hands those bytes to every
//! recipient's connection, so the header is written where the event is
//! encoded. The receiving side (validation, masking, fragmentation) stays
//! in the gateway.

/// Close codes of kefu's own (the 4000-4999 range RFC 6455 §7.4.2 leaves to
/// applications): part of the client protocol, see `docs/protocol.md`.
pub mod close {
    /// The gateway is draining for a restart or shutdown (or could not
    /// keep the session's state in step): reconnect after a back-off.
    pub const SERVER_SHUTDOWN: u16 = 4000;
    /// The client did not read fast enough (or missed a frame): its
    /// outbound queue hit its bound; resume from the last seq.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// A newer connection for the same session took this one's place.
    pub const REPLACED: u16 = 4002;
    /// The token the session connected with has expired (`exp` plus the
    /// leeway): reconnect with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// Missing, invalid or expired credentials. Do not retry as is.
    pub const UNAUTHORIZED: u16 = 4500;
    /// The identity is blocked. Do not retry.
    pub const BLOCKED: u16 = 4501;
}

/// The longest possible frame header: 2 fixed bytes, an 8-byte extended
/// length and a 4-byte masking key.
pub const MAX_HEADER_BYTES: usize = 14;

/// The frame types RFC 6455 defines. The other ten opcode values are reserved
/// and a peer that sends one fails the connection (see the decoder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// A further fragment of the message started by a Text or Binary frame.
    Continuation = 0,
    /// The first frame of a UTF-8 text message.
    Text = 1,
    /// The first frame of a binary message.
    Binary = 2,
    /// Start (or answer) the closing handshake.
    Close = 8,
    /// A keep-alive probe; the receiver answers with a Pong.
    Ping = 9,
    /// The answer to a Ping (or an unsolicited heartbeat).
    Pong = 10,
}

impl OpCode {
    /// The opcode for the low four bits of a frame's first byte, or `None` if
    /// the value is reserved. Bits above the low four are ignored by design:
    /// callers mask them off first, so a stray high bit cannot alias a valid
    /// opcode here.
    pub fn from_u8(value: u8) -> Option<OpCode> {
        match value {
            0 => Some(OpCode::Continuation),
            1 => Some(OpCode::Text),
            2 => Some(OpCode::Binary),
            8 => Some(OpCode::Close),
            9 => Some(OpCode::Ping),
            10 => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// Control frames (opcodes with the high bit set) may not be fragmented
    /// and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Writes a frame header into `out` and returns how many bytes of it are
/// used. The length is encoded in the fewest bytes RFC 6455 §5.2 allows
/// (the "minimal encoding" a sender must use): 7 bits below 126, 16 bits up
/// to 65535, 64 bits beyond.
///
/// `mask` is `None` for frames the gateway sends as a server (RFC 6455 §5.1:
/// a server must not mask) and `Some(key)` for client frames (tests and the
/// bench tool). The payload itself is not touched; mask it with
/// the gateway's `apply_mask`.
///
/// `payload_len` must be below 2^63 (the most significant bit of the 64-bit
/// length is reserved); no real payload comes near that.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_BYTES],
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    debug_assert!(payload_len >> 63 == 0, "frame length {payload_len} not encodable");
    out[0] = (u8::from(fin) << 7) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut len = if payload_len < 126 {
        // Lossless: payload_len < 126 fits in 7 bits.
        out[1] = mask_bit | payload_len as u8;
        2
    } else if let Ok(short) = u16::try_from(payload_len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[len..len + 4].copy_from_slice(&key);
        len += 4;
    }
    len
}

/// The payloads of the complete, unmasked frames packed one after another
/// in `bytes` (what the gateway writes: a replay packs many); stops at a
/// frame cut short.
pub fn payloads(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len7 = *bytes.get(1)? & 0x7F;
        let (header, len): (usize, usize) = match len7 {
            126 => (4, u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize),
            127 => (10, usize::try_from(u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)).ok()?),
            n => (2, usize::from(n)),
        };
        let payload = bytes.get(header..header.checked_add(len)?)?;
        bytes = &bytes[header + len..];
        Some(payload)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_frames_come_apart_and_a_cut_one_ends_the_walk() {
        let mut packed = Vec::new();
        for payload in [&b"a"[..], &[7u8; 300][..], &[1u8; 70_000][..]] {
            let mut h = [0u8; MAX_HEADER_BYTES];
            let n = encode_header(&mut h, true, OpCode::Binary, payload.len() as u64, None);
            packed.extend_from_slice(&h[..n]);
            packed.extend_from_slice(payload);
        }
        let lens: Vec<usize> = payloads(&packed).map(<[u8]>::len).collect();
        assert_eq!(lens, [1, 300, 70_000]);
        assert_eq!(payloads(&packed[..packed.len() - 1]).count(), 2);
    }
}
