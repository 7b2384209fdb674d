//! Storage benchmarks (a plain binary, not criterion: each measurement is
//! seconds long and some need a child process to kill).
//!
//! ```text
//! cargo bench -p kefu-storage --bench storage -- throughput [--messages N] [--repeats R]
//!     [--sources S] [--in-flight F] [--convs C] [--batch B] [--window-us W] [--quick-repair BOOL]
//!     [--wal BOOL]
//! cargo bench -p kefu-storage --bench storage -- reopen [--records N] [--repeats R] [--quick-repair BOOL]
//!     [--wal BOOL]
//! cargo bench -p kefu-storage --bench storage -- latency [--rate MSG_PER_S] [--seconds N] [--sources S]
//!     [--window-us W] [--quick-repair BOOL] [--wal BOOL]
//! cargo bench -p kefu-storage --bench storage -- dedupe
//! cargo bench -p kefu-storage --bench storage -- disk [--messages N] [--convs C] [--size B] [--batch B] [--index-batch K]
//! cargo bench -p kefu-storage --bench storage -- disk --analyze DIR
//! cargo bench -p kefu-storage --bench storage -- history [--messages N] [--convs C] [--pages P] [--page K]
//! cargo bench -p kefu-storage --bench storage -- blocks --store DIR [--commit N] [--whole BOOL]
//! ```
//!
//! `blocks` measures what several messages per log value would save,
//! before anyone builds it: it copies the log of the store in DIR (the
//! gateway stopped; a soak's) into fresh redb files, each run of up to K
//! consecutive messages in one value (each record after its length, as a
//! value holding several would need), grown in place as a writer appending
//! to its last value would (or, with `--whole true`, written once when
//! full), N records (2) per transaction, and prints the
//! log's bytes per message (stored, B-tree metadata, pages not filled) for
//! K = 1 (the log as kefu writes it, for comparison) to 32.
//!
//! `history` times what a pointer back for the sender costs a read: it
//! fills two stores with the same N messages over C conversations (each
//! conversation's visitor and one of 20 agents taking turns), one with
//! `sender_refs` off and one with it on, then reads P pages of the newest K
//! messages of random conversations from each, alternating, and prints
//! each store's median, p99 and mean time per page and the bytes its log
//! allocated per message.
//!
//! `disk` says where the bytes on disk go: it appends N messages of B-byte
//! texts over C conversations through group commit, each commit holding at
//! most `--batch` of them (a gateway at 2,000 msg/s commits a few at a
//! time), closes the store and prints the file's size per message, redb's
//! own accounting per table (bytes stored, B-tree overhead, pages
//! allocated but not filled) and the log records' encoded sizes field by
//! field. `--analyze DIR` does only the second part, on any store (the
//! gateway stopped), such as a soak's. Data goes to $KEFU_BENCH_DIR (a
//! tmpfs is fine here: the file's layout does not depend on fsync's speed).
//!
//! `dedupe` times `Reader::dedupe` (a miss: the common case, a new cid, and
//! a hit on the newest message) in conversations of 10 to 10,000 messages,
//! averaged over 2000 lookups each (the first one per conversation reads
//! its whole index into the readers' cache; the rest read what is new).
//!
//! `throughput` measures durable appends of ~200-byte chat messages through
//! group commit (S submitter threads, like shards, each with F appends in
//! flight, woken by `notify`) and, in the same run and alternating with it,
//! the raw redb ceiling: the same records written by one thread in
//! transactions of B records with the same durability. Medians of R runs.
//!
//! `latency` submits at a fixed rate (open loop, from S threads) and
//! measures each append from its *scheduled* submit time to the moment its
//! shard popped the completion (woken by `notify`): the storage part of an
//! ack's latency.
//!
//! `reopen` fills a store with N messages from a child process, kills it
//! with SIGKILL while it is still writing, and times `Store::open` (redb
//! recovery + counters + loading the open conversations): R times, then a
//! clean reopen for comparison.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use kefu_proto::ConvId;
use kefu_proto::client::{Msg, Sender};
use kefu_proto::ids::{ConvStatus, Role};
use kefu_storage::ceiling::Raw;
use kefu_storage::{AgentRef, ConversationRecord, Store, StoreConfig, SubmitError, WriteOp};

struct Args(HashMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                let v = it.next().unwrap_or_else(|| panic!("--{k} needs a value"));
                map.insert(k.to_string(), v.clone());
            }
        }
        Args(map)
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> T {
        match self.0.get(key) {
            Some(v) => v.parse().unwrap_or_else(|_| panic!("bad --{key} {v}")),
            None => default,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let Some(cmd) = args.first() else {
        eprintln!("usage: storage <throughput|reopen> [--option value]…  (see the file's doc comment)");
        return;
    };
    let opts = Args::parse(&args[1..]);
    match cmd.as_str() {
        "throughput" => throughput(&opts),
        "reopen" => reopen(&opts),
        "latency" => latency(&opts),
        "dedupe" => dedupe_lookup(&opts),
        "disk" => disk(&opts),
        "history" => history(&opts),
        "blocks" => blocks(&opts),
        "child-fill" => child_fill(&opts),
        other => panic!("unknown command {other}"),
    }
}

fn bench_dir(name: &str) -> PathBuf {
    // Next to the build, on the same disk as a real deployment would be:
    // not a tmpfs, where fsync is free.
    let base = std::env::var_os("KEFU_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("kefu-storage-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `start`, then `filler` over and over, cut at `len` bytes (ASCII fillers
/// only: the cut must fall on a character boundary).
fn filled(mut text: String, filler: &str, len: usize) -> String {
    while text.len() < len {
        text.push_str(filler);
    }
    text.truncate(len);
    text
}

/// A ~200-byte chat message (text 160 bytes, ids, cid).
fn message(i: u64, convs: u64) -> Msg {
    let conv = 1 + (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % convs;
    let text = filled(format!("message {i}: "), "the quick brown fox jumps over the lazy dog ", 160);
    Msg {
        conv: ConvId(conv),
        seq: 0,
        cid: format!("cid-{i:012}"),
        from: Sender { role: Role::Visitor, id: format!("visitor-{conv}"), name: "Visitor".into() },
        ts: 1_700_000_000_000 + i,
        text: Some(text),
        attachment: None,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

// ---------------------------------------------------------------------------

struct StoreRun {
    rate: f64,
    commits: u64,
    fsyncs: u64,
    batch_max: u64,
}

/// Group commit: `sources` shard threads, each with `in_flight` appends
/// outstanding, parked when idle and woken by `notify`.
fn run_store(dir: &Path, cfg: StoreConfig, per_source: Vec<Vec<Msg>>, in_flight: usize) -> StoreRun {
    let sources = per_source.len();
    let threads: Arc<Vec<OnceLock<Thread>>> = Arc::new((0..sources).map(|_| OnceLock::new()).collect());
    let notify = {
        let threads = threads.clone();
        Arc::new(move |s: usize| {
            if let Some(t) = threads[s].get() {
                t.unpark();
            }
        })
    };
    let cfg = StoreConfig { dir: dir.to_path_buf(), sources, ..cfg };
    let (store, _) = Store::open(cfg, notify).unwrap();
    let total: usize = per_source.iter().map(Vec::len).sum();
    let go = AtomicBool::new(false);
    let started = std::sync::Barrier::new(sources + 1);
    let elapsed = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (source, msgs) in per_source.into_iter().enumerate() {
            let (writer, completions, threads, go, started) =
                (store.writer(), store.completions(source), &threads, &go, &started);
            handles.push(s.spawn(move || {
                let _ = threads[source].set(std::thread::current());
                let n = msgs.len();
                let mut msgs = msgs.into_iter();
                let mut pending: Option<WriteOp> = None;
                let (mut done, mut token) = (0usize, 0u64);
                started.wait();
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                while done < n {
                    let mut progress = false;
                    while writer.in_flight(source) < in_flight {
                        let Some(op) = pending.take().or_else(|| msgs.next().map(WriteOp::AppendMessage))
                        else {
                            break;
                        };
                        match writer.submit(source, token, op) {
                            Ok(()) => token += 1,
                            Err(SubmitError::Full(op)) => {
                                pending = Some(op);
                                break;
                            }
                            Err(e) => panic!("{e}"),
                        }
                        progress = true;
                    }
                    while let Some(c) = completions.pop() {
                        c.result.expect("append failed");
                        done += 1;
                        progress = true;
                    }
                    if !progress {
                        std::thread::park_timeout(Duration::from_millis(1));
                    }
                }
                Instant::now()
            }));
        }
        started.wait();
        let t0 = Instant::now();
        go.store(true, Ordering::Release);
        let end = handles.into_iter().map(|h| h.join().unwrap()).max().unwrap();
        end - t0
    });
    let stats = store.stats();
    drop(store);
    StoreRun {
        rate: total as f64 / elapsed.as_secs_f64(),
        commits: stats.commits,
        fsyncs: stats.fsyncs,
        batch_max: stats.batch_records_max,
    }
}

/// The ceiling: one thread, one transaction per `batch` records.
fn run_ceiling(dir: &Path, quick_repair: bool, msgs: Vec<Msg>, batch: usize) -> f64 {
    let mut raw = Raw::create(dir, quick_repair, StoreConfig::default().cache_bytes).unwrap();
    let n = msgs.len();
    let t0 = Instant::now();
    for chunk in msgs.chunks(batch) {
        raw.append_batch(chunk).unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn throughput(o: &Args) {
    let messages: u64 = o.get("messages", 600_000);
    let repeats: usize = o.get("repeats", 5);
    let sources: usize = o.get("sources", 4);
    let in_flight: usize = o.get("in-flight", StoreConfig::default().submit_queue_capacity);
    let convs: u64 = o.get("convs", 10_000);
    let batch: usize = o.get("batch", StoreConfig::default().batch_max_records);
    let window_us: u64 = o.get("window-us", 0);
    let quick_repair: bool = o.get("quick-repair", true);
    // Off by default: the ceiling commits durably in redb, and so does
    // group commit without the write-ahead log (the figure's meaning
    // since it was first taken).
    let wal: bool = o.get("wal", false);
    println!(
        "throughput: {messages} messages of ~200 B over {convs} conversations; group commit: {sources} sources × \
         {in_flight} in flight, batch ≤ {batch}, window {window_us} µs, wal={wal}; ceiling: 1 thread, {batch} per \
         transaction; quick_repair={quick_repair}; {repeats} repeats, alternating"
    );
    let cfg = StoreConfig {
        batch_max_records: batch,
        batch_window_us: window_us,
        quick_repair,
        wal,
        submit_queue_capacity: in_flight.max(1),
        ..StoreConfig::default()
    };
    let (mut store_rates, mut ceiling_rates) = (Vec::new(), Vec::new());
    for r in 0..repeats {
        let all: Vec<Msg> = (0..messages).map(|i| message(i, convs)).collect();
        let mut per_source: Vec<Vec<Msg>> = (0..sources).map(|_| Vec::new()).collect();
        for (i, m) in all.iter().enumerate() {
            per_source[i % sources].push(m.clone());
        }
        // ABBA: alternate which goes first, so drift in the machine's load
        // does not favour one side.
        let ceiling_run = |all: Vec<Msg>| {
            let dir = bench_dir("ceiling");
            let rate = run_ceiling(&dir, quick_repair, all, batch);
            let _ = std::fs::remove_dir_all(&dir);
            rate
        };
        let store_run = |per_source: Vec<Vec<Msg>>| {
            let dir = bench_dir("store");
            let run = run_store(&dir, cfg.clone(), per_source, in_flight);
            let _ = std::fs::remove_dir_all(&dir);
            run
        };
        let (ceiling, run) = if r % 2 == 0 {
            let c = ceiling_run(all);
            (c, store_run(per_source))
        } else {
            let run = store_run(per_source);
            (ceiling_run(all), run)
        };
        println!(
            "  run {r}: group commit {:>9.0} msg/s ({} commits, {:.0} msg/commit avg, max {}, {} fsyncs) | \
             ceiling {:>9.0} msg/s | ratio {:.2}",
            run.rate,
            run.commits,
            messages as f64 / run.commits as f64,
            run.batch_max,
            run.fsyncs,
            ceiling,
            run.rate / ceiling
        );
        store_rates.push(run.rate);
        ceiling_rates.push(ceiling);
    }
    let ratios: Vec<f64> = store_rates.iter().zip(&ceiling_rates).map(|(s, c)| s / c).collect();
    let (s, c, r) = (median(&mut store_rates), median(&mut ceiling_rates), median(&mut ratios.clone()));
    println!(
        "median: group commit {s:.0} msg/s, ceiling {c:.0} msg/s, ratio of medians {:.2}, median ratio {r:.2}",
        s / c
    );
}

// ---------------------------------------------------------------------------

/// The child of `reopen`: fills the store to `records`, prints FILLED, then
/// keeps appending until it is killed.
fn child_fill(o: &Args) {
    let dir: PathBuf = o.get("dir", String::new()).into();
    let records: u64 = o.get("records", 1_000_000);
    let quick_repair: bool = o.get("quick-repair", true);
    let wal: bool = o.get("wal", true);
    let sources = 2;
    let convs = 10_000u64;
    let cfg = StoreConfig { dir, sources, quick_repair, wal, ..StoreConfig::default() };
    let (store, recovery) = Store::open(cfg, Arc::new(|_| {})).unwrap();
    let w = store.writer();
    if recovery.next_offset == 0 {
        // 10k conversations, one in five still open: what a restart loads.
        let c = store.completions(0);
        for id in 1..=convs {
            let status = match id % 5 {
                0 => ConvStatus::Queued,
                _ => ConvStatus::Closed,
            };
            let rec = ConversationRecord {
                id,
                visitor_id: format!("visitor-{id}"),
                status,
                agent: Some(AgentRef { id: "agent-1".into(), name: "Agent".into() }),
                group: Some("support".into()),
                created_ms: 1,
                updated_ms: 2,
                last_seq: 0,
            };
            let mut op = WriteOp::PutConversation(rec);
            loop {
                match w.submit(0, id, op) {
                    Ok(()) => break,
                    Err(e) => {
                        op = e.into_op();
                        while c.pop().is_some() {}
                    }
                }
            }
        }
        while w.in_flight(0) > 0 {
            while let Some(done) = c.pop() {
                done.result.unwrap();
            }
        }
    }
    let start = store.reader().next_offset().unwrap();
    let printed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for source in 0..sources {
            let (w, c, printed) = (store.writer(), store.completions(source), &printed);
            s.spawn(move || {
                let mut i = start * 2 + source as u64;
                let mut pending = None;
                loop {
                    while w.in_flight(source) < 4096 {
                        let op = pending.take().unwrap_or_else(|| {
                            i += sources as u64;
                            WriteOp::AppendMessage(message(i, convs))
                        });
                        if let Err(e) = w.submit(source, i, op) {
                            pending = Some(e.into_op());
                            break;
                        }
                    }
                    let mut last = None;
                    while let Some(done) = c.pop() {
                        last = Some(done.result.unwrap().offset);
                    }
                    match last {
                        Some(off) if off + 1 >= records && !printed.swap(true, Ordering::Relaxed) => {
                            println!("FILLED {}", off + 1);
                        }
                        Some(_) => {}
                        None => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            });
        }
    });
}

/// Runs the filler until it has logged `records`, lets it write on for a
/// moment, and kills it with SIGKILL.
fn fill_and_kill(dir: &Path, records: u64, quick_repair: bool, wal: bool) -> Duration {
    let t0 = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child-fill", "--dir", dir.to_str().unwrap(), "--records", &records.to_string()])
        .args(["--quick-repair", &quick_repair.to_string(), "--wal", &wal.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "filler exited");
        if line.starts_with("FILLED") {
            break;
        }
    }
    let filled = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300)); // mid-write
    child.kill().unwrap();
    child.wait().unwrap();
    filled
}

fn drop_page_cache() -> bool {
    // Needs root and a writable /proc/sys; a container may refuse.
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn reopen(o: &Args) {
    // `--store DIR`: open that store once (an older schema's is upgraded
    // first) and say how long it took.
    let store: String = o.get("store", String::new());
    if !store.is_empty() {
        let cfg = StoreConfig { dir: store.into(), sources: 2, ..StoreConfig::default() };
        let t0 = Instant::now();
        let (opened, rec) = Store::open(cfg, Arc::new(|_| {})).unwrap();
        let open = t0.elapsed();
        println!(
            "  open {:.1} ms (records {}, open conversations {}, unclean {}, write-ahead log records replayed {})",
            open.as_secs_f64() * 1e3,
            rec.next_offset,
            rec.open_conversations.len(),
            rec.unclean_shutdown,
            rec.wal_replayed
        );
        opened.close();
        return;
    }
    let records: u64 = o.get("records", 1_000_000);
    let repeats: usize = o.get("repeats", 3);
    let quick_repair: bool = o.get("quick-repair", true);
    let wal: bool = o.get("wal", true);
    let dir = bench_dir("reopen");
    let cfg = StoreConfig { dir: dir.clone(), sources: 2, quick_repair, wal, ..StoreConfig::default() };
    println!(
        "reopen after kill -9: {records} messages (+10k conversations, 2k open), quick_repair={quick_repair}, \
         wal={wal}"
    );
    let mut warm = Vec::new();
    for r in 0..repeats {
        let filled = fill_and_kill(&dir, records, quick_repair, wal);
        let t0 = Instant::now();
        let (store, rec) = Store::open(cfg.clone(), Arc::new(|_| {})).unwrap();
        let open = t0.elapsed();
        let size = std::fs::metadata(store.path()).map(|m| m.len()).unwrap_or(0);
        println!(
            "  run {r}: filler ran {:.1} s; reopen {:>7.1} ms (records {}, open conversations {}, unclean {}, \
             full repair {}, write-ahead log records replayed {}, file {} MiB)",
            filled.as_secs_f64(),
            open.as_secs_f64() * 1e3,
            rec.next_offset,
            rec.open_conversations.len(),
            rec.unclean_shutdown,
            rec.repaired,
            rec.wal_replayed,
            size >> 20
        );
        assert!(rec.next_offset >= records && rec.unclean_shutdown);
        // Drop without closing cleanly? No: the next filler run kills again.
        drop(store);
        warm.push(open.as_secs_f64() * 1e3);
    }
    // Cold: kill again, then empty the page cache before reopening.
    fill_and_kill(&dir, records, quick_repair, wal);
    if drop_page_cache() {
        let t0 = Instant::now();
        let (store, rec) = Store::open(cfg.clone(), Arc::new(|_| {})).unwrap();
        println!(
            "  cold page cache: reopen {:.1} ms (full repair {})",
            t0.elapsed().as_secs_f64() * 1e3,
            rec.repaired
        );
        drop(store);
    } else {
        println!("  cold page cache: not measured (cannot write /proc/sys/vm/drop_caches here)");
        drop(Store::open(cfg.clone(), Arc::new(|_| {})).unwrap());
    }
    let t0 = Instant::now();
    let (store, rec) = Store::open(cfg, Arc::new(|_| {})).unwrap();
    println!("  clean reopen: {:.1} ms (unclean {})", t0.elapsed().as_secs_f64() * 1e3, rec.unclean_shutdown);
    drop(store);
    println!("median reopen after kill -9 (warm page cache): {:.1} ms", median(&mut warm));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------

fn latency(o: &Args) {
    let rate: f64 = o.get("rate", 5000.0);
    let seconds: f64 = o.get("seconds", 5.0);
    let sources: usize = o.get("sources", 2);
    let window_us: u64 = o.get("window-us", 0);
    let quick_repair: bool = o.get("quick-repair", true);
    let wal: bool = o.get("wal", true);
    let convs: u64 = o.get("convs", 2000);
    let dir = bench_dir("latency");
    let threads: Arc<Vec<OnceLock<Thread>>> = Arc::new((0..sources).map(|_| OnceLock::new()).collect());
    let notify = {
        let threads = threads.clone();
        Arc::new(move |s: usize| {
            if let Some(t) = threads[s].get() {
                t.unpark();
            }
        })
    };
    let cfg = StoreConfig {
        dir: dir.clone(),
        sources,
        quick_repair,
        wal,
        batch_window_us: window_us,
        ..StoreConfig::default()
    };
    let (store, _) = Store::open(cfg, notify).unwrap();
    let per_thread = (rate * seconds / sources as f64) as u64;
    let interval = Duration::from_secs_f64(sources as f64 / rate);
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sources)
            .map(|source| {
                let (w, c, threads) = (store.writer(), store.completions(source), &threads);
                s.spawn(move || {
                    let _ = threads[source].set(std::thread::current());
                    // Offset the threads' schedules so they do not submit in lockstep.
                    let start = t0 + interval.mul_f64(source as f64 / sources as f64);
                    let mut lat = Vec::with_capacity(per_thread as usize);
                    let mut sent = 0u64;
                    while (lat.len() as u64) < per_thread {
                        let now = Instant::now();
                        while sent < per_thread && start + interval * sent as u32 <= now {
                            let i = sent * sources as u64 + source as u64;
                            w.submit(source, sent, WriteOp::AppendMessage(message(i, convs))).unwrap();
                            sent += 1;
                        }
                        while let Some(done) = c.pop() {
                            done.result.unwrap();
                            let scheduled = start + interval * done.token as u32;
                            lat.push(Instant::now().duration_since(scheduled).as_micros() as u64);
                        }
                        let next = start + interval * sent as u32;
                        let now = Instant::now();
                        if sent < per_thread && next > now {
                            std::thread::park_timeout(next - now);
                        } else if sent == per_thread {
                            std::thread::park_timeout(Duration::from_millis(1));
                        }
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let stats = store.stats();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    all.sort_unstable();
    let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    println!(
        "latency at {rate:.0} msg/s for {seconds} s from {sources} sources (window {window_us} µs, \
         quick_repair={quick_repair}, wal={wal}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; \
         {} commits ({:.1} msg/commit), {} fsyncs",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        *all.last().unwrap() as f64 / 1000.0,
        stats.commits,
        all.len() as f64 / stats.commits as f64,
        stats.fsyncs
    );
}

// ---------------------------------------------------------------------------

fn dedupe_lookup(_o: &Args) {
    let dir = bench_dir("dedupe");
    let cfg = StoreConfig { dir: dir.clone(), ..StoreConfig::default() };
    let (store, _) = Store::open(cfg, Arc::new(|_| {})).unwrap();
    let (w, c, r) = (store.writer(), store.completions(0), store.reader());
    let sizes = [10u64, 100, 1000, 10_000];
    for (conv, &n) in sizes.iter().enumerate() {
        let conv = conv as u64 + 1;
        let mut sent = 0;
        let mut done = 0;
        while done < n {
            while sent < n && w.in_flight(0) < 4096 {
                let mut m = message(sent, 1);
                m.conv = ConvId(conv);
                w.submit(0, sent, WriteOp::AppendMessage(m)).unwrap();
                sent += 1;
            }
            while let Some(x) = c.pop() {
                x.result.unwrap();
                done += 1;
            }
        }
        let sender = format!("visitor-{}", message(0, 1).conv.0);
        let reps = 2000;
        let t0 = Instant::now();
        for i in 0..reps {
            assert!(r.dedupe(Role::Visitor, &sender, conv, &format!("new-{i}")).unwrap().is_none());
        }
        let miss = t0.elapsed() / reps;
        let newest = format!("cid-{:012}", n - 1);
        let t0 = Instant::now();
        for _ in 0..reps {
            assert!(r.dedupe(Role::Visitor, &sender, conv, &newest).unwrap().is_some());
        }
        let hit = t0.elapsed() / reps;
        println!(
            "Reader::dedupe in a conversation of {n:>6} messages: miss {miss:>10.1?}, hit on the newest {hit:>10.1?}"
        );
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------

/// A chat message as `kefu-bench chat` sends it: a `size`-byte text, a cid
/// of the same shape (thread, number, scheduled ns), an anonymous
/// visitor's id and name as the gateway issues them.
fn soak_message(i: u64, convs: u64, size: usize) -> Msg {
    let conv = 1 + i % convs;
    let text = filled(format!("{i} "), "x", size);
    Msg {
        conv: ConvId(conv),
        seq: 0,
        cid: format!("{}-{i}-{}", conv % 2, 1_000_000_000_000 + i * 500_000),
        from: Sender {
            role: Role::Visitor,
            id: format!("v_{conv:016x}{:08x}", conv * 31),
            name: String::new(),
        },
        ts: 1_700_000_000_000 + i / 2,
        text: Some(text),
        attachment: None,
    }
}

/// Appends `message(0..n)` from one source, at most `in_flight` at a
/// time, and waits for every one.
fn fill(store: &Store, n: u64, in_flight: usize, message: impl Fn(u64) -> Msg) {
    let (w, c) = (store.writer(), store.completions(0));
    let (mut sent, mut done) = (0u64, 0u64);
    while done < n {
        while sent < n && w.in_flight(0) < in_flight {
            w.submit(0, sent, WriteOp::AppendMessage(message(sent))).unwrap();
            sent += 1;
        }
        match c.pop() {
            Some(x) => {
                x.result.unwrap();
                done += 1;
            }
            None => std::thread::yield_now(),
        }
    }
}

fn disk(o: &Args) {
    if let Some(dir) = o.0.get("analyze") {
        analyze(Path::new(dir), None);
        return;
    }
    let messages: u64 = o.get("messages", 1_000_000);
    let convs: u64 = o.get("convs", 2_000);
    let size: usize = o.get("size", 100);
    let batch: usize = o.get("batch", 4);
    let index_batch: usize = o.get("index-batch", StoreConfig::default().index_batch);
    let dir = bench_dir("disk");
    println!(
        "disk: {messages} messages of {size}-byte texts over {convs} conversations, commits of at most {batch}, \
         index entries {index_batch} at a time, in {}",
        dir.display()
    );
    let cfg =
        StoreConfig { dir: dir.clone(), submit_queue_capacity: batch, index_batch, ..StoreConfig::default() };
    let (store, _) = Store::open(cfg, Arc::new(|_| {})).unwrap();
    let t0 = Instant::now();
    fill(&store, messages, batch, |i| soak_message(i, convs, size));
    let commits = store.stats().commits;
    println!(
        "  written in {:.1?}, {commits} commits ({:.1} messages each)",
        t0.elapsed(),
        messages as f64 / commits as f64
    );
    drop(store);
    analyze(&dir, Some(messages));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A message of `history`'s: conversation `i % convs`, its visitor and an
/// agent taking turns, a 100-byte text.
fn turn_message(i: u64, convs: u64) -> Msg {
    let conv = 1 + i % convs;
    let turn = i / convs;
    let from = if turn.is_multiple_of(2) {
        Sender { role: Role::Visitor, id: format!("v_{conv:016x}{:08x}", conv * 31), name: "Visitor".into() }
    } else {
        let agent = conv % 20;
        Sender {
            role: Role::Agent,
            id: format!("agent-{agent:03}@example.com"),
            name: format!("Agent {agent}"),
        }
    };
    let text = filled(format!("{i} "), "how can I help you today? ", 100);
    Msg {
        conv: ConvId(conv),
        seq: 0,
        cid: format!("{}-{i}-{}", conv % 2, 1_000_000_000_000 + i * 500_000),
        from,
        ts: 1_700_000_000_000 + i,
        text: Some(text),
        attachment: None,
    }
}

fn history(o: &Args) {
    let messages: u64 = o.get("messages", 400_000);
    let convs: u64 = o.get("convs", 2_000);
    let pages: usize = o.get("pages", 20_000);
    let page: usize = o.get("page", 50);
    println!(
        "history: {messages} messages over {convs} conversations (visitor and agent taking turns), \
         {pages} pages of the newest {page} from each store, alternating"
    );
    let stores: Vec<(&str, PathBuf, Store)> = [("senders in full", 0usize), ("pointers back", 1 << 16)]
        .into_iter()
        .map(|(name, sender_refs)| {
            let dir = bench_dir(if sender_refs == 0 { "history-full" } else { "history-refs" });
            let cfg = StoreConfig {
                dir: dir.clone(),
                submit_queue_capacity: 64,
                sender_refs,
                ..StoreConfig::default()
            };
            let (store, _) = Store::open(cfg, Arc::new(|_| {})).unwrap();
            fill(&store, messages, 64, |i| turn_message(i, convs));
            (name, dir, store)
        })
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(pages); stores.len()];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..pages {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let conv = 1 + rng % convs;
        for (k, (_, _, store)) in stores.iter().enumerate() {
            let r = store.reader();
            let t = Instant::now();
            let got = r.history(conv, None, page).unwrap();
            times[k].push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(got.len(), page.min((messages / convs) as usize));
            std::hint::black_box(got);
        }
    }
    for ((name, dir, store), mut t) in stores.into_iter().zip(times) {
        drop(store);
        let db = redb::Database::open(dir.join("kefu.redb")).unwrap();
        let w = db.begin_write().unwrap();
        let allocated = w.stats().unwrap().allocated_pages() * 4096;
        w.abort().unwrap();
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        // `median` sorts `t`, which the p99 reads after it.
        let median = median(&mut t);
        let p99 = t[(t.len() * 99 / 100).min(t.len() - 1)];
        println!(
            "  {name:>15}: a page of {page} in {median:.1} µs median, {p99:.1} µs p99, {mean:.1} µs mean ({:.2} µs a message); \
             {:.1} bytes allocated per message",
            mean / page as f64,
            allocated as f64 / messages as f64
        );
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The tables `analyze` looks at, as `tables.rs` defines them.
const LOG: redb::TableDefinition<kefu_storage::LogOffset, &[u8]> = redb::TableDefinition::new("log40");
/// The log of a store from before schema version 16, keyed by `u64`.
const LOG_V15: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");

/// Calls `visit` with each of the log's (offset, value), in offset order,
/// and gives back its table's stats and length: from `log40`, or from
/// `log` in a store from before schema version 16 (whose value bytes it
/// then counts as repacked: the stats are the old table's own).
fn scan_log(r: &redb::ReadTransaction, mut visit: impl FnMut(u64, &[u8])) -> (redb::TableStats, u64) {
    use redb::{ReadableTable, ReadableTableMetadata};
    if let Ok(log) = r.open_table(LOG) {
        for e in log.iter().unwrap() {
            let (k, v) = e.unwrap();
            visit(k.value(), v.value());
        }
        return (log.stats().unwrap(), log.len().unwrap());
    }
    // Its packed messages as this build reads them (the upgrade repacks
    // them the same way), the stats those of the table as it is.
    let log = r.open_table(LOG_V15).unwrap();
    for e in log.iter().unwrap() {
        let (k, v) = e.unwrap();
        match kefu_storage::repack_v15(v.value()).unwrap() {
            Some(repacked) => visit(k.value(), &repacked),
            None => visit(k.value(), v.value()),
        }
    }
    (log.stats().unwrap(), log.len().unwrap())
}
const CONV_RUNS: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("conv_runs");
/// The conversation index of a store from before schema version 11.
const CONV_INDEX_V10: redb::TableDefinition<(u64, u64), (u64, u64)> =
    redb::TableDefinition::new("conv_index");
const CONVERSATIONS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("conversations");
const USERS: redb::TableDefinition<(&str, &str), &[u8]> = redb::TableDefinition::new("users");
const USER_CONVERSATIONS: redb::TableDefinition<(&str, u64), ()> =
    redb::TableDefinition::new("user_conversations");
const CONV_CHANGES: redb::TableDefinition<u64, u8> = redb::TableDefinition::new("conv_changes");

fn analyze(dir: &Path, expected: Option<u64>) {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let path = dir.join("kefu.redb");
    let file = std::fs::metadata(&path).unwrap().len();
    let db = redb::Database::open(&path).unwrap();
    let w = db.begin_write().unwrap();
    let s = w.stats().unwrap();
    w.abort().unwrap();
    let page = s.page_size() as u64;
    let r = db.begin_read().unwrap();
    // Field by field, over the messages of the log.
    let (mut n, mut value, mut text, mut cid, mut id, mut name, mut others, mut other_bytes) =
        (0u64, 0, 0, 0, 0, 0, 0u64, 0);
    // Messages that point back for their sender rather than name them.
    let mut pointing = 0u64;
    // The other records by kind: count and bytes.
    let mut kinds: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    let (log_stats, log_len) = scan_log(&r, |_, bytes| {
        let view = kefu_storage::view_log_record(bytes).unwrap();
        if let kefu_storage::LogView::Message(m) = view {
            n += 1;
            value += bytes.len() as u64;
            text += m.text.map_or(0, |t| t.len()) as u64;
            cid += kefu_storage::stored_cid_bytes(m.cid.as_str()) as u64;
            id += m.sender_id.len() as u64;
            name += m.sender_name.len() as u64;
            pointing += u64::from(m.sender_back.is_some());
            return;
        }
        match view.to_owned().unwrap() {
            kefu_storage::LogRecord::Message(_) => unreachable!("a message above"),
            other => {
                others += 1;
                other_bytes += bytes.len() as u64;
                let kind = match other {
                    kefu_storage::LogRecord::Conversation(_) => "conversation",
                    kefu_storage::LogRecord::User(_) => "user",
                    kefu_storage::LogRecord::Read(_) => "read",
                    _ => "presence",
                };
                let e = kinds.entry(kind).or_default();
                e.0 += 1;
                e.1 += bytes.len() as u64;
            }
        }
    });
    if let Some(e) = expected {
        assert_eq!(n, e, "messages in the log");
    }
    let per = |x: u64| x as f64 / n.max(1) as f64;
    println!(
        "  file {file} bytes for {n} messages (+{others} other records): {:.1} bytes per message",
        per(file)
    );
    println!(
        "  a message's log value: {:.1} bytes = text {:.1} + cid {:.1} (as stored: packed if it can be) + sender id {:.1} \
         + name {:.1} + the rest {:.1} (format byte, fixed fields, lengths or string headers, tags)",
        per(value),
        per(text),
        per(cid),
        per(id),
        per(name),
        per(value - text - cid - id - name)
    );
    println!("  messages naming their sender in full: {}, pointing back for it: {pointing}", n - pointing);
    println!("  other log records: {others}, {other_bytes} bytes");
    for (kind, (count, bytes)) in &kinds {
        println!("    {kind:>12}: {count} records, {bytes} bytes, {:.1} each", *bytes as f64 / *count as f64);
    }
    println!(
        "  redb: {} pages of {page} B allocated ({:.1} per message), {} bytes of the file not allocated ({:.1} per message)",
        s.allocated_pages(),
        per(s.allocated_pages() * page),
        file.saturating_sub(s.allocated_pages() * page),
        per(file.saturating_sub(s.allocated_pages() * page))
    );
    // stored, B-tree metadata, fragmented, leaf pages, branch pages, height
    let row = |name: &str,
               what: String,
               [stored, metadata, fragmented, leaves, branches, height]: [u64; 6]| {
        println!(
            "  {name:>13}: {what}stored {:>6.1}, metadata {:>5.1}, fragmented (allocated, unfilled) {:>6.1} bytes \
             per message; {leaves} leaf + {branches} branch pages (of {page} B), height {height}",
            per(stored),
            per(metadata),
            per(fragmented),
        )
    };
    let all = [
        s.stored_bytes(),
        s.metadata_bytes(),
        s.fragmented_bytes(),
        s.leaf_pages(),
        s.branch_pages(),
        s.tree_height().into(),
    ];
    row("all trees", String::new(), all);
    let table = |name: &str, st: redb::TableStats, len: u64| {
        let stats = [
            st.stored_bytes(),
            st.metadata_bytes(),
            st.fragmented_bytes(),
            st.leaf_pages(),
            st.branch_pages(),
            st.tree_height().into(),
        ];
        row(name, format!("{len:>9} entries; "), stats);
    };
    table("log", log_stats, log_len);
    if let Ok(t) = r.open_table(CONV_RUNS) {
        table("conv_runs", t.stats().unwrap(), t.len().unwrap());
    }
    if let Ok(t) = r.open_table(CONV_INDEX_V10) {
        table("conv_index", t.stats().unwrap(), t.len().unwrap());
    }
    if let Ok(t) = r.open_table(CONVERSATIONS) {
        table("conversations", t.stats().unwrap(), t.len().unwrap());
    }
    if let Ok(t) = r.open_table(USERS) {
        table("users", t.stats().unwrap(), t.len().unwrap());
    }
    if let Ok(t) = r.open_table(USER_CONVERSATIONS) {
        table("user_convs", t.stats().unwrap(), t.len().unwrap());
    }
    if let Ok(t) = r.open_table(CONV_CHANGES) {
        table("conv_changes", t.stats().unwrap(), t.len().unwrap());
    }
}

fn blocks(o: &Args) {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let store: String = o.get("store", String::new());
    assert!(!store.is_empty(), "blocks needs --store DIR");
    let per_txn: usize = o.get("commit", 2);
    // Each value written once, when it holds its K messages (a writer
    // that keeps the newest messages in memory until then), rather than
    // grown in place.
    let whole: bool = o.get("whole", false);
    let db = redb::Database::open(Path::new(&store).join("kefu.redb")).unwrap();
    let r = db.begin_read().unwrap();
    let mut records: Vec<(u64, Vec<u8>, bool)> = Vec::new();
    scan_log(&r, |offset, bytes| {
        let message = matches!(kefu_storage::view_log_record(bytes), Ok(kefu_storage::LogView::Message(_)));
        records.push((offset, bytes.to_vec(), message));
    });
    let messages = records.iter().filter(|r| r.2).count() as f64;
    println!(
        "  {} log records, {messages} messages; {per_txn} records per transaction; values {}; bytes per message:",
        records.len(),
        if whole { "written whole" } else { "grown in place" }
    );
    let out = bench_dir("blocks");
    std::fs::create_dir_all(&out).unwrap();
    let mut base = None;
    for k in [1usize, 2, 4, 8, 16, 32] {
        let path = out.join(format!("blocks-{k}.redb"));
        let db = redb::Database::create(&path).unwrap();
        // (key, value) of the value being grown.
        let mut open: Option<(u64, Vec<u8>, usize)> = None;
        for chunk in records.chunks(per_txn) {
            let mut txn = db.begin_write().unwrap();
            txn.set_durability(redb::Durability::None).unwrap();
            {
                let mut t = txn.open_table(LOG).unwrap();
                for (offset, bytes, message) in chunk {
                    if k == 1 || !message {
                        if let Some((key, value, _)) = open.take().filter(|(_, _, n)| whole && *n < k) {
                            t.insert(key, value.as_slice()).unwrap();
                        }
                        t.insert(offset, bytes.as_slice()).unwrap();
                        continue;
                    }
                    match &mut open {
                        Some((key, value, n)) if *n < k => {
                            put_len(value, bytes.len());
                            value.extend_from_slice(bytes);
                            *n += 1;
                            if !whole || *n == k {
                                t.insert(*key, value.as_slice()).unwrap();
                            }
                        }
                        _ => {
                            // A format byte for the value, then its records.
                            let mut value = vec![0xff];
                            put_len(&mut value, bytes.len());
                            value.extend_from_slice(bytes);
                            if !whole {
                                t.insert(offset, value.as_slice()).unwrap();
                            }
                            open = Some((*offset, value, 1));
                        }
                    }
                }
            }
            txn.commit().unwrap();
        }
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(redb::Durability::Immediate).unwrap();
        txn.commit().unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(LOG).unwrap();
        let st = t.stats().unwrap();
        let [stored, metadata, unfilled] =
            [st.stored_bytes(), st.metadata_bytes(), st.fragmented_bytes()].map(|b| b as f64 / messages);
        let total = stored + metadata + unfilled;
        let vs = base.map_or(String::new(), |b: f64| format!(", {:+.1} against K = 1", total - b));
        base.get_or_insert(total);
        println!(
            "  K = {k:>2}: {} values; stored {stored:.1} + metadata {metadata:.1} + unfilled {unfilled:.1} = {total:.1}{vs}",
            t.len().unwrap()
        );
        drop((t, r, db));
        std::fs::remove_file(&path).unwrap();
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// A record's length before it, as a LEB128 varint.
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}
