//! The home: the conversations homed on one shard (`ConvId::home`). It
//! assigns `seq`, asks for messages and changes to be made durable, and
//! once they are, acks and announces them to every participant wherever
//! they are connected. It also replays what a resuming session missed,
//! and pages history.
//!
//! Sans-IO: inputs come in through `handle_*` with the time, the shard's
//! [`Directory`] (to find participants) and its [`Stored`] reads; frames,
//! posts and writes go out through [`Home::poll_output`]; a write's outcome
//! comes back through [`Home::handle_committed`] / [`Home::handle_failed`].
//!
//! Nothing is announced before it is durable: a message is acked and fanned
//! out from its commit, and a change announces the state its write stored.
//! A change is applied to the conversation in memory first (so the next
//! command sees it), and a failed write rebuilds the conversation from
//! storage.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kefu_proto::client::{self, AgentRef as WireAgent, Codec, Event, Msg, ServerFrame, SpareStrings, User};
use kefu_proto::{ConvId, ConvStatus, ErrorCode, Role};

use super::directory::{Directory, Member};
use super::hooks::{HookCall, Verdict};
use super::outbox::{ConvState, Outbox, Output, Pending, Profile, Write};
use super::stored::{ReadError, Stored, StoredUser};
use super::{Change, PositionUpdate, Reply, RouteInfo, SessionAddr};
use crate::CoreConfig;
use crate::cid::Cid;
use crate::config::HookFailure;
use crate::conversation::{
    Access, Conversation, ReadOutcome, RestoredConversation, SendOutcome, TypingOutcome,
};
use crate::identity::{Actor, UserKey, Visitor};
use crate::resume::{ReplayWindow, frame_weight};
use crate::rules::Rules;
use crate::session::HomeRequest;

/// Messages read from storage at a time while replaying a resume.
const REPLAY_PAGE: usize = 256;
/// Bytes of replayed frames written together: one outbound entry of the
/// connection for many messages.
const REPLAY_CHUNK_BYTES: usize = 64 * 1024;

/// A write's outcome, as storage reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// For a message: its seq (for a duplicate: the original's).
    pub seq: u64,
    /// For a message: its time (for a duplicate: the original's).
    pub ts_ms: u64,
    /// The append matched an earlier one by (sender, conversation, cid)
    /// and stored nothing.
    pub duplicate: bool,
}

/// A visitor's or agent's message, checked by its edge, not yet given a seq.
struct Draft {
    reply: Reply,
    actor: Actor,
    cid: Cid,
    /// The cid as the client sent it (the decoder's buffer, stored as is).
    wire_cid: String,
    text: Option<String>,
    attachment: Option<client::Attachment>,
    /// Resends that came while it waited for its hook's verdict.
    resends: Vec<Reply>,
}

/// A message waiting for the `OnMessage` verdict (or behind one that is).
struct Screened {
    /// The hook call's token; 0 until it is called.
    token: u64,
    draft: Draft,
}

/// The conversations homed on one shard.
pub struct Home {
    me: usize,
    shards: usize,
    core: Arc<CoreConfig>,
    /// Bytes one conversation's resume replay may queue on a connection.
    replay_bytes_max: usize,
    /// The conversations in memory: the open ones, and closed ones
    /// borrowed to answer one command. Boxed: a `Conversation` is a few
    /// hundred bytes, and a map keeps up to half its slots empty after it
    /// grows, so inline values would cost every open conversation about
    /// twice its size; boxed, an empty slot costs a pointer.
    convs: HashMap<ConvId, Box<Conversation>>,
    /// Closed conversations in `convs` only to answer one command.
    borrowed: HashSet<ConvId>,
    /// Why the last [`Self::load`] found nothing, if storage failed to read
    /// (rather than found no such conversation): the command is answered
    /// with that (`unavailable` while storage recovers), not `not_found`.
    read_error: Option<ReadError>,
    /// Resends waiting for their original's commit.
    dup_waiters: HashMap<(ConvId, u64), Vec<Reply>>,
    /// Message writes submitted and not yet answered, per conversation.
    appending: HashMap<ConvId, u32>,
    /// Conversations to rebuild from storage once their message writes in
    /// flight are answered (see [`Self::rebuild`]); sends wait meanwhile.
    rebuild_due: HashSet<ConvId>,
    rules: Rules,
    /// Messages waiting for the `OnMessage` hook, per conversation, in order.
    screening: HashMap<ConvId, VecDeque<Screened>>,
    /// Hook calls out: token → the conversation whose first message it screens.
    hook_calls: HashMap<u64, ConvId>,
    next_hook: u64,
    out: Outbox,
    /// Reused for each message's audience.
    audience: Vec<Member>,
    /// Buffers of delivered messages' strings, for the sender id and name
    /// of the next ones (the cid and text go back to the edges).
    strings: SpareStrings,
}

impl Home {
    /// Shard `me`'s home (of `shards`), holding the open conversations
    /// homed here that a restart found.
    pub fn new(
        me: usize,
        shards: usize,
        core: Arc<CoreConfig>,
        replay_bytes_max: usize,
        open: Vec<crate::conversation::RestoredConversation>,
    ) -> Home {
        let convs =
            open.into_iter().map(|r| (r.id, Box::new(Conversation::restore(r, &core.limits)))).collect();
        Home {
            me,
            shards,
            rules: Rules::new(&core.rules),
            core,
            replay_bytes_max,
            convs,
            borrowed: HashSet::new(),
            read_error: None,
            dup_waiters: HashMap::new(),
            appending: HashMap::new(),
            rebuild_due: HashSet::new(),
            screening: HashMap::new(),
            hook_calls: HashMap::new(),
            next_hook: 0,
            out: Outbox::new(),
            audience: Vec::new(),
            strings: SpareStrings::new(),
        }
    }

    /// The next thing to carry out.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop()
    }

    /// Conversations in memory (open, plus any borrowed right now).
    pub fn conversations(&self) -> usize {
        self.convs.len()
    }

    /// A command about a conversation homed here, checked by its edge.
    pub fn handle_request(
        &mut self,
        reply: Reply,
        actor: &Actor,
        request: HomeRequest,
        now_ms: u64,
        dir: &Directory,
        store: &dyn Stored,
    ) {
        let conv = request.conv();
        match request {
            HomeRequest::Send { conv, cid, text, attachment } => match Cid::new(&cid) {
                // The edge checked the cid's size; the window keeps it inline.
                Ok(parsed) => {
                    self.on_send(reply, actor, conv, (parsed, cid), text, attachment, now_ms, store)
                }
                Err(e) => self.out.error(reply, ErrorCode::BadCommand, e.to_string()),
            },
            HomeRequest::Read { conv, seq } => self.on_read(reply, actor, conv, seq, now_ms, dir, store),
            HomeRequest::Typing { conv } => self.on_typing(reply, actor, conv, now_ms, dir, store),
            HomeRequest::History { conv, before, limit } => {
                self.on_history(reply, actor, conv, before, limit, store)
            }
        }
        self.give_back(conv);
    }

    /// A session is connected somewhere (the directory has it already):
    /// replay what it missed of the conversations homed here, before any
    /// live message of theirs can reach it.
    pub fn handle_session_up(
        &mut self,
        addr: SessionAddr,
        codec: Codec,
        actor: &Actor,
        resume: &[(ConvId, u64)],
        store: &dyn Stored,
    ) {
        for &(conv, last_seen) in resume {
            self.replay(addr, codec, actor, conv, last_seen, store);
            self.give_back(conv);
        }
    }

    /// A session has gone: resends of its own waiting here get no answer.
    pub fn handle_session_down(&mut self, addr: SessionAddr) {
        for waiters in self.dup_waiters.values_mut() {
            waiters.retain(|(a, _, _)| *a != addr);
        }
    }

    /// A write this home asked for is durable.
    pub fn handle_committed(
        &mut self,
        pending: Pending,
        write: Write,
        durable: Durable,
        now_ms: u64,
        dir: &Directory,
        store: &dyn Stored,
    ) {
        match (pending, write) {
            (Pending::Message { conv, seq, sender }, Write::Message(msg)) => {
                self.appended(conv);
                self.message_committed(conv, seq, sender, msg, durable, now_ms, dir, store);
                self.rebuild_if_due(conv, store);
            }
            (Pending::ConvChanged { reply, previous, route }, Write::Conversation(stored)) => {
                self.change_committed(stored, reply, previous, &route, dir)
            }
            (Pending::Nothing, _) => {}
            // The loop hands back the very write this home asked for with
            // its pending: an invariant of the boundary, asserted.
            (pending, write) => unreachable!("a home's write came back as another: {pending:?} {write:?}"),
        }
    }

    /// A write this home asked for failed: nothing of it is stored.
    pub fn handle_failed(&mut self, pending: Pending, error: &ReadError, store: &dyn Stored) {
        match pending {
            Pending::Message { conv, seq, sender } => {
                // The seq must be taken back, which only a rebuild from
                // storage does safely; resends that waited for this write
                // fail with it (a later message must not answer them).
                self.appended(conv);
                self.rebuild(conv, store);
                let waiters = self.dup_waiters.remove(&(conv, seq)).unwrap_or_default();
                for reply in sender.into_iter().chain(waiters) {
                    self.out.error(reply, error.code, error.message.clone());
                }
            }
            Pending::ConvChanged { reply: Some(reply), .. } => {
                self.out.error(reply, error.code, error.message.clone())
            }
            Pending::ConvChanged { reply: None, .. }
            | Pending::Nothing
            | Pending::Connected { .. }
            | Pending::UserChanged { .. } => {}
        }
    }

    // ---- commands ---------------------------------------------------

    /// Sends what a reconnecting client missed of `conv`, then `resumed`.
    fn replay(
        &mut self,
        to: SessionAddr,
        codec: Codec,
        actor: &Actor,
        conv: ConvId,
        last_seen: u64,
        store: &dyn Stored,
    ) {
        let reply = (to, codec, None);
        if !self.load(conv, store) {
            let (code, message) = self.not_loaded(conv);
            return self.out.error(reply, code, message);
        }
        let Some(c) = self.convs.get(&conv) else { return };
        let range = match c.resume(actor, last_seen) {
            Ok(r) => r,
            Err(e) => return self.out.error(reply, e.code(), format!("{conv}: {e}")),
        };
        // More missed than one resume replays (in count or in bytes): the
        // newest of them, and `resumed.from` says where they start.
        let cursor_from = match self.replay_start(conv, last_seen, range.to, store) {
            Ok(start) => start,
            Err(e) => return self.out.error(reply, e.code, e.message),
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
            let page = match store.after(conv, cursor, want) {
                Ok(page) => page,
                Err(e) => {
                    self.write_chunk(to, &mut chunk);
                    return self.out.error(reply, e.code, e.message);
                }
            };
            let before = cursor;
            for m in page.into_iter().take_while(|m| m.seq <= range.to) {
                cursor = m.seq;
                let frame = self.out.encode(codec, &ServerFrame::push(Event::Msg(m)));
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
        chunk.extend_from_slice(&self.out.encode(codec, &ServerFrame::push(done)));
        self.write_chunk(to, &mut chunk);
    }

    /// Where a replay of `(last_seen, to]` starts: after `last_seen`, unless
    /// that is more than `messages.max_resume_messages` messages or more
    /// than the replay's byte budget (half the connection's outbound bound,
    /// so a backlog of big attachments cannot get the client cut at every
    /// reconnect); then after the oldest of the newest messages that fit.
    /// At least the newest message is always replayed.
    fn replay_start(
        &self,
        conv: ConvId,
        last_seen: u64,
        to: u64,
        store: &dyn Stored,
    ) -> Result<u64, ReadError> {
        let limits = &self.core.limits;
        let mut window = ReplayWindow::new(last_seen, to, limits.max_resume_messages, self.replay_bytes_max);
        let Some(range) = window.to_weigh(to) else { return Ok(window.start()) };
        store.sizes(conv, range, &mut |seq, text, attachment| {
            window.admit(seq, frame_weight(text, attachment))
        })?;
        Ok(window.start())
    }

    /// Writes the packed WebSocket frames in `chunk` as one outbound write.
    fn write_chunk(&mut self, to: SessionAddr, chunk: &mut Vec<u8>) {
        if !chunk.is_empty() {
            self.out.write(to, Arc::new(std::mem::take(chunk)));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_send(
        &mut self,
        reply: Reply,
        actor: &Actor,
        conv: ConvId,
        (cid, wire_cid): (Cid, String),
        text: Option<String>,
        attachment: Option<client::Attachment>,
        now_ms: u64,
        store: &dyn Stored,
    ) {
        if !self.found(reply, conv, store) {
            return;
        }
        let (from, codec, id) = reply;
        // Access first, as the window's answer checks it: a resend answered
        // from storage must not tell one who lost the conversation (or
        // sends to it closed) more than a resend the window remembers.
        if let Some(Err(e)) = self.convs.get(&conv).map(|c| c.check_access(actor, Access::Write)) {
            return self.out.error(reply, e.code(), e.to_string());
        }
        // Older resends than the conversation's window remembers: the
        // durable dedupe index has the original. Only the seqs below the
        // window are asked about (none while the window has never lost a
        // cid), which the store's cache mostly answers without a read.
        let (below, durable) = self
            .convs
            .get(&conv)
            .map_or((u64::MAX, u64::MAX), |c| (c.cids_remembered_from(), c.durable_seq()));
        if below > 1 {
            match store.earlier(actor.role, &actor.id, conv, cid.as_str(), below) {
                // Storage holds the original, but its commit has not reached
                // this home yet (a write still in flight, with more than the
                // window sent behind it): it is answered with that commit,
                // as a resend the window remembers is, so that no ack runs
                // ahead of what `history` pages (found by the
                // `chat_machines` fuzz target).
                Ok(Some(hit)) if hit.seq > durable => {
                    self.dup_waiters.entry((conv, hit.seq)).or_default().push(reply);
                    return;
                }
                Ok(Some(hit)) => {
                    let ack = Event::Ack {
                        cid: cid.as_str().into(),
                        conv,
                        seq: hit.seq,
                        ts: hit.ts_ms,
                        duplicate: true,
                    };
                    return self.out.send(from, codec, &ServerFrame::reply(id, ack));
                }
                Ok(None) => {}
                Err(e) => return self.out.error(reply, e.code, e.message),
            }
        }
        let draft =
            Draft { reply, actor: actor.clone(), cid, wire_cid, text, attachment, resends: Vec::new() };
        if self.core.hooks.on_message && actor.role != Role::Bot {
            return self.screen(conv, draft, now_ms);
        }
        self.accept(conv, draft, now_ms);
    }

    /// Takes a checked message: a resend the window remembers is answered
    /// (now, or when its original is durable), a new one gets the next seq
    /// and is submitted. Resends that waited with it (for its hook's
    /// verdict) are answered as its resends.
    fn accept(&mut self, conv: ConvId, draft: Draft, now_ms: u64) {
        let Draft { reply, actor, cid, wire_cid, text, attachment, resends } = draft;
        if self.rebuild_due.contains(&conv) {
            for r in std::iter::once(reply).chain(resends) {
                self.out.error(r, ErrorCode::Unavailable, "an earlier write failed; send again shortly");
            }
            return;
        }
        let Some(c) = self.convs.get_mut(&conv) else {
            for r in std::iter::once(reply).chain(resends) {
                self.out.error(r, ErrorCode::NotFound, format!("{conv}: not found"));
            }
            return;
        };
        let outcome = match c.send(&actor, Some(cid), now_ms) {
            Ok(o) => o,
            Err(e) => {
                for r in std::iter::once(reply).chain(resends) {
                    self.out.error(r, e.code(), e.to_string());
                }
                return;
            }
        };
        let seq = match outcome {
            SendOutcome::Duplicate { seq, ts } => {
                let mut ack = ServerFrame::reply(
                    None,
                    Event::Ack { cid: cid.as_str().into(), conv, seq, ts, duplicate: true },
                );
                for (to, codec, id) in std::iter::once(reply).chain(resends) {
                    ack.id = id;
                    self.out.send(to, codec, &ack);
                }
                return;
            }
            SendOutcome::InFlight { seq, .. } => {
                self.dup_waiters.entry((conv, seq)).or_default().push(reply);
                seq
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
                let then = Pending::Message { conv, seq, sender: Some(reply) };
                self.submit_message(msg, then);
                seq
            }
        };
        if !resends.is_empty() {
            self.dup_waiters.entry((conv, seq)).or_default().extend(resends);
        }
    }

    // ---- the OnMessage hook -------------------------------------------

    /// Holds a message for the `OnMessage` hook's verdict. A conversation's
    /// messages are screened one at a time, in the order they came (so they
    /// are stored in that order); other conversations' go on meanwhile. A
    /// resend the window remembers, or of a message being screened, calls
    /// no hook: it waits for (or gets) its original's answer.
    fn screen(&mut self, conv: ConvId, draft: Draft, now_ms: u64) {
        let known = self.convs.get(&conv).map(|c| c.recall(&draft.actor, Some(&draft.cid)));
        match known {
            Some(Ok(None)) => {}
            // Refused, or a resend the window answers: as any send.
            _ => return self.accept(conv, draft, now_ms),
        }
        let queue = self.screening.entry(conv).or_default();
        let same = |s: &&mut Screened| {
            s.draft.cid == draft.cid
                && s.draft.actor.role == draft.actor.role
                && s.draft.actor.id == draft.actor.id
        };
        if let Some(original) = queue.iter_mut().find(same) {
            return original.draft.resends.push(draft.reply);
        }
        queue.push_back(Screened { token: 0, draft });
        if queue.len() == 1 {
            self.call_on_message(conv);
        }
    }

    /// Calls `OnMessage` for the first message `conv` holds.
    fn call_on_message(&mut self, conv: ConvId) {
        let Some(first) = self.screening.get_mut(&conv).and_then(|q| q.front_mut()) else { return };
        self.next_hook += 1;
        first.token = self.next_hook;
        self.hook_calls.insert(first.token, conv);
        let d = &first.draft;
        let call = HookCall::OnMessage {
            conv,
            cid: d.wire_cid.clone(),
            text: d.text.clone(),
            attachment_mime: d.attachment.as_ref().map(|a| a.mime.clone()),
            from: client::Sender {
                role: d.actor.role,
                id: d.actor.id.to_string(),
                name: d.actor.name.to_string(),
            },
        };
        self.out.hook(first.token, call);
    }

    /// The `OnMessage` verdict for a message this home holds: stored (as
    /// sent or rewritten, then the hook's replies as bot messages),
    /// refused `forbidden`, or, with no verdict, as `hooks.failure` says.
    /// Then the conversation's next message is screened.
    pub fn handle_hook(&mut self, token: u64, verdict: Verdict, now_ms: u64, store: &dyn Stored) {
        let Some(conv) = self.hook_calls.remove(&token) else { return };
        let Some(queue) = self.screening.get_mut(&conv) else { return };
        let Some(Screened { draft, .. }) = queue.pop_front() else { return };
        if queue.is_empty() {
            self.screening.remove(&conv);
        }
        let verdict = match verdict {
            Verdict::Failed { why } => match self.core.hooks.failure {
                HookFailure::Open => Verdict::Allow { replies: Vec::new() },
                HookFailure::Closed => {
                    let message = format!("the message hook failed ({why}); retry");
                    self.refuse(&draft, ErrorCode::Unavailable, &message);
                    return self.next_screened(conv);
                }
            },
            v => v,
        };
        let (draft, replies) = match verdict {
            Verdict::Allow { replies } => (draft, replies),
            Verdict::Rewrite { text, replies } => (Draft { text: Some(text), ..draft }, replies),
            Verdict::Reject { reason } => {
                self.refuse(&draft, ErrorCode::Forbidden, &reason);
                return self.next_screened(conv);
            }
            Verdict::Failed { .. } => unreachable!("decided above"),
        };
        if self.load(conv, store) {
            self.accept(conv, draft, now_ms);
            for text in replies {
                self.bot_message(conv, text, now_ms);
            }
        } else {
            let (code, message) = self.not_loaded(conv);
            self.refuse(&draft, code, &message);
        }
        self.give_back(conv);
        self.next_screened(conv);
    }

    fn refuse(&mut self, draft: &Draft, code: ErrorCode, message: &str) {
        for &r in std::iter::once(&draft.reply).chain(&draft.resends) {
            self.out.error(r, code, message);
        }
    }

    fn next_screened(&mut self, conv: ConvId) {
        if self.screening.contains_key(&conv) {
            self.call_on_message(conv);
        }
    }

    /// A message is durable: answer duplicates that waited for it, fan it
    /// out, let the keyword rules answer, and ack it last: the ack takes the
    /// cid and text buffers back to the sender's shard, whose decoder
    /// filled them, once the fan-out no longer needs them.
    #[allow(clippy::too_many_arguments)]
    fn message_committed(
        &mut self,
        conv: ConvId,
        ours: u64,
        sender: Option<Reply>,
        mut msg: Msg,
        durable: Durable,
        now_ms: u64,
        dir: &Directory,
        store: &dyn Stored,
    ) {
        let Durable { seq, ts_ms: ts, duplicate } = durable;
        // A duplicate stored nothing at `ours`: that seq is not durable, and
        // marking it so would let a resume or a history page reach past
        // the log until the rebuild below runs, which waits for the writes
        // in flight (found by the `chat_machines` fuzz target).
        if !duplicate && let Some(c) = self.convs.get_mut(&conv) {
            c.committed(ours);
        }
        // The ack borrows the message's cid and hands it back.
        let mut ack = ServerFrame::reply(
            None,
            Event::Ack { cid: std::mem::take(&mut msg.cid), conv, seq, ts, duplicate },
        );
        let sender_ack = sender.map(|(to, codec, id)| {
            ack.id = id;
            (to, self.out.encode(codec, &ack))
        });
        if let Some(waiters) = self.dup_waiters.remove(&(conv, ours)) {
            if let Event::Ack { duplicate, .. } = &mut ack.body {
                *duplicate = true;
            }
            for (to, codec, id) in waiters {
                ack.id = id;
                self.out.send(to, codec, &ack);
            }
        }
        if let Event::Ack { cid, .. } = ack.body {
            msg.cid = cid;
        }
        if duplicate {
            if let Some((to, bytes)) = sender_ack {
                self.out.write(to, bytes);
            }
            // Storage had it already (a resend older than the window): the
            // seq this home took is unused, so rebuild.
            self.rebuild(conv, store);
            return;
        }
        let except = sender.map(|(a, _, _)| a);
        let mut audience = std::mem::take(&mut self.audience);
        audience.clear();
        audience.extend(participants(&self.convs, dir, conv).filter(|m| Some(m.addr) != except));
        let auto = (msg.from.role == Role::Visitor)
            .then(|| msg.text.as_deref().and_then(|t| self.rules.auto_reply(Role::Visitor, t)))
            .flatten()
            .map(str::to_string);
        let frame = ServerFrame::push(Event::Msg(msg));
        self.out.deliver(audience.iter().copied(), &frame);
        self.audience = audience;
        if let Event::Msg(Msg { cid, from, text, .. }) = frame.body {
            self.strings.give(from.id);
            self.strings.give(from.name);
            match sender_ack {
                Some((to, bytes)) => self.out.write_with(to, bytes, [Some(cid), text]),
                None => {
                    self.strings.give(cid);
                    text.into_iter().for_each(|t| self.strings.give(t));
                }
            }
        }
        if let Some(text) = auto {
            self.bot_message(conv, text, now_ms);
        }
    }

    fn bot_message(&mut self, conv: ConvId, text: String, now_ms: u64) {
        if self.rebuild_due.contains(&conv) {
            return;
        }
        let bot = self.rules.bot().clone();
        let Some(c) = self.convs.get_mut(&conv) else { return };
        let Ok(SendOutcome::Append { seq, ts }) = c.send(&bot, None, now_ms) else { return };
        let msg = Msg {
            conv,
            seq,
            cid: format!("auto-{seq}"),
            from: client::Sender { role: Role::Bot, id: bot.id.to_string(), name: bot.name.to_string() },
            text: Some(text),
            attachment: None,
            ts,
        };
        self.submit_message(msg, Pending::Message { conv, seq, sender: None });
    }

    fn submit_message(&mut self, msg: Msg, then: Pending) {
        *self.appending.entry(msg.conv).or_default() += 1;
        self.out.submit(Write::Message(msg), then);
    }

    /// One of `conv`'s message writes was answered.
    fn appended(&mut self, conv: ConvId) {
        if let Some(n) = self.appending.get_mut(&conv) {
            *n -= 1;
            if *n == 0 {
                self.appending.remove(&conv);
            }
        }
    }

    /// Takes back the seqs handed out beyond what storage holds, by
    /// rebuilding `conv` from storage, but only once none of its message
    /// writes is in flight: storage's last seq does not count them yet, so
    /// a rebuild before would hand their seqs out again, and two writes in
    /// flight with one seq get each other's answers (a resend acked with
    /// another message's seq: found by the `chat_machines` fuzz target).
    /// Until then its sends are refused `unavailable` (retryable).
    fn rebuild(&mut self, conv: ConvId, store: &dyn Stored) {
        if self.appending.contains_key(&conv) {
            self.rebuild_due.insert(conv);
        } else {
            self.rebuild_due.remove(&conv);
            self.reload(conv, store);
        }
    }

    fn rebuild_if_due(&mut self, conv: ConvId, store: &dyn Stored) {
        if self.rebuild_due.contains(&conv) && !self.appending.contains_key(&conv) {
            self.rebuild(conv, store);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_read(
        &mut self,
        reply: Reply,
        actor: &Actor,
        conv: ConvId,
        seq: u64,
        now_ms: u64,
        dir: &Directory,
        store: &dyn Stored,
    ) {
        if !self.found(reply, conv, store) {
            return;
        }
        let Some(c) = self.convs.get_mut(&conv) else { return };
        match c.read(actor, seq) {
            Ok(ReadOutcome::Advanced { seq }) => {
                let mark = Write::Read { conv, user: actor.key(), seq, ts_ms: now_ms };
                self.out.submit(mark, Pending::Nothing);
                self.tell_others(dir, conv, reply.0, Event::Read { conv, seq, by: actor.id.to_string() });
            }
            Ok(ReadOutcome::Unchanged) => {}
            Err(e) => self.out.error(reply, e.code(), e.to_string()),
        }
    }

    fn on_typing(
        &mut self,
        reply: Reply,
        actor: &Actor,
        conv: ConvId,
        now_ms: u64,
        dir: &Directory,
        store: &dyn Stored,
    ) {
        if !self.found(reply, conv, store) {
            return;
        }
        let Some(c) = self.convs.get_mut(&conv) else { return };
        match c.typing(actor, now_ms) {
            Ok(TypingOutcome::Broadcast) => {
                self.tell_others(dir, conv, reply.0, Event::Typing { conv, by: actor.id.to_string() });
            }
            Ok(TypingOutcome::Suppressed) => {}
            Err(e) => self.out.error(reply, e.code(), e.to_string()),
        }
    }

    /// Pushes `event` to every participant's session but `except`'s.
    fn tell_others(&mut self, dir: &Directory, conv: ConvId, except: SessionAddr, event: Event) {
        let audience = participants(&self.convs, dir, conv).filter(|m| m.addr != except);
        self.out.deliver(audience, &ServerFrame::push(event));
    }

    fn on_history(
        &mut self,
        reply: Reply,
        actor: &Actor,
        conv: ConvId,
        before: Option<u64>,
        limit: u32,
        store: &dyn Stored,
    ) {
        if !self.found(reply, conv, store) {
            return;
        }
        let Some(c) = self.convs.get(&conv) else { return };
        let range = match c.history(actor, before, limit) {
            Ok(r) => r,
            Err(e) => return self.out.error(reply, e.code(), e.to_string()),
        };
        let (to, codec, id) = reply;
        // A page is bounded by bytes as a replay is (half the connection's
        // outbound bound), not only by `limit`: 200 messages with big
        // attachments would be one frame past that bound, and the client
        // cut as a slow consumer on every try. The sizes are weighed first,
        // so no attachment beyond the budget is read; the page holds the
        // newest that fit (at least one) and the client pages on from its
        // oldest.
        let mut window =
            ReplayWindow::new(range.start.saturating_sub(1), range.end - 1, u64::MAX, self.replay_bytes_max);
        let weighed = match window.to_weigh(range.end - 1) {
            Some(seqs) => store.sizes(conv, seqs, &mut |seq, text, attachment| {
                window.admit(seq, frame_weight(text, attachment))
            }),
            None => Ok(()),
        };
        let first = window.start() + 1;
        let frame = match weighed
            .and_then(|()| store.before(conv, range.end, range.end.saturating_sub(first) as usize))
        {
            Ok(messages) => ServerFrame::reply(id, Event::History { conv, messages }),
            Err(e) => ServerFrame::error(id, e.code, e.message),
        };
        self.out.send(to, codec, &frame);
    }

    /// A visitor's profile changed (`SyncUser`, durable): its open
    /// conversations here show it, and their agents get the
    /// `conversation` frame with the new `visitor`.
    pub fn handle_profile(
        &mut self,
        visitor: &str,
        name: Option<&str>,
        meta: &crate::identity::Meta,
        dir: &Directory,
    ) {
        let changed: Vec<ConvId> = self
            .convs
            .iter_mut()
            .filter(|(_, c)| &*c.visitor().id == visitor && c.status() != ConvStatus::Closed)
            .filter_map(|(id, c)| c.update_visitor(name, meta).then_some(*id))
            .collect();
        for conv in changed {
            let Some(frame) = self.conversation_frame(conv, None, &RouteInfo::default()) else { continue };
            // A queued conversation's `agent` gave it away: not told.
            let assigned = self.convs.get(&conv).filter(|c| c.status() == ConvStatus::Assigned);
            let agent = assigned.and_then(|c| c.agent().map(|a| a.id.clone()));
            let agents = agent.iter().flat_map(|a| dir.sessions(Role::Agent, a));
            self.out.deliver(agents, &frame);
        }
    }

    // ---- changes the router decided -----------------------------------

    /// A change the router decided for a conversation homed here: applied,
    /// made durable, and announced once it is.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_change(
        &mut self,
        conv: ConvId,
        change: Change,
        reply: Option<Reply>,
        route: RouteInfo,
        now_ms: u64,
        store: &dyn Stored,
    ) {
        match change {
            Change::Create { visitor, group } => {
                let c = Conversation::new(conv, visitor.clone(), group, &self.core.limits);
                self.convs.insert(conv, Box::new(c));
                // The visitor's profile (token meta merged with the widget's)
                // is what agents see, so it is stored too, keeping the key
                // hash of an anonymous visitor. If the stored one cannot be
                // read, it is not written: without its key hash, an
                // anonymous visitor could never come back (the next
                // conversation writes it). A profile stored as it is now is
                // not written again: a new anonymous visitor's was stored
                // at its `connect`, and a rewrite would log one more record
                // (and keep one more page in redb's cache) per conversation.
                if let Ok(stored) = store.user(Role::Visitor, &visitor.id)
                    && !stored.as_ref().is_some_and(|u| shows(u, &visitor))
                {
                    let user = Profile {
                        role: Role::Visitor,
                        id: visitor.id.to_string(),
                        name: visitor.name.to_string(),
                        meta: visitor.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        visitor_key_hash: stored.and_then(|u| u.visitor_key_hash),
                        created_ms: now_ms,
                    };
                    self.out.submit(Write::User(user), Pending::Nothing);
                }
                self.persist(conv, reply, None, route, now_ms);
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
                if self.load(conv, store) && self.convs.get_mut(&conv).is_some_and(|c| moved(c)) {
                    self.persist(conv, reply, previous, route, now_ms);
                } else {
                    self.describe(conv, reply, &route, store);
                }
            }
            Change::Queue { group, previous } => {
                if self.load(conv, store) && self.convs.get_mut(&conv).is_some_and(|c| c.queue(group).is_ok())
                {
                    self.persist(conv, reply, previous, route, now_ms);
                } else {
                    self.describe(conv, reply, &route, store);
                }
            }
            Change::Close => {
                if self.load(conv, store) && self.convs.get_mut(&conv).is_some_and(|c| c.close()) {
                    self.persist(conv, reply, None, route, now_ms);
                } else {
                    self.describe(conv, reply, &route, store);
                }
            }
            Change::Describe => self.describe(conv, reply, &route, store),
            Change::CloseClosed { actor } => {
                let Some(reply) = reply else { return };
                if !self.found(reply, conv, store) {
                    return;
                }
                let state = self.convs.get(&conv).map(|c| (c.status(), c.check_access(&actor, Access::Read)));
                match state {
                    Some((_, Err(e))) => self.out.error(reply, e.code(), e.to_string()),
                    // Closing again answers with the closed state.
                    Some((ConvStatus::Closed, Ok(()))) => self.describe(conv, Some(reply), &route, store),
                    _ => self.out.error(reply, ErrorCode::NotFound, format!("{conv}: not found")),
                }
            }
        }
        self.give_back(conv);
    }

    /// Tells waiting visitors their place (and whether anyone is there):
    /// the visitor's sessions only. A conversation not in memory (closed
    /// since, and given back) is skipped.
    pub fn handle_positions(&mut self, updates: &[PositionUpdate], dir: &Directory) {
        for u in updates {
            let route = RouteInfo {
                position: Some(u.position),
                notify: Vec::new(),
                agents_online: Some(u.agents_online),
            };
            let Some(frame) = self.conversation_frame(u.conv, None, &route) else { continue };
            let visitor = self.convs.get(&u.conv).map(|c| c.visitor().id.clone());
            let audience = visitor.iter().flat_map(|v| dir.sessions(Role::Visitor, v));
            self.out.deliver(audience, &frame);
        }
    }

    /// Answers a command with the conversation's current state.
    fn describe(&mut self, conv: ConvId, reply: Option<Reply>, route: &RouteInfo, store: &dyn Stored) {
        let Some(reply) = reply else { return };
        if !self.found(reply, conv, store) {
            return;
        }
        let (to, codec, id) = reply;
        if let Some(frame) = self.conversation_frame(conv, id, route) {
            self.out.send(to, codec, &frame);
        }
    }

    fn persist(
        &mut self,
        conv: ConvId,
        reply: Option<Reply>,
        previous: Option<UserKey>,
        route: RouteInfo,
        now_ms: u64,
    ) {
        let Some(c) = self.convs.get_mut(&conv) else { return };
        c.entered_status_at(now_ms);
        let state = ConvState {
            conv,
            visitor_id: c.visitor().id.to_string(),
            status: c.status(),
            agent: c.agent().map(|a| WireAgent { id: a.id.to_string(), name: a.name.to_string() }),
            group: Some(c.group().to_string()),
            at_ms: now_ms,
        };
        self.out.submit(Write::Conversation(state), Pending::ConvChanged { reply, previous, route });
    }

    /// A conversation's change is durable: tell everyone concerned, and
    /// answer the command that caused it.
    ///
    /// What is announced is `stored`, the state this write made durable, not
    /// the conversation in memory, which may already be a decision further
    /// on (an `open` assigned at once is stored queued, then assigned): each
    /// commit announces its own state, so nothing is told before it is
    /// durable.
    fn change_committed(
        &mut self,
        stored: ConvState,
        reply: Option<Reply>,
        previous: Option<UserKey>,
        route: &RouteInfo,
        dir: &Directory,
    ) {
        let conv = stored.conv;
        let audience = dir.change_audience(
            &stored.visitor_id,
            stored.agent.as_ref().map(|a| a.id.as_str()),
            stored.status,
            previous.as_ref(),
            &route.notify,
            reply.map(|(a, _, _)| a),
        );
        let mut frame = self.stored_frame(&stored, route);
        self.out.deliver(audience, &frame);
        if let Some((to, codec, id)) = reply {
            frame.id = id;
            self.out.send(to, codec, &frame);
        }
        if stored.status == ConvStatus::Closed
            && self.convs.get(&conv).is_some_and(|c| c.status() == ConvStatus::Closed)
        {
            self.convs.remove(&conv);
        }
    }

    /// The `conversation` event for a stored state of a conversation, with
    /// the visitor's profile as this home knows it.
    fn stored_frame(&self, stored: &ConvState, route: &RouteInfo) -> ServerFrame {
        let visitor = match self.convs.get(&stored.conv).map(|c| c.visitor()) {
            Some(v) => User { id: v.id.to_string(), name: v.name.to_string(), meta: v.meta.clone() },
            None => User {
                id: stored.visitor_id.clone(),
                name: stored.visitor_id.clone(),
                meta: Default::default(),
            },
        };
        ServerFrame::push(Event::Conversation {
            conv: stored.conv,
            status: stored.status,
            agent: stored.agent.clone(),
            group: stored.group.clone(),
            visitor,
            queue_position: (stored.status == ConvStatus::Queued).then_some(route.position).flatten(),
            agents_online: (stored.status == ConvStatus::Queued).then_some(route.agents_online).flatten(),
            since: Some(stored.at_ms),
        })
    }

    // ---- conversations in memory --------------------------------------

    /// As [`Self::load`], answering the command `not_found` if it does not exist.
    fn found(&mut self, reply: Reply, conv: ConvId, store: &dyn Stored) -> bool {
        let ok = self.load(conv, store);
        if !ok {
            let (code, message) = self.not_loaded(conv);
            self.out.error(reply, code, message);
        }
        ok
    }

    /// What to answer a command about `conv` that [`Self::load`] did not
    /// find: `not_found`, or the read's own error if storage failed.
    fn not_loaded(&mut self, conv: ConvId) -> (ErrorCode, String) {
        match self.read_error.take() {
            Some(e) => (e.code, format!("{conv}: {}", e.message)),
            None => (ErrorCode::NotFound, format!("{conv}: not found")),
        }
    }

    /// Makes sure `conv` is in memory. A closed conversation is loaded on
    /// demand (history, reads, resume) and only borrowed: [`Self::give_back`]
    /// drops it once the command is answered, so paging through old
    /// conversations does not grow memory. False if it does not exist.
    fn load(&mut self, conv: ConvId, store: &dyn Stored) -> bool {
        self.read_error = None;
        if self.convs.contains_key(&conv) {
            return true;
        }
        self.reload(conv, store);
        let closed = self.convs.get(&conv).map(|c| c.status() == ConvStatus::Closed);
        if closed == Some(true) {
            self.borrowed.insert(conv);
        }
        closed.is_some()
    }

    /// Drops `conv` from memory if it was only loaded to answer a command.
    fn give_back(&mut self, conv: ConvId) {
        if self.borrowed.remove(&conv) {
            self.convs.remove(&conv);
        }
    }

    /// Rebuilds a conversation from storage (after a failed or duplicate
    /// append, its in-memory seq may be ahead of the log). One that cannot
    /// be read is dropped from memory: the next command reads it again.
    ///
    /// One in memory takes only its log from storage (its last seq) and
    /// keeps its state: that state may be a change still on its way to
    /// storage (a close submitted behind the append that failed), and a
    /// rebuild from the stored state would undo it in memory only, so the
    /// home would take messages in a conversation it then announces closed
    /// (found by the `chat_machines` fuzz target; `sim::tests`,
    /// `a_failed_append_does_not_reopen_a_close_in_flight`).
    fn reload(&mut self, conv: ConvId, store: &dyn Stored) {
        debug_assert_eq!(conv.home(self.shards), self.me, "{conv} is not homed here");
        if let Some(c) = self.convs.get(&conv) {
            let kept = store.last_seq(conv).map(|last_seq| RestoredConversation {
                id: conv,
                visitor: c.visitor().clone(),
                status: c.status(),
                group: c.group().clone(),
                agent: c.agent().cloned(),
                last_seq,
                // Never backwards: memory's is the newest ts handed out.
                last_ts: c.last_ts(),
                since_ms: c.since_ms(),
            });
            match kept {
                Ok(r) => {
                    self.convs.insert(conv, Box::new(Conversation::restore(r, &self.core.limits)));
                }
                Err(e) => {
                    self.convs.remove(&conv);
                    self.read_error = Some(e);
                }
            }
            return;
        }
        match store.conversation(conv) {
            Ok(Some(r)) => {
                self.convs.insert(conv, Box::new(Conversation::restore(r, &self.core.limits)));
            }
            Ok(None) => {
                self.convs.remove(&conv);
            }
            Err(e) => {
                self.convs.remove(&conv);
                self.read_error = Some(e);
            }
        }
    }

    fn conversation_frame(&self, conv: ConvId, id: Option<i64>, route: &RouteInfo) -> Option<ServerFrame> {
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
                queue_position: (c.status() == ConvStatus::Queued).then_some(route.position).flatten(),
                agents_online: (c.status() == ConvStatus::Queued).then_some(route.agents_online).flatten(),
                since: (c.since_ms() > 0).then_some(c.since_ms()),
            },
        ))
    }
}

/// Whether `stored` is already the profile a conversation of `visitor`
/// would store: the same name and meta (both sorted by key, keys unique).
fn shows(stored: &StoredUser, visitor: &Visitor) -> bool {
    *stored.name == *visitor.name
        && stored.meta.len() == visitor.meta.len()
        && stored.meta.iter().zip(&visitor.meta).all(|((k, v), (k2, v2))| k == k2 && v == v2)
}

/// The visitor's and the assigned (or, once closed, the last) agent's
/// sessions. A queued conversation's `agent` is whoever gave it away, who
/// no longer takes part.
fn participants<'a>(
    convs: &'a HashMap<ConvId, Box<Conversation>>,
    dir: &'a Directory,
    conv: ConvId,
) -> impl Iterator<Item = Member> + 'a {
    convs
        .get(&conv)
        .into_iter()
        .flat_map(|c| dir.participants(&c.visitor().id, c.agent().map(|a| &*a.id), c.status()))
}

#[cfg(test)]
mod tests;
