//! The edge part of a shard's chat service: the sessions of the connections
//! this shard accepted. It runs `connect`, checks every later command
//! (identity, role, rate limit, sizes) and forwards it to the conversation's
//! home or to the router.

use std::sync::Arc;

use kefu_core::auth::{Credentials, VisitorKey, anonymous_id, anonymous_identity};
use kefu_core::session::{Checked, Session};
use kefu_proto::client::{ClientFrame, Codec, Command, ConvSummary, Event, ServerFrame, User};
use kefu_proto::{ConvId, ConvStatus, ErrorCode, Role};
use kefu_storage::{UserRecord, WriteOp};

use super::service::{ChatService, PIPELINED_WHILE_STORING_MAX, Pending, Sess, Stage, now_ms};
use super::{ChatMsg, ROUTER_SHARD, Reply, SessionAddr, ShardMsg, device_of};
use crate::ws::close;
use tracing::warn;

impl ChatService {
    pub(super) fn on_frame(&mut self, from: SessionAddr, codec: Codec, frame: ClientFrame) {
        let id = frame.id;
        if let Command::Connect { token, visitor_id, visitor_key, resume } = frame.body {
            let resume = resume.into_iter().collect();
            return self.on_connect((from, codec, id), token, visitor_id, visitor_key, resume);
        }
        let now = now_ms();
        let Some(sess) = self.sessions.get_mut(&from) else {
            if matches!(frame.body, Command::Ping) {
                // No session (its connect was refused without a close):
                // `ping` needs none.
                return self.send(from, codec, &ServerFrame::reply(id, Event::Pong));
            }
            self.send(from, codec, &ServerFrame::error(id, ErrorCode::Unauthorized, "send connect first"));
            self.close(from, close::UNAUTHORIZED, "connect first");
            return;
        };
        // A session waiting for its `Welcome` may already send: every shard
        // knows it (SessionUp went first), and answers are held until
        // `connected`. A visitor not yet durable is known nowhere else yet,
        // so its commands (a `ping` too) wait here until it is.
        if sess.stage == Stage::Storing {
            if sess.pipelined.len() < PIPELINED_WHILE_STORING_MAX {
                sess.pipelined.push(frame);
            } else {
                let e = ServerFrame::error(id, ErrorCode::BadCommand, "connect is still in progress");
                self.send(from, codec, &e);
            }
            return;
        }
        let request = match sess.session.check(frame.body, now) {
            Ok(r) => r,
            Err(e) => {
                let code = e.code();
                self.send(from, codec, &ServerFrame::error(id, code, e.to_string()));
                return;
            }
        };
        let Some(actor) = sess.session.actor() else { return };
        let routing = sess.routing;
        let reply = (from, codec, id);
        // A command for a home behind a routing command of this session
        // goes through the router, after that command's decision.
        let (to, msg, via_router) = match request {
            Checked::Pong => return self.send(from, codec, &ServerFrame::reply(id, Event::Pong)),
            Checked::Route(request) => {
                (ROUTER_SHARD, ShardMsg::Chat(Box::new(ChatMsg::Route { reply, actor, request })), true)
            }
            Checked::Home(request) if routing > 0 => {
                (ROUTER_SHARD, ShardMsg::Chat(Box::new(ChatMsg::Relay { reply, actor, request })), true)
            }
            Checked::Home(request) => {
                (request.conv().home(self.shards), ShardMsg::Home { reply, actor, request }, false)
            }
        };
        if !self.post(to, msg) {
            self.busy(reply);
        } else if via_router {
            self.routing_sent(from);
        }
    }

    fn routing_sent(&mut self, addr: SessionAddr) {
        if let Some(sess) = self.sessions.get_mut(&addr) {
            sess.routing += 1;
        }
    }

    /// The router has handled one of this session's `Route`s or `Relay`s.
    pub(super) fn on_routed(&mut self, addr: SessionAddr) {
        if let Some(sess) = self.sessions.get_mut(&addr) {
            sess.routing = sess.routing.saturating_sub(1);
        }
    }

    fn on_connect(
        &mut self,
        reply: Reply,
        token: Option<String>,
        visitor_id: Option<String>,
        visitor_key: Option<String>,
        resume: Vec<(ConvId, u64)>,
    ) {
        let (from, codec, id) = reply;
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
                let stored = match self.reader.user(Role::Visitor, visitor_id) {
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
        let stage = if new_key.is_some() { Stage::Storing } else { Stage::Welcoming };
        let sess = Sess {
            codec,
            session,
            stage,
            connect_id: id,
            resume,
            visitor_key: new_key.as_ref().map(VisitorKey::to_hex),
            pipelined: Vec::new(),
            routing: 0,
        };
        self.sessions.insert(from, sess);
        // `connected` is the first frame the session gets: whatever is
        // written to it before (answers to pipelined commands) waits.
        self.held.insert(from, Vec::new());
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
                if !self.submit(WriteOp::PutUser(record), Pending::Connected { to: from }) {
                    self.sessions.remove(&from);
                    self.held.remove(&from);
                    let e = ServerFrame::error(id, ErrorCode::Unavailable, "storage busy; retry");
                    self.send(from, codec, &e);
                }
            }
            None => self.announce(from),
        }
    }

    /// Tells every shard the session exists (each home replays its share of
    /// `resume`), then asks the router for `connected`'s conversations.
    /// Frames for the session stay held (since its `connect`) until `connected`.
    pub(super) fn announce(&mut self, addr: SessionAddr) {
        let Some(sess) = self.sessions.get_mut(&addr) else { return };
        sess.stage = Stage::Welcoming;
        let (codec, resume) = (sess.codec, std::mem::take(&mut sess.resume));
        let Some(identity) = sess.session.identity().cloned() else { return };
        let actor = identity.actor();
        for shard in 0..self.shards {
            let mine = resume.iter().copied().filter(|(c, _)| c.home(self.shards) == shard).collect();
            let up = ChatMsg::SessionUp { addr, codec, actor: actor.clone(), resume: mine };
            if !self.post_chat(shard, up) {
                // A shard that missed it would never reach this session:
                // better a reconnect now.
                return self.close(addr, close::SERVER_SHUTDOWN, "server busy; reconnect");
            }
        }
        let id = self.sessions.get(&addr).and_then(|s| s.connect_id);
        if !self.post_chat(ROUTER_SHARD, ChatMsg::Hello { reply: (addr, codec, id), identity }) {
            return self.close(addr, close::SERVER_SHUTDOWN, "server busy; reconnect");
        }
        // Commands a new visitor sent while it was being stored, in order.
        let pipelined = self.sessions.get_mut(&addr).map(|s| std::mem::take(&mut s.pipelined));
        for frame in pipelined.unwrap_or_default() {
            self.on_frame(addr, codec, frame);
        }
    }

    /// The router's answer: write `connected`, then what was held.
    pub(super) fn on_welcome(&mut self, reply: Reply, conversations: Vec<(ConvId, ConvStatus)>) {
        let (to, codec, id) = reply;
        let Some(sess) = self.sessions.get_mut(&to) else { return };
        sess.stage = Stage::Ready;
        let visitor_key = sess.visitor_key.take();
        let Some(identity) = sess.session.identity().cloned() else { return };
        let mut conversations: Vec<ConvSummary> = conversations
            .into_iter()
            .map(|(conv, status)| ConvSummary {
                conv,
                status,
                last_seq: self.reader.last_seq(conv.0).unwrap_or(0),
            })
            .collect();
        if identity.role == Role::Visitor {
            // Then its past conversations, for a returning visitor's history.
            // One the router still had open may be closed in storage by now:
            // it is listed as the router saw it (its close is pushed after
            // `connected`), not twice.
            let max = self.core.routing.connected_closed_max;
            let open = conversations.len();
            match self.reader.conversations_of(&identity.id, max + open) {
                Ok(past) => {
                    let closed: Vec<ConvSummary> = past
                        .into_iter()
                        .filter(|c| c.status == ConvStatus::Closed)
                        .filter(|c| !conversations[..open].iter().any(|s| s.conv.0 == c.id))
                        .take(max)
                        .map(|c| ConvSummary { conv: ConvId(c.id), status: c.status, last_seq: c.last_seq })
                        .collect();
                    conversations.extend(closed);
                }
                Err(e) => warn!(error = %e, "cannot list a visitor's past conversations"),
            }
        }
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
                heartbeat_s: self.heartbeat_s,
            },
        );
        let held = self.held.remove(&to).unwrap_or_default();
        self.send(to, codec, &frame);
        for bytes in held {
            self.write(to, bytes);
        }
    }

    /// A new anonymous visitor could not be stored.
    pub(super) fn connect_failed(&mut self, to: SessionAddr) {
        if let Some(sess) = self.sessions.remove(&to) {
            // Never connected: what was held goes with it.
            self.held.remove(&to);
            let frame =
                ServerFrame::error(None, ErrorCode::Unavailable, "could not store the visitor; retry");
            self.send(to, sess.codec, &frame);
            self.close(to, close::SERVER_SHUTDOWN, "storage error");
        }
    }

    pub(super) fn on_gone(&mut self, from: SessionAddr) {
        self.held.remove(&from);
        let Some(sess) = self.sessions.remove(&from) else { return };
        let Some(identity) = sess.session.identity() else { return };
        if sess.stage == Stage::Storing {
            // Never announced.
            return;
        }
        for shard in 0..self.shards {
            let down = ChatMsg::SessionDown { addr: from, user: identity.key() };
            self.post_kept(shard, ShardMsg::Chat(Box::new(down)));
        }
        if identity.role == Role::Agent {
            let gone = ChatMsg::AgentGone { agent: identity.id.clone(), device: device_of(from) };
            self.post_kept(ROUTER_SHARD, ShardMsg::Chat(Box::new(gone)));
        }
    }
}
