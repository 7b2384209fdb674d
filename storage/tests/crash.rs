//! Crash test: a child process appends as fast as it can and prints every
//! acknowledgement; the parent kills it with SIGKILL at a random moment,
//! reopens the store and checks that every acknowledged write is there,
//! intact, once, and that every conversation is gap-free. Repeated on the
//! same store, so recovery from a crash is itself crashed into.
//!
//! The child is this test binary again, running the ignored test
//! `child_writer` with `KEFU_CRASH_DIR` set.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kefu_proto::ConvId;
use kefu_proto::client::{Msg, Sender};
use kefu_proto::ids::Role;
use kefu_storage::{LogRecord, Store, StoreConfig, WriteOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: usize = 4;
const CONVS_PER_THREAD: u64 = 8;
const IN_FLIGHT: usize = 256;

fn config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        sources: THREADS,
        cache_bytes: 32 << 20,
        // Every run resends every cid the runs before it wrote (thousands
        // per conversation), so the cid window must hold them all: what is
        // tested is dedupe across crashes, not where the window ends
        // (store_tests: `a_cid_older_than_the_window_is_a_new_message`).
        dedupe_window: 1 << 20,
        // A second between checkpoints (the default is 100 ms): most kills
        // then leave many commits in the write-ahead log alone, and the
        // reopen must replay them.
        checkpoint_ms: 1_000,
        ..StoreConfig::default()
    }
}

/// Conversations `100 t + 1 ..= 100 t + 8` belong to thread `t`. Even ones
/// let the writer assign seqs and reuse their cids on every run (so a new
/// run starts by resending what the last one wrote: dedupe across crashes);
/// odd ones carry explicit seqs and fresh cids.
fn conv_of(t: usize, n: u64) -> u64 {
    100 * t as u64 + 1 + n % CONVS_PER_THREAD
}

#[test]
#[ignore = "the child process of acknowledged_writes_survive_kill_9, which runs it"]
fn child_writer() {
    let Some(dir) = std::env::var_os("KEFU_CRASH_DIR") else { return };
    let run: u64 = std::env::var("KEFU_CRASH_RUN").unwrap().parse().unwrap();
    let (store, _) = Store::open(config(dir.as_ref()), Arc::new(|_| {})).unwrap();
    let out = Mutex::new(std::io::stdout());
    let reader = store.reader();
    let stop_at = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (writer, completions, out, reader) = (store.writer(), store.completions(t), &out, &reader);
            s.spawn(move || {
                let mut next_seq: HashMap<u64, u64> = HashMap::new();
                for i in 0..CONVS_PER_THREAD {
                    let conv = conv_of(t, i);
                    if conv % 2 == 1 {
                        next_seq.insert(conv, reader.last_seq(conv).unwrap() + 1);
                    }
                }
                let mut n = 0u64;
                let mut lines = String::new();
                while Instant::now() < stop_at {
                    while writer.in_flight(t) < IN_FLIGHT {
                        let conv = conv_of(t, n);
                        let (seq, cid) = match next_seq.get_mut(&conv) {
                            Some(s) => {
                                *s += 1;
                                (*s - 1, format!("r{run}-{conv}-{n}"))
                            }
                            None => (0, format!("c{conv}-{n}")),
                        };
                        let text = format!("{cid} {}", "lorem ipsum dolor sit amet ".repeat(6));
                        let m = Msg {
                            conv: ConvId(conv),
                            seq,
                            cid,
                            from: Sender { role: Role::Visitor, id: format!("v{conv}"), name: "Vee".into() },
                            ts: 1_700_000_000_000 + n,
                            text: Some(text),
                            attachment: None,
                        };
                        writer.submit(t, n, WriteOp::AppendMessage(m)).unwrap();
                        n += 1;
                    }
                    lines.clear();
                    while let Some(c) = completions.pop() {
                        let ok = c.result.expect("append failed");
                        let WriteOp::AppendMessage(m) = c.op else { unreachable!() };
                        lines.push_str(&format!(
                            "ACK {} {} {} {} {}\n",
                            m.conv.0, ok.seq, ok.offset, ok.duplicate as u8, m.cid
                        ));
                    }
                    if lines.is_empty() {
                        std::thread::sleep(Duration::from_micros(50));
                    } else {
                        // Printed (and so "acknowledged" to the parent) only
                        // once the completion was popped.
                        let mut o = out.lock().unwrap();
                        o.write_all(lines.as_bytes()).unwrap();
                        o.flush().unwrap();
                    }
                }
            });
        }
    });
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    conv: u64,
    seq: u64,
    offset: u64,
    duplicate: bool,
    cid: String,
}

fn parse(line: &str) -> Option<Ack> {
    let mut f = line.strip_prefix("ACK ")?.split(' ');
    Some(Ack {
        conv: f.next()?.parse().ok()?,
        seq: f.next()?.parse().ok()?,
        offset: f.next()?.parse().ok()?,
        duplicate: f.next()? == "1",
        cid: f.next()?.to_string(),
    })
}

/// Runs one child until a random moment after it has acked `warm_up`
/// writes, kills it with SIGKILL, and returns every ack it printed.
fn run_and_kill(dir: &std::path::Path, run: u64, rng: &mut StdRng) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env("KEFU_CRASH_DIR", dir)
        .env("KEFU_CRASH_RUN", run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let lines = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(ack) = parse(&line)
                && tx.send(ack).is_err()
            {
                break;
            }
        }
    });
    let warm_up = rng.random_range(200..20_000);
    let mut acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks.len() < warm_up {
        assert!(Instant::now() < deadline, "run {run}: only {} acks in 30 s", acks.len());
        if let Ok(a) = rx.recv_timeout(Duration::from_millis(100)) {
            acks.push(a);
        }
        assert!(child.try_wait().unwrap().is_none(), "run {run}: the child died by itself");
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    lines.join().unwrap();
    acks.extend(rx.try_iter());
    acks
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let seed: u64 = std::env::var("KEFU_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("crash test seed {seed} (KEFU_CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // (conv, cid) -> (seq, offset) of every append acknowledged, or found
    // stored after a crash.
    let mut known: HashMap<(u64, String), (u64, u64)> = HashMap::new();
    let mut duplicates_seen = 0;
    let mut replayed = 0;
    for run in 0..6 {
        let acks = run_and_kill(dir.path(), run, &mut rng);
        for a in &acks {
            match known.get(&(a.conv, a.cid.clone())) {
                Some(&(seq, offset)) => {
                    assert!(a.duplicate, "seed {seed} run {run}: {a:?} stored twice (first at seq {seq})");
                    assert_eq!(
                        (a.seq, a.offset),
                        (seq, offset),
                        "seed {seed} run {run}: a dup acks the original"
                    );
                    duplicates_seen += 1;
                }
                None => {
                    assert!(!a.duplicate, "seed {seed} run {run}: {a:?} is a duplicate of nothing acked");
                    known.insert((a.conv, a.cid.clone()), (a.seq, a.offset));
                }
            }
        }

        let (store, recovery) = Store::open(config(dir.path()), Arc::new(|_| {})).unwrap();
        eprintln!(
            "run {run}: {} acks, reopened {} records in {:?} (repaired: {}, write-ahead log records replayed: {})",
            acks.len(),
            recovery.next_offset,
            recovery.open_time,
            recovery.repaired,
            recovery.wal_replayed
        );
        replayed += recovery.wal_replayed;
        assert!(recovery.unclean_shutdown, "the store knows the last process was killed");
        let r = store.reader();
        for ((conv, cid), &(seq, offset)) in &known {
            let m = r
                .message(*conv, seq)
                .unwrap()
                .unwrap_or_else(|| panic!("seed {seed} run {run}: acked ({conv}, {seq}, {cid}) is lost"));
            assert_eq!((m.offset, &m.record.cid), (offset, cid), "seed {seed} run {run}");
        }
        // Everything present — acked or not — is whole, gap-free and once.
        let log = r.scan(0, usize::MAX).unwrap();
        assert_eq!(log.len() as u64, recovery.next_offset);
        let mut next_seq: HashMap<u64, u64> = HashMap::new();
        let mut cids = HashSet::new();
        for (i, l) in log.iter().enumerate() {
            assert_eq!(l.offset, i as u64);
            let LogRecord::Message(m) = &l.record else { panic!("only messages were written") };
            let expect = next_seq.entry(m.conv).or_insert(1);
            assert_eq!(m.seq, *expect, "seed {seed} run {run}: conversation {} gap-free", m.conv);
            *expect += 1;
            assert!(cids.insert((m.conv, m.cid.clone())), "seed {seed} run {run}: {} stored twice", m.cid);
            // Stored but never acked (the child died before printing) is
            // fine, and from now on durable: a resend must dedupe to it.
            known.entry((m.conv, m.cid.clone())).or_insert((m.seq, l.offset));
        }
        for (conv, next) in next_seq {
            assert_eq!(r.last_seq(conv).unwrap(), next - 1);
            assert_eq!(r.history(conv, None, 5).unwrap().last().map(|m| m.record.seq), Some(next - 1));
        }
    }
    assert!(duplicates_seen > 0, "later runs resend earlier cids; some must have been acked as duplicates");
    // The kills fall between checkpoints (a second apart), so what the
    // runs acked last is in the write-ahead log alone: the test must have
    // recovered from it, not only from redb.
    assert!(replayed > 0, "no kill left anything in the write-ahead log to replay");
}
