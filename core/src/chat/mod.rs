//! The chat service's state machines and the messages between them.
//!
//! A shard of the gateway runs one of each of these (the router on shard 0
//! only), feeds them inputs with the time, and carries out what they ask
//! for; nothing here touches a socket, a mailbox, storage or a clock
//! (DESIGN.md, "The chat service"):
//!
//! - [`edge::Edge`]: the sessions of the connections a shard accepted:
//!   `connect`, and every command checked where it arrived (identity,
//!   role, rate limit, sizes), so a refused command costs no other shard
//!   anything;
//! - [`home::Home`]: the conversations homed on a shard
//!   (`ConvId::home(shards)`): `seq`, the cid window, durable-then-ack,
//!   fan-out of one encoded frame to every participant, resume and history;
//! - [`router::Router`]: the queue, assignment and presence, on one shard,
//!   because assignment needs every agent and every waiting visitor at
//!   once. Its decisions go to each conversation's home, which makes them
//!   durable and announces them;
//! - [`directory::Directory`]: where each user's sessions are, (role, id)
//!   to sessions, replicated on every shard from the edges' `SessionUp` /
//!   `SessionDown`, so a home reaches any participant without asking.
//!
//! Edge and home queue their work in an [`outbox::Outbox`]; what they read
//! from storage they read through [`stored::Stored`].
//!
//! Ordering rests on one property of the shards' inboxes: each is one FIFO
//! queue, so two messages one sender puts into it arrive in that order, and
//! a message put in after another shard *handled* something arrives after
//! everything that was in the inbox before. (The loop keeps it for what it
//! must hold back from a full inbox, and for what a shard addresses to
//! itself, which it runs right after the current input.) Hence:
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

pub mod directory;
pub mod edge;
pub mod frames;
pub mod home;
pub mod hooks;
pub mod outbox;
pub mod router;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod stored;
#[cfg(any(test, feature = "sim"))]
pub mod testing;
pub mod users;

use kefu_proto::client::Codec;
use kefu_proto::{ConvId, ConvStatus};

use crate::identity::{Actor, AgentRef, GroupName, Identity, UserId, UserKey, Visitor};
use crate::session::{HomeRequest, RouteRequest};
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
    /// If queued: the agents who serve its group and are connected (whatever
    /// their presence) or not offline. As it leaves a queue its agents were
    /// shown (taken, closed, moved to another group's queue): those of the
    /// queue it left, too.
    pub notify: Vec<UserKey>,
    /// If queued: whether an agent who serves its group is online (else
    /// the visitor is told nobody is, and may leave a message).
    pub agents_online: Option<bool>,
}

/// A waiting conversation's place, for its visitor (see [`ChatMsg::Positions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositionUpdate {
    /// The conversation.
    pub conv: ConvId,
    /// Its 1-based queue position.
    pub position: u32,
    /// Whether an agent who serves its group is online.
    pub agents_online: bool,
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
    /// The bridge → the shard whose home called `OnMessage`: its verdict.
    Hooked {
        /// The call's token.
        token: u64,
        /// The answer.
        verdict: hooks::Verdict,
    },
    /// A shard → every shard: a visitor's profile changed (`SyncUser`,
    /// durable): each home shows it in the visitor's open conversations.
    Profile {
        /// The visitor.
        visitor: UserId,
        /// The new display name, if it changed.
        name: Option<String>,
        /// Profile fields, overriding key by key.
        meta: crate::identity::Meta,
    },
    /// The bridge → a shard: a question its loop answers from what the
    /// machines hold (the router's agents, the directory's sessions),
    /// straight to the call `call`.
    Query {
        /// The bridge's call.
        call: u64,
        /// What is asked.
        query: Query,
    },
    /// The bridge → the shard whose edge called `OnConnect`: its answer.
    Admitted {
        /// The call's token.
        token: u64,
        /// The answer.
        admission: hooks::Admission,
    },
    /// Router → one shard: queue positions to tell visitors of
    /// conversations homed there (moved, or their group gained its first
    /// online agent or lost its last). One post per shard carries every
    /// update of a router tick, so a dequeue with 50,000 waiting is a post
    /// per shard, not one per visitor.
    Positions {
        /// The updates, in queue order per group.
        updates: Vec<PositionUpdate>,
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

/// A business system's question about the live state (see `ChatMsg::Query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// These agents' presence and load (none named: every agent the
    /// router knows). Asked of the router's shard.
    Presence {
        /// The agents.
        agents: Vec<UserId>,
    },
    /// Close every session of this user, wherever it is connected. Any
    /// shard can: each holds the whole directory.
    Disconnect {
        /// Who.
        user: UserKey,
    },
    /// Store a user's profile as the business system has it (`SyncUser`):
    /// `name` if given, `meta` key by key over what is stored. Once
    /// durable, the open conversations of a visitor show it.
    SyncUser {
        /// Who.
        user: UserKey,
        /// The new display name, if it changes.
        name: Option<String>,
        /// Profile fields to set.
        meta: crate::identity::Meta,
    },
    /// Block a visitor (`BlockVisitor`), or lift its block (`None`): made
    /// durable, then its sessions are closed with 4501, wherever they are,
    /// and its `connect`s refused while the block holds.
    Block {
        /// The visitor.
        visitor: UserId,
        /// The block, or none.
        block: Option<stored::Block>,
    },
}

/// The shard that runs the router.
pub const ROUTER_SHARD: usize = 0;

/// The `shard` of the answer addresses the business systems' calls use
/// (the gRPC bridge): a call is a command like a connection's, and the one
/// frame that answers it is posted to this "shard", which the shard loops
/// hand to the bridge instead of a connection. No real shard has it.
pub const BRIDGE_SHARD: u16 = u16::MAX;

/// A connection's device id, as the router counts an agent's devices: its
/// address packed into 64 bits (shard, slot, low generation bits).
pub fn device_of(addr: SessionAddr) -> u64 {
    ((addr.shard as u64) << 56) | ((addr.slot as u64) << 24) | (addr.generation as u64 & 0xFF_FFFF)
}

impl ChatMsg {
    /// The command this message answers or carries, if any: whoever waits
    /// for it is answered `unavailable` if the message cannot be posted.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            ChatMsg::Hello { reply, .. }
            | ChatMsg::Welcome { reply, .. }
            | ChatMsg::Route { reply, .. }
            | ChatMsg::Relay { reply, .. } => Some(*reply),
            ChatMsg::Change { reply, .. } => *reply,
            ChatMsg::SessionUp { .. }
            | ChatMsg::SessionDown { .. }
            | ChatMsg::AgentGone { .. }
            | ChatMsg::Routed { .. }
            | ChatMsg::Hooked { .. }
            | ChatMsg::Query { .. }
            | ChatMsg::Profile { .. }
            | ChatMsg::Positions { .. }
            | ChatMsg::Admitted { .. } => None,
        }
    }
}

/// What shards send each other through their mailboxes (and what a shard
/// queues for itself, handled right after the current input: never
/// through its own inbox).
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
        /// The message's `ts` if this is a `msg` frame of its fan-out, else
        /// 0: the recipient's shard measures the delivery latency from it.
        ts_ms: u64,
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
mod size_tests {
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
