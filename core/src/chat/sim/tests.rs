//! The simulation runs a conversation end to end over its shards, and the
//! checks catch what they are there to catch.

use std::sync::Arc;

use kefu_proto::client::{ClientFrame, Command, Event, Msg, Sender, ServerFrame};
use kefu_proto::{ConvId, ConvStatus, Role};

use super::check::Checker;
use super::script::{Action, World};
use super::{Seen, SessionAddr};
use crate::chat::home::Durable;
use crate::chat::outbox::{ConvState, Write};

use Action::*;

/// Every shard steps, commits and completes once.
fn round(shards: u8) -> Vec<Action> {
    (0..shards).flat_map(|shard| [Step { shard }, Commit { shard }, Complete { shard, max: 8 }]).collect()
}

#[test]
fn a_conversation_runs_end_to_end_over_three_shards() {
    let mut world = World::new(3, 0);
    let mut script = vec![
        Connect { client: 0, resume: 0, binary: false },
        Connect { client: 3, resume: 0, binary: true },
        Connect { client: 4, resume: 0, binary: false },
    ];
    script.extend((0..4).flat_map(|_| round(3)));
    script.push(Presence { client: 0, status: 0, capacity: 0 });
    script.push(Open { client: 3, group: 0 });
    script.extend((0..6).flat_map(|_| round(3)));
    script.push(Send { client: 3, conv: 0, cid: 0, text: 1 });
    script.push(Send { client: 0, conv: 0, cid: 0, text: 0 });
    script.extend((0..6).flat_map(|_| round(3)));
    world.run(&script).expect("no rule is broken");
    let stored = world.sim().store.messages_of(ConvId(1));
    let from: Vec<(Role, &str)> = stored.iter().map(|m| (m.from.role, m.from.id.as_str())).collect();
    // a1's message was sent before v1's "bug" was durable, so before the
    // auto-reply its commit triggers.
    assert_eq!(from, [(Role::Visitor, "v1"), (Role::Agent, "a1"), (Role::Bot, "kefu-bot")]);
}

/// On two shards: agent a1 online, and visitor v1's conversation 1
/// assigned to it, durable and announced.
fn assigned() -> Vec<Action> {
    let mut script = vec![
        Connect { client: 0, resume: 0, binary: false },
        Connect { client: 3, resume: 0, binary: false },
        Presence { client: 0, status: 0, capacity: 0 },
    ];
    script.extend((0..4).flat_map(|_| round(2)));
    script.push(Open { client: 3, group: 0 });
    script.extend((0..6).flat_map(|_| round(2)));
    script
}

#[test]
fn a_resume_after_a_disconnect_replays_what_was_missed() {
    let mut world = World::new(2, 0);
    let mut script = assigned();
    script.push(Send { client: 3, conv: 0, cid: 0, text: 0 });
    script.extend((0..4).flat_map(|_| round(2)));
    script.push(Disconnect { client: 3 });
    for cid in 0..4 {
        script.push(Send { client: 0, conv: 0, cid, text: 2 });
        script.extend((0..3).flat_map(|_| round(2)));
    }
    script.push(Connect { client: 3, resume: 1, binary: false });
    script.extend((0..6).flat_map(|_| round(2)));
    world.run(&script).expect("no rule is broken");
}

/// Inputs of a seeded generator, as the fuzz target decodes them: a quick
/// sweep on every `cargo test` (the fuzz target does the long runs).
#[test]
fn seeded_random_runs_break_no_rule() {
    let runs: u64 = std::env::var("KEFU_SIM_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for run in 0..runs {
        let len = 64 + (next() % 600) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let (shards, flags, actions) = super::script::decode(&data);
        if let Err(v) = World::new(shards, flags).run(&actions) {
            std::fs::write("/tmp/kefu-sim-failure", &data).expect("the input is kept");
            panic!("run {run} (input in /tmp/kefu-sim-failure): {v}");
        }
    }
}

fn addr(slot: u32) -> SessionAddr {
    SessionAddr { shard: 0, slot, generation: 1 }
}

fn state(status: ConvStatus, agent: Option<&str>) -> ConvState {
    ConvState {
        conv: ConvId(1),
        visitor_id: "v1".into(),
        status,
        agent: agent.map(|a| kefu_proto::client::AgentRef { id: a.into(), name: a.into() }),
        group: Some("default".into()),
        at_ms: 1,
    }
}

fn msg(seq: u64, from: &str) -> Msg {
    Msg {
        conv: ConvId(1),
        seq,
        cid: format!("c{seq}"),
        from: Sender { role: Role::Visitor, id: from.into(), name: from.into() },
        text: Some("hi".into()),
        attachment: None,
        ts: 1,
    }
}

/// Visitor v1 at slot 1, agent a1 at slot 2, agent a2 (serving `sales`
/// only) at slot 3; conversation 1 of v1 assigned to a1 and durable, with
/// message 1 stored.
fn checker() -> Checker {
    let mut c = Checker::new();
    let announce = |slot, role, id: &str, groups: &[&str]| Seen::Announced {
        addr: addr(slot),
        role,
        id: Arc::from(id),
        groups: groups.iter().map(|g| Arc::from(*g)).collect(),
    };
    let assigned = state(ConvStatus::Assigned, Some("a1"));
    let durable = Durable { seq: 1, ts_ms: 1, duplicate: false };
    for seen in [
        announce(1, Role::Visitor, "v1", &[]),
        announce(2, Role::Agent, "a1", &[]),
        announce(3, Role::Agent, "a2", &["sales"]),
        Seen::Submitted { shard: 0, write: Write::Conversation(assigned.clone()) },
        Seen::Committed { shard: 0, write: Write::Conversation(assigned.clone()), outcome: Ok(durable) },
        Seen::Completed { shard: 0, write: Write::Conversation(assigned), durable: true },
        Seen::Committed { shard: 0, write: Write::Message(msg(1, "v1")), outcome: Ok(durable) },
    ] {
        c.see(seen).expect("a consistent start");
    }
    c
}

fn push(m: Msg) -> std::rc::Rc<[ServerFrame]> {
    vec![ServerFrame::push(Event::Msg(m))].into()
}

#[test]
fn the_checker_lets_a_message_reach_the_members() {
    let mut c = checker();
    c.see(Seen::Sent { to: addr(2), frames: push(msg(1, "v1")) }).expect("the agent is a member");
}

#[test]
fn the_checker_catches_a_message_to_a_non_member() {
    let mut c = checker();
    let err = c.see(Seen::Sent { to: addr(3), frames: push(msg(1, "v1")) }).expect_err("a2 is no member");
    assert!(err.contains("not a member"), "{err}");
}

#[test]
fn the_checker_catches_a_message_announced_before_it_is_durable() {
    let mut c = checker();
    let err = c.see(Seen::Sent { to: addr(2), frames: push(msg(2, "v1")) }).expect_err("seq 2 is not stored");
    assert!(err.contains("not what is stored"), "{err}");
}

#[test]
fn the_checker_catches_a_gap_or_a_repeat_in_what_a_visitor_gets() {
    let mut c = checker();
    let connected = ServerFrame::push(Event::Connected {
        session: "s".into(),
        role: Role::Visitor,
        user: kefu_proto::client::User { id: "v1".into(), name: "v1".into(), meta: Default::default() },
        visitor_key: None,
        conversations: Vec::new(),
        heartbeat_s: 30,
        text_bytes_max: None,
        attachment_bytes_max: None,
        groups: None,
    });
    c.see(Seen::Written { to: addr(1), frames: vec![connected].into() }).expect("connected first");
    c.see(Seen::Written { to: addr(1), frames: push(msg(1, "a1")) }).expect("the first");
    let err = c.see(Seen::Written { to: addr(1), frames: push(msg(3, "a1")) }).expect_err("a gap");
    assert!(err.contains("a gap"), "{err}");
    let err = c.see(Seen::Written { to: addr(1), frames: push(msg(1, "a1")) }).expect_err("again");
    assert!(err.contains("out of order or twice"), "{err}");
}

#[test]
fn the_checker_catches_a_seq_the_home_skipped() {
    let mut c = checker();
    let refused = Err(crate::chat::stored::ReadError {
        code: kefu_proto::ErrorCode::Unavailable,
        message: "seq conflict".into(),
    });
    let err = c
        .see(Seen::Committed { shard: 0, write: Write::Message(msg(3, "v1")), outcome: refused })
        .expect_err("seq 3 after 1");
    assert!(err.contains("handed out seq 3"), "{err}");
}

#[test]
fn the_checker_catches_a_newest_history_page_without_an_acked_message() {
    let mut c = checker();
    let durable = Durable { seq: 2, ts_ms: 1, duplicate: false };
    c.see(Seen::Committed { shard: 0, write: Write::Message(msg(2, "v1")), outcome: Ok(durable) })
        .expect("seq 2 after 1");
    let ack = Event::Ack { cid: "c2".into(), conv: ConvId(1), seq: 2, ts: 1, duplicate: false };
    c.see(Seen::Sent { to: addr(1), frames: vec![ServerFrame::reply(Some(7), ack)].into() })
        .expect("v1 sent seq 2");
    let ask = |id, before| Seen::Command {
        addr: addr(1),
        frame: ClientFrame { id: Some(id), body: Command::History { conv: ConvId(1), before, limit: None } },
    };
    let page = |id, seqs: &[u64]| Seen::Sent {
        to: addr(1),
        frames: vec![ServerFrame::reply(
            Some(id),
            Event::History { conv: ConvId(1), messages: seqs.iter().map(|&s| msg(s, "v1")).collect() },
        )]
        .into(),
    };
    // An older page need not reach it; the newest must.
    c.see(ask(8, Some(2))).expect("asked");
    c.see(page(8, &[1])).expect("the page before seq 2");
    c.see(ask(9, None)).expect("asked");
    let err = c.see(page(9, &[1])).expect_err("seq 2 was acked");
    assert!(err.contains("seq 2 was acked"), "{err}");
    c.see(ask(10, None)).expect("asked");
    c.see(page(10, &[1, 2])).expect("it reaches the ack");
}

/// Found by the fuzz target: a resend older than the home's cid window is
/// looked up in storage, which may already hold its original while the
/// commit is still on its way to the home. The resend was acked from
/// storage at once, so its sender could then page `history` and not find
/// what it was acked for (the page ends at what the home knows durable).
#[test]
fn a_resend_found_in_storage_is_acked_only_once_the_home_knows_it_durable() {
    let mut world = World::new(2, 0);
    let mut script = assigned();
    // Five messages in a window of four: the visitor's first (seq 1)
    // leaves it.
    for cid in [0, 1] {
        script.push(Send { client: 3, conv: 0, cid, text: 0 });
    }
    for cid in [0, 3, 2] {
        script.push(Send { client: 0, conv: 0, cid, text: 0 });
    }
    script.extend((0..4).flat_map(|_| [Step { shard: 0 }, Step { shard: 1 }]));
    // Seq 1 stored (the home is shard 1), and not yet heard of by the home.
    script.push(Commit { shard: 1 });
    script.push(Send { client: 3, conv: 0, cid: 0, text: 0 });
    script.extend((0..4).flat_map(|_| [Step { shard: 0 }, Step { shard: 1 }]));
    script.push(History { client: 3, conv: 0, before: 0, limit: 3 });
    script.extend((0..4).flat_map(|_| [Step { shard: 0 }, Step { shard: 1 }]));
    script.extend((0..8).flat_map(|_| round(2)));
    world.run(&script).expect("no rule is broken");
}

/// The fuzz target's findings, kept as seeds of its corpus, replay clean:
/// - `seed-resend-ahead-of-home`: the test above, as the fuzzer found it;
/// - `seed-duplicate-not-durable`: a resend older than the cid window,
///   which storage's dedupe index caught at commit, marked its unused seq
///   durable, so a resume replayed "up to" a seq the log did not have
///   (while the rebuild waited for the writes in flight).
#[test]
fn the_fuzz_findings_replay_clean() {
    let seeds: [(&str, &[u8]); 2] = [
        (
            "seed-resend-ahead-of-home",
            include_bytes!("../../../../fuzz/corpus/chat_machines/seed-resend-ahead-of-home"),
        ),
        (
            "seed-duplicate-not-durable",
            include_bytes!("../../../../fuzz/corpus/chat_machines/seed-duplicate-not-durable"),
        ),
    ];
    for (name, data) in seeds {
        let (shards, flags, actions) = super::script::decode(data);
        if let Err(v) = World::new(shards, flags).run(&actions) {
            panic!("{name}: {v}");
        }
    }
}

/// Replays a fuzzer input (`KEFU_SIM_INPUT=path`), printing the actions it
/// decodes to: how a finding of `chat_machines` becomes a test here.
#[test]
#[ignore = "replays a file named by KEFU_SIM_INPUT"]
fn replay_a_fuzzer_input() {
    let path = std::env::var("KEFU_SIM_INPUT").expect("KEFU_SIM_INPUT names an input");
    let data = std::fs::read(path).expect("the input reads");
    let (shards, flags, actions) = super::script::decode(&data);
    eprintln!("shards {shards}, flags {flags}");
    let mut world = World::new(shards, flags);
    world.trace(true);
    let outcome = world.run(&actions);
    let stored: Vec<usize> = (1..=6).map(|c| world.sim().store.messages_of(ConvId(c)).len()).collect();
    eprintln!("messages stored in conversations 1-6: {stored:?}");
    outcome.expect("no rule is broken");
}

/// Found by the fuzz target: an append fails while the conversation's
/// close is still being written; the home rebuilt the conversation from
/// storage, open, so after the close was announced it still took the
/// visitor's next message, stored in a closed conversation.
#[test]
fn a_failed_append_does_not_reopen_a_close_in_flight() {
    let mut world = World::new(2, 0);
    let mut script = assigned();
    script.push(Send { client: 3, conv: 0, cid: 0, text: 0 });
    script.push(Close { client: 3, conv: 0 });
    for _ in 0..6 {
        script.extend([Step { shard: 0 }, Step { shard: 1 }]);
    }
    // The message fails; the shard hears it before the close commits.
    script.extend([
        Fail { shard: 0 },
        Fail { shard: 1 },
        Complete { shard: 0, max: 1 },
        Complete { shard: 1, max: 1 },
    ]);
    script.extend((0..6).flat_map(|_| round(2)));
    script.push(Send { client: 3, conv: 0, cid: 1, text: 0 });
    script.extend((0..6).flat_map(|_| round(2)));
    world.run(&script).expect("no rule is broken");
}

/// Found by the fuzz target: a resend older than the conversation's cid
/// window was answered from storage before the sender's access was
/// checked, so an agent that had lost the conversation (to another agent,
/// then closed) still got an ack for it; within the window it is refused.
#[test]
fn a_resend_below_the_window_is_refused_to_one_who_lost_the_conversation() {
    // No automatic assignment: the conversation waits in `sales`, where
    // agent a2 may write to it.
    let mut world = World::new(2, 1);
    let mut script = vec![
        Connect { client: 1, resume: 0, binary: false },
        Connect { client: 5, resume: 0, binary: false },
    ];
    script.extend((0..4).flat_map(|_| round(2)));
    script.push(Open { client: 5, group: 2 });
    script.extend((0..6).flat_map(|_| round(2)));
    script.push(Send { client: 1, conv: 0, cid: 0, text: 0 });
    script.extend((0..4).flat_map(|_| round(2)));
    // a1 takes it: a2 is no member any more.
    script.extend([
        Connect { client: 0, resume: 0, binary: false },
        Presence { client: 0, status: 0, capacity: 0 },
    ]);
    script.extend((0..4).flat_map(|_| round(2)));
    script.push(Accept { client: 0, conv: 0 });
    script.extend((0..6).flat_map(|_| round(2)));
    // The visitor's four messages push a2's cid out of the window (4).
    for cid in 0..4 {
        script.push(Send { client: 5, conv: 0, cid, text: 0 });
        script.extend((0..3).flat_map(|_| round(2)));
    }
    script.push(Close { client: 5, conv: 0 });
    script.extend((0..6).flat_map(|_| round(2)));
    script.push(Send { client: 1, conv: 0, cid: 0, text: 0 });
    script.extend((0..6).flat_map(|_| round(2)));
    world.run(&script).expect("no rule is broken");
}

/// Found by the fuzz target: an append failed while later appends of the
/// conversation were still in flight. The home rebuilt the conversation
/// from storage at once, whose last seq did not count those writes, so it
/// handed their seqs out again; two writes in flight with one seq got each
/// other's answers, and a resend of `c3` was acked with seq 1, which holds
/// `c0`. The home now rebuilds only once the writes in flight are answered,
/// and refuses sends (`unavailable`) until then. The fuzzer's input, kept.
#[test]
fn a_failed_append_rebuilds_only_once_the_writes_in_flight_are_answered() {
    let data = include_bytes!("findings/failed-append-with-writes-in-flight");
    let (shards, flags, actions) = super::script::decode(data);
    let mut world = World::new(shards, flags);
    world.run(&actions).expect("no rule is broken");
}
