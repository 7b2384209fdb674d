//! `kefu-bench echo`: round trips per second and their latency against any
//! WebSocket echo endpoint (kefu's `/ws/echo`, the baselines in `benches/`).
//!
//! Each connection keeps `--pipeline` messages in flight: it sends K, and
//! every time echoes come back it sends as many again, so K = 1 is a closed
//! loop (send, wait for the echo, send). A message's latency is from the
//! write that carried it to the read that completed its echo. Only echoes
//! completed inside the measured window (after `--warmup`, for
//! `--duration`) count towards the rate and the histogram.
//!
//! # Keeping the client out of the measurement
//!
//! The client runs pinned to one core against a server pinned to the other,
//! so everything it spends per message is paid for in the same currency as
//! the server. It spends little:
//!
//! - one monoio (io_uring) runtime per `--threads`, each pinned (`--cpu`),
//!   connections multiplexed as tasks: no cross-thread wake-ups, and the
//!   reads and writes of all connections leave in one `io_uring_enter` per
//!   loop turn instead of a syscall each;
//! - frames encoded and masked once at start (one mask for all frames is
//!   legal; the server cannot tell), then the same bytes written forever from
//!   a shared `Rc` buffer: no allocation, no masking, no copy per message;
//! - echoes parsed by [`FrameReader`] straight out of the read buffer,
//!   payloads skipped, not copied or validated (the server is not under test
//!   for correctness here; conformance.sh does that);
//! - one clock read per read completion, not per message; echoes that arrive
//!   together are recorded with one `record_n`, and their replacements leave
//!   in one write.
//!
//! The report states the client's CPU over the window next to the server's
//! (`--server-pid`), so a saturated client is visible, not silent.
//!
//! # What we found about the client's ceiling (2 vCPUs, kernel 6.18, each side pinned)
//!
//! - The client's user space is ~3% of its CPU. The rest is the kernel's
//!   loopback TCP path: its own send, the *server socket's* receive
//!   processing (on loopback the sender's core runs the receiver's TCP
//!   input in softirq), and its own receive. Per echo there are exactly two
//!   segments and no pure ACKs (checked with `nstat`), so there is nothing
//!   left to batch at `--pipeline 1`: the client's cost per message is the
//!   same kernel work as the server's, mirrored.
//! - The io_uring task-work mode mattered most: the kernel default
//!   (completions delivered by interrupting the thread) cost ~8.5 µs of
//!   client CPU per 512 B round trip; `DEFER_TASKRUN` cost ~5.0-5.8 µs,
//!   hence `--taskrun defer` by default (`coop` sits in between).
//! - Against the baselines and kefu at `--pipeline 1` the client's core and
//!   the server's both show ~98% busy, with equal CPU per message (about
//!   5 µs against kefu, 6-7 µs against fastwebsockets; tokio-tungstenite's
//!   server is dearer, so the client there has ~10% to spare). On a
//!   two-core host the client therefore cannot prove a *lean* server's
//!   ceiling at one message in flight: the number is a lower bound, and the
//!   report's `client_cores_busy`, `server_cores_busy` and the two µs/msg
//!   figures say which side ran out. The highest rate seen from one client
//!   core was ~196k round trips/s (512 B, closed loop, against kefu) and
//!   ~234k with `--pipeline 16`.
//! - Pipelining helps less than hoped (kefu: 196k at K=1, 210k at K=2, 234k
//!   at K=16) against servers that write each echo separately: every echo
//!   still arrives as its own segment and is answered on its own, so both
//!   sides stay symmetric. A server that coalesces its writes would change
//!   that, for both sides.
//!
//! Every run also reports `other_cpu_cores`: CPU that neither side used
//! during the window (the hypervisor's steal left out, as in `chat`). On a shared host a figure above ~0.1 means someone
//! else's build or benchmark ran; `tools/bench-baselines.sh` waits for an
//! idle host before each run for that reason.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    rc::Rc,
    sync::{
        Arc, Barrier, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use monoio::{
    buf::IoBuf as _,
    io::{AsyncReadRent as _, AsyncWriteRentExt as _},
    net::TcpStream,
};
use serde::Serialize;

use crate::{
    html::Series,
    progress::{Counter, Goal, Phase, Progress, Snapshot},
    report::{self, Output, Table},
    stats::{self, Latency, LatencySummary},
    ws::{self, Event, FrameReader, WsUrl},
};

/// Arguments of `kefu-bench echo`.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// WebSocket echo endpoint (ws:// only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws/echo")]
    pub url: String,

    /// Connections to open, spread round-robin over the threads.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,

    /// Payload bytes per message.
    #[arg(long, default_value_t = 512)]
    pub size: usize,

    /// Measured window in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of load before the window opens (JIT-free Rust still needs
    /// caches, allocator pools and TCP windows warmed).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Messages each connection keeps in flight. 1 is a closed loop.
    /// Keep pipeline × size well under the socket buffers (a few hundred
    /// KiB): a connection writes its batch before reading again.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub pipeline: u32,

    /// Send binary frames instead of text.
    #[arg(long)]
    pub binary: bool,

    /// Client threads, each with its own io_uring runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    /// CPUs to pin the client threads to (comma list; thread i gets
    /// cpu[i % len]). Unset leaves placement to the kernel or `taskset`.
    #[arg(long, value_delimiter = ',')]
    pub cpu: Vec<usize>,

    /// Also report the CPU this server process used during the window.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Sec-WebSocket-Protocol to request, if any.
    #[arg(long)]
    pub subprotocol: Option<String>,

    /// Source addresses to connect from, round-robin (e.g.
    /// 127.0.0.1,127.0.0.2). Unset lets the kernel choose.
    #[arg(long, value_delimiter = ',')]
    pub sources: Vec<IpAddr>,

    /// Bound on one connection's TCP connect plus handshake, milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub connect_timeout_ms: u64,

    /// Bytes each connection reads at most per read call.
    #[arg(long, default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub read_buffer: u32,

    /// io_uring submission queue entries per thread.
    #[arg(long, default_value_t = 4096)]
    pub ring_entries: u32,

    /// io_uring task-work mode of the client threads.
    #[arg(long, value_enum, default_value_t = TaskRun::Defer)]
    pub taskrun: TaskRun,

    /// Seconds after the window for close handshakes before the client
    /// gives up on a connection.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,

    /// Allow a URL outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_non_loopback: bool,
}

/// The result of a run: printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct EchoReport {
    pub url: String,
    pub connections: u32,
    pub connected: u32,
    pub size: usize,
    pub binary: bool,
    pub pipeline: u32,
    pub threads: u16,
    pub window_s: f64,
    /// Round trips completed inside the window.
    pub messages: u64,
    pub msgs_per_s: f64,
    pub latency_us: LatencySummary,
    /// Connections that failed to open or broke before the window ended.
    pub errors: u64,
    /// Errors by kind (connect: EMFILE, timeout, server closed, …).
    pub error_kinds: BTreeMap<String, u64>,
    pub client_cpu_s: f64,
    /// Client CPU over the window in cores (1.0 = one core fully busy).
    pub client_cpu_cores: f64,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_cores: Option<f64>,
    pub server_cpu_us_per_msg: Option<f64>,
    /// Client CPU per round trip, µs: compare with the server's to see how
    /// much headroom the client has.
    pub client_cpu_us_per_msg: Option<f64>,
    /// Utilisation (0..=1) of the cores in --cpu over the window, from
    /// /proc/stat: what really ran there, including other processes.
    pub client_cores_busy: Option<f64>,
    /// Utilisation of the cores the server is pinned to, if it is pinned
    /// to cores disjoint from the client's.
    pub server_cores_busy: Option<f64>,
    /// Busy cores on the whole host minus client, server and the
    /// hypervisor's steal: anything above ~0.1 means something else ran
    /// during the window.
    pub other_cpu_cores: f64,
    /// The round-trip latency's percentile curve, for the HTML report.
    #[serde(skip)]
    pub curves: Vec<Series>,
}

/// What every thread needs to know; built once, shared read-only.
struct Plan {
    url: WsUrl,
    subprotocol: Option<String>,
    sources: Vec<IpAddr>,
    connect_timeout: Duration,
    read_buffer: usize,
    opcode: u8,
    payload_len: u64,
    pipeline: u32,
    /// `pipeline` copies of the pre-masked message frame, back to back.
    frames: Vec<u8>,
    frame_len: usize,
    /// Pre-masked `close 1000` frame.
    close_frame: Vec<u8>,
    mask: [u8; 4],
}

/// When the window opens and shuts, decided once all connections are up.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    end: Instant,
    give_up: Instant,
}

/// One thread's share of the report.
#[derive(Default)]
struct ThreadTally {
    connected: u32,
    messages: u64,
    latency: Latency,
    errors: BTreeMap<String, u64>,
}

impl ThreadTally {
    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

pub fn run(args: EchoArgs, out: &Output) -> anyhow::Result<()> {
    let report = measure(&args)?;
    out.emit(&report, &table(&report), &report.curves)?;
    print_warnings(&report);
    Ok(())
}

fn measure(args: &EchoArgs) -> anyhow::Result<EchoReport> {
    if !(args.duration > 0.0 && args.warmup >= 0.0 && args.grace >= 0.0) {
        bail!("--duration must be > 0, --warmup and --grace ≥ 0");
    }
    let url = WsUrl::parse(&args.url, args.allow_non_loopback)?;
    for source in &args.sources {
        if !args.allow_non_loopback && !source.is_loopback() {
            bail!("source {source} is not a loopback address");
        }
    }
    let plan = Arc::new(make_plan(args, url));

    let threads = usize::from(args.threads);
    // What the progress bar reads: connections opened, and each thread's
    // echoes so far (a counter of its own, see progress.rs).
    let opened = Arc::new(AtomicU64::new(0));
    let echoes: Vec<Arc<Counter>> = (0..threads).map(|_| Arc::new(Counter::default())).collect();
    let progress = Progress::start("echo", {
        let (opened, echoes) = (opened.clone(), echoes.clone());
        move || Snapshot {
            connections: opened.load(Ordering::Relaxed),
            received: Some(echoes.iter().map(|c| c.get()).sum()),
            ..Snapshot::default()
        }
    });
    progress.phase(Phase::Connecting, Goal::Connections(u64::from(args.connections)));
    // Two rendezvous: all threads connected, then the schedule is set.
    let connected = Arc::new(Barrier::new(threads + 1));
    let go = Arc::new(Barrier::new(threads + 1));
    let schedule = Arc::new(OnceLock::<Schedule>::new());
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let indices: Vec<u32> = (0..args.connections).filter(|i| *i as usize % threads == thread).collect();
        let cpu = (!args.cpu.is_empty()).then(|| args.cpu[thread % args.cpu.len()]);
        let (plan, connected, go, schedule) = (plan.clone(), connected.clone(), go.clone(), schedule.clone());
        let (opened, echoes) = (opened.clone(), echoes[thread].clone());
        let (ring_entries, taskrun) = (args.ring_entries, args.taskrun);
        let handle = std::thread::Builder::new()
            .name(format!("echo-{thread}"))
            .spawn(move || -> anyhow::Result<ThreadTally> {
                let runtime = build_runtime(cpu, ring_entries, taskrun);
                // Whatever happened, meet the others at both barriers, or
                // the main thread would wait forever.
                let mut runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        connected.wait();
                        go.wait();
                        return Err(e);
                    }
                };
                let counters = Counters { opened, echoes };
                runtime.block_on(thread_main(plan, indices, connected, go, schedule, counters))
            })
            .context("spawning a client thread")?;
        handles.push(handle);
    }

    connected.wait();
    let now = Instant::now();
    let start = now + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    let give_up = end + Duration::from_secs_f64(args.grace);
    let plan_schedule = Schedule { start, end, give_up };
    // Set exactly once, here, before anyone passes `go`.
    let _ = schedule.set(plan_schedule);
    go.wait();

    progress.phase(Phase::WarmUp, Goal::Time(Duration::from_secs_f64(args.warmup)));
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    progress.phase(Phase::Measuring, Goal::Time(Duration::from_secs_f64(args.duration)));
    let ticks_start = stats::cpu_ticks()?;
    let client_cpu_start = stats::self_cpu_seconds()?;
    let server_cpu_start = args.server_pid.map(stats::process_cpu_seconds).transpose()?;
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let client_cpu_end = stats::self_cpu_seconds()?;
    let server_cpu_end = args.server_pid.map(stats::process_cpu_seconds).transpose()?;
    let ticks_end = stats::cpu_ticks()?;
    let window_s = args.duration;
    progress.phase(Phase::Draining, Goal::Time(Duration::from_secs_f64(args.grace)));

    let mut total = ThreadTally::default();
    for handle in handles {
        let tally = handle.join().map_err(|_| anyhow!("a client thread panicked"))??;
        total.connected += tally.connected;
        total.messages += tally.messages;
        total.latency.merge(&tally.latency);
        for (kind, n) in tally.errors {
            *total.errors.entry(kind).or_default() += n;
        }
    }

    let client_cpu_s = client_cpu_end - client_cpu_start;
    let server_cpu_s = match (server_cpu_start, server_cpu_end) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let all_cpus: Vec<usize> = (0..ticks_start.len()).collect();
    let client_cores_busy =
        (!args.cpu.is_empty()).then(|| stats::cpus_busy(&ticks_start, &ticks_end, &args.cpu)).flatten();
    let server_cores_busy = args
        .server_pid
        .and_then(|pid| stats::process_cpus(pid).ok())
        .filter(|cpus| cpus.len() < all_cpus.len() && !cpus.iter().any(|c| args.cpu.contains(c)))
        .and_then(|cpus| stats::cpus_busy(&ticks_start, &ticks_end, &cpus));
    let per_msg = |cpu_s: f64| (total.messages > 0).then(|| cpu_s * 1e6 / total.messages as f64);
    Ok(EchoReport {
        url: args.url.clone(),
        connections: args.connections,
        connected: total.connected,
        size: args.size,
        binary: args.binary,
        pipeline: args.pipeline,
        threads: args.threads,
        window_s,
        messages: total.messages,
        msgs_per_s: total.messages as f64 / window_s,
        latency_us: total.latency.summary(),
        curves: vec![Series::of("round trip", &total.latency)],
        errors: total.errors.values().sum(),
        error_kinds: total.errors,
        client_cpu_s,
        client_cpu_cores: client_cpu_s / window_s,
        server_pid: args.server_pid,
        server_cpu_s,
        server_cpu_cores: server_cpu_s.map(|s| s / window_s),
        server_cpu_us_per_msg: server_cpu_s.and_then(per_msg),
        client_cpu_us_per_msg: per_msg(client_cpu_s),
        client_cores_busy,
        server_cores_busy,
        other_cpu_cores: stats::other_cores(
            &ticks_start,
            &ticks_end,
            (client_cpu_s + server_cpu_s.unwrap_or(0.0)) / window_s,
        ),
    })
}

fn make_plan(args: &EchoArgs, url: WsUrl) -> Plan {
    let mask: [u8; 4] = rand::random();
    // Text payloads must be UTF-8; printable ASCII is, and is what a chat
    // message mostly looks like.
    let payload: Vec<u8> = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect();
    let opcode = if args.binary { ws::OP_BINARY } else { ws::OP_TEXT };
    let mut frame = Vec::with_capacity(args.size + 14);
    ws::encode_frame(&mut frame, true, opcode, &payload, mask);
    let frames = frame.repeat(args.pipeline as usize);
    let mut close_frame = Vec::new();
    ws::encode_frame(&mut close_frame, true, ws::OP_CLOSE, &ws::CLOSE_NORMAL.to_be_bytes(), mask);
    Plan {
        url,
        subprotocol: args.subprotocol.clone(),
        sources: args.sources.clone(),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        read_buffer: args.read_buffer as usize,
        opcode,
        payload_len: args.size as u64,
        pipeline: args.pipeline,
        frame_len: frame.len(),
        frames,
        close_frame,
        mask,
    }
}

/// How the client's io_uring runs completion work ("task work": the recv
/// that runs when data arrives on a socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskRun {
    /// Kernel default: task work may interrupt the thread with an IPI.
    Default,
    /// COOP_TASKRUN: no interrupts; task work waits for the next syscall.
    Coop,
    /// DEFER_TASKRUN (+ SINGLE_ISSUER, Linux 6.1): task work runs only when
    /// the thread waits for completions, all of it in one batch.
    Defer,
}

/// A pinned io_uring runtime with timers.
pub fn build_runtime(
    cpu: Option<usize>,
    ring_entries: u32,
    taskrun: TaskRun,
) -> anyhow::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    if let Some(cpu) = cpu {
        monoio::utils::bind_to_cpu_set([cpu]).with_context(|| format!("pinning to cpu {cpu}"))?;
    }
    let mut ring = io_uring::IoUring::builder();
    match taskrun {
        TaskRun::Default => {}
        TaskRun::Coop => {
            ring.setup_coop_taskrun().setup_taskrun_flag();
        }
        TaskRun::Defer => {
            ring.setup_single_issuer().setup_defer_taskrun();
        }
    }
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .uring_builder(ring)
        .enable_timer()
        .with_entries(ring_entries)
        .build()
        .with_context(|| {
            format!("building the io_uring runtime (taskrun {taskrun:?}; is io_uring disabled, or the kernel too old?)")
        })
}

/// What one client thread tells the progress bar.
struct Counters {
    /// Connections opened, all threads.
    opened: Arc<AtomicU64>,
    /// This thread's echoes (it alone writes it).
    echoes: Arc<Counter>,
}

/// Per-thread state shared by the connection tasks (single-threaded, so
/// `Cell`s, not atomics).
struct Shared {
    plan: Arc<Plan>,
    /// The plan's frames behind an `Rc`, so writes hand io_uring a cheap
    /// clone instead of copying bytes.
    frames: Rc<Vec<u8>>,
    close_frame: Rc<Vec<u8>>,
    schedule: Schedule,
    messages: Cell<u64>,
    latency: RefCell<Latency>,
    /// Echoes so far, window or not, for the progress bar.
    echoes: Arc<Counter>,
}

async fn thread_main(
    plan: Arc<Plan>,
    indices: Vec<u32>,
    connected: Arc<Barrier>,
    go: Arc<Barrier>,
    schedule: Arc<OnceLock<Schedule>>,
    counters: Counters,
) -> anyhow::Result<ThreadTally> {
    let mut tally = ThreadTally::default();

    // Phase 1: open every connection concurrently, each bounded.
    let mut opening = Vec::with_capacity(indices.len());
    for index in indices {
        let plan = plan.clone();
        let opened = counters.opened.clone();
        opening.push(monoio::spawn(async move {
            let result = open(&plan, index).await;
            if result.is_ok() {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            result
        }));
    }
    let mut streams = Vec::with_capacity(opening.len());
    for handle in opening {
        match handle.await {
            Ok(opened) => streams.push(opened),
            Err(kind) => tally.error(kind),
        }
    }
    tally.connected = streams.len() as u32;

    // Phase 2: wait for the other threads, then for the schedule. Blocking
    // here is fine: this runtime has nothing else to do yet.
    connected.wait();
    go.wait();
    let schedule = *schedule.get().ok_or_else(|| anyhow!("schedule missing after the barrier"))?;

    let shared = Rc::new(Shared {
        frames: Rc::new(plan.frames.clone()),
        close_frame: Rc::new(plan.close_frame.clone()),
        plan,
        schedule,
        messages: Cell::new(0),
        latency: RefCell::new(Latency::new()),
        echoes: counters.echoes,
    });
    let mut running = Vec::with_capacity(streams.len());
    for (stream, leftover) in streams {
        let shared = shared.clone();
        running.push(monoio::spawn(async move { drive(stream, leftover, &shared).await }));
    }

    // Phase 3: collect outcomes until the hard deadline; connections still
    // stuck after it (a server that stopped answering) are dropped with the
    // runtime and counted.
    let deadline = monoio::time::Instant::from_std(schedule.give_up);
    let mut stuck = 0u64;
    for handle in running {
        match monoio::time::timeout_at(deadline, handle).await {
            Ok(Ok(())) => {}
            Ok(Err(kind)) => tally.error(kind),
            Err(_) => stuck += 1,
        }
    }
    if stuck > 0 {
        tally.errors.insert("no close reply before --grace".into(), stuck);
    }
    tally.messages = shared.messages.get();
    tally.latency.merge(&shared.latency.borrow());
    Ok(tally)
}

/// Connects and upgrades connection `index`; the error is a kind for the
/// report's tally.
async fn open(plan: &Plan, index: u32) -> Result<(TcpStream, Vec<u8>), String> {
    let source = (!plan.sources.is_empty()).then(|| plan.sources[index as usize % plan.sources.len()]);
    ws::open(&plan.url, source, plan.subprotocol.as_deref(), plan.connect_timeout).await
}

/// What one read's worth of server frames asked of the connection.
#[derive(Default)]
struct Batch {
    /// Complete echoes of our message.
    echoed: u32,
    /// A ping's payload to answer (the last one, if several came).
    pong: Option<Vec<u8>>,
    server_closed: bool,
    unexpected: Option<String>,
}

/// Runs one connection until the window ends, then closes it cleanly.
async fn drive(mut stream: TcpStream, leftover: Vec<u8>, shared: &Shared) -> Result<(), String> {
    let plan = &*shared.plan;
    let Schedule { start, end, .. } = shared.schedule;
    let mut reader = FrameReader::new();
    // Send times of the messages in flight, run-length encoded: a batch
    // written by one call shares one timestamp.
    let mut in_flight: VecDeque<(Instant, u32)> = VecDeque::with_capacity(plan.pipeline as usize);
    let mut outstanding = plan.pipeline;
    let mut closing = false;
    // Ping payloads are at most 125 bytes; this grows once, if ever.
    let mut control = Vec::new();
    let mut current_opcode = 0u8;

    in_flight.push_back((Instant::now(), plan.pipeline));
    write(&mut stream, shared.frames.clone(), plan.pipeline as usize * plan.frame_len).await?;

    let mut buf = Vec::with_capacity(plan.read_buffer);
    let mut pending = leftover;
    loop {
        let n = if pending.is_empty() {
            let (result, returned) = stream.read(buf).await;
            buf = returned;
            match result {
                Ok(0) if closing => return Ok(()),
                Ok(0) => return Err("server closed the TCP connection".into()),
                Ok(n) => n,
                // A reset after our close is the server being brisk.
                Err(_) if closing => return Ok(()),
                Err(e) => return Err(format!("read: {}", ws::errno_name(&e))),
            }
        } else {
            // Frames that came with the handshake response (rare).
            buf.clear();
            buf.extend_from_slice(&pending);
            pending = Vec::new();
            buf.len()
        };

        let mut batch = Batch::default();
        let parsed = reader.feed(&buf[..n], |event| match event {
            Event::Start(header) => {
                current_opcode = header.opcode;
                control.clear();
            }
            Event::Payload(bytes) => {
                if current_opcode == ws::OP_PING {
                    control.extend_from_slice(bytes);
                }
            }
            Event::End(header) => match header.opcode {
                op if op == plan.opcode && header.fin && header.payload_len == plan.payload_len => {
                    batch.echoed += 1;
                }
                ws::OP_PING => batch.pong = Some(control.clone()),
                ws::OP_PONG => {}
                ws::OP_CLOSE => batch.server_closed = true,
                _ => {
                    batch.unexpected = Some(format!(
                        "unexpected frame: opcode {:#x}, fin {}, {} bytes",
                        header.opcode, header.fin, header.payload_len
                    ));
                }
            },
        });
        if let Err(e) = parsed {
            return Err(format!("protocol: {e}"));
        }
        if let Some(unexpected) = batch.unexpected
            && !closing
        {
            return Err(unexpected);
        }
        if batch.echoed > outstanding {
            return Err("more echoes than messages sent".into());
        }

        let now = Instant::now();
        if batch.echoed > 0 {
            outstanding -= batch.echoed;
            shared.echoes.add(u64::from(batch.echoed));
            let counted = now >= start && now < end;
            if counted {
                shared.messages.set(shared.messages.get() + u64::from(batch.echoed));
            }
            let mut latency = shared.latency.borrow_mut();
            let mut left = batch.echoed;
            while left > 0 {
                let Some((sent, count)) = in_flight.front_mut() else {
                    break;
                };
                let take = left.min(*count);
                if counted {
                    latency.record(now - *sent, u64::from(take));
                }
                *count -= take;
                left -= take;
                if *count == 0 {
                    in_flight.pop_front();
                }
            }
        }

        if batch.server_closed {
            if closing {
                return Ok(());
            }
            return Err("server sent close".into());
        }
        if let Some(payload) = batch.pong {
            let mut pong = Vec::with_capacity(payload.len() + 6);
            ws::encode_frame(&mut pong, true, ws::OP_PONG, &payload, plan.mask);
            let len = pong.len();
            write(&mut stream, Rc::new(pong), len).await?;
        }
        if closing {
            continue;
        }
        if now >= end {
            closing = true;
            let len = shared.close_frame.len();
            write(&mut stream, shared.close_frame.clone(), len).await?;
        } else if batch.echoed > 0 {
            in_flight.push_back((now, batch.echoed));
            outstanding += batch.echoed;
            write(&mut stream, shared.frames.clone(), batch.echoed as usize * plan.frame_len).await?;
        }
    }
}

/// Writes the first `len` bytes of a shared buffer.
async fn write(stream: &mut TcpStream, bytes: Rc<Vec<u8>>, len: usize) -> Result<(), String> {
    let (result, _) = stream.write_all(bytes.slice(..len)).await;
    result.map(|_| ()).map_err(|e| format!("write: {}", ws::errno_name(&e)))
}

/// The run's results as a table.
fn table(report: &EchoReport) -> Table {
    let kind = if report.binary { "binary" } else { "text" };
    let mut table = Table::new(format!(
        "echo: {}/{} connections × {} B {kind}, pipeline {}, {} thread(s), {} s window",
        report.connected, report.connections, report.size, report.pipeline, report.threads, report.window_s
    ));
    table
        .section("rate")
        .row("round trips", report::per_s(report.msgs_per_s))
        .row("messages in the window", report.messages.to_string());
    table.section("latency").latency("round trip", report.messages, &report.latency_us);
    table
        .section("cost")
        .row("client CPU", report::cpu(report.client_cpu_cores, report.client_cpu_us_per_msg))
        .row_opt("client cores busy", report.client_cores_busy.map(|b| format!("{:.0}%", b * 100.0)))
        .row_opt(
            "server CPU",
            report.server_cpu_cores.map(|cores| report::cpu(cores, report.server_cpu_us_per_msg)),
        )
        .row_opt("server cores busy", report.server_cores_busy.map(|b| format!("{:.0}%", b * 100.0)))
        .row("other processes", format!("{:.2} cores", report.other_cpu_cores));
    table.section("errors").row("connection errors", report.errors.to_string());
    for (kind, n) in &report.error_kinds {
        table.row(format!("  {kind}"), n.to_string());
    }
    table
}

/// What makes the figures suspect, on stderr.
fn print_warnings(report: &EchoReport) {
    if report.other_cpu_cores > 0.1 {
        eprintln!(
            "WARNING: other processes used {:.2} cores during the window: numbers are contended",
            report.other_cpu_cores
        );
    }
    let client_busy = report.client_cores_busy.unwrap_or(report.client_cpu_cores / f64::from(report.threads));
    if client_busy > 0.9 {
        eprintln!(
            "WARNING: the client's cores were {:.0}% busy: it may be the bottleneck; \
             try --pipeline or more --threads on another core",
            100.0 * client_busy
        );
    }
    if report.connected < report.connections {
        eprintln!("WARNING: only {} of {} connections opened", report.connected, report.connections);
    }
}
