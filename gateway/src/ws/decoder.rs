//! The receiving side of RFC 6455: a frame decoder that validates
//! everything a peer sends and streams data payloads out in chunks.
//!
//! # Why it streams
//!
//! A shard reads into a small buffer borrowed from its slab and gives the
//! buffer back as soon as it has handled the bytes (see "Memory per
//! connection" in DESIGN.md). If the decoder waited for whole frames, every
//! connection would need a buffer as large as the biggest frame it accepts.
//! Instead the decoder hands out each piece of a data frame's payload as soon
//! as it is in the buffer, unmasked in place, tagged with whether it starts or
//! ends a message. The caller copies the pieces wherever the message is
//! assembled (or rejects it early). Only control frames are returned whole:
//! they are at most 125 bytes, and a caller wants a ping or a close as one
//! value.
//!
//! # How to drive it
//!
//! ```text
//! loop {
//!     let (consumed, result) = decoder.decode(&mut buf[..filled]);
//!     match result {
//!         Ok(Decoded::NeedMore) => { drop `consumed` bytes, keep the rest, read more }
//!         Ok(event)             => { handle `event` (its ranges index `buf`), then drop `consumed` bytes }
//!         Err(e)                => { send close e.code, stop reading }
//!     }
//! }
//! ```
//!
//! The caller always drops exactly `consumed` bytes from the front of the
//! buffer (even with `NeedMore`, which may have used up a frame header) and
//! calls again with the rest plus whatever it reads next. Bytes it did not
//! drop are given again unchanged: short of an error, the decoder only
//! modifies (unmasks) bytes it reports as consumed. A buffer must be able to hold
//! [`MIN_BUFFER_BYTES`] so that the largest control frame fits; data frames
//! need only their header (at most 14 bytes) to make progress. Conversely,
//! after `NeedMore` fewer than [`MIN_BUFFER_BYTES`] bytes are ever left
//! unconsumed (an incomplete header or control frame), so a connection can
//! park them in a small fixed array between reads.
//!
//! # What it refuses
//!
//! Every violation fails the connection with the close code RFC 6455
//! prescribes: 1002 for broken framing (reserved bits, unknown opcodes,
//! fragmented or oversized control frames, continuation without a message,
//! a new message inside a fragmented one, wrong masking, a 64-bit length
//! with its top bit set, a bad close payload), 1007 for text that is not
//! UTF-8 (found as early as the bytes allow, see [`super::utf8`]), and 1009
//! for a frame or message over the configured [`Limits`] (found at the frame
//! header, before any of the payload is read). After an error the decoder is
//! poisoned: it returns the same error forever.
//!
//! No extensions are negotiated (no permessage-deflate), so every reserved
//! bit must be clear. A length encoded in more bytes than needed is accepted:
//! minimal encoding is a rule for senders that RFC 6455 does not ask
//! receivers to police, and refusing it would only break odd but harmless
//! clients.
//!
//! The decoder never allocates and never panics, whatever the input.

use std::fmt;
use std::ops::Range;

use super::close::{self, parse_close_payload};
use super::frame::{MAX_CONTROL_PAYLOAD_BYTES, OpCode, apply_mask};
use super::utf8::Utf8Validator;

/// The smallest read buffer a caller may use: the largest masked control
/// frame (2 header bytes, a 4-byte key, 125 payload bytes) must fit whole.
pub const MIN_BUFFER_BYTES: usize = 2 + 4 + MAX_CONTROL_PAYLOAD_BYTES;

/// Which end of the connection the decoder serves. A client must mask every
/// frame it sends and a server must not (RFC 6455 §5.1), so the role says
/// which masking to demand of incoming frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Decoding frames from a client: they must be masked.
    Server,
    /// Decoding frames from a server (the bench tool, tests): they must not
    /// be masked.
    Client,
}

/// Size limits on what a peer may send, checked against the lengths frame
/// headers declare so that an oversized frame is refused before any of it is
/// read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest payload one data frame may declare.
    pub max_frame_bytes: u64,
    /// The largest total payload of one message, summed over its fragments.
    pub max_message_bytes: u64,
}

/// Why the connection must fail, and the close code to fail it with: 1002
/// (protocol error), 1007 (invalid UTF-8) or 1009 (too big).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// The RFC 6455 close code to send.
    pub code: u16,
    /// A short explanation, suitable as the close reason and for logs. It
    /// never contains client data.
    pub reason: &'static str,
}

impl ProtocolError {
    /// An error with the given close code and reason.
    pub const fn new(code: u16, reason: &'static str) -> ProtocolError {
        ProtocolError { code, reason }
    }

    const fn protocol(reason: &'static str) -> ProtocolError {
        ProtocolError::new(close::PROTOCOL_ERROR, reason)
    }

    const fn too_big(reason: &'static str) -> ProtocolError {
        ProtocolError::new(close::TOO_BIG, reason)
    }

    const fn invalid_payload(reason: &'static str) -> ProtocolError {
        ProtocolError::new(close::INVALID_PAYLOAD, reason)
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (close code {})", self.reason, self.code)
    }
}

impl std::error::Error for ProtocolError {}

/// The type of a data message, fixed by its first frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    /// UTF-8 text (validated by the decoder).
    Text,
    /// Arbitrary bytes.
    Binary,
}

/// What one call to [`Decoder::decode`] found. Ranges index the `input`
/// slice of that call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Nothing complete yet: keep the bytes not consumed and read more.
    NeedMore,
    /// A piece of a data message's payload, already unmasked.
    ///
    /// A message arrives as one or more of these, in order: the first has
    /// `message_start`, the last `message_end` (a one-piece message has
    /// both). Pieces may be empty (an empty message, or an empty final
    /// fragment still has to say that the message ended). For text, the
    /// whole message is valid UTF-8 once `message_end` is seen, but a piece
    /// on its own may cut a character in two.
    Data {
        /// Where the piece lies in `input`.
        payload: Range<usize>,
        /// Text or binary, the same for every piece of a message.
        kind: DataKind,
        /// This is the first piece of a new message.
        message_start: bool,
        /// This is the last piece of the message.
        message_end: bool,
    },
    /// A complete ping; answer with a pong carrying the same payload.
    Ping {
        /// The (unmasked) application data to echo.
        payload: Range<usize>,
    },
    /// A complete pong.
    Pong {
        /// The (unmasked) application data.
        payload: Range<usize>,
    },
    /// A complete, valid close frame. The peer sends nothing after it; the
    /// caller answers with a close and stops reading.
    Close {
        /// The status code, or `None` if the payload was empty.
        code: Option<u16>,
        /// The reason text (valid UTF-8, possibly empty).
        reason: Range<usize>,
    },
}

/// The frame decoder for one connection. See the module documentation for
/// how to drive it.
///
/// It is small (64 bytes) because one lives in every connection: frame
/// headers are parsed straight from the caller's buffer, so the decoder
/// keeps no bytes of its own except the at most 3 bytes of a UTF-8
/// character that a read cut in two.
#[derive(Clone, Debug)]
pub struct Decoder {
    limits: Limits,
    /// Payload bytes of the current data frame not yet handed out. Non-zero
    /// exactly when the next input byte is payload, not a frame header.
    frame_remaining: u64,
    /// Payload bytes declared so far by the frames of the message in
    /// progress, to enforce `max_message_bytes`.
    message_bytes: u64,
    /// The reason of the error that poisoned the decoder (meaningful only
    /// when `poison_code` is non-zero). Kept as two fields, not an
    /// `Option<ProtocolError>`, to keep the decoder at 64 bytes.
    poison_reason: &'static str,
    /// Validates the text message in progress across pieces and fragments.
    utf8: Utf8Validator,
    /// The masking key of the current data frame.
    mask: [u8; 4],
    /// The current frame's payload position modulo 4, i.e. where in the key
    /// the next payload byte starts.
    mask_offset: u8,
    /// The close code of the error that poisoned the decoder; 0 while
    /// healthy.
    poison_code: u16,
    role: Role,
    /// The type of the message in progress, `None` between messages.
    message: Option<DataKind>,
    /// The current data frame is the message's last (FIN set).
    frame_fin: bool,
    /// The next piece handed out is the first of its message.
    message_start_pending: bool,
}

impl Decoder {
    /// A decoder at the start of a connection.
    pub fn new(role: Role, limits: Limits) -> Decoder {
        Decoder {
            limits,
            frame_remaining: 0,
            message_bytes: 0,
            poison_reason: "",
            utf8: Utf8Validator::new(),
            mask: [0; 4],
            mask_offset: 0,
            poison_code: 0,
            role,
            message: None,
            frame_fin: false,
            message_start_pending: false,
        }
    }

    /// Consumes a prefix of `input`, unmasking payload bytes in place.
    ///
    /// Returns how many bytes were consumed and what they meant. Ranges in
    /// the result index `input`. The caller drops the consumed bytes, keeps
    /// the rest, and calls again (with more bytes, if the result was
    /// `NeedMore`). On `Err` nothing is consumed and the decoder stays
    /// failed.
    pub fn decode(&mut self, input: &mut [u8]) -> (usize, Result<Decoded, ProtocolError>) {
        if self.poison_code != 0 {
            return (0, Err(ProtocolError::new(self.poison_code, self.poison_reason)));
        }
        if self.frame_remaining > 0 { self.data_piece(input, 0) } else { self.frame_header(input) }
    }

    /// Payload bytes of the current data frame not yet handed out: after a
    /// [`Decoded::Data`] chunk, how much more of that frame is coming. Lets
    /// a caller size a message buffer once instead of growing it.
    pub fn frame_remaining(&self) -> u64 {
        self.frame_remaining
    }

    /// Whether a data message has started and not yet ended.
    pub fn message_in_progress(&self) -> bool {
        self.message.is_some()
    }

    /// Whether an error has failed the decoder for good.
    pub fn is_failed(&self) -> bool {
        self.poison_code != 0
    }

    /// Parses the header at the start of `input` and, for a data frame,
    /// returns the first piece of its payload along with it.
    fn frame_header(&mut self, input: &mut [u8]) -> (usize, Result<Decoded, ProtocolError>) {
        let [b0, b1, ..] = *input else {
            return (0, Ok(Decoded::NeedMore));
        };
        // Checks that need only the first two bytes come first, and always
        // in the same order, so the error found does not depend on how the
        // input was split into reads.
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return self.fail(ProtocolError::protocol("reserved bits set without a negotiated extension"));
        }
        let Some(opcode) = OpCode::from_u8(b0 & 0x0f) else {
            return self.fail(ProtocolError::protocol("reserved opcode"));
        };
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => {
                return self.fail(ProtocolError::protocol("client frame is not masked"));
            }
            (Role::Client, true) => {
                return self.fail(ProtocolError::protocol("server frame is masked"));
            }
            _ => {}
        }
        let len7 = b1 & 0x7f;
        let control = opcode.is_control();
        if control {
            if !fin {
                return self.fail(ProtocolError::protocol("fragmented control frame"));
            }
            if usize::from(len7) > MAX_CONTROL_PAYLOAD_BYTES {
                return self.fail(ProtocolError::protocol("control frame payload over 125 bytes"));
            }
        } else {
            match (opcode, self.message) {
                (OpCode::Continuation, None) => {
                    return self
                        .fail(ProtocolError::protocol("continuation frame without a message in progress"));
                }
                (OpCode::Text | OpCode::Binary, Some(_)) => {
                    return self.fail(ProtocolError::protocol("new message before the fragmented one ended"));
                }
                _ => {}
            }
        }

        let (len, mut at) = match len7 {
            126 => match input.get(2..4) {
                Some(&[hi, lo]) => (u64::from(u16::from_be_bytes([hi, lo])), 4),
                _ => return (0, Ok(Decoded::NeedMore)),
            },
            127 => match input.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(bytes) => (u64::from_be_bytes(bytes), 10),
                None => return (0, Ok(Decoded::NeedMore)),
            },
            short => (u64::from(short), 2),
        };
        if len >> 63 != 0 {
            return self
                .fail(ProtocolError::protocol("64-bit payload length with the most significant bit set"));
        }
        let mask = if masked {
            match input.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                Some(key) => {
                    at += 4;
                    Some(key)
                }
                None => return (0, Ok(Decoded::NeedMore)),
            }
        } else {
            None
        };

        let kind = match opcode {
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                return self.control_frame(input, opcode, at, len, mask);
            }
            OpCode::Text => Some(DataKind::Text),
            OpCode::Binary => Some(DataKind::Binary),
            OpCode::Continuation => None,
        };

        if len > self.limits.max_frame_bytes {
            return self.fail(ProtocolError::too_big("frame exceeds the frame size limit"));
        }
        let message_bytes = match kind {
            Some(_) => Some(len),
            None => self.message_bytes.checked_add(len),
        };
        match message_bytes {
            Some(total) if total <= self.limits.max_message_bytes => self.message_bytes = total,
            _ => {
                return self.fail(ProtocolError::too_big("message exceeds the message size limit"));
            }
        }
        if let Some(kind) = kind {
            self.message = Some(kind);
            self.message_start_pending = true;
            self.utf8.reset();
        }
        self.frame_fin = fin;
        self.frame_remaining = len;
        self.mask = mask.unwrap_or_default();
        self.mask_offset = 0;
        self.data_piece(input, at)
    }

    /// Returns a complete control frame whose payload starts at `at`, or
    /// `NeedMore` (consuming nothing) until all of it is in `input`.
    fn control_frame(
        &mut self,
        input: &mut [u8],
        opcode: OpCode,
        at: usize,
        len: u64,
        mask: Option<[u8; 4]>,
    ) -> (usize, Result<Decoded, ProtocolError>) {
        // Lossless: the header checks limited control payloads to 125.
        let end = at + len as usize;
        let Some(payload) = input.get_mut(at..end) else {
            return (0, Ok(Decoded::NeedMore));
        };
        if let Some(key) = mask {
            apply_mask(payload, key, 0);
        }
        let decoded = match opcode {
            OpCode::Ping => Decoded::Ping { payload: at..end },
            OpCode::Pong => Decoded::Pong { payload: at..end },
            _ => match parse_close_payload(payload) {
                Ok(None) => Decoded::Close { code: None, reason: end..end },
                Ok(Some((code, _))) => Decoded::Close { code: Some(code), reason: at + 2..end },
                Err(e) => return self.fail(e),
            },
        };
        (end, Ok(decoded))
    }

    /// Hands out the payload bytes of the current data frame that are in
    /// `input` from `start` on. `start` is where the payload begins (after a
    /// header parsed in this same call) and counts as consumed.
    fn data_piece(&mut self, input: &mut [u8], start: usize) -> (usize, Result<Decoded, ProtocolError>) {
        let available = input.len().saturating_sub(start);
        let n = usize::try_from(self.frame_remaining).map_or(available, |r| r.min(available));
        if n == 0 && self.frame_remaining > 0 {
            return (start, Ok(Decoded::NeedMore));
        }
        let Some(piece) = input.get_mut(start..start + n) else {
            return (start, Ok(Decoded::NeedMore));
        };
        let Some(kind) = self.message else {
            // Unreachable by construction: a data frame is only being read
            // inside a message. Failing beats panicking or guessing.
            return self.fail(ProtocolError::protocol("payload outside a message"));
        };
        if self.role == Role::Server {
            apply_mask(piece, self.mask, usize::from(self.mask_offset));
        }
        // Lossless: the value is below 4.
        self.mask_offset = ((usize::from(self.mask_offset) + n) % 4) as u8;
        // Lossless: n <= frame_remaining.
        self.frame_remaining -= n as u64;
        let message_end = self.frame_remaining == 0 && self.frame_fin;
        if kind == DataKind::Text {
            if self.utf8.feed(piece).is_err() {
                return self.fail(ProtocolError::invalid_payload("text message is not valid UTF-8"));
            }
            if message_end && self.utf8.finish().is_err() {
                return self
                    .fail(ProtocolError::invalid_payload("text message ends inside a UTF-8 character"));
            }
        }
        let message_start = std::mem::take(&mut self.message_start_pending);
        if message_end {
            self.message = None;
            self.message_bytes = 0;
        }
        (start + n, Ok(Decoded::Data { payload: start..start + n, kind, message_start, message_end }))
    }

    fn fail(&mut self, error: ProtocolError) -> (usize, Result<Decoded, ProtocolError>) {
        debug_assert_ne!(error.code, 0);
        self.poison_code = error.code;
        self.poison_reason = error.reason;
        (0, Err(error))
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{ControlFrame, MAX_HEADER_BYTES, encode_header};
    use super::*;

    const UNLIMITED: Limits = Limits { max_frame_bytes: u64::MAX, max_message_bytes: u64::MAX };

    // ---- building wire bytes ------------------------------------------

    /// A frame with an explicit first byte (so tests can set reserved bits
    /// and opcodes), masked with `key` if given.
    fn raw_frame(b0: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut header = [0u8; MAX_HEADER_BYTES];
        let n = encode_header(&mut header, true, OpCode::Text, payload.len() as u64, key);
        header[0] = b0;
        let mut out = header[..n].to_vec();
        let start = out.len();
        out.extend_from_slice(payload);
        if let Some(key) = key {
            apply_mask(&mut out[start..], key, 0);
        }
        out
    }

    fn b0(fin: bool, op: OpCode) -> u8 {
        (u8::from(fin) << 7) | op as u8
    }

    /// A masked (client-to-server) frame.
    fn cframe(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        raw_frame(b0(fin, op), payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    /// A frame whose header is given byte by byte, then the payload as is.
    fn with_header(header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut v = header.to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    // ---- driving the decoder as a caller would ------------------------

    /// What a caller sees, at message level.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Event {
        Message(DataKind, Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
        Error(ProtocolError),
    }

    struct Driven {
        events: Vec<Event>,
        /// Every `Decoded` in order, for tests about pieces.
        raw: Vec<Decoded>,
        /// Bytes still held by the caller at the end.
        leftover: usize,
    }

    /// Feeds `wire` in reads whose sizes `next_read` picks, through a read
    /// buffer of at most `capacity` bytes, keeping unconsumed bytes the way
    /// a connection does, and reassembles messages from the pieces.
    fn drive_with(
        decoder: &mut Decoder,
        wire: &[u8],
        capacity: usize,
        mut next_read: impl FnMut() -> usize,
    ) -> Driven {
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut events = Vec::new();
        let mut raw = Vec::new();
        let mut message: Option<(DataKind, Vec<u8>)> = None;
        let mut stalls = 0;
        loop {
            // Decode everything decodable in the buffer.
            loop {
                let (consumed, result) = decoder.decode(&mut buf);
                assert!(consumed <= buf.len());
                match result {
                    Err(e) => {
                        assert_eq!(consumed, 0);
                        events.push(Event::Error(e));
                        return Driven { events, raw, leftover: buf.len() };
                    }
                    Ok(decoded) => {
                        raw.push(decoded.clone());
                        match decoded {
                            Decoded::NeedMore => {
                                buf.drain(..consumed);
                                assert!(buf.len() < MIN_BUFFER_BYTES, "{} bytes left", buf.len());
                                break;
                            }
                            Decoded::Data { payload, kind, message_start, message_end } => {
                                assert!(payload.end <= consumed);
                                assert_eq!(message_start, message.is_none());
                                let (k, data) = message.get_or_insert_with(|| (kind, Vec::new()));
                                assert_eq!(*k, kind);
                                data.extend_from_slice(&buf[payload]);
                                if message_end {
                                    let (k, data) = message.take().unwrap();
                                    if k == DataKind::Text {
                                        assert!(std::str::from_utf8(&data).is_ok());
                                    }
                                    events.push(Event::Message(k, data));
                                }
                            }
                            Decoded::Ping { payload } => events.push(Event::Ping(buf[payload].to_vec())),
                            Decoded::Pong { payload } => events.push(Event::Pong(buf[payload].to_vec())),
                            Decoded::Close { code, reason } => events.push(Event::Close(
                                code,
                                std::str::from_utf8(&buf[reason]).unwrap().to_owned(),
                            )),
                        }
                        assert!(consumed > 0 || matches!(raw.last(), Some(Decoded::NeedMore)));
                        buf.drain(..consumed);
                    }
                }
            }
            if fed == wire.len() {
                return Driven { events, raw, leftover: buf.len() };
            }
            let room = capacity - buf.len();
            assert!(room > 0, "decoder stalled with a full buffer of {capacity}");
            let n = next_read().clamp(1, room).min(wire.len() - fed);
            buf.extend_from_slice(&wire[fed..fed + n]);
            fed += n;
            stalls += 1;
            assert!(stalls < 10_000_000);
        }
    }

    fn drive(role: Role, limits: Limits, wire: &[u8], read: usize) -> Driven {
        let mut d = Decoder::new(role, limits);
        drive_with(&mut d, wire, usize::MAX, || read)
    }

    fn events_all_at_once(role: Role, limits: Limits, wire: &[u8]) -> Vec<Event> {
        drive(role, limits, wire, usize::MAX).events
    }

    /// Decodes `wire` all at once, one byte at a time, and with a minimal
    /// buffer, checks all three agree, and returns the events.
    fn events(role: Role, limits: Limits, wire: &[u8]) -> Vec<Event> {
        let whole = events_all_at_once(role, limits, wire);
        let bytewise = drive(role, limits, wire, 1).events;
        assert_eq!(whole, bytewise, "all at once vs byte at a time");
        let mut d = Decoder::new(role, limits);
        let mut flip = false;
        let tight = drive_with(&mut d, wire, MIN_BUFFER_BYTES, || {
            flip = !flip;
            if flip { 7 } else { 200 }
        })
        .events;
        assert_eq!(whole, tight, "all at once vs minimal buffer");
        whole
    }

    fn server(wire: &[u8]) -> Vec<Event> {
        events(Role::Server, UNLIMITED, wire)
    }

    fn error_of(wire: &[u8]) -> ProtocolError {
        match server(wire).last() {
            Some(Event::Error(e)) => *e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn text(s: &str) -> Event {
        Event::Message(DataKind::Text, s.as_bytes().to_vec())
    }

    fn binary(b: &[u8]) -> Event {
        Event::Message(DataKind::Binary, b.to_vec())
    }

    fn concat(frames: &[Vec<u8>]) -> Vec<u8> {
        frames.concat()
    }

    // ---- the basics ------------------------------------------------------

    #[test]
    fn decoder_is_small() {
        let size = std::mem::size_of::<Decoder>();
        println!("size_of::<Decoder>() = {size}");
        assert!(size <= 64, "Decoder is {size} bytes");
    }

    #[test]
    fn rfc_examples_decode() {
        // RFC 6455 §5.7: a single-frame masked text message.
        let masked_hello = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(server(&masked_hello), [text("Hello")]);

        // Unmasked frames, as a client receives them.
        let client = |w: &[u8]| events(Role::Client, UNLIMITED, w);
        assert_eq!(client(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]), [text("Hello")]);
        // A fragmented unmasked text message.
        assert_eq!(client(&[0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]), [text("Hello")]);
        // Unmasked ping, masked pong.
        assert_eq!(client(&[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]), [Event::Ping(b"Hello".to_vec())]);
        assert_eq!(
            server(&[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]),
            [Event::Pong(b"Hello".to_vec())]
        );
        // 256 bytes and 64 KiB binary messages in a single unmasked frame.
        let mut w = vec![0x82, 0x7e, 0x01, 0x00];
        w.extend(std::iter::repeat_n(0xaa, 256));
        assert_eq!(client(&w), [binary(&[0xaa; 256])]);
        let mut w = vec![0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0];
        w.extend(std::iter::repeat_n(0x55, 65536));
        assert_eq!(events_all_at_once(Role::Client, UNLIMITED, &w), [binary(&[0x55; 65536])]);
    }

    #[test]
    fn every_length_encoding_decodes() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let wire = cframe(true, OpCode::Binary, &payload);
            let got = events_all_at_once(Role::Server, UNLIMITED, &wire);
            assert_eq!(got, [binary(&payload)], "length {len}");
        }
    }

    #[test]
    fn non_minimal_length_encodings_are_accepted() {
        let key = [1, 2, 3, 4];
        let mut payload = *b"abc";
        apply_mask(&mut payload, key, 0);
        let w16 = with_header(&[0x82, 0x80 | 126, 0, 3, 1, 2, 3, 4], &payload);
        assert_eq!(server(&w16), [binary(b"abc")]);
        let w64 = with_header(&[0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4], &payload);
        assert_eq!(server(&w64), [binary(b"abc")]);
    }

    #[test]
    fn empty_messages_and_empty_final_fragments_signal_the_end() {
        let wire = concat(&[
            cframe(true, OpCode::Text, b""),
            cframe(true, OpCode::Binary, b""),
            cframe(false, OpCode::Text, b"ab"),
            cframe(true, OpCode::Continuation, b""),
            cframe(false, OpCode::Binary, b""),
            cframe(false, OpCode::Continuation, b""),
            cframe(true, OpCode::Continuation, b""),
        ]);
        assert_eq!(server(&wire), [text(""), binary(b""), text("ab"), binary(b"")]);
        // The empty message is one piece that both starts and ends it.
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let mut w = cframe(true, OpCode::Text, b"");
        assert_eq!(
            d.decode(&mut w),
            (
                6,
                Ok(Decoded::Data {
                    payload: 6..6,
                    kind: DataKind::Text,
                    message_start: true,
                    message_end: true,
                })
            )
        );
    }

    #[test]
    fn a_header_without_payload_is_consumed_and_payload_streams_in_pieces() {
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let mut wire = cframe(true, OpCode::Binary, b"0123456789");
        let (header, rest) = wire.split_at_mut(6);
        // Only part of the header: nothing consumed.
        assert_eq!(d.decode(&mut header[..5]), (0, Ok(Decoded::NeedMore)));
        // The whole header: consumed, but nothing to hand out yet.
        assert_eq!(d.decode(header), (6, Ok(Decoded::NeedMore)));
        assert!(d.message_in_progress());
        // Then the payload in three reads.
        let mut out = Vec::new();
        for (i, range) in [0..3, 3..4, 4..10].into_iter().enumerate() {
            let piece = &mut rest[range.clone()];
            let (n, r) = d.decode(piece);
            assert_eq!(n, range.len());
            assert_eq!(
                r,
                Ok(Decoded::Data {
                    payload: 0..range.len(),
                    kind: DataKind::Binary,
                    message_start: i == 0,
                    message_end: i == 2,
                })
            );
            out.extend_from_slice(piece);
        }
        assert_eq!(out, b"0123456789");
        assert!(!d.message_in_progress());
        assert_eq!(d.decode(&mut []), (0, Ok(Decoded::NeedMore)));
    }

    #[test]
    fn a_data_piece_stops_at_the_frame_end() {
        // Two frames in one read: the first call returns only the first.
        let mut wire = concat(&[cframe(true, OpCode::Binary, b"one"), cframe(true, OpCode::Binary, b"two")]);
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let (n, r) = d.decode(&mut wire);
        assert_eq!(n, 9);
        assert_eq!(
            r,
            Ok(Decoded::Data {
                payload: 6..9,
                kind: DataKind::Binary,
                message_start: true,
                message_end: true
            })
        );
        assert_eq!(&wire[6..9], b"one");
        let (n2, r) = d.decode(&mut wire[n..]);
        assert_eq!(n2, 9);
        assert!(matches!(r, Ok(Decoded::Data { payload, .. }) if payload == (6..9)));
        assert_eq!(&wire[n + 6..n + 9], b"two");
    }

    #[test]
    fn a_large_frame_streams_through_a_small_buffer() {
        let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
        let wire = cframe(true, OpCode::Binary, &payload);
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let driven = drive_with(&mut d, &wire, 4096, || 4096);
        assert_eq!(driven.events, [binary(&payload)]);
        let pieces = driven.raw.iter().filter(|r| matches!(r, Decoded::Data { .. })).count();
        assert!(pieces >= 256, "{pieces} pieces");
        assert_eq!(driven.leftover, 0);
    }

    // ---- fragmentation and UTF-8 ----------------------------------------

    #[test]
    fn fragmented_text_with_a_character_split_across_fragments() {
        let text_bytes = "a€b𝄞".as_bytes();
        for cut in 0..=text_bytes.len() {
            let wire = concat(&[
                cframe(false, OpCode::Text, &text_bytes[..cut]),
                cframe(true, OpCode::Continuation, &text_bytes[cut..]),
            ]);
            assert_eq!(server(&wire), [text("a€b𝄞")], "cut at {cut}");
        }
        // Three fragments, every byte of the 4-byte character in its own.
        let wire = concat(&[
            cframe(false, OpCode::Text, &[0xf0]),
            cframe(false, OpCode::Continuation, &[0x9d]),
            cframe(false, OpCode::Continuation, &[0x84]),
            cframe(true, OpCode::Continuation, &[0x9e]),
        ]);
        assert_eq!(server(&wire), [text("𝄞")]);
    }

    #[test]
    fn invalid_utf8_in_the_first_fragment_fails_before_the_rest_arrives() {
        // Autobahn 6.4.1: valid text, then F4 90 80 80 (above U+10FFFF).
        let first =
            cframe(false, OpCode::Text, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80");
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let mut buf = first.clone();
        let (n, r) = d.decode(&mut buf);
        assert_eq!(n, 0);
        assert_eq!(r.unwrap_err().code, close::INVALID_PAYLOAD);

        // The same when the frame itself arrives in pieces: the failure comes
        // with the read holding the 0x90, not at the end of the frame.
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let hopeless_at = 6 + 11 + 1; // header, valid text, then 0xF4
        let mut buf = first[..hopeless_at].to_vec();
        let (n, r) = d.decode(&mut buf);
        assert_eq!(n, hopeless_at);
        assert!(matches!(r, Ok(Decoded::Data { message_end: false, .. })));
        let mut next = first[hopeless_at..hopeless_at + 1].to_vec(); // the 0x90
        assert_eq!(d.decode(&mut next).1.unwrap_err().code, close::INVALID_PAYLOAD);
    }

    #[test]
    fn invalid_utf8_cases_are_1007() {
        for bad in [&b"\xff"[..], b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"caf\xe9!", b"\x80abc"]
        {
            let e = error_of(&cframe(true, OpCode::Text, bad));
            assert_eq!(e.code, close::INVALID_PAYLOAD, "{bad:x?}");
            assert_eq!(e.reason, "text message is not valid UTF-8");
        }
        // Valid so far, but the message ends mid-character.
        let e = error_of(&cframe(true, OpCode::Text, b"ok\xe2\x82"));
        assert_eq!(e.code, close::INVALID_PAYLOAD);
        assert_eq!(e.reason, "text message ends inside a UTF-8 character");
        let e = error_of(&concat(&[
            cframe(false, OpCode::Text, b"ok\xe2"),
            cframe(true, OpCode::Continuation, b""),
        ]));
        assert_eq!(e.code, close::INVALID_PAYLOAD);
        // Binary messages are not checked.
        assert_eq!(server(&cframe(true, OpCode::Binary, b"\xff\xfe")), [binary(b"\xff\xfe")]);
    }

    #[test]
    fn control_frames_may_interleave_with_fragments() {
        let wire = concat(&[
            cframe(false, OpCode::Text, "客".as_bytes().split_at(1).0),
            cframe(true, OpCode::Ping, b"p1"),
            cframe(false, OpCode::Continuation, "客".as_bytes().split_at(1).1),
            cframe(true, OpCode::Pong, b""),
            cframe(false, OpCode::Continuation, b" and "),
            cframe(true, OpCode::Ping, &[7; 125]),
            cframe(true, OpCode::Continuation, "服".as_bytes()),
            cframe(true, OpCode::Binary, b"bin"),
            cframe(true, OpCode::Close, &close_payload(1000, b"done")),
        ]);
        assert_eq!(
            server(&wire),
            [
                Event::Ping(b"p1".to_vec()),
                Event::Pong(vec![]),
                Event::Ping(vec![7; 125]),
                text("客 and 服"),
                binary(b"bin"),
                Event::Close(Some(1000), "done".into()),
            ]
        );
    }

    #[test]
    fn a_control_frame_is_returned_only_when_complete() {
        let mut wire = cframe(true, OpCode::Ping, &[1; 100]);
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        for end in 0..wire.len() {
            assert_eq!(d.decode(&mut wire[..end]), (0, Ok(Decoded::NeedMore)), "{end}");
        }
        // Nothing was unmasked while incomplete, so the bytes are intact.
        assert_eq!(wire, cframe(true, OpCode::Ping, &[1; 100]));
        assert_eq!(d.decode(&mut wire), (106, Ok(Decoded::Ping { payload: 6..106 })));
        assert_eq!(&wire[6..], &[1; 100]);
    }

    // ---- protocol errors (1002) -------------------------------------------

    #[test]
    fn reserved_bits_are_1002() {
        for rsv in [0x40, 0x20, 0x10, 0x70] {
            for op in [OpCode::Text, OpCode::Binary, OpCode::Ping, OpCode::Close] {
                let e = error_of(&raw_frame(rsv | b0(true, op), b"x", Some([1, 2, 3, 4])));
                assert_eq!(e.code, close::PROTOCOL_ERROR);
                assert_eq!(e.reason, "reserved bits set without a negotiated extension");
            }
        }
    }

    #[test]
    fn reserved_opcodes_are_1002() {
        for op in [3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
            for fin in [0x80, 0] {
                let e = error_of(&raw_frame(fin | op, b"", Some([1, 2, 3, 4])));
                assert_eq!(e, ProtocolError::new(close::PROTOCOL_ERROR, "reserved opcode"));
            }
        }
    }

    #[test]
    fn fragmented_control_frames_are_1002() {
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let e = error_of(&cframe(false, op, b"x"));
            assert_eq!(e.reason, "fragmented control frame");
            assert_eq!(e.code, close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn control_frames_over_125_bytes_are_1002() {
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let e = error_of(&cframe(true, op, &[b'a'; 126]));
            assert_eq!(e.code, close::PROTOCOL_ERROR);
            assert_eq!(e.reason, "control frame payload over 125 bytes");
            // Refused from the first two bytes, before any of it is read.
            let mut d = Decoder::new(Role::Server, UNLIMITED);
            let mut head = cframe(true, op, &[b'a'; 126])[..2].to_vec();
            assert_eq!(d.decode(&mut head).1.unwrap_err().code, close::PROTOCOL_ERROR);
        }
        // 125 is fine.
        assert_eq!(server(&cframe(true, OpCode::Ping, &[b'a'; 125])), [Event::Ping(vec![b'a'; 125])]);
    }

    #[test]
    fn continuation_without_a_message_is_1002() {
        for fin in [true, false] {
            let e = error_of(&cframe(fin, OpCode::Continuation, b"x"));
            assert_eq!(e.code, close::PROTOCOL_ERROR);
            assert_eq!(e.reason, "continuation frame without a message in progress");
        }
        // Also right after a message ended.
        let e = error_of(&concat(&[
            cframe(false, OpCode::Binary, b"a"),
            cframe(true, OpCode::Continuation, b"b"),
            cframe(true, OpCode::Continuation, b"c"),
        ]));
        assert_eq!(e.code, close::PROTOCOL_ERROR);
        assert_eq!(server(&cframe(true, OpCode::Binary, b"")), [binary(b"")]);
    }

    #[test]
    fn a_new_message_inside_a_fragmented_one_is_1002() {
        for first in [OpCode::Text, OpCode::Binary] {
            for second in [OpCode::Text, OpCode::Binary] {
                for fin in [true, false] {
                    let events = server(&concat(&[cframe(false, first, b"a"), cframe(fin, second, b"b")]));
                    assert_eq!(
                        events,
                        [Event::Error(ProtocolError::new(
                            close::PROTOCOL_ERROR,
                            "new message before the fragmented one ended"
                        ))]
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_masking_for_the_role_is_1002() {
        let unmasked = raw_frame(b0(true, OpCode::Text), b"hi", None);
        let e = error_of(&unmasked);
        assert_eq!(e, ProtocolError::new(close::PROTOCOL_ERROR, "client frame is not masked"));
        let masked = cframe(true, OpCode::Text, b"hi");
        let got = events(Role::Client, UNLIMITED, &masked);
        assert_eq!(got, [Event::Error(ProtocolError::new(close::PROTOCOL_ERROR, "server frame is masked"))]);
        assert_eq!(events(Role::Client, UNLIMITED, &unmasked), [text("hi")]);
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_set_is_1002() {
        let header = [0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
        let e = error_of(&header);
        assert_eq!(e.code, close::PROTOCOL_ERROR);
        assert_eq!(e.reason, "64-bit payload length with the most significant bit set");
        // Even with the smallest limits, the protocol error wins over 1009.
        let tiny = Limits { max_frame_bytes: 1, max_message_bytes: 1 };
        let got = events(Role::Server, tiny, &header);
        assert!(matches!(got[..], [Event::Error(e)] if e.code == close::PROTOCOL_ERROR));
    }

    // ---- limits (1009) ----------------------------------------------------

    #[test]
    fn frame_size_limit_is_1009_at_the_header() {
        let limits = Limits { max_frame_bytes: 100, max_message_bytes: 1000 };
        // Exactly the limit passes.
        let ok = cframe(true, OpCode::Binary, &[0; 100]);
        assert_eq!(events(Role::Server, limits, &ok), [binary(&[0; 100])]);
        // One more fails, from the header alone.
        let over = cframe(true, OpCode::Binary, &[0; 101]);
        let mut d = Decoder::new(Role::Server, limits);
        let mut header = over[..8].to_vec();
        let (n, r) = d.decode(&mut header);
        assert_eq!(n, 0);
        assert_eq!(r, Err(ProtocolError::new(close::TOO_BIG, "frame exceeds the frame size limit")));
        // A declared 2^40-byte frame is refused without waiting for it.
        let mut huge = vec![0x82, 0x80 | 127, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        let mut d = Decoder::new(Role::Server, limits);
        assert_eq!(d.decode(&mut huge).1.unwrap_err().code, close::TOO_BIG);
        // Control frames are bounded by the protocol, not the limit.
        let tiny = Limits { max_frame_bytes: 0, max_message_bytes: 0 };
        let ping = cframe(true, OpCode::Ping, &[1; 125]);
        assert_eq!(events(Role::Server, tiny, &ping), [Event::Ping(vec![1; 125])]);
        let empty = cframe(true, OpCode::Text, b"");
        assert_eq!(events(Role::Server, tiny, &empty), [text("")]);
    }

    #[test]
    fn message_size_limit_is_1009_at_the_offending_fragment_header() {
        let limits = Limits { max_frame_bytes: 100, max_message_bytes: 150 };
        let ok = concat(&[
            cframe(false, OpCode::Text, &[b'a'; 100]),
            cframe(true, OpCode::Continuation, &[b'b'; 50]),
            // The count starts over with the next message.
            cframe(false, OpCode::Binary, &[1; 100]),
            cframe(true, OpCode::Continuation, &[2; 50]),
        ]);
        let mut expected = vec![b'a'; 100];
        expected.extend_from_slice(&[b'b'; 50]);
        let mut expected_bin = vec![1; 100];
        expected_bin.extend_from_slice(&[2; 50]);
        assert_eq!(
            events(Role::Server, limits, &ok),
            [Event::Message(DataKind::Text, expected), Event::Message(DataKind::Binary, expected_bin)]
        );

        let first = cframe(false, OpCode::Text, &[b'a'; 100]);
        let second = cframe(false, OpCode::Continuation, &[b'b'; 50]);
        let third = cframe(true, OpCode::Continuation, &[b'c'; 1]);
        let wire = concat(&[first.clone(), second.clone(), third.clone()]);
        let e = match events(Role::Server, limits, &wire).last() {
            Some(Event::Error(e)) => *e,
            other => panic!("{other:?}"),
        };
        assert_eq!(e, ProtocolError::new(close::TOO_BIG, "message exceeds the message size limit"));
        // Found at the third frame's header, before its payload.
        let mut d = Decoder::new(Role::Server, limits);
        let prefix_len = first.len() + second.len() + 6;
        let driven = drive_with(&mut d, &wire[..prefix_len], usize::MAX, || usize::MAX);
        assert!(matches!(driven.events.last(), Some(Event::Error(e)) if e.code == close::TOO_BIG));
    }

    #[test]
    fn the_message_limit_sums_fragments_up_to_the_largest_lengths() {
        let limits = Limits { max_frame_bytes: u64::MAX, max_message_bytes: u64::MAX };
        let mut d = Decoder::new(Role::Client, limits);
        let max = (1u64 << 63) - 1;
        let mut h = [0u8; MAX_HEADER_BYTES];
        let n = encode_header(&mut h, false, OpCode::Binary, max, None);
        assert_eq!(d.decode(&mut h[..n]), (n, Ok(Decoded::NeedMore)));
        // Feed nothing more of that frame; a fresh decoder checks the sum.
        let mut d = Decoder::new(Role::Client, Limits { max_frame_bytes: u64::MAX, max_message_bytes: max });
        let mut wire = vec![0x02, 0x01, 0xaa];
        let n2 = encode_header(&mut h, true, OpCode::Continuation, max, None);
        wire.extend_from_slice(&h[..n2]);
        let (n, r) = d.decode(&mut wire);
        assert!(matches!(r, Ok(Decoded::Data { .. })));
        let (_, r) = d.decode(&mut wire[n..]);
        assert_eq!(r.unwrap_err().code, close::TOO_BIG);
    }

    // ---- close frames -----------------------------------------------------

    #[test]
    fn close_frames_are_validated() {
        assert_eq!(server(&cframe(true, OpCode::Close, b"")), [Event::Close(None, String::new())]);
        assert_eq!(
            server(&cframe(true, OpCode::Close, &close_payload(1001, b""))),
            [Event::Close(Some(1001), String::new())]
        );
        assert_eq!(
            server(&cframe(true, OpCode::Close, &close_payload(4002, "再见".as_bytes()))),
            [Event::Close(Some(4002), "再见".into())]
        );
        let max_reason = "r".repeat(123);
        assert_eq!(
            server(&cframe(true, OpCode::Close, &close_payload(1000, max_reason.as_bytes()))),
            [Event::Close(Some(1000), max_reason)]
        );
        // One byte: no room for a code.
        assert_eq!(error_of(&cframe(true, OpCode::Close, &[3])).code, close::PROTOCOL_ERROR);
        // Codes no peer may send.
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let e = error_of(&cframe(true, OpCode::Close, &close_payload(code, b"")));
            assert_eq!(e.code, close::PROTOCOL_ERROR, "{code}");
        }
        // A reason that is not UTF-8.
        let e = error_of(&cframe(true, OpCode::Close, &close_payload(1000, b"\xce\xba\xed\xa0\x80")));
        assert_eq!(e.code, close::INVALID_PAYLOAD);
    }

    #[test]
    fn close_reason_range_indexes_input() {
        let mut wire = cframe(true, OpCode::Close, &close_payload(1000, b"bye"));
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let (n, r) = d.decode(&mut wire);
        assert_eq!(n, wire.len());
        let Ok(Decoded::Close { code, reason }) = r else { panic!("{r:?}") };
        assert_eq!(code, Some(1000));
        assert_eq!(&wire[reason], b"bye");
        // The gateway's own close frames round-trip through a client decoder.
        let frame = ControlFrame::close(4001, "slow consumer");
        assert_eq!(
            events(Role::Client, UNLIMITED, frame.as_bytes()),
            [Event::Close(Some(4001), "slow consumer".into())]
        );
    }

    // ---- poisoning ------------------------------------------------------------

    #[test]
    fn frame_remaining_counts_down_over_chunks() {
        let mut wire = cframe(true, OpCode::Binary, &[7u8; 300]);
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        // Header plus the first 100 payload bytes.
        let (used, r) = d.decode(&mut wire[..108]);
        assert!(matches!(r, Ok(Decoded::Data { ref payload, .. }) if payload.len() == 100), "{r:?}");
        assert_eq!(d.frame_remaining(), 200);
        let (_, r) = d.decode(&mut wire[used..]);
        assert!(matches!(r, Ok(Decoded::Data { message_end: true, .. })), "{r:?}");
        assert_eq!(d.frame_remaining(), 0);
    }

    #[test]
    fn after_an_error_the_decoder_stays_failed() {
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let mut bad = raw_frame(0xc1, b"x", Some([1, 2, 3, 4]));
        let (_, first) = d.decode(&mut bad);
        let first = first.unwrap_err();
        assert!(d.is_failed());
        let mut good = cframe(true, OpCode::Text, b"fine");
        for input in [&mut good[..], &mut [][..]] {
            assert_eq!(d.decode(input), (0, Err(first)));
        }
        assert_eq!(first.to_string(), "reserved bits set without a negotiated extension (close code 1002)");

        // Also for errors found mid-frame.
        let mut d = Decoder::new(Role::Server, UNLIMITED);
        let mut w = cframe(true, OpCode::Text, b"\xff");
        assert_eq!(d.decode(&mut w).1.unwrap_err().code, close::INVALID_PAYLOAD);
        let mut good = cframe(true, OpCode::Text, b"fine");
        assert_eq!(d.decode(&mut good).1.unwrap_err().code, close::INVALID_PAYLOAD);
    }

    // ---- whole conversations, any split -------------------------------------

    #[test]
    fn a_conversation_decodes_the_same_whatever_the_reads() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 7) as u8).collect();
        let wire = concat(&[
            cframe(true, OpCode::Text, "hello 客服".as_bytes()),
            cframe(true, OpCode::Ping, b""),
            cframe(false, OpCode::Binary, &big[..300]),
            cframe(true, OpCode::Pong, b"pong"),
            cframe(false, OpCode::Continuation, &big[300..1000]),
            cframe(true, OpCode::Continuation, &big[1000..]),
            cframe(true, OpCode::Text, b""),
            cframe(false, OpCode::Text, "emoji 🎧".as_bytes().split_at(8).0),
            cframe(true, OpCode::Continuation, "emoji 🎧".as_bytes().split_at(8).1),
            cframe(true, OpCode::Close, &close_payload(1000, b"bye")),
        ]);
        let expected = vec![
            text("hello 客服"),
            Event::Ping(vec![]),
            Event::Pong(b"pong".to_vec()),
            binary(&big),
            text(""),
            text("emoji 🎧"),
            Event::Close(Some(1000), "bye".into()),
        ];
        assert_eq!(server(&wire), expected);
        for read in [2, 3, 5, 13, 64, 127, 1000, 4096] {
            assert_eq!(drive(Role::Server, UNLIMITED, &wire, read).events, expected, "{read}");
        }
    }

    // ---- property tests ------------------------------------------------------

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn random_text(rng: &mut Rng, chars: usize) -> String {
        const ALPHABET: [char; 8] = ['a', 'Z', ' ', 'é', '客', '服', '🎧', '\u{10ffff}'];
        (0..chars).map(|_| ALPHABET[rng.below(ALPHABET.len())]).collect()
    }

    fn random_control(rng: &mut Rng, key: Option<[u8; 4]>, expected: &mut Vec<Event>) -> Vec<u8> {
        let len = rng.below(126);
        let payload = rng.bytes(len);
        if rng.below(2) == 0 {
            expected.push(Event::Ping(payload.clone()));
            raw_frame(b0(true, OpCode::Ping), &payload, key)
        } else {
            expected.push(Event::Pong(payload.clone()));
            raw_frame(b0(true, OpCode::Pong), &payload, key)
        }
    }

    #[test]
    fn random_conversations_reassemble_for_any_masks_and_reads() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let role = if rng.below(4) == 0 { Role::Client } else { Role::Server };
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..rng.below(8) + 1 {
                let key = match role {
                    Role::Server => Some((rng.next() as u32).to_ne_bytes()),
                    Role::Client => None,
                };
                if rng.below(4) == 0 {
                    wire.extend(random_control(&mut rng, key, &mut expected));
                    continue;
                }
                let (kind, data) = if rng.below(2) == 0 {
                    let n = rng.below(200);
                    (DataKind::Text, random_text(&mut rng, n).into_bytes())
                } else {
                    let n = if rng.below(10) == 0 { rng.below(100_000) } else { rng.below(300) };
                    (DataKind::Binary, rng.bytes(n))
                };
                // Split into 1 to 4 fragments at random byte positions (even
                // inside a character), with control frames between them.
                let mut cuts: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(data.len() + 1)).collect();
                cuts.sort_unstable();
                cuts.push(data.len());
                let mut controls = Vec::new();
                let mut at = 0;
                for (i, &cut) in cuts.iter().enumerate() {
                    let op = match (i, kind) {
                        (0, DataKind::Text) => OpCode::Text,
                        (0, DataKind::Binary) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    let fin = i + 1 == cuts.len();
                    let key = match role {
                        Role::Server => Some((rng.next() as u32).to_ne_bytes()),
                        Role::Client => None,
                    };
                    wire.extend(raw_frame(b0(fin, op), &data[at..cut], key));
                    at = cut;
                    if !fin && rng.below(3) == 0 {
                        wire.extend(random_control(&mut rng, key, &mut controls));
                    }
                }
                expected.extend(controls);
                expected.push(Event::Message(kind, data));
            }
            let close_key = match role {
                Role::Server => Some((rng.next() as u32).to_ne_bytes()),
                Role::Client => None,
            };
            wire.extend(raw_frame(b0(true, OpCode::Close), &close_payload(1000, b"end"), close_key));
            expected.push(Event::Close(Some(1000), "end".into()));

            let capacity = if rng.below(2) == 0 { MIN_BUFFER_BYTES + rng.below(200) } else { usize::MAX };
            let max_read = [1, 2, 7, 64, 1500, 65536][rng.below(6)];
            let mut d = Decoder::new(role, UNLIMITED);
            let mut read_rng = Rng(rng.next() | 1);
            let driven = drive_with(&mut d, &wire, capacity, || read_rng.below(max_read) + 1);
            assert_eq!(driven.events, expected, "round {round}");
            assert_eq!(driven.leftover, 0, "round {round}");
            assert!(!d.message_in_progress());
        }
    }

    #[test]
    fn random_bytes_never_panic_and_decode_the_same_in_any_split() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let limits = Limits { max_frame_bytes: 1 << 16, max_message_bytes: 1 << 17 };
        for round in 0..2000 {
            // Mostly plausible headers, so the decoder gets past the first
            // checks often.
            let mut wire = Vec::new();
            for _ in 0..rng.below(6) + 1 {
                let len = rng.below(40) + 2;
                let mut frame = rng.bytes(len);
                if rng.below(2) == 0 {
                    frame[0] &= 0x8f;
                    frame[1] |= 0x80;
                    frame[1] &= 0xfd;
                }
                wire.extend(frame);
            }
            for role in [Role::Server, Role::Client] {
                let whole = drive(role, limits, &wire, usize::MAX).events;
                let bytewise = drive(role, limits, &wire, 1).events;
                assert_eq!(whole, bytewise, "round {round} {role:?} {wire:x?}");
                let mut d = Decoder::new(role, limits);
                let mut read_rng = Rng(rng.next() | 1);
                let chunked = drive_with(&mut d, &wire, MIN_BUFFER_BYTES, || read_rng.below(20) + 1);
                assert_eq!(whole, chunked.events, "round {round} {role:?}");
            }
        }
    }
}
