//! One shard's chat service: its state, its inputs and its outputs (see the
//! module above for how the shards share the work).
//!
//! The machines (`kefu_core::chat`) decide; this loop carries out what
//! they ask for. Everything that must be durable before it is announced (a
//! new anonymous visitor, a message, a conversation's change) is a
//! `Submit` with a [`Pending`] that goes back to the machine that asked
//! once the group commit holding it has returned.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kefu_core::CoreConfig;
use kefu_core::auth::JwtKey;
use kefu_core::chat::directory::{Directory, Member};
use kefu_core::chat::edge::{Edge, EdgeConfig};
use kefu_core::chat::frames::SharedFrame;
use kefu_core::chat::home::{Durable, Home};
use kefu_core::chat::hooks::{Admission, Hook, Verdict};
use kefu_core::chat::outbox::{ConvState, Outbox, Output, Pending, Write};
use kefu_core::chat::router::Router;
use kefu_core::chat::stored::ReadError;
use kefu_core::chat::users::UserChanges;
use kefu_core::chat::{BRIDGE_SHARD, Change, Query};
use kefu_core::conversation::RestoredConversation;
use kefu_core::identity::{AgentRef, Meta, UserId, UserKey, Visitor, vip_level};
use kefu_core::per_ip::PerIpLimiter;
use kefu_core::routing::RestoredRoute;
use kefu_proto::client::{ClientFrame, Codec, ServerFrame};
use kefu_proto::ws::close;
use kefu_proto::{ConvId, Role};
use kefu_storage::{
    BlockRecord, Completion, Completions, ConversationRecord, PresenceRecord, ReadMark, Reader, Store,
    UserControlRecord, UserRecord, WriteOp, Writer,
};
use tracing::{info, warn};

use super::api::{Answer, Calls, HookSink};
use super::reads::Reads;
use super::{ChatMsg, ROUTER_SHARD, SessionAddr, ShardMsg};
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
    /// The business systems' calls waiting for their answers.
    pub calls: Arc<Calls>,
    /// Where hook calls go (none: every hook fails, as `hooks.failure` says).
    pub hooks: Option<Arc<dyn HookSink>>,
    /// `limits.anonymous_per_min_per_ip`, one table every shard shares
    /// (none: unlimited).
    pub anonymous_per_ip: Option<Arc<PerIpLimiter>>,
    /// `limits.attachment_bytes_per_min` by sender, one table every shard
    /// shares (none: unlimited).
    pub attachment_budgets: Option<Arc<PerIpLimiter>>,
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
/// cuts its connection (which resumes), a batch of queue positions is
/// skipped (those visitors see their place when it next moves; the router
/// posts one batch per shard per `routing.position_update_ms`, however long
/// the queue, so this takes a shard stuck for long), and what keeps the shards' state in
/// step (sessions, decisions, closes) is kept anyway: there are a few of
/// those per connection or routing command, not per message.
enum Overflow {
    /// Refused: whoever waits is answered `unavailable` ([`ChatService::refused`]).
    Refuse,
    /// A frame for this connection: not written; the connection is closed
    /// once its shard takes messages again, and the client resumes.
    Cut(SessionAddr),
    /// Not needed for correctness (a queue position): skipped, counted.
    Skip,
    /// State the shards must agree on: kept past the bound.
    Keep,
}

fn overflow(msg: &ShardMsg) -> Overflow {
    match msg {
        ShardMsg::Deliver { to, .. } => Overflow::Cut(*to),
        ShardMsg::Home { .. } => Overflow::Refuse,
        ShardMsg::Close { .. } => Overflow::Keep,
        ShardMsg::Chat(m) => match &**m {
            ChatMsg::Route { .. } | ChatMsg::Relay { .. } | ChatMsg::Hello { .. } => Overflow::Refuse,
            // Answering with the state changes nothing: refusable. Any
            // other change is a decision the router has applied: its
            // home must hear of it, or the two disagree for good.
            ChatMsg::Change {
                change: Change::Describe | Change::CloseClosed { .. }, reply: Some(_), ..
            } => Overflow::Refuse,
            ChatMsg::Positions { .. } => Overflow::Skip,
            ChatMsg::Change { .. }
            | ChatMsg::SessionUp { .. }
            | ChatMsg::SessionDown { .. }
            | ChatMsg::Welcome { .. }
            | ChatMsg::AgentGone { .. }
            | ChatMsg::Routed { .. }
            | ChatMsg::Hooked { .. }
            | ChatMsg::Query { .. }
            | ChatMsg::Profile { .. }
            | ChatMsg::Admitted { .. } => Overflow::Keep,
        },
    }
}

/// One shard's chat service: the loop around its machines. It feeds them
/// their inputs with the time and carries out their outputs: posts through
/// the mailboxes (or, for itself, straight to its own connections and
/// queue), writes through the store.
pub struct ChatService {
    me: usize,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    /// Kept so the writer thread lives as long as any shard.
    _store: Arc<Store>,
    writer: Writer,
    reads: Reads,
    completions: Completions,
    /// Writes submitted and not yet completed: what to do with each outcome.
    pending: HashMap<u64, Pending>,
    next_token: u64,
    edge: Edge,
    home: Home,
    /// Router (shard 0 only).
    pub(super) router: Option<Router>,
    pub(super) directory: Directory,
    /// The loop's own answers (the router's frames, refusals).
    pub(super) out: Outbox,
    /// Output for this shard's own connections.
    local: Vec<Local>,
    /// Messages for this shard itself, handled right after the input that
    /// posted them (see [`Self::post`]): never through its own inbox.
    own: VecDeque<ShardMsg>,
    /// Messages a full inbox could not take yet, with their shard, in the
    /// order they were posted: one queue for every shard, see [`Self::post`].
    backlog: VecDeque<(usize, ShardMsg)>,
    /// Connections elsewhere that missed a frame because the backlog was
    /// full: closed (so they resume) once the backlog has room.
    cut: BTreeSet<SessionAddr>,
    /// Every shard's counters (this one writes its own: backlog and overflow).
    stats: Arc<[ShardStats]>,
    /// `server.backlog_messages_max`.
    backlog_max: usize,
    /// Where answers to the business systems' calls go.
    calls: Arc<Calls>,
    hooks: Option<Arc<dyn HookSink>>,
    /// The business systems' changes to users in flight (router's shard).
    users: UserChanges,
}

/// Wall-clock milliseconds since the Unix epoch: the time the chat rules are fed.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Randomness for new anonymous visitors' ids and keys.
fn random() -> [u8; 16] {
    rand::random()
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
            calls,
            hooks,
            anonymous_per_ip,
            attachment_budgets,
        } = init;
        let shards = mailboxes.len();
        let jwt = JwtKey::new(jwt_secret.as_bytes(), core.auth.clone())
            .map_err(|e| anyhow::anyhow!("auth.jwt_secret: {e}"))?;
        // Dedupe lookups are for conversations homed here only.
        let reads = Reads {
            reader: store.reader().with_own_dedupe_cache(),
            default_group: core.routing.default_group.clone(),
        };
        let ShardRestore { conversations, router: routing } = restore;
        let router = routing.map(|(next_conv, routes)| {
            let (router, refused) = Router::new(core.clone(), shards, next_conv, routes, now_ms());
            if refused > 0 {
                warn!(count = refused, "router refused restored conversations");
            }
            router
        });
        info!(shard, open = conversations.len(), router = router.is_some(), "chat state restored");
        let home = Home::new(shard, shards, core.clone(), replay_bytes_max, conversations);
        let counts = stats[shard].edge.clone();
        let edge = Edge::new(
            shard,
            shards,
            EdgeConfig {
                core,
                jwt,
                allow_anonymous,
                heartbeat_s,
                held_frames_max,
                anonymous_per_ip,
                attachment_budgets,
                counts,
            },
        );
        Ok(Self {
            me: shard,
            mailboxes,
            writer: store.writer(),
            reads,
            completions: store.completions(shard),
            _store: store,
            pending: HashMap::new(),
            users: UserChanges::default(),
            next_token: 1,
            edge,
            home,
            router,
            directory: Directory::default(),
            out: Outbox::new(),
            local: Vec::new(),
            own: VecDeque::new(),
            backlog: VecDeque::new(),
            cut: BTreeSet::new(),
            stats,
            backlog_max,
            calls,
            hooks,
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

    /// Whether nothing this service started is still under way: no write
    /// waits for its commit, nothing waits for another shard's full inbox
    /// or to be handled here. What a drain waits for before it closes the
    /// connections, so that every command read is answered first.
    pub fn is_quiet(&self) -> bool {
        self.pending.is_empty()
            && self.backlog.is_empty()
            && self.own.is_empty()
            && self.completions.is_empty()
    }

    /// Handles one message from this shard's inbox (another shard posted it).
    pub fn handle(&mut self, msg: ShardMsg) {
        self.dispatch(msg);
        self.settle();
    }

    /// A decoded client frame from one of this shard's connections, opened
    /// from the client address `client`: a direct call from the
    /// connection's task, not a post.
    pub fn frame(&mut self, from: SessionAddr, client: Option<IpAddr>, codec: Codec, frame: ClientFrame) {
        self.edge.handle_client_frame(from, client, codec, frame, now_ms(), &self.reads, &mut random);
        self.settle();
    }

    /// One of this shard's connections has ended.
    pub fn gone(&mut self, from: SessionAddr) {
        self.edge.handle_gone(from);
        self.settle();
    }

    /// Answers a frame of this shard's connection that could not be
    /// decoded, after its `connect`: held until `connected` like every
    /// other frame for the session. (A new visitor's pipelined commands are
    /// answered once it is stored, so this refusal can come before their
    /// answers; each carries its own `id`.)
    pub fn answer(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        self.edge.answer(to, codec, frame);
        self.settle();
    }

    fn dispatch(&mut self, msg: ShardMsg) {
        let now = now_ms();
        match msg {
            ShardMsg::Deliver { to, bytes, spare, ts_ms } => self.local_write(to, bytes, spare, ts_ms),
            ShardMsg::Close { to, code, reason } => self.local_close(to, code, reason),
            ShardMsg::Home { reply, actor, request } => {
                self.home.handle_request(reply, &actor, request, now, &self.directory, &self.reads)
            }
            ShardMsg::Chat(msg) => match *msg {
                ChatMsg::SessionUp { addr, codec, actor, resume } => {
                    self.count_session(addr, actor.role, 1);
                    self.directory.add(actor.key(), Member { addr, codec });
                    self.home.handle_session_up(addr, codec, &actor, &resume, &self.reads);
                }
                ChatMsg::SessionDown { addr, user } => {
                    self.count_session(addr, user.role, u64::MAX);
                    self.directory.remove(&user, addr);
                    self.home.handle_session_down(addr);
                    self.route(|r| r.handle_session_down(addr, &user, now));
                }
                ChatMsg::Positions { updates } => self.home.handle_positions(&updates, &self.directory),
                ChatMsg::Welcome { reply, conversations } => {
                    self.edge.handle_welcome(reply, conversations, &self.reads)
                }
                ChatMsg::Routed { addr } => self.edge.handle_routed(addr),
                ChatMsg::Hooked { token, verdict } => self.home.handle_hook(token, verdict, now, &self.reads),
                ChatMsg::Query { call, query } => self.query(call, query),
                ChatMsg::Profile { visitor, name, meta } => {
                    self.home.handle_profile(&visitor, name.as_deref(), &meta, &self.directory)
                }
                ChatMsg::Admitted { token, admission } => {
                    self.edge.handle_admission(token, admission, now, &self.reads, &mut random)
                }
                ChatMsg::Change { conv, change, reply, route } => {
                    self.home.handle_change(conv, change, reply, route, now, &self.reads)
                }
                ChatMsg::Hello { reply, identity } => self.route(|r| r.handle_hello(reply, identity, now)),
                ChatMsg::AgentGone { agent, device } => {
                    self.route(|r| r.handle_agent_gone(&agent, device, now))
                }
                ChatMsg::Route { reply, actor, request } => {
                    self.route(|r| r.handle_route(reply, actor, request, now))
                }
                ChatMsg::Relay { reply, actor, request } => {
                    self.route(|r| r.handle_relay(reply, actor, request))
                }
            },
        }
    }

    /// This shard's own counters.
    pub(super) fn own_stats(&self) -> &ShardStats {
        &self.stats[self.me]
    }

    /// Adds `delta` (1, or `u64::MAX` for -1) to this shard's sessions of
    /// `role`, if the session is on one of its connections: every shard
    /// hears of every session, only its own shard counts it.
    fn count_session(&self, addr: SessionAddr, role: Role, delta: u64) {
        if usize::from(addr.shard) == self.me
            && let Some(i) = Role::ALL.iter().position(|r| *r == role)
        {
            self.stats[self.me].sessions[i].fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Carries out every machine's outputs, then runs what this shard
    /// posted to itself, in the order posted, until nothing is left: a
    /// direct call, after the input (calling at once would re-enter a
    /// machine half-way through its handler).
    fn settle(&mut self) {
        loop {
            self.carry();
            let Some(msg) = self.own.pop_front() else { return };
            self.dispatch(msg);
        }
    }

    /// Carries out the machines' outputs until none has any.
    fn carry(&mut self) {
        loop {
            if let Some(out) = self.edge.poll_output() {
                self.output(out);
            } else if let Some(out) = self.home.poll_output() {
                self.output(out);
            } else if let Some(out) = self.out.pop() {
                self.output(out);
            } else if self.router.is_some() && self.carry_router() {
                continue;
            } else {
                return;
            }
        }
    }

    fn output(&mut self, out: Output) {
        match out {
            Output::Post { to, msg } => self.post(to, msg),
            Output::Submit { write, then } => self.submit(write, then),
            Output::Hook { token, call } => {
                let hook = call.hook();
                let refused = match &self.hooks {
                    Some(hooks) => hooks.call(self.me, token, call).err(),
                    None => Some("no hook endpoint".to_string()),
                };
                if let Some(why) = refused {
                    self.hook_failed(hook, token, why);
                }
            }
        }
    }

    /// A hook call that was not made (no endpoint, or the calls waiting
    /// are at their bound) fails at once: its machine hears so directly.
    fn hook_failed(&mut self, hook: Hook, token: u64, why: String) {
        let now = now_ms();
        match hook {
            Hook::OnConnect => {
                let failed = Admission::Failed { why };
                self.edge.handle_admission(token, failed, now, &self.reads, &mut random);
            }
            Hook::OnMessage => self.home.handle_hook(token, Verdict::Failed { why }, now, &self.reads),
        }
    }

    /// Answers a business system's question from what the machines hold.
    fn query(&mut self, call: u64, query: Query) {
        let answer = match query {
            Query::Presence { agents } => {
                let routing = self.router.as_ref().map(Router::routing);
                let known = |id: &UserId| routing.and_then(|r| r.agent(id));
                Answer::Presence(match (routing, agents.is_empty()) {
                    (Some(r), true) => r.agents().collect(),
                    _ => agents.iter().filter_map(known).collect(),
                })
            }
            Query::Disconnect { user } => {
                let sessions: Vec<Member> = self.directory.sessions_of(&user).collect();
                for m in &sessions {
                    self.out.close(m.addr, close::SERVER_SHUTDOWN, "disconnected by the business system");
                }
                Answer::Disconnected(u32::try_from(sessions.len()).unwrap_or(u32::MAX))
            }
            Query::SyncUser { user, name, meta } => {
                let change = self.users.sync(call, user, name, meta, now_ms(), &self.reads);
                return self.change_user(call, change);
            }
            Query::Block { visitor, block } => {
                let change = self.users.block(call, UserKey::visitor(visitor), block, &self.reads);
                return self.change_user(call, change);
            }
        };
        self.calls.resolve(call, answer);
    }

    /// Starts a business system's change to a user (see
    /// `kefu_core::chat::users`): its first write, chained to the next.
    fn change_user(&mut self, call: u64, change: Result<(Write, Pending), ReadError>) {
        match change {
            Ok((write, then)) => self.submit(write, then),
            Err(e) => self.calls.resolve(call, Answer::Failed { code: e.code, message: e.message }),
        }
    }

    /// A write of a business system's change to a user is durable: the
    /// next one goes, or the change is done. Then a visitor's new profile
    /// is shown in its open conversations, and a blocked user's sessions
    /// are closed, wherever they are.
    fn user_changed(&mut self, user: UserKey, call: u64, next: Option<Box<Write>>, close: bool, op: WriteOp) {
        if let Some(next) = next {
            return self.submit(*next, Pending::UserChanged { user, call, next: None, close });
        }
        self.users.done(&user);
        if let WriteOp::PutUser(u) = op
            && u.role == Role::Visitor
        {
            let meta: Meta = u.meta.into_iter().collect();
            for shard in 0..self.mailboxes.len() {
                let visitor = UserId::from(u.id.as_str());
                let profile = ChatMsg::Profile { visitor, name: Some(u.name.clone()), meta: meta.clone() };
                self.post(shard, ShardMsg::Chat(Box::new(profile)));
            }
        }
        if !close {
            return self.calls.resolve(call, Answer::Done);
        }
        let sessions: Vec<Member> = self.directory.sessions_of(&user).collect();
        for m in &sessions {
            self.out.close(m.addr, close::BLOCKED, "blocked");
        }
        self.calls.resolve(call, Answer::Disconnected(u32::try_from(sessions.len()).unwrap_or(u32::MAX)));
    }

    /// Answers for a post a full backlog refused: whoever waits for it is
    /// told `unavailable`; a session that could not be announced is closed
    /// (it reconnects).
    fn refused(&mut self, msg: ShardMsg) {
        let reply = match msg {
            ShardMsg::Home { reply, .. } => reply,
            ShardMsg::Chat(chat) => match *chat {
                ChatMsg::Hello { reply: (addr, _, _), .. } => {
                    return self.out.close(addr, close::SERVER_SHUTDOWN, "server busy; reconnect");
                }
                ChatMsg::Route { reply, .. } | ChatMsg::Relay { reply, .. } => {
                    // Never reached the router: the edge stops waiting for it.
                    self.edge.handle_routed(reply.0);
                    reply
                }
                other => match other.reply() {
                    Some(reply) => reply,
                    None => unreachable!("a kept message was refused: {other:?}"),
                },
            },
            other @ (ShardMsg::Deliver { .. } | ShardMsg::Close { .. }) => {
                unreachable!("a frame or close was refused: {other:?}")
            }
        };
        self.out.error(reply, kefu_proto::ErrorCode::Unavailable, BUSY);
    }

    /// Applies every storage completion that has arrived.
    pub fn poll_completions(&mut self) {
        while let Some(Completion { token, result, op }) = self.completions.pop() {
            let Some(pending) = self.pending.remove(&token) else { continue };
            match result {
                Ok(c) => self.committed(
                    pending,
                    op,
                    Durable { seq: c.seq, ts_ms: c.ts_ms, duplicate: c.duplicate },
                ),
                Err(e) => {
                    warn!(error = %e, "write failed");
                    self.failed(pending, &ReadError { code: e.code(), message: e.to_string() });
                }
            }
        }
        self.settle();
    }

    /// When [`Self::tick`] next has something to do (wall-clock ms), if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let routing = self.router.as_ref().and_then(Router::next_deadline);
        match (routing, self.edge.next_expiry_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the shard loop should next call in, if nothing arrives before:
    /// now, if messages wait for another shard's full inbox (the loop
    /// retries them shortly); else at the next deadline.
    pub fn wants_time_ms(&self) -> Option<u64> {
        if self.backlog.is_empty() { self.next_deadline_ms() } else { Some(0) }
    }

    /// Time passes: offline grace periods that ended by now take effect,
    /// and sessions whose token expired are ended.
    pub fn tick(&mut self) {
        let now = now_ms();
        self.edge.expire(now);
        self.route(|r| r.handle_tick(now));
        self.settle();
    }

    /// What to write to this shard's own connections, in order.
    pub fn take_local(&mut self) -> std::vec::Drain<'_, Local> {
        self.local.drain(..)
    }

    // ---- output -------------------------------------------------------

    fn local_write(&mut self, to: SessionAddr, bytes: SharedFrame, spare: [Option<String>; 2], ts_ms: u64) {
        match self.edge.pass(to, bytes) {
            Some(bytes) => {
                if ts_ms != 0 {
                    let stats = &self.stats[self.me];
                    ShardStats::inc(&stats.chat_messages_out);
                    stats.delivery_latency.observe(now_ms().saturating_sub(ts_ms) * 1000);
                }
                self.local.push(Local::Deliver(to, bytes, spare))
            }
            None => self.local.push(Local::Spare(spare)),
        }
    }

    fn local_close(&mut self, to: SessionAddr, code: u16, reason: &'static str) {
        self.edge.closing(to);
        self.local.push(Local::Close(to, code, reason));
    }

    /// Puts a message in shard `to`'s inbox. For this shard itself: a
    /// frame or a close for one of its connections is written at once;
    /// anything else goes to the queue [`Self::settle`] runs once the
    /// current input is handled.
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
    /// Past `server.backlog_messages_max` waiting, what happens depends on
    /// the message ([`Overflow`]); one that is refused is answered at once
    /// ([`Self::refused`]).
    pub(super) fn post(&mut self, to: usize, msg: ShardMsg) {
        if to == usize::from(BRIDGE_SHARD) {
            // A call's answer: straight to its caller, from any shard. The
            // rest (`Routed` for a call's routing command) is the edge's
            // bookkeeping, which the bridge does not need.
            if let ShardMsg::Deliver { to, bytes, .. } = msg {
                self.calls.answer(to, &bytes);
            }
            return;
        }
        if to == self.me {
            match msg {
                ShardMsg::Deliver { to, bytes, spare, ts_ms } => {
                    return self.local_write(to, bytes, spare, ts_ms);
                }
                ShardMsg::Close { to, code, reason } => return self.local_close(to, code, reason),
                _ => {}
            }
        }
        // The inbox loop retries only between batches, and a batch lasts as
        // long as other shards keep this inbox fed: try here too.
        if !self.backlog.is_empty() {
            self.retry_held();
        }
        if self.backlog.is_empty() {
            if to == self.me {
                self.own.push_back(msg);
                return;
            }
            if let Err(msg) = self.mailboxes[to].send(self.me, msg) {
                warn!(from = self.me, to, "shard inbox full: holding messages back");
                self.hold(to, msg);
            }
            return;
        }
        if self.backlog.len() < self.backlog_max {
            return self.hold(to, msg);
        }
        let stats = &self.stats[self.me];
        match overflow(&msg) {
            Overflow::Refuse => {
                ShardStats::inc(&stats.posts_refused);
                self.refused(msg);
            }
            Overflow::Cut(addr) => {
                ShardStats::inc(&stats.frames_cut);
                if self.cut.insert(addr) {
                    warn!(from = self.me, to, "shard stuck: a connection missed a frame and will be closed");
                }
            }
            Overflow::Skip => ShardStats::inc(&stats.posts_skipped),
            Overflow::Keep => self.hold(to, msg),
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
        self.stats[self.me].backlog.store(self.backlog.len() as u64, Ordering::Relaxed);
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
            let close = ShardMsg::Close { to: addr, code: close::SLOW_CONSUMER, reason: MISSED };
            self.backlog.push_back((addr.shard as usize, close));
        }
        self.stats[self.me].backlog.store(self.backlog.len() as u64, Ordering::Relaxed);
    }

    // ---- durability ---------------------------------------------------

    /// Queues a write from this shard; if storage's queue is full, nothing
    /// is written and the machine that asked hears so at once.
    pub(super) fn submit(&mut self, write: Write, then: Pending) {
        let token = self.next_token;
        self.next_token += 1;
        match self.writer.submit(self.me, token, write_op(write)) {
            Ok(()) => {
                self.pending.insert(token, then);
            }
            Err(e) => {
                warn!(error = %e, "storage queue full: write refused");
                self.failed(
                    then,
                    &ReadError {
                        code: kefu_proto::ErrorCode::Unavailable,
                        message: "storage busy; retry".into(),
                    },
                );
            }
        }
    }

    fn committed(&mut self, pending: Pending, op: WriteOp, durable: Durable) {
        let now = now_ms();
        if let (Pending::Message { sender: Some(_), .. }, WriteOp::AppendMessage(m)) = (&pending, &op) {
            self.stats[self.me].ack_latency.observe(now.saturating_sub(m.ts) * 1000);
        }
        match pending {
            Pending::Nothing => {}
            Pending::UserChanged { user, call, next, close } => {
                self.user_changed(user, call, next, close, op)
            }
            Pending::Connected { .. } => self.edge.handle_committed(pending, now, &self.reads, &mut random),
            pending => match handed_back(op) {
                Some(write) => {
                    self.home.handle_committed(pending, write, durable, now, &self.directory, &self.reads)
                }
                // Storage hands back the very write submitted under the
                // token: an invariant of the boundary, asserted.
                None => unreachable!("storage completed a home's token with another write"),
            },
        }
    }

    fn failed(&mut self, pending: Pending, error: &ReadError) {
        match pending {
            Pending::UserChanged { user, call, .. } => {
                self.users.done(&user);
                self.calls.resolve(call, Answer::Failed { code: error.code, message: error.message.clone() })
            }
            Pending::Connected { .. } => self.edge.handle_failed(pending, error),
            pending => self.home.handle_failed(pending, error, &self.reads),
        }
    }
}

/// The store's write for a machine's.
fn write_op(write: Write) -> WriteOp {
    match write {
        Write::Message(msg) => WriteOp::AppendMessage(msg),
        Write::Conversation(c) => WriteOp::PutConversation(ConversationRecord {
            id: c.conv.0,
            visitor_id: c.visitor_id,
            status: c.status,
            agent: c.agent.map(|a| kefu_storage::AgentRef { id: a.id, name: a.name }),
            group: c.group,
            created_ms: c.at_ms,
            updated_ms: c.at_ms,
            last_seq: 0,
        }),
        Write::User(p) => WriteOp::PutUser(UserRecord {
            id: p.id,
            role: p.role,
            name: p.name,
            meta: p.meta,
            visitor_key_hash: p.visitor_key_hash,
            created_ms: p.created_ms,
        }),
        Write::Control { user, control } => WriteOp::PutControl {
            role: user.role,
            id: user.id.to_string(),
            control: UserControlRecord {
                synced_name: control.name,
                synced_meta: control.meta,
                block: control.block.map(|b| BlockRecord {
                    until_ms: b.until_ms,
                    reason: b.reason,
                    at_ms: b.at_ms,
                }),
            },
        },
        Write::Presence { agent, status, at_ms } => WriteOp::LogPresence(PresenceRecord {
            agent_id: agent.to_string(),
            status: status.as_str().to_string(),
            ts_ms: at_ms,
        }),
        Write::Read { conv, user, seq, ts_ms } => {
            WriteOp::MarkRead(ReadMark { conv: conv.0, user_id: user.id.to_string(), seq, ts_ms })
        }
    }
}

/// The machine's write back from a completion, for the writes whose
/// commit a machine acts on (messages and conversation changes).
fn handed_back(op: WriteOp) -> Option<Write> {
    match op {
        WriteOp::AppendMessage(msg) => Some(Write::Message(msg)),
        WriteOp::PutConversation(c) => Some(Write::Conversation(ConvState {
            conv: ConvId(c.id),
            visitor_id: c.visitor_id,
            status: c.status,
            agent: c.agent.map(|a| kefu_proto::client::AgentRef { id: a.id, name: a.name }),
            group: c.group,
            at_ms: c.updated_ms,
        })),
        _ => None,
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
        since_ms: rec.updated_ms,
    })
}
