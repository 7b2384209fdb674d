//! The home part of a shard's chat service: the conversations homed on this
//! shard. It assigns `seq`, makes messages and changes durable, then acks
//! and announces them to every participant, wherever they are connected.

use kefu_core::Conversation;
use kefu_core::conversation::{Access, ReadOutcome, SendOutcome, TypingOutcome};
use kefu_core::identity::{Actor, UserKey};
use kefu_core::resume::{ReplayWindow, frame_weight};
use kefu_core::session::HomeRequest;
use kefu_proto::client::{self, AgentRef as WireAgent, Codec, Event, Msg, ServerFrame, User};
use kefu_proto::{ConvId, ConvStatus, ErrorCode, Role};
use kefu_storage::{ConversationRecord, ReadMark, UserRecord, WriteOp};
use tracing::warn;

use super::directory::Member;
use super::service::{ChatService, Pending, now_ms, restored_conversation};
use super::{Change, Reply, RouteInfo, SessionAddr};

/// Messages read from storage at a time while replaying a resume.
const REPLAY_PAGE: usize = 256;
/// Bytes of replayed frames written together: one outbound entry of the
/// connection for many messages.
const REPLAY_CHUNK_BYTES: usize = 64 * 1024;

impl ChatService {
    pub(super) fn on_home(&mut self, reply: Reply, actor: &Actor, request: HomeRequest) {
        let now = now_ms();
        let conv = request.conv();
        match request {
            HomeRequest::Send { conv, cid, text, attachment } => {
                // The edge checked the cid's size; the window keeps it inline.
                match kefu_core::Cid::new(&cid) {
                    Ok(parsed) => self.on_send(reply, actor, conv, (parsed, cid), text, attachment, now),
                    Err(e) => {
                        let (to, codec, id) = reply;
                        self.send(to, codec, &ServerFrame::error(id, ErrorCode::BadCommand, e.to_string()));
                    }
                }
            }
            HomeRequest::Read { conv, seq } => self.on_read(reply, actor, conv, seq, now),
            HomeRequest::Typing { conv } => self.on_typing(reply, actor, conv, now),
            HomeRequest::History { conv, before, limit } => {
                self.on_history(reply, actor, conv, before, limit)
            }
        }
        self.give_back(conv);
    }

    /// A session is connected somewhere: remember how to reach it, and
    /// replay what it missed of the conversations homed here, before any
    /// live message of theirs can reach it.
    pub(super) fn on_session_up(
        &mut self,
        addr: SessionAddr,
        codec: Codec,
        actor: &Actor,
        resume: &[(ConvId, u64)],
    ) {
        self.directory.add(actor.key(), Member { addr, codec });
        for &(conv, last_seen) in resume {
            self.replay(addr, codec, actor, conv, last_seen);
            self.give_back(conv);
        }
    }

    pub(super) fn on_session_down(&mut self, addr: SessionAddr, user: &UserKey) {
        self.directory.remove(user, addr);
        for waiters in self.dup_waiters.values_mut() {
            waiters.retain(|(a, _, _)| *a != addr);
        }
    }

    /// Sends what a reconnecting client missed of `conv`, then `resumed`.
    fn replay(&mut self, to: SessionAddr, codec: Codec, actor: &Actor, conv: ConvId, last_seen: u64) {
        if !self.load(conv) {
            let e = ServerFrame::error(None, ErrorCode::NotFound, format!("{conv}: not found"));
            return self.send(to, codec, &e);
        }
        let Some(c) = self.convs.get(&conv) else { return };
        let range = match c.resume(actor, last_seen) {
            Ok(r) => r,
            Err(e) => {
                return self.send(to, codec, &ServerFrame::error(None, e.code(), format!("{conv}: {e}")));
            }
        };
        // More missed than one resume replays (in count or in bytes): the
        // newest of them, and `resumed.from` says where they start.
        let cursor_from = match self.replay_start(conv, last_seen, range.to) {
            Ok(start) => start,
            Err(e) => return self.send(to, codec, &ServerFrame::error(None, e.code(), e.to_string())),
        };
        let from = if cursor_from > last_seen { cursor_from + 1 } else { range.from };
        // Read a page at a time, and write the frames packed into chunks:
        // a connection's outbound queue bounds frames as well as bytes
        // (`limits.outbound_queue_*`), and a long backlog must not look
        // like a slow consumer, nor sit in memory whole.
        let mut chunk = Vec::new();
        let mut cursor = cursor_from;
        while cursor < range.to {
            let want = REPLAY_PAGE.min((range.to - cursor) as usize);
            let page = match self.reader.after(conv.0, cursor, want) {
                Ok(page) => page,
                Err(e) => {
                    self.write_chunk(to, &mut chunk);
                    return self.send(to, codec, &ServerFrame::error(None, e.code(), e.to_string()));
                }
            };
            let before = cursor;
            for m in page.into_iter().take_while(|m| m.record.seq <= range.to) {
                cursor = m.record.seq;
                let frame = self.frames.encode(codec, &ServerFrame::push(Event::Msg(m.record.into_msg())));
                chunk.extend_from_slice(&frame);
                if chunk.len() >= REPLAY_CHUNK_BYTES {
                    self.write_chunk(to, &mut chunk);
                }
            }
            if cursor == before {
                break;
            }
        }
        let done = Event::Resumed { conv, from, to: range.to };
        chunk.extend_from_slice(&self.frames.encode(codec, &ServerFrame::push(done)));
        self.write_chunk(to, &mut chunk);
    }

    /// Where a replay of `(last_seen, to]` starts: after `last_seen`, unless
    /// that is more than `messages.max_resume_messages` messages or more
    /// than the replay's byte budget (half the connection's outbound bound,
    /// so a backlog of big attachments cannot get the client cut at every
    /// reconnect); then after the oldest of the newest messages that fit.
    /// At least the newest message is always replayed.
    fn replay_start(&self, conv: ConvId, last_seen: u64, to: u64) -> Result<u64, kefu_storage::StorageError> {
        let limits = &self.core.limits;
        let mut window = ReplayWindow::new(last_seen, to, limits.max_resume_messages, self.replay_bytes_max);
        let Some(range) = window.to_weigh(to) else { return Ok(window.start()) };
        self.reader.visit_messages(conv.0, range, true, usize::MAX, |_, m| {
            let text = m.text.as_ref().map_or(0, |t| t.len());
            let weight = frame_weight(text, m.attachment.as_ref().map(|a| a.bytes.len()));
            match window.admit(m.seq.to_native(), weight) {
                true => std::ops::ControlFlow::Continue(()),
                false => std::ops::ControlFlow::Break(()),
            }
        })?;
        Ok(window.start())
    }

    /// Writes the packed WebSocket frames in `chunk` as one outbound write.
    fn write_chunk(&mut self, to: SessionAddr, chunk: &mut Vec<u8>) {
        if !chunk.is_empty() {
            self.write(to, std::sync::Arc::new(std::mem::take(chunk)));
        }
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
        match self.reader.dedupe_before(actor.role, &actor.id, conv.0, cid.as_str(), below) {
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
        if !self.submit(WriteOp::AppendMessage(msg), Pending::Message { conv, seq, sender }) {
            // Nothing was written: the seq must be taken back, which only a
            // rebuild from storage does safely.
            self.reload(conv);
            if let Some((to, codec, id)) = sender {
                self.send(to, codec, &ServerFrame::error(id, ErrorCode::Unavailable, "storage busy; retry"));
            }
        }
    }

    /// A message is durable: answer duplicates that waited for it, fan it
    /// out, let the keyword rules answer, and ack it last: the ack takes the
    /// cid and text buffers back to the sender's shard, whose decoder
    /// filled them, once the fan-out no longer needs them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn message_committed(
        &mut self,
        conv: ConvId,
        ours: u64,
        sender: Option<Reply>,
        mut msg: Msg,
        duplicate: bool,
        seq: u64,
        ts: u64,
    ) {
        if let Some(c) = self.convs.get_mut(&conv) {
            c.committed(ours);
        }
        // The ack borrows the message's cid and hands it back.
        let mut ack = ServerFrame::reply(
            None,
            Event::Ack { cid: std::mem::take(&mut msg.cid), conv, seq, ts, duplicate },
        );
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
                self.write(to, bytes);
            }
            // Storage had it already (a resend older than the window): the
            // seq we took is unused, so rebuild.
            self.reload(conv);
            return;
        }
        let except = sender.map(|(a, _, _)| a);
        let mut audience = std::mem::take(&mut self.audience);
        audience.clear();
        audience.extend(self.participants(conv).filter(|m| Some(m.addr) != except));
        let auto = (msg.from.role == Role::Visitor)
            .then(|| msg.text.as_deref().and_then(|t| self.rules.auto_reply(Role::Visitor, t)))
            .flatten()
            .map(str::to_string);
        let frame = ServerFrame::push(Event::Msg(msg));
        self.deliver(audience.iter().copied(), &frame);
        self.audience = audience;
        if let Event::Msg(Msg { cid, from, text, .. }) = frame.body {
            self.strings.give(from.id);
            self.strings.give(from.name);
            match sender_ack {
                Some((to, bytes)) => self.write_with(to, bytes, [Some(cid), text]),
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

    fn on_read(&mut self, reply: Reply, actor: &Actor, conv: ConvId, seq: u64, now: u64) {
        let (from, codec, id) = reply;
        if !self.found(reply, conv) {
            return;
        }
        let Some(c) = self.convs.get_mut(&conv) else { return };
        match c.read(actor, seq) {
            Ok(ReadOutcome::Advanced { seq }) => {
                let mark = ReadMark { conv: conv.0, user_id: actor.id.to_string(), seq, ts_ms: now };
                let _ = self.submit(WriteOp::MarkRead(mark), Pending::Nothing);
                let event = ServerFrame::push(Event::Read { conv, seq, by: actor.id.to_string() });
                let audience: Vec<Member> = self.participants(conv).filter(|m| m.addr != from).collect();
                self.deliver(audience, &event);
            }
            Ok(ReadOutcome::Unchanged) => {}
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
                let audience: Vec<Member> = self.participants(conv).filter(|m| m.addr != from).collect();
                self.deliver(audience, &event);
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
                let messages = page.into_iter().map(|m| m.record.into_msg()).collect();
                ServerFrame::reply(id, Event::History { conv, messages })
            }
            Err(e) => ServerFrame::error(id, e.code(), e.to_string()),
        };
        self.send(from, codec, &frame);
    }

    // ---- changes the router decided -----------------------------------

    pub(super) fn on_change(&mut self, conv: ConvId, change: Change, reply: Option<Reply>, route: RouteInfo) {
        match change {
            Change::Create { visitor, group } => {
                let c = Conversation::new(conv, visitor.clone(), group, &self.core.limits);
                self.convs.insert(conv, c);
                // The visitor's profile (token meta merged with the widget's)
                // is what agents see, so it is stored too.
                let user = UserRecord {
                    id: visitor.id.to_string(),
                    role: Role::Visitor,
                    name: visitor.name.to_string(),
                    meta: visitor.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    visitor_key_hash: self
                        .reader
                        .user(Role::Visitor, &visitor.id)
                        .ok()
                        .flatten()
                        .and_then(|u| u.visitor_key_hash),
                    created_ms: now_ms(),
                };
                let _ = self.submit(WriteOp::PutUser(user), Pending::Nothing);
                self.persist_conv(conv, reply, None, route);
            }
            Change::Assign { agent, group, previous } => {
                // A transfer to a group that is taken at once arrives as one
                // Assign carrying the new group.
                let moved = |c: &mut Conversation| {
                    if *c.group() != group {
                        let _ = c.queue(group.clone());
                    }
                    c.assign(agent).is_ok()
                };
                if self.load(conv) && self.convs.get_mut(&conv).is_some_and(moved) {
                    self.persist_conv(conv, reply, previous, route);
                } else {
                    self.describe(conv, reply, &route);
                }
            }
            Change::Queue { group, previous } => {
                if self.load(conv) && self.convs.get_mut(&conv).is_some_and(|c| c.queue(group).is_ok()) {
                    self.persist_conv(conv, reply, previous, route);
                } else {
                    self.describe(conv, reply, &route);
                }
            }
            Change::Close => {
                if self.load(conv) && self.convs.get_mut(&conv).is_some_and(|c| c.close()) {
                    self.persist_conv(conv, reply, None, route);
                } else {
                    self.describe(conv, reply, &route);
                }
            }
            Change::Position => {
                if let Some(frame) = self.conversation_frame(conv, None, route.position) {
                    let audience: Vec<Member> = self.visitor_members(conv).collect();
                    self.deliver(audience, &frame);
                }
            }
            Change::Describe => self.describe(conv, reply, &route),
            Change::CloseClosed { actor } => {
                let Some(reply) = reply else { return };
                if !self.found(reply, conv) {
                    return;
                }
                let (to, codec, id) = reply;
                let state = self.convs.get(&conv).map(|c| (c.status(), c.check_access(&actor, Access::Read)));
                match state {
                    Some((_, Err(e))) => {
                        self.send(to, codec, &ServerFrame::error(id, e.code(), e.to_string()))
                    }
                    // Closing again answers with the closed state.
                    Some((ConvStatus::Closed, Ok(()))) => self.describe(conv, Some(reply), &route),
                    _ => {
                        let e = ServerFrame::error(id, ErrorCode::NotFound, format!("{conv}: not found"));
                        self.send(to, codec, &e);
                    }
                }
            }
        }
        self.give_back(conv);
    }

    /// Answers a command with the conversation's current state.
    fn describe(&mut self, conv: ConvId, reply: Option<Reply>, route: &RouteInfo) {
        let Some(reply) = reply else { return };
        if !self.found(reply, conv) {
            return;
        }
        let (to, codec, id) = reply;
        if let Some(frame) = self.conversation_frame(conv, id, route.position) {
            self.send(to, codec, &frame);
        }
    }

    fn persist_conv(
        &mut self,
        conv: ConvId,
        reply: Option<Reply>,
        previous: Option<UserKey>,
        route: RouteInfo,
    ) {
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
        let pending = Pending::ConvChanged { reply, previous, route };
        if !self.submit(WriteOp::PutConversation(record), pending) {
            warn!(%conv, "storage queue full: conversation change not persisted");
            if let Some((to, codec, id)) = reply {
                self.send(to, codec, &ServerFrame::error(id, ErrorCode::Unavailable, "storage busy; retry"));
            }
        }
    }

    /// A conversation's change is durable: tell everyone concerned, and
    /// answer the command that caused it.
    ///
    /// What is announced is `stored`, the state this write made durable, not
    /// the conversation in memory, which may already be a decision further
    /// on (an `open` assigned at once is stored queued, then assigned): each
    /// commit announces its own state, so nothing is told before it is
    /// durable.
    pub(super) fn change_committed(
        &mut self,
        stored: ConversationRecord,
        reply: Option<Reply>,
        previous: Option<UserKey>,
        route: &RouteInfo,
    ) {
        let conv = ConvId(stored.id);
        let audience = self.directory.change_audience(
            &stored.visitor_id,
            stored.agent.as_ref().map(|a| a.id.as_str()),
            stored.status,
            previous.as_ref(),
            &route.notify,
            reply.map(|(a, _, _)| a),
        );
        let mut frame = self.stored_frame(&stored, route.position);
        self.deliver(audience, &frame);
        if let Some((to, codec, id)) = reply {
            frame.id = id;
            self.send(to, codec, &frame);
        }
        if stored.status == ConvStatus::Closed
            && self.convs.get(&conv).is_some_and(|c| c.status() == ConvStatus::Closed)
        {
            self.convs.remove(&conv);
        }
    }

    /// The `conversation` event for a stored state of a conversation, with
    /// the visitor's profile as this home knows it.
    fn stored_frame(&self, stored: &ConversationRecord, position: Option<u32>) -> ServerFrame {
        let visitor = match self.convs.get(&ConvId(stored.id)).map(|c| c.visitor()) {
            Some(v) => User { id: v.id.to_string(), name: v.name.to_string(), meta: v.meta.clone() },
            None => User {
                id: stored.visitor_id.clone(),
                name: stored.visitor_id.clone(),
                meta: Default::default(),
            },
        };
        ServerFrame::push(Event::Conversation {
            conv: ConvId(stored.id),
            status: stored.status,
            agent: stored.agent.as_ref().map(|a| WireAgent { id: a.id.clone(), name: a.name.clone() }),
            group: stored.group.clone(),
            visitor,
            queue_position: (stored.status == ConvStatus::Queued).then_some(position).flatten(),
        })
    }

    // ---- conversations in memory --------------------------------------

    /// As [`Self::load`], answering the command `not_found` if it does not exist.
    fn found(&mut self, reply: Reply, conv: ConvId) -> bool {
        let (to, codec, id) = reply;
        let ok = self.load(conv);
        if !ok {
            self.send(to, codec, &ServerFrame::error(id, ErrorCode::NotFound, format!("{conv}: not found")));
        }
        ok
    }

    /// Makes sure `conv` is in memory. A closed conversation is loaded on
    /// demand (history, reads, resume) and only borrowed: [`Self::give_back`]
    /// drops it once the command is answered, so paging through old
    /// conversations does not grow memory. False if it does not exist.
    fn load(&mut self, conv: ConvId) -> bool {
        if self.convs.contains_key(&conv) {
            return true;
        }
        self.reload(conv);
        let closed = self.convs.get(&conv).map(|c| c.status() == ConvStatus::Closed);
        if closed == Some(true) {
            self.borrowed.insert(conv);
        }
        closed.is_some()
    }

    /// Drops `conv` from memory if it was only loaded to answer a command.
    pub(super) fn give_back(&mut self, conv: ConvId) {
        if self.borrowed.remove(&conv) {
            self.convs.remove(&conv);
        }
    }

    /// Rebuilds a conversation from storage (after a failed or duplicate
    /// append, its in-memory seq may be ahead of the log).
    pub(super) fn reload(&mut self, conv: ConvId) {
        debug_assert_eq!(conv.home(self.shards), self.me, "{conv} is not homed here");
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

    fn conversation_frame(
        &self,
        conv: ConvId,
        id: Option<i64>,
        position: Option<u32>,
    ) -> Option<ServerFrame> {
        let c = self.convs.get(&conv)?;
        let v = c.visitor();
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

    /// The visitor's and the assigned (or, once closed, the last) agent's
    /// sessions. A queued conversation's `agent` is whoever gave it away,
    /// who no longer takes part.
    fn participants(&self, conv: ConvId) -> impl Iterator<Item = Member> + '_ {
        self.convs
            .get(&conv)
            .into_iter()
            .flat_map(|c| self.directory.participants(&c.visitor().id, c.agent().map(|a| &*a.id), c.status()))
    }

    fn visitor_members(&self, conv: ConvId) -> impl Iterator<Item = Member> + '_ {
        self.convs
            .get(&conv)
            .into_iter()
            .flat_map(|c| self.directory.sessions(Role::Visitor, &c.visitor().id))
    }
}
