//! The store's behaviour through its public API: appends, seqs, dedupe,
//! reads, conversations, users, offsets, batching limits, back-pressure,
//! shutdown and corruption.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kefu_proto::ids::{ConvStatus, Role};

use crate::BlockRecord;
use crate::tables;
use crate::testkit::{NotifyCount, PATIENCE, config, message, open, wait_for, write};
use crate::{
    AgentRef, ConvChange, ConversationFilter, ConversationRecord, LogRecord, PresenceRecord, ReadMark,
    StorageError, Store, StoreConfig, SubmitError, UserControlRecord, UserRecord, WriteOp, WriterHealth,
};

fn conversation(id: u64, status: ConvStatus) -> ConversationRecord {
    ConversationRecord {
        id,
        visitor_id: format!("v{id}"),
        status,
        agent: (status == ConvStatus::Assigned).then(|| AgentRef { id: "a1".into(), name: "Alice".into() }),
        group: Some("sales".into()),
        created_ms: 10,
        updated_ms: 20,
        last_seq: 999, // ignored on write
    }
}

#[test]
fn appends_get_seqs_and_offsets_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recovery) = open(config(dir.path()));
    assert_eq!((recovery.next_offset, recovery.next_conv_id), (0, 1));
    assert!(!recovery.repaired && !recovery.unclean_shutdown);

    let mut m = message(5, "v1", "a", "hello");
    m.attachment = Some(kefu_proto::client::Attachment { mime: "image/png".into(), data: vec![1, 2, 3] });
    let c1 = write(&store, 1, WriteOp::AppendMessage(m.clone()));
    let c2 = write(&store, 2, WriteOp::AppendMessage(message(5, "a1", "b", "hi there")));
    let c3 = write(&store, 3, WriteOp::AppendMessage(message(6, "v2", "a", "other conversation")));
    let r: Vec<_> = [&c1, &c2, &c3].iter().map(|c| c.result.clone().unwrap()).collect();
    assert_eq!(
        r.iter().map(|c| (c.seq, c.offset, c.duplicate)).collect::<Vec<_>>(),
        [(1, 0, false), (2, 1, false), (1, 2, false)]
    );
    assert!(r[0].commit < r[2].commit, "one write at a time: one commit each");
    // The op comes back unchanged, for fan-out.
    assert_eq!(c1.op, WriteOp::AppendMessage(m.clone()));

    let reader = store.reader();
    let got = reader.message(5, 1).unwrap().unwrap();
    assert_eq!(got.offset, 0);
    assert_eq!(got.record, crate::MessageRecord::from_msg(m.clone(), 1));
    assert_eq!(reader.last_seq(5).unwrap(), 2);
    assert_eq!(reader.last_seq(6).unwrap(), 1);
    assert_eq!(reader.last_seq(7).unwrap(), 0);
    assert_eq!(reader.next_offset().unwrap(), 3);
    let log = reader.scan(0, 10).unwrap();
    assert_eq!(log.iter().map(|l| l.offset).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(matches!(&log[2].record, LogRecord::Message(m) if m.conv == 6 && m.seq == 1));
    assert_eq!(reader.scan(1, 1).unwrap().len(), 1);
    assert_eq!(reader.scan(3, 10).unwrap().len(), 0);

    let stats = store.stats();
    assert_eq!(stats.writes, 3);
    assert!(stats.commits >= 3 && stats.fsyncs >= stats.commits, "{stats:?}");
}

#[test]
fn explicit_seqs_must_be_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let with_seq = |cid: &str, seq| {
        let mut m = message(1, "v1", cid, "x");
        m.seq = seq;
        WriteOp::AppendMessage(m)
    };
    assert_eq!(write(&store, 1, with_seq("a", 1)).result.unwrap().seq, 1);
    let err = write(&store, 2, with_seq("b", 3)).result.unwrap_err();
    assert_eq!(err, StorageError::SeqConflict { conv: 1, expected: 2, got: 3 });
    assert_eq!(err.code(), kefu_proto::ids::ErrorCode::Unavailable, "retryable: the same cid can go again");
    let err = write(&store, 3, with_seq("c", 1)).result.unwrap_err();
    assert!(matches!(err, StorageError::SeqConflict { expected: 2, got: 1, .. }));
    // The refused cid was not remembered: it can be appended properly.
    assert_eq!(write(&store, 4, with_seq("b", 2)).result.unwrap().seq, 2);
    assert_eq!(store.reader().next_offset().unwrap(), 2, "refused writes took no offset");
    assert_eq!(store.stats().rejected, 2);
}

#[test]
fn resent_cid_returns_the_original_ack() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let (store, _) = open(config(dir.path()));
        let first =
            write(&store, 1, WriteOp::AppendMessage(message(3, "v1", "cid-1", "hello"))).result.unwrap();
        let mut resend = message(3, "v1", "cid-1", "hello again?");
        resend.ts += 5000;
        let dup = write(&store, 2, WriteOp::AppendMessage(resend)).result.unwrap();
        assert!(dup.duplicate);
        assert_eq!((dup.seq, dup.offset, dup.ts_ms), (first.seq, first.offset, first.ts_ms));
        // Same cid from another sender, or in another conversation: new.
        assert!(
            !write(&store, 3, WriteOp::AppendMessage(message(3, "a1", "cid-1", "x")))
                .result
                .unwrap()
                .duplicate
        );
        assert!(
            !write(&store, 4, WriteOp::AppendMessage(message(4, "v1", "cid-1", "x")))
                .result
                .unwrap()
                .duplicate
        );
        assert_eq!(store.stats().duplicates, 1);
        first
    };
    // Across a restart, and for an explicit seq too.
    let (store, _) = open(config(dir.path()));
    let mut resend = message(3, "v1", "cid-1", "hello");
    resend.seq = 3;
    let dup = write(&store, 5, WriteOp::AppendMessage(resend)).result.unwrap();
    assert!(dup.duplicate);
    assert_eq!((dup.seq, dup.offset), (first.seq, first.offset));
    let reader = store.reader();
    assert_eq!(reader.last_seq(3).unwrap(), 2, "stored once");
    assert_eq!(reader.next_offset().unwrap(), 3);
    let hit = reader.dedupe(Role::Visitor, "v1", 3, "cid-1").unwrap().unwrap();
    assert_eq!((hit.seq, hit.offset, hit.ts_ms), (first.seq, first.offset, first.ts_ms));
    assert_eq!(reader.dedupe(Role::Visitor, "v1", 3, "nope").unwrap(), None);
}

/// Cids of every stored form (`cid.rs`) read back as written, across a
/// restart, and a resend of each is its duplicate: the dedupe check
/// compares the unpacked cid. Two cids one symbol apart stay two messages.
#[test]
fn cids_of_every_form_read_back_and_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let cids = [
        "3b241101-e2bb-4255-8caf-4136c566a962".to_string(),
        "3b241101-e2bb-4255-8caf-4136c566a963".to_string(),
        "1-123456-98765432101234".to_string(),
        "9f86d081884c7d659a2feaa0c55ad015".to_string(),
        "wmiabc12xk3j9q0zp7".to_string(),
        "你好-1".to_string(),
        "7".repeat(64),
        "7".repeat(65),
        String::new(),
    ];
    let firsts: Vec<_> = {
        let (store, _) = open(config(dir.path()));
        (cids.iter().enumerate())
            .map(|(i, cid)| {
                write(&store, i as u64, WriteOp::AppendMessage(message(1, "v1", cid, "hi"))).result.unwrap()
            })
            .collect()
    };
    assert!(firsts.iter().all(|f| !f.duplicate));
    let (store, _) = open(config(dir.path()));
    let history = store.reader().history(1, None, 20).unwrap();
    let read: Vec<&str> = history.iter().map(|m| m.record.cid.as_str()).collect();
    assert_eq!(read, cids.iter().map(String::as_str).collect::<Vec<_>>());
    for (i, (cid, first)) in cids.iter().zip(&firsts).enumerate() {
        let dup = write(&store, 100 + i as u64, WriteOp::AppendMessage(message(1, "v1", cid, "again")))
            .result
            .unwrap();
        assert!(dup.duplicate, "{cid:?}");
        assert_eq!(dup.seq, first.seq, "{cid:?}");
        let hit = store.reader().dedupe(Role::Visitor, "v1", 1, cid).unwrap().unwrap();
        assert_eq!(hit.seq, first.seq, "{cid:?}");
    }
    assert_eq!(store.reader().last_seq(1).unwrap(), cids.len() as u64, "stored once each");
}

#[test]
fn the_same_cid_from_an_agent_and_a_visitor_with_the_same_id_is_two_messages() {
    let dir = tempfile::tempdir().unwrap();
    let as_agent = |mut m: kefu_proto::client::Msg| {
        m.from.role = Role::Agent;
        m
    };
    {
        let (store, _) = open(config(dir.path()));
        let visitor = write(&store, 1, WriteOp::AppendMessage(message(1, "42", "same", "v"))).result.unwrap();
        let agent =
            write(&store, 2, WriteOp::AppendMessage(as_agent(message(1, "42", "same", "a")))).result.unwrap();
        assert!(!visitor.duplicate && !agent.duplicate, "{visitor:?} {agent:?}");
        assert_eq!((visitor.seq, agent.seq), (1, 2));
        let again = write(&store, 3, WriteOp::AppendMessage(as_agent(message(1, "42", "same", "a"))));
        assert_eq!(again.result.unwrap().seq, 2);
    }
    // After a restart (the writer's cache is cold) each resend still finds
    // its own original.
    let (store, _) = open(config(dir.path()));
    let again =
        write(&store, 4, WriteOp::AppendMessage(as_agent(message(1, "42", "same", "a")))).result.unwrap();
    assert_eq!((again.seq, again.duplicate), (2, true));
    let again = write(&store, 5, WriteOp::AppendMessage(message(1, "42", "same", "v"))).result.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true));
    let r = store.reader();
    assert_eq!(r.last_seq(1).unwrap(), 2);
    assert_eq!(r.dedupe(Role::Visitor, "42", 1, "same").unwrap().map(|h| h.seq), Some(1));
    assert_eq!(r.dedupe(Role::Agent, "42", 1, "same").unwrap().map(|h| h.seq), Some(2));
    assert_eq!(r.dedupe(Role::Bot, "42", 1, "same").unwrap(), None);
    // The shortcut for a caller's window answers the same (its cache has
    // read the whole conversation by now).
    assert_eq!(r.dedupe_before(Role::Agent, "42", 1, "same", 3).unwrap().map(|h| h.seq), Some(2));
    assert_eq!(r.dedupe_before(Role::Visitor, "42", 1, "same", 3).unwrap().map(|h| h.seq), Some(1));
}

#[test]
fn duplicates_within_one_batch_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    // A long window so that both land in one batch.
    let (store, _) = open(crate::StoreConfig { batch_window_us: 200_000, ..config(dir.path()) });
    let w = store.writer();
    w.submit(0, 1, WriteOp::AppendMessage(message(1, "v1", "same", "a"))).unwrap();
    w.submit(0, 2, WriteOp::AppendMessage(message(1, "v1", "same", "b"))).unwrap();
    let done = wait_for(&store.completions(0), 2);
    let (a, b) = (done[0].result.clone().unwrap(), done[1].result.clone().unwrap());
    assert_eq!(a.commit, b.commit);
    assert!(!a.duplicate && b.duplicate);
    assert_eq!((a.seq, a.offset), (b.seq, b.offset));
    assert_eq!(store.reader().next_offset().unwrap(), 1);
}

#[test]
fn history_and_resume_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let w = store.writer();
    for i in 1..=10u64 {
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v1", &format!("c{i}"), &format!("m{i}")))).unwrap();
        w.submit(0, 100 + i, WriteOp::AppendMessage(message(2, "v2", &format!("c{i}"), "noise"))).unwrap();
    }
    wait_for(&store.completions(0), 20);
    let r = store.reader();
    let seqs =
        |v: Vec<crate::Logged<crate::MessageRecord>>| v.iter().map(|l| l.record.seq).collect::<Vec<_>>();
    assert_eq!(seqs(r.history(1, None, 3).unwrap()), [8, 9, 10]);
    assert_eq!(seqs(r.history(1, Some(8), 3).unwrap()), [5, 6, 7]);
    assert_eq!(seqs(r.history(1, Some(3), 50).unwrap()), [1, 2]);
    assert_eq!(seqs(r.history(1, Some(1), 50).unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(r.history(1, Some(0), 50).unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(r.history(1, None, 0).unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(r.after(1, 7, 100).unwrap()), [8, 9, 10]);
    assert_eq!(seqs(r.after(1, 0, 2).unwrap()), [1, 2]);
    assert_eq!(seqs(r.after(1, 10, 100).unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(r.after(1, u64::MAX, 100).unwrap()), Vec::<u64>::new());
    assert_eq!(seqs(r.history(3, None, 10).unwrap()), Vec::<u64>::new());
    let h = r.history(1, Some(3), 50).unwrap();
    assert_eq!(h[1].record.text.as_deref(), Some("m2"));
    // Zero-copy visit, newest first, stopped early.
    let mut seen = Vec::new();
    r.visit_messages(1, 2..=9, true, 100, |_, m| {
        seen.push(m.seq);
        if seen.len() == 3 { std::ops::ControlFlow::Break(()) } else { std::ops::ControlFlow::Continue(()) }
    })
    .unwrap();
    assert_eq!(seen, [9, 8, 7]);
}

#[test]
fn conversations_users_reads_and_offsets_persist() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(config(dir.path()));
        let c =
            write(&store, 1, WriteOp::PutConversation(conversation(7, ConvStatus::Queued))).result.unwrap();
        assert_eq!(c.offset, 0);
        write(&store, 2, WriteOp::PutConversation(conversation(3, ConvStatus::Closed))).result.unwrap();
        write(&store, 3, WriteOp::PutConversation(conversation(4, ConvStatus::Queued))).result.unwrap();
        write(&store, 4, WriteOp::PutConversation(conversation(4, ConvStatus::Assigned))).result.unwrap();
        write(&store, 5, WriteOp::AppendMessage(message(4, "v4", "x", "hi"))).result.unwrap();
        let user = UserRecord {
            id: "v4".into(),
            role: Role::Visitor,
            name: "Bob".into(),
            meta: vec![
                ("vip_level".into(), "1".into()),
                ("plan".into(), "gold".into()),
                ("vip_level".into(), "3".into()),
            ],
            visitor_key_hash: Some([0xab; 32]),
            created_ms: 99,
        };
        let done = write(&store, 6, WriteOp::PutUser(user));
        let WriteOp::PutUser(back) = &done.op else { panic!("op not handed back") };
        assert_eq!(back.meta[0].0, "plan", "meta sorted");
        write(&store, 7, WriteOp::MarkRead(ReadMark { conv: 4, user_id: "a1".into(), seq: 1, ts_ms: 5 }))
            .result
            .unwrap();
        let presence = PresenceRecord { agent_id: "a1".into(), status: "away".into(), ts_ms: 6 };
        write(&store, 9, WriteOp::LogPresence(presence)).result.unwrap();
        let off =
            write(&store, 8, WriteOp::CommitOffset { consumer: "crm".into(), offset: 5 }).result.unwrap();
        assert_eq!(off.offset, 5);
        assert_eq!(store.reader().next_conv_id().unwrap(), 8);
    }
    let (store, recovery) = open(config(dir.path()));
    assert!(!recovery.repaired && !recovery.unclean_shutdown, "closed cleanly");
    assert_eq!(recovery.next_conv_id, 8, "one more than the highest id stored");
    assert_eq!(recovery.next_offset, 8);
    let open_ids: Vec<_> = recovery.open_conversations.iter().map(|c| (c.id, c.status, c.last_seq)).collect();
    assert_eq!(open_ids, [(4, ConvStatus::Assigned, 1), (7, ConvStatus::Queued, 0)]);
    let r = store.reader();
    let c4 = r.conversation(4).unwrap().unwrap();
    assert_eq!(c4.agent, Some(AgentRef { id: "a1".into(), name: "Alice".into() }));
    assert_eq!(c4.last_seq, 1, "from the index, not the 999 written");
    assert_eq!(r.conversation(3).unwrap().unwrap().status, ConvStatus::Closed);
    assert_eq!(r.conversation(5).unwrap(), None);
    assert_eq!(r.conversation_count().unwrap(), 3);
    let u = r.user(Role::Visitor, "v4").unwrap().unwrap();
    assert_eq!(u.meta, vec![("plan".into(), "gold".into()), ("vip_level".into(), "3".into())]);
    assert_eq!(u.visitor_key_hash, Some([0xab; 32]));
    assert_eq!(r.user(Role::Visitor, "nobody").unwrap(), None);
    assert_eq!(r.user(Role::Agent, "v4").unwrap(), None, "an agent v4 is someone else");
    assert_eq!(r.consumer_offset("crm").unwrap(), Some(5));
    assert_eq!(r.consumer_offset("other").unwrap(), None);
    // The log tells the story in order, for a consumer.
    let kinds: Vec<_> = r
        .scan(0, 100)
        .unwrap()
        .into_iter()
        .map(|l| match l.record {
            LogRecord::Message(m) => format!("msg {}:{}", m.conv, m.seq),
            LogRecord::Conversation(c) => format!("conv {} {:?}", c.id, c.status),
            LogRecord::User(u) => format!("user {}", u.id),
            LogRecord::Read(r) => format!("read {}:{}", r.conv, r.seq),
            LogRecord::Presence(p) => format!("presence {} {}", p.agent_id, p.status),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "conv 7 Queued",
            "conv 3 Closed",
            "conv 4 Queued",
            "conv 4 Assigned",
            "msg 4:1",
            "user v4",
            "read 4:1",
            "presence a1 away"
        ]
    );
}

#[test]
fn batches_respect_the_record_limit() {
    let dir = tempfile::tempdir().unwrap();
    // The window keeps a batch open, so only the record limit closes it.
    let cfg = crate::StoreConfig { batch_max_records: 3, batch_window_us: 300_000, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let w = store.writer();
    for i in 0..10 {
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).unwrap();
    }
    let done = wait_for(&store.completions(0), 10);
    let mut per_commit: HashMap<u64, usize> = HashMap::new();
    for c in &done {
        *per_commit.entry(c.result.as_ref().unwrap().commit).or_default() += 1;
    }
    let mut sizes: Vec<_> = per_commit.values().copied().collect();
    sizes.sort();
    assert_eq!(sizes, [1, 3, 3, 3], "{per_commit:?}");
    assert_eq!(store.stats().batch_records_max, 3);
    // Completions keep submission order within a source.
    assert_eq!(done.iter().map(|c| c.token).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
}

#[test]
fn each_commit_reports_its_size_and_times() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::StoreConfig { batch_max_records: 3, batch_window_us: 300_000, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    assert!(store.on_commit(Box::new(move |t| sink.lock().unwrap().push(t))).is_ok());
    assert!(store.on_commit(Box::new(|_| {})).is_err(), "set once");
    let w = store.writer();
    for i in 0..6 {
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).unwrap();
    }
    wait_for(&store.completions(0), 6);
    let seen: Vec<_> = seen.lock().unwrap().iter().filter(|t| !t.checkpoint).copied().collect();
    assert_eq!(seen.iter().map(|t| t.records).collect::<Vec<_>>(), [3, 3], "{seen:?}");
    for t in seen.iter() {
        // A full source queue wakes the writer, and the record limit closes
        // the batch.
        assert!(t.fsync > Duration::ZERO && t.fsync <= t.batch, "{t:?}");
    }
}

#[test]
fn each_checkpoint_is_reported() {
    for background in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::StoreConfig {
            checkpoint_ms: 20,
            checkpoint_in_background: background,
            ..config(dir.path())
        };
        let (store, _) = open(cfg);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        assert!(store.on_commit(Box::new(move |t| sink.lock().unwrap().push(t))).is_ok());
        write(&store, 1, WriteOp::AppendMessage(message(1, "v", "a", "x")));
        let fsyncs = store.stats().fsyncs;
        let t0 = Instant::now();
        while !seen.lock().unwrap().iter().any(|t| t.checkpoint) {
            assert!(t0.elapsed() < Duration::from_secs(10), "no checkpoint after the write");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Nothing was written since: no second one.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(store.stats().durable_commits, 1);
        // redb's two fsyncs (quick-repair; a third for the file's growth),
        // made by the writer or behind it.
        let deadline = Instant::now() + PATIENCE;
        while store.stats().fsyncs < fsyncs + 2 {
            assert!(
                Instant::now() < deadline,
                "background={background}: the checkpoint's fsyncs never returned"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let seen = seen.lock().unwrap();
        let checkpoints: Vec<_> = seen.iter().filter(|t| t.checkpoint).collect();
        assert_eq!(checkpoints.len(), 1, "{seen:?}");
        assert_eq!(checkpoints[0].records, 0, "{seen:?}");
        if background {
            // The writer waited for no fsync of it.
            assert_eq!(checkpoints[0].fsync, Duration::ZERO, "{seen:?}");
        } else {
            // redb's durable commit: its fsyncs, nothing else's.
            assert!(checkpoints[0].fsync > Duration::ZERO, "{seen:?}");
            assert!(checkpoints[0].fsync <= checkpoints[0].batch, "{seen:?}");
        }
    }
}

#[test]
fn batches_respect_the_byte_limit() {
    let dir = tempfile::tempdir().unwrap();
    let text = "x".repeat(1000);
    let size = WriteOp::AppendMessage(message(1, "v", "0", &text)).size_hint();
    // Closes once two messages are in.
    let cfg =
        crate::StoreConfig { batch_max_bytes: 2 * size - 1, batch_window_us: 300_000, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let w = store.writer();
    for i in 0..10 {
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), &text))).unwrap();
    }
    let done = wait_for(&store.completions(0), 10);
    let mut per_commit: HashMap<u64, usize> = HashMap::new();
    for c in &done {
        *per_commit.entry(c.result.as_ref().unwrap().commit).or_default() += 1;
    }
    assert_eq!(per_commit.len(), 5, "{per_commit:?}");
    assert!(per_commit.values().all(|&n| n == 2), "{per_commit:?}");
    // A write bigger than the limit still commits, alone.
    let big = "y".repeat(10 * size);
    let c = write(&store, 99, WriteOp::AppendMessage(message(1, "v", "big", &big)));
    assert_eq!(c.result.unwrap().seq, 11);
}

#[test]
fn the_window_holds_a_batch_open_and_zero_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_millis(250);
    {
        let cfg = crate::StoreConfig { batch_window_us: window.as_micros() as u64, ..config(dir.path()) };
        let (store, _) = open(cfg);
        let w = store.writer();
        let t0 = Instant::now();
        w.submit(0, 1, WriteOp::AppendMessage(message(1, "v", "a", "x"))).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        w.submit(0, 2, WriteOp::AppendMessage(message(1, "v", "b", "x"))).unwrap();
        let done = wait_for(&store.completions(0), 2);
        let elapsed = t0.elapsed();
        let commits: Vec<_> = done.iter().map(|c| c.result.as_ref().unwrap().commit).collect();
        assert_eq!(commits[0], commits[1], "the second write joined the open batch");
        assert!(elapsed >= window, "a lone batch waits out its window ({elapsed:?})");
    }
    {
        let cfg = crate::StoreConfig { batch_window_us: 0, ..config(dir.path()) };
        let (store, _) = open(cfg);
        let t0 = Instant::now();
        let c = write(&store, 3, WriteOp::AppendMessage(message(1, "v", "c", "x")));
        assert_eq!(c.result.unwrap().seq, 3);
        // Not a timing assertion on the fast side (that belongs in
        // benchmarks): only that it did not wait for a window it has not got.
        assert!(t0.elapsed() < window, "{:?}", t0.elapsed());
    }
}

/// A store whose batch window is `window` and that makes no checkpoint
/// inside a test.
fn open_windowed(dir: &std::path::Path, window: Duration) -> crate::Store {
    let cfg = crate::StoreConfig {
        batch_window_us: window.as_micros() as u64,
        checkpoint_ms: 600_000,
        ..config(dir)
    };
    open(cfg).0
}

/// Waits until the writer is windowing; then how often it has woken.
fn wakeups_once_windowing(store: &crate::Store) -> u64 {
    let t0 = Instant::now();
    while !store.shared().windowing.load(Ordering::SeqCst) {
        assert!(t0.elapsed() < PATIENCE, "the writer never waited out a window");
        std::thread::yield_now();
    }
    store.shared().stats.writer_wakeups.load(Ordering::Relaxed)
}

/// The commits that held `done`.
fn commits_of(done: &[crate::Completion]) -> std::collections::HashSet<u64> {
    done.iter().map(|c| c.result.as_ref().unwrap().commit).collect()
}

#[test]
fn writes_during_a_window_do_not_wake_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_windowed(dir.path(), Duration::from_millis(300));
    let w = store.writer();
    w.submit(0, 0, WriteOp::AppendMessage(message(1, "v", "0", "x"))).unwrap();
    // The first write wakes the writer and opens the window.
    let before = wakeups_once_windowing(&store);
    for i in 1..6 {
        std::thread::sleep(Duration::from_millis(10));
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).unwrap();
    }
    let commits = commits_of(&wait_for(&store.completions(0), 6));
    assert_eq!(commits.len(), 1, "one batch: {commits:?}");
    // Woken by the window's end, and at most once more by the first
    // write's wake-up if it came after the writer had taken that write;
    // each write used to wake it too (6).
    let woken = store.shared().stats.writer_wakeups.load(Ordering::Relaxed) - before;
    assert!(woken <= 2, "woken {woken} times during the window");
}

#[test]
fn after_a_commit_the_writer_waits_a_window_for_more_unwoken() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_windowed(dir.path(), Duration::from_millis(300));
    // A first batch (two writes, as under load).
    let w = store.writer();
    w.submit(0, 0, WriteOp::AppendMessage(message(1, "v", "a", "x"))).unwrap();
    w.submit(0, 1, WriteOp::AppendMessage(message(1, "v", "b", "x"))).unwrap();
    let first = commits_of(&wait_for(&store.completions(0), 2));
    assert_eq!(first.len(), 1, "{first:?}");
    // The commit returned; the writer now waits a window for more.
    let before = wakeups_once_windowing(&store);
    for i in 2..5 {
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let commits = commits_of(&wait_for(&store.completions(0), 3));
    assert_eq!(commits.len(), 1, "one batch: {commits:?}");
    assert!(commits.is_disjoint(&first));
    // Only the window's end woke it: the first of them did not.
    let woken = store.shared().stats.writer_wakeups.load(Ordering::Relaxed) - before;
    assert!(woken <= 1, "woken {woken} times");
}

#[test]
fn a_write_after_the_writer_stopped_waiting_wakes_it() {
    let dir = tempfile::tempdir().unwrap();
    // Were a wake-up lost, the write would wait for the idle park's minute.
    let cfg = crate::StoreConfig {
        batch_window_us: 1_000,
        idle_park_ms: 60_000,
        checkpoint_ms: 600_000,
        ..config(dir.path())
    };
    let (store, _) = open(cfg);
    let w = store.writer();
    for round in 0..20u64 {
        // A batch (the writer lingers after it), then a pause past the
        // linger, then one more write: it must wake the idle writer.
        w.submit(0, 3 * round, WriteOp::AppendMessage(message(1, "v", &format!("{round}a"), "x"))).unwrap();
        w.submit(0, 3 * round + 1, WriteOp::AppendMessage(message(1, "v", &format!("{round}b"), "x")))
            .unwrap();
        wait_for(&store.completions(0), 2);
        std::thread::sleep(Duration::from_millis(5));
        let t0 = Instant::now();
        let c =
            write(&store, 3 * round + 2, WriteOp::AppendMessage(message(1, "v", &format!("{round}c"), "x")));
        assert!(c.result.is_ok());
        assert!(t0.elapsed() < Duration::from_secs(30), "round {round}: the write waited for the idle park");
    }
}

#[test]
fn a_full_source_refuses_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::StoreConfig { submit_queue_capacity: 4, batch_window_us: 100_000, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let w = store.writer();
    for i in 0..4 {
        w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).unwrap();
    }
    let refused = w.submit(0, 4, WriteOp::AppendMessage(message(1, "v", "4", "x")));
    let Err(SubmitError::Full(op)) = refused else { panic!("expected Full, got {refused:?}") };
    assert_eq!(w.in_flight(0), 4);
    // Completed but not popped still counts as in flight.
    let completions = store.completions(0);
    let deadline = Instant::now() + crate::testkit::PATIENCE;
    while completions.len() < 4 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(w.submit(0, 4, op.clone()), Err(SubmitError::Full(_))));
    wait_for(&completions, 1);
    w.submit(0, 4, op).unwrap();
    assert_eq!(wait_for(&completions, 4).last().unwrap().token, 4);
    assert_eq!(w.in_flight(0), 0);
    assert_eq!(store.stats().submit_full, 2);
}

#[test]
fn each_source_gets_its_own_completions_and_notify() {
    let dir = tempfile::tempdir().unwrap();
    let counts = Arc::new(NotifyCount::default());
    let cfg = crate::StoreConfig { sources: 3, ..config(dir.path()) };
    let (store, _) = Store::open(cfg, counts.notify()).unwrap();
    let w = store.writer();
    w.submit(2, 20, WriteOp::AppendMessage(message(1, "v", "a", "x"))).unwrap();
    w.submit(0, 10, WriteOp::AppendMessage(message(2, "v", "a", "x"))).unwrap();
    assert_eq!(wait_for(&store.completions(2), 1)[0].token, 20);
    assert_eq!(wait_for(&store.completions(0), 1)[0].token, 10);
    assert!(store.completions(1).is_empty());
    // The writer pushes a batch's completions, then notifies each source it
    // touched: a completion can be seen a moment before its notify runs.
    let deadline = Instant::now() + PATIENCE;
    while counts.0[0].load(Ordering::Relaxed) == 0 || counts.0[2].load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "a source with a completion was never notified");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(counts.0[1].load(Ordering::Relaxed), 0);
}

#[test]
fn close_completes_what_was_submitted_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::StoreConfig { batch_window_us: 50_000, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let w = store.writer();
    let completions = store.completions(0);
    for i in 0..100 {
        w.submit(0, i, WriteOp::AppendMessage(message(i % 7, "v", &format!("{i}"), "x"))).unwrap();
    }
    store.close();
    let done = wait_for(&completions, 100);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(matches!(
        w.submit(0, 1000, WriteOp::MarkRead(ReadMark { conv: 1, user_id: "v".into(), seq: 1, ts_ms: 1 })),
        Err(SubmitError::Closed(_))
    ));
    let (store, recovery) = open(config(dir.path()));
    assert_eq!(recovery.next_offset, 100);
    assert!(!recovery.repaired && !recovery.unclean_shutdown);
    drop(store);
}

#[test]
fn a_second_open_of_the_same_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = open(config(dir.path()));
    let second = Store::open(config(dir.path()), Arc::new(|_| {}));
    assert!(matches!(second, Err(StorageError::Open { .. })), "{second:?}");
}

#[test]
fn corrupt_record_is_reported_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(config(dir.path()));
        for i in 0..3 {
            write(&store, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "hello")));
        }
    }
    {
        // Damage the log behind the store's back, with redb itself: record
        // 1 becomes garbage with a valid format byte, record 2 becomes a
        // valid record of the wrong message.
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(crate::tables::LOG).unwrap();
            let garbage: Vec<u8> = std::iter::once(1u8).chain(std::iter::repeat_n(0xff, 60)).collect();
            log.insert(1, garbage.as_slice()).unwrap();
            let other = crate::record::encode(&LogRecord::Message(crate::MessageRecord::from_msg(
                message(9, "x", "y", "z"),
                4,
            )))
            .unwrap();
            log.insert(2, other.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert!(r.message(1, 1).unwrap().is_some(), "undamaged record still reads");
    assert!(
        matches!(r.message(1, 2), Err(StorageError::Corrupt { table: "log", .. })),
        "{:?}",
        r.message(1, 2)
    );
    assert!(matches!(r.message(1, 3), Err(StorageError::Corrupt { .. })));
    assert!(matches!(r.history(1, None, 10), Err(StorageError::Corrupt { .. })));
    assert!(matches!(r.scan(0, 10), Err(StorageError::Corrupt { .. })));
    assert_eq!(r.scan(0, 1).unwrap().len(), 1);
}

/// Makes the store in `dir` with the test-only dedupe key that puts every
/// (sender, cid) in the same slot.
fn make_with_one_slot(dir: &std::path::Path) {
    drop(open(config(dir)));
    let db = redb::Database::create(config(dir).db_path()).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(crate::tables::META).unwrap();
        meta.insert(crate::tables::META_DEDUPE_K0, 0).unwrap();
        meta.insert(crate::tables::META_DEDUPE_K1, 0).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn dedupe_slot_collisions_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    make_with_one_slot(dir.path());
    let (store, _) = open(config(dir.path()));
    let test_key = crate::dedupe::DedupeKey { k0: 0, k1: 0 };
    assert_eq!(test_key.slot(Role::Visitor, "v1", "a"), test_key.slot(Role::Agent, "v2", "b"));
    let mut seqs = Vec::new();
    for (i, (sender, cid)) in [("v1", "a"), ("v1", "b"), ("v2", "a"), ("v1", "c")].into_iter().enumerate() {
        let c = write(&store, i as u64, WriteOp::AppendMessage(message(1, sender, cid, "x"))).result.unwrap();
        assert!(!c.duplicate, "{sender}/{cid} shares a slot, not an identity");
        seqs.push(c.seq);
    }
    assert_eq!(seqs, [1, 2, 3, 4]);
    // Resends find their own original, in memory and after a restart.
    let again = write(&store, 9, WriteOp::AppendMessage(message(1, "v2", "a", "x"))).result.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, 3);
    drop(store);
    let (store, _) = open(config(dir.path()));
    let again = write(&store, 10, WriteOp::AppendMessage(message(1, "v1", "c", "x"))).result.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, 4);
    let r = store.reader();
    assert_eq!(r.dedupe(Role::Visitor, "v1", 1, "b").unwrap().map(|h| h.seq), Some(2));
    assert_eq!(r.dedupe(Role::Visitor, "v2", 1, "a").unwrap().map(|h| h.seq), Some(3));
    assert_eq!(r.dedupe(Role::Visitor, "v2", 1, "z").unwrap(), None);
    assert_eq!(r.last_seq(1).unwrap(), 4);
}

/// The cid window (`dedupe_window`): a resend of one of the conversation's
/// last `window` messages is the original, from the writer's memory, from
/// the index after a restart, and to a reader; an older cid is a new
/// message. And a conversation loaded again reads only its window, so
/// what is held stays the window however long the history.
#[test]
fn a_cid_older_than_the_window_is_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    let window = 4;
    let cfg = || crate::StoreConfig { dedupe_window: window, ..config(dir.path()) };
    let append = |store: &Store, n: u64, cid: &str| {
        write(store, n, WriteOp::AppendMessage(message(1, "v", cid, "x"))).result.unwrap()
    };
    {
        let (store, _) = open(cfg());
        for i in 1..=10u64 {
            assert!(!append(&store, i, &format!("m{i}")).duplicate);
        }
        // m7..m10 are the last four: a resend of each is the original.
        let dup = append(&store, 11, "m7");
        assert!(dup.duplicate && dup.seq == 7, "{dup:?}");
        assert_eq!(store.stats().writer_cache_entries, window as u64, "the writer holds the window only");
        // m6 left the window: a new message, with the next seq.
        let again = append(&store, 12, "m6");
        assert!(!again.duplicate && again.seq == 11, "{again:?}");
    }
    // After a restart the writer and a reader load the window from the
    // index: seqs 8..=11 (m8, m9, m10 and the second m6).
    let (store, _) = open(cfg());
    let r = store.reader();
    assert_eq!(r.dedupe(Role::Visitor, "v", 1, "m9").unwrap().map(|h| h.seq), Some(9));
    assert_eq!(r.dedupe(Role::Visitor, "v", 1, "m6").unwrap().map(|h| h.seq), Some(11));
    assert_eq!(r.dedupe(Role::Visitor, "v", 1, "m7").unwrap(), None, "out of the window");
    assert_eq!(store.stats().reader_cache_entries, window as u64, "the reader holds the window only");
    let dup = append(&store, 13, "m10");
    assert!(dup.duplicate && dup.seq == 10, "{dup:?}");
    let fresh = append(&store, 14, "m7");
    assert!(!fresh.duplicate && fresh.seq == 12, "{fresh:?}");
    assert_eq!(r.last_seq(1).unwrap(), 12);
}

/// When another message of the window holds a cid's slot, the look at
/// every entry that follows stays within the window too: a cid older than
/// the window is a new message whatever the slots, in the writer and to a
/// reader.
#[test]
fn a_slot_collision_does_not_reach_past_the_window() {
    let dir = tempfile::tempdir().unwrap();
    make_with_one_slot(dir.path());
    let window = 4;
    let (store, _) = open(crate::StoreConfig { dedupe_window: window, ..config(dir.path()) });
    let append = |n: u64, cid: &str| {
        write(&store, n, WriteOp::AppendMessage(message(1, "v", cid, "x"))).result.unwrap()
    };
    for i in 1..=10u64 {
        assert!(!append(i, &format!("m{i}")).duplicate);
    }
    let dup = append(11, "m8");
    assert!(dup.duplicate && dup.seq == 8, "{dup:?}");
    assert_eq!(store.reader().dedupe(Role::Visitor, "v", 1, "m5").unwrap(), None, "out of the window");
    let again = append(12, "m5");
    assert!(!again.duplicate && again.seq == 11, "out of the window, so a new message: {again:?}");
}

#[test]
fn a_small_conversation_cache_still_dedupes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(crate::StoreConfig { conv_cache_entries: 3, ..config(dir.path()) });
    for round in 0..2 {
        for i in 0..20u64 {
            let c = write(&store, i, WriteOp::AppendMessage(message(i % 5, "v", &format!("m{i}"), "x")));
            let c = c.result.unwrap();
            assert_eq!(c.duplicate, round == 1, "round {round} message {i}");
            assert_eq!(c.seq, i / 5 + 1);
        }
    }
}

/// The soak of issue 11: a fixed set of busy conversations. Their
/// history grows past the bound while no new conversation comes, and the
/// writer's cache must still stay within it (it used to check the bound
/// only when a conversation was first loaded), and still dedupe.
#[test]
fn the_writers_dedupe_cache_stays_within_its_bound_as_history_grows() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 50;
    let (store, _) = open(crate::StoreConfig { conv_cache_entries: bound, ..config(dir.path()) });
    let (convs, per_conv) = (8u64, 40u64);
    let mut most = 0;
    for round in 0..2 {
        for i in 0..convs * per_conv {
            let (conv, n) = (1 + i % convs, i / convs);
            let c = write(&store, i, WriteOp::AppendMessage(message(conv, "v", &format!("m{n}"), "x")));
            let c = c.result.unwrap();
            assert_eq!(
                (c.duplicate, c.seq),
                (round == 1, n + 1),
                "round {round}, conversation {conv}, message {n}"
            );
            let held = store.stats().writer_cache_entries;
            assert!(held <= bound as u64, "{held} slots held, bound {bound}");
            most = most.max(held);
        }
    }
    assert!(most > bound as u64 / 2, "the cache was used ({most} slots at most)");
}

#[test]
fn the_readers_dedupe_caches_stay_within_their_bound_and_leave_the_gauge_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 30;
    let (store, _) = open(crate::StoreConfig { conv_cache_entries: bound, ..config(dir.path()) });
    let (shared, own) = (store.reader(), store.reader().with_own_dedupe_cache());
    let (convs, per_conv) = (6u64, 25u64);
    for i in 0..convs * per_conv {
        let (conv, n) = (1 + i % convs, i / convs);
        write(&store, i, WriteOp::AppendMessage(message(conv, "v", &format!("m{n}"), "x"))).result.unwrap();
        for r in [&shared, &own] {
            assert_eq!(
                r.dedupe(Role::Visitor, "v", conv, &format!("m{n}")).unwrap().map(|h| h.seq),
                Some(n + 1)
            );
            assert_eq!(r.dedupe(Role::Visitor, "v", conv, "never").unwrap(), None);
            let first = r.dedupe(Role::Visitor, "v", conv, "m0").unwrap();
            assert_eq!(first.map(|h| h.seq), Some(1), "conversation {conv}: its first message");
        }
        for r in [&shared, &own] {
            let held = r.slots.lock().unwrap().entries();
            assert!(held <= bound, "{held} slots held, bound {bound}");
        }
        let held = shared.slots.lock().unwrap().entries() + own.slots.lock().unwrap().entries();
        assert_eq!(store.stats().reader_cache_entries, held as u64, "the gauge sums the caches");
    }
    let shared_held = shared.slots.lock().unwrap().entries() as u64;
    drop(own);
    assert_eq!(store.stats().reader_cache_entries, shared_held, "a dropped cache leaves the gauge");
}

#[test]
fn closing_a_conversation_drops_its_slots_from_the_writer_and_a_resend_still_dedupes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    for (i, conv) in [(0, 1), (1, 1), (2, 2)] {
        write(&store, i, WriteOp::AppendMessage(message(conv, "v", &format!("m{i}"), "x"))).result.unwrap();
    }
    assert_eq!(store.stats().writer_cache_entries, 3);
    write(&store, 3, WriteOp::PutConversation(conversation(1, ConvStatus::Closed))).result.unwrap();
    assert_eq!(store.stats().writer_cache_entries, 1, "conversation 2's slot stays");
    let again = write(&store, 4, WriteOp::AppendMessage(message(1, "v", "m1", "x"))).result.unwrap();
    assert!(again.duplicate, "the index still answers");
    assert_eq!(again.seq, 2);
}

#[test]
fn reader_dedupe_sees_appends_made_after_its_first_look() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!(r.dedupe(Role::Visitor, "v1", 1, "a").unwrap(), None);
    write(&store, 1, WriteOp::AppendMessage(message(1, "v1", "a", "x"))).result.unwrap();
    write(&store, 2, WriteOp::AppendMessage(message(1, "v1", "b", "x"))).result.unwrap();
    // Another handle shares the same cache.
    let r2 = store.reader();
    assert_eq!(r2.dedupe(Role::Visitor, "v1", 1, "b").unwrap().map(|h| (h.seq, h.offset)), Some((2, 1)));
    assert_eq!(r.dedupe(Role::Visitor, "v1", 1, "a").unwrap().map(|h| (h.seq, h.offset)), Some((1, 0)));
    assert_eq!(r.dedupe(Role::Visitor, "v2", 1, "a").unwrap(), None);
}

#[test]
fn a_reader_with_its_own_dedupe_cache_finds_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let shared = store.reader();
    let own = shared.with_own_dedupe_cache();
    assert_eq!(own.dedupe(Role::Visitor, "v1", 1, "a").unwrap(), None);
    write(&store, 1, WriteOp::AppendMessage(message(1, "v1", "a", "x"))).result.unwrap();
    assert_eq!(shared.dedupe(Role::Visitor, "v1", 1, "a").unwrap().map(|h| h.seq), Some(1));
    // Its cache saw conversation 1 empty; it extends it rather than trust it.
    assert_eq!(own.dedupe(Role::Visitor, "v1", 1, "a").unwrap().map(|h| h.seq), Some(1));
    assert!(!Arc::ptr_eq(&shared.slots, &own.slots), "not the shared cache");
}

#[test]
fn dedupe_before_answers_from_the_cache_what_it_has_read() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!(r.dedupe_before(Role::Visitor, "v1", 1, "a", 1).unwrap(), None);
    for (i, cid) in ["a", "b", "c"].into_iter().enumerate() {
        write(&store, i as u64, WriteOp::AppendMessage(message(1, "v1", cid, "x"))).result.unwrap();
    }
    // Nothing read yet: the index is asked.
    assert_eq!(r.dedupe_before(Role::Visitor, "v1", 1, "a", 3).unwrap().map(|h| h.seq), Some(1));
    // Read up to seq 3 now; appends the cache has not seen are still found.
    write(&store, 3, WriteOp::AppendMessage(message(1, "v1", "d", "x"))).result.unwrap();
    assert_eq!(r.dedupe_before(Role::Visitor, "v1", 1, "zz", 3).unwrap(), None);
    assert_eq!(r.dedupe_before(Role::Visitor, "v1", 1, "d", 5).unwrap().map(|h| h.seq), Some(4));
    assert_eq!(r.dedupe_before(Role::Visitor, "v1", 1, "b", 5).unwrap().map(|h| h.seq), Some(2));
    assert_eq!(r.dedupe_before(Role::Visitor, "v2", 1, "b", 5).unwrap(), None);
}

#[test]
fn a_visitors_conversations_list_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let mut token = 0;
    let mut put = |id: u64, visitor: &str, status| {
        token += 1;
        let c = ConversationRecord { visitor_id: visitor.into(), ..conversation(id, status) };
        write(&store, token, WriteOp::PutConversation(c)).result.unwrap();
    };
    put(1, "v", ConvStatus::Closed);
    put(2, "w", ConvStatus::Queued);
    put(3, "v", ConvStatus::Queued);
    // A change of an existing conversation does not list it twice.
    put(3, "v", ConvStatus::Closed);
    put(5, "v", ConvStatus::Assigned);
    write(&store, 99, WriteOp::AppendMessage(message(3, "v", "c", "hi"))).result.unwrap();
    let r = store.reader();
    let listed = |limit| -> Vec<(u64, ConvStatus, u64)> {
        r.conversations_of("v", limit).unwrap().iter().map(|c| (c.id, c.status, c.last_seq)).collect()
    };
    assert_eq!(
        listed(10),
        [(5, ConvStatus::Assigned, 0), (3, ConvStatus::Closed, 1), (1, ConvStatus::Closed, 0)]
    );
    assert_eq!(listed(2).len(), 2);
    assert!(listed(0).is_empty());
    assert!(r.conversations_of("nobody", 5).unwrap().is_empty());
    // "v" is a prefix of no other id here, but ids that share a prefix
    // stay apart (the key is the whole id).
    assert_eq!(r.conversations_of("w", 5).unwrap().len(), 1);
}

#[test]
fn a_version_1_store_gets_its_visitor_index_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(config(dir.path()));
        write(&store, 1, WriteOp::PutConversation(conversation(1, ConvStatus::Closed))).result.unwrap();
        write(&store, 2, WriteOp::PutConversation(conversation(2, ConvStatus::Queued))).result.unwrap();
    }
    downgrade_to_v2(dir.path());
    {
        // Back to version 1, as redb itself sees it: no index, version 1.
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(crate::tables::USER_CONVERSATIONS).unwrap();
        txn.open_table(crate::tables::META).unwrap().insert(crate::tables::META_SCHEMA, 1).unwrap();
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!(r.conversations_of("v1", 5).unwrap().iter().map(|c| c.id).collect::<Vec<_>>(), [1]);
    assert_eq!(r.conversations_of("v2", 5).unwrap().iter().map(|c| c.id).collect::<Vec<_>>(), [2]);
}

/// A version 10 store (an entry per row, 64-bit slots) opens with its
/// index moved into runs and its slots cut: reads, dedupe and the next
/// seqs are as before.
#[test]
fn a_version_10_store_moves_its_index_into_runs_at_open() {
    use redb::ReadableDatabase as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { index_batch: 4, ..config(dir.path()) };
    let append = |store: &Store, token: u64, conv: u64, cid: &str| {
        write(store, token, WriteOp::AppendMessage(message(conv, &format!("v{conv}"), cid, "hi")))
            .result
            .unwrap()
    };
    let before = {
        let (store, _) = open(cfg.clone());
        for i in 0..70 {
            append(&store, i, 1, &format!("a{i}"));
        }
        append(&store, 100, 2, "b0");
        (store.reader().history(1, None, 100).unwrap(), store.reader().scan(0, 100).unwrap())
    };
    {
        let db = redb::Database::create(cfg.db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        index_to_v10(&txn);
        txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 10).unwrap();
        txn.commit().unwrap();
    }
    let (store, _) = open(cfg.clone());
    let r = store.reader();
    assert_eq!(r.history(1, None, 100).unwrap(), before.0);
    assert_eq!(r.scan(0, 100).unwrap(), before.1);
    assert_eq!(r.dedupe(Role::Visitor, "v1", 1, "a3").unwrap().map(|h| h.seq), Some(4));
    let again = append(&store, 200, 1, "a69");
    assert!(again.duplicate && again.seq == 70, "{again:?}");
    assert_eq!(append(&store, 201, 2, "b1").seq, 2);
    drop((r, store));
    let rows = table_rows(&cfg.db_path(), 1);
    assert_eq!(rows.iter().map(Vec::len).collect::<Vec<_>>(), [64, 6], "runs of at most 64");
    let db = redb::Database::create(cfg.db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
    let txn = db.begin_read().unwrap();
    assert!(txn.open_table(tables::CONV_INDEX_V10).is_err(), "version 10's table is gone");
}

/// A version 10 store that crashed with a record in its write-ahead log
/// (a message and its `conv_index` entry, as version 10 wrote them):
/// open replays the record into the old table, then moves the whole
/// index into runs, and the message reads, dedupes and is followed.
#[test]
fn a_version_10_store_with_its_log_to_replay_moves_the_replayed_entries_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let append = |store: &Store, token: u64, cid: &str| {
        write(store, token, WriteOp::AppendMessage(message(1, "v1", cid, "hi"))).result.unwrap()
    };
    let (cycle, store_number, key) = stored_three_then_crashed(&cfg, 10, index_to_v10);
    // The record version 10 would have written for a fourth message
    // (format 2, which version 16 replays as it is).
    let mut payload = Vec::new();
    let m = message(1, "v1", "c4", "hi");
    let mut value = Vec::new();
    crate::compact::MessageView::of_msg(&m, 4).encode_v2_into(&mut value);
    crate::redo::Op::Log { offset: 3, value: &value }.encode(&mut payload);
    let slot = key.slot(Role::Visitor, "v1", "c4") | 0x5eed << 40;
    crate::redo::Op::ConvIndex { conv: 1, seq: 4, offset: 3, slot }.encode(&mut payload);
    crate::redo::Op::Meta { key: tables::META_NEXT_OFFSET, value: 4 }.encode(&mut payload);
    // The entry went to the table with its message: no tail to rebuild.
    crate::redo::Op::Meta { key: tables::META_INDEX_FROM, value: 4 }.encode(&mut payload);
    plant_wal_record(&cfg, store_number, cycle, &payload);

    let (store, recovery) = open(cfg.clone());
    assert_eq!(recovery.next_offset, 4, "the record was replayed");
    assert_eq!(store.stats().index_tail_entries, 0, "seq 4 is read from the table");
    assert_eq!(seqs_of(&store, 1), [1, 2, 3, 4]);
    let again = append(&store, 10, "c4");
    assert!(again.duplicate && again.seq == 4, "found by its cut slot: {again:?}");
    assert_eq!(append(&store, 11, "c5").seq, 5);
    drop(store);
    assert_eq!(table_rows(&cfg.db_path(), 1).concat(), [1, 2, 3, 4, 5], "every entry in runs, once");
}

/// A store that holds messages `c1` to `c3` of visitor `v1` in
/// conversation 1, made to look like one of schema `version` by `edit`
/// and left marked open, as a crash leaves it. Gives back the next
/// write-ahead log cycle, the store's number and its dedupe key, for
/// [`plant_wal_record`].
fn stored_three_then_crashed(
    cfg: &StoreConfig,
    version: u64,
    edit: impl FnOnce(&redb::WriteTransaction),
) -> (u64, u64, crate::dedupe::DedupeKey) {
    use redb::ReadableTable as _;
    {
        let (store, _) = open(cfg.clone());
        for i in 1..=3 {
            write(&store, i, WriteOp::AppendMessage(message(1, "v1", &format!("c{i}"), "hi")))
                .result
                .unwrap();
        }
    }
    let db = redb::Database::create(cfg.db_path()).unwrap();
    let txn = db.begin_write().unwrap();
    edit(&txn);
    let mut meta = txn.open_table(tables::META).unwrap();
    meta.insert(tables::META_SCHEMA, version).unwrap();
    meta.insert(tables::META_OPEN, 1).unwrap();
    let get = |k: &str| meta.get(k).unwrap().map(|g| g.value());
    let found = (
        get(tables::META_WAL_CYCLE).unwrap_or(0) + 1,
        get(tables::META_DEDUPE_K0).unwrap(),
        crate::dedupe::DedupeKey {
            k0: get(tables::META_DEDUPE_K0).unwrap(),
            k1: get(tables::META_DEDUPE_K1).unwrap(),
        },
    );
    drop(meta);
    txn.commit().unwrap();
    found
}

/// Writes `payload` as the first record of write-ahead log `cycle` of the
/// store numbered `store_number` (its dedupe key's `k0`), as the log would
/// have if the process had died right after its fsync.
fn plant_wal_record(cfg: &StoreConfig, store_number: u64, cycle: u64, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&store_number.to_le_bytes());
    crc.update(&cycle.to_le_bytes());
    crc.update(payload);
    let mut record = Vec::new();
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc.finalize().to_le_bytes());
    record.extend_from_slice(&cycle.to_le_bytes());
    record.extend_from_slice(payload);
    let file = if cycle.is_multiple_of(2) { cfg.wal_path() } else { cfg.wal_odd_path() };
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..record.len()].copy_from_slice(&record);
    // What follows is no record of this cycle.
    bytes[record.len()..record.len() + crate::wal::HEADER].fill(0);
    std::fs::write(&file, bytes).unwrap();
}

/// Moves the log back to where version 15 kept it: `log`, keyed by `u64`,
/// each value as `as_stored` makes it; `log40` deleted. Gives back the
/// records as they were.
fn log_to_v15(txn: &redb::WriteTransaction, as_stored: impl Fn(&[u8]) -> Vec<u8>) -> Vec<(u64, Vec<u8>)> {
    use redb::ReadableTable as _;
    let all: Vec<(u64, Vec<u8>)> = txn
        .open_table(tables::LOG)
        .unwrap()
        .iter()
        .unwrap()
        .map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec())).unwrap())
        .collect();
    txn.delete_table(tables::LOG).unwrap();
    let mut old = txn.open_table(tables::LOG_V15).unwrap();
    for (k, v) in &all {
        old.insert(*k, as_stored(v).as_slice()).unwrap();
    }
    all
}

/// A store whose schema version is gone is not taken for a new one while
/// it holds a log, in this version's table or in version 15's.
#[test]
fn a_store_without_its_schema_version_but_with_a_log_does_not_open() {
    use redb::ReadableDatabase as _;
    for old_table in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(config(dir.path()));
            write(&store, 1, WriteOp::AppendMessage(message(1, "v", "m1", "hi"))).result.unwrap();
        }
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        if old_table {
            log_to_v15(&txn, <[u8]>::to_vec);
        }
        txn.open_table(tables::META).unwrap().remove(tables::META_SCHEMA).unwrap();
        txn.commit().unwrap();
        drop(db);
        let Err(err) = Store::open(config(dir.path()), Arc::new(|_| {})) else {
            panic!("old table {old_table}: opened")
        };
        assert!(
            err.to_string().contains("missing, but the log is not empty"),
            "old table {old_table}: {err}"
        );
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        assert!(
            db.begin_read()
                .unwrap()
                .open_table(tables::META)
                .unwrap()
                .get(tables::META_SCHEMA)
                .unwrap()
                .is_none()
        );
    }
}

/// A version 15 store that died with a message only in its write-ahead
/// log: the upgrade moves and repacks the table's messages, the replay
/// repacks the logged one, and all four read, dedupe and go on.
#[test]
fn a_version_15_store_with_its_log_to_replay_repacks_the_replayed_message() {
    use redb::ReadableDatabase as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let append = |store: &Store, token: u64, cid: &str| {
        write(store, token, WriteOp::AppendMessage(message(1, "v1", cid, "hi"))).result.unwrap()
    };
    let (cycle, store_number, key) = stored_three_then_crashed(&cfg, 15, |txn| {
        log_to_v15(txn, crate::compact::as_v15);
    });
    // The record version 15 would have written for a fourth message.
    let m = message(1, "v1", "c4", "hi");
    let mut now = Vec::new();
    crate::compact::MessageView::of_msg(&m, 4).encode_into(&mut now);
    let v15 = crate::compact::as_v15(&now);
    let mut row = Vec::new();
    crate::runs::encode(&[(4, 3, key.slot(Role::Visitor, "v1", "c4"))], &mut row);
    let mut payload = Vec::new();
    crate::redo::Op::Log { offset: 3, value: &v15 }.encode(&mut payload);
    crate::redo::Op::ConvRun { conv: 1, last_seq: 4, value: &row }.encode(&mut payload);
    crate::redo::Op::Meta { key: tables::META_NEXT_OFFSET, value: 4 }.encode(&mut payload);
    crate::redo::Op::Meta { key: tables::META_INDEX_FROM, value: 4 }.encode(&mut payload);
    plant_wal_record(&cfg, store_number, cycle, &payload);

    let (store, recovery) = open(cfg.clone());
    assert_eq!(recovery.next_offset, 4, "the record was replayed");
    let texts: Vec<_> = store
        .reader()
        .history(1, None, 10)
        .unwrap()
        .into_iter()
        .map(|m| (m.record.seq, m.record.text.unwrap()))
        .collect();
    assert_eq!(texts, (1..=4).map(|s| (s, "hi".to_string())).collect::<Vec<_>>());
    let again = append(&store, 10, "c4");
    assert!(again.duplicate && again.seq == 4, "{again:?}");
    assert_eq!(append(&store, 11, "c5").seq, 5);
    drop(store);
    let db = redb::Database::create(cfg.db_path()).unwrap();
    let txn = db.begin_read().unwrap();
    assert_eq!(txn.open_table(tables::LOG).unwrap().get(3).unwrap().unwrap().value(), now.as_slice());
}

/// Moves `conv_runs` back into version 10's `conv_index`, an entry per
/// row, each slot with high bits set as a version 10 slot has them (the
/// upgrade cuts them off).
fn index_to_v10(txn: &redb::WriteTransaction) {
    use redb::ReadableTable as _;
    senders_in_full(&mut txn.open_table(tables::LOG).unwrap());
    let mut entries = Vec::new();
    for row in txn.open_table(tables::CONV_RUNS).unwrap().iter().unwrap() {
        let (k, v) = row.unwrap();
        let (conv, last) = k.value();
        let mut run = Vec::new();
        crate::runs::decode(conv, last, v.value(), &mut run).unwrap();
        entries
            .extend(run.into_iter().map(|(seq, offset, slot)| ((conv, seq), (offset, slot | 0x5eed << 40))));
    }
    txn.delete_table(tables::CONV_RUNS).unwrap();
    let mut old = txn.open_table(tables::CONV_INDEX_V10).unwrap();
    for (key, value) in entries {
        old.insert(key, value).unwrap();
    }
}

/// Rewrites every message that points back for its sender
/// (`compact.rs`) to name them in full, as every store before version 12
/// does. Returns how many there were.
fn senders_in_full(log: &mut redb::Table<tables::LogOffset, &[u8]>) -> usize {
    use redb::ReadableTable as _;
    let mut pointing = Vec::new();
    for e in log.iter().unwrap() {
        let (k, v) = e.unwrap();
        let offset = k.value();
        let points = matches!(crate::record::decode_log(v.value(), &offset),
            Ok(crate::LogView::Message(m)) if m.sender_back.is_some());
        if points {
            let in_full = crate::record::access_log_in(&*log, offset, v.value(), |view| {
                let crate::LogView::Message(m) = view else { unreachable!("a message above") };
                let mut out = Vec::new();
                m.encode_into(&mut out);
                out
            });
            pointing.push((offset, in_full.unwrap()));
        }
    }
    for (offset, value) in &pointing {
        log.insert(offset, value.as_slice()).unwrap();
    }
    pointing.len()
}

/// Rewrites every message of `log` as a format 1 archive of the same
/// record, as every store before version 6 holds them. Returns how many.
fn messages_to_format_1(log: &mut redb::Table<tables::LogOffset, &[u8]>) -> usize {
    log_to_format_1(log, |b| b == 2 || crate::compact::is_packed(b))
}

/// Rewrites every log record whose format byte is one of `format` as the
/// format 1 archive of the same record; returns how many there were.
fn log_to_format_1(log: &mut redb::Table<tables::LogOffset, &[u8]>, format: impl Fn(u8) -> bool) -> usize {
    use redb::ReadableTable as _;
    senders_in_full(log);
    let compact: Vec<(u64, LogRecord)> = log
        .iter()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|(_, v)| format(v.value()[0]))
        .map(|(k, v)| (k.value(), crate::decode_log_record(v.value()).unwrap()))
        .collect();
    for (offset, record) in &compact {
        let v1 = crate::record::encode(record).unwrap();
        assert_eq!(v1[0], 1);
        log.insert(offset, v1.as_slice()).unwrap();
    }
    compact.len()
}

/// Rewrites every conversation state, profile and read mark in their
/// tables and in the log as format 1 archives, as version 7 and before
/// wrote them.
fn states_to_format_1(txn: &redb::WriteTransaction) {
    use redb::ReadableTable as _;
    let mut log = txn.open_table(tables::LOG).unwrap();
    for format in [3, 4, 5] {
        log_to_format_1(&mut log, |b| b == format);
    }
    let mut conversations = txn.open_table(tables::CONVERSATIONS).unwrap();
    let states: Vec<(u64, Vec<u8>)> = conversations
        .iter()
        .unwrap()
        .map(|e| e.unwrap())
        .map(|(k, v)| {
            let record = crate::record::access_conversation(v.value(), k.value()).unwrap().to_record();
            (k.value(), crate::record::encode(&record).unwrap())
        })
        .collect();
    for (id, bytes) in states {
        conversations.insert(id, bytes.as_slice()).unwrap();
    }
    let mut users = txn.open_table(tables::USERS).unwrap();
    let profiles: Vec<((String, String), Vec<u8>)> = users
        .iter()
        .unwrap()
        .map(|e| e.unwrap())
        .map(|(k, v)| {
            let record = crate::record::access_user(v.value(), &"").unwrap().to_record();
            let (role, id) = k.value();
            ((role.to_string(), id.to_string()), crate::record::encode(&record).unwrap())
        })
        .collect();
    for ((role, id), bytes) in profiles {
        users.insert((role.as_str(), id.as_str()), bytes.as_slice()).unwrap();
    }
}

/// Turns a closed store this build wrote back into what version 2 wrote:
/// messages as format 1 archives, dedupe slots of the sender's id and the
/// cid (no role), `users` keyed by id alone.
fn downgrade_to_v2(dir: &std::path::Path) {
    use redb::ReadableTable as _;
    let db = redb::Database::create(config(dir).db_path()).unwrap();
    let txn = db.begin_write().unwrap();
    let users: Vec<(String, Vec<u8>)> = {
        let mut meta = txn.open_table(tables::META).unwrap();
        let key = crate::dedupe::DedupeKey {
            k0: meta.get(tables::META_DEDUPE_K0).unwrap().unwrap().value(),
            k1: meta.get(tables::META_DEDUPE_K1).unwrap().unwrap().value(),
        };
        meta.insert(tables::META_SCHEMA, 2).unwrap();
        states_to_format_1(&txn);
        index_to_v10(&txn);
        let mut log = txn.open_table(tables::LOG).unwrap();
        messages_to_format_1(&mut log);
        let mut index = txn.open_table(tables::CONV_INDEX_V10).unwrap();
        let entries: Vec<((u64, u64), u64)> =
            index.iter().unwrap().map(|e| e.unwrap()).map(|(k, v)| (k.value(), v.value().0)).collect();
        for (at, offset) in entries {
            let guard = log.get(offset).unwrap().unwrap();
            let crate::LogView::Message(m) = crate::record::decode_log(guard.value(), &offset).unwrap()
            else {
                panic!("not a message at {offset}")
            };
            index.insert(at, (offset, key.slot_v2(m.sender_id, m.cid.as_str()))).unwrap();
        }
        let users = txn.open_table(tables::USERS).unwrap();
        users
            .iter()
            .unwrap()
            .map(|e| e.unwrap())
            .map(|(k, v)| (k.value().1.to_string(), v.value().to_vec()))
            .collect()
    };
    txn.delete_table(tables::USERS).unwrap();
    {
        let mut old = txn.open_table(crate::upgrade::USERS_V2).unwrap();
        for (id, bytes) in &users {
            old.insert(id.as_str(), bytes.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    assert_eq!(schema_version(&db), 2);
}

fn schema_version(db: &redb::Database) -> u64 {
    use redb::ReadableDatabase as _;
    let txn = db.begin_read().unwrap();
    txn.open_table(tables::META).unwrap().get(tables::META_SCHEMA).unwrap().unwrap().value()
}

#[test]
fn a_version_2_store_gets_dedupe_slots_and_users_keyed_by_role_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let key_hash = [0x5a; 32];
    {
        let (store, _) = open(config(dir.path()));
        write(&store, 1, WriteOp::AppendMessage(message(1, "42", "same", "from visitor 42"))).result.unwrap();
        write(&store, 2, WriteOp::AppendMessage(message(1, "v7", "x", "hi"))).result.unwrap();
        write(&store, 3, WriteOp::AppendMessage(message(2, "42", "same", "elsewhere"))).result.unwrap();
        let user = UserRecord {
            id: "42".into(),
            role: Role::Visitor,
            name: "Forty-two".into(),
            meta: vec![("plan".into(), "pro".into())],
            visitor_key_hash: Some(key_hash),
            created_ms: 1,
        };
        write(&store, 4, WriteOp::PutUser(user)).result.unwrap();
        write(&store, 5, WriteOp::PutConversation(conversation(1, ConvStatus::Assigned))).result.unwrap();
    }
    downgrade_to_v2(dir.path());
    let (store, recovery) = open(config(dir.path()));
    assert_eq!(recovery.next_offset, 5);
    let r = store.reader();
    // Old messages are found under their sender's role, and only there.
    assert_eq!(r.dedupe(Role::Visitor, "42", 1, "same").unwrap().map(|h| (h.seq, h.offset)), Some((1, 0)));
    assert_eq!(r.dedupe(Role::Visitor, "v7", 1, "x").unwrap().map(|h| h.seq), Some(2));
    assert_eq!(r.dedupe(Role::Visitor, "42", 2, "same").unwrap().map(|h| h.seq), Some(1));
    assert_eq!(r.dedupe(Role::Agent, "42", 1, "same").unwrap(), None);
    let again = write(&store, 6, WriteOp::AppendMessage(message(1, "42", "same", "again"))).result.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true), "a resend from before the upgrade");
    let mut agent = message(1, "42", "same", "from agent 42");
    agent.from.role = Role::Agent;
    let agent = write(&store, 7, WriteOp::AppendMessage(agent)).result.unwrap();
    assert_eq!((agent.seq, agent.duplicate), (3, false));
    let u = r.user(Role::Visitor, "42").unwrap().expect("the visitor's profile, under its role");
    assert_eq!((u.name.as_str(), u.visitor_key_hash), ("Forty-two", Some(key_hash)));
    assert_eq!(r.user(Role::Agent, "42").unwrap(), None);
    drop((r, store));
    let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
    {
        use redb::TableHandle as _;
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let names: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
        assert!(!names.iter().any(|n| n == "users_v2"), "the old users table is gone: {names:?}");
    }
    drop(db);
    // Opening again does not upgrade again.
    let (store, _) = open(config(dir.path()));
    assert_eq!(store.reader().dedupe(Role::Agent, "42", 1, "same").unwrap().map(|h| h.seq), Some(3));
}

#[test]
fn a_user_keeps_the_time_it_was_first_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let user = UserRecord {
        id: "v1".into(),
        role: Role::Visitor,
        name: "Ann".into(),
        meta: Vec::new(),
        visitor_key_hash: Some([1; 32]),
        created_ms: 10,
    };
    write(&store, 1, WriteOp::PutUser(user.clone())).result.unwrap();
    let later = UserRecord { name: "Anne".into(), created_ms: 5_000, ..user };
    let done = write(&store, 2, WriteOp::PutUser(later)).result.unwrap();
    let stored = store.reader().user(Role::Visitor, "v1").unwrap().unwrap();
    assert_eq!((stored.name.as_str(), stored.created_ms), ("Anne", 10));
    let logged = store.reader().scan(done.offset, 1).unwrap();
    let LogRecord::User(u) = &logged[0].record else { panic!("not a user: {logged:?}") };
    assert_eq!(u.created_ms, 10, "the log carries the stored time too");
}

#[test]
fn a_conversation_keeps_the_time_it_was_first_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    write(&store, 1, WriteOp::PutConversation(conversation(4, ConvStatus::Queued))).result.unwrap();
    let later =
        ConversationRecord { created_ms: 5_000, updated_ms: 5_000, ..conversation(4, ConvStatus::Assigned) };
    write(&store, 2, WriteOp::PutConversation(later)).result.unwrap();
    let stored = store.reader().conversation(4).unwrap().unwrap();
    assert_eq!((stored.status, stored.created_ms, stored.updated_ms), (ConvStatus::Assigned, 10, 5_000));
}

#[test]
fn conversations_list_newest_first_filtered_and_paged_within_the_scan_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let mut token = 0;
    let mut put = |c: ConversationRecord| {
        token += 1;
        write(&store, token, WriteOp::PutConversation(c)).result.unwrap();
    };
    for id in 1..=9 {
        let status = [ConvStatus::Queued, ConvStatus::Assigned, ConvStatus::Closed][id as usize % 3];
        let mut c = conversation(id, status);
        c.group = Some(if id % 2 == 0 { "sales" } else { "support" }.into());
        if status == ConvStatus::Closed {
            c.agent = Some(AgentRef { id: "a2".into(), name: "Bob".into() });
        }
        put(c);
    }
    write(&store, 99, WriteOp::AppendMessage(message(8, "v8", "c", "hi"))).result.unwrap();
    let r = store.reader();
    let ids = |filter: &ConversationFilter, before, size, scan| {
        let page = r.list_conversations(filter, before, size, scan).unwrap();
        (page.conversations.iter().map(|c| c.id).collect::<Vec<_>>(), page.next_before)
    };
    let all = ConversationFilter::default();
    assert_eq!(ids(&all, None, 100, 100), ((1..=9).rev().collect(), None));
    assert_eq!(ids(&all, None, 4, 100), (vec![9, 8, 7, 6], Some(6)));
    assert_eq!(ids(&all, Some(6), 4, 100), (vec![5, 4, 3, 2], Some(2)));
    assert_eq!(ids(&all, Some(2), 4, 100), (vec![1], None));
    // A page that ends exactly at the last conversation says so.
    assert_eq!(ids(&all, Some(5), 4, 100), (vec![4, 3, 2, 1], None));
    let page = r.list_conversations(&all, Some(9), 1, 100).unwrap();
    assert_eq!(page.conversations[0].last_seq, 1, "last_seq comes from the index");

    let closed = ConversationFilter { status: Some(ConvStatus::Closed), ..Default::default() };
    assert_eq!(ids(&closed, None, 100, 100), (vec![8, 5, 2], None));
    let by_bob = ConversationFilter { agent_id: Some("a2".into()), ..Default::default() };
    assert_eq!(ids(&by_bob, None, 100, 100), (vec![8, 5, 2], None));
    let by_alice = ConversationFilter { agent_id: Some("a1".into()), ..Default::default() };
    assert_eq!(ids(&by_alice, None, 100, 100), (vec![7, 4, 1], None));
    let sales_closed = ConversationFilter { group: Some("sales".into()), ..closed.clone() };
    assert_eq!(ids(&sales_closed, None, 100, 100), (vec![8, 2], None));
    let nobody = ConversationFilter { agent_id: Some("a9".into()), ..Default::default() };
    assert_eq!(ids(&nobody, None, 100, 100), (vec![], None));

    // The scan bound cuts a page short, even to nothing, and says where
    // to go on; following it finds every match exactly once.
    assert_eq!(ids(&closed, None, 100, 2), (vec![8], Some(8)));
    assert_eq!(ids(&closed, Some(8), 100, 2), (vec![], Some(6)));
    let mut found = Vec::new();
    let mut before = None;
    loop {
        let page = r.list_conversations(&closed, before, 100, 2).unwrap();
        found.extend(page.conversations.iter().map(|c| c.id));
        match page.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(found, [8, 5, 2]);
    assert_eq!(ids(&all, None, 0, 100), (vec![], None));
    assert_eq!(ids(&all, Some(0), 10, 100), (vec![], None));
}

#[test]
fn writer_health_says_accepting_while_open_and_closed_after() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let stats = store.stats_source();
    assert_eq!(stats.writer_health(), WriterHealth::Accepting);
    assert_eq!(stats.writer_health().problem(), None);
    write(&store, 1, WriteOp::PutConversation(conversation(1, ConvStatus::Queued))).result.unwrap();
    assert_eq!(stats.writer_health(), WriterHealth::Accepting);
    store.close();
    assert_eq!(stats.writer_health(), WriterHealth::Closed);
    assert!(stats.writer_health().problem().is_some());
}

/// `conversation(id, status)` assigned to `agent`.
fn assigned_to(id: u64, agent: &str) -> ConversationRecord {
    let mut c = conversation(id, ConvStatus::Assigned);
    c.agent = Some(AgentRef { id: agent.into(), name: agent.into() });
    c
}

/// One conversation's life, a message and a read mark: offsets 0..7.
fn log_a_life(store: &Store) {
    let mut closed = assigned_to(1, "a2");
    closed.status = ConvStatus::Closed;
    let mut back_in_queue = assigned_to(1, "a2");
    back_in_queue.status = ConvStatus::Queued;
    let ops = [
        WriteOp::PutConversation(conversation(1, ConvStatus::Queued)),
        WriteOp::PutConversation(assigned_to(1, "a1")),
        WriteOp::AppendMessage(message(1, "v1", "c1", "hello")),
        WriteOp::PutConversation(assigned_to(1, "a2")),
        WriteOp::PutConversation(back_in_queue),
        WriteOp::PutConversation(assigned_to(1, "a2")),
        WriteOp::MarkRead(ReadMark { conv: 1, user_id: "a2".into(), seq: 1, ts_ms: 30 }),
        WriteOp::PutConversation(closed),
    ];
    for (token, op) in ops.into_iter().enumerate() {
        write(store, token as u64, op).result.unwrap();
    }
}

fn changes(store: &Store, from: u64) -> Vec<(u64, Option<ConvChange>)> {
    let events = store.reader().events(from, store.log_end(), 100).unwrap();
    events.into_iter().map(|e| (e.offset, e.change)).collect()
}

#[test]
fn the_log_reads_as_events_each_conversation_change_named() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    assert_eq!(store.log_end(), 0);
    log_a_life(&store);
    assert_eq!(store.log_end(), 8);
    use ConvChange::*;
    let want = [
        (0, Some(Opened)),
        (1, Some(Assigned)),
        (2, None),
        (3, Some(Transferred)),
        (4, Some(Transferred)),
        (5, Some(Assigned)),
        (6, None),
        (7, Some(Closed)),
    ];
    assert_eq!(changes(&store, 0), want);
    let r = store.reader();
    let page = r.events(2, store.log_end(), 3).unwrap();
    assert_eq!(page.iter().map(|e| e.offset).collect::<Vec<_>>(), [2, 3, 4]);
    assert!(matches!(&page[0].record, LogRecord::Message(m) if m.seq == 1 && m.cid == "c1"));
    // `end` bounds the read, whatever the log holds past it.
    assert_eq!(r.events(0, 2, 100).unwrap().len(), 2);
    assert!(r.events(8, store.log_end(), 100).unwrap().is_empty());
    assert!(r.events(5, 5, 100).unwrap().is_empty());
    assert!(r.events(0, 8, 0).unwrap().is_empty());
    // The changes persist.
    drop((r, store));
    let (store, _) = open(config(dir.path()));
    assert_eq!(store.log_end(), 8);
    assert_eq!(changes(&store, 0), want);
}

#[test]
fn the_log_end_is_published_after_each_commit_that_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    assert!(store.on_log_end(Box::new(move |end| sink.lock().unwrap().push(end))).is_ok());
    assert!(store.on_log_end(Box::new(|_| {})).is_err(), "set once");
    write(&store, 1, WriteOp::AppendMessage(message(1, "v1", "a", "x"))).result.unwrap();
    // A consumer offset logs nothing: no new end.
    let op = WriteOp::CommitOffset { consumer: "c".into(), offset: 1 };
    write(&store, 2, op).result.unwrap();
    write(&store, 3, WriteOp::AppendMessage(message(1, "v1", "b", "y"))).result.unwrap();
    // A duplicate logs nothing either.
    write(&store, 4, WriteOp::AppendMessage(message(1, "v1", "b", "y"))).result.unwrap();
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    assert_eq!(store.log_end(), 2);
    assert_eq!(store.reader().consumer_offset("c").unwrap(), Some(1));
}

#[test]
fn a_version_3_store_gets_its_conversation_changes_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(config(dir.path()));
        log_a_life(&store);
    }
    {
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 3).unwrap();
        txn.delete_table(tables::CONV_CHANGES).unwrap();
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    use ConvChange::*;
    let got: Vec<Option<ConvChange>> = changes(&store, 0).into_iter().map(|(_, c)| c).collect();
    assert_eq!(
        got,
        [
            Some(Opened),
            Some(Assigned),
            None,
            Some(Transferred),
            Some(Transferred),
            Some(Assigned),
            None,
            Some(Closed)
        ]
    );
    drop(store);
    let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
}

#[test]
fn a_conversation_record_without_its_change_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(config(dir.path()));
        log_a_life(&store);
    }
    {
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tables::CONV_CHANGES).unwrap().insert(3, 77).unwrap();
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!(r.events(0, 3, 10).unwrap().len(), 3, "the records before it read");
    let err = r.events(0, 8, 10).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { table: "conv_changes", .. }), "{err}");
}

#[test]
fn user_controls_persist_apart_from_profiles_and_a_version_4_store_gains_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let control = UserControlRecord {
        synced_name: Some("Ada".into()),
        synced_meta: vec![("vip_level".into(), "2".into()), ("plan".into(), "gold".into())],
        block: Some(BlockRecord { until_ms: 0, reason: "spam".into(), at_ms: 5 }),
    };
    {
        let (store, _) = open(config(dir.path()));
        let put = WriteOp::PutControl { role: Role::Visitor, id: "v1".into(), control: control.clone() };
        let done = write(&store, 1, put).result.unwrap();
        assert_eq!(store.reader().next_offset().unwrap(), 0, "a control is not logged");
        assert!(!done.duplicate);
    }
    // Back to version 4: no `user_controls` table.
    {
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(tables::USER_CONTROLS).unwrap();
        txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 4).unwrap();
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    assert_eq!(store.reader().user_control(Role::Visitor, "v1").unwrap(), None, "the table starts empty");
    let put = WriteOp::PutControl { role: Role::Visitor, id: "v1".into(), control: control.clone() };
    write(&store, 2, put).result.unwrap();
    drop(store);
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    let back = r.user_control(Role::Visitor, "v1").unwrap().expect("stored");
    assert_eq!(back.synced_meta[0].0, "plan", "meta sorted");
    assert_eq!((back.synced_name, back.block), (control.synced_name, control.block));
    assert_eq!(r.user_control(Role::Agent, "v1").unwrap(), None, "keyed by role too");
    assert_eq!(r.user(Role::Visitor, "v1").unwrap(), None, "no profile was written");
}

#[test]
fn the_data_directory_and_database_are_kefus_alone() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    {
        let (_store, _) = open(config(&dir));
    }
    assert_eq!(mode(&dir), 0o700, "a directory kefu makes");
    let db = config(&dir).db_path();
    assert_eq!(mode(&db), 0o600);
    // A database file someone loosened is tightened at the next open.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_store, _) = open(config(&dir));
    assert_eq!(mode(&db), 0o600);
    // The write-ahead log holds the same messages.
    assert_eq!(mode(&config(&dir).wal_path()), 0o600);
    assert_eq!(mode(&config(&dir).wal_odd_path()), 0o600);
}

/// Messages are written in the compact format since version 6; a store
/// whose messages are rkyv archives (format 1, every store before it)
/// reads, dedupes and streams them as before, and appends new ones in the
/// compact format beside them.
#[test]
fn a_version_5_store_with_format_1_messages_reads_as_before() {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    let dir = tempfile::tempdir().unwrap();
    let mut with_file = message(5, "v1", "c-file", "see attached");
    with_file.attachment =
        Some(kefu_proto::client::Attachment { mime: "image/png".into(), data: vec![7; 40] });
    let sent = [
        message(5, "v1", "c1", "hello"),
        message(5, "a1", "c2", "你好, how can I help?"),
        with_file,
        message(6, "v2", "c1", "another conversation"),
    ];
    let (before_history, before_scan) = {
        let (store, _) = open(config(dir.path()));
        for (i, m) in sent.iter().enumerate() {
            write(&store, i as u64, WriteOp::AppendMessage(m.clone())).result.unwrap();
        }
        let r = store.reader();
        (r.history(5, None, 10).unwrap(), r.scan(0, 10).unwrap())
    };
    // Back to version 5: every message rewritten as the format 1 archive
    // of the same record.
    {
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(tables::LOG).unwrap();
            let compact_bytes: usize = log.iter().unwrap().map(|e| e.unwrap().1.value().len()).sum();
            assert_eq!(messages_to_format_1(&mut log), sent.len(), "all written in the compact format");
            let v1_bytes: usize = log.iter().unwrap().map(|e| e.unwrap().1.value().len()).sum();
            assert!(
                v1_bytes > compact_bytes + sent.len() * 50,
                "format 1: {v1_bytes} bytes, compact {compact_bytes}"
            );
            txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 5).unwrap();
        }
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!(r.history(5, None, 10).unwrap(), before_history);
    assert_eq!(r.scan(0, 10).unwrap(), before_scan);
    assert_eq!(r.message(5, 3).unwrap().unwrap().record.attachment.unwrap().bytes, vec![7; 40]);
    let hit = r.dedupe(Role::Visitor, "a1", 5, "c2").unwrap().expect("the format 1 original is found");
    assert_eq!((hit.seq, hit.offset), (2, 1));
    // A resend is answered from the format 1 original; a new message is
    // appended in the compact format.
    let again = write(&store, 10, WriteOp::AppendMessage(sent[0].clone())).result.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true));
    let new = write(&store, 11, WriteOp::AppendMessage(message(5, "v1", "c3", "thanks"))).result.unwrap();
    assert_eq!((new.seq, new.duplicate), (4, false));
    let page = r.history(5, None, 10).unwrap();
    assert_eq!(page.len(), 4);
    assert_eq!(page[..3], before_history[..]);
    assert_eq!(page[3].record.text.as_deref(), Some("thanks"));
    drop((r, store));
    let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
    let txn = db.begin_read().unwrap();
    let log = txn.open_table(tables::LOG).unwrap();
    assert!(
        crate::compact::is_packed(log.get(new.offset).unwrap().unwrap().value()[0]),
        "new messages are packed"
    );
}

#[test]
fn a_version_7_store_with_archived_states_profiles_and_read_marks_reads_as_before() {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    let dir = tempfile::tempdir().unwrap();
    let visitor = UserRecord {
        id: "v4".into(),
        role: Role::Visitor,
        name: "Bob".into(),
        meta: vec![("plan".into(), "gold".into())],
        visitor_key_hash: Some([0xab; 32]),
        created_ms: 7,
    };
    let (conversation_before, user_before, scan_before) = {
        let (store, _) = open(config(dir.path()));
        write(&store, 1, WriteOp::PutUser(visitor.clone())).result.unwrap();
        write(&store, 2, WriteOp::PutConversation(conversation(4, ConvStatus::Queued))).result.unwrap();
        write(&store, 3, WriteOp::AppendMessage(message(4, "v4", "c1", "hi"))).result.unwrap();
        let mark = ReadMark { conv: 4, user_id: "a1".into(), seq: 1, ts_ms: 9 };
        write(&store, 6, WriteOp::MarkRead(mark)).result.unwrap();
        let r = store.reader();
        (r.conversation(4).unwrap(), r.user(Role::Visitor, "v4").unwrap(), r.scan(0, 10).unwrap())
    };
    // Back to version 7: states, profiles and read marks as format 1 archives.
    {
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        states_to_format_1(&txn);
        txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 7).unwrap();
        txn.commit().unwrap();
    }
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!(r.conversation(4).unwrap(), conversation_before);
    assert_eq!(r.user(Role::Visitor, "v4").unwrap(), user_before);
    assert_eq!(r.scan(0, 10).unwrap(), scan_before);
    assert_eq!(r.events(0, 10, 10).unwrap()[1].change, Some(ConvChange::Opened));
    // A change is decided against the archived state it replaces, and the
    // times first stored are kept from the archives.
    let assigned = ConversationRecord { created_ms: 900, ..conversation(4, ConvStatus::Assigned) };
    let done = write(&store, 4, WriteOp::PutConversation(assigned)).result.unwrap();
    let event = r.events(done.offset, done.offset + 1, 1).unwrap().remove(0);
    assert_eq!(event.change, Some(ConvChange::Assigned));
    assert_eq!(r.conversation(4).unwrap().unwrap().created_ms, 10);
    let renamed = UserRecord { name: "Robert".into(), created_ms: 900, ..visitor };
    write(&store, 5, WriteOp::PutUser(renamed)).result.unwrap();
    let mark = ReadMark { conv: 4, user_id: "v4".into(), seq: 1, ts_ms: 10 };
    let done = write(&store, 7, WriteOp::MarkRead(mark.clone())).result.unwrap();
    assert_eq!(r.scan(done.offset, 1).unwrap()[0].record, LogRecord::Read(mark));
    let user = r.user(Role::Visitor, "v4").unwrap().unwrap();
    assert_eq!((user.name.as_str(), user.created_ms, user.visitor_key_hash), ("Robert", 7, Some([0xab; 32])));
    drop((r, store));
    // What was rewritten is in the compact formats now; the rest is not.
    let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
    let txn = db.begin_read().unwrap();
    let log = txn.open_table(tables::LOG).unwrap();
    let formats: Vec<u8> = log.iter().unwrap().map(|e| e.unwrap().1.value()[0]).collect();
    assert!(crate::compact::is_packed(formats[2]), "the message, packed: {formats:?}");
    assert_eq!(
        [&formats[..2], &formats[3..]].concat(),
        [1, 1, 1, 3, 4, 5],
        "user, conversation, message, read mark, then the new state, profile and read mark"
    );
    let conversations = txn.open_table(tables::CONVERSATIONS).unwrap();
    assert_eq!(conversations.get(4).unwrap().unwrap().value()[0], 3);
    let users = txn.open_table(tables::USERS).unwrap();
    assert_eq!(users.get(("visitor", "v4")).unwrap().unwrap().value()[0], 4);
}

/// Every table's entries, in key order (bytes shown as Debug), but for the
/// `meta` keys that say how the file was last opened and checkpointed.
fn dump(path: &std::path::Path) -> Vec<String> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        def: TableDefinition<K, V>,
        out: &mut Vec<String>,
    ) where
        for<'a> K::SelfType<'a>: std::fmt::Debug,
        for<'a> V::SelfType<'a>: std::fmt::Debug,
    {
        for entry in txn.open_table(def).unwrap().iter().unwrap() {
            let (k, v) = entry.unwrap();
            let line = format!("{def}: {:?} = {:?}", k.value(), v.value());
            if !line.starts_with("meta: \"open\"") && !line.starts_with("meta: \"wal_cycle\"") {
                out.push(line);
            }
        }
    }
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let mut out = Vec::new();
    table(&txn, tables::LOG, &mut out);
    table(&txn, tables::CONV_RUNS, &mut out);
    table(&txn, tables::CONVERSATIONS, &mut out);
    table(&txn, tables::USERS, &mut out);
    table(&txn, tables::USER_CONVERSATIONS, &mut out);
    table(&txn, tables::CONSUMER_OFFSETS, &mut out);
    table(&txn, tables::CONV_CHANGES, &mut out);
    table(&txn, tables::USER_CONTROLS, &mut out);
    table(&txn, tables::META, &mut out);
    out
}

/// Copies a store's files as they are (a crash, with the writer idle).
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    for f in ["kefu.redb", "kefu.wal", "kefu.1.wal"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// The write-ahead log: a store whose last commits are in the log alone (a
/// crash before the checkpoint) opens with every table as the commits
/// left it, whether the log is on or off in the config it is opened with.
#[test]
fn what_only_the_log_holds_is_replayed_at_open_whether_the_log_is_on_or_off() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { checkpoint_ms: 600_000, ..config(dir.path()) };
    {
        let (store, recovery) = open(cfg.clone());
        assert_eq!(recovery.wal_replayed, 0);
        // Every kind of write, so every kind of op is replayed.
        write(&store, 1, WriteOp::PutConversation(conversation(7, ConvStatus::Queued))).result.unwrap();
        write(&store, 2, WriteOp::PutConversation(conversation(7, ConvStatus::Assigned))).result.unwrap();
        for i in 0..20 {
            let op = WriteOp::AppendMessage(message(7, "v7", &format!("c{i}"), &format!("text {i}")));
            write(&store, 10 + i, op).result.unwrap();
        }
        let dup = write(&store, 40, WriteOp::AppendMessage(message(7, "v7", "c3", "text 3"))).result.unwrap();
        assert!(dup.duplicate);
        let user = UserRecord {
            id: "v7".into(),
            role: Role::Visitor,
            name: "Bob".into(),
            meta: vec![("plan".into(), "gold".into())],
            visitor_key_hash: None,
            created_ms: 1,
        };
        write(&store, 41, WriteOp::PutUser(user)).result.unwrap();
        write(&store, 42, WriteOp::MarkRead(ReadMark { conv: 7, user_id: "a1".into(), seq: 3, ts_ms: 5 }))
            .result
            .unwrap();
        let presence = PresenceRecord { agent_id: "a1".into(), status: "away".into(), ts_ms: 6 };
        write(&store, 43, WriteOp::LogPresence(presence)).result.unwrap();
        write(&store, 44, WriteOp::CommitOffset { consumer: "crm".into(), offset: 5 }).result.unwrap();
        let control =
            UserControlRecord { synced_name: Some("Bobby".into()), synced_meta: vec![], block: None };
        write(&store, 45, WriteOp::PutControl { role: Role::Visitor, id: "v7".into(), control })
            .result
            .unwrap();
        assert_eq!(store.stats().durable_commits, 0, "no checkpoint yet: the log alone holds these");
        // The crash: the files as they are now, the writer idle.
        copy_store(dir.path(), crashed.path());
    }
    let expected = dump(&cfg.db_path());
    assert!(expected.iter().any(|l| l.starts_with("user_controls")), "{expected:#?}");
    for wal in [true, false] {
        let again = tempfile::tempdir().unwrap();
        copy_store(crashed.path(), again.path());
        let cfg = StoreConfig { wal, ..config(again.path()) };
        {
            let (store, recovery) = open(cfg.clone());
            assert!(recovery.unclean_shutdown, "wal={wal}");
            assert!(recovery.wal_replayed >= 10, "wal={wal}: {} records replayed", recovery.wal_replayed);
            assert_eq!(store.reader().last_seq(7).unwrap(), 20, "wal={wal}");
        }
        // The cycle counter aside: this close wrote the replayed tails to
        // the index in a commit of its own, and checkpointed it.
        let cycle_aside = |d: Vec<String>| -> Vec<String> {
            d.into_iter().filter(|l| !l.contains("\"wal_cycle\"")).collect()
        };
        assert_eq!(cycle_aside(dump(&cfg.db_path())), cycle_aside(expected.clone()), "wal={wal}");
        // Replayed once: the next open finds nothing left to replay.
        let (_store, recovery) = open(cfg);
        assert_eq!(recovery.wal_replayed, 0, "wal={wal}");
    }
}

/// A build with one log file kept every cycle in `kefu.wal`, odd ones
/// too: a store it left after a crash, with its last acked writes in an
/// odd cycle there, loses none of them when this build opens it.
#[test]
fn an_odd_cycle_a_one_file_build_left_in_the_first_file_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { checkpoint_ms: 600_000, ..config(dir.path()) };
    {
        let (store, _) = open(cfg.clone());
        for i in 0..3 {
            write(&store, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).result.unwrap();
        }
        // The crash: the database as it is, and cycle 1 (odd) where a
        // one-file build had it.
        std::fs::copy(cfg.db_path(), crashed.path().join("kefu.redb")).unwrap();
        std::fs::copy(cfg.wal_odd_path(), crashed.path().join("kefu.wal")).unwrap();
    }
    assert!(!crashed.path().join("kefu.1.wal").exists());
    let (store, recovery) = open(StoreConfig { checkpoint_ms: 600_000, ..config(crashed.path()) });
    assert_eq!(recovery.wal_replayed, 3);
    assert_eq!(store.reader().last_seq(1).unwrap(), 3);
}

#[test]
fn a_log_from_another_store_replays_nothing() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let cfg = |dir: &std::path::Path| StoreConfig { checkpoint_ms: 600_000, ..config(dir) };
    // Both stores made, neither has written: both expect the same cycle
    // next, so only the store's own number in the checksum tells a's
    // records from b's.
    drop(open(cfg(b.path())));
    {
        let (store, _) = open(cfg(a.path()));
        write(&store, 1, WriteOp::AppendMessage(message(1, "v", "c", "from a"))).result.unwrap();
        for f in ["kefu.wal", "kefu.1.wal"] {
            std::fs::copy(a.path().join(f), b.path().join(f)).unwrap();
        }
    }
    let (store, recovery) = open(cfg(b.path()));
    assert_eq!((recovery.wal_replayed, recovery.next_offset), (0, 0));
    assert_eq!(store.reader().last_seq(1).unwrap(), 0);
}

/// A second process (here: a second open) on a store in use is refused by
/// the database's lock before it touches the write-ahead log, whatever
/// size of log its config asks for.
#[test]
fn a_second_open_of_a_store_in_use_is_refused_and_leaves_the_log_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { checkpoint_ms: 600_000, ..config(dir.path()) };
    let (store, _) = open(cfg.clone());
    write(&store, 1, WriteOp::AppendMessage(message(1, "v", "a", "before"))).result.unwrap();
    let logs = || [cfg.wal_path(), cfg.wal_odd_path()].map(|p| std::fs::read(p).unwrap());
    let before = logs();
    let bigger = StoreConfig { wal_bytes: cfg.wal_bytes * 2, ..cfg.clone() };
    assert!(Store::open(bigger, Arc::new(|_| {})).is_err(), "the store is in use");
    assert!(logs() == before, "the refused open wrote nothing to the log");
    write(&store, 2, WriteOp::AppendMessage(message(1, "v", "b", "after"))).result.unwrap();
    drop(store);
    let (store, _) = open(cfg);
    assert_eq!(store.reader().last_seq(1).unwrap(), 2);
}

/// The seqs `after(conv, 0)` reads back.
fn seqs_of(store: &Store, conv: u64) -> Vec<u64> {
    store.reader().after(conv, 0, 10_000).unwrap().iter().map(|m| m.record.seq).collect()
}

/// What the conversation index itself holds for `conv` (not the tails):
/// read from a closed store's file.
fn table_seqs(path: &std::path::Path, conv: u64) -> Vec<u64> {
    table_rows(path, conv).into_iter().flatten().collect()
}

/// The seqs of each of `conv`'s rows in the conversation index, read from
/// a closed store's file.
fn table_rows(path: &std::path::Path, conv: u64) -> Vec<Vec<u64>> {
    use redb::ReadableDatabase;
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let index = txn.open_table(tables::CONV_RUNS).unwrap();
    let rows = index.range((conv, 0)..=(conv, u64::MAX)).unwrap().map(|row| {
        let (k, v) = row.unwrap();
        let mut run = Vec::new();
        crate::runs::decode(conv, k.value().1, v.value(), &mut run).unwrap();
        run.into_iter().map(|(seq, _, _)| seq).collect()
    });
    rows.collect()
}

/// Index entries wait in memory (`tail.rs`) and go to the table a
/// batch at a time; every read sees them meanwhile, a crash loses none
/// (open rebuilds them from the log), and a clean close writes them all.
#[test]
fn index_entries_wait_in_their_tail_and_a_crash_rebuilds_them() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let crashed_again = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { checkpoint_ms: 600_000, index_batch: 4, index_lag: 1_000, ..config(dir.path()) };
    let append = |store: &Store, token: u64, conv: u64, cid: &str| {
        write(store, token, WriteOp::AppendMessage(message(conv, &format!("v{conv}"), cid, "hi")))
            .result
            .unwrap()
    };
    {
        let (store, _) = open(cfg.clone());
        for i in 0..6 {
            append(&store, i, 1, &format!("a{i}"));
        }
        for i in 0..3 {
            append(&store, 10 + i, 2, &format!("b{i}"));
        }
        // Conversation 1's first four went to the table together; its
        // last two and conversation 2's three wait.
        assert_eq!(store.stats().index_tail_entries, 5);
        let r = store.reader();
        assert_eq!((r.last_seq(1).unwrap(), r.last_seq(2).unwrap()), (6, 3));
        assert_eq!(seqs_of(&store, 1), [1, 2, 3, 4, 5, 6]);
        let newest: Vec<u64> = r.history(1, None, 3).unwrap().iter().map(|m| m.record.seq).collect();
        assert_eq!(newest, [4, 5, 6], "newest first across the table and the tail");
        let page: Vec<u64> = r.history(1, Some(6), 2).unwrap().iter().map(|m| m.record.seq).collect();
        assert_eq!(page, [4, 5]);
        assert_eq!(r.message(2, 3).unwrap().unwrap().record.cid, "b2");
        assert_eq!(r.dedupe(Role::Visitor, "v1", 1, "a5").unwrap().unwrap().seq, 6);
        assert_eq!(r.dedupe(Role::Visitor, "v2", 2, "b0").unwrap().unwrap().seq, 1);
        assert_eq!(r.conversation(2).unwrap(), None, "messages alone make no conversation record");
        // A conversation's last seq, read alone or among many, is its tail's.
        write(&store, 30, WriteOp::PutConversation(conversation(1, ConvStatus::Queued))).result.unwrap();
        assert_eq!(r.conversation(1).unwrap().unwrap().last_seq, 6);
        assert_eq!(r.conversations_of("v1", 5).unwrap()[0].last_seq, 6);
        let all = ConversationFilter::default();
        assert_eq!(r.list_conversations(&all, None, 10, 100).unwrap().conversations[0].last_seq, 6);
        assert_eq!(r.open_conversations().unwrap()[0].last_seq, 6);
        copy_store(dir.path(), crashed.path());
    }
    assert_eq!(table_seqs(&cfg.db_path(), 1), [1, 2, 3, 4, 5, 6], "a clean close writes every tail");
    assert_eq!(table_seqs(&cfg.db_path(), 2), [1, 2, 3]);
    assert_eq!(table_rows(&cfg.db_path(), 1), [vec![1, 2, 3, 4], vec![5, 6]], "a row per write");
    let cfg = StoreConfig { dir: crashed.path().to_path_buf(), ..cfg };
    {
        let (store, recovery) = open(cfg.clone());
        assert!(recovery.unclean_shutdown);
        assert_eq!(store.stats().index_tail_entries, 5, "rebuilt from the log");
        assert_eq!(recovery.open_conversations[0].last_seq, 6);
        assert_eq!(seqs_of(&store, 1), [1, 2, 3, 4, 5, 6]);
        assert_eq!(seqs_of(&store, 2), [1, 2, 3]);
        let again = write(&store, 20, WriteOp::AppendMessage(message(1, "v1", "a4", "hi"))).result.unwrap();
        assert!(again.duplicate && again.seq == 5, "a resent cid from the tail: {again:?}");
        assert_eq!(append(&store, 21, 2, "b3").seq, 4, "the next seq follows the tail");
        assert_eq!(store.stats().index_tail_entries, 2, "conversation 2 reached the batch; 1's two wait");
        assert_eq!(seqs_of(&store, 2), [1, 2, 3, 4]);
        copy_store(crashed.path(), crashed_again.path());
    }
    {
        // Conversation 2's four are in the table, and past `index_from`
        // (conversation 1's tail): the rebuilt tail holds them again, and
        // its next write adds only what the table lacks.
        let cfg = StoreConfig { dir: crashed_again.path().to_path_buf(), ..cfg.clone() };
        let (store, _) = open(cfg.clone());
        assert_eq!(store.stats().index_tail_entries, 6);
        assert_eq!(seqs_of(&store, 2), [1, 2, 3, 4]);
        assert_eq!(append(&store, 22, 2, "b4").seq, 5);
        assert_eq!(seqs_of(&store, 2), [1, 2, 3, 4, 5]);
        drop(store);
        assert_eq!(table_rows(&cfg.db_path(), 2), [vec![1, 2, 3, 4], vec![5]], "rows never overlap");
    }
    let (store, recovery) = open(cfg.clone());
    assert!(!recovery.unclean_shutdown);
    assert_eq!(store.stats().index_tail_entries, 0);
    assert_eq!(seqs_of(&store, 1), [1, 2, 3, 4, 5, 6]);
}

/// A tail whose oldest entry falls `index_lag` records behind the log's
/// end goes to the table, and so does a closed conversation's: the tails
/// stay bounded however few messages a conversation gets.
#[test]
fn a_tail_goes_to_the_table_when_it_lags_or_its_conversation_closes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { index_batch: 1_000, index_lag: 10, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let append = |token: u64, conv: u64| {
        let op = WriteOp::AppendMessage(message(conv, "v", &format!("c{token}"), "hi"));
        write(&store, token, op).result.unwrap();
    };
    append(1, 1);
    append(2, 2);
    assert_eq!(store.stats().index_tail_entries, 2);
    for token in 3..=11 {
        append(token, 3);
    }
    // Conversation 1's entry (offset 0) is 11 records behind the end.
    assert_eq!(store.stats().index_tail_entries, 10);
    append(12, 3);
    assert_eq!(store.stats().index_tail_entries, 10, "conversation 2's went; 3's ten wait");
    append(13, 4);
    assert_eq!(store.stats().index_tail_entries, 1, "conversation 3's oldest fell behind: all ten went");
    write(&store, 20, WriteOp::PutConversation(conversation(4, ConvStatus::Closed))).result.unwrap();
    assert_eq!(store.stats().index_tail_entries, 0, "a closed conversation's tail is written");
    assert_eq!(seqs_of(&store, 3), (1..=10).collect::<Vec<_>>());
    assert_eq!((seqs_of(&store, 1), seqs_of(&store, 4)), (vec![1], vec![1]));
}

/// While tails go to the table under a reader's feet, no read sees a gap:
/// each read of a conversation is its seqs from 1 up to some last one.
#[test]
fn reads_never_see_a_gap_while_tails_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { index_batch: 3, index_lag: 40, batch_window_us: 0, ..config(dir.path()) };
    let (store, _) = open(cfg);
    let store = Arc::new(store);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut last = [0u64; 8];
            while !done.load(Ordering::SeqCst) {
                for conv in 0..8u64 {
                    let seqs = seqs_of(&store, conv);
                    assert!(seqs.iter().copied().eq(1..=seqs.len() as u64), "conversation {conv}: {seqs:?}");
                    let n = seqs.len() as u64;
                    assert!(
                        n >= last[conv as usize],
                        "conversation {conv} went back from {} to {n}",
                        last[conv as usize]
                    );
                    last[conv as usize] = n;
                    let newest = store.reader().last_seq(conv).unwrap();
                    assert!(newest >= n, "last_seq {newest} below what was read, {n}");
                    reads += 1;
                }
            }
            reads
        })
    };
    let writer = store.writer();
    let completions = store.completions(0);
    for i in 0..4_000u64 {
        let op = WriteOp::AppendMessage(message(i % 8, "v", &format!("c{i}"), "hi"));
        writer.submit(0, i, op).unwrap();
        if i % 16 == 15 {
            for c in crate::testkit::wait_for(&completions, 16) {
                c.result.unwrap();
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    let reads = reader.join().unwrap();
    assert!(reads > 8, "the reader read while the writer wrote ({reads})");
    for conv in 0..8u64 {
        assert_eq!(seqs_of(&store, conv), (1..=500).collect::<Vec<_>>());
    }
}

/// Which messages of the log at `dir` name their sender in full and which
/// point back for them (`senders.rs`), by cid, in log order.
fn senders_named(dir: &std::path::Path) -> Vec<(String, bool)> {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    let db = redb::Database::create(config(dir).db_path()).unwrap();
    let txn = db.begin_read().unwrap();
    let log = txn.open_table(tables::LOG).unwrap();
    let mut out = Vec::new();
    for e in log.iter().unwrap() {
        let (_, v) = e.unwrap();
        if let crate::LogView::Message(m) = crate::view_log_record(v.value()).unwrap() {
            out.push((m.cid.as_str().to_owned(), m.sender_back.is_none()));
        }
    }
    out
}

/// A writer whose sender memory keeps filling keeps pointing right: with
/// room for 4 senders, a reach of 20 records, two senders writing every
/// other message and 20 more taking turns between them, every message
/// reads back under its own sender, and some still point.
#[test]
fn a_full_sender_memory_still_points_each_message_at_its_own_sender() {
    let dir = tempfile::tempdir().unwrap();
    let who = |n: u64| if n.is_multiple_of(2) { n / 2 % 2 } else { 2 + n / 2 % 20 };
    {
        let (store, _) = open(StoreConfig { sender_refs: 4, sender_ref_reach: 20, ..config(dir.path()) });
        for n in 0..90 {
            let s = who(n);
            let m = message(s + 1, &format!("s{s}"), &format!("m{n}"), "hi");
            write(&store, n, WriteOp::AppendMessage(m)).result.unwrap();
        }
        let read: Vec<(String, String, String)> = store
            .reader()
            .scan(0, 1000)
            .unwrap()
            .into_iter()
            .filter_map(|l| match l.record {
                LogRecord::Message(m) => Some((m.cid, m.from.id, m.from.name)),
                _ => None,
            })
            .collect();
        let expected: Vec<(String, String, String)> = (0..90)
            .map(|n| (format!("m{n}"), format!("s{}", who(n)), format!("s{}'s name", who(n))))
            .collect();
        assert_eq!(read, expected);
    }
    let named = senders_named(dir.path());
    let pointing = named.iter().filter(|(_, in_full)| !in_full).count();
    assert!(pointing > 0 && pointing < named.len(), "{pointing} of {} point back", named.len());
}

/// A sender is named in full in their first message and pointed at after:
/// every read hands out the whole sender, a resend of a message that
/// points is still a duplicate (after a restart too), a new name is named
/// in full, and a new writer names each sender in full once more.
/// `storage.sender_refs = 0` names every sender.
#[test]
fn a_sender_is_named_in_full_once_then_pointed_at() {
    let dir = tempfile::tempdir().unwrap();
    let send = |store: &Store, token: u64, m: kefu_proto::client::Msg| {
        write(store, token, WriteOp::AppendMessage(m)).result.unwrap()
    };
    let agent = |conv: u64, cid: &str| {
        let mut m = message(conv, "ag", cid, "hi");
        m.from.role = Role::Agent;
        m
    };
    let renamed = |conv: u64, cid: &str| {
        let mut m = message(conv, "v", cid, "hi");
        m.from.name = "V. Two".into();
        m
    };
    let authors = |records: Vec<crate::MessageRecord>| -> Vec<(String, Role, String, String)> {
        records.into_iter().map(|m| (m.cid, m.from.role, m.from.id, m.from.name)).collect()
    };
    let expected = |cids: &[&str]| -> Vec<(String, Role, String, String)> {
        cids.iter()
            .map(|&cid| match cid {
                "a3" => (cid.into(), Role::Agent, "ag".into(), "ag's name".into()),
                "c1" => (cid.into(), Role::Visitor, "v".into(), "V. Two".into()),
                _ => (cid.into(), Role::Visitor, "v".into(), "v's name".into()),
            })
            .collect()
    };
    {
        let (store, _) = open(config(dir.path()));
        send(&store, 1, message(1, "v", "a1", "hi"));
        send(&store, 2, message(1, "v", "a2", "hi"));
        send(&store, 3, agent(1, "a3"));
        send(&store, 4, message(1, "v", "a4", "hi"));
        send(&store, 5, message(2, "v", "b1", "hi"));
        send(&store, 6, renamed(1, "c1"));
        let again = send(&store, 7, message(1, "v", "a2", "hi"));
        assert!(again.duplicate && again.seq == 2, "{again:?}");
        let r = store.reader();
        let history = r.history(1, None, 10).unwrap().into_iter().map(|l| l.record).collect();
        assert_eq!(authors(history), expected(&["a1", "a2", "a3", "a4", "c1"]));
        let scanned = r.scan(0, 100).unwrap().into_iter().filter_map(|l| match l.record {
            LogRecord::Message(m) => Some(m),
            _ => None,
        });
        assert_eq!(authors(scanned.collect()), expected(&["a1", "a2", "a3", "a4", "b1", "c1"]));
        let events = r.events(0, store.log_end(), 100).unwrap().into_iter().filter_map(|e| match e.record {
            LogRecord::Message(m) => Some(m),
            _ => None,
        });
        assert_eq!(authors(events.collect()), expected(&["a1", "a2", "a3", "a4", "b1", "c1"]));
        assert_eq!(r.message(2, 1).unwrap().unwrap().record.from.name, "v's name");
    }
    let named = [("a1", true), ("a2", false), ("a3", true), ("a4", false), ("b1", false), ("c1", true)];
    let named: Vec<(String, bool)> = named.iter().map(|&(c, n)| (c.to_string(), n)).collect();
    assert_eq!(senders_named(dir.path()), named);
    {
        let (store, _) = open(config(dir.path()));
        let again = send(&store, 8, message(1, "v", "a4", "hi"));
        assert!(again.duplicate && again.seq == 4, "a resend of a message that points: {again:?}");
        send(&store, 9, message(1, "v", "a5", "hi"));
        send(&store, 10, message(1, "v", "a6", "hi"));
        let history = store.reader().history(1, None, 10).unwrap().into_iter().map(|l| l.record).collect();
        assert_eq!(authors(history), expected(&["a1", "a2", "a3", "a4", "c1", "a5", "a6"]));
    }
    let tail: Vec<(String, bool)> = senders_named(dir.path()).split_off(named.len());
    assert_eq!(
        tail,
        [("a5".to_string(), true), ("a6".to_string(), false)],
        "a new writer names them once more"
    );

    let off = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(StoreConfig { sender_refs: 0, ..config(off.path()) });
        for (i, cid) in ["x1", "x2", "x3"].into_iter().enumerate() {
            send(&store, i as u64, message(1, "v", cid, "hi"));
        }
    }
    assert!(senders_named(off.path()).iter().all(|(_, in_full)| *in_full));
}

/// A pointer for a sender that leads before the log's start, to a record
/// that is not there, is not a message, is a message of another role or
/// points back itself, reads as damage at that message, not as someone
/// else's name.
#[test]
fn a_sender_pointer_to_the_wrong_record_reads_as_damage() {
    use redb::ReadableTable as _;
    // The log: a1 (v, in full) at 0, an agent's message in another
    // conversation at 1, a3 (v, pointing at 0) at 2, a4 (v, pointing at 0)
    // at 3. Each case points one of a3, a4 elsewhere, and may change
    // record 1 first.
    enum One {
        Keep,
        Remove,
        Conversation,
    }
    let cases = [
        (2, 5, One::Keep, "before the log's start"),
        (2, 1, One::Keep, "not a message naming a sender of its role"),
        (2, 1, One::Remove, "which is not in the log"),
        (2, 1, One::Conversation, "not a message naming a sender"),
        (3, 1, One::Keep, "not a message naming a sender"),
    ];
    for (at, back, one, what) in cases {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(config(dir.path()));
            write(&store, 1, WriteOp::AppendMessage(message(1, "v", "a1", "hi"))).result.unwrap();
            let mut m = message(2, "ag", "b1", "hi");
            m.from.role = Role::Agent;
            write(&store, 2, WriteOp::AppendMessage(m)).result.unwrap();
            write(&store, 3, WriteOp::AppendMessage(message(1, "v", "a3", "hi"))).result.unwrap();
            write(&store, 4, WriteOp::AppendMessage(message(1, "v", "a4", "hi"))).result.unwrap();
        }
        {
            let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(tables::LOG).unwrap();
                match one {
                    One::Keep => {}
                    One::Remove => {
                        log.remove(1).unwrap();
                    }
                    One::Conversation => {
                        let state = LogRecord::Conversation(conversation(2, ConvStatus::Queued));
                        log.insert(1, crate::encode_log_record(&state).unwrap().as_slice()).unwrap();
                    }
                }
                let value = log.get(at).unwrap().unwrap().value().to_vec();
                let crate::LogView::Message(m) = crate::view_log_record(&value).unwrap() else { panic!() };
                assert_eq!(m.sender_back, Some(at), "a3 and a4 point at a1");
                let mut damaged = Vec::new();
                crate::compact::MessageView { sender_back: Some(back), ..m }.encode_into(&mut damaged);
                log.insert(at, damaged.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let (store, _) = open(config(dir.path()));
        match store.reader().history(1, None, 10) {
            Err(StorageError::Corrupt { table: "log", key, message }) => {
                assert_eq!(key, at.to_string());
                assert!(message.contains(what), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A read of more senders than its memo holds (`record::SenderMemo`, 8)
/// still gives every message its own: twelve senders, each pointed at
/// from a message after the other eleven's.
#[test]
fn a_page_with_more_senders_than_the_memo_holds_reads_each_right() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(config(dir.path()));
    let senders: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    let mut token = 0;
    for round in 0..3 {
        for s in &senders {
            token += 1;
            let cid = format!("{s}-{round}");
            write(&store, token, WriteOp::AppendMessage(message(1, s, &cid, "hi"))).result.unwrap();
        }
    }
    let history: Vec<crate::MessageRecord> =
        store.reader().history(1, None, 100).unwrap().into_iter().map(|l| l.record).collect();
    let scanned: Vec<crate::MessageRecord> = (store.reader().scan(0, 100).unwrap().into_iter())
        .filter_map(|l| match l.record {
            LogRecord::Message(m) => Some(m),
            _ => None,
        })
        .collect();
    for read in [history, scanned] {
        assert_eq!(read.len(), 36);
        for m in &read {
            let (sender, _) = m.cid.split_once('-').unwrap();
            assert_eq!((m.from.id.as_str(), m.from.name.clone()), (sender, format!("{sender}'s name")));
        }
    }
}

/// A version 13 store, its index rows with 32-bit slots, opens as version
/// 14: its rows read with their slots cut to 16 bits, so a resend of a
/// message stored before is still its duplicate, in the writer (from the
/// index, after the restart) and to a reader; new rows are written with
/// 16-bit slots.
#[test]
fn a_version_13_store_with_32_bit_slots_still_dedupes() {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    let dir = tempfile::tempdir().unwrap();
    let cfg = || StoreConfig { index_batch: 2, ..config(dir.path()) };
    {
        let (store, _) = open(cfg());
        for i in 1..=6u64 {
            write(&store, i, WriteOp::AppendMessage(message(1, "v", &format!("m{i}"), "hi"))).result.unwrap();
        }
    }
    {
        // Back to version 13: every row in format 6, each slot given 16
        // high bits as a 32-bit slot had.
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut runs = txn.open_table(tables::CONV_RUNS).unwrap();
            let rows: Vec<((u64, u64), Vec<u8>)> = runs
                .iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    let (conv, last) = k.value();
                    let mut run = Vec::new();
                    crate::runs::decode(conv, last, v.value(), &mut run).unwrap();
                    let run: Vec<_> = run
                        .into_iter()
                        .map(|(seq, offset, slot)| (seq, offset, slot | 0x5eed << 16))
                        .collect();
                    let mut old = Vec::new();
                    crate::runs::encode_as(crate::runs::FORMAT_RUN_32, &run, &mut old);
                    ((conv, last), old)
                })
                .collect();
            assert!(!rows.is_empty(), "the closed store wrote its tails");
            for (key, value) in rows {
                runs.insert(key, value.as_slice()).unwrap();
            }
            txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 13).unwrap();
        }
        txn.commit().unwrap();
    }
    let (store, _) = open(cfg());
    let r = store.reader();
    assert_eq!(r.dedupe(Role::Visitor, "v", 1, "m5").unwrap().map(|h| h.seq), Some(5));
    let dup = write(&store, 10, WriteOp::AppendMessage(message(1, "v", "m6", "again"))).result.unwrap();
    assert!(dup.duplicate && dup.seq == 6, "{dup:?}");
    let new = write(&store, 11, WriteOp::AppendMessage(message(1, "v", "m7", "hi"))).result.unwrap();
    assert!(!new.duplicate && new.seq == 7, "{new:?}");
    assert_eq!(r.history(1, None, 10).unwrap().len(), 7);
    drop((r, store));
    let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
    let txn = db.begin_read().unwrap();
    let formats: Vec<u8> =
        txn.open_table(tables::CONV_RUNS).unwrap().iter().unwrap().map(|e| e.unwrap().1.value()[0]).collect();
    assert_eq!(formats.first(), Some(&crate::runs::FORMAT_RUN_32), "old rows stay as they are");
    assert_eq!(formats.last(), Some(&crate::runs::FORMAT_RUN), "the new row has 16-bit slots: {formats:?}");
}

/// A version 15 store, its log keyed by `u64` in `log` and its messages
/// packed with their last string's length, opens as version 16 with every
/// record moved to `log40` at its offset and its messages repacked:
/// history (whose senders point back at earlier records) and dedupe read
/// as before, and appends go on at the next offset.
#[test]
fn a_version_15_store_moves_its_log_to_five_byte_keys() {
    use redb::{ReadableDatabase as _, ReadableTableMetadata as _};
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let (store, _) = open(config(dir.path()));
        for i in 1..=5u64 {
            write(&store, i, WriteOp::AppendMessage(message(1 + i % 2, "v", &format!("m{i}"), "hi")))
                .result
                .unwrap();
        }
        let r = store.reader();
        (r.history(1, None, 10).unwrap(), r.history(2, None, 10).unwrap())
    };
    let records = {
        // Back to version 15: the same records under `u64` keys in `log`.
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        let records = log_to_v15(&txn, crate::compact::as_v15);
        let repacked = records.iter().filter(|(_, v)| crate::compact::as_v15(v) != *v).count();
        assert_eq!(repacked, 5, "every message has its text's length back");
        txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, 15).unwrap();
        txn.commit().unwrap();
        records
    };
    assert!(records.len() >= 5, "{} records", records.len());
    let (store, _) = open(config(dir.path()));
    let r = store.reader();
    assert_eq!((r.history(1, None, 10).unwrap(), r.history(2, None, 10).unwrap()), before);
    assert_eq!(r.dedupe(Role::Visitor, "v", 2, "m3").unwrap().map(|h| h.seq), Some(2));
    let dup = write(&store, 10, WriteOp::AppendMessage(message(2, "v", "m5", "again"))).result.unwrap();
    assert!(dup.duplicate && dup.seq == 3, "{dup:?}");
    let new = write(&store, 11, WriteOp::AppendMessage(message(1, "v", "m6", "hi"))).result.unwrap();
    assert!(!new.duplicate && new.seq == 3, "{new:?}");
    assert_eq!(new.offset, records.len() as u64, "the next offset after the moved records");
    drop((r, store));
    let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
    assert_eq!(schema_version(&db), tables::SCHEMA_VERSION);
    let txn = db.begin_read().unwrap();
    assert!(txn.open_table(tables::LOG_V15).is_err(), "the old log is deleted");
    let log = txn.open_table(tables::LOG).unwrap();
    assert_eq!(log.len().unwrap(), records.len() as u64 + 1);
    for (k, v) in &records {
        assert_eq!(
            log.get(*k).unwrap().unwrap().value(),
            v.as_slice(),
            "record {k} moved, as this version writes it"
        );
    }
}

/// A version 11 store, every sender named in full, opens as version 12,
/// reads as before, and its next messages point back; a pointer never
/// reaches further back than `storage.sender_ref_reach`.
#[test]
fn a_version_11_store_opens_and_its_next_messages_point_back_within_reach() {
    use redb::ReadableDatabase as _;
    let dir = tempfile::tempdir().unwrap();
    let send = |store: &Store, token: u64, cid: &str| {
        write(store, token, WriteOp::AppendMessage(message(1, "v", cid, "hi"))).result.unwrap();
    };
    {
        let (store, _) = open(StoreConfig { sender_refs: 0, ..config(dir.path()) });
        send(&store, 1, "a1");
        send(&store, 2, "a2");
    }
    let schema = |set: Option<u64>| {
        let db = redb::Database::create(config(dir.path()).db_path()).unwrap();
        if let Some(v) = set {
            let txn = db.begin_write().unwrap();
            txn.open_table(tables::META).unwrap().insert(tables::META_SCHEMA, v).unwrap();
            txn.commit().unwrap();
        }
        let txn = db.begin_read().unwrap();
        txn.open_table(tables::META).unwrap().get(tables::META_SCHEMA).unwrap().unwrap().value()
    };
    assert_eq!(schema(Some(11)), 11);
    {
        let (store, _) = open(StoreConfig { sender_ref_reach: 2, ..config(dir.path()) });
        for (i, cid) in ["a3", "a4", "a5", "a6", "a7"].into_iter().enumerate() {
            send(&store, 10 + i as u64, cid);
        }
        let history = store.reader().history(1, None, 10).unwrap();
        let read: Vec<(&str, &str, &str)> = history
            .iter()
            .map(|m| (m.record.cid.as_str(), m.record.from.id.as_str(), m.record.from.name.as_str()))
            .collect();
        let expected: Vec<(&str, &str, &str)> =
            ["a1", "a2", "a3", "a4", "a5", "a6", "a7"].into_iter().map(|c| (c, "v", "v's name")).collect();
        assert_eq!(read, expected);
    }
    assert_eq!(schema(None), tables::SCHEMA_VERSION);
    // a3 in full (a new writer), a4 and a5 point 1 and 2 back, a6 would
    // point 3 back, past the reach, so it is in full again, and a7 points.
    let named: Vec<(String, bool)> =
        [("a1", true), ("a2", true), ("a3", true), ("a4", false), ("a5", false), ("a6", true), ("a7", false)]
            .into_iter()
            .map(|(c, n)| (c.to_string(), n))
            .collect();
    assert_eq!(senders_named(dir.path()), named);
}
