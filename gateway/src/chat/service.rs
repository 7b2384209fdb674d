//! The chat shard's side of the chat service (see the module above): it
//! turns decoded client commands into `kefu-core` decisions, makes them
//! durable through `kefu-storage`, and only then tells anyone.
//!
//! Everything that must be durable before it is announced (a new anonymous
//! visitor, a message, a conversation's change) goes through
//! [`ChatService::submit`] with a [`Pending`] that says what to announce
//! once the group commit holding it has returned. Nothing is announced from
//! anywhere else.

use std::collections::HashMap;
use std::sync::Arc;

use kefu_core::auth::{Credentials, JwtKey, VisitorKey, anonymous_id, anonymous_identity};
use kefu_core::conversation::{Access, RestoredConversation, SendOutcome, TypingOutcome};
use kefu_core::identity::{Actor, AgentRef, Identity, Visitor, vip_level};
use kefu_core::routing::{Action, AgentInfo, OpenRequest, RestoredRoute};
use kefu_core::rules::Rules;
use kefu_core::session::{AttachmentInfo, Command as CoreCommand, Request, Session};
use kefu_core::{Conversation, CoreConfig, Router};
use kefu_proto::client::{
    self, AgentRef as WireAgent, ClientFrame, Codec, Command, ConvSummary, Event, Msg, ServerFrame,
    SpareStrings, User,
};
use kefu_proto::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};
use kefu_storage::{
    Completion, Completions, ConversationRecord, MessageRecord, NewMessage, ReadMark, Reader, Store,
    UserRecord, WriteOp, Writer,
};
use tracing::{info, warn};

use super::frames::{FrameEncoder, SharedFrame};
use super::{SessionAddr, ShardMsg};
use crate::mailbox::Mailbox;
use crate::ws::close;

/// What the chat service needs at start.
pub struct ChatInit {
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
    /// The open store.
    pub store: Store,
}

/// One connection, as the chat shard knows it.
struct Sess {
    codec: Codec,
    session: Session,
    /// Set while a new anonymous visitor's profile is being made durable.
    connecting: bool,
}

/// What to do when a write becomes durable.
enum Pending {
    /// A new anonymous visitor is stored: answer `connected`.
    Connected { to: SessionAddr, frame: ServerFrame },
    /// A message is stored: ack it and fan it out. The message itself comes
    /// back with the completion, so nothing of it is copied to wait here.
    Message { conv: ConvId, seq: u64, sender: Option<(SessionAddr, Codec, Option<i64>)> },
    /// A conversation's change is stored: announce its state, and answer
    /// the command that caused it, if one did.
    ConvChanged { conv: ConvId, reply: Option<(SessionAddr, Codec, Option<i64>)> },
    /// Nothing to announce (read marks, profiles).
    Nothing,
}

/// The chat service on the chat shard.
pub struct ChatService {
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    frames: FrameEncoder,
    core: Arc<CoreConfig>,
    jwt: JwtKey,
    allow_anonymous: bool,
    heartbeat_s: u32,
    /// Kept so the writer thread lives as long as the service.
    _store: Store,
    writer: Writer,
    reader: Reader,
    completions: Completions,
    sessions: HashMap<SessionAddr, Sess>,
    users: HashMap<Arc<str>, Vec<SessionAddr>>,
    convs: HashMap<ConvId, Conversation>,
    router: Router,
    rules: Rules,
    pending: HashMap<u64, Pending>,
    /// Duplicate sends waiting for their original's commit: (conv, seq) → waiters.
    dup_waiters: HashMap<(ConvId, u64), Vec<Reply>>,
    /// Commands (accept, transfer, close) answered by the router's next
    /// change to their conversation.
    reply_on_change: Vec<(ConvId, Reply)>,
    next_token: u64,
    /// Reused for each message's audience.
    audience: Vec<SessionAddr>,
    /// Buffers of delivered messages' strings, for the sender id and name
    /// of the next ones (the cid and text go back to the edges).
    strings: SpareStrings,
}

/// The storage source (completion queue) of the chat shard.
pub const CHAT_SOURCE: usize = 0;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn device_of(addr: SessionAddr) -> u64 {
    ((addr.shard as u64) << 56) | ((addr.slot as u64) << 24) | (addr.generation as u64 & 0xFF_FFFF)
}

fn wire_msg(r: MessageRecord) -> Msg {
    Msg {
        conv: ConvId(r.conv),
        seq: r.seq,
        cid: r.cid,
        from: client::Sender { role: r.from.role, id: r.from.id, name: r.from.name },
        text: r.text,
        attachment: r.attachment.map(|a| client::Attachment { mime: a.mime, data: a.bytes }),
        ts: r.ts_ms,
    }
}

/// The storage write for `msg`; its strings move, they are not copied.
fn new_message(msg: Msg) -> NewMessage {
    NewMessage {
        conv: msg.conv.0,
        seq: Some(msg.seq),
        cid: msg.cid,
        from: kefu_storage::Sender { role: msg.from.role, id: msg.from.id, name: msg.from.name },
        ts_ms: msg.ts,
        text: msg.text,
        attachment: msg.attachment.map(|a| kefu_storage::Attachment { mime: a.mime, bytes: a.data }),
    }
}

/// The message [`new_message`] made `m` from, back from storage with seq `seq`.
fn wire_msg_of(m: NewMessage, seq: u64) -> Msg {
    Msg {
        conv: ConvId(m.conv),
        seq,
        cid: m.cid,
        from: client::Sender { role: m.from.role, id: m.from.id, name: m.from.name },
        text: m.text,
        attachment: m.attachment.map(|a| client::Attachment { mime: a.mime, data: a.bytes }),
        ts: m.ts_ms,
    }
}

impl ChatService {
    /// Builds the service and restores every open conversation from storage.
    pub fn new(init: ChatInit) -> anyhow::Result<Self> {
        let ChatInit { mailboxes, core, jwt_secret, allow_anonymous, heartbeat_s, store } = init;
        let jwt = JwtKey::new(jwt_secret.as_bytes(), core.auth.clone())
            .map_err(|e| anyhow::anyhow!("auth.jwt_secret: {e}"))?;
        let reader = store.reader();
        let next_conv = reader.next_conv_id()?;
        let mut router = Router::new(core.routing.clone(), next_conv);
        let mut convs = HashMap::new();
        let mut routes = Vec::new();
        let now = now_ms();
        for rec in reader.open_conversations()? {
            let restored = restored_conversation(&reader, rec, &core.routing.default_group)?;
            routes.push(RestoredRoute {
                conv: restored.id,
                visitor: restored.visitor.id.clone(),
                group: restored.group.clone(),
                vip_level: vip_level(&restored.visitor.meta),
                agent: restored.agent.clone(),
            });
            convs.insert(restored.id, Conversation::restore(restored, &core.limits));
        }
        let refused = router.restore(routes, now);
        if !refused.is_empty() {
            warn!(count = refused.len(), "router refused restored conversations");
        }
        info!(open = convs.len(), next_conv, "chat state restored");
        let rules = Rules::new(&core.rules);
        let service = Self {
            mailboxes,
            frames: FrameEncoder::new(),
            jwt,
            allow_anonymous,
            heartbeat_s,
            writer: store.writer(),
            reader,
            completions: store.completions(CHAT_SOURCE),
            _store: store,
            sessions: HashMap::new(),
            users: HashMap::new(),
            convs,
            router,
            rules,
            core,
            pending: HashMap::new(),
            dup_waiters: HashMap::new(),
            reply_on_change: Vec::new(),
            next_token: 1,
            audience: Vec::new(),
            strings: SpareStrings::new(),
        };
        Ok(service)
    }

    /// Whether storage completions are waiting (checked before sleeping).
    pub fn has_completions(&self) -> bool {
        !self.completions.is_empty()
    }

    /// Handles one message addressed to the chat service.
    pub fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Frame { from, codec, frame } => self.on_frame(from, codec, frame),
            ShardMsg::Gone { from } => self.on_gone(from),
            ShardMsg::Deliver { .. } | ShardMsg::Close { .. } => {
                debug_assert!(false, "edge message routed to the chat service");
            }
        }
        self.drain_router();
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
        self.drain_router();
    }

    /// Time passes: offline grace periods end.
    pub fn tick(&mut self) {
        self.router.tick(now_ms());
        self.drain_router();
    }

    // ---- inputs -------------------------------------------------------

    fn on_frame(&mut self, from: SessionAddr, codec: Codec, frame: ClientFrame) {
        let id = frame.id;
        if let Command::Connect { token, visitor_id, visitor_key, resume } = frame.body {
            return self.on_connect(from, codec, id, token, visitor_id, visitor_key, resume);
        }
        let now = now_ms();
        let Some(sess) = self.sessions.get_mut(&from) else {
            self.send(from, codec, &ServerFrame::error(id, ErrorCode::Unauthorized, "send connect first"));
            self.close(from, close::UNAUTHORIZED, "connect first");
            return;
        };
        if sess.connecting {
            self.send(
                from,
                codec,
                &ServerFrame::error(id, ErrorCode::BadCommand, "connect is still in progress"),
            );
            return;
        }
        // The wire's parsed target, spelled back as core reads it ("group:NAME").
        let transfer_to = match &frame.body {
            Command::Transfer { to, .. } => to.to_string(),
            _ => String::new(),
        };
        let cmd = match &frame.body {
            Command::Open { group, meta } => CoreCommand::Open { group: group.as_deref(), meta: Some(meta) },
            Command::Send { conv, cid, text, attachment } => CoreCommand::Send {
                conv: *conv,
                cid,
                text: text.as_deref(),
                attachment: attachment
                    .as_ref()
                    .map(|a| AttachmentInfo { mime: &a.mime, bytes: a.data.len() }),
            },
            Command::Read { conv, seq } => CoreCommand::Read { conv: *conv, seq: *seq },
            Command::Typing { conv } => CoreCommand::Typing { conv: *conv },
            Command::History { conv, before, limit } => {
                CoreCommand::History { conv: *conv, before: *before, limit: *limit }
            }
            Command::Presence { status, capacity } => {
                CoreCommand::Presence { status: *status, capacity: *capacity }
            }
            Command::Accept { conv } => CoreCommand::Accept { conv: *conv },
            Command::Transfer { conv, .. } => CoreCommand::Transfer { conv: *conv, to: &transfer_to },
            Command::Close { conv } => CoreCommand::Close { conv: *conv },
            // Handled above; a second connect never reaches here.
            Command::Ping | Command::Connect { .. } => CoreCommand::Ping,
        };
        let request = match sess.session.check(cmd, now) {
            Ok(r) => r.into_owned_parts(),
            Err(e) => {
                let code = e.code();
                let message = e.to_string();
                self.send(from, codec, &ServerFrame::error(id, code, message));
                return;
            }
        };
        let Some(actor) = self.sessions.get(&from).and_then(|s| s.session.actor()) else { return };
        let reply = (from, codec, id);
        match request {
            Owned::Ping => self.send(from, codec, &ServerFrame::reply(id, Event::Pong)),
            Owned::Open { visitor, group, vip_level } => self.on_open(reply, visitor, group, vip_level),
            Owned::Send { conv, cid } => {
                // The frame's strings become the message's: no copies.
                let (wire_cid, text, attachment) = match frame.body {
                    Command::Send { cid, text, attachment, .. } => (cid, text, attachment),
                    _ => (cid.as_str().into(), None, None),
                };
                self.on_send(reply, &actor, conv, (cid, wire_cid), text, attachment, now);
            }
            Owned::Read { conv, seq } => self.on_read(reply, &actor, conv, seq, now),
            Owned::Typing { conv } => self.on_typing(reply, &actor, conv, now),
            Owned::History { conv, before, limit } => self.on_history(reply, &actor, conv, before, limit),
            Owned::Presence { status, capacity } => {
                match self.router.presence(&actor.id, device_of(from), status, capacity, now) {
                    Ok(status) => {
                        let frame =
                            ServerFrame::reply(id, Event::Presence { agent: actor.id.to_string(), status });
                        self.send(from, codec, &frame);
                    }
                    Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
                }
            }
            Owned::Accept { conv } => match self.router.accept(&actor.id, conv) {
                Ok(_) => self.pending_reply_on_change(conv, reply),
                Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
            },
            Owned::Transfer { conv, to } => match self.router.transfer(&actor, conv, to) {
                Ok(()) => self.pending_reply_on_change(conv, reply),
                Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
            },
            Owned::Close { conv } => self.on_close(reply, &actor, conv),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_connect(
        &mut self,
        from: SessionAddr,
        codec: Codec,
        id: Option<i64>,
        token: Option<String>,
        visitor_id: Option<String>,
        visitor_key: Option<String>,
        resume: std::collections::BTreeMap<ConvId, u64>,
    ) {
        if self.sessions.contains_key(&from) {
            self.send(from, codec, &ServerFrame::error(id, ErrorCode::BadCommand, "already connected"));
            return;
        }
        let now = now_ms();
        let refuse = |this: &mut Self, why: String| {
            this.send(from, codec, &ServerFrame::error(id, ErrorCode::Unauthorized, why));
            this.close(from, close::UNAUTHORIZED, "unauthorized");
        };
        let creds = match Credentials::classify(
            token.as_deref(),
            visitor_id.as_deref(),
            visitor_key.as_deref(),
            self.allow_anonymous,
        ) {
            Ok(c) => c,
            Err(e) => return refuse(self, e.to_string()),
        };
        let (identity, new_key) = match creds {
            Credentials::Token(t) => match self.jwt.verify(t, now) {
                Ok(claims) => (claims.into_identity(), None),
                Err(e) => return refuse(self, e.to_string()),
            },
            Credentials::Returning { visitor_id, key } => {
                let stored = match self.reader.user(visitor_id) {
                    Ok(u) => u,
                    Err(e) => {
                        self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string()));
                        return;
                    }
                };
                let ok = stored
                    .as_ref()
                    .and_then(|u| u.visitor_key_hash)
                    .is_some_and(|h| kefu_core::auth::VisitorKeyHash(h).verify(&key));
                match (ok, stored) {
                    (true, Some(u)) => {
                        (anonymous_identity(Arc::from(u.id.as_str()), u.meta.into_iter().collect()), None)
                    }
                    _ => return refuse(self, "unknown visitor or wrong visitor_key".into()),
                }
            }
            Credentials::NewAnonymous => {
                let vid = anonymous_id(rand::random());
                let key = VisitorKey::from_random(rand::random());
                (anonymous_identity(vid, Default::default()), Some(key))
            }
        };
        let mut session = Session::new(self.core.clone(), now);
        if let Err(e) = session.connect(identity.clone()) {
            return refuse(self, e.to_string());
        }
        if let Err(e) = session.check_resume(resume.len()) {
            self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string()));
            return;
        }
        let connecting = new_key.is_some();
        self.sessions.insert(from, Sess { codec, session, connecting });
        self.users.entry(identity.id.clone()).or_default().push(from);
        if identity.role == Role::Agent {
            let info = AgentInfo {
                id: identity.id.clone(),
                name: identity.name.clone(),
                groups: identity.groups.clone(),
            };
            self.router.agent_connected(info, device_of(from), now);
        }
        let frame = self.connected_frame(from, id, &identity, new_key.as_ref().map(VisitorKey::to_hex));
        match new_key {
            Some(key) => {
                // The key must survive any crash before the visitor sees it.
                let record = UserRecord {
                    id: identity.id.to_string(),
                    role: Role::Visitor,
                    name: identity.name.to_string(),
                    meta: Vec::new(),
                    visitor_key_hash: Some(key.hash().0),
                    created_ms: now,
                };
                if !self.submit(WriteOp::PutUser(record), Pending::Connected { to: from, frame }) {
                    self.sessions.remove(&from);
                    self.send(
                        from,
                        codec,
                        &ServerFrame::error(id, ErrorCode::Unavailable, "storage busy; retry"),
                    );
                }
            }
            None => {
                self.send(from, codec, &frame);
                self.replay(from, codec, &identity.actor(), &resume);
            }
        }
    }

    fn connected_frame(
        &self,
        from: SessionAddr,
        id: Option<i64>,
        identity: &Identity,
        visitor_key: Option<String>,
    ) -> ServerFrame {
        let convs: Vec<ConvId> = match identity.role {
            Role::Agent => self.router.conversations_of(&identity.id).collect(),
            _ => self.router.open_conversation_of(&identity.id).into_iter().collect(),
        };
        let conversations = convs
            .into_iter()
            .filter_map(|c| self.convs.get(&c))
            .map(|c| ConvSummary { conv: c.id(), status: c.status(), last_seq: c.durable_seq() })
            .collect();
        ServerFrame::reply(
            id,
            Event::Connected {
                // One id per connection (shard, slot, generation): tabs of
                // one user are different sessions.
                session: format!("s{:x}", device_of(from)),
                role: identity.role,
                user: User {
                    id: identity.id.to_string(),
                    name: identity.name.to_string(),
                    meta: identity.meta.clone(),
                },
                visitor_key,
                conversations,
                heartbeat_s: self.heartbeat_s,
            },
        )
    }

    /// Sends what a reconnecting client missed, then `resumed`, per
    /// conversation, before anything else for it can be queued behind.
    fn replay(
        &mut self,
        to: SessionAddr,
        codec: Codec,
        actor: &Actor,
        resume: &std::collections::BTreeMap<ConvId, u64>,
    ) {
        for (&conv, &last_seen) in resume {
            if !self.load(conv) {
                self.send(
                    to,
                    codec,
                    &ServerFrame::error(None, ErrorCode::NotFound, format!("{conv}: not found")),
                );
                continue;
            }
            let Some(c) = self.convs.get(&conv) else { continue };
            let range = match c.resume(actor, last_seen) {
                Ok(r) => r,
                Err(e) => {
                    self.send(to, codec, &ServerFrame::error(None, e.code(), format!("{conv}: {e}")));
                    continue;
                }
            };
            let missed = range.to.saturating_sub(last_seen) as usize;
            match self.reader.after(conv.0, last_seen, missed) {
                Ok(messages) => {
                    for m in messages.into_iter().filter(|m| m.record.seq <= range.to) {
                        self.send(to, codec, &ServerFrame::push(Event::Msg(wire_msg(m.record))));
                    }
                    let done = Event::Resumed { conv, from: range.from, to: range.to };
                    self.send(to, codec, &ServerFrame::push(done));
                }
                Err(e) => self.send(to, codec, &ServerFrame::error(None, e.code(), e.to_string())),
            }
        }
    }

    fn on_open(&mut self, reply: Reply, visitor: Visitor, group: Arc<str>, vip: i64) {
        let (from, codec, id) = reply;
        let req = OpenRequest { visitor: visitor.id.clone(), group: group.clone(), vip_level: vip };
        let opened = match self.router.open(req) {
            Ok(o) => o,
            Err(e) => return self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        };
        if !opened.created {
            if let Some(frame) = self.conversation_frame(opened.conv, id) {
                self.send(from, codec, &frame);
            }
            return;
        }
        let conv = Conversation::new(opened.conv, visitor.clone(), group, &self.core.limits);
        self.convs.insert(opened.conv, conv);
        // The visitor's profile (token meta merged with the widget's) is what
        // agents see, so it is stored too.
        let user = UserRecord {
            id: visitor.id.to_string(),
            role: Role::Visitor,
            name: visitor.name.to_string(),
            meta: visitor.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            visitor_key_hash: self.reader.user(&visitor.id).ok().flatten().and_then(|u| u.visitor_key_hash),
            created_ms: now_ms(),
        };
        let _ = self.submit(WriteOp::PutUser(user), Pending::Nothing);
        self.persist_conv(opened.conv, Some(reply));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_send(
        &mut self,
        reply: Reply,
        actor: &Actor,
        conv: ConvId,
        (cid, wire_cid): (kefu_core::Cid, String),
        text: Option<String>,
        attachment: Option<client::Attachment>,
        now: u64,
    ) {
        let (from, codec, id) = reply;
        if !self.found(reply, conv) {
            return;
        }
        // Older resends than the conversation's window remembers: the
        // durable dedupe index has the original. Only the seqs below the
        // window are asked about, which the reader's cache mostly answers
        // without a read transaction (none at all while the window has
        // never lost a cid).
        let below = self.convs.get(&conv).map_or(u64::MAX, Conversation::cids_remembered_from);
        match self.reader.dedupe_before(&actor.id, conv.0, cid.as_str(), below) {
            Ok(Some(hit)) => {
                let ack = Event::Ack {
                    cid: cid.as_str().into(),
                    conv,
                    seq: hit.seq,
                    ts: hit.ts_ms,
                    duplicate: true,
                };
                return self.send(from, codec, &ServerFrame::reply(id, ack));
            }
            Ok(None) => {}
            Err(e) => return self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        }
        let Some(c) = self.convs.get_mut(&conv) else { return };
        let outcome = match c.send(actor, Some(cid), now) {
            Ok(o) => o,
            Err(e) => return self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        };
        match outcome {
            SendOutcome::Duplicate { seq, ts } => {
                let ack = Event::Ack { cid: cid.as_str().into(), conv, seq, ts, duplicate: true };
                self.send(from, codec, &ServerFrame::reply(id, ack));
            }
            SendOutcome::InFlight { seq, .. } => {
                self.dup_waiters.entry((conv, seq)).or_default().push((from, codec, id));
            }
            SendOutcome::Append { seq, ts } => {
                let msg = Msg {
                    conv,
                    seq,
                    cid: wire_cid,
                    from: client::Sender {
                        role: actor.role,
                        id: self.strings.copy(&actor.id),
                        name: self.strings.copy(&actor.name),
                    },
                    text,
                    attachment,
                    ts,
                };
                self.append(msg, Some((from, codec, id)));
            }
        }
    }

    fn append(&mut self, msg: Msg, sender: Option<Reply>) {
        let (conv, seq) = (msg.conv, msg.seq);
        if !self.submit(WriteOp::AppendMessage(new_message(msg)), Pending::Message { conv, seq, sender }) {
            // Nothing was written: the seq must be taken back, which only a
            // rebuild from storage does safely.
            self.reload(conv);
            if let Some((to, codec, id)) = sender {
                self.send(to, codec, &ServerFrame::error(id, ErrorCode::Unavailable, "storage busy; retry"));
            }
        }
    }

    fn on_read(&mut self, reply: Reply, actor: &Actor, conv: ConvId, seq: u64, now: u64) {
        let (from, codec, id) = reply;
        if !self.found(reply, conv) {
            return;
        }
        let Some(c) = self.convs.get_mut(&conv) else { return };
        match c.read(actor, seq) {
            Ok(kefu_core::conversation::ReadOutcome::Advanced { seq }) => {
                let mark = ReadMark { conv: conv.0, user_id: actor.id.to_string(), seq, ts_ms: now };
                let _ = self.submit(WriteOp::MarkRead(mark), Pending::Nothing);
                let event = ServerFrame::push(Event::Read { conv, seq, by: actor.id.to_string() });
                let audience = self.participants(conv);
                self.deliver(audience.iter().copied().filter(|a| *a != from), &event);
            }
            Ok(kefu_core::conversation::ReadOutcome::Unchanged) => {}
            Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        }
    }

    fn on_typing(&mut self, reply: Reply, actor: &Actor, conv: ConvId, now: u64) {
        let (from, codec, id) = reply;
        if !self.found(reply, conv) {
            return;
        }
        let Some(c) = self.convs.get_mut(&conv) else { return };
        match c.typing(actor, now) {
            Ok(TypingOutcome::Broadcast) => {
                let event = ServerFrame::push(Event::Typing { conv, by: actor.id.to_string() });
                let audience = self.participants(conv);
                self.deliver(audience.iter().copied().filter(|a| *a != from), &event);
            }
            Ok(TypingOutcome::Suppressed) => {}
            Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        }
    }

    fn on_history(&mut self, reply: Reply, actor: &Actor, conv: ConvId, before: Option<u64>, limit: u32) {
        let (from, codec, id) = reply;
        if !self.found(reply, conv) {
            return;
        }
        let Some(c) = self.convs.get(&conv) else { return };
        let range = match c.history(actor, before, limit) {
            Ok(r) => r,
            Err(e) => return self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        };
        let frame = match self.reader.history(conv.0, Some(range.end), (range.end - range.start) as usize) {
            Ok(page) => {
                let messages = page.into_iter().map(|m| wire_msg(m.record)).collect();
                ServerFrame::reply(id, Event::History { conv, messages })
            }
            Err(e) => ServerFrame::error(id, e.code(), e.to_string()),
        };
        self.send(from, codec, &frame);
    }

    fn on_close(&mut self, reply: Reply, actor: &Actor, conv: ConvId) {
        let (from, codec, id) = reply;
        if !self.found(reply, conv) {
            return;
        }
        let closed = self.convs.get(&conv).map(|c| (c.status(), c.check_access(actor, Access::Read)));
        match closed {
            Some((_, Err(e))) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
            // Closing again answers with the closed state (the router has
            // already forgotten the conversation).
            Some((ConvStatus::Closed, Ok(()))) => {
                if let Some(frame) = self.conversation_frame(conv, id) {
                    self.send(from, codec, &frame);
                }
            }
            _ => match self.router.close(actor, conv) {
                Ok(_) => self.pending_reply_on_change(conv, reply),
                Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
            },
        }
    }

    fn on_gone(&mut self, from: SessionAddr) {
        let Some(sess) = self.sessions.remove(&from) else { return };
        let Some(identity) = sess.session.identity() else { return };
        if let Some(list) = self.users.get_mut(&identity.id) {
            list.retain(|a| *a != from);
            if list.is_empty() {
                self.users.remove(&identity.id);
            }
        }
        if identity.role == Role::Agent {
            self.router.agent_disconnected(&identity.id, device_of(from), now_ms());
        }
        for waiters in self.dup_waiters.values_mut() {
            waiters.retain(|(a, _, _)| *a != from);
        }
    }

    // ---- routing ------------------------------------------------------

    /// The next router decision that changes a conversation answers this
    /// command (accept, transfer, close) once it is durable.
    fn pending_reply_on_change(&mut self, conv: ConvId, reply: Reply) {
        self.reply_on_change.push((conv, reply));
    }

    fn drain_router(&mut self) {
        while let Some(action) = self.router.poll_action() {
            match action {
                Action::Assign { conv, agent, group, .. } => {
                    // A transfer to a group that is taken at once arrives as
                    // one Assign carrying the new group.
                    let moved = |c: &mut Conversation| {
                        if *c.group() != group {
                            let _ = c.queue(group.clone());
                        }
                        c.assign(agent).is_ok()
                    };
                    if self.convs.get_mut(&conv).is_some_and(moved) {
                        let reply = self.take_reply(conv);
                        self.persist_conv(conv, reply);
                    }
                }
                Action::Queue { conv, group, .. } => {
                    if self.convs.get_mut(&conv).is_some_and(|c| c.queue(group).is_ok()) {
                        let reply = self.take_reply(conv);
                        self.persist_conv(conv, reply);
                    }
                }
                Action::QueuePosition { conv, .. } => {
                    if let Some(frame) = self.conversation_frame(conv, None) {
                        let audience = self.visitor_sessions(conv);
                        self.deliver(audience.into_iter(), &frame);
                    }
                }
                Action::Close { conv, .. } => {
                    if self.convs.get_mut(&conv).is_some_and(|c| c.close()) {
                        let reply = self.take_reply(conv);
                        self.persist_conv(conv, reply);
                    }
                }
                Action::PresenceChanged { agent, status } => {
                    let frame = ServerFrame::push(Event::Presence { agent: agent.to_string(), status });
                    let agents = self.agent_sessions();
                    self.deliver(agents.into_iter(), &frame);
                }
                Action::ReplaceDevice { device, .. } => {
                    if let Some(addr) = self.sessions.keys().copied().find(|a| device_of(*a) == device) {
                        self.close(addr, close::REPLACED, "replaced by a newer device");
                    }
                }
            }
        }
        // Commands whose router call changed nothing still get an answer.
        for (conv, (to, codec, id)) in std::mem::take(&mut self.reply_on_change) {
            if let Some(frame) = self.conversation_frame(conv, id) {
                self.send(to, codec, &frame);
            }
        }
    }

    fn take_reply(&mut self, conv: ConvId) -> Option<Reply> {
        let i = self.reply_on_change.iter().position(|(c, _)| *c == conv)?;
        Some(self.reply_on_change.remove(i).1)
    }

    fn persist_conv(&mut self, conv: ConvId, reply: Option<Reply>) {
        let Some(c) = self.convs.get(&conv) else { return };
        let now = now_ms();
        let record = ConversationRecord {
            id: conv.0,
            visitor_id: c.visitor().id.to_string(),
            status: c.status(),
            agent: c
                .agent()
                .map(|a| kefu_storage::AgentRef { id: a.id.to_string(), name: a.name.to_string() }),
            group: Some(c.group().to_string()),
            created_ms: now,
            updated_ms: now,
            last_seq: c.last_seq(),
        };
        if !self.submit(WriteOp::PutConversation(record), Pending::ConvChanged { conv, reply }) {
            warn!(%conv, "storage queue full: conversation change not persisted");
            if let Some((to, codec, id)) = reply {
                self.send(to, codec, &ServerFrame::error(id, ErrorCode::Unavailable, "storage busy; retry"));
            }
        }
    }

    // ---- durability ---------------------------------------------------

    /// Queues a write; `false` if storage's queue is full (nothing written).
    fn submit(&mut self, op: WriteOp, then: Pending) -> bool {
        let token = self.next_token;
        self.next_token += 1;
        match self.writer.submit(CHAT_SOURCE, token, op) {
            Ok(()) => {
                self.pending.insert(token, then);
                true
            }
            Err(_) => false,
        }
    }

    fn committed(&mut self, pending: Pending, op: WriteOp, duplicate: bool, seq: u64, ts: u64) {
        match pending {
            Pending::Connected { to, frame } => {
                if let Some(sess) = self.sessions.get_mut(&to) {
                    sess.connecting = false;
                    let codec = sess.codec;
                    self.send(to, codec, &frame);
                }
            }
            Pending::Message { conv, seq: ours, sender } => {
                let WriteOp::AppendMessage(m) = op else {
                    debug_assert!(false, "a message's completion carries another write");
                    return;
                };
                let mut msg = wire_msg_of(m, ours);
                if let Some(c) = self.convs.get_mut(&conv) {
                    c.committed(ours);
                }
                // The ack borrows the message's cid and hands it back.
                let mut ack = ServerFrame::reply(
                    None,
                    Event::Ack { cid: std::mem::take(&mut msg.cid), conv, seq, ts, duplicate },
                );
                // Encoded now, sent last: it takes the frame's strings back
                // to the sender's edge, and the msg frame needs them first.
                let sender_ack = sender.map(|(to, codec, id)| {
                    ack.id = id;
                    (to, self.frames.encode(codec, &ack))
                });
                if let Some(waiters) = self.dup_waiters.remove(&(conv, ours)) {
                    if let Event::Ack { duplicate, .. } = &mut ack.body {
                        *duplicate = true;
                    }
                    for (to, codec, id) in waiters {
                        ack.id = id;
                        self.send(to, codec, &ack);
                    }
                }
                if let Event::Ack { cid, .. } = ack.body {
                    msg.cid = cid;
                }
                if duplicate {
                    if let Some((to, bytes)) = sender_ack {
                        self.post(to, bytes, Default::default());
                    }
                    // Storage had it already (a resend older than the
                    // window): the seq we took is unused, so rebuild.
                    self.reload(conv);
                    return;
                }
                let mut audience = std::mem::take(&mut self.audience);
                audience.clear();
                self.participants_into(conv, &mut audience);
                let except = sender.map(|(a, _, _)| a);
                let auto = (msg.from.role == Role::Visitor)
                    .then(|| msg.text.as_deref().and_then(|t| self.rules.auto_reply(Role::Visitor, t)))
                    .flatten()
                    .map(str::to_string);
                let frame = ServerFrame::push(Event::Msg(msg));
                self.deliver(audience.iter().copied().filter(|a| Some(*a) != except), &frame);
                self.audience = audience;
                if let Event::Msg(Msg { cid, from, text, .. }) = frame.body {
                    self.strings.give(from.id);
                    self.strings.give(from.name);
                    match sender_ack {
                        // The cid and text came from the sender's edge's
                        // decoder: its spare buffers.
                        Some((to, bytes)) => self.post(to, bytes, [Some(cid), text]),
                        None => {
                            self.strings.give(cid);
                            text.into_iter().for_each(|t| self.strings.give(t));
                        }
                    }
                }
                if let Some(text) = auto {
                    self.bot_message(conv, text);
                }
            }
            Pending::ConvChanged { conv, reply } => {
                if let Some(frame) = self.conversation_frame(conv, None) {
                    let mut audience = self.participants(conv);
                    if self.convs.get(&conv).is_some_and(|c| c.status() == ConvStatus::Queued) {
                        audience.extend(self.group_agent_sessions(conv));
                    }
                    audience.sort();
                    audience.dedup();
                    let replying = reply.map(|(a, _, _)| a);
                    self.deliver(audience.into_iter().filter(|a| Some(*a) != replying), &frame);
                }
                if let Some((to, codec, id)) = reply
                    && let Some(frame) = self.conversation_frame(conv, id)
                {
                    self.send(to, codec, &frame);
                }
                if self.convs.get(&conv).is_some_and(|c| c.status() == ConvStatus::Closed) {
                    self.convs.remove(&conv);
                }
            }
            Pending::Nothing => {}
        }
    }

    fn failed(&mut self, pending: Pending, error: kefu_storage::StorageError) {
        warn!(%error, "write failed");
        match pending {
            Pending::Connected { to, .. } => {
                if let Some(sess) = self.sessions.remove(&to) {
                    let frame = ServerFrame::error(
                        None,
                        ErrorCode::Unavailable,
                        "could not store the visitor; retry",
                    );
                    self.send(to, sess.codec, &frame);
                    self.close(to, close::SERVER_SHUTDOWN, "storage error");
                }
            }
            Pending::Message { conv, sender, .. } => {
                self.reload(conv);
                if let Some((to, codec, id)) = sender {
                    self.send(to, codec, &ServerFrame::error(id, error.code(), error.to_string()));
                }
            }
            Pending::ConvChanged { reply: Some((to, codec, id)), .. } => {
                self.send(to, codec, &ServerFrame::error(id, error.code(), error.to_string()));
            }
            Pending::ConvChanged { reply: None, .. } | Pending::Nothing => {}
        }
    }

    fn bot_message(&mut self, conv: ConvId, text: String) {
        let bot = self.rules.bot().clone();
        let Some(c) = self.convs.get_mut(&conv) else { return };
        let Ok(SendOutcome::Append { seq, ts }) = c.send(&bot, None, now_ms()) else { return };
        let msg = Msg {
            conv,
            seq,
            cid: format!("auto-{seq}"),
            from: client::Sender { role: Role::Bot, id: bot.id.to_string(), name: bot.name.to_string() },
            text: Some(text),
            attachment: None,
            ts,
        };
        self.append(msg, None);
    }

    /// As [`Self::load`], answering the command `not_found` if it does not exist.
    fn found(&mut self, reply: Reply, conv: ConvId) -> bool {
        let (to, codec, id) = reply;
        let ok = self.load(conv);
        if !ok {
            self.send(to, codec, &ServerFrame::error(id, ErrorCode::NotFound, format!("{conv}: not found")));
        }
        ok
    }

    /// Makes sure `conv` is in memory (closed conversations are loaded on
    /// demand for history, reads and resume). False if it does not exist.
    fn load(&mut self, conv: ConvId) -> bool {
        if self.convs.contains_key(&conv) {
            return true;
        }
        self.reload(conv);
        self.convs.contains_key(&conv)
    }

    /// Rebuilds a conversation from storage (after a failed or duplicate
    /// append, its in-memory seq may be ahead of the log).
    fn reload(&mut self, conv: ConvId) {
        let restored = match self.reader.conversation(conv.0) {
            Ok(Some(rec)) => restored_conversation(&self.reader, rec, &self.core.routing.default_group),
            Ok(None) => {
                self.convs.remove(&conv);
                return;
            }
            Err(e) => Err(e),
        };
        match restored {
            Ok(r) => {
                self.convs.insert(conv, Conversation::restore(r, &self.core.limits));
            }
            Err(e) => {
                warn!(%conv, error = %e, "cannot reload a conversation from storage");
                self.convs.remove(&conv);
            }
        }
    }

    // ---- audiences and output ----------------------------------------

    fn conversation_frame(&self, conv: ConvId, id: Option<i64>) -> Option<ServerFrame> {
        let c = self.convs.get(&conv)?;
        let v = c.visitor();
        let position = self.router.route(conv).and_then(|r| r.position);
        Some(ServerFrame::reply(
            id,
            Event::Conversation {
                conv,
                status: c.status(),
                agent: c.agent().map(|a| WireAgent { id: a.id.to_string(), name: a.name.to_string() }),
                group: Some(c.group().to_string()),
                visitor: User { id: v.id.to_string(), name: v.name.to_string(), meta: v.meta.clone() },
                queue_position: (c.status() == ConvStatus::Queued).then_some(position).flatten(),
            },
        ))
    }

    /// The visitor's and the assigned agent's sessions.
    fn participants(&self, conv: ConvId) -> Vec<SessionAddr> {
        let mut out = Vec::new();
        self.participants_into(conv, &mut out);
        out
    }

    /// [`Self::participants`], appended to `out`.
    fn participants_into(&self, conv: ConvId, out: &mut Vec<SessionAddr>) {
        let Some(c) = self.convs.get(&conv) else { return };
        out.extend(self.users.get(&c.visitor().id).into_iter().flatten().copied());
        if let Some(agent) = c.agent()
            && c.status() == ConvStatus::Assigned
        {
            out.extend(self.users.get(&agent.id).into_iter().flatten().copied());
        }
    }

    fn visitor_sessions(&self, conv: ConvId) -> Vec<SessionAddr> {
        self.convs.get(&conv).and_then(|c| self.users.get(&c.visitor().id)).cloned().unwrap_or_default()
    }

    /// Sessions of agents who serve a queued conversation's group.
    fn group_agent_sessions(&self, conv: ConvId) -> Vec<SessionAddr> {
        let Some(c) = self.convs.get(&conv) else { return Vec::new() };
        self.router
            .agents()
            .filter(|a| {
                a.status != PresenceStatus::Offline && kefu_core::identity::serves(&a.groups, c.group())
            })
            .flat_map(|a| self.users.get(&a.id).cloned().unwrap_or_default())
            .collect()
    }

    fn agent_sessions(&self) -> Vec<SessionAddr> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.session.identity().is_some_and(|i| i.role == Role::Agent))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Sends one event to many sessions: encoded once per subprotocol.
    fn deliver(&mut self, to: impl Iterator<Item = SessionAddr>, frame: &ServerFrame) {
        let mut encoded: [Option<SharedFrame>; 2] = [None, None];
        for addr in to {
            let Some(codec) = self.sessions.get(&addr).map(|s| s.codec) else { continue };
            let slot = usize::from(codec.is_binary());
            let bytes = encoded[slot].get_or_insert_with(|| self.frames.encode(codec, frame)).clone();
            self.post(addr, bytes, Default::default());
        }
    }

    fn send(&mut self, to: SessionAddr, codec: Codec, frame: &ServerFrame) {
        let bytes = self.frames.encode(codec, frame);
        self.post(to, bytes, Default::default());
    }

    /// Hands an encoded frame (and spare string buffers) to `to`'s edge.
    fn post(&mut self, to: SessionAddr, bytes: SharedFrame, spare: [Option<String>; 2]) {
        // A full edge inbox drops the frame for that one connection; the
        // edge's own outbound bound would cut it anyway (slow consumer).
        let _ = self.mailboxes[to.shard as usize].send(ShardMsg::Deliver { to, bytes, spare });
    }

    fn close(&mut self, to: SessionAddr, code: u16, reason: &'static str) {
        let _ = self.mailboxes[to.shard as usize].send(ShardMsg::Close { to, code, reason });
    }
}

type Reply = (SessionAddr, Codec, Option<i64>);

/// A stored conversation as `kefu-core` restores it: the visitor's profile
/// from the users table (or just the id, if it was never stored) and the
/// last message's time, so `ts` never goes backwards.
fn restored_conversation(
    reader: &Reader,
    rec: ConversationRecord,
    default_group: &str,
) -> Result<RestoredConversation, kefu_storage::StorageError> {
    let visitor = match reader.user(&rec.visitor_id)? {
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

/// A checked request with its borrowed parts made owned (the frame it
/// borrowed from is still needed for the message body).
enum Owned {
    Ping,
    Open { visitor: Visitor, group: Arc<str>, vip_level: i64 },
    Send { conv: ConvId, cid: kefu_core::Cid },
    Read { conv: ConvId, seq: u64 },
    Typing { conv: ConvId },
    History { conv: ConvId, before: Option<u64>, limit: u32 },
    Presence { status: PresenceStatus, capacity: Option<u32> },
    Accept { conv: ConvId },
    Transfer { conv: ConvId, to: kefu_core::session::TransferTarget },
    Close { conv: ConvId },
}

trait IntoOwnedParts {
    fn into_owned_parts(self) -> Owned;
}

impl IntoOwnedParts for Request<'_> {
    fn into_owned_parts(self) -> Owned {
        match self {
            Request::Ping => Owned::Ping,
            Request::Open { visitor, group, vip_level } => Owned::Open { visitor, group, vip_level },
            Request::Send { conv, cid, .. } => Owned::Send { conv, cid },
            Request::Read { conv, seq } => Owned::Read { conv, seq },
            Request::Typing { conv } => Owned::Typing { conv },
            Request::History { conv, before, limit } => Owned::History { conv, before, limit },
            Request::Presence { status, capacity } => Owned::Presence { status, capacity },
            Request::Accept { conv } => Owned::Accept { conv },
            Request::Transfer { conv, to } => Owned::Transfer { conv, to },
            Request::Close { conv } => Owned::Close { conv },
        }
    }
}
