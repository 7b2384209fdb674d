//! The WebSocket protocol (RFC 6455), sans-IO.
//!
//! Nothing in this module owns a socket, a runtime, a thread or a clock. It is
//! a set of pure functions and small state machines that a shard feeds with
//! bytes it has already read, and that hand back what those bytes mean (or
//! the bytes to write). That keeps every rule of the protocol a unit test that
//! runs in microseconds, and keeps the per-connection state a few dozen bytes.
//!
//! The rooms, one per concept:
//!
//! - [`handshake`]: turn a parsed HTTP upgrade request into the `101
//!   Switching Protocols` answer (or the HTTP error that refuses it), and pick
//!   the kefu subprotocol.
//! - [`frame`]: the wire shape of one frame: opcodes, header encoding, the
//!   masking XOR, and ready-to-send control frames.
//! - [`decoder`]: the receiving state machine. It validates every frame a
//!   peer sends (masking, reserved bits, fragmentation, size limits, UTF-8)
//!   and streams data payloads out in chunks so no frame ever has to fit in a
//!   read buffer.
//! - [`close`]: close status codes, which ones a peer may send, and the close
//!   payload format.
//! - [`utf8`]: a UTF-8 validator that works across chunk and fragment
//!   boundaries and fails as soon as the input can no longer be valid.
//!
//! This module depends on nothing else in the gateway, so it can be tested,
//! benchmarked and fuzzed on its own.

pub mod close;
pub mod decoder;
pub mod frame;
pub mod handshake;
pub mod utf8;

pub use decoder::{DataKind, Decoded, Decoder, Limits, ProtocolError, Role};
pub use frame::{ControlFrame, MAX_HEADER_BYTES, OpCode, apply_mask, encode_header};
pub use handshake::{Accept, HandshakeError, Subprotocol};
pub use utf8::Utf8Validator;
