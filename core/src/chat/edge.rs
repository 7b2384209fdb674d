//! The edge: the sessions of the connections one shard accepted. It runs
//! `connect` (credentials, then the business system's `OnConnect` hook if
//! `hooks.on_connect`, then a new anonymous visitor made durable), checks
//! every later command where it arrived (identity, role, rate
//! limit, sizes: a refused command costs no other shard anything) and
//! posts it to the conversation's home or to the router. It holds the
//! frames for a session until its `connected` is written, so a client
//! never sees traffic before `connected`.
//!
//! Sans-IO, like the other machines: `handle_*` in with the time, outputs
//! through [`Edge::poll_output`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kefu_proto::client::{
    CannedReply, ClientFrame, Codec, Command, ConvSummary, Event, Sender, ServerFrame, User,
};
use kefu_proto::ws::close;
use kefu_proto::{ConvId, ConvStatus, ErrorCode, Role};

use super::frames::SharedFrame;
use super::hooks::{Admission, HookCall};
use super::outbox::{Outbox, Output, Pending, Profile, Write};
use super::stored::{ReadError, Stored};
use super::{ChatMsg, ROUTER_SHARD, Reply, SessionAddr, ShardMsg, device_of};
use crate::CoreConfig;
use crate::auth::{Credentials, JwtKey, VisitorKey, VisitorKeyHash, anonymous_id, anonymous_identity};
use crate::config::HookFailure;
use crate::per_ip::PerIpLimiter;
use crate::session::{Checked, HomeRequest, Session, SessionError};

/// Commands kept for a session until it is let in (its `OnConnect` verdict
/// came and, for a new anonymous visitor, it is durable); past this they
/// are refused with `bad_command` (a client that pipelines more than this
/// behind `connect` is misbehaving, and the wait is one hook call or about
/// one group commit).
pub const PIPELINED_WHILE_STORING_MAX: usize = 16;

/// What the edge is configured with.
pub struct EdgeConfig {
    /// The product rules' configuration.
    pub core: Arc<CoreConfig>,
    /// The key tokens are checked with.
    pub jwt: JwtKey,
    /// `auth.allow_anonymous`.
    pub allow_anonymous: bool,
    /// `server.heartbeat_s`, told to clients in `connected`.
    pub heartbeat_s: u32,
    /// Frames held for a session until its `connected` is written; past
    /// this it is cut as a slow consumer.
    pub held_frames_max: usize,
    /// `limits.anonymous_per_min_per_ip`: new anonymous visitors by client
    /// address, one table shared by every shard's edge (see
    /// [`crate::per_ip`] for why shared). `None`: unlimited.
    pub anonymous_per_ip: Option<Arc<PerIpLimiter>>,
    /// `limits.attachment_bytes_per_min`: attachment bytes by sender (role
    /// and id), one table shared by every shard's edge, so a sender's
    /// connections on any shard spend one budget. `None`: unlimited.
    pub attachment_budgets: Option<Arc<PerIpLimiter>>,
    /// This shard's refusals, for `/metrics`.
    pub counts: Arc<EdgeCounts>,
}

/// What the edge's limits refused, counted for `/metrics` (one per shard;
/// relaxed atomics, written by the shard alone).
#[derive(Debug, Default)]
pub struct EdgeCounts {
    /// `connect`s of new anonymous visitors refused `rate_limited`
    /// (`limits.anonymous_per_min_per_ip`).
    pub anonymous_refused: AtomicU64,
    /// `send`s refused `rate_limited` for their attachment
    /// (`limits.attachment_bytes_per_min`).
    pub attachments_refused: AtomicU64,
}

impl EdgeCounts {
    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a connection is in its `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The `OnConnect` hook is deciding whether to let it in. Known nowhere
    /// else yet: commands wait, as while [`Stage::Storing`].
    Admitting,
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

impl Stage {
    /// Not yet announced to any other shard: its commands wait here.
    fn unannounced(self) -> bool {
        matches!(self, Stage::Admitting | Stage::Storing)
    }
}

/// A session waiting for its `OnConnect` verdict.
struct Admitting {
    addr: SessionAddr,
    /// A new anonymous visitor's profile, stored once it is let in.
    profile: Option<Profile>,
}

/// One connection of this shard, as its edge knows it.
struct Sess {
    codec: Codec,
    session: Session,
    stage: Stage,
    /// What only `connect` needs, dropped once `connected` is written.
    connecting: Option<Box<Connecting>>,
    /// `Route`s and `Relay`s sent to the router and not yet `Routed`: while
    /// any are, commands for homes are relayed too.
    routing: u32,
    /// When the token it connected with stops being valid (a token
    /// session; anonymous visitors have no expiry).
    expires_ms: Option<u64>,
}

/// A session's state from its `connect` to its `connected`. Boxed apart
/// from [`Sess`] because a connected session, which is what a gateway
/// holds tens of thousands of, needs none of it (~90 bytes each).
struct Connecting {
    /// The `connect`'s id.
    id: Option<i64>,
    /// The resume map, until the session is announced.
    resume: Vec<(ConvId, u64)>,
    /// A new anonymous visitor's key, shown once in `connected`.
    visitor_key: Option<String>,
    /// Commands pipelined behind `connect` while the session was being
    /// admitted or stored, served once it is announced.
    pipelined: Vec<ClientFrame>,
}

/// The sessions of one shard's connections.
pub struct Edge {
    me: usize,
    shards: usize,
    config: EdgeConfig,
    /// Boxed for the reason `Home` boxes its conversations: a `Sess` is a
    /// few hundred bytes and a grown map leaves up to half its slots empty.
    sessions: HashMap<SessionAddr, Box<Sess>>,
    /// Frames waiting for their session's `connected`.
    held: HashMap<SessionAddr, Vec<SharedFrame>>,
    /// Sessions cut for holding too much before `connected`: nothing more
    /// is written to them (a frame after the cut would reach the client
    /// before `connected`, ahead of the close) until their close is done.
    cut: BTreeSet<SessionAddr>,
    /// `OnConnect` calls out, by token. An entry whose connection has gone
    /// stays until its verdict (which always comes) and is then dropped.
    admitting: HashMap<u64, Admitting>,
    next_hook: u64,
    /// Token sessions by when their token expires, soonest first: the
    /// shard asks for the first one after every input, so it is kept
    /// ordered rather than found by a sweep.
    expiries: BTreeSet<(u64, SessionAddr)>,
    out: Outbox,
}

impl Edge {
    /// Shard `me`'s edge, of `shards`.
    pub fn new(me: usize, shards: usize, config: EdgeConfig) -> Edge {
        Edge {
            me,
            shards,
            config,
            sessions: HashMap::new(),
            held: HashMap::new(),
            cut: BTreeSet::new(),
            admitting: HashMap::new(),
            next_hook: 0,
            expiries: BTreeSet::new(),
            out: Outbox::new(),
        }
    }

    /// The next thing to carry out.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop()
    }

    /// Sessions on this shard (connected or connecting).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// A frame for one of this shard's connections: handed back to be
    /// written, unless its session is still waiting for `connected`, in
    /// which case it is held (and past `held_frames_max`, the connection is
    /// closed as a slow consumer).
    pub fn pass(&mut self, to: SessionAddr, bytes: SharedFrame) -> Option<SharedFrame> {
        if self.held.is_empty() && self.cut.is_empty() {
            return Some(bytes);
        }
        if self.cut.contains(&to) {
            return None;
        }
        let Some(held) = self.held.get_mut(&to) else { return Some(bytes) };
        if held.len() >= self.config.held_frames_max {
            self.held.remove(&to);
            self.cut.insert(to);
            self.out.close(to, close::SLOW_CONSUMER, "too much before connected");
        } else {
            held.push(bytes);
        }
        None
    }

    /// One of this shard's connections is being closed: nothing more is
    /// held for it.
    pub fn closing(&mut self, to: SessionAddr) {
        self.held.remove(&to);
        self.cut.remove(&to);
    }

    /// Answers a frame of this shard's connection directly (one that could
    /// not be decoded, or a refused post): held until `connected` like
    /// every other frame for the session.
    pub fn answer(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        self.out.send(to, codec, frame);
    }

    /// A decoded frame from one of this shard's connections, whose client
    /// address is unknown (or not limited): as [`Edge::handle_client_frame`]
    /// with none.
    pub fn handle_frame(
        &mut self,
        from: SessionAddr,
        codec: Codec,
        frame: ClientFrame,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        self.handle_client_frame(from, None, codec, frame, now_ms, store, random);
    }

    /// A decoded frame from one of this shard's connections, opened from
    /// `client` (the address the per-address limits count; `None` counts
    /// nowhere).
    #[allow(clippy::too_many_arguments)] // the inputs of one event, as in every handle_*
    pub fn handle_client_frame(
        &mut self,
        from: SessionAddr,
        client: Option<IpAddr>,
        codec: Codec,
        frame: ClientFrame,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        let id = frame.id;
        let reply = (from, codec, id);
        if let Command::Connect { token, visitor_id, visitor_key, resume } = frame.body {
            let resume = resume.into_iter().collect();
            let creds = (token, visitor_id, visitor_key);
            return self.on_connect(reply, client, creds, resume, now_ms, store, random);
        }
        // The timer may not have fired yet, or the close is on its way: a
        // command never rides on an expired token.
        if self.sessions.get(&from).and_then(|s| s.expires_ms).is_some_and(|t| now_ms >= t) {
            if !self.expire_session(from) {
                self.out.error(reply, ErrorCode::Unauthorized, "token expired");
            }
            return;
        }
        let Some(sess) = self.sessions.get_mut(&from) else {
            if matches!(frame.body, Command::Ping) {
                // No session (its connect was refused without a close):
                // `ping` needs none.
                return self.out.send(from, codec, &ServerFrame::reply(id, Event::Pong));
            }
            self.out.error(reply, ErrorCode::Unauthorized, "send connect first");
            self.out.close(from, close::UNAUTHORIZED, "connect first");
            return;
        };
        // A session waiting for its `Welcome` may already send: every shard
        // knows it (SessionUp went first), and answers are held until
        // `connected`. One not yet let in by the hook, or a visitor not yet
        // durable, is known nowhere else yet, so its commands (a `ping`
        // too) wait here until it is.
        if sess.stage.unannounced() {
            match sess.connecting.as_mut() {
                Some(c) if c.pipelined.len() < PIPELINED_WHILE_STORING_MAX => c.pipelined.push(frame),
                _ => self.out.error(reply, ErrorCode::BadCommand, "connect is still in progress"),
            }
            return;
        }
        let request = match sess.session.check(frame.body, now_ms) {
            Ok(r) => r,
            Err(e) => return self.out.error(reply, e.code(), e.to_string()),
        };
        let Some(actor) = sess.session.actor() else { return };
        if let Checked::Home(HomeRequest::Send { attachment: Some(a), .. }) = &request
            && let Some(budgets) = &self.config.attachment_budgets
            && let Err(wait) = budgets.try_take_n_for(&(actor.role, &*actor.id), a.data.len() as u64, now_ms)
        {
            EdgeCounts::inc(&self.config.counts.attachments_refused);
            let e = SessionError::AttachmentBudget(wait);
            return self.out.error(reply, e.code(), e.to_string());
        }
        // A command for a home behind a routing command of this session
        // goes through the router, after that command's decision.
        match request {
            Checked::Pong => self.out.send(from, codec, &ServerFrame::reply(id, Event::Pong)),
            // Every shard has the whole config: no other shard is asked.
            Checked::Canned => {
                let replies = (self.config.core.rules.canned.iter())
                    .map(|c| CannedReply { name: c.name.clone(), text: c.text.clone() })
                    .collect();
                self.out.send(from, codec, &ServerFrame::reply(id, Event::Canned { replies }));
            }
            Checked::Route(request) => {
                sess.routing += 1;
                self.out.post_chat(ROUTER_SHARD, ChatMsg::Route { reply, actor, request });
            }
            Checked::Home(request) if sess.routing > 0 => {
                sess.routing += 1;
                self.out.post_chat(ROUTER_SHARD, ChatMsg::Relay { reply, actor, request });
            }
            Checked::Home(request) => {
                let home = request.conv().home(self.shards);
                self.out.post(home, ShardMsg::Home { reply, actor, request });
            }
        }
    }

    /// The router has handled one of this session's `Route`s or `Relay`s
    /// (or one was never posted: a full backlog refused it).
    pub fn handle_routed(&mut self, addr: SessionAddr) {
        if let Some(sess) = self.sessions.get_mut(&addr) {
            sess.routing = sess.routing.saturating_sub(1);
        }
    }

    #[allow(clippy::too_many_arguments)] // the inputs of one event, as in every handle_*
    fn on_connect(
        &mut self,
        reply: Reply,
        client: Option<IpAddr>,
        (token, visitor_id, visitor_key): (Option<String>, Option<String>, Option<String>),
        resume: Vec<(ConvId, u64)>,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        let (from, codec, id) = reply;
        if self.sessions.contains_key(&from) {
            return self.out.error(reply, ErrorCode::BadCommand, "already connected");
        }
        let refuse = |out: &mut Outbox, why: String| {
            out.error(reply, ErrorCode::Unauthorized, why);
            out.close(from, close::UNAUTHORIZED, "unauthorized");
        };
        let creds = match Credentials::classify(
            token.as_deref(),
            visitor_id.as_deref(),
            visitor_key.as_deref(),
            self.config.allow_anonymous,
        ) {
            Ok(c) => c,
            Err(e) => return refuse(&mut self.out, e.to_string()),
        };
        let mut expires_ms = None;
        let (identity, new_key) = match creds {
            Credentials::Token(t) => match self.config.jwt.verify(t, now_ms) {
                Ok(claims) => {
                    expires_ms = Some(self.config.jwt.valid_until_ms(&claims));
                    (claims.into_identity(), None)
                }
                Err(e) => return refuse(&mut self.out, e.to_string()),
            },
            Credentials::Returning { visitor_id, key } => {
                let stored = match store.user(Role::Visitor, visitor_id) {
                    Ok(u) => u,
                    Err(e) => return self.out.error(reply, e.code, e.message),
                };
                let ok = stored
                    .as_ref()
                    .and_then(|u| u.visitor_key_hash)
                    .is_some_and(|h| VisitorKeyHash(h).verify(&key));
                match (ok, stored) {
                    (true, Some(u)) => {
                        let mut identity =
                            anonymous_identity(Arc::from(u.id.as_str()), u.meta.into_iter().collect());
                        // The name agents knew it by: ids issued before
                        // they began with the time took their name from
                        // their first digits, not their last.
                        if !u.name.is_empty() {
                            identity.name = Arc::from(u.name);
                        }
                        (identity, None)
                    }
                    _ => return refuse(&mut self.out, "unknown visitor or wrong visitor_key".into()),
                }
            }
            Credentials::NewAnonymous => {
                // Before anything is made or stored: a script minting
                // identities from one address gets `rate_limited` (the
                // connection stays open; it may retry after the wait, or
                // come back with a key it already has).
                let limiter = self.config.anonymous_per_ip.as_ref().zip(client);
                if let Some(Err(wait)) = limiter.map(|(l, ip)| l.try_take(ip, now_ms)) {
                    EdgeCounts::inc(&self.config.counts.anonymous_refused);
                    let message = format!(
                        "rate limited: retry after {} ms (new anonymous visitors from this address, \
                         limits.anonymous_per_min_per_ip)",
                        wait.0
                    );
                    return self.out.error(reply, ErrorCode::RateLimited, message);
                }
                let vid = anonymous_id(now_ms, random());
                let key = VisitorKey::from_random(random());
                (anonymous_identity(vid, Default::default()), Some(key))
            }
        };
        // What the business system set: a block refuses the user; synced
        // keys override the credentials' key by key (a new anonymous
        // visitor has none yet).
        let mut identity = identity;
        if new_key.is_none() {
            let control = match store.control(identity.role, &identity.id) {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return self.out.error(reply, e.code, e.message),
            };
            if let Some(block) = control.block.filter(|b| b.holds_at(now_ms)) {
                let reason = if block.reason.is_empty() { "blocked".to_string() } else { block.reason };
                self.out.error(reply, ErrorCode::Forbidden, reason);
                return self.out.close(from, close::BLOCKED, "blocked");
            }
            if let Some(name) = control.name {
                identity.name = Arc::from(name);
            }
            if identity.role == Role::Visitor {
                identity.meta.extend(control.meta);
            }
        }
        let mut session = Session::new(self.config.core.clone(), now_ms);
        if let Err(e) = session.connect(identity.clone()) {
            return refuse(&mut self.out, e.to_string());
        }
        if let Err(e) = session.check_resume(resume.len()) {
            return self.out.error(reply, e.code(), e.to_string());
        }
        let hooked = self.config.core.hooks.on_connect;
        let stage = match (hooked, &new_key) {
            (true, _) => Stage::Admitting,
            (false, Some(_)) => Stage::Storing,
            (false, None) => Stage::Welcoming,
        };
        let sess = Sess {
            codec,
            session,
            stage,
            connecting: Some(Box::new(Connecting {
                id,
                resume,
                visitor_key: new_key.as_ref().map(VisitorKey::to_hex),
                pipelined: Vec::new(),
            })),
            routing: 0,
            expires_ms,
        };
        self.sessions.insert(from, Box::new(sess));
        if let Some(t) = expires_ms {
            self.expiries.insert((t, from));
        }
        // `connected` is the first frame the session gets: whatever is
        // written to it before (answers to pipelined commands) waits.
        self.held.insert(from, Vec::new());
        // The key must survive any crash before the visitor sees it; it is
        // stored once the visitor is let in (a refused one leaves nothing).
        let profile = new_key.map(|key| Profile {
            role: Role::Visitor,
            id: identity.id.to_string(),
            name: identity.name.to_string(),
            meta: Vec::new(),
            visitor_key_hash: Some(key.hash().0),
            created_ms: now_ms,
        });
        if hooked {
            self.next_hook += 1;
            let token = self.next_hook;
            self.admitting.insert(token, Admitting { addr: from, profile });
            let user =
                Sender { role: identity.role, id: identity.id.to_string(), name: identity.name.to_string() };
            return self.out.hook(token, HookCall::OnConnect { user, meta: identity.meta });
        }
        self.let_in(from, profile, now_ms, store, random);
    }

    /// A session its hook let in (or no hook was asked): a new anonymous
    /// visitor is stored first, anyone else announced at once.
    fn let_in(
        &mut self,
        addr: SessionAddr,
        profile: Option<Profile>,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        match profile {
            Some(profile) => {
                if let Some(sess) = self.sessions.get_mut(&addr) {
                    sess.stage = Stage::Storing;
                }
                self.out.submit(Write::User(profile), Pending::Connected { to: addr });
            }
            None => self.announce(addr, now_ms, store, random),
        }
    }

    /// The `OnConnect` verdict for a session waiting here: let in with its
    /// profile enriched, refused (`unauthorized`, close 4500), or, with no
    /// verdict, as `hooks.failure` says (open: let in as it is; closed:
    /// `unavailable`, close 4000, so the client tries again). A verdict for
    /// a connection that has gone meanwhile changes nothing.
    pub fn handle_admission(
        &mut self,
        token: u64,
        admission: Admission,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        let Some(Admitting { addr, mut profile }) = self.admitting.remove(&token) else { return };
        let Some(sess) = self.sessions.get_mut(&addr) else { return };
        debug_assert_eq!(sess.stage, Stage::Admitting, "one OnConnect call per session");
        let (name, meta) = match admission {
            Admission::Admit { name, meta } => (name, meta),
            Admission::Refuse { reason } => {
                let reason = if reason.is_empty() { "refused by the business system".into() } else { reason };
                return self.turn_away(
                    addr,
                    ErrorCode::Unauthorized,
                    reason,
                    (close::UNAUTHORIZED, "unauthorized"),
                );
            }
            Admission::Failed { why } => match self.config.core.hooks.failure {
                HookFailure::Open => (None, Default::default()),
                HookFailure::Closed => {
                    let message = format!("the connect hook failed ({why}); retry");
                    let closing = (close::SERVER_SHUTDOWN, "connect hook failed; reconnect");
                    return self.turn_away(addr, ErrorCode::Unavailable, message, closing);
                }
            },
        };
        sess.session.enrich(name.as_deref(), &meta);
        // A new visitor's stored profile is the enriched one.
        if let (Some(p), Some(identity)) = (&mut profile, sess.session.identity()) {
            p.name = identity.name.to_string();
            p.meta = identity.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        self.let_in(addr, profile, now_ms, store, random);
    }

    /// Ends a session that was never announced: its `connect` is answered
    /// with an error, then the connection is closed. What was held for it
    /// goes with it.
    fn turn_away(
        &mut self,
        addr: SessionAddr,
        code: ErrorCode,
        message: String,
        (close_code, close_reason): (u16, &'static str),
    ) {
        let Some(sess) = self.sessions.remove(&addr) else { return };
        self.held.remove(&addr);
        self.out.send(
            addr,
            sess.codec,
            &ServerFrame::error(sess.connecting.and_then(|c| c.id), code, message),
        );
        self.out.close(addr, close_code, close_reason);
    }

    /// A new anonymous visitor is durable: announce the session.
    pub fn handle_committed(
        &mut self,
        pending: Pending,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        if let Pending::Connected { to } = pending {
            self.announce(to, now_ms, store, random);
        }
    }

    /// A new anonymous visitor could not be stored: refused, and closed.
    pub fn handle_failed(&mut self, pending: Pending, error: &ReadError) {
        let Pending::Connected { to } = pending else { return };
        if let Some(sess) = self.sessions.remove(&to) {
            // Never connected: what was held goes with it.
            self.held.remove(&to);
            let message = format!("could not store the visitor; retry ({})", error.message);
            self.out.send(to, sess.codec, &ServerFrame::error(None, ErrorCode::Unavailable, message));
            self.out.close(to, close::SERVER_SHUTDOWN, "storage error");
        }
    }

    /// Tells every shard the session exists (each home replays its share of
    /// `resume`), then asks the router for `connected`'s conversations.
    /// Frames for the session stay held (since its `connect`) until `connected`.
    fn announce(
        &mut self,
        addr: SessionAddr,
        now_ms: u64,
        store: &dyn Stored,
        random: &mut dyn FnMut() -> [u8; 16],
    ) {
        let Some(sess) = self.sessions.get_mut(&addr) else { return };
        sess.stage = Stage::Welcoming;
        let codec = sess.codec;
        let (id, resume, pipelined) = match sess.connecting.as_mut() {
            Some(c) => (c.id, std::mem::take(&mut c.resume), std::mem::take(&mut c.pipelined)),
            None => (None, Vec::new(), Vec::new()),
        };
        let Some(identity) = sess.session.identity().cloned() else { return };
        let actor = identity.actor();
        for shard in 0..self.shards {
            let mine = resume.iter().copied().filter(|(c, _)| c.home(self.shards) == shard).collect();
            self.out.post_chat(shard, ChatMsg::SessionUp { addr, codec, actor: actor.clone(), resume: mine });
        }
        self.out.post_chat(ROUTER_SHARD, ChatMsg::Hello { reply: (addr, codec, id), identity });
        // Commands a new visitor sent while it was being stored, in order.
        for frame in pipelined {
            self.handle_frame(addr, codec, frame, now_ms, store, random);
        }
    }

    /// The router's answer to `Hello`: write `connected`, then what was held.
    pub fn handle_welcome(
        &mut self,
        reply: Reply,
        conversations: Vec<(ConvId, ConvStatus)>,
        store: &dyn Stored,
    ) {
        let (to, codec, id) = reply;
        let Some(sess) = self.sessions.get_mut(&to) else { return };
        sess.stage = Stage::Ready;
        let visitor_key = sess.connecting.take().and_then(|c| c.visitor_key);
        let Some(identity) = sess.session.identity().cloned() else { return };
        let mut conversations: Vec<ConvSummary> = conversations
            .into_iter()
            .map(|(conv, status)| ConvSummary { conv, status, last_seq: store.last_seq(conv).unwrap_or(0) })
            .collect();
        if identity.role == Role::Visitor {
            // Then its past conversations, for a returning visitor's history.
            // One the router still had open may be closed in storage by now:
            // it is listed as the router saw it (its close is pushed after
            // `connected`), not twice. A failed read lists none of them.
            let max = self.config.core.routing.connected_closed_max;
            let open = conversations.len();
            if let Ok(past) = store.conversations_of(&identity.id, max + open) {
                let closed: Vec<ConvSummary> = past
                    .into_iter()
                    .filter(|c| c.status == ConvStatus::Closed)
                    .filter(|c| !conversations[..open].iter().any(|s| s.conv == c.conv))
                    .take(max)
                    .collect();
                conversations.extend(closed);
            }
        }
        let limits = &self.config.core.limits;
        let frame = ServerFrame::reply(
            id,
            Event::Connected {
                // One id per connection (shard, slot, generation): tabs of
                // one user are different sessions.
                session: format!("s{:x}", device_of(to)),
                role: identity.role,
                user: User {
                    id: identity.id.to_string(),
                    name: identity.name.to_string(),
                    meta: identity.meta.clone(),
                },
                visitor_key,
                conversations,
                heartbeat_s: self.config.heartbeat_s,
                text_bytes_max: Some(u32::try_from(limits.max_text_bytes).unwrap_or(u32::MAX)),
                attachment_bytes_max: Some(u32::try_from(limits.max_attachment_bytes).unwrap_or(u32::MAX)),
                groups: (identity.role == Role::Agent)
                    .then(|| identity.groups.iter().map(|g| g.to_string()).collect()),
            },
        );
        let held = self.held.remove(&to).unwrap_or_default();
        self.out.send(to, codec, &frame);
        for bytes in held {
            self.out.write(to, bytes);
        }
    }

    /// One of this shard's connections has ended: every shard forgets the
    /// session, and the router an agent's device.
    pub fn handle_gone(&mut self, from: SessionAddr) {
        self.held.remove(&from);
        self.cut.remove(&from);
        let Some(sess) = self.sessions.remove(&from) else { return };
        if let Some(t) = sess.expires_ms {
            self.expiries.remove(&(t, from));
        }
        let Some(identity) = sess.session.identity() else { return };
        if sess.stage.unannounced() {
            // Never announced.
            return;
        }
        for shard in 0..self.shards {
            self.out.post_chat(shard, ChatMsg::SessionDown { addr: from, user: identity.key() });
        }
        if identity.role == Role::Agent {
            let gone = ChatMsg::AgentGone { agent: identity.id.clone(), device: device_of(from) };
            self.out.post_chat(ROUTER_SHARD, gone);
        }
    }

    /// When the first token session's token expires, if any session has
    /// one: [`Edge::expire`] is due then.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiries.first().map(|&(t, _)| t)
    }

    /// Ends every session whose token has expired by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(t, addr)) = self.expiries.first() {
            if t > now_ms {
                break;
            }
            if !self.expire_session(addr) {
                // Not a live token session any more: never loop on it.
                self.expiries.remove(&(t, addr));
            }
        }
    }

    /// A session outlived its token: it is told why (an `error` without an
    /// id, as it answers no command) and closed with 4003, so the client
    /// reconnects with a fresh token and resumes. Refusing its commands
    /// until an `auth` command would need a new command in both codecs for
    /// what a reconnect with `resume` already does. The session is
    /// forgotten when its connection is gone, as after any close.
    ///
    /// False if the session was already ended so (or is not a token
    /// session): nothing is sent twice.
    fn expire_session(&mut self, addr: SessionAddr) -> bool {
        let Some(sess) = self.sessions.get(&addr) else { return false };
        let Some(t) = sess.expires_ms else { return false };
        if !self.expiries.remove(&(t, addr)) {
            return false;
        }
        self.out.error((addr, sess.codec, None), ErrorCode::Unauthorized, "token expired");
        self.out.close(addr, close::TOKEN_EXPIRED, "token expired");
        true
    }

    /// This shard's number.
    pub fn shard(&self) -> usize {
        self.me
    }
}

#[cfg(test)]
mod tests;
