//! Wire formats shared by every part of kefu: the client protocol (JSON and
//! FlatBuffers), the gRPC contract, and the ids and error codes they share.
//!
//! - [`ids`]: the nouns (conversation ids, roles, statuses, error codes);
//! - [`client`]: what clients and the gateway say to each other, as
//!   [`ClientFrame`] / [`ServerFrame`], and the two encodings (`kefu.v1.json`,
//!   `kefu.v1.fb`) behind one [`Codec`];
//! - [`ws`]: server frame headers and kefu's close codes.
//!
//! This crate is the place every other crate imports them from, so
//! dependencies keep pointing one way (`gateway -> core, storage -> proto`).

pub mod client;
mod generated;
pub mod ids;
pub mod ws;

pub use client::{ClientFrame, Codec, Command, DecodeError, Encoder, Event, ServerFrame};
pub use ids::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};
