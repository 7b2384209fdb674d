//! The chat service: what `/ws` speaks, end to end.
//!
//! Connections live on whichever shard accepted them (the *edge*); the edge
//! does transport and codec work only: it decodes each client frame, answers
//! `ping` itself, and forwards everything else to the *chat shard*. The chat
//! shard owns every piece of chat state — sessions' identities and rate
//! limits, conversations, the router — and talks to storage. What it has to
//! say goes back to the edges as complete, already-encoded WebSocket frames,
//! one encoding per subprotocol, shared by every recipient.
//!
//! This departs from DESIGN.md, which homes each conversation on
//! `hash(conv) % shards`: one chat shard first, because a single owner makes
//! ordering and durability easy to get right and to test, and the chat
//! shard's work per message is small next to the edges' (syscalls, framing,
//! decoding) and storage's (fsync). Conversations can move to their home
//! shards later behind the same messages.

pub mod frames;
pub mod service;

use kefu_proto::client::{ClientFrame, Codec};

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

/// What shards send each other through their mailboxes.
#[derive(Debug)]
pub enum ShardMsg {
    /// Edge → chat shard: a decoded client frame.
    Frame {
        /// The connection it came from.
        from: SessionAddr,
        /// Its subprotocol, for the replies.
        codec: Codec,
        /// The frame.
        frame: ClientFrame,
    },
    /// Edge → chat shard: a connection ended.
    Gone {
        /// The connection.
        from: SessionAddr,
    },
    /// Chat shard → edge: write this complete WebSocket frame.
    Deliver {
        /// The connection.
        to: SessionAddr,
        /// Header and payload, shared by every recipient.
        bytes: SharedFrame,
        /// String buffers for the edge's decoder: those of the message
        /// this frame acks, which that decoder filled.
        spare: [Option<String>; 2],
    },
    /// Chat shard → edge: close the connection (after what is queued).
    Close {
        /// The connection.
        to: SessionAddr,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
}

/// The shard that runs the chat service.
pub const CHAT_SHARD: usize = 0;
