//! The sans-IO heart of kefu: protocol state machines, conversations,
//! routing, presence and rules. Nothing here owns a socket, a thread, a
//! runtime or a clock; callers feed events and the current time in and get
//! actions back, so every product rule is a unit test that runs in
//! microseconds.
//!
//! Where each piece of state lives (docs/chat-core-plan.md):
//!
//! | file | state | owner |
//! | --- | --- | --- |
//! | [`session`] | one connection: identity, rate limiter | the shard that accepted it |
//! | [`conversation`] | one conversation: `seq`, recent cids, read marks, typing | its home shard |
//! | [`routing`] | agents, queues, assignments | the single router (shard 0) |
//! | [`presence`] | one agent's devices and status | inside the router |
//! | [`chat::directory`] | (role, id) → sessions | a replica on every shard |
//! | [`chat::router`] | the router's inputs and outputs around [`routing`] | shard 0 |
//!
//! The rest are values: [`auth`] checks credentials, [`identity`] is what
//! they prove, [`cid`] names a message for idempotency, [`ratelimit`] is the
//! token bucket, [`per_ip`] a bounded table of them by client address (the
//! one piece of state all shards share, behind striped locks), [`resume`] sizes a replay, [`rules`] holds canned and automatic replies, and
//! [`config`] every knob with its default.
//!
//! Time is always an argument (`now_ms`, milliseconds since the epoch) and
//! randomness too (visitor keys and ids are made from bytes the caller
//! drew), so a test can replay any sequence of events exactly.

pub mod auth;
pub mod chat;
pub mod cid;
pub mod config;
pub mod conversation;
pub mod identity;
pub mod per_ip;
pub mod presence;
pub mod ratelimit;
pub mod resume;
pub mod routing;
pub mod rules;
pub mod session;

pub use cid::Cid;
pub use config::CoreConfig;
pub use conversation::Conversation;
pub use identity::{Actor, Identity};
pub use routing::Router;
pub use session::Session;
