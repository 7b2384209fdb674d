//! Proofs of the durability paragraph at the top of `lib.rs`, from below
//! redb.
//!
//! `kill -9` cannot show that an ack waits for fsync (the page cache
//! outlives the process), so these tests watch the storage backend itself:
//!
//! - [`no_completion_before_its_fsync_returns`]: every write, fsync start
//!   and fsync return that reaches the file, and every completion a
//!   submitter pops, go into one totally ordered event log. Each message
//!   carries a marker that is found in the bytes written, so the log shows
//!   when each record first reached the file. A completion is legal only
//!   if, before it was observed, the commit's fsyncs (1, or 2 with
//!   quick-repair) had started after the record was written and returned.
//! - [`a_held_fsync_holds_back_every_completion`]: fsyncs are held at the
//!   backend; while any fsync of the commit is held, no completion appears.
//! - [`power_loss_keeps_every_acknowledged_write`] and
//!   [`torn_writes_roll_back_whole_commits`]: a simulated disk keeps what
//!   was fsynced and, at a "power cut", keeps a random part of what was
//!   not (whole writes, or single 512-byte sectors: torn writes). The store
//!   reopened on that image must hold every acknowledged write, intact,
//!   with every conversation gap-free.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::{BackendError, StorageBackend};

use crate::backend::{BackendObserver, FileKind};
use crate::store::Backends;
use crate::testkit::{PATIENCE, config, message, wait_for};
use crate::{LogRecord, Store, StoreConfig, WriteOp};

// ---------------------------------------------------------------------------
// Ordering of completions after fsyncs.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A record with this token reached `write()` of a file.
    Wrote(FileKind, u64),
    SyncStart(FileKind),
    SyncReturn(FileKind),
    /// A submitter popped the completion of this token.
    Observed(u64),
}

/// Records backend events and observations in one order; optionally
/// slows fsyncs down at random, to widen any window a bug would need.
struct Recorder {
    events: Mutex<Vec<Event>>,
    jitter: bool,
    rng: Mutex<StdRng>,
}

const MARK: &[u8] = b"@@tok:";

fn marker(token: u64) -> String {
    format!("@@tok:{token:016x}@@")
}

/// The tokens of every marker in `data`.
fn markers(data: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + MARK.len() + 18 <= data.len() {
        if data[i..].starts_with(MARK) {
            let hex = &data[i + MARK.len()..i + MARK.len() + 16];
            if let Some(t) = std::str::from_utf8(hex).ok().and_then(|h| u64::from_str_radix(h, 16).ok()) {
                out.push(t);
            }
            i += MARK.len() + 18;
        } else {
            i += 1;
        }
    }
    out
}

impl Recorder {
    fn new(jitter: bool, seed: u64) -> Arc<Recorder> {
        Arc::new(Recorder {
            events: Mutex::new(Vec::new()),
            jitter,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    fn observed(&self, token: u64) {
        self.events.lock().unwrap().push(Event::Observed(token));
    }
}

impl BackendObserver for Recorder {
    fn write(&self, file: FileKind, _offset: u64, data: &[u8]) {
        let tokens = markers(data);
        if !tokens.is_empty() {
            self.events.lock().unwrap().extend(tokens.into_iter().map(|t| Event::Wrote(file, t)));
        }
    }

    fn sync_start(&self, file: FileKind) {
        self.events.lock().unwrap().push(Event::SyncStart(file));
        if self.jitter {
            let us = self.rng.lock().unwrap().random_range(0..1500);
            std::thread::sleep(Duration::from_micros(us));
        }
    }

    fn sync_returned(&self, file: FileKind, _n: u64) {
        self.events.lock().unwrap().push(Event::SyncReturn(file));
    }
}

/// Checks the event log: returns how many completions were checked. A
/// completion is legal if its record, after it was first written to a
/// file, had that file fsynced before the completion was seen: once for
/// the write-ahead log, `syncs_per_commit` times for the database.
fn check_fsync_order(events: &[Event], syncs_per_commit: usize) -> usize {
    let mut first_write: HashMap<(FileKind, u64), usize> = HashMap::new();
    // (start, return) of each file's fsyncs, in order. The database's may
    // overlap (the flush thread's of a checkpoint written behind, and the
    // writer's after growing the file, which goes ahead of it): a return
    // is paired with the earliest fsync of its file still open, the
    // pairing that credits an ack with the least.
    let mut syncs: HashMap<FileKind, Vec<(usize, usize)>> = HashMap::new();
    let mut open_sync: HashMap<FileKind, std::collections::VecDeque<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        match *e {
            Event::Wrote(f, t) => {
                first_write.entry((f, t)).or_insert(i);
            }
            Event::SyncStart(f) => open_sync.entry(f).or_default().push_back(i),
            Event::SyncReturn(f) => {
                let at = open_sync.get_mut(&f).and_then(|q| q.pop_front()).expect("return without start");
                syncs.entry(f).or_default().push((at, i));
            }
            Event::Observed(_) => {}
        }
    }
    let mut checked = 0;
    for (at, e) in events.iter().enumerate() {
        let Event::Observed(t) = *e else { continue };
        let mut durable = false;
        let mut seen = Vec::new();
        for (file, need) in [(FileKind::Wal, 1), (FileKind::Database, syncs_per_commit)] {
            let Some(&w) = first_write.get(&(file, t)) else { continue };
            if w > at {
                continue;
            }
            let file_syncs = syncs.get(&file).map_or(&[][..], Vec::as_slice);
            let first = file_syncs.partition_point(|&(start, _)| start < w);
            let done = file_syncs[first..].iter().take_while(|&&(_, ret)| ret < at).count();
            seen.push(format!("{file:?}: written at event {w}, {done} fsync(s) after it before the ack"));
            durable |= done >= need;
        }
        assert!(!seen.is_empty(), "token {t} acked at event {at} but never written before it");
        assert!(
            durable,
            "token {t} acked at event {at} before its fsyncs returned (need 1 of the log or \
             {syncs_per_commit} of the database): {}",
            seen.join("; ")
        );
        checked += 1;
    }
    checked
}

fn marked(conv: u64, token: u64) -> WriteOp {
    // About 200 bytes, like a chat message.
    let text = format!("{} {}", marker(token), "lorem ipsum dolor sit amet ".repeat(6));
    WriteOp::AppendMessage(message(conv, &format!("v{conv}"), &format!("cid-{token}"), &text))
}

/// Runs `threads` submitters, each on its own source with `in_flight` writes
/// outstanding, `per_thread` messages each; every popped completion is
/// reported to `recorder` the moment it is seen.
fn drive(store: &Store, recorder: &Arc<Recorder>, threads: usize, per_thread: u64, in_flight: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let writer = store.writer();
            let completions = store.completions(t);
            let recorder = recorder.clone();
            s.spawn(move || {
                let mut next = 0u64;
                let mut done = 0u64;
                let deadline = Instant::now() + PATIENCE;
                while done < per_thread {
                    while next < per_thread && writer.in_flight(t) < in_flight {
                        let token = (t as u64) << 32 | next;
                        writer.submit(t, token, marked(t as u64 * 10 + next % 5, token)).unwrap();
                        next += 1;
                    }
                    match completions.pop() {
                        Some(c) => {
                            recorder.observed(c.token);
                            c.result.unwrap();
                            done += 1;
                        }
                        None => {
                            assert!(Instant::now() < deadline, "submitter {t} stalled");
                            std::thread::yield_now();
                        }
                    }
                }
            });
        }
    });
}

#[test]
fn no_completion_before_its_fsync_returns() {
    // With the log, checkpoints every 20 ms: both kinds of commit are seen.
    for (quick_repair, wal, syncs_per_commit) in
        [(true, false, 2), (false, false, 1), (true, true, 2), (false, true, 1)]
    {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::new(true, 7);
        let cfg = StoreConfig {
            sources: 4,
            quick_repair,
            wal,
            checkpoint_ms: 20,
            checkpoint_in_background: true,
            ..config(dir.path())
        };
        let observer: Arc<dyn BackendObserver> = recorder.clone();
        let (store, _) = Store::open_with(cfg, Arc::new(|_| {}), None, Some(observer)).unwrap();
        drive(&store, &recorder, 4, 1500, 64);
        let commits = store.stats().commits;
        drop(store);
        let events = recorder.events.lock().unwrap();
        let checked = check_fsync_order(&events, syncs_per_commit);
        assert_eq!(checked, 4 * 1500);
        // It was group commit, not one commit per write.
        assert!(commits < 4 * 1500 / 4, "quick_repair={quick_repair} wal={wal}: {commits} commits");
        if wal {
            let wal_syncs = events.iter().filter(|e| **e == Event::SyncStart(FileKind::Wal)).count();
            let db_syncs = events.iter().filter(|e| **e == Event::SyncStart(FileKind::Database)).count();
            assert!(
                wal_syncs > 10 && db_syncs > 2,
                "both kinds of commit ran: {wal_syncs} log, {db_syncs} database fsyncs"
            );
        }
    }
}

#[test]
fn the_fsync_order_check_catches_an_early_ack() {
    use Event::*;
    use FileKind::{Database as Db, Wal};
    // Written, one fsync, acked: fine with one fsync per commit, not two.
    let events = [Wrote(Db, 1), SyncStart(Db), SyncReturn(Db), Observed(1)];
    assert_eq!(check_fsync_order(&events, 1), 1);
    assert!(std::panic::catch_unwind(|| check_fsync_order(&events, 2)).is_err());
    // Acked while the fsync runs.
    let early = [Wrote(Db, 1), SyncStart(Db), Observed(1), SyncReturn(Db)];
    assert!(std::panic::catch_unwind(|| check_fsync_order(&early, 1)).is_err());
    // An fsync that started before the write does not count.
    let stale = [SyncStart(Db), Wrote(Db, 1), SyncReturn(Db), Observed(1)];
    assert!(std::panic::catch_unwind(|| check_fsync_order(&stale, 1)).is_err());
    // Acked before written at all.
    let unwritten = [Observed(1), Wrote(Db, 1), SyncStart(Db), SyncReturn(Db)];
    assert!(std::panic::catch_unwind(|| check_fsync_order(&unwritten, 1)).is_err());
    // One fsync of the log after the record reached it is enough, even
    // where the database needs two.
    let logged = [Wrote(Wal, 1), SyncStart(Wal), SyncReturn(Wal), Observed(1)];
    assert_eq!(check_fsync_order(&logged, 2), 1);
    // An fsync of the other file does not count.
    let other = [Wrote(Wal, 1), SyncStart(Db), SyncReturn(Db), Observed(1)];
    assert!(std::panic::catch_unwind(|| check_fsync_order(&other, 1)).is_err());
    let other = [Wrote(Db, 1), SyncStart(Wal), SyncReturn(Wal), Observed(1)];
    assert!(std::panic::catch_unwind(|| check_fsync_order(&other, 1)).is_err());
}

/// Holds each fsync at the backend until the test lets it go.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Holds only this file's fsyncs, if set.
    only: Option<FileKind>,
    permits: usize,
    waiting: usize,
    held_total: usize,
}

struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap();
        s.closed = false;
        s.permits += 1_000_000;
        self.0.changed.notify_all();
    }
}

impl BackendObserver for Gate {
    fn sync_start(&self, file: FileKind) {
        let mut s = self.state.lock().unwrap();
        if !s.closed || s.only.is_some_and(|only| only != file) {
            return;
        }
        s.waiting += 1;
        s.held_total += 1;
        self.changed.notify_all();
        while s.permits == 0 {
            s = self.changed.wait(s).unwrap();
        }
        s.permits -= 1;
        s.waiting -= 1;
    }
}

#[test]
fn a_held_fsync_holds_back_every_completion() {
    // With the log (and no checkpoint within the test) a commit is one
    // fsync of the log.
    for (quick_repair, wal, syncs_per_commit) in [(true, false, 2), (false, false, 1), (true, true, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        // A window long enough that the 20 writes share the first commit.
        let cfg = StoreConfig {
            quick_repair,
            wal,
            checkpoint_ms: 600_000,
            batch_window_us: 200_000,
            ..config(dir.path())
        };
        let observer: Arc<dyn BackendObserver> = gate.clone();
        let (store, _) = Store::open_with(cfg, Arc::new(|_| {}), None, Some(observer)).unwrap();
        // Dropped before the store, even when an assertion fails: a held
        // fsync would otherwise keep the writer (and the store's drop) forever.
        let _open_on_exit = OpenOnDrop(gate.clone());
        gate.state.lock().unwrap().closed = true;
        let w = store.writer();
        let completions = store.completions(0);
        for i in 0..20 {
            w.submit(0, i, WriteOp::AppendMessage(message(1, "v", &format!("{i}"), "x"))).unwrap();
        }
        // Commit k is durable after its fsyncs (k-1)*n+1 ..= k*n (n per
        // commit) returned; while one of them is held, no completion of
        // commit k may exist.
        let mut released = 0;
        let mut done = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        let check = |done: &mut Vec<crate::Completion>, released: usize| {
            while let Some(c) = completions.pop() {
                let commit = c.result.as_ref().unwrap().commit as usize;
                assert!(
                    commit * syncs_per_commit <= released,
                    "quick_repair={quick_repair}: a completion of commit {commit} appeared while \
                     fsync {} was held ({released} released)",
                    released + 1
                );
                done.push(c);
            }
        };
        while done.len() < 20 {
            assert!(Instant::now() < deadline, "no progress");
            let held = {
                let s = gate.state.lock().unwrap();
                let (s, _) = gate.changed.wait_timeout(s, Duration::from_millis(5)).unwrap();
                // A sync held that was not yet let go (`waiting` lags: a
                // released sync still counts until its thread wakes).
                s.held_total > released
            };
            if held {
                // Give a wrongly early completion every chance to show up.
                std::thread::sleep(Duration::from_millis(50));
                check(&mut done, released);
                let mut s = gate.state.lock().unwrap();
                s.permits += 1;
                released += 1;
                gate.changed.notify_all();
            } else {
                check(&mut done, released);
            }
        }
        let commits = done.iter().map(|c| c.result.as_ref().unwrap().commit).max().unwrap() as usize;
        assert_eq!(released, commits * syncs_per_commit, "quick_repair={quick_repair}: fsyncs per commit");
        assert!(commits <= 2, "the window batched the writes ({commits} commits)");
    }
}

impl Gate {
    /// Holds the database's fsyncs from now on.
    fn hold_the_database(&self) {
        let mut s = self.state.lock().unwrap();
        s.closed = true;
        s.only = Some(FileKind::Database);
    }

    /// Waits until an fsync is held.
    fn wait_held(&self) {
        let deadline = Instant::now() + PATIENCE;
        let mut s = self.state.lock().unwrap();
        while s.waiting == 0 {
            assert!(Instant::now() < deadline, "no fsync was held");
            s = self.changed.wait_timeout(s, Duration::from_millis(5)).unwrap().0;
        }
    }
}

/// Submits one write and waits for its completion.
fn send(store: &Store, token: u64, conv: u64, cid: &str) -> crate::Completion {
    store.writer().submit(0, token, WriteOp::AppendMessage(message(conv, "v", cid, cid))).unwrap();
    wait_for(&store.completions(0), 1).pop().unwrap()
}

/// A checkpoint written behind the writer holds no write after it: with
/// its fsync held at the disk, writes are still acked (through the log).
/// The next checkpoint then waits for it before the log goes on over the
/// cycle it closed, and so do the writes queued behind that one.
#[test]
fn a_checkpoint_written_behind_holds_no_write_until_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig { checkpoint_ms: 1_000, checkpoint_in_background: true, ..config(dir.path()) };
    let gate = Arc::new(Gate::default());
    let observer: Arc<dyn BackendObserver> = gate.clone();
    let (store, _) = Store::open_with(cfg, Arc::new(|_| {}), None, Some(observer)).unwrap();
    let _open_on_exit = OpenOnDrop(gate.clone());
    gate.hold_the_database();
    send(&store, 1, 1, "m1").result.unwrap();
    // The idle writer checkpoints within a second; its first fsync is held.
    gate.wait_held();
    let t0 = Instant::now();
    for i in 2..=11 {
        let c = send(&store, i, 1, &format!("m{i}"));
        assert_eq!(c.result.unwrap().seq, i, "acked while the checkpoint's fsync is held");
    }
    assert!(t0.elapsed() < Duration::from_millis(900), "the writes came before the next checkpoint was due");
    assert_eq!(gate.state.lock().unwrap().held_total, 1, "still the first checkpoint's fsync");
    assert_eq!(store.stats().checkpoint_waits, 0);
    // The next checkpoint comes a second after the first and waits for it;
    // a write queued behind it waits too.
    let deadline = Instant::now() + PATIENCE;
    while store.stats().checkpoint_waits == 0 {
        assert!(Instant::now() < deadline, "the next checkpoint did not wait for the held one");
        std::thread::sleep(Duration::from_millis(2));
    }
    store.writer().submit(0, 12, WriteOp::AppendMessage(message(1, "v", "m12", "m12"))).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(store.completions(0).pop().is_none(), "acked while the writer waits for the flush");
    drop(_open_on_exit);
    assert_eq!(wait_for(&store.completions(0), 1)[0].result.as_ref().unwrap().seq, 12);
    assert_eq!(store.reader().last_seq(1).unwrap(), 12);
}

/// A power cut while a checkpoint written behind the writer is still on
/// its way to the disk keeps every acked write: the cycle that checkpoint
/// closed and the one after it are both still in the log, in its two
/// files, and open replays both.
#[test]
fn a_power_cut_before_a_background_checkpoint_lands_replays_two_cycles() {
    let cfg = StoreConfig {
        checkpoint_ms: 200,
        checkpoint_in_background: true,
        wal_bytes: 1 << 16,
        cache_bytes: 8 << 20,
        ..StoreConfig::default()
    };
    let disks = Disks::default();
    let gate = Arc::new(Gate::default());
    let observer: Arc<dyn BackendObserver> = gate.clone();
    let (store, _) =
        Store::open_with(cfg.clone(), Arc::new(|_| {}), Some(disks.backends()), Some(observer)).unwrap();
    let open_on_exit = OpenOnDrop(gate.clone());
    gate.hold_the_database();
    let mut acked = Vec::new();
    let mut ack = |c: crate::Completion| {
        let ok = c.result.unwrap_or_else(|e| panic!("{e}"));
        let WriteOp::AppendMessage(m) = &c.op else { unreachable!() };
        acked.push(Ack { conv: m.conv.0, seq: ok.seq, offset: ok.offset, cid: m.cid.clone() });
    };
    // Cycle 1, then its checkpoint, held at its first fsync.
    ack(send(&store, 1, 1, "a"));
    ack(send(&store, 2, 2, "b"));
    gate.wait_held();
    // Cycle 2, in the other file.
    ack(send(&store, 3, 1, "c"));
    ack(send(&store, 4, 3, "d"));
    let mut rng = StdRng::seed_from_u64(11);
    let images = disks.power_cut(&mut rng, Cut::WholeWrites);
    drop(open_on_exit);
    drop(store);
    let replayed = check_image(images, cfg, &acked, "a power cut before a background checkpoint landed");
    assert!(replayed >= 3, "both cycles replayed: {replayed} records");
}

// ---------------------------------------------------------------------------
// A disk that loses power.

/// A file whose writes sit in a "page cache" until `sync_data`, and that
/// can lose power: what was fsynced stays, of the rest a random part lands.
#[derive(Default)]
struct SimDisk {
    state: Mutex<SimState>,
}

#[derive(Default)]
struct SimState {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    powered_off: bool,
    /// This many next fsyncs fail (the data stays written, not durable).
    failing_syncs: usize,
    /// So many next writes fail, writing nothing.
    failing_writes: usize,
}

enum Pending {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

fn write_at(buf: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if buf.len() < offset + data.len() {
        buf.resize(offset + data.len(), 0);
    }
    buf[offset..offset + data.len()].copy_from_slice(data);
}

/// How a power cut treats writes not yet fsynced.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Each write lands whole or not at all.
    WholeWrites,
    /// Each 512-byte sector of each write lands or not.
    Sectors,
}

impl SimDisk {
    fn from_image(image: Vec<u8>) -> Arc<SimDisk> {
        Arc::new(SimDisk {
            state: Mutex::new(SimState {
                volatile: image.clone(),
                durable: image,
                pending: Vec::new(),
                powered_off: false,
                failing_syncs: 0,
                failing_writes: 0,
            }),
        })
    }

    /// Cuts the power: from now on every call fails. Returns what is on the
    /// platter: the fsynced image, plus a random part of the rest.
    fn power_cut(&self, rng: &mut StdRng, cut: Cut) -> (Vec<u8>, usize) {
        self.state.lock().unwrap().cut(rng, cut)
    }
}

/// A store's disks: the database's and the log's two files'.
#[derive(Default)]
struct Disks {
    db: Arc<SimDisk>,
    wal: [Arc<SimDisk>; 2],
}

/// What is on the platters of [`Disks`] after a power cut.
struct Images {
    db: Vec<u8>,
    wal: [Vec<u8>; 2],
}

impl Disks {
    fn backends(&self) -> Backends {
        Backends {
            db: Box::new(Disk(self.db.clone())),
            wal: Some(self.wal.clone().map(|d| Box::new(Disk(d)) as Box<dyn StorageBackend>)),
        }
    }

    fn from_images(images: Images) -> Disks {
        Disks { db: SimDisk::from_image(images.db), wal: images.wal.map(SimDisk::from_image) }
    }

    /// Cuts the power of every disk at one instant: no write or fsync
    /// reaches any of them in between.
    fn power_cut(&self, rng: &mut StdRng, cut: Cut) -> Images {
        let mut db = self.db.state.lock().unwrap();
        let mut even = self.wal[0].state.lock().unwrap();
        let mut odd = self.wal[1].state.lock().unwrap();
        Images { db: db.cut(rng, cut).0, wal: [even.cut(rng, cut).0, odd.cut(rng, cut).0] }
    }
}

impl SimState {
    fn cut(&mut self, rng: &mut StdRng, cut: Cut) -> (Vec<u8>, usize) {
        let s = self;
        s.powered_off = true;
        let mut image = s.durable.clone();
        let mut landed = 0;
        for p in &s.pending {
            match p {
                Pending::SetLen(n) => {
                    if rng.random_bool(0.5) {
                        image.resize(*n, 0);
                    }
                }
                Pending::Write { offset, data } => match cut {
                    Cut::WholeWrites => {
                        if rng.random_bool(0.5) {
                            write_at(&mut image, *offset, data);
                            landed += 1;
                        }
                    }
                    Cut::Sectors => {
                        let mut at = 0;
                        while at < data.len() {
                            // Sector boundaries are absolute file offsets.
                            let end = (((offset + at) / 512 + 1) * 512 - offset).min(data.len());
                            if rng.random_bool(0.5) {
                                write_at(&mut image, offset + at, &data[at..end]);
                                landed += 1;
                            }
                            at = end;
                        }
                    }
                },
            }
        }
        (image, landed)
    }
}

/// The handle redb owns.
struct Disk(Arc<SimDisk>);

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimDisk")
    }
}

fn power_lost() -> std::io::Error {
    std::io::Error::other("power lost")
}

impl StorageBackend for Disk {
    fn len(&self) -> Result<u64, std::io::Error> {
        let s = self.0.state.lock().unwrap();
        if s.powered_off {
            return Err(power_lost());
        }
        Ok(s.volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let s = self.0.state.lock().unwrap();
        if s.powered_off {
            return Err(power_lost());
        }
        let offset = offset as usize;
        match s.volatile.get(offset..offset + out.len()) {
            Some(src) => {
                out.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut s = self.0.state.lock().unwrap();
        if s.powered_off {
            return Err(power_lost());
        }
        s.volatile.resize(len as usize, 0);
        s.pending.push(Pending::SetLen(len as usize));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.0.state.lock().unwrap();
        if s.powered_off {
            return Err(power_lost());
        }
        if s.failing_syncs > 0 {
            s.failing_syncs -= 1;
            return Err(std::io::Error::other("fsync failed (test)"));
        }
        let SimState { durable, pending, .. } = &mut *s;
        for p in pending.drain(..) {
            match p {
                Pending::SetLen(n) => durable.resize(n, 0),
                Pending::Write { offset, data } => write_at(durable, offset, &data),
            }
        }
        debug_assert!(s.durable == s.volatile);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.0.state.lock().unwrap();
        if s.powered_off {
            return Err(power_lost());
        }
        if s.failing_writes > 0 {
            s.failing_writes -= 1;
            return Err(std::io::Error::other("write failed (test)"));
        }
        write_at(&mut s.volatile, offset as usize, data);
        s.pending.push(Pending::Write { offset: offset as usize, data: data.to_vec() });
        Ok(())
    }

    fn try_lock_range(&self, _: Bound<u64>, _: Bound<u64>) -> Result<bool, BackendError> {
        Err(BackendError::Unsupported)
    }
}

/// One acknowledged append.
#[derive(Debug, Clone)]
struct Ack {
    conv: u64,
    seq: u64,
    offset: u64,
    cid: String,
}

/// Appends from two threads until the power is cut at a random moment;
/// returns the image on the platter and the acks seen before the cut.
fn run_until_power_cut(
    disks: &Disks,
    cfg: StoreConfig,
    rng: &mut StdRng,
    cut: Cut,
    round: u64,
) -> (Images, Vec<Ack>) {
    let (store, _) = Store::open_with(cfg, Arc::new(|_| {}), Some(disks.backends()), None).unwrap();
    let acks: Mutex<Vec<Ack>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let submitted = AtomicUsize::new(0);
    let result = std::thread::scope(|s| {
        for t in 0..2usize {
            let (writer, completions, acks, stop, submitted) =
                (store.writer(), store.completions(t), &acks, &stop, &submitted);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if writer.in_flight(t) < 32 {
                        let conv = 1 + (t as u64 * 3) + n % 3;
                        let cid = format!("r{round}-t{t}-{n}");
                        let text = format!("{cid} {}", "payload ".repeat(20));
                        let op = WriteOp::AppendMessage(message(conv, sender_of(n), &cid, &text));
                        if writer.submit(t, n, op).is_ok() {
                            n += 1;
                            submitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    while let Some(c) = completions.pop() {
                        if let (Ok(ok), WriteOp::AppendMessage(m)) = (&c.result, &c.op) {
                            acks.lock().unwrap().push(Ack {
                                conv: m.conv.0,
                                seq: ok.seq,
                                offset: ok.offset,
                                cid: m.cid.clone(),
                            });
                        }
                    }
                    std::thread::yield_now();
                }
            });
        }
        // Cut at a random moment once the writes are flowing.
        let warm_up = rng.random_range(1..200);
        let deadline = Instant::now() + PATIENCE;
        while acks.lock().unwrap().len() < warm_up {
            assert!(Instant::now() < deadline, "no acks");
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        // Everything acked so far had its fsync return, so it is in the
        // durable image the cut starts from.
        let acked = acks.lock().unwrap().clone();
        let images = disks.power_cut(rng, cut);
        stop.store(true, Ordering::Relaxed);
        (images, acked)
    });
    // The writer now fails every commit; closing must still finish.
    drop(store);
    assert!(submitted.load(Ordering::Relaxed) > 0);
    result
}

/// Who sends a power-cut round's `n`th message: three senders of one role
/// taking turns, so that a pointer back for a sender that led to the wrong
/// record would read as another's name.
fn sender_of(n: u64) -> &'static str {
    ["v", "w", "x"][(n % 3) as usize]
}

/// Reopens a store on `image` and checks every ack is there, and that the
/// log and the index are whole and gap-free.
/// Returns the write-ahead log records the reopen replayed.
fn check_image(images: Images, cfg: StoreConfig, acked: &[Ack], what: &str) -> u64 {
    let backends = Disks::from_images(images).backends();
    let (store, recovery) = Store::open_with(cfg, Arc::new(|_| {}), Some(backends), None)
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let r = store.reader();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for a in acked {
        let m = r
            .message(a.conv, a.seq)
            .unwrap_or_else(|e| panic!("{what}: {a:?}: {e}"))
            .unwrap_or_else(|| panic!("{what}: acked {a:?} is lost"));
        assert_eq!((m.offset, m.record.cid.as_str()), (a.offset, a.cid.as_str()), "{what}");
        let l = last.entry(a.conv).or_default();
        *l = (*l).max(a.seq);
    }
    // Every record that is there (acked or not) is whole, every
    // conversation gap-free from 1, every offset present once.
    let log = r.scan(0, usize::MAX).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(log.len() as u64, recovery.next_offset, "{what}");
    let mut seen_cids = HashSet::new();
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    for (i, l) in log.iter().enumerate() {
        assert_eq!(l.offset, i as u64, "{what}: offsets gap-free");
        let LogRecord::Message(m) = &l.record else { continue };
        let expect = next_seq.entry(m.conv).or_insert(1);
        assert_eq!(m.seq, *expect, "{what}: conversation {} gap-free", m.conv);
        *expect += 1;
        assert!(seen_cids.insert(m.cid.clone()), "{what}: {} stored twice", m.cid);
        // Its own sender in full, though most messages point back for it
        // past other senders' records: a power-cut round's by its number,
        // every other test's is "v".
        let round_n = m.cid.strip_prefix('r').and_then(|c| c.rsplit('-').next()).and_then(|n| n.parse().ok());
        let sender = round_n.map_or("v", sender_of);
        assert_eq!(
            (m.from.id.as_str(), m.from.name.clone()),
            (sender, format!("{sender}'s name")),
            "{what}: {}",
            m.cid
        );
    }
    for (conv, l) in last {
        assert!(r.last_seq(conv).unwrap() >= l, "{what}");
    }
    // And the store goes on from there.
    let w = store.writer();
    w.submit(0, 1, WriteOp::AppendMessage(message(1, "v", "after-reopen", "x"))).unwrap();
    let c = wait_for(&store.completions(0), 1).pop().unwrap();
    assert_eq!(c.result.unwrap().seq, next_seq.get(&1).copied().unwrap_or(1), "{what}");
    recovery.wal_replayed
}

fn power_cut_rounds(cut: Cut, rounds: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut total_acked = 0;
    let mut replayed_rounds = 0;
    for round in 0..rounds {
        let quick_repair = round % 2 == 0;
        // Without the log; with it and checkpoints every few ms in a log
        // small enough to fill (so cuts fall before, in and after
        // checkpoints, and cycles start over), written behind the writer
        // and inline; with it and no checkpoint but the one at open (the
        // whole run is replayed).
        let (wal, checkpoint_ms, checkpoint_in_background) =
            [(false, 1_000, false), (true, 3, true), (true, 3, false), (true, 600_000, true)]
                [(round / 2 % 4) as usize];
        // Index entries written with their message, or waiting in tails
        // that go to the table by batch or by lag (`tail.rs`).
        let index_batch = [1, 3, 8][(round % 3) as usize];
        let index_lag = [16, 100_000][(round / 3 % 2) as usize];
        let cfg = StoreConfig {
            sources: 2,
            index_batch,
            index_lag,
            quick_repair,
            wal,
            checkpoint_ms,
            checkpoint_in_background,
            wal_bytes: 1 << 16,
            cache_bytes: 8 << 20,
            ..StoreConfig::default()
        };
        let disks = Disks::default();
        let (images, acked) = run_until_power_cut(&disks, cfg.clone(), &mut rng, cut, round);
        total_acked += acked.len();
        let what = format!(
            "seed {seed} round {round} ({cut:?}, quick_repair={quick_repair}, wal={wal}, checkpoint_ms={checkpoint_ms}, \
             background={checkpoint_in_background}, index_batch={index_batch}, index_lag={index_lag})"
        );
        let replayed = check_image(images, cfg, &acked, &what);
        if wal {
            replayed_rounds += u64::from(replayed > 0);
        } else {
            assert_eq!(replayed, 0, "{what}: a log replayed that was never written");
        }
    }
    assert!(total_acked > 0, "no writes were acknowledged before any cut");
    assert!(replayed_rounds > 0, "no cut left anything in the write-ahead log to replay");
}

#[test]
fn power_loss_keeps_every_acknowledged_write() {
    power_cut_rounds(Cut::WholeWrites, 16, 0x5eed_0001);
}

#[test]
fn torn_writes_roll_back_whole_commits() {
    power_cut_rounds(Cut::Sectors, 16, 0x5eed_0002);
}

#[test]
fn the_simulated_disk_forgets_what_was_not_fsynced() {
    let disk = Arc::new(SimDisk::default());
    let d = Disk(disk.clone());
    d.set_len(1024).unwrap();
    d.write(0, b"synced").unwrap();
    d.sync_data().unwrap();
    d.write(512, b"not synced").unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut kept = 0;
    for _ in 0..20 {
        let (image, _) = {
            let mut s = disk.state.lock().unwrap();
            s.powered_off = false;
            drop(s);
            disk.power_cut(&mut rng, Cut::WholeWrites)
        };
        assert_eq!(&image[..6], b"synced");
        if &image[512..522] == b"not synced" {
            kept += 1;
        } else {
            assert_eq!(&image[512..522], &[0; 10]);
        }
    }
    assert!(kept > 0 && kept < 20, "a random part of the unsynced writes lands: {kept}/20");
    assert!(d.write(0, b"x").is_err(), "no power, no writes");
}

/// Sends with `send` until the store answers other than `Recovering`, for
/// [`PATIENCE`] at most: a store that never writes again fails the test
/// rather than hanging it.
fn once_recovered(mut send: impl FnMut() -> crate::Completion) -> crate::Completion {
    let deadline = Instant::now() + crate::testkit::PATIENCE;
    loop {
        let c = send();
        match &c.result {
            Err(crate::StorageError::Recovering) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(crate::StorageError::Recovering) => {
                panic!("still recovering after {:?}", crate::testkit::PATIENCE)
            }
            _ => return c,
        }
    }
}

/// A store on simulated disks with the write-ahead log, no checkpoint but
/// the one at open, and a writer that retries within milliseconds after a
/// failed commit.
fn store_that_recovers_at_once(dir: &std::path::Path) -> (StoreConfig, Disks, Store) {
    let cfg = StoreConfig {
        checkpoint_ms: 600_000,
        recovery_backoff_ms_min: 1,
        recovery_backoff_ms_max: 10,
        ..config(dir)
    };
    let disks = Disks::default();
    let (store, _) = Store::open_with(cfg.clone(), Arc::new(|_| {}), Some(disks.backends()), None).unwrap();
    (cfg, disks, store)
}

/// A failed fsync of the write-ahead log fails its batch; the writer then
/// replays the log onto the live database (which holds every record of
/// the cycle but that one), goes on from what is stored, and writes again.
/// The failed record had reached the file, so it is stored (a resend of it
/// dedupes to it), the conversation stays gap-free, and a power cut after
/// all that keeps every ack.
#[test]
fn a_failed_fsync_of_the_log_fails_its_batch_and_the_writer_goes_on_from_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, disks, store) = store_that_recovers_at_once(dir.path());
    let (w, completions) = (store.writer(), store.completions(0));
    let mut token = 0;
    let mut send = |cid: &str| {
        token += 1;
        w.submit(0, token, WriteOp::AppendMessage(message(1, "v", cid, cid))).unwrap();
        wait_for(&completions, 1).pop().unwrap()
    };
    let mut acked = Vec::new();
    let mut ack = |c: crate::Completion| {
        let ok = c.result.unwrap_or_else(|e| panic!("{e}"));
        let WriteOp::AppendMessage(m) = &c.op else { unreachable!() };
        acked.push(Ack { conv: 1, seq: ok.seq, offset: ok.offset, cid: m.cid.clone() });
        ok
    };
    for i in 1..=5 {
        assert_eq!(ack(send(&format!("m{i}"))).seq, i);
    }
    // A new store appends cycle 1, to the log's file of odd cycles.
    disks.wal[1].state.lock().unwrap().failing_syncs = 1;
    assert!(send("m6").result.is_err(), "a batch whose log fsync failed is not acked");
    // Until the writer has replayed the log, writes are refused.
    let seven = ack(once_recovered(|| send("m7")));
    assert_eq!(seven.seq, 7, "m6 reached the log, so the replay stored it as seq 6");
    let again = ack(send("m6"));
    assert!(again.duplicate && again.seq == 6, "{again:?}");
    let r = store.reader();
    assert_eq!(r.last_seq(1).unwrap(), 7);
    assert_eq!(r.message(1, 6).unwrap().unwrap().record.cid, "m6");
    assert!(store.stats().recoveries >= 1);
    let mut rng = StdRng::seed_from_u64(9);
    let images = disks.power_cut(&mut rng, Cut::Sectors);
    drop(store);
    check_image(images, cfg, &acked, "after a failed log fsync");
}

/// A failed commit takes with it the record that named a new sender in
/// full, and the offset it had goes to the next message: the writer
/// forgets where senders were named (`senders.rs`), so the sender's next
/// message names them again instead of pointing at that other message.
#[test]
fn a_sender_named_only_in_a_failed_commit_is_named_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disks, store) = store_that_recovers_at_once(dir.path());
    let (w, completions) = (store.writer(), store.completions(0));
    let mut token = 0;
    let mut send = |sender: &str, cid: &str| {
        token += 1;
        w.submit(0, token, WriteOp::AppendMessage(message(1, sender, cid, cid))).unwrap();
        wait_for(&completions, 1).pop().unwrap()
    };
    send("v", "v1").result.unwrap();
    // A new store appends cycle 1, to the log's file of odd cycles; the
    // write fails, so the record never reaches it.
    disks.wal[1].state.lock().unwrap().failing_writes = 1;
    let failed = send("w", "w1");
    assert!(failed.result.is_err(), "{:?}", failed.result);
    let x = once_recovered(|| send("x", "x1")).result.unwrap();
    assert_eq!(x.offset, 1, "the failed commit stored nothing, so x1 has its offset");
    send("w", "w2").result.unwrap();
    let history = store.reader().history(1, None, 10).unwrap();
    let authors: Vec<(&str, &str, &str)> = history
        .iter()
        .map(|m| (m.record.cid.as_str(), m.record.from.id.as_str(), m.record.from.name.as_str()))
        .collect();
    assert_eq!(authors, [("v1", "v", "v's name"), ("x1", "x", "x's name"), ("w2", "w", "w's name")]);
}
