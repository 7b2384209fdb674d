//! One shard's chat service: its state, its inputs and its outputs (see the
//! module above for how the shards share the work).
//!
//! Everything that must be durable before it is announced (a new anonymous
//! visitor, a message, a conversation's change) goes through
//! [`ChatService::submit`] with a [`Pending`] that says what to announce
//! once the group commit holding it has returned. Nothing is announced from
//! anywhere else.

use std::collections::HashMap;
use std::sync::Arc;

use kefu_core::auth::JwtKey;
use kefu_core::chat::router::Router;
use kefu_core::conversation::RestoredConversation;
use kefu_core::identity::{AgentRef, UserKey, Visitor, vip_level};
use kefu_core::routing::RestoredRoute;
use kefu_core::rules::Rules;
use kefu_core::session::Session;
use kefu_core::{Conversation, CoreConfig};
use kefu_proto::client::{ClientFrame, Codec, ServerFrame, SpareStrings};
use kefu_proto::{ConvId, Role};
use kefu_storage::{Completion, Completions, ConversationRecord, Reader, Store, WriteOp, Writer};
use tracing::{info, warn};

use super::directory::{Directory, Member};
use super::frames::{FrameEncoder, SharedFrame};
use super::{Change, ChatMsg, ROUTER_SHARD, Reply, RouteInfo, SessionAddr, ShardMsg};
use crate::mailbox::Mailbox;
use crate::metrics::ShardStats;

/// What a shard's chat service needs at start.
pub struct ChatInit {
    /// This shard's number.
    pub shard: usize,
    /// Every shard's inbox.
    pub mailboxes: Arc<[Mailbox<ShardMsg>]>,
    /// The product rules' configuration.
    pub core: Arc<CoreConfig>,
    /// The HS256 secret.
    pub jwt_secret: String,
    /// `auth.allow_anonymous`.
    pub allow_anonymous: bool,
    /// `server.heartbeat_s`, told to clients in `connected`.
    pub heartbeat_s: u32,
    /// The open store, shared by every shard (each submits as its own source).
    pub store: Arc<Store>,
    /// Frames held for a session until its `connected` is written; past
    /// this it is cut as a slow consumer. Half of
    /// `limits.outbound_queue_frames`, so the flush at `connected` always
    /// fits the connection's queue (the router answers in microseconds, so
    /// only a storm reaches it).
    pub held_frames_max: usize,
    /// Bytes one conversation's resume replay may queue on a connection:
    /// half of `limits.outbound_queue_bytes`, so replaying never gets a
    /// reading client cut as a slow consumer.
    pub replay_bytes_max: usize,
    /// This shard's share of the open conversations, from [`restore_open`].
    pub restore: ShardRestore,
    /// Every shard's counters, for `/metrics`.
    pub stats: Arc<[ShardStats]>,
    /// `server.backlog_messages_max`.
    pub backlog_max: usize,
}

/// What one shard starts from after a restart.
#[derive(Debug, Default)]
pub struct ShardRestore {
    /// The open conversations homed on this shard.
    pub conversations: Vec<RestoredConversation>,
    /// On the router's shard: the next conversation id and every open
    /// conversation's route.
    pub router: Option<(u64, Vec<RestoredRoute>)>,
}

/// Rebuilds every open conversation once, from what the store's recovery
/// found, and deals them out: each to its home shard, every route to the
/// router's. (Each shard reading them again would repeat the scan and the
/// profile reads per shard.)
pub fn restore_open(
    reader: &Reader,
    open: Vec<ConversationRecord>,
    next_conv_id: u64,
    core: &CoreConfig,
    shards: usize,
) -> Result<Vec<ShardRestore>, kefu_storage::StorageError> {
    let mut out: Vec<ShardRestore> = (0..shards).map(|_| ShardRestore::default()).collect();
    let mut routes = Vec::with_capacity(open.len());
    for rec in open {
        let restored = restored_conversation(reader, rec, &core.routing.default_group)?;
        routes.push(RestoredRoute {
            conv: restored.id,
            visitor: restored.visitor.id.clone(),
            group: restored.group.clone(),
            vip_level: vip_level(&restored.visitor.meta),
            agent: restored.agent.clone(),
        });
        out[restored.id.home(shards)].conversations.push(restored);
    }
    out[ROUTER_SHARD].router = Some((next_conv_id, routes));
    Ok(out)
}

/// Where a connection is in its `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// A new anonymous visitor's profile is being made durable. Commands
    /// wait (a few; more are refused, the refusals held until `connected`).
    Storing,
    /// Announced to every shard; waiting for the router's `Welcome`. Frames
    /// for it are held until `connected` is written; commands are served
    /// (a client may pipeline them behind `connect`).
    Welcoming,
    /// `connected` is written.
    Ready,
}

/// One connection of this shard, as its edge knows it.
pub(super) struct Sess {
    pub(super) codec: Codec,
    pub(super) session: Session,
    pub(super) stage: Stage,
    /// The `connect`'s id and resume map, kept until `connected`.
    pub(super) connect_id: Option<i64>,
    pub(super) resume: Vec<(ConvId, u64)>,
    /// A new anonymous visitor's key, shown once in `connected`.
    pub(super) visitor_key: Option<String>,
    /// Commands a new anonymous visitor pipelined behind `connect` while
    /// it was being stored, served once it is (at most
    /// [`PIPELINED_WHILE_STORING_MAX`]).
    pub(super) pipelined: Vec<ClientFrame>,
    /// `Route`s and `Relay`s sent to the router and not yet `Routed`: while
    /// any are, commands for homes are relayed too.
    pub(super) routing: u32,
}

/// Commands kept for a new anonymous visitor until it is durable; past
/// this they are refused with `bad_command` (a client that pipelines more
/// than this behind `connect` is misbehaving, and storing takes about one
/// group commit).
pub(super) const PIPELINED_WHILE_STORING_MAX: usize = 16;

/// What to do when a write becomes durable.
pub(super) enum Pending {
    /// A new anonymous visitor is stored: announce the session.
    Connected { to: SessionAddr },
    /// A message is stored: ack it and fan it out. The message itself comes
    /// back with the completion, so nothing of it is copied to wait here.
    Message { conv: ConvId, seq: u64, sender: Option<Reply> },
    /// A conversation's change is stored: announce its state, and answer
    /// the command that caused it, if one did. `previous` is the agent who
    /// had it before a transfer or requeue: no longer a participant, but
    /// told that it went.
    ConvChanged { reply: Option<Reply>, previous: Option<UserKey>, route: RouteInfo },
    /// Nothing to announce (read marks, profiles).
    Nothing,
}

/// Something for a connection on this very shard, written right after the
/// input that caused it is handled: in order, without a round trip through
/// any inbox.
pub enum Local {
    /// Write this frame; give the strings to this shard's decoder.
    Deliver(SessionAddr, SharedFrame, [Option<String>; 2]),
    /// Close the connection.
    Close(SessionAddr, u16, &'static str),
    /// Give these strings to this shard's decoder (their frame was held).
    Spare([Option<String>; 2]),
}

/// The answer to a command the chat service could not pass on: the
/// backlog for another shard's full inbox is at its bound.
const BUSY: &str = "the chat service is busy; retry";

/// The close reason of a connection that missed a frame.
const MISSED: &str = "server busy: frames were lost; resume";

/// What a post does when the backlog holds `server.backlog_messages_max`
/// messages: a command with a waiter is answered `unavailable`, a frame
/// cuts its connection (which resumes), a queue-position update is skipped
/// (the next change carries it again), and what keeps the shards' state in
/// step (sessions, decisions, closes) is kept anyway: there are a few of
/// those per connection or routing command, not per message.
enum Overflow {
    /// Refused: the caller answers whoever waits with `unavailable`.
    Refuse,
    /// A frame for this connection: not written; the connection is closed
    /// once its shard takes messages again, and the client resumes.
    Cut(SessionAddr),
    /// Not needed for correctness (a queue position): skipped, counted.
    Skip,
    /// State the shards must agree on: kept past the bound.
    Keep,
}

impl ShardMsg {
    fn overflow(&self) -> Overflow {
        match self {
            ShardMsg::Deliver { to, .. } => Overflow::Cut(*to),
            ShardMsg::Home { .. } => Overflow::Refuse,
            ShardMsg::Close { .. } => Overflow::Keep,
            ShardMsg::Chat(m) => match &**m {
                ChatMsg::Route { .. } | ChatMsg::Relay { .. } | ChatMsg::Hello { .. } => Overflow::Refuse,
                // Answering with the state changes nothing: refusable. Any
                // other change is a decision the router has applied: its
                // home must hear of it, or the two disagree for good.
                ChatMsg::Change {
                    change: Change::Describe | Change::CloseClosed { .. },
                    reply: Some(_),
                    ..
                } => Overflow::Refuse,
                ChatMsg::Change { change: Change::Position, .. } => Overflow::Skip,
                ChatMsg::Change { .. }
                | ChatMsg::SessionUp { .. }
                | ChatMsg::SessionDown { .. }
                | ChatMsg::Welcome { .. }
                | ChatMsg::AgentGone { .. }
                | ChatMsg::Routed { .. } => Overflow::Keep,
            },
        }
    }
}

/// One shard's chat service.
pub struct ChatService {
    pub(super) me: usize,
    pub(super) shards: usize,
    pub(super) mailboxes: Arc<[Mailbox<ShardMsg>]>,
    pub(super) frames: FrameEncoder,
    pub(super) core: Arc<CoreConfig>,
    pub(super) jwt: JwtKey,
    pub(super) allow_anonymous: bool,
    pub(super) heartbeat_s: u32,
    held_frames_max: usize,
    pub(super) replay_bytes_max: usize,
    /// Kept so the writer thread lives as long as any shard.
    _store: Arc<Store>,
    pub(super) writer: Writer,
    pub(super) reader: Reader,
    completions: Completions,
    /// Edge: this shard's connections.
    pub(super) sessions: HashMap<SessionAddr, Sess>,
    /// Edge: frames waiting for their session's `connected`.
    pub(super) held: HashMap<SessionAddr, Vec<SharedFrame>>,
    /// Every shard: (role, id) → sessions, replicated.
    pub(super) directory: Directory,
    /// Home: the conversations homed here that are in memory.
    pub(super) convs: HashMap<ConvId, Conversation>,
    /// Home: closed conversations in `convs` only to answer one command.
    pub(super) borrowed: std::collections::HashSet<ConvId>,
    pub(super) rules: Rules,
    pub(super) pending: HashMap<u64, Pending>,
    /// Home: duplicate sends waiting for their original's commit.
    pub(super) dup_waiters: HashMap<(ConvId, u64), Vec<Reply>>,
    /// Router (shard 0 only).
    pub(super) router: Option<Router>,
    /// Output for this shard's own connections.
    local: Vec<Local>,
    /// Messages for this shard itself, handled right after the input that
    /// posted them (see [`Self::post`]): never through its own inbox.
    own: std::collections::VecDeque<ShardMsg>,
    /// Messages a full inbox could not take yet, with their shard, in the
    /// order they were posted: one queue for every shard, see [`Self::post`].
    backlog: std::collections::VecDeque<(usize, ShardMsg)>,
    /// Connections elsewhere that missed a frame because the backlog was
    /// full: closed (so they resume) once the backlog has room.
    cut: std::collections::BTreeSet<SessionAddr>,
    /// Every shard's counters (this one writes its own: backlog and overflow).
    stats: Arc<[ShardStats]>,
    /// `server.backlog_messages_max`.
    backlog_max: usize,
    next_token: u64,
    /// Reused for each message's audience.
    pub(super) audience: Vec<Member>,
    /// Buffers of delivered messages' strings, for the sender id and name
    /// of the next ones (the cid and text go back to the edges).
    pub(super) strings: SpareStrings,
}

/// Wall-clock milliseconds since the Unix epoch: the time the chat rules are fed.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ChatService {
    /// Builds a shard's service from its share of [`restore_open`]: the
    /// open conversations homed here and, on the router's shard, the
    /// router with every open conversation's route.
    pub fn new(init: ChatInit) -> anyhow::Result<Self> {
        let ChatInit {
            shard,
            mailboxes,
            core,
            jwt_secret,
            allow_anonymous,
            heartbeat_s,
            store,
            held_frames_max,
            replay_bytes_max,
            restore,
            stats,
            backlog_max,
        } = init;
        let shards = mailboxes.len();
        let jwt = JwtKey::new(jwt_secret.as_bytes(), core.auth.clone())
            .map_err(|e| anyhow::anyhow!("auth.jwt_secret: {e}"))?;
        // Dedupe lookups are for conversations homed here only.
        let reader = store.reader().with_own_dedupe_cache();
        let ShardRestore { conversations, router: routing } = restore;
        let now = now_ms();
        let router = routing.map(|(next_conv, routes)| {
            let (router, refused) = Router::new(core.clone(), shards, next_conv, routes, now);
            if refused > 0 {
                warn!(count = refused, "router refused restored conversations");
            }
            router
        });
        let convs: HashMap<ConvId, Conversation> =
            conversations.into_iter().map(|r| (r.id, Conversation::restore(r, &core.limits))).collect();
        info!(shard, open = convs.len(), router = router.is_some(), "chat state restored");
        let rules = Rules::new(&core.rules);
        Ok(Self {
            me: shard,
            shards,
            mailboxes,
            frames: FrameEncoder::new(),
            jwt,
            allow_anonymous,
            heartbeat_s,
            held_frames_max,
            replay_bytes_max,
            writer: store.writer(),
            reader,
            completions: store.completions(shard),
            _store: store,
            sessions: HashMap::new(),
            held: HashMap::new(),
            directory: Directory::default(),
            convs,
            borrowed: Default::default(),
            rules,
            core,
            pending: HashMap::new(),
            dup_waiters: HashMap::new(),
            router,
            local: Vec::new(),
            own: Default::default(),
            backlog: Default::default(),
            cut: Default::default(),
            stats,
            backlog_max,
            next_token: 1,
            audience: Vec::new(),
            strings: SpareStrings::new(),
        })
    }

    /// Whether writes this shard submitted are still to complete.
    #[cfg(test)]
    pub(super) fn has_writes_in_flight(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether storage completions are waiting (checked before sleeping).
    pub fn has_completions(&self) -> bool {
        !self.completions.is_empty()
    }

    /// Handles one message from this shard's inbox (another shard posted it).
    pub fn handle(&mut self, msg: ShardMsg) {
        self.dispatch(msg);
        self.settle();
    }

    /// A decoded client frame from one of this shard's connections: a
    /// direct call from the connection's task, not a post.
    pub fn frame(&mut self, from: SessionAddr, codec: Codec, frame: ClientFrame) {
        self.on_frame(from, codec, frame);
        self.settle();
    }

    /// One of this shard's connections has ended.
    pub fn gone(&mut self, from: SessionAddr) {
        self.on_gone(from);
        self.settle();
    }

    /// Answers a frame of this shard's connection that could not be
    /// decoded, after its `connect`: held until `connected` like every
    /// other frame for the session. (A new visitor's pipelined commands are
    /// answered once it is stored, so this refusal can come before their
    /// answers; each carries its own `id`.)
    pub fn answer(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        self.send(to, codec, frame);
        self.settle();
    }

    fn dispatch(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Deliver { to, bytes, spare } => match self.pass(to, bytes) {
                Some(bytes) => self.local.push(Local::Deliver(to, bytes, spare)),
                None => self.local.push(Local::Spare(spare)),
            },
            ShardMsg::Close { to, code, reason } => self.close(to, code, reason),
            ShardMsg::Home { reply, actor, request } => self.on_home(reply, &actor, request),
            ShardMsg::Chat(msg) => match *msg {
                ChatMsg::SessionUp { addr, codec, actor, resume } => {
                    self.on_session_up(addr, codec, &actor, &resume)
                }
                ChatMsg::SessionDown { addr, user } => self.on_session_down(addr, &user),
                ChatMsg::Hello { reply, identity } => self.on_hello(reply, identity),
                ChatMsg::Welcome { reply, conversations } => self.on_welcome(reply, conversations),
                ChatMsg::AgentGone { agent, device } => self.on_agent_gone(&agent, device),
                ChatMsg::Route { reply, actor, request } => self.on_route(reply, actor, request),
                ChatMsg::Relay { reply, actor, request } => self.on_relay(reply, actor, request),
                ChatMsg::Routed { addr } => self.on_routed(addr),
                ChatMsg::Change { conv, change, reply, route } => self.on_change(conv, change, reply, route),
            },
        }
    }

    /// Runs what this shard posted to itself while handling an input, in
    /// the order posted, until nothing is left: a direct call, after the
    /// input (calling at once would re-enter the handler half-way).
    fn settle(&mut self) {
        while let Some(msg) = self.own.pop_front() {
            self.dispatch(msg);
        }
    }

    /// Applies every storage completion that has arrived.
    pub fn poll_completions(&mut self) {
        while let Some(Completion { token, result, op }) = self.completions.pop() {
            let Some(pending) = self.pending.remove(&token) else { continue };
            match result {
                Ok(committed) => {
                    self.committed(pending, op, committed.duplicate, committed.seq, committed.ts_ms)
                }
                Err(e) => self.failed(pending, e),
            }
        }
        self.settle();
    }

    /// When [`Self::tick`] next has something to do (wall-clock ms), if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.router.as_ref().and_then(Router::next_deadline)
    }

    /// When the shard loop should next call in, if nothing arrives before:
    /// now, if messages wait for another shard's full inbox (the loop
    /// retries them shortly); else at the next deadline.
    pub fn wants_time_ms(&self) -> Option<u64> {
        if self.backlog.is_empty() { self.next_deadline_ms() } else { Some(0) }
    }

    /// Time passes: offline grace periods that ended by now take effect.
    pub fn tick(&mut self) {
        self.tick_router();
        self.settle();
    }

    /// What to write to this shard's own connections, in order.
    pub fn take_local(&mut self) -> std::vec::Drain<'_, Local> {
        self.local.drain(..)
    }

    /// A frame for one of this shard's connections: handed back unless its
    /// session is still waiting for `connected`, in which case it is held.
    pub(super) fn pass(&mut self, to: SessionAddr, bytes: SharedFrame) -> Option<SharedFrame> {
        if self.held.is_empty() {
            return Some(bytes);
        }
        let Some(held) = self.held.get_mut(&to) else { return Some(bytes) };
        if held.len() >= self.held_frames_max {
            self.held.remove(&to);
            self.local.push(Local::Close(to, crate::ws::close::SLOW_CONSUMER, "too much before connected"));
        } else {
            held.push(bytes);
        }
        None
    }

    // ---- output -------------------------------------------------------

    /// Puts a message in shard `to`'s inbox, or, for this shard itself, in
    /// the queue [`Self::settle`] runs once the current input is handled.
    ///
    /// If another shard's inbox is full the message waits in this service's
    /// backlog, and so does everything this service posts after it, to any
    /// shard, until [`Self::retry_backlog`] gets them in, in order. One
    /// queue for all shards, because order is causal: a message to another
    /// shard (a `Route`, a `Routed`) must not go out while one posted before
    /// it waits, or what that shard does about it (a `Change`, a direct
    /// `Home`) could reach the waiting message's inbox first. A message to
    /// this shard itself waits behind them too (else the router could
    /// answer a `connect` before the `SessionUp` it posted to a full shard
    /// got there), and goes to the own queue, not the inbox, when its turn
    /// comes.
    ///
    /// Past `server.backlog_messages_max` waiting, what happens depends on the message
    /// ([`Overflow`]); `false` means it was refused, and the caller answers
    /// whoever waits for it with `unavailable`.
    pub(super) fn post(&mut self, to: usize, msg: ShardMsg) -> bool {
        // The inbox loop retries only between batches, and a batch lasts as
        // long as other shards keep this inbox fed: try here too.
        if !self.backlog.is_empty() {
            self.retry_held();
        }
        if self.backlog.is_empty() {
            if to == self.me {
                self.own.push_back(msg);
                return true;
            }
            match self.mailboxes[to].send(self.me, msg) {
                Ok(()) => return true,
                Err(msg) => {
                    warn!(from = self.me, to, "shard inbox full: holding messages back");
                    self.hold(to, msg);
                    return true;
                }
            }
        }
        if self.backlog.len() < self.backlog_max {
            self.hold(to, msg);
            return true;
        }
        let stats = &self.stats[self.me];
        match msg.overflow() {
            Overflow::Refuse => {
                ShardStats::inc(&stats.posts_refused);
                false
            }
            Overflow::Cut(addr) => {
                ShardStats::inc(&stats.frames_cut);
                if self.cut.insert(addr) {
                    warn!(from = self.me, to, "shard stuck: a connection missed a frame and will be closed");
                }
                true
            }
            Overflow::Skip => {
                ShardStats::inc(&stats.posts_skipped);
                true
            }
            Overflow::Keep => {
                self.hold(to, msg);
                true
            }
        }
    }

    fn hold(&mut self, to: usize, msg: ShardMsg) {
        // Frames after one a connection missed are not written either: it
        // is closed after the ones before, and resumes from there.
        if let ShardMsg::Deliver { to: addr, .. } = &msg
            && self.cut.contains(addr)
        {
            ShardStats::inc(&self.stats[self.me].frames_cut);
            return;
        }
        self.backlog.push_back((to, msg));
        self.stats[self.me].backlog.store(self.backlog.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Answers a command whose post was refused: `unavailable`, retryable.
    pub(super) fn busy(&mut self, (to, codec, id): Reply) {
        self.send(to, codec, &ServerFrame::error(id, kefu_proto::ErrorCode::Unavailable, BUSY));
    }

    /// Posts a message that a full backlog keeps or cuts, never refuses
    /// (a session's coming or going, a frame, a close): there is nobody to
    /// answer, and it needs nobody.
    pub(super) fn post_kept(&mut self, to: usize, msg: ShardMsg) {
        debug_assert!(matches!(msg.overflow(), Overflow::Keep | Overflow::Cut(_)), "{msg:?} can be refused");
        let posted = self.post(to, msg);
        debug_assert!(posted, "a kept message was refused");
    }

    /// Posts a chat message to shard `to`.
    pub(super) fn post_chat(&mut self, to: usize, msg: ChatMsg) -> bool {
        self.post(to, ShardMsg::Chat(Box::new(msg)))
    }

    /// Moves what waits in the backlog into the inboxes, in order, up to
    /// the first that is still full; then, once there is room, the closes
    /// of connections that missed a frame. True if something still waits.
    pub fn retry_backlog(&mut self) -> bool {
        self.retry_held();
        // What reached this shard's own queue runs now; it may hold more back.
        self.settle();
        !self.backlog.is_empty()
    }

    fn retry_held(&mut self) {
        while let Some((to, msg)) = self.backlog.pop_front() {
            if to == self.me {
                self.own.push_back(msg);
                continue;
            }
            if let Err(msg) = self.mailboxes[to].send(self.me, msg) {
                self.backlog.push_front((to, msg));
                break;
            }
        }
        while self.backlog.len() < self.backlog_max
            && let Some(addr) = self.cut.pop_first()
        {
            let close = ShardMsg::Close { to: addr, code: crate::ws::close::SLOW_CONSUMER, reason: MISSED };
            self.backlog.push_back((addr.shard as usize, close));
        }
        self.stats[self.me].backlog.store(self.backlog.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes an already encoded frame to a connection, wherever it is.
    pub(super) fn write(&mut self, to: SessionAddr, bytes: SharedFrame) {
        self.write_with(to, bytes, Default::default());
    }

    /// [`Self::write`], handing `spare` (strings its shard's decoder
    /// filled) back to that shard along with the frame.
    pub(super) fn write_with(&mut self, to: SessionAddr, bytes: SharedFrame, spare: [Option<String>; 2]) {
        if to.shard as usize == self.me {
            if let Some(bytes) = self.pass(to, bytes) {
                self.local.push(Local::Deliver(to, bytes, spare));
            }
        } else {
            self.post_kept(to.shard as usize, ShardMsg::Deliver { to, bytes, spare });
        }
    }

    /// Encodes and writes one frame to one connection.
    pub(super) fn send(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        let bytes = self.frames.encode(codec, frame);
        self.write(to, bytes);
    }

    /// Sends one event to many sessions: encoded once per subprotocol.
    pub(super) fn deliver(&mut self, to: impl IntoIterator<Item = Member>, frame: &ServerFrame) {
        let mut encoded: [Option<SharedFrame>; 2] = [None, None];
        for m in to {
            let slot = usize::from(m.codec.is_binary());
            let bytes = encoded[slot].get_or_insert_with(|| self.frames.encode(m.codec, frame)).clone();
            self.write(m.addr, bytes);
        }
    }

    /// Closes a connection, wherever it is.
    pub(super) fn close(&mut self, to: SessionAddr, code: u16, reason: &'static str) {
        if to.shard as usize == self.me {
            self.held.remove(&to);
            self.local.push(Local::Close(to, code, reason));
        } else {
            self.post_kept(to.shard as usize, ShardMsg::Close { to, code, reason });
        }
    }

    // ---- durability ---------------------------------------------------

    /// Queues a write from this shard; `false` if storage's queue is full
    /// (nothing written).
    pub(super) fn submit(&mut self, op: WriteOp, then: Pending) -> bool {
        let token = self.next_token;
        self.next_token += 1;
        match self.writer.submit(self.me, token, op) {
            Ok(()) => {
                self.pending.insert(token, then);
                true
            }
            Err(_) => false,
        }
    }

    fn committed(&mut self, pending: Pending, op: WriteOp, duplicate: bool, seq: u64, ts: u64) {
        match (pending, op) {
            (Pending::Connected { to }, _) => self.announce(to),
            (Pending::Message { conv, seq: ours, sender }, WriteOp::AppendMessage(m)) => {
                self.message_committed(conv, ours, sender, m, duplicate, seq, ts)
            }
            (Pending::ConvChanged { reply, previous, route }, WriteOp::PutConversation(stored)) => {
                self.change_committed(stored, reply, previous, &route)
            }
            (Pending::Nothing, _) => {}
            // Storage hands back the very write submitted under the token:
            // an invariant of the boundary between the two, asserted.
            (Pending::Message { .. } | Pending::ConvChanged { .. }, op) => {
                unreachable!("storage completed a token with another write: {op:?}")
            }
        }
    }

    fn failed(&mut self, pending: Pending, error: kefu_storage::StorageError) {
        warn!(%error, "write failed");
        match pending {
            Pending::Connected { to } => self.connect_failed(to),
            Pending::Message { conv, seq, sender } => {
                self.reload(conv);
                // Resends that waited for this write fail with it: the seq
                // is free again, and a later message must not answer them.
                let waiters = self.dup_waiters.remove(&(conv, seq)).unwrap_or_default();
                for (to, codec, id) in sender.into_iter().chain(waiters) {
                    self.send(to, codec, &ServerFrame::error(id, error.code(), error.to_string()));
                }
            }
            Pending::ConvChanged { reply: Some((to, codec, id)), .. } => {
                self.send(to, codec, &ServerFrame::error(id, error.code(), error.to_string()));
            }
            Pending::ConvChanged { reply: None, .. } | Pending::Nothing => {}
        }
    }
}

/// A stored conversation as `kefu-core` restores it: the visitor's profile
/// from the users table (or just the id, if it was never stored) and the
/// last message's time, so `ts` never goes backwards.
pub(super) fn restored_conversation(
    reader: &Reader,
    rec: ConversationRecord,
    default_group: &str,
) -> Result<RestoredConversation, kefu_storage::StorageError> {
    let visitor = match reader.user(Role::Visitor, &rec.visitor_id)? {
        Some(u) => Visitor {
            id: Arc::from(u.id.as_str()),
            name: Arc::from(u.name.as_str()),
            meta: u.meta.into_iter().collect(),
        },
        None => Visitor {
            id: Arc::from(rec.visitor_id.as_str()),
            name: Arc::from(rec.visitor_id.as_str()),
            meta: Default::default(),
        },
    };
    let last_ts = match rec.last_seq {
        0 => rec.updated_ms,
        seq => reader.message(rec.id, seq)?.map_or(rec.updated_ms, |m| m.record.ts_ms),
    };
    Ok(RestoredConversation {
        id: ConvId(rec.id),
        visitor,
        status: rec.status,
        group: Arc::from(rec.group.as_deref().unwrap_or(default_group)),
        agent: rec.agent.map(|a| AgentRef { id: Arc::from(a.id.as_str()), name: Arc::from(a.name.as_str()) }),
        last_seq: rec.last_seq,
        last_ts,
    })
}
