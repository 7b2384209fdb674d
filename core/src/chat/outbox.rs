//! What the edge and the home ask their shard loop to do: posts to any
//! shard (a frame or a close for a connection is a post to the
//! connection's shard), and writes to make durable. Each machine keeps one
//! [`Outbox`], queues into it while it handles an input, and the loop takes
//! the outputs in order with `poll_output`.
//!
//! Frames are encoded here, once per subprotocol, into pooled buffers that
//! every recipient's connection shares ([`super::frames`]).

use std::collections::VecDeque;

use kefu_proto::client::{AgentRef as WireAgent, Codec, Event, Msg, ServerFrame};
use kefu_proto::{ConvId, ConvStatus, ErrorCode, Role};

use super::directory::Member;
use super::frames::{FrameEncoder, SharedFrame};
use super::hooks::HookCall;
use super::stored::UserControl;
use super::{ChatMsg, Reply, RouteInfo, SessionAddr, ShardMsg};
use crate::identity::UserKey;

/// One piece of work for the shard loop.
#[derive(Debug)]
pub enum Output {
    /// Put `msg` in shard `to`'s inbox. For the loop's own shard it is
    /// never its inbox: a frame or a close for one of its connections is
    /// written at once, anything else is handled right after the current
    /// input.
    Post {
        /// The shard.
        to: usize,
        /// The message.
        msg: ShardMsg,
    },
    /// Call a business-system hook; its verdict comes back to this shard
    /// with `token`: `ChatMsg::Hooked` (OnMessage) or `ChatMsg::Admitted`
    /// (OnConnect).
    Hook {
        /// Names the call for its verdict.
        token: u64,
        /// The call.
        call: HookCall,
    },
    /// Make `write` durable, then hand `then` back with the outcome
    /// (`handle_committed` / `handle_failed` of the machine that asked).
    Submit {
        /// What to store.
        write: Write,
        /// What to do once it is durable (or is not).
        then: Pending,
    },
}

/// What to do when a write becomes durable (or fails).
#[derive(Debug)]
pub enum Pending {
    /// Edge: a new anonymous visitor is stored: announce the session.
    Connected {
        /// The visitor's connection.
        to: SessionAddr,
    },
    /// Home: a message is stored: ack it and fan it out. The message comes
    /// back with the outcome, so nothing of it is copied to wait here.
    Message {
        /// Its conversation.
        conv: ConvId,
        /// The seq the home gave it.
        seq: u64,
        /// Who sent it (none for bot messages).
        sender: Option<Reply>,
    },
    /// Home: a conversation's change is stored: announce the state stored,
    /// and answer the command that caused it, if one did. `previous` is the
    /// agent who had it before a transfer or requeue: no longer a
    /// participant, but told that it went.
    ConvChanged {
        /// The command it answers.
        reply: Option<Reply>,
        /// The agent who had it before.
        previous: Option<UserKey>,
        /// The router's view of it.
        route: RouteInfo,
    },
    /// Nothing to announce (read marks, profiles).
    Nothing,
    /// The loop's own: a write of a business system's change to a user
    /// (`SyncUser`, `BlockVisitor`) is stored. A change of two writes
    /// chains them, the second submitted once the first is durable, so the
    /// call is answered as done only if all of it is.
    UserChanged {
        /// Whose.
        user: UserKey,
        /// The business system's call waiting for the change.
        call: u64,
        /// The change's next write, if this is not its last.
        next: Option<Box<Write>>,
        /// Close the user's sessions (blocked, 4501) once it is durable.
        close: bool,
    },
}

/// A durable write, in the chat core's terms (the loop maps each to the
/// store's write; a message is the wire [`Msg`] itself, not a copy).
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Append a message (its `seq` assigned by the home).
    Message(Msg),
    /// Store a conversation's state.
    Conversation(ConvState),
    /// Store a user's profile.
    User(Profile),
    /// Store what the business system set for a user apart from the
    /// profile (replacing what was stored).
    Control {
        /// Whose.
        user: UserKey,
        /// All of it.
        control: UserControl,
    },
    /// Log an agent's presence change.
    Presence {
        /// The agent.
        agent: crate::identity::UserId,
        /// Its presence now.
        status: kefu_proto::PresenceStatus,
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// Store a read mark.
    Read {
        /// The conversation.
        conv: ConvId,
        /// Who read it.
        user: UserKey,
        /// Up to which message.
        seq: u64,
        /// When, ms since the epoch.
        ts_ms: u64,
    },
}

/// A conversation's state as a write stores it and its commit announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvState {
    /// The conversation.
    pub conv: ConvId,
    /// Its visitor.
    pub visitor_id: String,
    /// Queued, assigned or closed.
    pub status: ConvStatus,
    /// The assigned (or, once closed, the last) agent.
    pub agent: Option<WireAgent>,
    /// Its group.
    pub group: Option<String>,
    /// When this state was decided, ms since the epoch.
    pub at_ms: u64,
}

/// A user's profile as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Visitor, agent or bot.
    pub role: Role,
    /// The user id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Profile fields.
    pub meta: Vec<(String, String)>,
    /// SHA-256 of an anonymous visitor's key.
    pub visitor_key_hash: Option<[u8; 32]>,
    /// When the user was first seen, ms since the epoch.
    pub created_ms: u64,
}

/// A machine's queue of [`Output`]s, and the encoder its frames are made with.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: FrameEncoder,
    queue: VecDeque<Output>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next output, in the order queued.
    pub fn pop(&mut self) -> Option<Output> {
        self.queue.pop_front()
    }

    /// Posts `msg` to shard `to`.
    pub fn post(&mut self, to: usize, msg: ShardMsg) {
        self.queue.push_back(Output::Post { to, msg });
    }

    /// Posts a chat message to shard `to`.
    pub fn post_chat(&mut self, to: usize, msg: ChatMsg) {
        self.post(to, ShardMsg::Chat(Box::new(msg)));
    }

    /// Asks for `write` to be made durable.
    pub fn submit(&mut self, write: Write, then: Pending) {
        self.queue.push_back(Output::Submit { write, then });
    }

    /// Calls a hook.
    pub fn hook(&mut self, token: u64, call: HookCall) {
        self.queue.push_back(Output::Hook { token, call });
    }

    /// Writes an encoded frame to a connection, wherever it is.
    pub fn write(&mut self, to: SessionAddr, bytes: SharedFrame) {
        self.write_with(to, bytes, Default::default());
    }

    /// [`Self::write`], handing `spare` (strings its shard's decoder
    /// filled) back to that shard with the frame.
    pub fn write_with(&mut self, to: SessionAddr, bytes: SharedFrame, spare: [Option<String>; 2]) {
        self.post(to.shard as usize, ShardMsg::Deliver { to, bytes, spare, ts_ms: 0 });
    }

    /// Encodes `frame` for `codec`.
    pub fn encode(&mut self, codec: Codec, frame: &ServerFrame) -> SharedFrame {
        self.frames.encode(codec, frame)
    }

    /// Encodes and writes one frame to one connection.
    pub fn send(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        let bytes = self.frames.encode(codec, frame);
        self.write(to, bytes);
    }

    /// Answers a command with an error.
    pub fn error(&mut self, (to, codec, id): Reply, code: ErrorCode, message: impl Into<String>) {
        self.send(to, codec, &ServerFrame::error(id, code, message));
    }

    /// Sends one event to many sessions: encoded once per subprotocol.
    pub fn deliver(&mut self, to: impl IntoIterator<Item = Member>, frame: &ServerFrame) {
        let mut encoded: [Option<SharedFrame>; 2] = [None, None];
        let ts_ms = match &frame.body {
            Event::Msg(m) => m.ts,
            _ => 0,
        };
        for m in to {
            let slot = usize::from(m.codec.is_binary());
            let bytes = encoded[slot].get_or_insert_with(|| self.frames.encode(m.codec, frame)).clone();
            let to = m.addr;
            self.post(to.shard as usize, ShardMsg::Deliver { to, bytes, spare: Default::default(), ts_ms });
        }
    }

    /// Closes a connection, wherever it is, after what is queued for it.
    pub fn close(&mut self, to: SessionAddr, code: u16, reason: &'static str) {
        self.post(to.shard as usize, ShardMsg::Close { to, code, reason });
    }
}
