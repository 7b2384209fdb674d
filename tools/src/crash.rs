//! `kefu-bench crash`: does anything acked get lost, stored twice or
//! skipped when the gateway dies with SIGKILL under load, again and again?
//!
//! # The run
//!
//! 1. The tool starts the gateway itself (`--kefu`, `--config`, `--data`),
//!    listening where `--url` points, and waits until its `/readyz` (on
//!    `--admin-listen`) says 200. Its tokens are signed with the gateway's secret
//!    (`DATA/jwt_secret`, or `--jwt-secret-file`).
//! 2. `--agents` agents go online and `--visitors` visitors (with visitor
//!    tokens) open a conversation each; the visitors then send `--rate`
//!    messages a second between them, open loop, each with its own `cid`.
//! 3. `--kills` times, at a random point between ½ and 1½ `--interval`
//!    after the gateway answered again, the tool sends the gateway SIGKILL,
//!    waits for it to die (checking it died of that signal), and starts it
//!    again on the same data directory at once. Each kill records how many
//!    sends were written and not yet acked when it landed: a kill with none
//!    in flight would prove little, and the report counts the ones with
//!    some (`kills_mid_load`).
//! 4. Clients behave as the protocol asks of a careful one: on a lost
//!    connection they reconnect with a doubling, jittered back-off
//!    (`--backoff-ms-min` .. `--backoff-ms-max`), `connect` with `resume`
//!    (the last seq they saw), and send again every message not yet acked,
//!    with the same `cid`; an unacked send is also sent again after
//!    `--retry-ms` on a live connection (an `unavailable` or a lost reply).
//! 5. After the last restart and `--interval` more of load, sending stops;
//!    the run waits until every message is acked (`--drain-timeout`), then
//!    each visitor reads its conversation back through `history` on a
//!    fresh connection, and [`check`] compares it with the acks.
//!
//! # What is checked
//!
//! - **acked but lost**: a message whose `ack` a visitor got is not in the
//!   history;
//! - **ack mismatches**: it is, at another `seq` than its ack said;
//! - **duplicates**: a `cid` stored more than once in a conversation;
//! - **gaps**: the history's seqs are not exactly 1, 2, …, n (a missing
//!   seq, or one seen twice).
//!
//! All must be 0, every message must end up acked, and every kill must
//! land and be recovered from; otherwise the run exits non-zero. The time
//! to recover from a kill is from the SIGKILL to the first `ack` read on a
//! connection made to the new process.
//!
//! The gateway's durability is not configurable (an ack waits for an
//! fsync: of the write-ahead log, or of redb's commit at a checkpoint or
//! with `storage.wal = false`; `storage.quick_repair` only changes how the
//! file is opened after a crash): the report shows the `[storage]`
//! section the gateway runs with, as `kefu config` prints it, so a reader
//! can see that the config under test left it at the defaults.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap},
    fs,
    net::TcpStream as StdTcpStream,
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    process::{Child, Command as Process, Stdio},
    rc::Rc,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use kefu_proto::{ClientFrame, Codec, Command, ConvId, Encoder, ErrorCode, Event, PresenceStatus, Role};
use serde::Serialize;

use crate::{
    abuse,
    chat::{self, Conn, Dial, Out, PreciseTimer, mono_ns, scheduled_at, secs_ns, wait_until},
    echo::{TaskRun, build_runtime},
    report::{Output, Table},
    ws::{self, WsUrl},
};

/// Most messages one `history` page asks for (the protocol's maximum).
const HISTORY_PAGE: u32 = 200;

/// Bound on one `/readyz` poll while the gateway (re)starts.
const READY_POLL_TIMEOUT: Duration = Duration::from_millis(200);

/// Examples of each finding kept for the report.
const EXAMPLES_MAX: usize = 20;

/// Arguments of `kefu-bench crash`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
The config should lift the per-connection command limit (limits.messages_per_s, limits.burst) above \
what a visitor sends after a reconnect, and leave [storage] at its defaults; tools/bench-crash.sh \
writes such a config.

Example:
    kefu-bench crash --kefu target/release/kefu --config crash.toml --data /tmp/crash-data \\
        --url ws://127.0.0.1:9241/ws --kills 20 --interval 3 --visitors 50 --agents 5 --rate 500")]
pub struct CrashArgs {
    /// The kefu binary to run (`kefu serve`).
    #[arg(long, value_name = "PATH")]
    pub kefu: PathBuf,

    /// The gateway's config file (`kefu serve --config`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The gateway's data directory, kept across the restarts (created if
    /// missing; its `jwt_secret` signs the tokens).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// Where the gateway's client listener goes (`--listen`), ws:// only.
    #[arg(long, default_value = "ws://127.0.0.1:9241/ws")]
    pub url: String,

    /// The gateway's admin listener (`--admin-listen`): a (re)start is over
    /// once its `/readyz` says 200.
    #[arg(long, default_value = "127.0.0.1:9242")]
    pub admin_listen: std::net::SocketAddr,

    /// A file holding the gateway's JWT secret, if the config sets one.
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Append the gateway's stderr here (every start).
    #[arg(long, value_name = "FILE")]
    pub gateway_log: Option<PathBuf>,

    /// SIGKILLs, each followed by a restart.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub kills: u32,

    /// Mean seconds of load between a restart's first ack and the next
    /// kill (each wait is drawn from ½ to 1½ of it).
    #[arg(long, default_value_t = 3.0)]
    pub interval: f64,

    /// Visitors, each with a conversation.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub visitors: u32,

    /// Agents the conversations are assigned to.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub agents: u32,

    /// Aggregate visitor messages per second, open loop.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,

    /// Text bytes per message.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    pub size: u32,

    /// An unacked send on a live connection is sent again after this long,
    /// milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub retry_ms: u64,

    /// First reconnect back-off, milliseconds; it doubles per failure.
    #[arg(long, default_value_t = 20)]
    pub backoff_ms_min: u64,

    /// Longest reconnect back-off, milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub backoff_ms_max: u64,

    /// Bound on a (re)start until the gateway is ready, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub start_timeout: f64,

    /// Bound on the setup (agents online, conversations open), seconds.
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,

    /// Bound on waiting for every message's ack after sending stops, and on
    /// each kill's recovery, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,

    /// Bound on one connect plus handshake, milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub connect_timeout_ms: u64,

    /// Bound on each reply (connected, open, presence, a history page),
    /// milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub reply_timeout_ms: u64,

    /// CPUs to pin the client thread to.
    #[arg(long, value_delimiter = ',')]
    pub cpu: Vec<usize>,

    /// io_uring task-work mode of the client thread.
    #[arg(long, value_enum, default_value_t = TaskRun::Defer)]
    pub taskrun: TaskRun,

    /// Allow a URL outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_non_loopback: bool,
}

/// One kill.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    /// Sends written and not acked when the SIGKILL was sent.
    pub in_flight: u64,
    /// Messages acked before the kill, in all.
    pub acked_before: u64,
    /// SIGKILL → the new process answers `/readyz` with 200, ms.
    pub restart_ms: f64,
    /// SIGKILL → the first ack on a connection to the new process, ms.
    pub recovery_ms: Option<f64>,
}

/// What [`check`] found.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Verdict {
    pub conversations: u64,
    pub stored: u64,
    pub acked_lost: u64,
    pub ack_mismatches: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// The first few findings, spelled out.
    pub examples: Vec<String>,
}

impl Verdict {
    fn clean(&self) -> bool {
        self.acked_lost == 0 && self.ack_mismatches == 0 && self.duplicates == 0 && self.gaps == 0
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(text);
        }
    }
}

/// The result of a run: printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct CrashReport {
    pub url: String,
    pub visitors: u32,
    pub agents: u32,
    pub target_rate: f64,
    pub kills_asked: u32,
    pub kills: Vec<Kill>,
    /// Kills that found sends in flight.
    pub kills_mid_load: u64,
    pub recovery_ms_median: Option<f64>,
    pub recovery_ms_max: Option<f64>,
    pub restart_ms_median: Option<f64>,
    /// Messages the visitors sent (each cid once) and got an ack for.
    pub sent: u64,
    pub acked: u64,
    /// Sent, never acked by the end of the drain.
    pub unacked: u64,
    /// Sends written again (reconnects and retries).
    pub resends: u64,
    /// Acks marked `duplicate` (a resend of something already stored).
    pub duplicate_acks: u64,
    pub verdict: Verdict,
    /// `error` frames by code.
    pub error_codes: BTreeMap<String, u64>,
    /// Connections lost or refused, by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// The gateway exited by itself (not by the tool's SIGKILL).
    pub unexpected_exits: Vec<String>,
    /// The `[storage]` section the gateway runs with (`kefu config`).
    pub storage_config: BTreeMap<String, String>,
    /// Seconds from the first start to the end of the check.
    pub run_s: f64,
}

impl CrashReport {
    /// Why the run fails, if it does.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let v = &self.verdict;
        if !v.clean() {
            failures.push(format!(
                "{} acked but lost, {} ack mismatches, {} duplicates, {} gaps",
                v.acked_lost, v.ack_mismatches, v.duplicates, v.gaps
            ));
        }
        if self.unacked > 0 {
            failures.push(format!("{} messages never acked", self.unacked));
        }
        if self.kills.len() < self.kills_asked as usize {
            failures.push(format!("{} of {} kills done", self.kills.len(), self.kills_asked));
        }
        let unrecovered = self.kills.iter().filter(|k| k.recovery_ms.is_none()).count();
        if unrecovered > 0 {
            failures.push(format!("{unrecovered} kills without a recovery"));
        }
        if !self.unexpected_exits.is_empty() {
            failures.push(format!("the gateway exited by itself: {:?}", self.unexpected_exits));
        }
        failures
    }
}

/// Compares what the visitors were acked with what the conversations hold:
/// `acked` is per conversation, cid → the seq its ack named; `histories`
/// per conversation, (seq, cid) as `history` returned them.
pub fn check(
    acked: &BTreeMap<ConvId, BTreeMap<String, u64>>,
    histories: &BTreeMap<ConvId, Vec<(u64, String)>>,
) -> Verdict {
    let empty = Vec::new();
    let mut v = Verdict::default();
    for conv in acked.keys().chain(histories.keys().filter(|c| !acked.contains_key(c))) {
        v.conversations += 1;
        let history = histories.get(conv).unwrap_or(&empty);
        v.stored += history.len() as u64;
        let mut seqs: Vec<u64> = history.iter().map(|(seq, _)| *seq).collect();
        seqs.sort_unstable();
        let mut expected = 1;
        for seq in seqs {
            if seq == expected {
                expected += 1;
            } else if seq < expected {
                v.gaps += 1;
                v.example(format!("{conv}: seq {seq} seen twice"));
            } else {
                v.gaps += seq - expected;
                v.example(format!("{conv}: seqs {expected}..{seq} missing"));
                expected = seq + 1;
            }
        }
        let mut stored: HashMap<&str, Vec<u64>> = HashMap::new();
        for (seq, cid) in history {
            stored.entry(cid).or_default().push(*seq);
        }
        for (cid, seqs) in &stored {
            if seqs.len() > 1 {
                v.duplicates += seqs.len() as u64 - 1;
                v.example(format!("{conv}: cid {cid} stored at seqs {seqs:?}"));
            }
        }
        for (cid, &seq) in acked.get(conv).into_iter().flatten() {
            match stored.get(cid.as_str()) {
                None => {
                    v.acked_lost += 1;
                    v.example(format!("{conv}: cid {cid} acked at seq {seq}, not in the history"));
                }
                Some(seqs) if !seqs.contains(&seq) => {
                    v.ack_mismatches += 1;
                    v.example(format!("{conv}: cid {cid} acked at seq {seq}, stored at {seqs:?}"));
                }
                Some(_) => {}
            }
        }
    }
    v
}

pub fn run(args: CrashArgs, out: &Output) -> anyhow::Result<()> {
    let report = measure(&args)?;
    out.emit(&report, &table(&report), &[])?;
    print_summary(&report);
    let failures = report.failures();
    if !failures.is_empty() {
        bail!("crash: {}", failures.join("; "));
    }
    Ok(())
}

/// The gateway under test, started and killed by the tool.
struct Gateway<'a> {
    args: &'a CrashArgs,
    listen: std::net::SocketAddr,
    child: Option<Child>,
}

impl Gateway<'_> {
    /// Starts it and waits until it is ready; the time that took.
    fn start(&mut self) -> anyhow::Result<Duration> {
        let args = self.args;
        let begin = std::time::Instant::now();
        let stderr = match &args.gateway_log {
            Some(path) => Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        let mut command = Process::new(&args.kefu);
        command.arg("serve");
        if let Some(config) = &args.config {
            command.arg("--config").arg(config);
        }
        command
            .arg("--data")
            .arg(&args.data)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--admin-listen")
            .arg(args.admin_listen.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = command.spawn().with_context(|| format!("starting {}", args.kefu.display()))?;
        let child = self.child.insert(child);
        let deadline = begin + Duration::from_secs_f64(args.start_timeout);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the gateway exited at start ({status}); see --gateway-log");
            }
            // Not a TCP connect to the client listener: right after a
            // SIGKILL the dead process's listening sockets still complete
            // handshakes for a few milliseconds (their io_uring is torn
            // down after the process is reaped), and nothing answers there.
            let ready = abuse::admin_get_within(args.admin_listen, "/readyz", READY_POLL_TIMEOUT);
            if ready.is_ok_and(|(status, _)| status == 200) && StdTcpStream::connect(self.listen).is_ok() {
                return Ok(begin.elapsed());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the gateway was not ready (/readyz on {}) within {} s",
                    args.admin_listen,
                    args.start_timeout
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and waits for it to be gone.
    fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { bail!("no gateway to kill") };
        // std's `Child::kill` is SIGKILL on Unix.
        child.kill().context("SIGKILL")?;
        let status = child.wait().context("waiting for the killed gateway")?;
        if status.signal() != Some(libc::SIGKILL) {
            bail!("the gateway ended with {status}, not by SIGKILL");
        }
        Ok(())
    }

    /// If it has exited by itself, how.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status.to_string())
            }
            _ => None,
        }
    }

    /// SIGTERM (a graceful stop), then SIGKILL after 10 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain syscall on our own child's pid, which `child`
            // has not reaped yet, so it names no other process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Gateway<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `[storage]` section of `kefu config` with the run's config.
fn storage_config(args: &CrashArgs) -> BTreeMap<String, String> {
    let mut command = Process::new(&args.kefu);
    command.arg("config");
    if let Some(config) = &args.config {
        command.arg("--config").arg(config);
    }
    let Ok(output) = command.stderr(Stdio::null()).output() else { return BTreeMap::new() };
    let text = String::from_utf8_lossy(&output.stdout);
    let mut section = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[storage]";
        } else if inside
            && let Some((key, value)) = line.split_once('=')
            // The tool's --data overrides it.
            && key.trim() != "dir"
        {
            section.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    section
}

/// Shared by the main thread (which kills) and the client thread.
#[derive(Default)]
struct Shared {
    /// Kills so far; a connection made after kill `e` belongs to epoch `e`.
    epoch: AtomicU64,
    /// When each kill was sent (index = epoch − 1), monotonic ns.
    kill_at: Mutex<Vec<u64>>,
    /// The first ack of each epoch (index = epoch), monotonic ns; 0: none.
    first_ack: Vec<AtomicU64>,
    ready: AtomicBool,
    stop_sending: AtomicBool,
    stop: AtomicBool,
    in_flight: AtomicU64,
    acked: AtomicU64,
    setup_failed: OnceLock<String>,
}

/// What the client thread hands back.
#[derive(Default)]
struct ClientResult {
    sent: u64,
    resends: u64,
    duplicate_acks: u64,
    acked: BTreeMap<ConvId, BTreeMap<String, u64>>,
    histories: BTreeMap<ConvId, Vec<(u64, String)>>,
    error_codes: BTreeMap<String, u64>,
    disconnects: BTreeMap<String, u64>,
}

fn measure(args: &CrashArgs) -> anyhow::Result<CrashReport> {
    if !(args.rate > 0.0 && args.interval > 0.0) {
        bail!("--rate and --interval must be > 0");
    }
    let url = WsUrl::parse(&args.url, args.allow_non_loopback)?;
    let started = mono_ns();
    fs::create_dir_all(&args.data).with_context(|| format!("creating {}", args.data.display()))?;
    let mut gateway = Gateway { args, listen: url.addr, child: None };
    gateway.start()?;
    let storage_config = storage_config(args);
    let secret = chat::jwt_secret(args.jwt_secret_file.as_deref(), Some(&args.data))?;
    let capacity = args.visitors.div_ceil(args.agents);
    if capacity > 100 {
        bail!("{} visitors need at least {} agents", args.visitors, args.visitors.div_ceil(100));
    }
    let plan = Arc::new(Plan {
        dial: Dial {
            url,
            codec: Codec::Json,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            reply_timeout: Duration::from_millis(args.reply_timeout_ms),
        },
        backoff_ms: (args.backoff_ms_min.max(1), args.backoff_ms_max.max(args.backoff_ms_min.max(1))),
        retry_ns: args.retry_ms * 1_000_000,
        drain_ns: secs_ns(args.drain_timeout),
        rate: args.rate,
        capacity,
        text: "k".repeat(args.size as usize),
        agent_tokens: chat::sign_tokens(&secret, Role::Agent, args.agents, None)?,
        visitor_tokens: chat::sign_tokens(&secret, Role::Visitor, args.visitors, None)?,
    });
    let shared = Arc::new(Shared {
        first_ack: (0..=args.kills).map(|_| AtomicU64::new(0)).collect(),
        ..Shared::default()
    });
    let client = {
        let (plan, shared) = (plan.clone(), shared.clone());
        let cpu = args.cpu.first().copied();
        let taskrun = args.taskrun;
        std::thread::Builder::new()
            .name("crash-client".into())
            .spawn(move || -> anyhow::Result<ClientResult> {
                let mut runtime = build_runtime(cpu, 4096, taskrun)?;
                runtime.block_on(client_main(plan, shared))
            })
            .context("spawning the client thread")?
    };

    let result = kill_loop(args, &mut gateway, &shared, &client);
    shared.stop.store(true, Ordering::Release);
    shared.stop_sending.store(true, Ordering::Release);
    let client = match client.join() {
        Ok(result) => result,
        Err(_) => bail!("the client thread panicked"),
    };
    gateway.stop();
    let (kills, unexpected_exits) = result?;
    let client = client?;
    if let Some(failed) = shared.setup_failed.get() {
        bail!("setup failed: {failed}");
    }

    let verdict = check(&client.acked, &client.histories);
    let acked: u64 = client.acked.values().map(|c| c.len() as u64).sum();
    let recoveries: Vec<f64> = kills.iter().filter_map(|k| k.recovery_ms).collect();
    let restarts: Vec<f64> = kills.iter().map(|k| k.restart_ms).collect();
    Ok(CrashReport {
        url: args.url.clone(),
        visitors: args.visitors,
        agents: args.agents,
        target_rate: args.rate,
        kills_asked: args.kills,
        kills_mid_load: kills.iter().filter(|k| k.in_flight > 0).count() as u64,
        recovery_ms_median: median(&recoveries),
        recovery_ms_max: recoveries.iter().copied().reduce(f64::max),
        restart_ms_median: median(&restarts),
        kills,
        sent: client.sent,
        acked,
        unacked: client.sent.saturating_sub(acked),
        resends: client.resends,
        duplicate_acks: client.duplicate_acks,
        verdict,
        error_codes: client.error_codes,
        disconnects: client.disconnects,
        unexpected_exits,
        storage_config,
        run_s: (mono_ns() - started) as f64 / 1e9,
    })
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Waits for the setup, kills and restarts the gateway `--kills` times
/// under load, then stops the load and waits for the last acks.
fn kill_loop(
    args: &CrashArgs,
    gateway: &mut Gateway<'_>,
    shared: &Shared,
    client: &std::thread::JoinHandle<anyhow::Result<ClientResult>>,
) -> anyhow::Result<(Vec<Kill>, Vec<String>)> {
    let mut unexpected = Vec::new();
    let setup_deadline = mono_ns() + secs_ns(args.setup_timeout);
    while !shared.ready.load(Ordering::Acquire) {
        if client.is_finished() || mono_ns() >= setup_deadline {
            bail!("setup did not finish within {} s", args.setup_timeout);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("crash: {} visitors and {} agents set up; load and kills start", args.visitors, args.agents);
    let mut kills = Vec::new();
    // Epoch 0 "recovers" with its first ack: the load is running.
    for epoch in 0..=args.kills as usize {
        let recovery_deadline = mono_ns() + secs_ns(args.drain_timeout);
        while shared.first_ack[epoch].load(Ordering::Acquire) == 0 {
            if let Some(how) = gateway.exited() {
                unexpected.push(how);
                gateway.start()?;
            }
            if client.is_finished() || mono_ns() >= recovery_deadline {
                eprintln!("WARNING: no ack within {} s after restart {epoch}", args.drain_timeout);
                return Ok((kills, unexpected));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let last_kill_at = shared.kill_at.lock().expect("lock").last().copied();
        if let (Some(kill), Some(at)) = (kills.last_mut(), last_kill_at) {
            kill.recovery_ms = Some((shared.first_ack[epoch].load(Ordering::Acquire) - at) as f64 / 1e6);
        }
        let wait = args.interval * (0.5 + rand::random::<f64>());
        let until = mono_ns() + secs_ns(wait);
        while mono_ns() < until {
            if let Some(how) = gateway.exited() {
                unexpected.push(how);
                gateway.start()?;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if epoch == args.kills as usize {
            break;
        }
        let in_flight = shared.in_flight.load(Ordering::Acquire);
        let acked_before = shared.acked.load(Ordering::Acquire);
        let at = mono_ns();
        shared.kill_at.lock().expect("lock").push(at);
        gateway.kill()?;
        // Only now: a connection begun from here on can only reach the new
        // process.
        shared.epoch.store(epoch as u64 + 1, Ordering::Release);
        gateway.start()?;
        let restart_ms = (mono_ns() - at) as f64 / 1e6;
        eprintln!(
            "crash: kill {} with {in_flight} sends in flight ({acked_before} acked so far); ready again after {restart_ms:.0} ms",
            epoch + 1
        );
        kills.push(Kill { in_flight, acked_before, restart_ms, recovery_ms: None });
    }
    shared.stop_sending.store(true, Ordering::Release);
    let drain_deadline = mono_ns() + secs_ns(args.drain_timeout);
    while shared.in_flight.load(Ordering::Acquire) > 0 && mono_ns() < drain_deadline && !client.is_finished()
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((kills, unexpected))
}

/// What the client thread needs.
struct Plan {
    dial: Dial,
    backoff_ms: (u64, u64),
    retry_ns: u64,
    /// How long the end waits for the last sends' acks (`--drain-timeout`).
    drain_ns: u64,
    rate: f64,
    capacity: u32,
    text: String,
    agent_tokens: Vec<String>,
    visitor_tokens: Vec<String>,
}

/// A message sent and not acked yet.
struct Unacked {
    cid: String,
    /// When it was last written, monotonic ns; 0: not yet (no connection).
    written_at: u64,
}

/// One visitor: its conversation, its live connection, and what it was
/// acked.
#[derive(Default)]
struct Visitor {
    conv: Option<ConvId>,
    out: Option<Rc<Out>>,
    /// The epoch of the live connection.
    epoch: u64,
    unacked: BTreeMap<u64, Unacked>,
    acked: BTreeMap<String, u64>,
    last_seen: u64,
}

/// The client thread's state.
struct Client {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    encoder: RefCell<Encoder>,
    visitors: Vec<RefCell<Visitor>>,
    agents_online: Cell<usize>,
    result: RefCell<ClientResult>,
}

impl Client {
    fn count(map: &mut BTreeMap<String, u64>, key: String) {
        *map.entry(key).or_default() += 1;
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// A connection that has read its `connected` (resuming `resume`).
    async fn connect(&self, token: &str, resume: BTreeMap<ConvId, u64>) -> Result<Conn, String> {
        let (conn, _) =
            Conn::session(&self.plan.dial, None, token, resume, &self.encoder, |code| self.error(code))
                .await?;
        Ok(conn)
    }

    async fn reply<T>(
        &self,
        conn: &mut Conn,
        id: i64,
        what: &str,
        want: impl FnOnce(Event) -> Option<T>,
    ) -> Result<T, String> {
        conn.reply(self.plan.dial.reply_timeout, id, what, |code| self.error(code), want).await
    }

    fn error(&self, code: ErrorCode) {
        Self::count(&mut self.result.borrow_mut().error_codes, code.as_str().to_owned());
    }

    /// Writes visitor `v`'s message `number` on its live connection, if it
    /// has one (else it waits for the reconnect).
    fn write(&self, visitor: &mut Visitor, number: u64) {
        let (Some(out), Some(conv)) = (visitor.out.clone(), visitor.conv) else { return };
        let Some(unacked) = visitor.unacked.get_mut(&number) else { return };
        let send = Command::Send {
            conv,
            cid: unacked.cid.clone(),
            text: Some(self.plan.text.clone()),
            attachment: None,
        };
        let id = i64::try_from(number).unwrap_or(i64::MAX);
        let mut encoder = self.encoder.borrow_mut();
        let bytes =
            self.plan.dial.codec.encode_client(&ClientFrame { id: Some(id), body: send }, &mut encoder);
        out.send(if self.plan.dial.codec.is_binary() { ws::OP_BINARY } else { ws::OP_TEXT }, bytes);
        unacked.written_at = mono_ns();
    }

    /// A visitor's ack: the message is durable at `seq`.
    fn acked(&self, v: usize, cid: String, seq: u64, duplicate: bool, now: u64) {
        let mut visitor = self.visitors[v].borrow_mut();
        let number = cid.strip_prefix('m').and_then(|n| n.parse::<u64>().ok());
        if let Some(number) = number
            && visitor.unacked.remove(&number).is_some()
        {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shared.acked.fetch_add(1, Ordering::AcqRel);
        }
        if duplicate {
            self.result.borrow_mut().duplicate_acks += 1;
        }
        visitor.last_seen = visitor.last_seen.max(seq);
        let known = visitor.acked.insert(cid.clone(), seq);
        if known.is_some_and(|s| s != seq) {
            // Kept as the last ack says; the check finds the history at
            // neither seq or one, and the report says which.
            Self::count(&mut self.result.borrow_mut().error_codes, format!("ack seq changed for {cid}"));
        }
        let epoch = visitor.epoch as usize;
        if epoch == self.shared.epoch.load(Ordering::Acquire) as usize
            && let Some(first) = self.shared.first_ack.get(epoch)
        {
            let _ = first.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

async fn client_main(plan: Arc<Plan>, shared: Arc<Shared>) -> anyhow::Result<ClientResult> {
    let client = Rc::new(Client {
        visitors: (0..plan.visitor_tokens.len()).map(|_| RefCell::new(Visitor::default())).collect(),
        plan,
        shared: shared.clone(),
        encoder: RefCell::new(Encoder::new()),
        agents_online: Cell::new(0),
        result: RefCell::new(ClientResult::default()),
    });
    for a in 0..client.plan.agent_tokens.len() {
        monoio::spawn(agent_loop(client.clone(), a));
    }
    wait_until(|| client.agents_online.get() == client.plan.agent_tokens.len() || client.stopping()).await;
    for v in 0..client.visitors.len() {
        monoio::spawn(visitor_loop(client.clone(), v));
    }
    wait_until(|| client.visitors.iter().all(|v| v.borrow().out.is_some()) || client.stopping()).await;
    shared.ready.store(true, Ordering::Release);
    monoio::spawn(retry_loop(client.clone()));
    send_loop(&client).await?;
    wait_until(|| client.stopping()).await;
    // The kill loop stops when it sees nothing in flight, but a send can
    // still leave after that (the send loop was asleep until its message
    // was due). Its ack must be in before the histories are read, or the
    // check would find it "lost" from a history read before it was
    // stored; and an ack that comes after the reads (the wait timed out)
    // is not checked against them: it is counted unacked instead.
    let drained_by = mono_ns() + client.plan.drain_ns;
    wait_until(|| client.shared.in_flight.load(Ordering::Acquire) == 0 || mono_ns() >= drained_by).await;
    let mut acked = BTreeMap::new();
    for visitor in &client.visitors {
        let visitor = visitor.borrow();
        if let Some(conv) = visitor.conv {
            acked.insert(conv, visitor.acked.clone());
        }
    }

    // The check, on fresh connections to the last process.
    let mut histories = BTreeMap::new();
    for (v, token) in client.plan.visitor_tokens.iter().enumerate() {
        let Some(conv) = client.visitors[v].borrow().conv else { continue };
        let history = read_history(&client, token, conv).await.map_err(anyhow::Error::msg)?;
        histories.insert(conv, history);
    }
    let mut result = client.result.take();
    result.histories = histories;
    result.acked = acked;
    Ok(result)
}

/// Every message of `conv`, (seq, cid), oldest first, page by page.
async fn read_history(client: &Client, token: &str, conv: ConvId) -> Result<Vec<(u64, String)>, String> {
    let mut conn =
        client.connect(token, BTreeMap::new()).await.map_err(|e| format!("history connect: {e}"))?;
    let mut all: Vec<(u64, String)> = Vec::new();
    let mut before = None;
    for id in 2.. {
        let history = Command::History { conv, before, limit: Some(HISTORY_PAGE) };
        conn.command(&ClientFrame { id: Some(id), body: history }, &client.encoder);
        let page = client
            .reply(&mut conn, id, "history", |body| match body {
                Event::History { messages, .. } => Some(messages),
                _ => None,
            })
            .await?;
        let Some(first) = page.first().map(|m| m.seq) else { break };
        let mut older: Vec<(u64, String)> = page.into_iter().map(|m| (m.seq, m.cid)).collect();
        older.append(&mut all);
        all = older;
        if first <= 1 {
            break;
        }
        before = Some(first);
    }
    Ok(all)
}

/// Waits before a reconnect: doubling from the minimum, jittered.
async fn back_off(client: &Client, failures: &mut u32) {
    let (min, max) = client.plan.backoff_ms;
    let ms = min.saturating_mul(1u64 << (*failures).min(16)).min(max);
    *failures += 1;
    let jittered = ms / 2 + rand::random::<u64>() % (ms / 2 + 1);
    monoio::time::sleep(Duration::from_millis(jittered)).await;
}

/// An agent: online, reading (and dropping) its frames; reconnects.
async fn agent_loop(client: Rc<Client>, a: usize) {
    let mut failures = 0;
    let mut counted = false;
    while !client.stopping() {
        let token = &client.plan.agent_tokens[a];
        let result = async {
            let mut conn = client.connect(token, BTreeMap::new()).await?;
            let presence =
                Command::Presence { status: PresenceStatus::Online, capacity: Some(client.plan.capacity) };
            conn.command(&ClientFrame { id: Some(2), body: presence }, &client.encoder);
            client
                .reply(&mut conn, 2, "presence", |body| matches!(body, Event::Presence { .. }).then_some(()))
                .await?;
            Ok::<_, String>(conn)
        }
        .await;
        let mut conn = match result {
            Ok(conn) => conn,
            Err(e) => {
                Client::count(&mut client.result.borrow_mut().disconnects, format!("agent {e}"));
                back_off(&client, &mut failures).await;
                continue;
            }
        };
        failures = 0;
        if !counted {
            counted = true;
            client.agents_online.set(client.agents_online.get() + 1);
        }
        let e = loop {
            match conn.next().await {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        if !client.stopping() {
            Client::count(&mut client.result.borrow_mut().disconnects, format!("agent: {e}"));
        }
    }
}

/// A visitor's connection: (re)connects with resume, opens its
/// conversation the first time, sends again whatever is unacked, and reads
/// acks until the connection is lost.
async fn visitor_loop(client: Rc<Client>, v: usize) {
    let mut failures = 0;
    while !client.stopping() {
        let epoch = client.shared.epoch.load(Ordering::Acquire);
        let (conv, last_seen) = {
            let visitor = client.visitors[v].borrow();
            (visitor.conv, visitor.last_seen)
        };
        let resume = conv.map(|c| BTreeMap::from([(c, last_seen)])).unwrap_or_default();
        let token = &client.plan.visitor_tokens[v];
        let result = async {
            let mut conn = client.connect(token, resume).await?;
            let conv = match conv {
                Some(conv) => conv,
                None => {
                    let open = Command::Open { group: None, meta: BTreeMap::new() };
                    conn.command(&ClientFrame { id: Some(2), body: open }, &client.encoder);
                    client
                        .reply(&mut conn, 2, "open", |body| match body {
                            Event::Conversation { conv, .. } => Some(conv),
                            _ => None,
                        })
                        .await?
                }
            };
            Ok::<_, String>((conn, conv))
        }
        .await;
        let mut conn = match result {
            Ok((conn, conv)) => {
                let mut visitor = client.visitors[v].borrow_mut();
                visitor.conv = Some(conv);
                visitor.out = Some(conn.out.clone());
                visitor.epoch = epoch;
                let numbers: Vec<u64> = visitor.unacked.keys().copied().collect();
                if !numbers.is_empty() {
                    client.result.borrow_mut().resends += numbers.len() as u64;
                }
                for number in numbers {
                    client.write(&mut visitor, number);
                }
                conn
            }
            Err(e) => {
                Client::count(&mut client.result.borrow_mut().disconnects, format!("visitor {e}"));
                back_off(&client, &mut failures).await;
                continue;
            }
        };
        failures = 0;
        let e = loop {
            let (now, frame) = match conn.next().await {
                Ok(next) => next,
                Err(e) => break e,
            };
            match frame.body {
                Event::Ack { cid, seq, duplicate, .. } => client.acked(v, cid, seq, duplicate, now),
                Event::Msg(msg) => {
                    let mut visitor = client.visitors[v].borrow_mut();
                    visitor.last_seen = visitor.last_seen.max(msg.seq);
                }
                Event::Error { code, .. } => client.error(code),
                _ => {}
            }
        };
        client.visitors[v].borrow_mut().out = None;
        if !client.stopping() {
            Client::count(&mut client.result.borrow_mut().disconnects, format!("visitor: {e}"));
        }
    }
}

/// Sends again, on its live connection, every message unacked for longer
/// than `--retry-ms`.
async fn retry_loop(client: Rc<Client>) {
    let period = Duration::from_nanos((client.plan.retry_ns / 4).max(1_000_000));
    while !client.stopping() {
        monoio::time::sleep(period).await;
        let now = mono_ns();
        for cell in &client.visitors {
            let mut visitor = cell.borrow_mut();
            if visitor.out.is_none() {
                continue;
            }
            let stale: Vec<u64> = visitor
                .unacked
                .iter()
                .filter(|(_, u)| u.written_at > 0 && now.saturating_sub(u.written_at) > client.plan.retry_ns)
                .map(|(n, _)| *n)
                .collect();
            client.result.borrow_mut().resends += stale.len() as u64;
            for number in stale {
                client.write(&mut visitor, number);
            }
        }
    }
}

/// The open loop: message `number` is due at `t0 + number / rate`, from
/// visitor `number % visitors`, whether or not its connection is up.
async fn send_loop(client: &Client) -> anyhow::Result<()> {
    let timer = PreciseTimer::new().context("creating a timerfd")?;
    let t0 = mono_ns();
    let visitors = client.visitors.len() as u64;
    for number in 0u64.. {
        if client.shared.stop_sending.load(Ordering::Acquire) {
            break;
        }
        timer.sleep_until(scheduled_at(t0, client.plan.rate, 0.0, number)).await.context("timerfd")?;
        // Asked again after the sleep: the kill loop may have ended the
        // load meanwhile.
        if client.shared.stop_sending.load(Ordering::Acquire) {
            break;
        }
        let mut visitor = client.visitors[(number % visitors) as usize].borrow_mut();
        visitor.unacked.insert(number, Unacked { cid: format!("m{number}"), written_at: 0 });
        client.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        client.result.borrow_mut().sent += 1;
        client.write(&mut visitor, number);
    }
    Ok(())
}

/// The run's results as a table (stderr, and the HTML page).
fn table(report: &CrashReport) -> Table {
    let ms = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.0} ms"));
    let v = &report.verdict;
    let mut t = Table::new("kefu-bench crash");
    t.section("load")
        .row(
            "kills",
            format!("{} of {} ({} mid-load)", report.kills.len(), report.kills_asked, report.kills_mid_load),
        )
        .row("messages", format!("{} sent, {} acked, {} unacked", report.sent, report.acked, report.unacked))
        .row("resends", format!("{} ({} acked as duplicates)", report.resends, report.duplicate_acks))
        .row("recovery, median", ms(report.recovery_ms_median))
        .row("recovery, max", ms(report.recovery_ms_max))
        .row("restart, median", ms(report.restart_ms_median))
        .row("checked", format!("{} conversations, {} stored messages", v.conversations, v.stored));
    t.section("checks")
        .check("acked but lost", v.acked_lost == 0, v.acked_lost.to_string())
        .check("ack seq = stored seq", v.ack_mismatches == 0, v.ack_mismatches.to_string())
        .check("no duplicates", v.duplicates == 0, v.duplicates.to_string())
        .check("no gaps", v.gaps == 0, v.gaps.to_string())
        .check("every send acked", report.unacked == 0, report.unacked.to_string())
        .check(
            "every kill done and recovered",
            report.kills.len() == report.kills_asked as usize
                && report.kills.iter().all(|k| k.recovery_ms.is_some()),
            format!("{} of {}", report.kills.len(), report.kills_asked),
        );
    t
}

/// What the table leaves out (examples of findings, errors, the storage
/// config), and the failures, on stderr.
fn print_summary(report: &CrashReport) {
    let v = &report.verdict;
    for example in &v.examples {
        eprintln!("  FOUND: {example}");
    }
    for (code, n) in &report.error_codes {
        eprintln!("  error frames ×{n}: {code}");
    }
    let storage: Vec<String> = report.storage_config.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!("  gateway [storage]: {}", storage.join(" "));
    for failure in report.failures() {
        eprintln!("FAIL: {failure}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(cid, seq)| (cid.to_string(), *seq)).collect()
    }

    fn history(list: &[(u64, &str)]) -> Vec<(u64, String)> {
        list.iter().map(|(seq, cid)| (*seq, cid.to_string())).collect()
    }

    fn verdict(acked: &[(&str, u64)], stored: &[(u64, &str)]) -> Verdict {
        let conv = ConvId(7);
        check(&BTreeMap::from([(conv, acks(acked))]), &BTreeMap::from([(conv, history(stored))]))
    }

    #[test]
    fn a_clean_history_passes() {
        // m3 was stored but its ack was lost with the process: not a finding.
        let v = verdict(&[("m1", 1), ("m2", 2)], &[(1, "m1"), (2, "m2"), (3, "m3")]);
        assert!(v.clean(), "{v:?}");
        assert_eq!((v.conversations, v.stored), (1, 3));
    }

    #[test]
    fn an_acked_message_missing_from_the_history_is_lost() {
        let v = verdict(&[("m1", 1), ("m2", 2)], &[(1, "m1")]);
        assert_eq!(v.acked_lost, 1, "{v:?}");
        assert_eq!((v.duplicates, v.gaps, v.ack_mismatches), (0, 0, 0));
        assert!(v.examples[0].contains("m2"), "{v:?}");
    }

    #[test]
    fn a_cid_stored_twice_is_a_duplicate() {
        let v = verdict(&[("m1", 1), ("m2", 2)], &[(1, "m1"), (2, "m2"), (3, "m1")]);
        assert_eq!(v.duplicates, 1, "{v:?}");
        assert_eq!((v.acked_lost, v.gaps, v.ack_mismatches), (0, 0, 0));
    }

    #[test]
    fn a_hole_in_the_seqs_is_a_gap() {
        let v = verdict(&[("m1", 1), ("m3", 3)], &[(1, "m1"), (3, "m3"), (6, "m6")]);
        // 2, 4 and 5 are missing.
        assert_eq!(v.gaps, 3, "{v:?}");
        assert_eq!((v.acked_lost, v.duplicates, v.ack_mismatches), (0, 0, 0));
        // A history that does not start at 1 has a gap too, and so does a
        // seq seen twice.
        assert_eq!(verdict(&[], &[(2, "m2")]).gaps, 1);
        assert_eq!(verdict(&[], &[(1, "m1"), (1, "m2")]).gaps, 1);
    }

    #[test]
    fn an_ack_for_another_seq_is_a_mismatch() {
        let v = verdict(&[("m1", 1), ("m2", 2)], &[(1, "m2"), (2, "m1")]);
        assert_eq!(v.ack_mismatches, 2, "{v:?}");
        assert_eq!((v.acked_lost, v.duplicates, v.gaps), (0, 0, 0));
    }

    #[test]
    fn a_conversation_with_no_history_loses_its_acks() {
        let conv = ConvId(9);
        let v = check(&BTreeMap::from([(conv, acks(&[("m1", 1)]))]), &BTreeMap::new());
        assert_eq!((v.conversations, v.acked_lost), (1, 1), "{v:?}");
    }

    #[test]
    fn the_median_is_the_middle() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
