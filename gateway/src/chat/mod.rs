//! The chat service's shard loop: what `/ws` speaks, end to end, spread
//! over the shards as DESIGN.md lays out. The rules live in
//! `kefu_core::chat` as sans-IO machines (edge, home, router, directory;
//! see there for who does what and the ordering they rest on); this folder
//! feeds them inputs with the time and carries out their outputs through
//! the mailboxes and the store ([`service::ChatService`]).
//!
//! A shard never posts to its own inbox. Its connections call its service
//! directly ([`service::ChatService::frame`]); a frame or close a machine
//! addresses to one of the shard's own connections is written at once, and
//! any other message to its own shard is queued in memory and handled as
//! soon as the current input is done (`settle`), before anything else: the
//! same order as its own FIFO inbox would give, without the round trip.
//! `kefu_mailbox_posts_total{from,to}` counts posts, and `from == to`
//! stays 0.
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

pub use kefu_core::chat::frames;
pub use kefu_core::chat::{ChatMsg, ROUTER_SHARD, SessionAddr, ShardMsg};

pub mod api;
mod reads;
mod router;
pub mod service;
#[cfg(test)]
mod shards_tests;
