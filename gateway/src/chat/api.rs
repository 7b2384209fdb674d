//! The chat service as business systems call it (through the gRPC bridge):
//! a call is a command, checked as a connection's would be, from a bot
//! identity (`from.role = "bot"`, may manage any conversation), put in the
//! inbox of the shard that serves it (the conversation's home, or the
//! router) with an answer address on [`BRIDGE_SHARD`]. The machines answer
//! it as they answer a connection, with one frame (`ack`, `conversation`,
//! `history` or `error`), and the shard loop that posts that frame hands it
//! to [`Calls::answer`] instead of a connection.
//!
//! So a `SendMessage` is durable before it is answered, idempotent by
//! (conversation, cid) for the business system's bot, and fanned out to
//! the participants, by the very code that serves `send`.
//!
//! Back-pressure: a full inbox refuses the call at once (`unavailable`),
//! and calls waiting for an answer are bounded (`server.api_calls_max`); a
//! caller that gives up [`Calls::forget`]s its call.
//!
//! Questions about the live state (`GetPresence`) and orders that need
//! no machine's decision (`DisconnectUser`) are [`Query`]s, which the
//! loop of the shard that holds the state answers itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kefu_core::CoreConfig;
use kefu_core::chat::hooks::HookCall;
use kefu_core::chat::stored::Block;
use kefu_core::chat::{BRIDGE_SHARD, ChatMsg, Query, ROUTER_SHARD, SessionAddr, ShardMsg};
use kefu_core::identity::{Identity, Meta, UserKey};
use kefu_core::routing::AgentView;
use kefu_core::session::{Checked, Session};
use kefu_proto::client::{Codec, Command, Event, ServerFrame};
use kefu_proto::{ErrorCode, Role};

use super::service::now_ms;
use crate::mailbox::Mailbox;

/// The user id of the business system's messages (`from.role = "bot"`).
/// Not `rules.bot_id`: the keyword bot's own messages carry `auto-N` cids,
/// which must never count as resends of a business system's cid.
pub const API_BOT_ID: &str = "api";

/// What a call is answered with.
#[derive(Debug)]
pub enum Answer {
    /// A command's answer: the frame a client would get.
    Frame(ServerFrame),
    /// `Query::Presence`: the agents, as the router sees them.
    Presence(Vec<AgentView>),
    /// `Query::Disconnect` and a block: how many sessions are being closed.
    Disconnected(u32),
    /// Done, durably (`SyncUser`, `UnblockVisitor`).
    Done,
    /// Not done.
    Failed {
        /// The protocol error code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
}

/// What the caller gets its answer through.
type Waiter = Box<dyn FnOnce(Answer) + Send>;

/// A call's id, to [`Calls::forget`] it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallId(u64);

/// The calls waiting for their answer, shared by the bridge and every shard.
pub struct Calls {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiter>>,
    max: usize,
}

impl Calls {
    /// Room for `max` calls waiting at once.
    pub fn new(max: usize) -> Calls {
        Calls { next: AtomicU64::new(1), waiting: Mutex::new(HashMap::new()), max }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        // A waiter that panicked left the map as it was: still usable.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Calls waiting for an answer.
    pub fn len(&self) -> usize {
        self.waiting().len()
    }

    /// Whether no call waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn id_of(addr: SessionAddr) -> u64 {
        (u64::from(addr.generation) << 32) | u64::from(addr.slot)
    }

    fn addr_of(id: u64) -> SessionAddr {
        SessionAddr { shard: BRIDGE_SHARD, slot: id as u32, generation: (id >> 32) as u32 }
    }

    /// A shard posts the frame(s) answering call `to` (JSON): the first
    /// answers it; a call already answered or forgotten gets nothing.
    pub fn answer(&self, to: SessionAddr, bytes: &[u8]) {
        for payload in kefu_proto::ws::payloads(bytes) {
            let Some(waiter) = self.waiting().remove(&Self::id_of(to)) else { return };
            let frame = Codec::Json.decode_server(payload).unwrap_or_else(|e| {
                ServerFrame::error(None, ErrorCode::Internal, format!("undecodable answer: {e}"))
            });
            waiter(Answer::Frame(frame));
        }
    }

    /// A shard answers call `call` itself (a query).
    pub fn resolve(&self, call: u64, answer: Answer) {
        let waiter = self.waiting().remove(&call);
        if let Some(waiter) = waiter {
            waiter(answer);
        }
    }

    /// The caller gave up (a deadline): its answer, if it comes, is dropped.
    pub fn forget(&self, id: CallId) {
        self.waiting().remove(&id.0);
    }
}

/// Where the machines' hook calls go (the bridge's gRPC client). Each
/// call taken must be answered, exactly once, in shard `shard`'s inbox:
/// `ChatMsg::Hooked { token, verdict }` for `OnMessage`,
/// `ChatMsg::Admitted { token, admission }` for `OnConnect` (a timeout or
/// an error as `Failed`): a message waits for it, and every later one of
/// its conversation behind it; a connection waits to be let in. So a full
/// inbox is retried, never given up on.
pub trait HookSink: Send + Sync {
    /// Calls the hook for shard `shard`'s machine; must not block. `Err`
    /// (why) if the call is not taken (too many wait already): the caller
    /// then treats it as failed at once, and nothing will be posted for it.
    fn call(&self, shard: usize, token: u64, call: HookCall) -> Result<(), String>;
}

/// Why a call was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The protocol error code (`unavailable` for back-pressure).
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

/// Calls into the chat service from outside the shards.
#[derive(Clone)]
pub struct ChatApi {
    core: Arc<CoreConfig>,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    calls: Arc<Calls>,
    /// [`API_BOT_ID`].
    bot_id: Arc<str>,
}

impl ChatApi {
    /// The API over these shards' inboxes. The bridge posts as sender
    /// `mailboxes.len()` (each mailbox counts one sender more than there
    /// are shards).
    pub fn new(core: Arc<CoreConfig>, mailboxes: Arc<[Mailbox<ShardMsg>]>, calls: Arc<Calls>) -> ChatApi {
        ChatApi { core, mailboxes, calls, bot_id: Arc::from(API_BOT_ID) }
    }

    /// Sends `command` as the business system's bot, shown as `name`;
    /// `done` gets the frame that answers it. Refused at once if the
    /// command is invalid or the chat service cannot take it now.
    pub fn call(
        &self,
        name: &str,
        command: Command,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        let now = now_ms();
        let mut session = Session::new(self.core.clone(), now);
        let identity = Identity {
            role: Role::Bot,
            id: self.bot_id.clone(),
            name: Arc::from(if name.is_empty() { &*self.bot_id } else { name }),
            groups: Arc::from([]),
            meta: Meta::new(),
            anonymous: false,
        };
        let actor = identity.actor();
        let _ = session.connect(identity);
        let checked =
            session.check(command, now).map_err(|e| Refused { code: e.code(), message: e.to_string() })?;
        let shards = self.mailboxes.len();
        let id = self.calls.next.fetch_add(1, Ordering::Relaxed);
        let reply = (Calls::addr_of(id), Codec::Json, Some(id as i64));
        let (to, msg) = match checked {
            Checked::Pong => {
                done(Answer::Frame(ServerFrame::reply(Some(id as i64), Event::Pong)));
                return Ok(CallId(id));
            }
            // The session refuses `canned` to anyone but an agent; should
            // that change, the business system still has no use for it.
            Checked::Canned => {
                let message = "canned replies are for the console".to_string();
                return Err(Refused { code: ErrorCode::Forbidden, message });
            }
            Checked::Route(request) => {
                (ROUTER_SHARD, ShardMsg::Chat(Box::new(ChatMsg::Route { reply, actor, request })))
            }
            Checked::Home(request) => (request.conv().home(shards), ShardMsg::Home { reply, actor, request }),
        };
        self.post(id, to, msg, done)
    }

    /// These agents' presence and load (none named: every agent the router
    /// knows), answered as [`Answer::Presence`].
    pub fn presence(
        &self,
        agents: Vec<String>,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        let agents = agents.into_iter().map(|a| Arc::from(a.as_str())).collect();
        self.query(ROUTER_SHARD, Query::Presence { agents }, done)
    }

    /// Closes every session of `(role, id)` wherever it is connected
    /// (4000: the client may come back; to keep a visitor out, block it),
    /// answered as [`Answer::Disconnected`].
    pub fn disconnect(
        &self,
        role: Role,
        id: &str,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        let user = UserKey { role, id: Arc::from(id) };
        self.query(ROUTER_SHARD, Query::Disconnect { user }, done)
    }

    /// Stores `(role, id)`'s profile as the business system has it: `name`
    /// if given, `meta` key by key over what is stored; answered
    /// [`Answer::Done`] once durable, after which a visitor's open
    /// conversations show it (their agents get a `conversation` frame).
    pub fn sync_user(
        &self,
        user: UserKey,
        name: Option<String>,
        meta: Meta,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        self.query(ROUTER_SHARD, Query::SyncUser { user, name, meta }, done)
    }

    /// Blocks `visitor` (or lifts its block: `None`); answered once durable,
    /// a block with [`Answer::Disconnected`] (the sessions it closed), a
    /// lift with [`Answer::Done`].
    pub fn block(
        &self,
        visitor: &str,
        block: Option<Block>,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        self.query(ROUTER_SHARD, Query::Block { visitor: Arc::from(visitor), block }, done)
    }

    fn query(
        &self,
        to: usize,
        query: Query,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        let call = self.calls.next.fetch_add(1, Ordering::Relaxed);
        self.post(call, to, ShardMsg::Chat(Box::new(ChatMsg::Query { call, query })), done)
    }

    /// Registers `done` for call `id` and puts `msg` in shard `to`'s inbox.
    fn post(
        &self,
        id: u64,
        to: usize,
        msg: ShardMsg,
        done: impl FnOnce(Answer) + Send + 'static,
    ) -> Result<CallId, Refused> {
        {
            let mut waiting = self.calls.waiting();
            if waiting.len() >= self.calls.max {
                return Err(busy("too many calls waiting (server.api_calls_max)"));
            }
            waiting.insert(id, Box::new(done));
        }
        if self.mailboxes[to].send(self.mailboxes.len(), msg).is_err() {
            self.calls.forget(CallId(id));
            return Err(busy("the chat service is busy"));
        }
        Ok(CallId(id))
    }

    /// The caller gave up on call `id` (a deadline).
    pub fn forget(&self, id: CallId) {
        self.calls.forget(id);
    }
}

fn busy(why: &str) -> Refused {
    Refused { code: ErrorCode::Unavailable, message: format!("{why}; retry") }
}
