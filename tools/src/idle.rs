//! `kefu-bench idle`: how much server memory one idle WebSocket costs.
//!
//! The method: read the server's `VmRSS`, open N connections and complete
//! the handshake on each, let them sit, read `VmRSS` again, divide the
//! difference by the connections that are actually up. The connections are
//! real clients, not half-open sockets: each keeps a read posted, answers
//! pings, and notices if the server drops it, so a server that sheds idle
//! connections is caught rather than flattered.
//!
//! # Getting past this host's limits
//!
//! A process here may hold 20,000 descriptors, and one source address has
//! about 28,000 ephemeral ports per destination. So the connections are
//! spread over `--sources` (each socket is bound to its source address
//! before connecting) and over `--processes` child processes, each one this
//! same binary running the hidden `idle-worker` subcommand with its share.
//! The parent holds no sockets: it samples the server, tells the workers
//! when to close (a line on their stdin; EOF works too, so a dying parent
//! takes its workers' connections with it), and adds up their reports.
//!
//! # Failing loudly
//!
//! Every connection that could not be opened is counted by the limit it met
//! (`connect: EMFILE`, `connect: EADDRNOTAVAIL`, `timeout`, …), the server's
//! open descriptors are compared with its own limit, and a run that fell
//! short says so on stderr and exits non-zero after printing its report.
//! Every wait is bounded: per-attempt `--connect-timeout-ms`, the whole ramp
//! by `--ramp-timeout`, the hold by `--hold`, the close by `--close-timeout`.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    future::poll_fn,
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    process::{Child, Command, Stdio},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use monoio::{
    io::{AsyncReadRent as _, AsyncWriteRentExt as _},
    net::TcpStream,
};
use serde::{Deserialize, Serialize};

use crate::{
    echo::{TaskRun, build_runtime},
    progress::{Goal, Phase, Progress, Snapshot},
    report::{self, Output, Table},
    stats,
    ws::{self, Event, FrameReader, WsUrl},
};

/// Arguments of `kefu-bench idle`.
#[derive(Debug, clap::Args)]
pub struct IdleArgs {
    /// WebSocket endpoint to hold connections to (ws:// only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws/echo")]
    pub url: String,

    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,

    /// Source addresses to spread connections over (comma list, all in
    /// 127.0.0.0/8 on Linux work without configuration).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub sources: Vec<IpAddr>,

    /// Seconds to hold all connections after they are up.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,

    /// Seconds after the last connection is up before the "settled" sample.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,

    /// The server process whose memory is measured.
    #[arg(long)]
    pub server_pid: u32,

    /// Client processes. Unset: enough that none holds more than
    /// --fds-per-process connections.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: Option<u32>,

    /// Most connections one client process opens when --processes is unset
    /// (this host's hard limit is 20,000 descriptors per process).
    #[arg(long, default_value_t = 18_000)]
    pub fds_per_process: u32,

    #[command(flatten)]
    pub ramp: RampArgs,
}

/// Knobs of opening and closing, shared by the parent and its workers.
#[derive(Debug, Clone, clap::Args)]
pub struct RampArgs {
    /// Bound on one connection's TCP connect plus handshake, milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub connect_timeout_ms: u64,

    /// Bound in seconds on opening all connections; attempts not started by
    /// then are reported as "not attempted".
    #[arg(long, default_value_t = 60.0)]
    pub ramp_timeout: f64,

    /// Handshakes in flight at once per process. Keep it under the
    /// server's listen backlog (often 128): past it, dropped SYNs come back
    /// only after a 1 s retransmit and the ramp crawls.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub ramp_concurrency: u32,

    /// Seconds to wait for close handshakes at the end.
    #[arg(long, default_value_t = 5.0)]
    pub close_timeout: f64,

    /// Sec-WebSocket-Protocol to request, if any.
    #[arg(long)]
    pub subprotocol: Option<String>,

    /// io_uring submission queue entries per process.
    #[arg(long, default_value_t = 4096)]
    pub ring_entries: u32,

    /// Allow a URL or source outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_non_loopback: bool,
}

/// Arguments of the hidden `idle-worker` subcommand (one client process).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub connections: u32,
    /// Global index of this worker's first connection, so that source
    /// addresses rotate across workers as if one process opened them all.
    #[arg(long, default_value_t = 0)]
    pub first_index: u32,
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub sources: Vec<IpAddr>,
    #[command(flatten)]
    pub ramp: RampArgs,
}

/// What a worker tells its parent, one JSON line per event.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerLine {
    /// "up" after the ramp, "closed" at the end.
    event: String,
    connected: u32,
    failed: u32,
    /// Failures (ramp) or drops (hold) by kind.
    errors: BTreeMap<String, u64>,
    ramp_s: f64,
    dropped_during_hold: u32,
    closed_clean: u32,
    closed_unclean: u32,
}

/// The result of an idle run: printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub url: String,
    pub connections: u32,
    pub connected: u32,
    pub failed: u32,
    pub error_kinds: BTreeMap<String, u64>,
    pub processes: u32,
    pub sources: Vec<IpAddr>,
    pub ramp_s: f64,
    pub hold_s: f64,
    pub server_pid: u32,
    pub rss_before_bytes: u64,
    pub rss_settled_bytes: u64,
    pub rss_end_bytes: u64,
    pub rss_after_close_bytes: Option<u64>,
    /// (end − before) / connected.
    pub bytes_per_conn: Option<f64>,
    pub kb_per_conn: Option<f64>,
    /// (settled − before) / connected.
    pub bytes_per_conn_settled: Option<f64>,
    pub server_fds_open: Option<u64>,
    pub server_fd_limit: Option<u64>,
    pub dropped_during_hold: u32,
    pub closed_clean: u32,
    pub closed_unclean: u32,
}

pub fn run(args: IdleArgs, out: &Output) -> anyhow::Result<()> {
    WsUrl::parse(&args.url, args.ramp.allow_non_loopback)?;
    check_sources(&args.sources, args.ramp.allow_non_loopback)?;
    if !(args.hold >= 0.0 && args.settle >= 0.0 && args.ramp.close_timeout >= 0.0) {
        bail!("--hold, --settle and --close-timeout must be ≥ 0");
    }
    let pid = args.server_pid;
    let processes = args
        .processes
        .unwrap_or_else(|| args.connections.div_ceil(args.fds_per_process.max(1)))
        .min(args.connections);
    let per_process_max = args.connections.div_ceil(processes);
    if per_process_max > args.fds_per_process {
        eprintln!(
            "WARNING: {per_process_max} connections per process exceeds --fds-per-process {}; \
             expect EMFILE",
            args.fds_per_process
        );
    }

    let rss_before =
        stats::process_rss_bytes(pid).with_context(|| format!("is the server pid {pid} right?"))?;
    eprintln!(
        "idle: server {pid} RSS {:.1} MiB before; opening {} connections from {} process(es) over {} source(s)",
        mib(rss_before),
        args.connections,
        processes,
        args.sources.len()
    );

    // The workers are other processes: the bar knows the connections only
    // once they report, and fills with time meanwhile.
    let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = Progress::start("idle", {
        let held = held.clone();
        move || Snapshot { connections: held.load(Ordering::Relaxed), ..Snapshot::default() }
    });
    progress.phase(Phase::Connecting, Goal::Time(Duration::from_secs_f64(args.ramp.ramp_timeout)));

    // Start the workers, each with a contiguous share of the indices.
    let (lines_tx, lines_rx) = mpsc::channel::<(usize, String)>();
    let mut workers: Vec<Child> = Vec::new();
    let mut first_index = 0;
    for worker in 0..processes {
        let share = args.connections / processes + u32::from(worker < args.connections % processes);
        let mut child = spawn_worker(&args, share, first_index)?;
        first_index += share;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("worker has no stdout pipe"))?;
        let tx = lines_tx.clone();
        let index = workers.len();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((index, line)).is_err() {
                    break;
                }
            }
        });
        workers.push(child);
    }
    drop(lines_tx);

    // Ramp: wait for every worker's "up", bounded.
    let ramp_deadline = Instant::now()
        + Duration::from_secs_f64(args.ramp.ramp_timeout)
        + Duration::from_millis(args.ramp.connect_timeout_ms)
        + Duration::from_secs(5);
    let ups = collect(&lines_rx, workers.len(), "up", ramp_deadline);
    let mut connected = 0;
    let mut failed = 0;
    let mut error_kinds = BTreeMap::new();
    let mut ramp_s: f64 = 0.0;
    for (worker, up) in ups.iter().enumerate() {
        match up {
            Some(up) => {
                connected += up.connected;
                failed += up.failed;
                ramp_s = ramp_s.max(up.ramp_s);
                for (kind, n) in &up.errors {
                    *error_kinds.entry(kind.clone()).or_default() += n;
                }
            }
            None => {
                eprintln!("WARNING: worker {worker} did not report its ramp in time");
                *error_kinds.entry("worker did not report in time".to_owned()).or_default() += 1;
            }
        }
    }
    progress.println(&format!("idle: {connected} up, {failed} failed, ramp {ramp_s:.1} s; holding"));
    held.store(u64::from(connected), Ordering::Relaxed);
    progress.phase(Phase::Measuring, Goal::Time(Duration::from_secs_f64(args.hold)));

    // Hold: one sample once settled, one at the end of the hold.
    let up_at = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.settle.min(args.hold)));
    let rss_settled = stats::process_rss_bytes(pid)?;
    std::thread::sleep(
        (up_at + Duration::from_secs_f64(args.hold)).saturating_duration_since(Instant::now()),
    );
    let rss_end = stats::process_rss_bytes(pid)?;
    let (server_fds_open, server_fd_limit) = match stats::process_fds(pid) {
        Ok((open, limit)) => (Some(open), limit),
        Err(e) => {
            eprintln!("note: cannot count the server's descriptors: {e:#}");
            (None, None)
        }
    };

    // Close: tell every worker, then wait for their reports, bounded.
    progress.phase(Phase::Draining, Goal::Time(Duration::from_secs_f64(args.ramp.close_timeout)));
    for worker in &mut workers {
        if let Some(mut stdin) = worker.stdin.take() {
            // A worker that already died cannot be told; its exit is
            // reported below.
            let _ = stdin.write_all(b"close\n");
        }
    }
    let close_deadline =
        Instant::now() + Duration::from_secs_f64(args.ramp.close_timeout) + Duration::from_secs(5);
    let closes = collect(&lines_rx, workers.len(), "closed", close_deadline);
    let mut dropped_during_hold = 0;
    let mut closed_clean = 0;
    let mut closed_unclean = 0;
    for closed in closes.iter().flatten() {
        dropped_during_hold += closed.dropped_during_hold;
        closed_clean += closed.closed_clean;
        closed_unclean += closed.closed_unclean;
        for (kind, n) in &closed.errors {
            *error_kinds.entry(format!("during hold: {kind}")).or_default() += n;
        }
    }
    reap(&mut workers);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_close = stats::process_rss_bytes(pid).ok();
    drop(progress);

    let per_conn =
        |rss: u64| (connected > 0).then(|| (rss as f64 - rss_before as f64) / f64::from(connected));
    let report = IdleReport {
        url: args.url.clone(),
        connections: args.connections,
        connected,
        failed,
        error_kinds,
        processes,
        sources: args.sources.clone(),
        ramp_s,
        hold_s: args.hold,
        server_pid: pid,
        rss_before_bytes: rss_before,
        rss_settled_bytes: rss_settled,
        rss_end_bytes: rss_end,
        rss_after_close_bytes: rss_after_close,
        bytes_per_conn: per_conn(rss_end),
        kb_per_conn: per_conn(rss_end).map(|b| b / 1024.0),
        bytes_per_conn_settled: per_conn(rss_settled),
        server_fds_open,
        server_fd_limit,
        dropped_during_hold,
        closed_clean,
        closed_unclean,
    };
    out.emit(&report, &table(&report), &[])?;
    conclude(&report)
}

fn check_sources(sources: &[IpAddr], allow_non_loopback: bool) -> anyhow::Result<()> {
    if sources.is_empty() {
        bail!("--sources needs at least one address");
    }
    for source in sources {
        if !allow_non_loopback && !source.is_loopback() {
            bail!("source {source} is not a loopback address");
        }
    }
    Ok(())
}

fn spawn_worker(args: &IdleArgs, connections: u32, first_index: u32) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let sources: Vec<String> = args.sources.iter().map(ToString::to_string).collect();
    let ramp = &args.ramp;
    let mut command = Command::new(exe);
    command
        .arg("idle-worker")
        .args(["--url", &args.url])
        .args(["--connections", &connections.to_string()])
        .args(["--first-index", &first_index.to_string()])
        .args(["--sources", &sources.join(",")])
        .args(["--connect-timeout-ms", &ramp.connect_timeout_ms.to_string()])
        .args(["--ramp-timeout", &ramp.ramp_timeout.to_string()])
        .args(["--ramp-concurrency", &ramp.ramp_concurrency.to_string()])
        .args(["--close-timeout", &ramp.close_timeout.to_string()])
        .args(["--ring-entries", &ramp.ring_entries.to_string()]);
    if let Some(protocol) = &ramp.subprotocol {
        command.args(["--subprotocol", protocol]);
    }
    if ramp.allow_non_loopback {
        command.arg("--allow-non-loopback");
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting an idle worker")
}

/// Waits until every worker has sent an `event` line or `deadline` passes.
fn collect(
    lines: &mpsc::Receiver<(usize, String)>,
    workers: usize,
    event: &str,
    deadline: Instant,
) -> Vec<Option<WorkerLine>> {
    let mut got: Vec<Option<WorkerLine>> = (0..workers).map(|_| None).collect();
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((worker, line)) = lines.recv_timeout(left) else {
            break;
        };
        match serde_json::from_str::<WorkerLine>(&line) {
            Ok(parsed) if parsed.event == event => got[worker] = Some(parsed),
            Ok(_) => {}
            Err(_) => eprintln!("worker {worker}: {line}"),
        }
    }
    got
}

/// Waits briefly for the workers to exit, then kills the ones that did not
/// (each by its own pid: they are our children).
fn reap(workers: &mut [Child]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    for worker in workers.iter_mut() {
        loop {
            match worker.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        eprintln!("WARNING: idle worker {} exited with {status}", worker.id());
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    eprintln!("WARNING: idle worker {} did not exit; killing it", worker.id());
                    let _ = worker.kill();
                    let _ = worker.wait();
                    break;
                }
            }
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The limit a failure kind most likely means, for the loud summary.
fn explain(kind: &str) -> &'static str {
    if kind.contains("EMFILE") {
        "this client process ran out of descriptors (use more --processes)"
    } else if kind.contains("ENFILE") {
        "the system-wide file table is full"
    } else if kind.contains("EADDRNOTAVAIL") || kind.contains("EADDRINUSE") {
        "ephemeral ports exhausted for a source address (add --sources)"
    } else if kind.contains("ECONNREFUSED") {
        "nothing listening, or the server's accept backlog overflowed"
    } else if kind.contains("timeout") {
        "the server did not answer in time (its descriptor limit? its backlog?)"
    } else if kind.contains("ECONNRESET") || kind.contains("closed") {
        "the server closed connections (its own limit or idle timeout?)"
    } else if kind.contains("not attempted") {
        "the ramp ran out of time (--ramp-timeout)"
    } else {
        "see the kind"
    }
}

/// The run's results as a table.
fn table(report: &IdleReport) -> Table {
    let mut table = Table::new(format!(
        "idle: {} connections from {} process(es) over {} source(s), held {:.0} s",
        report.connections,
        report.processes,
        report.sources.len(),
        report.hold_s
    ));
    table
        .section("connections")
        .row("held", format!("{}/{}", report.connected, report.connections))
        .row("ramp", format!("{:.1} s", report.ramp_s))
        .row("dropped during the hold", report.dropped_during_hold.to_string())
        .row("closed clean / unclean", format!("{} / {}", report.closed_clean, report.closed_unclean));
    table
        .section("server memory")
        .row("RSS before", report::mib(report.rss_before_bytes))
        .row("RSS settled", report::mib(report.rss_settled_bytes))
        .row("RSS at the end of the hold", report::mib(report.rss_end_bytes))
        .row_opt("RSS after close", report.rss_after_close_bytes.map(report::mib))
        .row_opt("per connection", report.bytes_per_conn.map(|b| format!("{b:.0} B ({:.2} KiB)", b / 1024.0)))
        .row_opt("per connection, settled", report.bytes_per_conn_settled.map(|b| format!("{b:.0} B")));
    if let (Some(open), Some(limit)) = (report.server_fds_open, report.server_fd_limit) {
        table.row("server descriptors", format!("{open} of {limit}"));
    }
    for (kind, n) in &report.error_kinds {
        table.row(format!("error: {kind}"), n.to_string());
    }
    table
}

/// Says loudly what fell short, and fails the run if connections were not
/// held.
fn conclude(report: &IdleReport) -> anyhow::Result<()> {
    if report.bytes_per_conn.is_none() {
        eprintln!("idle: no connection was opened; nothing to divide by");
    }
    let failed = report.connections.saturating_sub(report.connected);
    if failed > 0 || !report.error_kinds.is_empty() {
        eprintln!("FAILED: {failed} of {} connections were not held:", report.connections);
        for (kind, n) in &report.error_kinds {
            eprintln!("  ×{n} {kind} — {}", explain(kind));
        }
    }
    if let (Some(open), Some(limit)) = (report.server_fds_open, report.server_fd_limit)
        && open + 16 >= limit
    {
        eprintln!("FAILED: the server holds {open} descriptors of its limit {limit}");
    }
    if report.dropped_during_hold > 0 {
        eprintln!("WARNING: the server dropped {} connections during the hold", report.dropped_during_hold);
    }
    if failed > 0 || report.dropped_during_hold > 0 {
        bail!(
            "{} connections requested, {} held to the end",
            report.connections,
            report.connected - report.dropped_during_hold.min(report.connected)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The worker: one process's share of the connections.

/// Entry point of `idle-worker`.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let url = WsUrl::parse(&args.url, args.ramp.allow_non_loopback)?;
    check_sources(&args.sources, args.ramp.allow_non_loopback)?;
    raise_fd_limit(u64::from(args.connections) + 64);

    // The parent says "close" on stdin; EOF (the parent died) means the
    // same. A thread blocks on the pipe so the runtime never has to.
    let close_now = Arc::new(AtomicBool::new(false));
    {
        let close_now = close_now.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            // Any line, EOF or error: all mean close.
            let _ = std::io::stdin().read_line(&mut line);
            close_now.store(true, Ordering::Release);
        });
    }

    let mut runtime = build_runtime(None, args.ramp.ring_entries, TaskRun::Defer)?;
    runtime.block_on(worker_main(args, url, close_now))
}

async fn worker_main(args: WorkerArgs, url: WsUrl, close_now: Arc<AtomicBool>) -> anyhow::Result<()> {
    let ramp = &args.ramp;
    let connect_timeout = Duration::from_millis(ramp.connect_timeout_ms);
    let started = Instant::now();
    let ramp_deadline = started + Duration::from_secs_f64(ramp.ramp_timeout);
    let signal = Rc::new(CloseSignal::default());
    let drops = Rc::new(RefCell::new(BTreeMap::<String, u64>::new()));
    let mask: [u8; 4] = rand::random();
    let close_limit = Duration::from_secs_f64(ramp.close_timeout);

    let mut up = WorkerLine { event: "up".into(), ..WorkerLine::default() };
    let mut holders = Vec::with_capacity(args.connections as usize);
    let indices: Vec<u32> = (args.first_index..args.first_index + args.connections).collect();
    for chunk in indices.chunks(ramp.ramp_concurrency as usize) {
        if Instant::now() >= ramp_deadline {
            let left = args.first_index + args.connections - chunk[0];
            *up.errors.entry("not attempted: --ramp-timeout reached".into()).or_default() += u64::from(left);
            up.failed += left;
            break;
        }
        let mut opening = Vec::with_capacity(chunk.len());
        for &index in chunk {
            let source = args.sources[index as usize % args.sources.len()];
            let url = url.clone();
            let protocol = ramp.subprotocol.clone();
            opening.push(monoio::spawn(async move {
                ws::open(&url, Some(source), protocol.as_deref(), connect_timeout).await
            }));
        }
        for handle in opening {
            match handle.await {
                Ok((stream, leftover)) => {
                    up.connected += 1;
                    let (signal, drops) = (signal.clone(), drops.clone());
                    holders.push(monoio::spawn(async move {
                        hold(stream, leftover, &signal, &drops, mask, close_limit).await
                    }));
                }
                Err(kind) => {
                    up.failed += 1;
                    *up.errors.entry(kind).or_default() += 1;
                }
            }
        }
    }
    up.ramp_s = started.elapsed().as_secs_f64();
    say(&up)?;

    while !close_now.load(Ordering::Acquire) {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    signal.close();

    let mut closed = WorkerLine { event: "closed".into(), connected: up.connected, ..WorkerLine::default() };
    let deadline = monoio::time::Instant::now() + close_limit + Duration::from_secs(1);
    for handle in holders {
        match monoio::time::timeout_at(deadline, handle).await {
            Ok(Held::ClosedClean) => closed.closed_clean += 1,
            Ok(Held::ClosedUnclean) => closed.closed_unclean += 1,
            Ok(Held::Dropped) => closed.dropped_during_hold += 1,
            Err(_) => closed.closed_unclean += 1,
        }
    }
    closed.errors = drops.take();
    say(&closed)?;
    Ok(())
}

/// Sends one line to the parent.
fn say(line: &WorkerLine) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, line)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// How one held connection ended.
enum Held {
    /// We sent close and the server answered with close or EOF.
    ClosedClean,
    /// We sent close and got no answer in time (or an error).
    ClosedUnclean,
    /// The server ended it during the hold.
    Dropped,
}

/// A one-shot broadcast from the worker's main future to its connection
/// tasks, all on one thread.
#[derive(Default)]
struct CloseSignal {
    closed: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl CloseSignal {
    fn close(&self) {
        self.closed.set(true);
        for waker in self.waiters.take() {
            waker.wake();
        }
    }

    async fn wait(&self) {
        let mut registered = false;
        poll_fn(|cx| {
            if self.closed.get() {
                Poll::Ready(())
            } else {
                // A task's waker is stable, so once per wait is enough.
                if !registered {
                    self.waiters.borrow_mut().push(cx.waker().clone());
                    registered = true;
                }
                Poll::Pending
            }
        })
        .await;
    }
}

/// Bytes one idle connection reads at a time: only pings and closes come.
const IDLE_READ_BYTES: usize = 256;

/// Holds one connection idle until `signal`, answering pings, then closes it.
async fn hold(
    mut stream: TcpStream,
    leftover: Vec<u8>,
    signal: &CloseSignal,
    drops: &RefCell<BTreeMap<String, u64>>,
    mask: [u8; 4],
    close_limit: Duration,
) -> Held {
    let mut reader = ControlReader::default();
    let mut pending = leftover;
    let dropped = |kind: String| {
        *drops.borrow_mut().entry(kind).or_default() += 1;
        Held::Dropped
    };
    loop {
        let data = if pending.is_empty() {
            let buf = Vec::with_capacity(IDLE_READ_BYTES);
            monoio::select! {
                _ = signal.wait() => break,
                (result, buf) = stream.read(buf) => match result {
                    Ok(0) => return dropped("server closed the TCP connection".into()),
                    Ok(_) => buf,
                    Err(e) => return dropped(format!("read: {}", ws::errno_name(&e))),
                },
            }
        } else {
            std::mem::take(&mut pending)
        };
        match reader.feed(&data) {
            Ok(Control { server_closed: true, .. }) => {
                // Answer the close as the RFC asks, then count the drop.
                let _ = send_close(&mut stream, mask).await;
                return dropped("server sent close".into());
            }
            Ok(Control { ping: Some(payload), .. }) => {
                let mut pong = Vec::with_capacity(payload.len() + 6);
                ws::encode_frame(&mut pong, true, ws::OP_PONG, &payload, mask);
                if let (Err(e), _) = stream.write_all(pong).await {
                    return dropped(format!("write: {}", ws::errno_name(&e)));
                }
            }
            Ok(_) => {}
            Err(e) => return dropped(format!("protocol: {e}")),
        }
    }

    // Close: send ours, then wait for the server's close or EOF.
    if send_close(&mut stream, mask).await.is_err() {
        return Held::ClosedUnclean;
    }
    let drain = async {
        loop {
            let buf = Vec::with_capacity(IDLE_READ_BYTES);
            let (result, buf) = stream.read(buf).await;
            match result {
                Ok(0) => return Held::ClosedClean,
                Ok(_) => match reader.feed(&buf) {
                    Ok(Control { server_closed: true, .. }) => return Held::ClosedClean,
                    Ok(_) => {}
                    Err(_) => return Held::ClosedUnclean,
                },
                Err(_) => return Held::ClosedUnclean,
            }
        }
    };
    monoio::time::timeout(close_limit, drain).await.unwrap_or(Held::ClosedUnclean)
}

/// What an idle connection must react to in what it read.
#[derive(Default)]
struct Control {
    ping: Option<Vec<u8>>,
    server_closed: bool,
}

/// A [`FrameReader`] plus the state that must survive between reads: the
/// current frame's opcode and a ping's payload so far.
#[derive(Default)]
struct ControlReader {
    frames: FrameReader,
    opcode: u8,
    ping: Vec<u8>,
}

impl ControlReader {
    fn feed(&mut self, data: &[u8]) -> Result<Control, ws::FrameError> {
        let mut control = Control::default();
        let Self { frames, opcode, ping } = self;
        frames.feed(data, |event| match event {
            Event::Start(header) => {
                *opcode = header.opcode;
                ping.clear();
            }
            Event::Payload(bytes) if *opcode == ws::OP_PING => ping.extend_from_slice(bytes),
            Event::Payload(_) => {}
            Event::End(header) => match header.opcode {
                ws::OP_PING => control.ping = Some(ping.clone()),
                ws::OP_CLOSE => control.server_closed = true,
                _ => {}
            },
        })?;
        Ok(control)
    }
}

async fn send_close(stream: &mut TcpStream, mask: [u8; 4]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(8);
    ws::encode_frame(&mut frame, true, ws::OP_CLOSE, &ws::CLOSE_NORMAL.to_be_bytes(), mask);
    stream.write_all(frame).await.0.map(|_| ())
}

/// Raises this process's soft descriptor limit towards `wanted` (never above
/// the hard limit), and says loudly if that is not enough.
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a live, writable rlimit; RLIMIT_NOFILE is valid.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        eprintln!("WARNING: getrlimit failed: {}", std::io::Error::last_os_error());
        return;
    }
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit { rlim_cur: wanted.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a live rlimit read by the kernel only; a soft
        // limit at or below the hard limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            limit = raised;
        }
    }
    if limit.rlim_cur < wanted {
        eprintln!(
            "WARNING: this worker may hold {} descriptors (hard limit {}) but needs ~{wanted}: \
             expect EMFILE; use more --processes",
            limit.rlim_cur, limit.rlim_max
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_is_raised_at_most_to_the_hard_limit() {
        // Asking for what we already have must leave it alone and not warn.
        raise_fd_limit(16);
        let (open, limit) = stats::process_fds(std::process::id()).expect("fds");
        assert!(limit.is_some_and(|l| l >= open));
    }

    #[test]
    fn control_frames_are_found_across_reads() {
        let mut reader = ControlReader::default();
        let ping = [0x89, 0x03, b'a', b'b', b'c', 0x88, 0x00];
        let first = reader.feed(&ping[..3]).expect("valid");
        assert!(first.ping.is_none());
        // The pong must echo the whole payload, not the part of the last read.
        let second = reader.feed(&ping[3..5]).expect("valid");
        assert_eq!(second.ping.as_deref(), Some(&b"abc"[..]));
        assert!(!second.server_closed);
        assert!(reader.feed(&ping[5..]).expect("valid").server_closed);
    }
}
