//! One conversation, as its home shard keeps it.
//!
//! Every conversation has exactly one writer: the shard that is its home
//! (`ConvId::home(shards)`). That shard alone hands out `seq` numbers, so
//! they start at 1 and have no gaps without a lock. It also answers the
//! questions every message raises: may this person write here (membership),
//! has this `(sender, cid)` been sent before (idempotency), what did each
//! participant read, who is typing.
//!
//! **Membership** (PROTOCOL.md, "Semantics"). A visitor may read and write
//! only their own conversation. An agent may read and write a conversation
//! assigned to them, and one queued in a group they serve (see
//! [`crate::identity::serves`]). Bots (hooks, the business system) may
//! write anywhere. Anything else is `not_found`, never `forbidden`, so a
//! stranger learns nothing about which conversations exist. Once closed, a
//! conversation stays readable (history, read marks, resume) to its visitor
//! and to the agent who had it last; writing to it is `conflict`.
//!
//! **Routing state is mirrored, not decided, here.** Status, group and
//! agent are decided by the [`crate::routing::Router`]; the home applies
//! each decision in memory at once with [`Conversation::assign`],
//! [`Conversation::queue`] or [`Conversation::close`] (so the next command
//! is judged against it), submits the new state, and announces it only
//! once that write is durable, announcing the state the write stored. A
//! client therefore never hears of a change a crash could take back, though
//! a command handled meanwhile may already be judged by it (a `send` behind
//! a `close` is `conflict` even before the close is durable).
//!
//! **Durability ordering** (PROTOCOL.md, "Guarantees") is the gateway's, and
//! the outcomes are shaped for it: [`Conversation::send`] returns the `seq`
//! to persist ([`SendOutcome::Append`]); the gateway acks and fans out only
//! after storage reports the append durable, and tells the conversation so
//! with [`Conversation::committed`]. Replays (`resume`, `history`) stop at
//! the last durable seq, so no client ever sees a message that a crash
//! could take back. If an append fails, later seqs may already be handed
//! out: the gateway drops this value and rebuilds it from storage with
//! [`Conversation::restore`], which keeps seq gap-free.

use std::collections::VecDeque;
use std::ops::Range;

use kefu_proto::ids::{ConvId, ConvStatus, ErrorCode, Role};

use crate::cid::{Cid, window_key};
use crate::config::LimitsConfig;
use crate::identity::{Actor, AgentRef, GroupName, Meta, UserId, Visitor, merge_meta, serves};

/// Read marks kept per conversation (visitor plus agents over time); past
/// it the oldest mark is forgotten.
pub const READ_MARKS_MAX: usize = 16;

/// Typing timestamps kept per conversation; past it the oldest is forgotten.
pub const TYPING_MARKS_MAX: usize = 8;

/// Why a conversation refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvError {
    /// Not one of yours (or no such conversation).
    #[error("no such conversation")]
    NotFound,
    /// Closed: readable, not writable.
    #[error("the conversation is closed")]
    Closed,
    /// A read mark beyond the last message.
    #[error("seq {seq} is beyond the last message ({last})")]
    SeqBeyondEnd {
        /// Asked.
        seq: u64,
        /// Last durable seq.
        last: u64,
    },
}

impl ConvError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ConvError::NotFound => ErrorCode::NotFound,
            ConvError::Closed => ErrorCode::Conflict,
            ConvError::SeqBeyondEnd { .. } => ErrorCode::BadCommand,
        }
    }
}

/// What a `send` leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// A new message: persist it at `seq` with timestamp `ts`, then (once
    /// durable) ack the sender and fan the `msg` out.
    Append {
        /// Its seq.
        seq: u64,
        /// Its timestamp (ms).
        ts: u64,
    },
    /// A resent cid whose original is durable: answer the first ack again,
    /// with `duplicate: true`, now. Nothing is stored or delivered.
    Duplicate {
        /// The original's seq.
        seq: u64,
        /// The original's timestamp.
        ts: u64,
    },
    /// A resent cid whose original is still being written: answer the
    /// duplicate ack when `seq` becomes durable (never before).
    InFlight {
        /// The original's seq.
        seq: u64,
        /// The original's timestamp.
        ts: u64,
    },
}

/// What a read mark leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The participant's mark moved to `seq`: tell the other participants.
    Advanced {
        /// The new mark.
        seq: u64,
    },
    /// At or below the current mark: nothing to tell.
    Unchanged,
}

/// What a typing notice leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypingOutcome {
    /// Tell the other participants.
    Broadcast,
    /// Told them less than `limits.typing_interval_ms` ago: drop it.
    Suppressed,
}

/// Which seqs a resuming client gets (PROTOCOL.md: `resumed {from, to}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Last seen + 1.
    pub from: u64,
    /// The last durable seq now; `from > to` means nothing was missed.
    pub to: u64,
}

impl Resume {
    /// The seqs to replay, in order.
    pub fn seqs(&self) -> Range<u64> {
        self.from..self.to.saturating_add(1).max(self.from)
    }
}

/// What a conversation's durable record says, to rebuild it after a restart
/// (or after a failed append).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredConversation {
    /// Its id.
    pub id: ConvId,
    /// Its visitor.
    pub visitor: Visitor,
    /// Queued, assigned or closed.
    pub status: ConvStatus,
    /// Its group.
    pub group: GroupName,
    /// The agent it is assigned to (or, closed, had last).
    pub agent: Option<AgentRef>,
    /// The last durable seq (0: no messages).
    pub last_seq: u64,
    /// The timestamp of that message (0: none).
    pub last_ts: u64,
    /// When its stored state was decided, ms since the epoch.
    pub since_ms: u64,
}

/// One message of the cid window: the key of its `(sender, cid)`
/// ([`crate::cid::window_key`]), not the pair itself, and what a resend of
/// it is answered with.
#[derive(Debug, Clone, Copy)]
struct RecentSend {
    key: u128,
    seq: u64,
    ts: u64,
}

#[derive(Debug, Clone)]
struct Mark {
    role: Role,
    id: UserId,
    value: u64,
}

fn find_mark<'m>(marks: &'m mut Vec<Mark>, actor: &Actor, max: usize) -> &'m mut Mark {
    let i = match marks.iter().position(|m| m.role == actor.role && m.id == actor.id) {
        Some(i) => i,
        None => {
            if marks.len() >= max {
                marks.remove(0);
            }
            marks.push(Mark { role: actor.role, id: actor.id.clone(), value: 0 });
            marks.len() - 1
        }
    };
    &mut marks[i]
}

/// What an actor wants to do, for [`Conversation::check_access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// History, resume, read marks.
    Read,
    /// Send, typing.
    Write,
}

/// One conversation's state on its home shard.
#[derive(Debug, Clone)]
pub struct Conversation {
    id: ConvId,
    visitor: Visitor,
    status: ConvStatus,
    group: GroupName,
    /// Assigned: the agent. Closed: the agent who had it last, if any.
    agent: Option<AgentRef>,
    /// The seq the next message gets (starts at 1).
    next_seq: u64,
    /// Highest seq known durable.
    durable_seq: u64,
    /// Timestamp of the last message, so ts never goes backwards.
    last_ts: u64,
    /// When it entered its current status (ms since the epoch; 0 until
    /// [`Conversation::entered_status_at`] says): how long a queued one has
    /// waited.
    since_ms: u64,
    /// Recent `(sender, cid)` pairs, oldest first, at most `recent_cap`.
    recent: VecDeque<RecentSend>,
    recent_cap: usize,
    /// Every message from this seq on has its `(sender, cid)` in `recent`
    /// (1: all of them); below it some were pushed out, or were stored
    /// before the conversation was restored.
    cids_from: u64,
    reads: Vec<Mark>,
    typing: Vec<Mark>,
    typing_interval_ms: u64,
}

impl Conversation {
    /// A conversation just opened by `visitor`, queued in `group`.
    pub fn new(id: ConvId, visitor: Visitor, group: GroupName, limits: &LimitsConfig) -> Conversation {
        Conversation {
            id,
            visitor,
            status: ConvStatus::Queued,
            group,
            agent: None,
            next_seq: 1,
            durable_seq: 0,
            last_ts: 0,
            since_ms: 0,
            recent: VecDeque::new(),
            recent_cap: limits.recent_cids.max(1),
            cids_from: 1,
            reads: Vec::new(),
            typing: Vec::new(),
            typing_interval_ms: limits.typing_interval_ms,
        }
    }

    /// A conversation rebuilt from its durable record. Seed the cid window
    /// with [`Conversation::remember`] from the newest messages of the log,
    /// so a client retrying across a restart still gets its first ack.
    pub fn restore(r: RestoredConversation, limits: &LimitsConfig) -> Conversation {
        let mut c = Conversation::new(r.id, r.visitor, r.group, limits);
        c.status = r.status;
        c.agent = r.agent;
        c.next_seq = r.last_seq + 1;
        c.durable_seq = r.last_seq;
        c.last_ts = r.last_ts;
        c.since_ms = r.since_ms;
        // Seeding the window from the log's newest messages does not
        // lower this: it may leave some out.
        c.cids_from = r.last_seq + 1;
        c
    }

    /// When it entered its current status, ms since the epoch (0: unknown).
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// The newest `ts` handed out, ms since the epoch.
    pub fn last_ts(&self) -> u64 {
        self.last_ts
    }

    /// Its current status was decided at `now_ms` (the time its state is
    /// stored with).
    pub fn entered_status_at(&mut self, now_ms: u64) {
        self.since_ms = now_ms;
    }

    /// Puts the key of a `(sender, cid)` ([`window_key`]) -> `(seq, ts)` in
    /// the cid window. Called at send, before the append is durable: a
    /// resend meanwhile is [`SendOutcome::InFlight`] until
    /// [`Conversation::committed`] says so.
    fn remember(&mut self, key: u128, seq: u64, ts: u64) {
        if self.recent.len() >= self.recent_cap
            && let Some(gone) = self.recent.pop_front()
        {
            self.cids_from = self.cids_from.max(gone.seq + 1);
        }
        self.recent.push_back(RecentSend { key, seq, ts });
    }

    /// The seq from which on the cid window holds every stored message's
    /// `(sender, cid)`: a cid [`Conversation::send`] does not find can only
    /// repeat a message below it, which storage's dedupe index must be
    /// asked about. 1 when the window has never lost one.
    pub fn cids_remembered_from(&self) -> u64 {
        self.cids_from
    }

    /// Whether the cid window holds every `(sender, cid)` this conversation
    /// ever stored, so that a cid [`Conversation::send`] does not find is
    /// new for certain and storage's dedupe index need not be asked.
    pub fn remembers_every_cid(&self) -> bool {
        self.cids_from <= 1
    }

    /// Its id.
    pub fn id(&self) -> ConvId {
        self.id
    }

    /// Its visitor (`conversation.visitor`).
    pub fn visitor(&self) -> &Visitor {
        &self.visitor
    }

    /// Queued, assigned or closed.
    pub fn status(&self) -> ConvStatus {
        self.status
    }

    /// Its group.
    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// The agent it is assigned to (closed: had last).
    pub fn agent(&self) -> Option<&AgentRef> {
        self.agent.as_ref()
    }

    /// The last seq handed out (durable or not).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The last seq known durable (`connected.conversations[].last_seq`,
    /// the end of replays).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The read mark of a participant (0: nothing read).
    pub fn read_mark(&self, role: Role, id: &str) -> u64 {
        self.reads.iter().find(|m| m.role == role && &*m.id == id).map_or(0, |m| m.value)
    }

    /// Whether `actor` may read this conversation (see the module doc).
    fn may_read(&self, actor: &Actor) -> bool {
        match actor.role {
            Role::Bot => true,
            Role::Visitor => actor.id == self.visitor.id,
            Role::Agent => match self.status {
                ConvStatus::Queued => serves(&actor.groups, &self.group),
                ConvStatus::Assigned | ConvStatus::Closed => {
                    self.agent.as_ref().is_some_and(|a| a.id == actor.id)
                }
            },
        }
    }

    /// Checks membership: `not_found` for strangers, `conflict` for writing
    /// to a closed conversation.
    pub fn check_access(&self, actor: &Actor, access: Access) -> Result<(), ConvError> {
        if !self.may_read(actor) {
            return Err(ConvError::NotFound);
        }
        if access == Access::Write && self.status == ConvStatus::Closed {
            return Err(ConvError::Closed);
        }
        Ok(())
    }

    /// A message from `actor` at `now_ms`. `cid` is `None` only for bot
    /// messages that carry no idempotency key (auto-replies).
    pub fn send(&mut self, actor: &Actor, cid: Option<Cid>, now_ms: u64) -> Result<SendOutcome, ConvError> {
        self.check_access(actor, Access::Write)?;
        // Hashed once, for the lookup and for the window.
        let key = cid.map(|cid| window_key(actor.role, &actor.id, &cid));
        if let Some(known) = key.and_then(|key| self.recalled(key)) {
            return Ok(known);
        }
        let seq = self.next_seq;
        let ts = now_ms.max(self.last_ts);
        self.next_seq += 1;
        self.last_ts = ts;
        if let Some(key) = key {
            self.remember(key, seq, ts);
        }
        Ok(SendOutcome::Append { seq, ts })
    }

    /// Whether `actor` may send here and, if `cid` is a resend the window
    /// remembers, what it is answered ([`SendOutcome::Duplicate`] or
    /// [`SendOutcome::InFlight`]), without taking a seq: what a message
    /// waiting for a hook's verdict is checked with first.
    pub fn recall(&self, actor: &Actor, cid: Option<&Cid>) -> Result<Option<SendOutcome>, ConvError> {
        self.check_access(actor, Access::Write)?;
        Ok(cid.and_then(|cid| self.recalled(window_key(actor.role, &actor.id, cid))))
    }

    /// What a resend with window key `key` is answered, if the window has it.
    fn recalled(&self, key: u128) -> Option<SendOutcome> {
        let prev = self.recent.iter().rev().find(|r| r.key == key)?;
        Some(match prev.seq <= self.durable_seq {
            true => SendOutcome::Duplicate { seq: prev.seq, ts: prev.ts },
            false => SendOutcome::InFlight { seq: prev.seq, ts: prev.ts },
        })
    }

    /// Storage reports every seq up to `seq` durable (group commits complete
    /// in order). Seqs never handed out are ignored.
    pub fn committed(&mut self, seq: u64) {
        debug_assert!(seq < self.next_seq, "committed seq {seq} was never handed out");
        self.durable_seq = self.durable_seq.max(seq.min(self.next_seq - 1));
    }

    /// `read {seq}` from `actor`: everything up to `seq` is read.
    pub fn read(&mut self, actor: &Actor, seq: u64) -> Result<ReadOutcome, ConvError> {
        self.check_access(actor, Access::Read)?;
        if seq > self.durable_seq {
            return Err(ConvError::SeqBeyondEnd { seq, last: self.durable_seq });
        }
        let mark = find_mark(&mut self.reads, actor, READ_MARKS_MAX);
        if seq <= mark.value {
            return Ok(ReadOutcome::Unchanged);
        }
        mark.value = seq;
        Ok(ReadOutcome::Advanced { seq })
    }

    /// `typing` from `actor` at `now_ms`.
    pub fn typing(&mut self, actor: &Actor, now_ms: u64) -> Result<TypingOutcome, ConvError> {
        self.check_access(actor, Access::Write)?;
        let interval = self.typing_interval_ms;
        let mark = find_mark(&mut self.typing, actor, TYPING_MARKS_MAX);
        if mark.value != 0 && now_ms < mark.value.saturating_add(interval) && now_ms >= mark.value {
            return Ok(TypingOutcome::Suppressed);
        }
        mark.value = now_ms.max(1);
        Ok(TypingOutcome::Broadcast)
    }

    /// The seqs a `history {before, limit}` page holds: up to `limit`
    /// durable messages below `before` (none: the newest), ascending.
    pub fn history(&self, actor: &Actor, before: Option<u64>, limit: u32) -> Result<Range<u64>, ConvError> {
        self.check_access(actor, Access::Read)?;
        let end = before.unwrap_or(u64::MAX).min(self.durable_seq + 1).max(1);
        let start = end.saturating_sub(u64::from(limit)).max(1);
        Ok(start..end)
    }

    /// What a client that last saw `last_seen` must be sent. A `last_seen`
    /// beyond the end counts as the end.
    pub fn resume(&self, actor: &Actor, last_seen: u64) -> Result<Resume, ConvError> {
        self.check_access(actor, Access::Read)?;
        let to = self.durable_seq;
        Ok(Resume { from: last_seen.min(to) + 1, to })
    }

    /// Applies a router decision: assigned to `agent`.
    pub fn assign(&mut self, agent: AgentRef) -> Result<(), ConvError> {
        if self.status == ConvStatus::Closed {
            return Err(ConvError::Closed);
        }
        self.status = ConvStatus::Assigned;
        self.agent = Some(agent);
        Ok(())
    }

    /// Applies a router decision: (re)queued in `group`.
    pub fn queue(&mut self, group: GroupName) -> Result<(), ConvError> {
        if self.status == ConvStatus::Closed {
            return Err(ConvError::Closed);
        }
        self.status = ConvStatus::Queued;
        self.group = group;
        self.agent = None;
        Ok(())
    }

    /// Applies a router decision: closed. Returns `false` if it already was
    /// (a repeated `close` is answered with the closed state, not an error).
    pub fn close(&mut self) -> bool {
        let was_open = self.status != ConvStatus::Closed;
        self.status = ConvStatus::Closed;
        self.typing.clear();
        was_open
    }

    /// A profile update (`SyncUser`): keys override key by key. Returns
    /// whether anything changed (then push a `conversation` frame).
    pub fn update_visitor(&mut self, name: Option<&str>, meta: &Meta) -> bool {
        let mut changed = merge_meta(&mut self.visitor.meta, meta);
        if let Some(name) = name
            && *self.visitor.name != *name
        {
            self.visitor.name = name.into();
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn actor(role: Role, id: &str, groups: &[&str]) -> Actor {
        Actor {
            role,
            id: UserId::from(id),
            name: Arc::from(id),
            groups: groups.iter().map(|g| GroupName::from(*g)).collect(),
        }
    }

    fn visitor() -> Actor {
        actor(Role::Visitor, "v1", &[])
    }

    fn agent_ref(id: &str) -> AgentRef {
        AgentRef { id: UserId::from(id), name: Arc::from(id) }
    }

    fn conv() -> Conversation {
        let v = Visitor { id: UserId::from("v1"), name: Arc::from("Vee"), meta: Meta::new() };
        Conversation::new(ConvId(7), v, GroupName::from("sales"), &LimitsConfig::default())
    }

    fn cid(s: &str) -> Option<Cid> {
        Some(Cid::new(s).unwrap())
    }

    fn append(c: &mut Conversation, who: &Actor, id: &str, now: u64) -> u64 {
        match c.send(who, cid(id), now).unwrap() {
            SendOutcome::Append { seq, .. } => seq,
            other => panic!("expected a new message, got {other:?}"),
        }
    }

    #[test]
    fn seq_starts_at_one_and_has_no_gaps() {
        let mut c = conv();
        let v = visitor();
        c.assign(agent_ref("a1")).unwrap();
        let a = actor(Role::Agent, "a1", &[]);
        let bot = Actor::bot("kefu-bot", "Assistant");
        let mut seqs = vec![];
        for i in 0..10 {
            let who = [&v, &a, &bot][i % 3];
            let c_id = if who.role == Role::Bot { None } else { cid(&format!("m{i}")) };
            match c.send(who, c_id, 1000 + i as u64).unwrap() {
                SendOutcome::Append { seq, .. } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        assert_eq!(c.last_seq(), 10);
    }

    #[test]
    fn timestamps_never_go_backwards() {
        let mut c = conv();
        let v = visitor();
        assert_eq!(c.send(&v, cid("a"), 5000), Ok(SendOutcome::Append { seq: 1, ts: 5000 }));
        assert_eq!(c.send(&v, cid("b"), 4000), Ok(SendOutcome::Append { seq: 2, ts: 5000 }));
    }

    #[test]
    fn a_resent_cid_returns_the_original_ack_only_once_durable() {
        let mut c = conv();
        let v = visitor();
        assert_eq!(c.send(&v, cid("m1"), 1000), Ok(SendOutcome::Append { seq: 1, ts: 1000 }));
        // Resent before the first is durable: wait for it, never ack early.
        assert_eq!(c.send(&v, cid("m1"), 1500), Ok(SendOutcome::InFlight { seq: 1, ts: 1000 }));
        c.committed(1);
        assert_eq!(c.send(&v, cid("m1"), 2000), Ok(SendOutcome::Duplicate { seq: 1, ts: 1000 }));
        assert_eq!(c.last_seq(), 1, "a duplicate is stored once");
        // The same cid from another sender is another message.
        c.assign(agent_ref("a1")).unwrap();
        let a = actor(Role::Agent, "a1", &[]);
        assert_eq!(c.send(&a, cid("m1"), 2000), Ok(SendOutcome::Append { seq: 2, ts: 2000 }));
    }

    /// A full window is `recent_cids` of these: 32 bytes a message (it was
    /// 104 with the sender and the inline cid).
    #[test]
    fn a_window_entry_is_32_bytes() {
        assert_eq!(std::mem::size_of::<RecentSend>(), 32);
    }

    #[test]
    fn the_cid_window_is_bounded() {
        let limits = LimitsConfig { recent_cids: 4, ..LimitsConfig::default() };
        let v = Visitor { id: UserId::from("v1"), name: Arc::from("Vee"), meta: Meta::new() };
        let mut c = Conversation::new(ConvId(1), v, GroupName::from("g"), &limits);
        let who = visitor();
        for i in 0..4 {
            append(&mut c, &who, &format!("m{i}"), 1);
        }
        assert!(c.remembers_every_cid(), "four cids fit a window of four");
        assert_eq!(c.cids_remembered_from(), 1);
        append(&mut c, &who, "m4", 1);
        assert!(!c.remembers_every_cid());
        // m0 (seq 1) is gone; m1.. are still known.
        assert_eq!(c.cids_remembered_from(), 2);
        c.committed(5);
        // m0 fell out of the window: only storage's dedupe index can catch it.
        assert!(matches!(c.send(&who, cid("m0"), 2), Ok(SendOutcome::Append { seq: 6, .. })));
        assert!(matches!(c.send(&who, cid("m2"), 2), Ok(SendOutcome::Duplicate { seq: 3, .. })));
    }

    #[test]
    fn restore_continues_seq_and_seeds_the_cid_window() {
        let v = Visitor { id: UserId::from("v1"), name: Arc::from("Vee"), meta: Meta::new() };
        let r = RestoredConversation {
            id: ConvId(3),
            visitor: v,
            status: ConvStatus::Assigned,
            group: GroupName::from("sales"),
            agent: Some(agent_ref("a1")),
            last_seq: 41,
            last_ts: 9000,
            since_ms: 8000,
        };
        let mut c = Conversation::restore(r, &LimitsConfig::default());
        c.remember(window_key(Role::Visitor, "v1", &Cid::new("m41").unwrap()), 41, 9000);
        // Seeded with the newest only: m1..m40 may still be resent.
        assert!(!c.remembers_every_cid());
        assert_eq!(c.cids_remembered_from(), 42);
        let who = visitor();
        assert_eq!(c.send(&who, cid("m41"), 9999), Ok(SendOutcome::Duplicate { seq: 41, ts: 9000 }));
        assert_eq!(c.send(&who, cid("m42"), 100), Ok(SendOutcome::Append { seq: 42, ts: 9000 }));
    }

    #[test]
    fn membership_rules() {
        use ConvError::NotFound;
        let mut c = conv();
        let me = visitor();
        let other_visitor = actor(Role::Visitor, "v2", &[]);
        let sales = actor(Role::Agent, "a1", &["sales"]);
        let generalist = actor(Role::Agent, "a9", &[]);
        let billing = actor(Role::Agent, "a2", &["billing"]);
        let agent_named_v1 = actor(Role::Agent, "v1", &["billing"]);
        // Queued in sales: the visitor and agents serving sales.
        assert!(c.check_access(&me, Access::Write).is_ok());
        assert!(c.check_access(&sales, Access::Write).is_ok());
        assert!(c.check_access(&generalist, Access::Read).is_ok());
        assert_eq!(c.check_access(&billing, Access::Read), Err(NotFound));
        assert_eq!(c.check_access(&other_visitor, Access::Read), Err(NotFound));
        assert_eq!(
            c.check_access(&agent_named_v1, Access::Read),
            Err(NotFound),
            "roles are separate namespaces"
        );
        // Assigned to a2 (a transfer may give it to an agent outside the group).
        c.assign(agent_ref("a2")).unwrap();
        assert!(c.check_access(&billing, Access::Write).is_ok());
        assert_eq!(c.check_access(&sales, Access::Read), Err(NotFound), "no longer queued in sales");
        assert_eq!(c.send(&sales, cid("x"), 1), Err(NotFound));
        assert_eq!(c.send(&other_visitor, cid("x"), 1), Err(NotFound));
        assert_eq!(NotFound.code(), ErrorCode::NotFound);
        // Closed: the visitor and the last agent may read, nobody may write.
        assert!(c.close());
        assert!(!c.close(), "closing twice is answered, not refused");
        assert!(c.check_access(&me, Access::Read).is_ok());
        assert!(c.check_access(&billing, Access::Read).is_ok());
        assert_eq!(c.send(&me, cid("late"), 1), Err(ConvError::Closed));
        assert_eq!(c.typing(&billing, 1), Err(ConvError::Closed));
        assert_eq!(ConvError::Closed.code(), ErrorCode::Conflict);
        assert_eq!(c.check_access(&sales, Access::Read), Err(NotFound));
        assert_eq!(c.assign(agent_ref("a1")), Err(ConvError::Closed), "closed is final");
    }

    #[test]
    fn read_marks_move_forward_only() {
        let mut c = conv();
        let v = visitor();
        for i in 0..5 {
            append(&mut c, &v, &format!("m{i}"), 1);
        }
        c.committed(3);
        assert_eq!(c.read(&v, 2), Ok(ReadOutcome::Advanced { seq: 2 }));
        assert_eq!(c.read(&v, 2), Ok(ReadOutcome::Unchanged));
        assert_eq!(c.read(&v, 1), Ok(ReadOutcome::Unchanged));
        assert_eq!(c.read(&v, 4), Err(ConvError::SeqBeyondEnd { seq: 4, last: 3 }), "not durable yet");
        assert_eq!(c.read_mark(Role::Visitor, "v1"), 2);
        let a = actor(Role::Agent, "a1", &["sales"]);
        assert_eq!(c.read(&a, 3), Ok(ReadOutcome::Advanced { seq: 3 }), "each participant has a mark");
        assert_eq!(c.read_mark(Role::Visitor, "v1"), 2);
        assert_eq!(c.read(&actor(Role::Visitor, "v2", &[]), 1), Err(ConvError::NotFound));
    }

    #[test]
    fn typing_is_passed_on_at_most_once_a_second() {
        let mut c = conv();
        let v = visitor();
        assert_eq!(c.typing(&v, 10_000), Ok(TypingOutcome::Broadcast));
        assert_eq!(c.typing(&v, 10_500), Ok(TypingOutcome::Suppressed));
        assert_eq!(c.typing(&v, 11_000), Ok(TypingOutcome::Broadcast));
        let a = actor(Role::Agent, "a1", &["sales"]);
        assert_eq!(c.typing(&a, 11_001), Ok(TypingOutcome::Broadcast), "per participant");
    }

    #[test]
    fn history_pages_stop_at_the_durable_end() {
        let mut c = conv();
        let v = visitor();
        assert_eq!(c.history(&v, None, 50), Ok(1..1), "empty conversation");
        for i in 0..120 {
            append(&mut c, &v, &format!("m{i}"), 1);
        }
        c.committed(100);
        assert_eq!(c.history(&v, None, 50), Ok(51..101));
        assert_eq!(c.history(&v, Some(51), 50), Ok(1..51));
        assert_eq!(c.history(&v, Some(10), 50), Ok(1..10));
        assert_eq!(c.history(&v, Some(1), 50), Ok(1..1));
        assert_eq!(c.history(&v, Some(0), 50), Ok(1..1));
        assert_eq!(c.history(&v, Some(500), 10), Ok(91..101));
        assert_eq!(c.history(&actor(Role::Visitor, "v2", &[]), None, 5), Err(ConvError::NotFound));
    }

    #[test]
    fn resume_replays_exactly_what_was_missed() {
        let mut c = conv();
        let v = visitor();
        for i in 0..8 {
            append(&mut c, &v, &format!("m{i}"), 1);
        }
        c.committed(6);
        let r = c.resume(&v, 4).unwrap();
        assert_eq!(r, Resume { from: 5, to: 6 });
        assert_eq!(r.seqs(), 5..7);
        let r = c.resume(&v, 6).unwrap();
        assert_eq!((r, r.seqs().count()), (Resume { from: 7, to: 6 }, 0), "nothing missed");
        assert_eq!(c.resume(&v, 99).unwrap(), Resume { from: 7, to: 6 }, "beyond the end is the end");
        assert_eq!(c.resume(&v, 0).unwrap().seqs(), 1..7);
        assert_eq!(c.resume(&actor(Role::Agent, "a5", &["billing"]), 0), Err(ConvError::NotFound));
    }

    #[test]
    fn routing_decisions_are_mirrored() {
        let mut c = conv();
        c.assign(agent_ref("a1")).unwrap();
        assert_eq!((c.status(), c.agent().map(|a| &*a.id)), (ConvStatus::Assigned, Some("a1")));
        c.queue(GroupName::from("billing")).unwrap();
        assert_eq!((c.status(), &**c.group(), c.agent()), (ConvStatus::Queued, "billing", None));
        assert!(c.update_visitor(Some("Vera"), &[("plan".to_string(), "pro".to_string())].into()));
        assert!(!c.update_visitor(Some("Vera"), &Meta::new()));
        assert_eq!((&*c.visitor().name, c.visitor().meta["plan"].as_str()), ("Vera", "pro"));
    }
}
