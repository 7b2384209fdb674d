//! The chat service: what `/ws` speaks, end to end, spread over the shards
//! as DESIGN.md lays out.
//!
//! Every shard runs a [`service::ChatService`] with up to three parts:
//!
//! - **edge** ([`edge`]): the sessions of the connections this shard
//!   accepted — identity, rate limits, the `connect` handshake — so a
//!   command is checked where it arrived and costs no other shard anything
//!   if it is refused;
//! - **home** ([`home`]): the conversations whose home this shard is
//!   (`ConvId::home(shards)`): it assigns `seq`, submits to storage from its
//!   own completion queue, acks, and fans one encoded frame out to every
//!   participant;
//! - **router** ([`router`], shard 0 only): who serves what — online agents,
//!   their load, the queues — because assignment needs every agent and
//!   every waiting visitor at once. Its decisions (rare next to messages)
//!   go to each conversation's home, which makes them durable and
//!   announces them.
//!
//! Every shard also keeps a replica of the user directory (`directory.rs`:
//! (role, id) → sessions with their subprotocol), fed by `SessionUp` /
//! `SessionDown` broadcasts from the edges, so a home reaches any
//! participant without asking.
//!
//! A shard never posts to its own inbox. Its connections call its service
//! directly ([`service::ChatService::frame`]), and a message the service
//! addresses to its own shard is queued in memory and handled as soon as
//! the current input is done (`settle`), before anything else: the same
//! order as its own FIFO inbox would give, without the round trip.
//! `kefu_mailbox_posts_total{from,to}` counts posts, and `from == to`
//! stays 0.
//!
//! Ordering rests on one property of the mailboxes: a shard's inbox is one
//! FIFO queue, so two messages one sender puts into it arrive in that order,
//! and a message put in after another shard *handled* something arrives
//! after everything that was in the inbox before. A shard that finds an
//! inbox full holds back everything it posts after that, to every shard
//! (`ChatService::post`), so backlogs keep this causal order too. Hence:
//! - an edge broadcasts `SessionUp` before it forwards any command of that
//!   session and before it asks the router for the session's
//!   conversations, so no home hears about a session's conversation, and
//!   no announcement decided after that snapshot misses it;
//! - between `SessionUp` and `connected` the edge holds the session's
//!   frames, then writes `connected` and the held frames in order, so a
//!   client never sees traffic before `connected`;
//! - a resuming session's missed messages are replayed by each home while
//!   it registers the session, so they come before any live message of
//!   that conversation;
//! - while a session's routing command is with the router, its commands
//!   for homes go through the router too (`Relay`), so they reach the home
//!   after the router's decision, as the client sent them.
//!
//! What a full inbox refuses waits in the sender's one backlog, with
//! everything the sender posts after it (to any shard), and is retried in
//! order. The backlog is bounded (`server.backlog_messages_max`); past it
//! nothing disappears unaccounted: a command is answered `unavailable`, a
//! frame closes its connection with 4001 after the frames before it (the
//! client resumes from its last seq), a queue-position update is skipped
//! (the next change carries the position again), and the messages that keep
//! the shards' state in step (sessions, decisions, closes: a few per
//! connection or routing command, not per message) are kept. Each case is
//! counted in `/metrics`.

pub use kefu_core::chat::directory;
pub use kefu_core::chat::{Change, ChatMsg, ROUTER_SHARD, Reply, RouteInfo, SessionAddr, device_of};

pub mod edge;
pub mod frames;
pub mod home;
pub mod router;
pub mod service;
#[cfg(test)]
mod shards_tests;

use kefu_core::identity::Actor;
use kefu_core::session::HomeRequest;

use frames::SharedFrame;

/// What shards send each other through their mailboxes (and what a shard's
/// chat service queues for itself, handled right after the current input:
/// never through its own inbox).
#[derive(Debug)]
pub enum ShardMsg {
    /// Any shard → a connection's shard: write this complete WebSocket frame.
    Deliver {
        /// The connection.
        to: SessionAddr,
        /// Header and payload, shared by every recipient.
        bytes: SharedFrame,
        /// String buffers for the shard's decoder: those of the message
        /// this frame acks, which that decoder filled.
        spare: [Option<String>; 2],
    },
    /// Any shard → a connection's shard: close it (after what is queued).
    Close {
        /// The connection.
        to: SessionAddr,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
    /// Edge → a conversation's home: a checked command about it. Not boxed:
    /// this is the message path, and it must not allocate.
    Home {
        /// Who gets the answer.
        reply: Reply,
        /// Who sent it.
        actor: Actor,
        /// What they asked.
        request: HomeRequest,
    },
    /// Everything else between chat services (connects, routing): rare,
    /// so boxed to keep every mailbox slot small.
    Chat(Box<ChatMsg>),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every inbox slot is as big as the largest message (65,536 slots per
    /// shard by default), so the message path's variant is kept lean and
    /// the rare ones are boxed.
    #[test]
    fn shard_messages_stay_small() {
        let size = std::mem::size_of::<ShardMsg>();
        eprintln!("ShardMsg: {size} B; HomeRequest: {} B", std::mem::size_of::<HomeRequest>());
        assert!(size <= 256, "ShardMsg grew to {size} B");
    }
}
