//! The home's rules, driven with fed inputs, time and a store in memory:
//! what is acked when, who hears of what, dedupe, read marks, typing,
//! changes, history and resume paging, and what a failed write undoes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use kefu_proto::client::{Codec, Event, Msg, ServerFrame};
use kefu_proto::{ConvId, ConvStatus, ErrorCode, Role};

use super::*;
use crate::chat::hooks::{HookCall, Verdict};
use crate::chat::testing::{MemStore, addr, decode_frames};
use crate::chat::{RouteInfo, ShardMsg};
use crate::config::CoreConfig;
use crate::identity::{AgentRef, Meta, Visitor};

const T0: u64 = 1_000_000;
const CONV: ConvId = ConvId(7);

/// One home (shard 0 of 1) with its directory and a store in memory.
struct World {
    home: Home,
    dir: Directory,
    store: MemStore,
    /// Writes asked for and not yet committed, in order.
    writes: VecDeque<(Pending, Write)>,
    /// Frames written to each connection, decoded.
    frames: HashMap<SessionAddr, Vec<ServerFrame>>,
    /// Hook calls made and not yet answered, in order.
    hooks: VecDeque<(u64, HookCall)>,
    now: u64,
}

/// A connected session.
#[derive(Clone)]
struct Who {
    addr: SessionAddr,
    actor: Actor,
}

impl World {
    fn new(configure: impl FnOnce(&mut CoreConfig)) -> World {
        let mut config = CoreConfig::default();
        configure(&mut config);
        World {
            home: Home::new(0, 1, Arc::new(config), usize::MAX, Vec::new()),
            dir: Directory::default(),
            store: MemStore::default(),
            writes: VecDeque::new(),
            frames: HashMap::new(),
            hooks: VecDeque::new(),
            now: T0,
        }
    }

    /// A session of `(role, id)` at registry slot `slot`.
    fn connect(&mut self, role: Role, id: &str, slot: u32) -> Who {
        let actor = Actor { role, id: Arc::from(id), name: Arc::from(id), groups: Arc::from([]) };
        let a = addr(0, slot);
        self.dir.add(actor.key(), Member { addr: a, codec: Codec::Json });
        Who { addr: a, actor }
    }

    /// Carries out the home's outputs: frames are decoded per connection,
    /// writes wait for [`Self::commit`].
    fn drain(&mut self) {
        while let Some(out) = self.home.poll_output() {
            match out {
                Output::Post { msg: ShardMsg::Deliver { to, bytes, .. }, .. } => {
                    self.frames.entry(to).or_default().extend(decode_frames(Codec::Json, &bytes));
                }
                Output::Submit { write, then } => self.writes.push_back((then, write)),
                Output::Hook { token, call } => self.hooks.push_back((token, call)),
                other => panic!("a home with one shard posted {other:?}"),
            }
        }
    }

    /// Makes every write asked for durable, in order, and hands each back.
    fn commit(&mut self) {
        self.drain();
        while let Some((then, write)) = self.writes.pop_front() {
            let durable = self.store.apply(&write);
            self.home.handle_committed(then, write, durable, self.now, &self.dir, &self.store);
            self.drain();
        }
    }

    /// Answers the oldest hook call, then commits what that caused.
    fn verdict(&mut self, verdict: Verdict) -> HookCall {
        let (token, call) = self.hooks.pop_front().expect("a hook call");
        self.home.handle_hook(token, verdict, self.now, &self.store);
        self.commit();
        call
    }

    /// What `who` has received since last asked.
    fn take(&mut self, who: &Who) -> Vec<ServerFrame> {
        self.frames.remove(&who.addr).unwrap_or_default()
    }

    fn request(&mut self, who: &Who, id: i64, request: HomeRequest) {
        let reply = (who.addr, Codec::Json, Some(id));
        self.home.handle_request(reply, &who.actor, request, self.now, &self.dir, &self.store);
        self.drain();
    }

    fn send(&mut self, who: &Who, id: i64, cid: &str, text: &str) {
        let request =
            HomeRequest::Send { conv: CONV, cid: cid.into(), text: Some(text.into()), attachment: None };
        self.request(who, id, request);
    }

    fn change(&mut self, change: Change, reply: Option<&Who>) {
        let reply = reply.map(|w| (w.addr, Codec::Json, Some(99)));
        self.home.handle_change(CONV, change, reply, RouteInfo::default(), self.now, &self.store);
        self.drain();
    }

    /// `CONV`, opened by visitor `v` and assigned to agent `a`, durable.
    fn open_assigned(&mut self, v: &Who, a: &Who) {
        let visitor = Visitor { id: v.actor.id.clone(), name: v.actor.name.clone(), meta: Meta::new() };
        self.change(Change::Create { visitor, group: "default".into() }, None);
        let agent = AgentRef { id: a.actor.id.clone(), name: a.actor.name.clone() };
        self.change(Change::Assign { agent, group: "default".into(), previous: None }, None);
        self.commit();
        self.frames.clear();
    }
}

fn acks(frames: &[ServerFrame]) -> Vec<(Option<i64>, u64, bool)> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Event::Ack { seq, duplicate, .. } => Some((f.id, *seq, *duplicate)),
            _ => None,
        })
        .collect()
}

fn msgs(frames: &[ServerFrame]) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Event::Msg(Msg { seq, text, .. }) => Some((*seq, text.clone().unwrap_or_default())),
            _ => None,
        })
        .collect()
}

fn errors(frames: &[ServerFrame]) -> Vec<(Option<i64>, ErrorCode)> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Event::Error { code, .. } => Some((f.id, *code)),
            _ => None,
        })
        .collect()
}

fn statuses(frames: &[ServerFrame]) -> Vec<ConvStatus> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Event::Conversation { status, .. } => Some(*status),
            _ => None,
        })
        .collect()
}

/// A visitor, a second tab of the visitor, and the agent, with `CONV`
/// assigned.
fn three() -> (World, Who, Who, Who) {
    let mut w = World::new(|_| {});
    let v = w.connect(Role::Visitor, "v1", 1);
    let tab = w.connect(Role::Visitor, "v1", 2);
    let a = w.connect(Role::Agent, "a1", 3);
    w.open_assigned(&v, &a);
    (w, v, tab, a)
}

#[test]
fn a_message_is_acked_and_delivered_only_once_durable() {
    let (mut w, v, tab, a) = three();
    w.send(&v, 1, "c1", "hello");
    assert!(w.frames.is_empty(), "nothing before the write is durable");
    assert_eq!(w.writes.len(), 1);
    w.commit();
    assert_eq!(acks(&w.take(&v)), [(Some(1), 1, false)], "the sender's session gets the ack only");
    assert_eq!(msgs(&w.take(&tab)), [(1, "hello".into())], "the sender's other tab gets the message");
    assert_eq!(msgs(&w.take(&a)), [(1, "hello".into())]);
    w.send(&a, 2, "c1", "hi");
    w.commit();
    assert_eq!(
        acks(&w.take(&a)),
        [(Some(2), 2, false)],
        "the same cid from another sender is another message"
    );
    assert_eq!(msgs(&w.take(&v)), [(2, "hi".into())]);
}

#[test]
fn a_resend_is_answered_with_the_first_ack_whether_in_flight_committed_or_old() {
    let (mut w, v, _tab, a) = three();
    w.send(&v, 1, "c1", "hello");
    w.send(&v, 2, "c1", "hello");
    assert_eq!(w.writes.len(), 1, "a resend in flight writes nothing");
    w.commit();
    let mut got = acks(&w.take(&v));
    // The sender's ack goes last (it carries the decoder's buffers back);
    // each answer names its command.
    got.sort();
    assert_eq!(got, [(Some(1), 1, false), (Some(2), 1, true)], "the waiter is answered at the commit");
    assert_eq!(msgs(&w.take(&a)).len(), 1, "delivered once");
    w.send(&v, 3, "c1", "hello");
    assert_eq!(acks(&w.take(&v)), [(Some(3), 1, true)], "the window answers a committed resend");
    assert!(w.writes.is_empty());
    assert_eq!(w.store.dedupe_reads.get(), 0, "the window knew every cid: no read");
}

#[test]
fn a_resend_older_than_the_window_is_found_in_storage() {
    let mut w = World::new(|c| c.limits.recent_cids = 2);
    let v = w.connect(Role::Visitor, "v1", 1);
    let a = w.connect(Role::Agent, "a1", 2);
    w.open_assigned(&v, &a);
    for i in 1..=4 {
        w.send(&v, i, &format!("c{i}"), "x");
        w.commit();
    }
    w.frames.clear();
    w.send(&v, 9, "c1", "x");
    assert_eq!(acks(&w.take(&v)), [(Some(9), 1, true)]);
    assert!(w.writes.is_empty(), "nothing written for an old resend");
    assert!(w.take(&a).is_empty(), "nor delivered again");
    w.send(&v, 10, "c5", "new");
    w.commit();
    assert_eq!(acks(&w.take(&v)), [(Some(10), 5, false)], "the seq was not consumed by the resend");
}

#[test]
fn a_failed_write_answers_every_waiter_and_gives_the_seq_back() {
    let (mut w, v, _tab, a) = three();
    w.send(&v, 1, "c1", "lost");
    w.send(&v, 2, "c1", "lost");
    let (then, _) = w.writes.pop_front().expect("a write");
    let error = ReadError { code: ErrorCode::Unavailable, message: "disk full".into() };
    w.home.handle_failed(then, &error, &w.store);
    w.drain();
    assert_eq!(errors(&w.take(&v)), [(Some(1), ErrorCode::Unavailable), (Some(2), ErrorCode::Unavailable)]);
    assert!(w.take(&a).is_empty(), "nothing delivered");
    w.send(&v, 3, "c1", "again");
    w.commit();
    assert_eq!(acks(&w.take(&v)), [(Some(3), 1, false)], "the retry gets the seq the failed write had");
    assert_eq!(w.store.messages_of(CONV).len(), 1);
}

#[test]
fn a_send_while_storage_cannot_read_is_unavailable_not_not_found() {
    let (mut w, v, _tab, _a) = three();
    w.send(&v, 1, "c1", "lost");
    let (then, _) = w.writes.pop_front().expect("a write");
    // The disk is full: the commit fails, and so does the reload after it
    // (the store is being reopened), which drops the conversation from memory.
    w.store.fail_reads.set(true);
    let error = ReadError { code: ErrorCode::Unavailable, message: "disk full".into() };
    w.home.handle_failed(then, &error, &w.store);
    w.drain();
    assert_eq!(errors(&w.take(&v)), [(Some(1), ErrorCode::Unavailable)]);
    w.send(&v, 2, "c2", "retry");
    assert_eq!(errors(&w.take(&v)), [(Some(2), ErrorCode::Unavailable)], "the conversation exists: retry");
    w.store.fail_reads.set(false);
    w.send(&v, 3, "c2", "retry");
    w.commit();
    assert_eq!(acks(&w.take(&v)), [(Some(3), 1, false)]);
}

#[test]
fn reads_are_stored_and_told_to_the_others_once_per_advance() {
    let (mut w, v, tab, a) = three();
    w.send(&v, 1, "c1", "hello");
    w.commit();
    w.frames.clear();
    w.request(&a, 2, HomeRequest::Read { conv: CONV, seq: 1 });
    assert!(matches!(w.writes.front(), Some((Pending::Nothing, Write::Read { seq: 1, .. }))));
    let told = |frames: Vec<ServerFrame>| frames.iter().any(|f| matches!(f.body, Event::Read { seq: 1, .. }));
    assert!(told(w.take(&v)) && told(w.take(&tab)));
    assert!(w.take(&a).is_empty(), "not echoed to the reader");
    w.request(&a, 3, HomeRequest::Read { conv: CONV, seq: 1 });
    assert!(w.frames.is_empty(), "the same mark again tells nobody");
    w.request(&a, 4, HomeRequest::Read { conv: CONV, seq: 5 });
    assert_eq!(errors(&w.take(&a)).len(), 1, "a mark past the last message is refused");
}

#[test]
fn typing_is_told_at_most_once_per_interval() {
    let (mut w, v, _tab, a) = three();
    let typing = |w: &mut World| w.request(&v, 1, HomeRequest::Typing { conv: CONV });
    typing(&mut w);
    assert_eq!(w.take(&a).len(), 1);
    w.now += 10;
    typing(&mut w);
    assert!(w.take(&a).is_empty(), "suppressed within typing_interval_ms");
    w.now += 1_000;
    typing(&mut w);
    assert_eq!(w.take(&a).len(), 1);
    assert!(w.take(&v).is_empty());
}

#[test]
fn a_stranger_cannot_tell_a_conversation_from_one_that_does_not_exist() {
    let (mut w, _v, _tab, _a) = three();
    let other = w.connect(Role::Agent, "a2", 9);
    w.send(&other, 1, "c1", "let me in");
    assert_eq!(errors(&w.take(&other)), [(Some(1), ErrorCode::NotFound)]);
    let request = HomeRequest::History { conv: ConvId(8), before: None, limit: 10 };
    w.request(&other, 2, request);
    assert_eq!(errors(&w.take(&other)), [(Some(2), ErrorCode::NotFound)]);
}

#[test]
fn a_change_is_announced_only_once_durable_and_a_transfer_tells_the_previous_agent() {
    let (mut w, v, _tab, a) = three();
    let b = w.connect(Role::Agent, "a2", 4);
    let agent = AgentRef { id: "a2".into(), name: "a2".into() };
    w.change(Change::Assign { agent, group: "default".into(), previous: Some(a.actor.key()) }, Some(&a));
    assert!(w.frames.is_empty(), "nothing before the change is durable");
    w.commit();
    assert_eq!(statuses(&w.take(&a)), [ConvStatus::Assigned], "the previous agent is told (and answered)");
    assert_eq!(statuses(&w.take(&b)), [ConvStatus::Assigned]);
    assert_eq!(statuses(&w.take(&v)), [ConvStatus::Assigned]);
    w.send(&a, 5, "c1", "still here?");
    assert_eq!(errors(&w.take(&a)), [(Some(5), ErrorCode::NotFound)], "the previous agent takes no part");
}

#[test]
fn a_closed_conversation_is_dropped_from_memory_and_only_borrowed_for_history() {
    let (mut w, v, _tab, a) = three();
    w.send(&v, 1, "c1", "bye");
    w.commit();
    w.frames.clear();
    w.change(Change::Close, Some(&v));
    w.commit();
    assert_eq!(statuses(&w.take(&a)), [ConvStatus::Closed]);
    assert_eq!(w.home.conversations(), 0, "closed and durable: out of memory");
    w.request(&a, 2, HomeRequest::History { conv: CONV, before: None, limit: 10 });
    let got = w.take(&a);
    assert!(
        matches!(&got[..], [ServerFrame { body: Event::History { messages, .. }, .. }] if messages.len() == 1)
    );
    assert_eq!(w.home.conversations(), 0, "given back once answered");
    w.send(&v, 3, "c2", "hello?");
    assert_eq!(
        errors(&w.take(&v)),
        [(Some(3), ErrorCode::Conflict)],
        "no sending into a closed conversation"
    );
}

#[test]
fn history_pages_backwards() {
    let (mut w, v, _tab, _a) = three();
    for i in 1..=5 {
        w.send(&v, i, &format!("c{i}"), &format!("m{i}"));
    }
    w.commit();
    w.frames.clear();
    w.request(&v, 9, HomeRequest::History { conv: CONV, before: Some(5), limit: 2 });
    let got = w.take(&v);
    let Event::History { messages, .. } = &got[0].body else { panic!("{got:?}") };
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);
}

/// A visitor resumes `CONV` having seen `last_seen`: the replayed seqs and
/// `resumed`'s range.
fn resume(w: &mut World, v: &Who, last_seen: u64) -> (Vec<u64>, Option<(u64, u64)>) {
    w.home.handle_session_up(v.addr, Codec::Json, &v.actor, &[(CONV, last_seen)], &w.store);
    w.drain();
    let got = w.take(v);
    let seqs = msgs(&got).into_iter().map(|(s, _)| s).collect();
    let resumed = got.iter().find_map(|f| match f.body {
        Event::Resumed { from, to, .. } => Some((from, to)),
        _ => None,
    });
    (seqs, resumed)
}

#[test]
fn a_resume_replays_every_missed_message_in_pages_then_resumed() {
    let (mut w, v, _tab, a) = three();
    for i in 1..=600 {
        w.send(&a, i, &format!("c{i}"), "x");
    }
    w.commit();
    w.frames.clear();
    let (seqs, resumed) = resume(&mut w, &v, 0);
    assert_eq!(seqs, (1..=600).collect::<Vec<_>>(), "past several pages, in order");
    assert_eq!(resumed, Some((1, 600)));
    let (seqs, resumed) = resume(&mut w, &v, 598);
    assert_eq!(seqs, [599, 600]);
    assert_eq!(resumed, Some((599, 600)));
}

#[test]
fn a_resume_past_its_bounds_replays_the_newest_that_fit() {
    let mut w = World::new(|c| c.limits.max_resume_messages = 100);
    let v = w.connect(Role::Visitor, "v1", 1);
    let a = w.connect(Role::Agent, "a1", 2);
    w.open_assigned(&v, &a);
    for i in 1..=300 {
        w.send(&a, i, &format!("c{i}"), "x");
    }
    w.commit();
    w.frames.clear();
    let (seqs, resumed) = resume(&mut w, &v, 0);
    assert_eq!(seqs, (201..=300).collect::<Vec<_>>());
    assert_eq!(resumed, Some((201, 300)), "`from` says where the replay starts");
}

#[test]
fn a_resume_of_an_unknown_conversation_or_a_failed_read_is_an_error_not_silence() {
    let (mut w, v, _tab, a) = three();
    w.send(&a, 1, "c1", "missed");
    w.commit();
    w.frames.clear();
    w.home.handle_session_up(v.addr, Codec::Json, &v.actor, &[(ConvId(8), 0)], &w.store);
    w.drain();
    assert_eq!(errors(&w.take(&v)), [(None, ErrorCode::NotFound)]);
    w.store.fail_reads.set(true);
    w.home.handle_session_up(v.addr, Codec::Json, &v.actor, &[(CONV, 0)], &w.store);
    w.drain();
    assert_eq!(
        errors(&w.take(&v)),
        [(None, ErrorCode::Unavailable)],
        "no `resumed` claims a replay that failed"
    );
    w.store.fail_reads.set(false);
    w.home.handle_session_up(v.addr, Codec::Json, &v.actor, &[(CONV, 0)], &w.store);
    w.drain();
    assert!(w.take(&v).iter().any(|f| matches!(f.body, Event::Resumed { .. })));
}

#[test]
fn a_keyword_gets_the_bot_reply_after_the_visitors_message() {
    let mut w = World::new(|c| {
        c.rules.auto_replies =
            vec![crate::config::AutoReply { keyword: "price".into(), reply: "see /pricing".into() }]
    });
    let v = w.connect(Role::Visitor, "v1", 1);
    let a = w.connect(Role::Agent, "a1", 2);
    w.open_assigned(&v, &a);
    w.send(&v, 1, "c1", "what is the price?");
    w.commit();
    let got = msgs(&w.take(&a));
    assert_eq!(got, [(1, "what is the price?".into()), (2, "see /pricing".into())]);
    assert_eq!(msgs(&w.take(&v)), [(2, "see /pricing".into())], "the visitor sees the bot's answer");
    assert_eq!(w.store.messages_of(CONV)[1].from.role, Role::Bot);
}

#[test]
fn a_message_reaches_a_session_only_while_it_is_connected() {
    let (mut w, v, tab, a) = three();
    w.dir.remove(&tab.actor.key(), tab.addr);
    w.home.handle_session_down(tab.addr);
    w.send(&v, 1, "c1", "hello");
    w.commit();
    assert!(w.take(&tab).is_empty());
    assert_eq!(msgs(&w.take(&a)).len(), 1);
}

fn screened() -> (World, Who, Who, Who) {
    let mut w = World::new(|c| c.hooks.on_message = true);
    let v = w.connect(Role::Visitor, "v1", 1);
    let tab = w.connect(Role::Visitor, "v1", 2);
    let a = w.connect(Role::Agent, "a1", 3);
    w.open_assigned(&v, &a);
    (w, v, tab, a)
}

fn stored_texts(w: &World) -> Vec<(Role, String)> {
    w.store.messages_of(CONV).into_iter().map(|m| (m.from.role, m.text.unwrap_or_default())).collect()
}

#[test]
fn a_message_waits_for_its_hook_then_is_stored_as_rewritten_with_the_replies_after_it() {
    let (mut w, v, _tab, a) = screened();
    w.send(&v, 1, "c1", "I found a bug");
    w.commit();
    assert!(w.store.messages_of(CONV).is_empty() && w.frames.is_empty(), "nothing before the verdict");
    let replies = vec!["Ticket T-1 opened".to_string()];
    let call = w.verdict(Verdict::Rewrite { text: "I found a b*g".into(), replies });
    let HookCall::OnMessage { cid, text, from, .. } = call else { panic!("not OnMessage: {call:?}") };
    assert_eq!((cid.as_str(), text.as_deref(), from.role), ("c1", Some("I found a bug"), Role::Visitor));
    assert_eq!(acks(&w.take(&v)), [(Some(1), 1, false)]);
    assert_eq!(msgs(&w.take(&a)), [(1, "I found a b*g".into()), (2, "Ticket T-1 opened".into())]);
    assert_eq!(
        stored_texts(&w),
        [(Role::Visitor, "I found a b*g".into()), (Role::Bot, "Ticket T-1 opened".into())]
    );
}

#[test]
fn a_rejected_message_is_forbidden_and_never_stored() {
    let (mut w, v, _tab, a) = screened();
    w.send(&v, 1, "c1", "spam");
    w.verdict(Verdict::Reject { reason: "no spam".into() });
    assert_eq!(errors(&w.take(&v)), [(Some(1), ErrorCode::Forbidden)]);
    assert!(w.take(&a).is_empty() && w.store.messages_of(CONV).is_empty());
    w.send(&v, 2, "c2", "hello");
    w.verdict(Verdict::Allow { replies: Vec::new() });
    assert_eq!(acks(&w.take(&v)), [(Some(2), 1, false)], "a refused message took no seq");
}

#[test]
fn a_conversations_messages_are_screened_one_at_a_time_and_stored_in_order() {
    let (mut w, v, _tab, a) = screened();
    w.send(&v, 1, "c1", "first");
    w.send(&v, 2, "c2", "second");
    assert_eq!(w.hooks.len(), 1, "the second waits for the first's verdict");
    w.verdict(Verdict::Allow { replies: Vec::new() });
    assert_eq!(w.hooks.len(), 1, "then it is screened");
    w.verdict(Verdict::Allow { replies: Vec::new() });
    assert_eq!(msgs(&w.take(&a)), [(1, "first".into()), (2, "second".into())]);
}

#[test]
fn a_resend_while_screened_calls_no_hook_and_gets_the_same_answer() {
    let (mut w, v, _tab, a) = screened();
    w.send(&v, 1, "c1", "hello");
    w.send(&v, 2, "c1", "hello");
    assert_eq!(w.hooks.len(), 1);
    w.verdict(Verdict::Allow { replies: Vec::new() });
    let mut got = acks(&w.take(&v));
    got.sort();
    assert_eq!(got, [(Some(1), 1, false), (Some(2), 1, true)]);
    assert_eq!(msgs(&w.take(&a)).len(), 1);
    w.send(&v, 3, "c1", "hello");
    assert!(w.hooks.is_empty(), "a resend the window remembers is not screened again");
    assert_eq!(acks(&w.take(&v)), [(Some(3), 1, true)]);
}

#[test]
fn a_hook_that_fails_lets_messages_through_or_refuses_them_as_configured() {
    let (mut w, v, _tab, a) = screened();
    w.send(&v, 1, "c1", "hello");
    w.verdict(Verdict::Failed { why: "timeout".into() });
    assert_eq!(acks(&w.take(&v)), [(Some(1), 1, false)], "failure = open");
    assert_eq!(msgs(&w.take(&a)).len(), 1);
    let mut w = World::new(|c| {
        c.hooks.on_message = true;
        c.hooks.failure = crate::config::HookFailure::Closed;
    });
    let v = w.connect(Role::Visitor, "v1", 1);
    let a = w.connect(Role::Agent, "a1", 2);
    w.open_assigned(&v, &a);
    w.send(&v, 1, "c1", "hello");
    w.verdict(Verdict::Failed { why: "timeout".into() });
    assert_eq!(errors(&w.take(&v)), [(Some(1), ErrorCode::Unavailable)], "failure = closed");
    assert!(w.store.messages_of(CONV).is_empty());
}

#[test]
fn a_bots_message_is_not_screened() {
    let (mut w, _v, _tab, a) = screened();
    let bot = Who { addr: addr(0, 40), actor: Actor::bot("api", "Shop") };
    w.send(&bot, 1, "order-1", "shipped");
    assert!(w.hooks.is_empty());
    w.commit();
    assert_eq!(msgs(&w.take(&a)), [(1, "shipped".into())]);
}

#[test]
fn a_profile_that_cannot_be_read_is_not_overwritten_without_its_key_hash() {
    let mut w = World::new(|_| {});
    let v = w.connect(Role::Visitor, "anon-1", 1);
    let visitor = Visitor { id: v.actor.id.clone(), name: v.actor.name.clone(), meta: Meta::new() };
    w.store.fail_reads.set(true);
    w.change(Change::Create { visitor: visitor.clone(), group: "default".into() }, None);
    let profiles = w.writes.iter().filter(|(_, write)| matches!(write, Write::User(_))).count();
    assert_eq!(profiles, 0, "no profile written blind");
    assert_eq!(w.writes.len(), 1, "the conversation itself is still stored");
    w.store.fail_reads.set(false);
    w.writes.clear();
    w.change(Change::Create { visitor, group: "default".into() }, None);
    assert!(w.writes.iter().any(|(_, write)| matches!(write, Write::User(_))), "written once readable");
}

#[test]
fn a_profile_stored_as_it_is_is_not_written_again() {
    let profiles = |w: &World| w.writes.iter().filter(|(_, write)| matches!(write, Write::User(_))).count();
    let mut w = World::new(|_| {});
    let v = w.connect(Role::Visitor, "anon-1", 1);
    let stored = Profile {
        role: Role::Visitor,
        id: v.actor.id.to_string(),
        name: v.actor.name.to_string(),
        meta: vec![("plan".into(), "pro".into())],
        visitor_key_hash: Some([7; 32]),
        created_ms: 1,
    };
    w.store.apply(&Write::User(stored));
    let meta: Meta = [("plan".to_string(), "pro".to_string())].into_iter().collect();
    let visitor = Visitor { id: v.actor.id.clone(), name: v.actor.name.clone(), meta };
    w.change(Change::Create { visitor: visitor.clone(), group: "default".into() }, None);
    assert_eq!(profiles(&w), 0, "the stored profile is the one it would write");
    assert_eq!(w.writes.len(), 1, "the conversation is stored");

    // Another meta value, or another name: written, with the key hash kept.
    for changed in [
        Visitor { meta: [("plan".to_string(), "free".to_string())].into_iter().collect(), ..visitor.clone() },
        Visitor { name: "Renamed".into(), ..visitor.clone() },
    ] {
        w.writes.clear();
        w.change(Change::Create { visitor: changed, group: "default".into() }, None);
        let written: Vec<&Profile> = w
            .writes
            .iter()
            .filter_map(|(_, write)| if let Write::User(p) = write { Some(p) } else { None })
            .collect();
        assert_eq!(written.len(), 1, "a changed profile is written");
        assert_eq!(written[0].visitor_key_hash, Some([7; 32]), "with the stored key hash");
    }
}

#[test]
fn a_history_page_of_big_attachments_holds_what_fits_and_pages_on() {
    let mut w = World::new(|_| {});
    // A 1 MiB budget; each 300 KiB picture weighs about 400 KiB as base64.
    w.home = Home::new(0, 1, Arc::new(CoreConfig::default()), 1 << 20, Vec::new());
    let v = w.connect(Role::Visitor, "v1", 1);
    let a = w.connect(Role::Agent, "a1", 2);
    w.open_assigned(&v, &a);
    let picture = kefu_proto::client::Attachment { mime: "image/png".into(), data: vec![7; 300 << 10] };
    for i in 1..=5 {
        let send = HomeRequest::Send {
            conv: CONV,
            cid: format!("p{i}"),
            text: None,
            attachment: Some(picture.clone()),
        };
        w.request(&v, i, send);
        w.commit();
    }
    w.frames.clear();
    let mut page = |before| {
        w.request(&v, 99, HomeRequest::History { conv: CONV, before, limit: 200 });
        let got = w.take(&v);
        let Event::History { messages, .. } = &got[0].body else { panic!("{got:?}") };
        messages.iter().map(|m| m.seq).collect::<Vec<_>>()
    };
    assert_eq!(page(None), [4, 5], "the newest that fit the budget, not 200");
    assert_eq!(page(Some(4)), [2, 3], "paged on from the oldest");
    assert_eq!(page(Some(2)), [1]);
    assert_eq!(page(Some(1)), Vec::<u64>::new());
}

#[test]
fn a_conversation_says_since_when_it_is_in_its_state() {
    let (mut w, v, _tab, a) = three();
    let since = |frames: &[ServerFrame]| -> Vec<Option<u64>> {
        frames
            .iter()
            .filter_map(|f| match &f.body {
                Event::Conversation { since, .. } => Some(*since),
                _ => None,
            })
            .collect()
    };
    w.now += 5_000;
    let decided = w.now;
    w.change(Change::Queue { group: "default".into(), previous: Some(a.actor.key()) }, None);
    // The clock moves on before the write is durable: the stored time counts.
    w.now += 7;
    w.commit();
    assert_eq!(since(&w.take(&v)), [Some(decided)]);
    // Described later, from memory: still when it was queued.
    w.now += 60_000;
    w.change(Change::Describe, Some(&v));
    assert_eq!(since(&w.take(&v)), [Some(decided)]);
}
