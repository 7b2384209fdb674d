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

mod directory;
pub mod edge;
pub mod frames;
pub mod home;
pub mod router;
pub mod service;
#[cfg(test)]
mod shards_tests;

use kefu_core::identity::{Actor, AgentRef, GroupName, Identity, UserId, UserKey, Visitor};
use kefu_core::session::{HomeRequest, RouteRequest};
use kefu_proto::client::Codec;
use kefu_proto::{ConvId, ConvStatus};

use frames::SharedFrame;

/// Where a connection lives: its shard, its registry slot there, and the
/// slot's generation (so a message for a connection that has gone never
/// reaches the next connection in the same slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionAddr {
    /// Shard number.
    pub shard: u16,
    /// Registry slot on that shard.
    pub slot: u32,
    /// Generation of the slot.
    pub generation: u32,
}

/// Who a command's answer goes to: the connection, its subprotocol, and
/// the command's `id`.
pub type Reply = (SessionAddr, Codec, Option<i64>);

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

/// A conversation's change, decided by the router, applied by its home.
#[derive(Debug)]
pub enum Change {
    /// Newly opened: create it.
    Create {
        /// The visitor.
        visitor: Visitor,
        /// Its group.
        group: GroupName,
    },
    /// Assigned to `agent`, in `group` (a transfer may change both).
    Assign {
        /// The new agent.
        agent: AgentRef,
        /// The group.
        group: GroupName,
        /// The agent who had it before (a transfer), to be told it went.
        previous: Option<UserKey>,
    },
    /// Back in a queue.
    Queue {
        /// The group.
        group: GroupName,
        /// The agent who had it before, to be told it went.
        previous: Option<UserKey>,
    },
    /// Closed.
    Close,
    /// Moved in its queue: tell the visitor.
    Position,
    /// Nothing changed: answer the command with the current state.
    Describe,
    /// The router knows no open conversation by that id for a `close`:
    /// answer with the closed state if it is closed and `actor` may read
    /// it, else `not_found`.
    CloseClosed {
        /// Who asked.
        actor: Actor,
    },
}

/// What the router knows of a conversation that its home needs to announce
/// a change.
#[derive(Debug, Default)]
pub struct RouteInfo {
    /// 1-based queue position, if queued.
    pub position: Option<u32>,
    /// If queued: the agents (online or away) who serve its group.
    pub notify: Vec<UserKey>,
}

/// Messages between chat services.
#[derive(Debug)]
pub enum ChatMsg {
    /// Edge → every shard: a session is connected (before `connected` is
    /// written; see the module notes). Each home replays `resume`, which
    /// holds only the conversations homed there.
    SessionUp {
        /// The connection.
        addr: SessionAddr,
        /// Its subprotocol.
        codec: Codec,
        /// Who it is.
        actor: Actor,
        /// Conversations to replay: (conversation, last seen seq).
        resume: Vec<(ConvId, u64)>,
    },
    /// Edge → every shard: the session has gone.
    SessionDown {
        /// The connection.
        addr: SessionAddr,
        /// Its user.
        user: UserKey,
    },
    /// Edge → router: a session connected; which conversations does its
    /// user have? An agent's device also counts for presence.
    Hello {
        /// The connection and its `connect` id.
        reply: Reply,
        /// Who it is.
        identity: Identity,
    },
    /// Router → edge: the user's open conversations, for `connected`.
    Welcome {
        /// The connection and its `connect` id.
        reply: Reply,
        /// (conversation, status).
        conversations: Vec<(ConvId, ConvStatus)>,
    },
    /// Edge → router: an agent's device has gone.
    AgentGone {
        /// The agent.
        agent: UserId,
        /// The device (connection).
        device: u64,
    },
    /// Edge → router: a checked routing command.
    Route {
        /// Who gets the answer.
        reply: Reply,
        /// Who sent it.
        actor: Actor,
        /// What they asked, as the edge's session checked it.
        request: RouteRequest,
    },
    /// Edge → router → a conversation's home: a command for a home, sent
    /// while a routing command of the same session is with the router, so
    /// that it reaches the home after the router's decision (a `send`
    /// behind a `close` finds the conversation closed).
    Relay {
        /// Who gets the answer.
        reply: Reply,
        /// Who sent it.
        actor: Actor,
        /// What they asked.
        request: HomeRequest,
    },
    /// Router → edge: a `Route` or `Relay` of this session is handled, and
    /// what it decided is on its way to the homes.
    Routed {
        /// The connection.
        addr: SessionAddr,
    },
    /// Router → a conversation's home.
    Change {
        /// The conversation.
        conv: ConvId,
        /// What happened.
        change: Change,
        /// The command it answers, if one caused it.
        reply: Option<Reply>,
        /// The router's view of it.
        route: RouteInfo,
    },
}

/// The shard that runs the router.
pub const ROUTER_SHARD: usize = 0;

/// A connection's device id, as the router counts an agent's devices: its
/// address packed into 64 bits (shard, slot, low generation bits).
pub fn device_of(addr: SessionAddr) -> u64 {
    ((addr.shard as u64) << 56) | ((addr.slot as u64) << 24) | (addr.generation as u64 & 0xFF_FFFF)
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
