//! Wire formats shared by every part of kefu: the client protocol (JSON and
//! FlatBuffers), the gRPC contract, and the ids and error codes they share.
//!
//! The client protocol types arrive with the durable chat core; this crate
//! is the place every other crate imports them from, so dependencies keep
//! pointing one way (`gateway -> core, storage -> proto`).

pub mod ids;

pub use ids::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};
