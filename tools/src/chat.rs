//! `kefu-bench chat`: visitor → agent delivery latency at a fixed rate.
//!
//! The question: with thousands of visitors talking to a few dozen agents at
//! an aggregate rate R, how long after a visitor *should have* sent a
//! message does the agent have it, and how long until the visitor holds the
//! `ack` that says it is durable?
//!
//! # The run
//!
//! 1. **Agents.** `--agents` connections `connect` with a JWT this tool
//!    signs (HS256, with the gateway's secret from `--data DIR/jwt_secret`
//!    or `--jwt-secret-file`) and go `presence online` with capacity
//!    ceil(visitors / agents), which must fit under `--max-capacity` (the
//!    gateway's `routing.max_capacity`, 100 by default). Agent ids carry a
//!    random run id, so a second run against the same gateway does not
//!    inherit the first run's conversations.
//! 2. **Visitors.** `--visitors` anonymous connections `connect {}`, `open
//!    {}`, and wait until their conversation is `assigned`; at most
//!    `--setup-concurrency` per thread are in this phase at once.
//! 3. **Load, open loop.** Send times are fixed in advance: each client
//!    thread owns a share of R proportional to its visitors, its messages
//!    are spaced 1/R_t apart, round-robin over its visitors, and the threads
//!    are phase-shifted so that the aggregate is evenly spaced too. A message
//!    leaves when its time comes whatever happened to earlier ones (nothing
//!    waits for an ack), and every latency is measured from the *scheduled*
//!    time, not from the write: a stalled server (or client) shows up in the
//!    percentiles instead of silently slowing the load down (no coordinated
//!    omission).
//! 4. **Drain.** After `--warmup` + `--duration` nothing more is sent; the
//!    run waits up to `--grace` for the last deliveries and acks, then
//!    stops. What is still missing is reported as undelivered / unacked.
//!
//! # The attachment mix
//!
//! With `--attachment-share F` (0..=1) each send carries, with probability
//! F, an image-sized attachment of `--attachment-bytes` (`image/jpeg`,
//! base64 on the JSON subprotocol, raw bytes on FlatBuffers) besides its
//! text. Delivery and ack latencies are reported for all messages and for
//! each kind apart (`with_attachment`, `text_only`): a large message costs
//! its own encode, decode and store, and may delay the small ones behind
//! it. Attachments count against the gateway's per-connection
//! `limits.attachment_bytes_per_min` (16 MiB a minute by default) and must
//! fit `messages.max_attachment_bytes` and `limits.max_message_bytes`; a
//! refused send is counted as `rate_limited` or an error frame like any
//! other.
//!
//! Only messages *scheduled* inside the measured window (after the warmup)
//! count. A message's scheduled time travels in its `cid`
//! (`thread-number-nanoseconds`), so the agent that receives the `msg` and
//! the visitor that receives the `ack` match it to its schedule by cid alone,
//! on whichever client thread they live.
//!
//! # Keeping the client honest
//!
//! - Send times are kept with a `timerfd` (absolute CLOCK_MONOTONIC
//!   deadlines, nanosecond resolution) read through io_uring, not monoio's
//!   millisecond timer wheel, which would add up to 1 ms of the client's own
//!   lateness to every message. The lateness that remains is measured and
//!   reported (`send_lag_us`): if its p99 is not small next to the
//!   latencies, the client was in the way.
//! - Receive times are taken once per read completion, as in `echo`.
//! - The client's CPU over the window is reported next to the server's.
//!
//! # Seeing into the server from outside
//!
//! In kefu a `msg` is fanned out only once the message is durable, so the
//! delivery latency contains a group commit. Two figures help say how much:
//!
//! - acks of one commit leave the gateway together, so the client sees them
//!   in bursts; `ack_bursts_per_s` counts bursts (gaps over 150 µs) during
//!   the window and `acks_per_burst` their size. Under load commits run back
//!   to back, so 1 / bursts per second is about one commit's duration, and
//!   the fastest ack is about one commit plus the trips through the shard;
//! - `--fsync-probe` times fdatasyncs in the gateway's data directory before
//!   the load (redb makes one or two per commit).
//! - `delivery_split_at_home_us` cuts each delivery at the `ts` its home
//!   stamped (whole wall-clock milliseconds, so ±0.5 ms): a tail before
//!   the stamp came from the client, its socket, the visitor's shard or a
//!   mailbox, none of which touches the disk.
//!
//! With `--server-pid`, the server's CPU is also broken down by thread
//! (shards, storage writer), user and system.
//!
//! # Rate limits
//!
//! The gateway limits commands per connection (`limits.messages_per_s`,
//! default 20/s, `limits.burst`, default 40). Each visitor sends rate /
//! visitors messages per second; the gateway must allow that, e.g. with
//! `KEFU_LIMITS_MESSAGES_PER_S` and `KEFU_LIMITS_BURST` in its environment.
//! `rate_limited` errors are counted, reported loudly, and make the run
//! exit non-zero: those numbers measure the limiter, not the gateway.
//!
//! The gateway also limits, per client address, WebSocket handshakes
//! (`limits.new_connections_per_s_per_ip`, burst
//! `limits.new_connections_burst_per_ip`) and new anonymous visitors
//! (`limits.anonymous_per_min_per_ip`). Thousands of visitors from a few
//! source addresses meet both: raise them for a run (tools/bench-chat.sh
//! does). A `429` or a refused `connect` is reported as a connection error
//! naming the limit.

use std::{
    cell::{Cell, OnceCell, RefCell},
    collections::{BTreeMap, HashMap, VecDeque},
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::fd::{FromRawFd as _, RawFd},
    path::PathBuf,
    rc::Rc,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use kefu_core::{
    auth::{Claims, JwtKey},
    config::AuthPolicy,
};
use kefu_proto::{
    ClientFrame, Codec, Command, ConvId, ConvStatus, Encoder, ErrorCode, Event, PresenceStatus, Role,
    ServerFrame, client::Attachment,
};
use monoio::{
    io::{AsyncReadRent as _, AsyncWriteRentExt as _, OwnedReadHalf, OwnedWriteHalf, Splitable as _},
    net::TcpStream,
};
use serde::Serialize;

use crate::{
    echo::{TaskRun, build_runtime},
    html::Series,
    progress::{Goal, Phase, Progress, Snapshot},
    report::{self, Output, Table},
    stats::{self, Latency, LatencySummary},
    ws::{self, Event as WsEvent, FrameReader, WsUrl},
};

/// Acks read further apart than this belong to different group commits
/// (acks of one commit leave the gateway within microseconds of each other;
/// a commit takes at least a couple of fsyncs).
const ACK_BURST_GAP_NS: u64 = 150_000;

/// Largest server message this client reassembles: the largest attachment
/// it sends ([`ATTACHMENT_BYTES_MAX`]) as base64 with its envelope fits;
/// anything bigger is a bug.
const MESSAGE_BYTES_MAX: usize = 24 << 20;

/// Largest `--attachment-bytes`: well above the gateway's default
/// `messages.max_attachment_bytes` (1 MiB), to measure a raised one.
const ATTACHMENT_BYTES_MAX: u32 = 16 << 20;

/// MIME type of the attachments this tool sends.
const ATTACHMENT_MIME: &str = "image/jpeg";

/// What every chat-engine scenario (`chat`, `junk`, `slow`, `fanout`) needs
/// to reach a gateway and run its client threads.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The gateway's client WebSocket endpoint (ws:// only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,

    /// The gateway's data directory: its `jwt_secret` signs the agents'
    /// tokens, and fsync is probed there (see --fsync-probe).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// A file holding the gateway's JWT secret (auth.jwt_secret), instead
    /// of --data.
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Encoding: json (kefu.v1.json) or fb (kefu.v1.fb).
    #[arg(long, value_enum, default_value_t = Subprotocol::Json)]
    pub subprotocol: Subprotocol,

    /// Source addresses to connect from, round-robin (e.g.
    /// 127.0.0.1,127.0.0.2). Unset lets the kernel choose.
    #[arg(long, value_delimiter = ',')]
    pub sources: Vec<IpAddr>,

    /// Client threads, each with its own io_uring runtime; the scenario
    /// spreads its connections over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// CPUs to pin the client threads to (comma list; thread i gets
    /// cpu[i % len]).
    #[arg(long, value_delimiter = ',')]
    pub cpu: Vec<usize>,

    /// Report the CPU and memory of this server process over the window.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Bound on one connection's TCP connect plus handshake, milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub connect_timeout_ms: u64,

    /// Bound on each setup reply (connected, presence, conversation
    /// assigned), milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub reply_timeout_ms: u64,

    /// Bound on the whole setup (agents, then visitors), seconds.
    #[arg(long, default_value_t = 120.0)]
    pub setup_timeout: f64,

    /// Connections being set up at once, per thread.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub setup_concurrency: u32,

    /// io_uring submission queue entries per thread.
    #[arg(long, default_value_t = 8192)]
    pub ring_entries: u32,

    /// io_uring task-work mode of the client threads.
    #[arg(long, value_enum, default_value_t = TaskRun::Defer)]
    pub taskrun: TaskRun,

    /// Allow a URL outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_non_loopback: bool,
}

/// Arguments of `kefu-bench chat`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
The gateway rate-limits commands per connection (limits.messages_per_s, default 20/s; \
limits.burst, default 40). Every visitor sends RATE / VISITORS messages per second, so \
start the gateway with a limit above that, e.g.
    KEFU_LIMITS_MESSAGES_PER_S=1000 KEFU_LIMITS_BURST=1000 kefu serve ...
rate_limited errors are reported loudly and make the run fail.
Visitors connect anonymously from --sources, so also lift the per-address limits:
    KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP=1000000 KEFU_LIMITS_ANONYMOUS_PER_MIN_PER_IP=1000000

Example (tools/bench-chat.sh does all of it):
    kefu-bench chat --url ws://127.0.0.1:8080/ws --data DIR --visitors 2000 --agents 20 \\
        --rate 5000 --duration 10 --warmup 2 --sources 127.0.0.1,127.0.0.2 --cpu 0 --server-pid PID")]
pub struct ChatArgs {
    /// What every scenario's client shares: where to connect, from where,
    /// with how many threads, and the gateway's process to measure.
    #[command(flatten)]
    pub client: ClientArgs,

    /// Visitors, each with its own connection and conversation.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub visitors: u32,

    /// Agents; each takes ceil(visitors / agents) conversations.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub agents: u32,

    /// Most conversations the gateway lets one agent hold
    /// (routing.max_capacity).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_capacity: u32,

    /// Visitors connect with a visitor token this tool signs (one user per
    /// visitor) instead of anonymously: what a business system's known
    /// visitors do, and what keeps a run clear of any per-address limit on
    /// new anonymous visitors.
    #[arg(long)]
    pub visitor_tokens: bool,

    /// Skill group: the agents' token serves it and visitors open in it.
    /// Unset: generalist agents, visitors in the default group.
    #[arg(long)]
    pub group: Option<String>,

    /// Aggregate visitor messages per second, open loop.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,

    /// Measured window in seconds (by scheduled send time).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of load before the window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Seconds after the last send to wait for deliveries and acks.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,

    /// Also report the delivery latency of each slice of the window this
    /// many seconds long (by scheduled send), so that a long run shows its
    /// first minute beside its last. 0: no slices.
    #[arg(long, default_value_t = 60.0, value_parser = parse_slice)]
    pub slice: f64,

    /// Text bytes per message.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub size: u32,

    /// Share (0 to 1) of sends that also carry an attachment of
    /// --attachment-bytes. 0: none.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub attachment_share: f64,

    /// Attachment size in bytes (decoded) of the sends that carry one;
    /// needs --attachment-share. The gateway must allow it
    /// (messages.max_attachment_bytes, limits.max_message_bytes,
    /// limits.attachment_bytes_per_min).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(ATTACHMENT_BYTES_MAX)))]
    pub attachment_bytes: u32,

    /// A process that is part of the setup under test (the business
    /// system's hook server): its CPU over the window is reported as
    /// `helper_cpu_cores` and not counted in `other_cpu_cores`.
    #[arg(long)]
    pub helper_pid: Option<u32>,

    /// fsyncs to time in --data before the run (0: none), to compare the
    /// latencies with what the disk costs.
    #[arg(long, default_value_t = 200)]
    pub fsync_probe: u32,
}

/// The two encodings of the client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subprotocol {
    Json,
    Fb,
}

impl Subprotocol {
    pub(crate) fn codec(self) -> Codec {
        match self {
            Subprotocol::Json => Codec::Json,
            Subprotocol::Fb => Codec::FlatBuffers,
        }
    }
}

/// `--slice`: 0, or at least a second (a slice holds enough sends for a
/// p99, and a run cannot ask for millions of them).
fn parse_slice(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if seconds == 0.0 || (1.0..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{seconds} s: give 0 (no slices) or from 1 to 86400 seconds"))
    }
}

/// `--attachment-share`: a number from 0 to 1.
fn parse_share(text: &str) -> Result<f64, String> {
    let share: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("{share} is not a share: give a number from 0 (no attachments) to 1 (every send)"))
    }
}

/// One kind of message's figures, when a run sends a mix.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct KindReport {
    /// Window messages of this kind sent, delivered and acked.
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub delivery_latency_us: LatencySummary,
    pub ack_latency_us: LatencySummary,
}

/// One slice of the window: the messages scheduled from `start_s` to
/// `end_s` (seconds into the window).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SliceReport {
    /// Where the slice starts and ends, in seconds into the window (the
    /// last slice may be shorter).
    pub start_s: f64,
    pub end_s: f64,
    /// Messages scheduled in the slice, and those an agent received: a
    /// slice that lost messages shows it here, not in its percentiles.
    pub sent: u64,
    pub delivered: u64,
    /// Agent receives `msg` − scheduled send time, µs.
    pub delivery_latency_us: LatencySummary,
}

/// [`ChatReport::delivery_split_at_home_us`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SplitReport {
    pub to_home: LatencySummary,
    pub from_home: LatencySummary,
}

/// The result of a run: printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct ChatReport {
    pub url: String,
    pub subprotocol: Subprotocol,
    pub visitors: u32,
    /// Visitors whose conversation was assigned before the load started.
    pub visitors_ready: u64,
    pub agents: u32,
    pub agents_online: u64,
    /// Conversations per agent (presence capacity).
    pub capacity: u32,
    pub size: u32,
    pub threads: u16,
    /// Seconds from the first connect to the last visitor assigned.
    pub setup_s: f64,
    pub warmup_s: f64,
    pub window_s: f64,
    pub grace_s: f64,
    /// The rate asked for, messages per second.
    pub target_rate: f64,
    /// Messages scheduled inside the window (all of them were written,
    /// unless a connection had failed).
    pub sent: u64,
    /// Messages actually written during the window, per second.
    pub send_rate: f64,
    /// `msg` frames agents received during the window, per second.
    pub delivered_per_s: f64,
    /// Window messages an agent received, and that a visitor got an `ack`
    /// for, before the run ended (window + grace).
    pub delivered: u64,
    pub acked: u64,
    pub undelivered: u64,
    pub unacked: u64,
    /// `msg` frames an agent saw twice (or out of `seq` order), and acks
    /// marked `duplicate`.
    pub duplicates: u64,
    /// Agent receives `msg` − scheduled send time, µs.
    pub delivery_latency_us: LatencySummary,
    /// Visitor receives `ack` − scheduled send time, µs.
    pub ack_latency_us: LatencySummary,
    /// The delivery latency of each `--slice` seconds of the window, in
    /// order (empty with `--slice 0`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delivery_by_slice: Vec<SliceReport>,
    /// The delivery latency cut at the `ts` the message's home stamped on
    /// it: scheduled send → `ts`, and `ts` → the agent's receipt, µs. `ts`
    /// is in whole milliseconds of the wall clock (taken here as the middle
    /// of its millisecond), so each half is good to ±0.5 ms: enough to say
    /// whether a tail of several milliseconds is spent before the home
    /// took the message (client, socket, visitor's shard, mailbox) or
    /// after (commit, fan-out, agent's shard, socket, client).
    pub delivery_split_at_home_us: SplitReport,
    /// The client's own lateness: write − scheduled send time, µs.
    pub send_lag_us: LatencySummary,
    /// Acks arrive in bursts, one per group commit (a gap of more than
    /// 150 µs starts a new one): bursts per second during the window, as
    /// seen by the client thread that saw most.
    pub ack_bursts_per_s: f64,
    /// Window acks per burst: about the messages per commit.
    pub acks_per_burst: Option<f64>,
    /// `error` frames by code (all phases).
    pub error_codes: BTreeMap<String, u64>,
    /// The first message of each error code, as the gateway wrote it.
    pub error_messages: BTreeMap<String, String>,
    pub rate_limited: u64,
    /// Connections that failed (setup or run), by kind.
    pub connection_errors: BTreeMap<String, u64>,
    pub client_cpu_s: f64,
    pub client_cpu_cores: f64,
    pub client_cpu_us_per_msg: Option<f64>,
    pub client_cores_busy: Option<f64>,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_cores: Option<f64>,
    /// Server CPU per message sent in the window, µs (a message costs a
    /// send, a durable append, an ack and a fan-out).
    pub server_cpu_us_per_msg: Option<f64>,
    pub server_cores_busy: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    /// Server CPU over the window by thread name (shards, storage writer, …),
    /// in cores.
    pub server_threads_cores: Option<BTreeMap<String, stats::CpuSplit>>,
    /// The `--helper-pid` process's CPU over the window, in cores.
    pub helper_cpu_cores: Option<f64>,
    /// Busy cores on the host that were neither client, server nor helper
    /// (nor stolen by the hypervisor).
    pub other_cpu_cores: f64,
    /// The share of each CPU's time over the window that the hypervisor
    /// took from it (`/proc/stat` steal), by CPU number: on a virtual
    /// machine, time in which whatever ran there stood still, which lands
    /// in the latency tail however fast the gateway is.
    pub steal_by_cpu: Vec<f64>,
    /// fdatasync of a small append in --data, µs, timed before the load.
    pub fsync_probe_us: Option<LatencySummary>,
    /// Share of sends with an attachment (0: none), and its size in bytes.
    pub attachment_share: f64,
    pub attachment_bytes: Option<u32>,
    /// Window messages with an attachment, and those without, apart (only
    /// when the run sent a mix).
    pub with_attachment: Option<KindReport>,
    pub text_only: Option<KindReport>,
    /// The percentile curves of the latencies, for the HTML report.
    #[serde(skip)]
    pub curves: Vec<Series>,
}

/// What every thread needs; built once, shared read-only.
struct Plan {
    url: WsUrl,
    codec: Codec,
    sources: Vec<IpAddr>,
    connect_timeout: Duration,
    reply_timeout: Duration,
    setup_concurrency: usize,
    group: Option<String>,
    capacity: u32,
    /// Agent tokens, by agent index.
    tokens: Vec<String>,
    /// Visitor tokens, by visitor index; empty: visitors are anonymous.
    visitor_tokens: Vec<String>,
    text: String,
    /// What a send carries with probability `attachment_share`.
    attachment: Option<Attachment>,
    attachment_share: f64,
    rate: f64,
    threads: usize,
    /// Visitors planned per thread (their share of the rate).
    visitors_planned: Vec<usize>,
    visitors_total: usize,
}

/// The window, in CLOCK_MONOTONIC nanoseconds; fixed once everyone is set up.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// First scheduled send.
    t0: u64,
    /// Sends scheduled from here on are measured ...
    window_start: u64,
    /// ... up to here, where sending stops.
    send_end: u64,
    /// Length of a slice of the window (0: no slices).
    slice_ns: u64,
}

impl Schedule {
    fn measured(&self, scheduled: u64) -> bool {
        scheduled >= self.window_start && scheduled < self.send_end
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window_start && t < self.send_end
    }

    /// The slice of the window a measured send scheduled at `scheduled`
    /// falls in.
    fn slice(&self, scheduled: u64) -> Option<usize> {
        (self.slice_ns > 0).then(|| (scheduled.saturating_sub(self.window_start) / self.slice_ns) as usize)
    }
}

/// Cross-thread rendezvous and the counters the drain waits on.
#[derive(Default)]
struct Global {
    agents_done: AtomicUsize,
    agents_online: AtomicU64,
    visitors_go: AtomicBool,
    visitors_done: AtomicUsize,
    visitors_ready: AtomicU64,
    sending_done: AtomicUsize,
    schedule: OnceLock<Schedule>,
    stop: AtomicBool,
    sent: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    /// Agents and visitors set up so far (for the progress bar).
    connected: AtomicU64,
}

/// One thread's share of the report.
#[derive(Default)]
struct Tally {
    sent_in_window: u64,
    delivered_in_window: u64,
    delivered: u64,
    acked: u64,
    sent: u64,
    duplicates: u64,
    acks_in_window: u64,
    ack_bursts: u64,
    delivery: Latency,
    ack: Latency,
    send_lag: Latency,
    /// [`ChatReport::delivery_split_at_home_us`].
    to_home: Latency,
    from_home: Latency,
    /// Sends and delivery latency by slice of the window
    /// ([`Schedule::slice`]).
    by_slice: Vec<SliceTally>,
    /// The window's messages by kind: index [`Kind::index`].
    by_kind: [KindTally; 2],
    error_codes: BTreeMap<String, u64>,
    /// The first message seen of each error code.
    error_messages: BTreeMap<String, String>,
    connection_errors: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.sent_in_window += other.sent_in_window;
        self.delivered_in_window += other.delivered_in_window;
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.sent += other.sent;
        self.duplicates += other.duplicates;
        self.acks_in_window += other.acks_in_window;
        // Every thread sees (nearly) every commit: the most any one saw is
        // the estimate, not the sum.
        self.ack_bursts = self.ack_bursts.max(other.ack_bursts);
        self.delivery.merge(&other.delivery);
        self.ack.merge(&other.ack);
        self.send_lag.merge(&other.send_lag);
        self.to_home.merge(&other.to_home);
        self.from_home.merge(&other.from_home);
        if self.by_slice.len() < other.by_slice.len() {
            self.by_slice.resize_with(other.by_slice.len(), SliceTally::default);
        }
        for (mine, theirs) in self.by_slice.iter_mut().zip(&other.by_slice) {
            mine.sent += theirs.sent;
            mine.delivery.merge(&theirs.delivery);
        }
        for (mine, theirs) in self.by_kind.iter_mut().zip(&other.by_kind) {
            mine.sent += theirs.sent;
            mine.delivery.merge(&theirs.delivery);
            mine.ack.merge(&theirs.ack);
        }
        for (k, v) in other.error_codes {
            *self.error_codes.entry(k).or_default() += v;
        }
        for (k, v) in other.error_messages {
            self.error_messages.entry(k).or_insert(v);
        }
        for (k, v) in other.connection_errors {
            *self.connection_errors.entry(k).or_default() += v;
        }
    }
}

/// One slice of the window's share of a thread's tally.
#[derive(Default)]
struct SliceTally {
    sent: u64,
    delivery: Latency,
}

impl Tally {
    /// The tally of the slice a measured send scheduled at `scheduled`
    /// falls in, if the run is cut in slices.
    fn slice(&mut self, schedule: &Schedule, scheduled: u64) -> Option<&mut SliceTally> {
        let i = schedule.slice(scheduled)?;
        if self.by_slice.len() <= i {
            self.by_slice.resize_with(i + 1, SliceTally::default);
        }
        Some(&mut self.by_slice[i])
    }
}

/// A message with an attachment or without: their latencies are kept
/// apart as well as together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Attachment,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Text => 0,
            Kind::Attachment => 1,
        }
    }
}

/// One kind's share of a thread's tally.
#[derive(Default)]
struct KindTally {
    sent: u64,
    delivery: Latency,
    ack: Latency,
}

impl KindTally {
    fn report(&self) -> KindReport {
        KindReport {
            sent: self.sent,
            delivered: self.delivery.count(),
            acked: self.ack.count(),
            delivery_latency_us: self.delivery.summary(),
            ack_latency_us: self.ack.summary(),
        }
    }
}

pub fn run(args: ChatArgs, out: &Output) -> anyhow::Result<()> {
    let report = measure(&args)?;
    out.emit(&report, &table(&report), &report.curves)?;
    print_summary(&report);
    if report.rate_limited > 0 {
        bail!(
            "{} sends were refused with rate_limited: the gateway's per-connection limit is below {:.1} msg/s \
             per visitor; restart it with KEFU_LIMITS_MESSAGES_PER_S and KEFU_LIMITS_BURST above that",
            report.rate_limited,
            args.rate / f64::from(args.visitors)
        );
    }
    if report.visitors_ready == 0 || report.agents_online == 0 {
        bail!(
            "no load was generated: {} agents online, {} visitors ready",
            report.agents_online,
            report.visitors_ready
        );
    }
    Ok(())
}

/// CLOCK_REALTIME in nanoseconds: the clock of a message's `ts`.
fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of every timestamp here and of
/// the timerfd deadlines (std's `Instant` reads the same clock).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so this cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(crate) fn secs_ns(s: f64) -> u64 {
    (s * 1e9) as u64
}

/// The `cid` of message `number` of client thread `thread`, scheduled at
/// `scheduled` (monotonic ns): all a receiver needs to time it.
pub fn make_cid(thread: usize, number: u64, scheduled: u64) -> String {
    format!("{thread}-{number}-{scheduled}")
}

/// [`make_cid`] for a message of `kind`: one with an attachment is marked
/// by an `i` before the thread, so that its ack, which carries nothing but
/// the cid, is told apart too.
pub fn make_kind_cid(kind: Kind, thread: usize, number: u64, scheduled: u64) -> String {
    match kind {
        Kind::Text => make_cid(thread, number, scheduled),
        Kind::Attachment => format!("i{}", make_cid(thread, number, scheduled)),
    }
}

/// The kind of message a [`make_kind_cid`] cid names.
pub fn cid_kind(cid: &str) -> Kind {
    if cid.starts_with('i') { Kind::Attachment } else { Kind::Text }
}

/// The scheduled time a [`make_cid`] cid carries.
pub fn cid_scheduled(cid: &str) -> Option<u64> {
    let mut parts = cid.split('-');
    let (_, _, scheduled, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    scheduled.parse().ok()
}

/// When a thread's message `number` is due: its messages are 1/`rate` s
/// apart from `t0`, shifted by `phase` (0..1) of that spacing so that the
/// threads' streams interleave evenly.
pub fn scheduled_at(t0: u64, rate: f64, phase: f64, number: u64) -> u64 {
    t0 + ((number as f64 + phase) * 1e9 / rate) as u64
}

/// The agent capacity that fits `visitors` on `agents`, if one does.
pub fn capacity_for(visitors: u32, agents: u32, max_capacity: u32) -> Option<u32> {
    let capacity = visitors.div_ceil(agents);
    (capacity <= max_capacity).then_some(capacity)
}

fn read_secret(args: &ChatArgs) -> anyhow::Result<String> {
    jwt_secret(args.client.jwt_secret_file.as_deref(), args.client.data.as_deref())
}

/// The gateway's JWT secret, from `file` or else from the data directory
/// `data` (`DIR/jwt_secret`), to sign the run's tokens with.
pub(crate) fn jwt_secret(
    file: Option<&std::path::Path>,
    data: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let path = match (file, data) {
        (Some(file), _) => file.to_path_buf(),
        (None, Some(dir)) => dir.join("jwt_secret"),
        (None, None) => {
            bail!("agents need tokens: pass --data DIR (the gateway's) or --jwt-secret-file FILE")
        }
    };
    let secret = fs::read_to_string(&path).with_context(|| {
        format!("reading the JWT secret from {} (is the gateway started?)", path.display())
    })?;
    let secret = secret.trim();
    if secret.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(secret.to_owned())
}

/// Tokens for `count` users of `role`, signed with the gateway's secret,
/// ids `bench-RUN-{a|v}N`. A fresh RUN per call: agents of an earlier run
/// (with their conversations still assigned) must not take this run's
/// capacity, nor visitors find an earlier run's open conversation.
pub fn sign_tokens(secret: &str, role: Role, count: u32, group: Option<&str>) -> anyhow::Result<Vec<String>> {
    let key = JwtKey::new(secret.as_bytes(), AuthPolicy::default()).map_err(|e| anyhow!("JWT key: {e}"))?;
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).context("clock before 1970")?.as_secs();
    let run: u32 = rand::random();
    let (letter, name) = if role == Role::Agent { ("a", "Bench agent") } else { ("v", "Bench visitor") };
    Ok((0..count)
        .map(|i| {
            key.sign(&Claims {
                sub: format!("bench-{run:08x}-{letter}{i}"),
                role,
                name: Some(format!("{name} {i}")),
                groups: group.map(|g| vec![g.to_owned()]).unwrap_or_default(),
                meta: BTreeMap::new(),
                exp: now_s + 24 * 3600,
                nbf: None,
            })
        })
        .collect())
}

/// Times `count` fdatasyncs of a small append in `dir`.
fn fsync_probe(dir: &std::path::Path, count: u32, size: usize) -> anyhow::Result<LatencySummary> {
    let path = dir.join(format!(".kefu-bench-fsync-probe-{}", std::process::id()));
    let result = (|| -> anyhow::Result<LatencySummary> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let block = vec![b'x'; size.max(1)];
        let mut latency = Latency::new();
        for _ in 0..count {
            file.write_all(&block)?;
            let start = mono_ns();
            file.sync_data().context("fdatasync")?;
            latency.record(Duration::from_nanos(mono_ns() - start), 1);
        }
        Ok(latency.summary())
    })();
    let _ = fs::remove_file(&path);
    result
}

/// A load that runs beside the chat's honest one (junk frames, clients that
/// stop reading): `kefu-bench junk` and `slow` measure the chat with and
/// without one, so that what the chat measures stays in one place.
pub trait Beside {
    /// Starts the load once every honest client is set up, just before the
    /// first scheduled send. Must not block: the schedule is already
    /// running.
    fn start(&mut self, load: &LoadStart<'_>) -> anyhow::Result<()>;

    /// Stops it, after the chat's drain, and waits until it has stopped.
    fn stop(&mut self) -> anyhow::Result<()>;
}

/// What a [`Beside`] load may need of the chat's: its credentials and its
/// schedule (CLOCK_MONOTONIC ns, [`mono_ns`]).
pub struct LoadStart<'a> {
    /// The gateway's JWT secret, to sign the beside load's own tokens.
    pub secret: &'a str,
    /// The honest agents' tokens, by agent index.
    pub agent_tokens: &'a [String],
    /// The first scheduled send (the warmup starts here) ...
    pub t0: u64,
    /// ... and where sending stops.
    pub send_end: u64,
}

/// No load beside the chat's.
pub struct Alone;

impl Beside for Alone {
    fn start(&mut self, _: &LoadStart<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

fn measure(args: &ChatArgs) -> anyhow::Result<ChatReport> {
    measure_beside(args, &mut Alone)
}

/// Runs the chat of `args` with `beside` running next to it from the first
/// scheduled send to the end of the drain.
pub fn measure_beside(args: &ChatArgs, beside: &mut dyn Beside) -> anyhow::Result<ChatReport> {
    if !(args.rate > 0.0 && args.duration > 0.0 && args.warmup >= 0.0 && args.grace >= 0.0) {
        bail!("--rate and --duration must be > 0, --warmup and --grace ≥ 0");
    }
    if args.client.setup_timeout.is_nan() || args.client.setup_timeout <= 0.0 {
        bail!("--setup-timeout must be > 0");
    }
    if !(0.0..=1.0).contains(&args.attachment_share) {
        bail!("--attachment-share must be from 0 to 1, not {}", args.attachment_share);
    }
    let url = WsUrl::parse(&args.client.url, args.client.allow_non_loopback)?;
    for source in &args.client.sources {
        if !args.client.allow_non_loopback && !source.is_loopback() {
            bail!("source {source} is not a loopback address");
        }
    }
    let capacity = capacity_for(args.visitors, args.agents, args.max_capacity).ok_or_else(|| {
        anyhow!(
            "{} visitors do not fit on {} agents of at most {} conversations each: use at least {} agents",
            args.visitors,
            args.agents,
            args.max_capacity,
            args.visitors.div_ceil(args.max_capacity)
        )
    })?;
    let secret = read_secret(args)?;
    let tokens = sign_tokens(&secret, Role::Agent, args.agents, args.group.as_deref())?;
    let visitor_tokens = if args.visitor_tokens {
        sign_tokens(&secret, Role::Visitor, args.visitors, args.group.as_deref())?
    } else {
        Vec::new()
    };
    let per_visitor = args.rate / f64::from(args.visitors);
    eprintln!(
        "chat: {} agents × capacity {capacity}, {} visitors, {:.0} msg/s ({per_visitor:.2} msg/s per visitor: \
         the gateway's limits.messages_per_s must allow it), {} B {:?}",
        args.agents, args.visitors, args.rate, args.size, args.client.subprotocol
    );
    if args.attachment_share > 0.0 {
        // Every visitor sends about rate / visitors × share attachments a
        // second: say what that asks of the gateway's per-connection budget.
        let per_min = per_visitor * args.attachment_share * 60.0 * f64::from(args.attachment_bytes);
        eprintln!(
            "chat: {:.0}% of sends carry a {} B attachment: {:.1} attachment/s in all, ~{:.0} KB a minute per \
             visitor (the gateway's limits.attachment_bytes_per_min must allow it)",
            args.attachment_share * 100.0,
            args.attachment_bytes,
            args.rate * args.attachment_share,
            per_min / 1000.0
        );
    }

    let fsync_probe_us = match (&args.client.data, args.fsync_probe) {
        (Some(dir), n) if n > 0 => match fsync_probe(dir, n, args.size as usize + 64) {
            Ok(summary) => Some(summary),
            Err(e) => {
                eprintln!("fsync probe in {} failed: {e:#}", dir.display());
                None
            }
        },
        _ => None,
    };

    let threads = usize::from(args.client.threads);
    let visitors_planned: Vec<usize> =
        (0..threads).map(|t| (0..args.visitors as usize).filter(|i| i % threads == t).count()).collect();
    let plan = Arc::new(Plan {
        url,
        codec: args.client.subprotocol.codec(),
        sources: args.client.sources.clone(),
        connect_timeout: Duration::from_millis(args.client.connect_timeout_ms),
        reply_timeout: Duration::from_millis(args.client.reply_timeout_ms),
        setup_concurrency: args.client.setup_concurrency as usize,
        group: args.group.clone(),
        capacity,
        tokens,
        visitor_tokens,
        // Printable ASCII, which is UTF-8 and looks like a chat message;
        // no keyword an auto-reply rule would answer.
        text: (0..args.size).map(|i| (b'a' + (i % 26) as u8) as char).collect(),
        // Random bytes: an image is already compressed, and nothing on the
        // way may get it cheaper than a real one.
        attachment: (args.attachment_share > 0.0).then(|| Attachment {
            mime: ATTACHMENT_MIME.to_owned(),
            data: (0..args.attachment_bytes).map(|_| rand::random::<u8>()).collect(),
        }),
        attachment_share: args.attachment_share,
        rate: args.rate,
        threads,
        visitors_total: args.visitors as usize,
        visitors_planned,
    });
    let global = Arc::new(Global::default());
    // The bar reads the counters the drain waits on, so it costs the send
    // and receive paths nothing; they count window messages only, so the
    // counts start with the measured window.
    let progress = Progress::start("chat", {
        let global = global.clone();
        move || Snapshot {
            connections: global.connected.load(Ordering::Relaxed),
            sent: Some(global.sent.load(Ordering::Relaxed)),
            received: Some(global.delivered.load(Ordering::Relaxed)),
            acked: Some(global.acked.load(Ordering::Relaxed)),
        }
    });
    progress.phase(Phase::Connecting, Goal::Connections(u64::from(args.agents) + u64::from(args.visitors)));

    let setup_start = mono_ns();
    let setup_deadline = setup_start + secs_ns(args.client.setup_timeout);
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let agents: Vec<usize> = (0..args.agents as usize).filter(|i| i % threads == thread).collect();
        let visitors: Vec<usize> = (0..args.visitors as usize).filter(|i| i % threads == thread).collect();
        let cpu = (!args.client.cpu.is_empty()).then(|| args.client.cpu[thread % args.client.cpu.len()]);
        let (plan, global) = (plan.clone(), global.clone());
        let (ring_entries, taskrun) = (args.client.ring_entries, args.client.taskrun);
        let handle = std::thread::Builder::new()
            .name(format!("chat-{thread}"))
            .spawn(move || -> anyhow::Result<Tally> {
                let mut runtime = build_runtime(cpu, ring_entries, taskrun)?;
                runtime.block_on(thread_main(plan, global, thread, agents, visitors))
            })
            .context("spawning a client thread")?;
        handles.push(handle);
    }

    // Waits for `done` to reach `threads`; false (after stopping everyone)
    // if the setup deadline passed or a thread died.
    let wait_phase = |done: &AtomicUsize, what: &str| -> bool {
        loop {
            if done.load(Ordering::Acquire) >= threads {
                return true;
            }
            if handles.iter().any(|h| h.is_finished()) || mono_ns() >= setup_deadline {
                progress.println(&format!(
                    "WARNING: {what} did not finish within --setup-timeout (or a client thread failed)"
                ));
                global.stop.store(true, Ordering::Release);
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut ok = wait_phase(&global.agents_done, "agent setup");
    let agents_online = global.agents_online.load(Ordering::Acquire);
    if ok && agents_online * u64::from(capacity) < u64::from(args.visitors) {
        progress.println(&format!(
            "WARNING: only {agents_online} of {} agents online: {} conversations cannot all be assigned",
            args.agents, args.visitors
        ));
    }
    if ok {
        global.visitors_go.store(true, Ordering::Release);
        ok = wait_phase(&global.visitors_done, "visitor setup");
    }
    let setup_s = (mono_ns() - setup_start) as f64 / 1e9;
    let visitors_ready = global.visitors_ready.load(Ordering::Acquire);
    if ok {
        progress.println(&format!(
            "chat: {agents_online} agents online, {visitors_ready}/{} visitors assigned in {setup_s:.1} s; load starts",
            args.visitors
        ));
    }

    let mut window = None;
    if ok {
        let t0 = mono_ns() + 20_000_000;
        let schedule = Schedule {
            t0,
            window_start: t0 + secs_ns(args.warmup),
            send_end: t0 + secs_ns(args.warmup) + secs_ns(args.duration),
            slice_ns: secs_ns(args.slice),
        };
        let _ = global.schedule.set(schedule);
        let started = beside.start(&LoadStart {
            secret: &secret,
            agent_tokens: &plan.tokens,
            t0,
            send_end: schedule.send_end,
        });
        if let Err(e) = started {
            global.stop.store(true, Ordering::Release);
            for handle in handles {
                let _ = handle.join();
            }
            return Err(e.context("starting the load beside the chat"));
        }
        progress.phase(Phase::WarmUp, Goal::Time(Duration::from_secs_f64(args.warmup)));
        sleep_until_ns(schedule.window_start);
        let start = sample(args.client.server_pid, args.helper_pid)?;
        progress.phase(Phase::Measuring, Goal::Time(Duration::from_secs_f64(args.duration)));
        sleep_until_ns(schedule.send_end);
        let end = sample(args.client.server_pid, args.helper_pid)?;
        let rss = args.client.server_pid.and_then(|pid| stats::process_rss_bytes(pid).ok());
        window = Some((start, end, rss));
        // Drain: until every window message is delivered and acked, or the
        // grace runs out.
        progress.phase(Phase::Draining, Goal::Time(Duration::from_secs_f64(args.grace)));
        let give_up = schedule.send_end + secs_ns(args.grace);
        loop {
            let sent = global.sent.load(Ordering::Acquire);
            let complete = global.sending_done.load(Ordering::Acquire) >= threads
                && global.delivered.load(Ordering::Acquire) >= sent
                && global.acked.load(Ordering::Acquire) >= sent;
            if complete || mono_ns() >= give_up || handles.iter().all(|h| h.is_finished()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        global.stop.store(true, Ordering::Release);
        beside.stop().context("stopping the load beside the chat")?;
    }

    drop(progress);
    let mut total = Tally::default();
    for handle in handles {
        match handle.join() {
            Ok(Ok(tally)) => total.merge(tally),
            Ok(Err(e)) => return Err(e.context("client thread")),
            Err(_) => bail!("a client thread panicked"),
        }
    }
    if !ok {
        let mut kinds = String::new();
        for (kind, n) in total.connection_errors.iter().chain(&total.error_codes) {
            kinds.push_str(&format!("\n  ×{n}: {kind}"));
        }
        bail!(
            "setup incomplete after {setup_s:.1} s: {agents_online}/{} agents online, {visitors_ready}/{} visitors assigned{kinds}",
            args.agents,
            args.visitors
        );
    }
    let Some((start, end, server_rss_bytes)) = window else {
        bail!("no measurement window");
    };

    let window_s = args.duration;
    let client_cpu_s = end.client_cpu - start.client_cpu;
    let server_cpu_s = match (start.server_cpu, end.server_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let helper_cpu_s = match (start.helper_cpu, end.helper_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let all_cpus: Vec<usize> = (0..start.ticks.len()).collect();
    let steal_by_cpu = stats::steal_shares(&start.ticks, &end.ticks);
    let client_cores_busy = (!args.client.cpu.is_empty())
        .then(|| stats::cpus_busy(&start.ticks, &end.ticks, &args.client.cpu))
        .flatten();
    let server_cores_busy = args
        .client
        .server_pid
        .and_then(|pid| stats::process_cpus(pid).ok())
        .filter(|cpus| cpus.len() < all_cpus.len() && !cpus.iter().any(|c| args.client.cpu.contains(c)))
        .and_then(|cpus| stats::cpus_busy(&start.ticks, &end.ticks, &cpus));
    let server_threads_cores = match (&start.server_threads, &end.server_threads) {
        (Some(a), Some(b)) => Some(stats::threads_cores(a, b, window_s)),
        _ => None,
    };
    let per_msg = |cpu_s: f64| (total.sent_in_window > 0).then(|| cpu_s * 1e6 / total.sent_in_window as f64);
    let rate_limited = total.error_codes.get(ErrorCode::RateLimited.as_str()).copied().unwrap_or(0);
    let mix = args.attachment_share > 0.0;
    let mut curves = vec![
        Series::of("delivery", &total.delivery),
        Series::of("ack", &total.ack),
        Series::of("send lag (client)", &total.send_lag),
    ];
    if mix {
        let [text, attachment] = &total.by_kind;
        curves.extend([
            Series::of("delivery, with attachment", &attachment.delivery),
            Series::of("delivery, text only", &text.delivery),
            Series::of("ack, with attachment", &attachment.ack),
            Series::of("ack, text only", &text.ack),
        ]);
    }
    Ok(ChatReport {
        url: args.client.url.clone(),
        subprotocol: args.client.subprotocol,
        visitors: args.visitors,
        visitors_ready,
        agents: args.agents,
        agents_online,
        capacity,
        size: args.size,
        threads: args.client.threads,
        setup_s,
        warmup_s: args.warmup,
        window_s,
        grace_s: args.grace,
        target_rate: args.rate,
        sent: total.sent,
        send_rate: total.sent_in_window as f64 / window_s,
        delivered_per_s: total.delivered_in_window as f64 / window_s,
        delivered: total.delivered,
        acked: total.acked,
        undelivered: total.sent.saturating_sub(total.delivered),
        unacked: total.sent.saturating_sub(total.acked),
        duplicates: total.duplicates,
        delivery_latency_us: total.delivery.summary(),
        ack_latency_us: total.ack.summary(),
        delivery_by_slice: slices(&total.by_slice, args.slice, window_s),
        delivery_split_at_home_us: SplitReport {
            to_home: total.to_home.summary(),
            from_home: total.from_home.summary(),
        },
        send_lag_us: total.send_lag.summary(),
        ack_bursts_per_s: total.ack_bursts as f64 / window_s,
        acks_per_burst: (total.ack_bursts > 0).then(|| total.acks_in_window as f64 / total.ack_bursts as f64),
        error_codes: total.error_codes,
        error_messages: total.error_messages,
        rate_limited,
        connection_errors: total.connection_errors,
        client_cpu_s,
        client_cpu_cores: client_cpu_s / window_s,
        client_cpu_us_per_msg: per_msg(client_cpu_s),
        client_cores_busy,
        server_pid: args.client.server_pid,
        server_cpu_s,
        server_cpu_cores: server_cpu_s.map(|s| s / window_s),
        server_cpu_us_per_msg: server_cpu_s.and_then(per_msg),
        server_cores_busy,
        server_rss_bytes,
        server_threads_cores,
        helper_cpu_cores: helper_cpu_s.map(|s| s / window_s),
        other_cpu_cores: stats::other_cores(
            &start.ticks,
            &end.ticks,
            (client_cpu_s + server_cpu_s.unwrap_or(0.0) + helper_cpu_s.unwrap_or(0.0)) / window_s,
        ),
        steal_by_cpu,
        fsync_probe_us,
        attachment_share: args.attachment_share,
        attachment_bytes: mix.then_some(args.attachment_bytes),
        with_attachment: mix.then(|| total.by_kind[Kind::Attachment.index()].report()),
        text_only: mix.then(|| total.by_kind[Kind::Text.index()].report()),
        curves,
    })
}

/// The per-slice reports of a window `window_s` long cut in `slice_s`
/// pieces (the last one may be shorter): every slice of the window, also
/// one nothing was sent or delivered in, so that the last one listed is
/// the window's last.
fn slices(by_slice: &[SliceTally], slice_s: f64, window_s: f64) -> Vec<SliceReport> {
    if slice_s <= 0.0 {
        return Vec::new();
    }
    let count = ((window_s / slice_s).ceil() as usize).max(by_slice.len());
    let empty = SliceTally::default();
    (0..count)
        .map(|i| {
            let tally = by_slice.get(i).unwrap_or(&empty);
            SliceReport {
                start_s: i as f64 * slice_s,
                end_s: ((i + 1) as f64 * slice_s).min(window_s),
                sent: tally.sent,
                delivered: tally.delivery.count(),
                delivery_latency_us: tally.delivery.summary(),
            }
        })
        .collect()
}

/// CPU counters at one instant.
pub(crate) struct Sample {
    pub(crate) client_cpu: f64,
    pub(crate) server_cpu: Option<f64>,
    helper_cpu: Option<f64>,
    server_threads: Option<BTreeMap<u32, (String, stats::CpuSplit)>>,
    pub(crate) ticks: Vec<stats::CpuTicks>,
}

pub(crate) fn sample(server_pid: Option<u32>, helper_pid: Option<u32>) -> anyhow::Result<Sample> {
    Ok(Sample {
        client_cpu: stats::self_cpu_seconds()?,
        server_cpu: server_pid.map(stats::process_cpu_seconds).transpose()?,
        helper_cpu: helper_pid.map(stats::process_cpu_seconds).transpose()?,
        server_threads: server_pid.and_then(|pid| stats::process_threads_cpu(pid).ok()),
        ticks: stats::cpu_ticks()?,
    })
}

pub(crate) fn sleep_until_ns(deadline: u64) {
    let now = mono_ns();
    if deadline > now {
        std::thread::sleep(Duration::from_nanos(deadline - now));
    }
}

/// Sleeps on the runtime's (millisecond) timer until `ready()`.
pub(crate) async fn wait_until(mut ready: impl FnMut() -> bool) {
    while !ready() {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A deadline timer with nanosecond resolution: a timerfd armed with an
/// absolute CLOCK_MONOTONIC time and read through io_uring, so waiting for
/// it is one more completion in the same ring as the sockets.
pub struct PreciseTimer {
    file: monoio::fs::File,
    fd: RawFd,
}

impl PreciseTimer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with constant, valid arguments.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else; the
        // File takes ownership and closes it.
        let std_file = unsafe { fs::File::from_raw_fd(fd) };
        Ok(Self { file: monoio::fs::File::from_std(std_file)?, fd })
    }

    /// Returns at `deadline` (monotonic ns) or right after; at once if it
    /// has passed.
    pub async fn sleep_until(&self, deadline: u64) -> io::Result<()> {
        if mono_ns() >= deadline {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (deadline / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `self.fd` is the live timerfd this struct owns; `spec` is
        // a valid itimerspec; a null old-value pointer is allowed.
        let rc = unsafe {
            libc::timerfd_settime(self.fd, libc::TFD_TIMER_ABSTIME, &raw const spec, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // The read completes once the timer has expired (8 bytes: the count
        // of expirations). A timerfd has no file position; 0 is ignored.
        let (result, _) = self.file.read_at(vec![0u8; 8], 0).await;
        result.map(|_| ())
    }
}

/// The sending side of one connection: frames are appended to `pending`
/// and one flush task at a time writes them, so the scheduler never waits
/// for a socket and frames from several tasks (a message, a pong) never
/// interleave.
pub(crate) struct Out {
    half: RefCell<Option<OwnedWriteHalf<TcpStream>>>,
    pending: RefCell<Vec<u8>>,
    failed: RefCell<Option<String>>,
    mask: [u8; 4],
}

impl Out {
    fn new(half: OwnedWriteHalf<TcpStream>) -> Rc<Self> {
        Rc::new(Self {
            half: RefCell::new(Some(half)),
            pending: RefCell::new(Vec::new()),
            failed: RefCell::new(None),
            mask: rand::random(),
        })
    }

    /// Queues one frame; starts a flush unless one is running.
    pub(crate) fn send(self: &Rc<Self>, opcode: u8, payload: &[u8]) {
        if self.failed.borrow().is_some() {
            return;
        }
        ws::encode_frame(&mut self.pending.borrow_mut(), true, opcode, payload, self.mask);
        let half = self.half.borrow_mut().take();
        if let Some(half) = half {
            monoio::spawn(flush(self.clone(), half));
        }
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }
}

async fn flush(out: Rc<Out>, mut half: OwnedWriteHalf<TcpStream>) {
    let mut spare = Vec::new();
    loop {
        {
            let mut pending = out.pending.borrow_mut();
            if pending.is_empty() {
                break;
            }
            std::mem::swap(&mut *pending, &mut spare);
        }
        let (result, mut buf) = half.write_all(spare).await;
        buf.clear();
        spare = buf;
        if let Err(e) = result {
            *out.failed.borrow_mut() = Some(format!("write: {}", ws::errno_name(&e)));
            out.pending.borrow_mut().clear();
            return;
        }
    }
    // No await between the emptiness check and this: a frame queued by
    // anyone else finds the half back and starts the next flush.
    *out.half.borrow_mut() = Some(half);
}

/// The receiving side of one connection, decoding whole messages.
pub(crate) struct Conn {
    read: OwnedReadHalf<TcpStream>,
    pub(crate) out: Rc<Out>,
    codec: Codec,
    reader: FrameReader,
    buf: Vec<u8>,
    leftover: Vec<u8>,
    /// The data message being reassembled.
    message: Vec<u8>,
    control: Vec<u8>,
    opcode: u8,
    /// Decoded frames not handed out yet, with their read's timestamp.
    queue: VecDeque<(u64, ServerFrame)>,
    /// The server's close, reported once the frames before it are out.
    closed: Option<String>,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, leftover: Vec<u8>, codec: Codec) -> Self {
        let (read, write) = stream.into_split();
        Self {
            read,
            out: Out::new(write),
            codec,
            reader: FrameReader::new(),
            buf: Vec::with_capacity(16 * 1024),
            leftover,
            message: Vec::new(),
            control: Vec::new(),
            opcode: 0,
            queue: VecDeque::new(),
            closed: None,
        }
    }

    /// Sends one command.
    pub(crate) fn command(&self, frame: &ClientFrame, encoder: &RefCell<Encoder>) {
        let mut encoder = encoder.borrow_mut();
        let bytes = self.codec.encode_client(frame, &mut encoder);
        let opcode = if self.codec.is_binary() { ws::OP_BINARY } else { ws::OP_TEXT };
        self.out.send(opcode, bytes);
    }

    /// The next frame from the server and when its read completed
    /// (monotonic ns). Pings are answered here.
    pub(crate) async fn next(&mut self) -> Result<(u64, ServerFrame), String> {
        loop {
            if let Some(next) = self.queue.pop_front() {
                return Ok(next);
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<(), String> {
        if let Some(closed) = &self.closed {
            return Err(closed.clone());
        }
        let (n, now) = if self.leftover.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let (result, buf) = self.read.read(buf).await;
            self.buf = buf;
            let now = mono_ns();
            match result {
                Ok(0) => return Err("server closed the TCP connection".into()),
                Ok(n) => (n, now),
                Err(e) => return Err(format!("read: {}", ws::errno_name(&e))),
            }
        } else {
            self.buf.clear();
            self.buf.extend_from_slice(&self.leftover);
            self.leftover.clear();
            (self.buf.len(), mono_ns())
        };
        let Self { reader, buf, message, control, opcode, queue, codec, .. } = self;
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        let mut closed: Option<String> = None;
        let mut failed: Option<String> = None;
        let parsed = reader.feed(&buf[..n], |event| match event {
            WsEvent::Start(header) => {
                *opcode = header.opcode;
                if header.opcode >= ws::OP_CLOSE {
                    control.clear();
                } else if header.opcode != ws::OP_CONTINUATION {
                    message.clear();
                }
            }
            WsEvent::Payload(bytes) => {
                if *opcode >= ws::OP_CLOSE {
                    control.extend_from_slice(bytes);
                } else if message.len() + bytes.len() <= MESSAGE_BYTES_MAX {
                    message.extend_from_slice(bytes);
                } else {
                    failed.get_or_insert_with(|| format!("server message over {MESSAGE_BYTES_MAX} bytes"));
                }
            }
            WsEvent::End(header) => match header.opcode {
                ws::OP_PING => pongs.push(control.clone()),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = (control.len() >= 2).then(|| u16::from_be_bytes([control[0], control[1]]));
                    closed = Some(match code {
                        Some(code) => format!("server closed: {code}"),
                        None => "server closed".into(),
                    });
                }
                _ if header.fin => match codec.decode_server(message) {
                    Ok(frame) => queue.push_back((now, frame)),
                    Err(e) => {
                        failed.get_or_insert_with(|| format!("undecodable server frame: {}", e.code));
                    }
                },
                _ => {}
            },
        });
        for payload in pongs {
            self.out.send(ws::OP_PONG, &payload);
        }
        if let Err(e) = parsed {
            return Err(format!("protocol: {e}"));
        }
        if let Some(failed) = failed {
            return Err(failed);
        }
        // Frames before a close are still handed out; the next read
        // reports it.
        self.closed = closed;
        Ok(())
    }

    /// Reads until `pick` accepts a frame (Some(Ok)), refuses one
    /// (Some(Err)), or `limit` passes.
    pub(crate) async fn expect<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut pick: impl FnMut(ServerFrame) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        let deadline = monoio::time::Instant::now() + limit;
        loop {
            let (_, frame) = match monoio::time::timeout_at(deadline, self.next()).await {
                Ok(next) => next?,
                Err(_) => return Err(format!("timeout: no {what} within {} ms", limit.as_millis())),
            };
            if let Some(result) = pick(frame) {
                return result;
            }
        }
    }

    /// Reads until the reply to command `id`, which `want` must accept;
    /// an `error` reply is handed to `on_error` and fails it.
    pub(crate) async fn reply<T>(
        &mut self,
        limit: Duration,
        id: i64,
        what: &str,
        mut on_error: impl FnMut(ErrorCode),
        want: impl FnOnce(Event) -> Option<T>,
    ) -> Result<T, String> {
        let mut want = Some(want);
        self.expect(limit, what, |frame| {
            if frame.id != Some(id) {
                return None;
            }
            Some(match frame.body {
                Event::Error { code, .. } => {
                    on_error(code);
                    Err(format!("{what}: {code}"))
                }
                body => want.take().and_then(|w| w(body)).ok_or_else(|| format!("{what}: unexpected reply")),
            })
        })
        .await
    }

    /// Opens a connection to `dial.url` (from `source`) and sends `connect`
    /// with `token` and `resume`; returns it once `connected` is read, with
    /// the user's id.
    pub(crate) async fn session(
        dial: &Dial,
        source: Option<IpAddr>,
        token: &str,
        resume: BTreeMap<ConvId, u64>,
        encoder: &RefCell<Encoder>,
        on_error: impl FnMut(ErrorCode),
    ) -> Result<(Conn, String), String> {
        let (stream, leftover) =
            ws::open(&dial.url, source, Some(dial.codec.subprotocol()), dial.connect_timeout).await?;
        let mut conn = Conn::new(stream, leftover, dial.codec);
        let connect =
            Command::Connect { token: Some(token.to_owned()), visitor_id: None, visitor_key: None, resume };
        conn.command(&ClientFrame { id: Some(1), body: connect }, encoder);
        let user = conn
            .reply(dial.reply_timeout, 1, "connected", on_error, |body| match body {
                Event::Connected { user, .. } => Some(user.id),
                _ => None,
            })
            .await?;
        Ok((conn, user))
    }
}

/// Where and how a scenario's clients connect.
pub(crate) struct Dial {
    pub(crate) url: WsUrl,
    pub(crate) codec: Codec,
    pub(crate) connect_timeout: Duration,
    pub(crate) reply_timeout: Duration,
}

/// A visitor ready to send: its conversation and its connection's writer.
struct Visitor {
    conv: ConvId,
    out: Rc<Out>,
}

/// One client thread's state, shared by its tasks.
struct ThreadState {
    plan: Arc<Plan>,
    global: Arc<Global>,
    thread: usize,
    encoder: RefCell<Encoder>,
    schedule: OnceCell<Schedule>,
    tally: RefCell<Tally>,
    /// When the last window ack was read (for [`ACK_BURST_GAP_NS`]).
    last_ack: Cell<u64>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, ns: puts the home's wall-clock
    /// `ts` on this client's clock.
    wall_lead_ns: u64,
}

impl ThreadState {
    fn stopping(&self) -> bool {
        self.global.stop.load(Ordering::Acquire)
    }

    fn connection_error(&self, kind: String) {
        let kind = ws::without_retry_after(&kind).to_owned();
        *self.tally.borrow_mut().connection_errors.entry(kind).or_default() += 1;
    }

    fn error_frame(&self, code: ErrorCode, message: &str) {
        let mut tally = self.tally.borrow_mut();
        *tally.error_codes.entry(code.as_str().to_owned()).or_default() += 1;
        tally.error_messages.entry(code.as_str().to_owned()).or_insert_with(|| message.to_owned());
    }

    fn source(&self, index: usize) -> Option<IpAddr> {
        let sources = &self.plan.sources;
        (!sources.is_empty()).then(|| sources[index % sources.len()])
    }

    async fn open(&self, index: usize) -> Result<Conn, String> {
        let plan = &self.plan;
        let (stream, leftover) =
            ws::open(&plan.url, self.source(index), Some(plan.codec.subprotocol()), plan.connect_timeout)
                .await?;
        Ok(Conn::new(stream, leftover, plan.codec))
    }

    /// `frame` as the reply `id` to a setup command: Some(Ok) if `want`
    /// accepts it, Some(Err) if it is an error.
    fn reply<T>(
        &self,
        frame: ServerFrame,
        id: i64,
        what: &str,
        want: impl FnOnce(Event) -> Option<T>,
    ) -> Option<Result<T, String>> {
        if frame.id != Some(id) {
            return None;
        }
        match frame.body {
            // A refused connect is the gateway's per-address limit on new
            // anonymous visitors, not the per-connection command limit the
            // run's `rate_limited` count is about: it is left out of that
            // count, and the caller tallies it as a connection error that
            // names the limit.
            Event::Error { code: ErrorCode::RateLimited, .. } if what == "connect" => {
                Some(Err("connect: rate_limited (raise the gateway's limits.anonymous_per_min_per_ip for a \
                          benchmark from few addresses, e.g. KEFU_LIMITS_ANONYMOUS_PER_MIN_PER_IP=1000000)"
                    .to_string()))
            }
            Event::Error { code, message } => {
                self.error_frame(code, &message);
                Some(Err(format!("{what}: {code}")))
            }
            body => Some(want(body).ok_or_else(|| format!("{what}: unexpected reply"))),
        }
    }
}

async fn thread_main(
    plan: Arc<Plan>,
    global: Arc<Global>,
    thread: usize,
    agents: Vec<usize>,
    visitors: Vec<usize>,
) -> anyhow::Result<Tally> {
    let state = Rc::new(ThreadState {
        plan,
        global: global.clone(),
        thread,
        encoder: RefCell::new(Encoder::new()),
        schedule: OnceCell::new(),
        tally: RefCell::new(Tally::default()),
        last_ack: Cell::new(0),
        wall_lead_ns: wall_ns().saturating_sub(mono_ns()),
    });

    // Agents, all at once (they are few).
    let mut setups = Vec::with_capacity(agents.len());
    for index in agents {
        let state = state.clone();
        setups.push(monoio::spawn(async move { setup_agent(&state, index).await }));
    }
    for setup in setups {
        match setup.await {
            Ok(conn) => {
                global.agents_online.fetch_add(1, Ordering::AcqRel);
                global.connected.fetch_add(1, Ordering::Relaxed);
                monoio::spawn(agent_loop(conn, state.clone()));
            }
            Err(kind) => state.connection_error(format!("agent {kind}")),
        }
    }
    global.agents_done.fetch_add(1, Ordering::AcqRel);
    wait_until(|| global.visitors_go.load(Ordering::Acquire) || global.stop.load(Ordering::Acquire)).await;

    // Visitors, --setup-concurrency at a time.
    let ready: Rc<RefCell<Vec<Visitor>>> = Rc::new(RefCell::new(Vec::with_capacity(visitors.len())));
    if !state.stopping() {
        let visitors = Rc::new(visitors);
        let next = Rc::new(Cell::new(0usize));
        let workers = state.plan.setup_concurrency.min(visitors.len());
        let mut running = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (state, visitors, next, ready) =
                (state.clone(), visitors.clone(), next.clone(), ready.clone());
            running.push(monoio::spawn(async move {
                loop {
                    let i = next.get();
                    if i >= visitors.len() || state.stopping() {
                        break;
                    }
                    next.set(i + 1);
                    match setup_visitor(&state, visitors[i]).await {
                        Ok((conn, conv)) => {
                            ready.borrow_mut().push(Visitor { conv, out: conn.out.clone() });
                            state.global.connected.fetch_add(1, Ordering::Relaxed);
                            monoio::spawn(visitor_loop(conn, state.clone()));
                        }
                        Err(kind) => state.connection_error(format!("visitor {kind}")),
                    }
                }
            }));
        }
        for worker in running {
            worker.await;
        }
    }
    let ready = ready.take();
    global.visitors_ready.fetch_add(ready.len() as u64, Ordering::AcqRel);
    global.visitors_done.fetch_add(1, Ordering::AcqRel);

    wait_until(|| global.schedule.get().is_some() || global.stop.load(Ordering::Acquire)).await;
    let result = match global.schedule.get() {
        Some(schedule) if !state.stopping() => {
            let _ = state.schedule.set(*schedule);
            send_loop(&state, &ready, *schedule).await
        }
        _ => Ok(()),
    };
    global.sending_done.fetch_add(1, Ordering::AcqRel);
    result?;
    wait_until(|| global.stop.load(Ordering::Acquire)).await;

    Ok(state.tally.take())
}

async fn setup_agent(state: &ThreadState, index: usize) -> Result<Conn, String> {
    let plan = &state.plan;
    let mut conn = state.open(index).await?;
    let connect = Command::Connect {
        token: Some(plan.tokens[index].clone()),
        visitor_id: None,
        visitor_key: None,
        resume: BTreeMap::new(),
    };
    conn.command(&ClientFrame { id: Some(1), body: connect }, &state.encoder);
    conn.expect(plan.reply_timeout, "connected", |frame| {
        state.reply(frame, 1, "connect", |body| matches!(body, Event::Connected { .. }).then_some(()))
    })
    .await?;
    let presence = Command::Presence { status: PresenceStatus::Online, capacity: Some(plan.capacity) };
    conn.command(&ClientFrame { id: Some(2), body: presence }, &state.encoder);
    conn.expect(plan.reply_timeout, "presence reply", |frame| {
        state.reply(frame, 2, "presence", |body| matches!(body, Event::Presence { .. }).then_some(()))
    })
    .await?;
    Ok(conn)
}

async fn setup_visitor(state: &ThreadState, index: usize) -> Result<(Conn, ConvId), String> {
    let plan = &state.plan;
    let mut conn = state.open(index).await?;
    let connect = Command::Connect {
        token: plan.visitor_tokens.get(index).cloned(),
        visitor_id: None,
        visitor_key: None,
        resume: BTreeMap::new(),
    };
    conn.command(&ClientFrame { id: Some(1), body: connect }, &state.encoder);
    conn.expect(plan.reply_timeout, "connected", |frame| {
        state.reply(frame, 1, "connect", |body| matches!(body, Event::Connected { .. }).then_some(()))
    })
    .await?;
    let open = Command::Open { group: plan.group.clone(), meta: BTreeMap::new() };
    conn.command(&ClientFrame { id: Some(2), body: open }, &state.encoder);
    let (conv, status) = conn
        .expect(plan.reply_timeout, "conversation", |frame| {
            state.reply(frame, 2, "open", |body| match body {
                Event::Conversation { conv, status, .. } => Some((conv, status)),
                _ => None,
            })
        })
        .await?;
    match status {
        ConvStatus::Assigned => {}
        ConvStatus::Queued => {
            conn.expect(plan.reply_timeout, "assignment", |frame| match frame.body {
                Event::Conversation { conv: c, status: ConvStatus::Assigned, .. } if c == conv => {
                    Some(Ok(()))
                }
                Event::Conversation { conv: c, status: ConvStatus::Closed, .. } if c == conv => {
                    Some(Err("open: closed while queued".into()))
                }
                _ => None,
            })
            .await?;
        }
        ConvStatus::Closed => return Err("open: conversation closed".into()),
    }
    Ok((conn, conv))
}

/// Receives an agent's frames for the rest of the run: `msg`s are timed.
async fn agent_loop(mut conn: Conn, state: Rc<ThreadState>) {
    let mut last_seq: HashMap<ConvId, u64> = HashMap::new();
    loop {
        let (now, frame) = match conn.next().await {
            Ok(next) => next,
            Err(e) => {
                if !state.stopping() {
                    state.connection_error(format!("agent: {e}"));
                }
                return;
            }
        };
        match frame.body {
            Event::Msg(msg) if msg.from.role == Role::Visitor => {
                let last = last_seq.entry(msg.conv).or_insert(0);
                if msg.seq <= *last {
                    state.tally.borrow_mut().duplicates += 1;
                    continue;
                }
                *last = msg.seq;
                let (Some(scheduled), Some(schedule)) = (cid_scheduled(&msg.cid), state.schedule.get())
                else {
                    continue;
                };
                let mut tally = state.tally.borrow_mut();
                if schedule.in_window(now) {
                    tally.delivered_in_window += 1;
                }
                if schedule.measured(scheduled) {
                    let latency = Duration::from_nanos(now.saturating_sub(scheduled));
                    tally.delivered += 1;
                    tally.delivery.record(latency, 1);
                    // The home's stamp on this clock: the middle of its
                    // wall-clock millisecond, less the wall clock's lead.
                    let home = msg.ts.saturating_mul(1_000_000).saturating_add(500_000);
                    // Kept within [scheduled, now], without `clamp`'s panic
                    // should a receipt ever read earlier than its schedule.
                    let home = home.saturating_sub(state.wall_lead_ns).min(now).max(scheduled);
                    tally.to_home.record(Duration::from_nanos(home - scheduled), 1);
                    tally.from_home.record(Duration::from_nanos(now.saturating_sub(home)), 1);
                    tally.by_kind[cid_kind(&msg.cid).index()].delivery.record(latency, 1);
                    if let Some(slice) = tally.slice(schedule, scheduled) {
                        slice.delivery.record(latency, 1);
                    }
                    state.global.delivered.fetch_add(1, Ordering::AcqRel);
                }
            }
            Event::Error { code, message } => state.error_frame(code, &message),
            _ => {}
        }
    }
}

/// Receives a visitor's frames for the rest of the run: `ack`s are timed.
async fn visitor_loop(mut conn: Conn, state: Rc<ThreadState>) {
    loop {
        let (now, frame) = match conn.next().await {
            Ok(next) => next,
            Err(e) => {
                if !state.stopping() {
                    state.connection_error(format!("visitor: {e}"));
                }
                return;
            }
        };
        match frame.body {
            Event::Ack { cid, duplicate, .. } => {
                let mut tally = state.tally.borrow_mut();
                if duplicate {
                    tally.duplicates += 1;
                    continue;
                }
                let (Some(scheduled), Some(schedule)) = (cid_scheduled(&cid), state.schedule.get()) else {
                    continue;
                };
                if schedule.in_window(now) {
                    tally.acks_in_window += 1;
                    if now.saturating_sub(state.last_ack.get()) > ACK_BURST_GAP_NS {
                        tally.ack_bursts += 1;
                    }
                    state.last_ack.set(now);
                }
                if schedule.measured(scheduled) {
                    let latency = Duration::from_nanos(now.saturating_sub(scheduled));
                    tally.acked += 1;
                    tally.ack.record(latency, 1);
                    tally.by_kind[cid_kind(&cid).index()].ack.record(latency, 1);
                    state.global.acked.fetch_add(1, Ordering::AcqRel);
                }
            }
            Event::Error { code, message } => state.error_frame(code, &message),
            Event::Conversation { status: ConvStatus::Closed, .. } => {
                state.connection_error("visitor: conversation closed by the server".into());
            }
            _ => {}
        }
    }
}

/// The open loop: this thread's messages leave at their scheduled times,
/// whatever became of the earlier ones.
async fn send_loop(state: &ThreadState, visitors: &[Visitor], schedule: Schedule) -> anyhow::Result<()> {
    if visitors.is_empty() {
        return Ok(());
    }
    let plan = &state.plan;
    // This thread's share of the rate is fixed by the visitors it was
    // *given*, so that a visitor that failed to set up does not lower the
    // aggregate rate (the others send a little more each).
    let rate = plan.rate * plan.visitors_planned[state.thread] as f64 / plan.visitors_total as f64;
    let phase = state.thread as f64 / plan.threads as f64;
    let opcode = if plan.codec.is_binary() { ws::OP_BINARY } else { ws::OP_TEXT };
    let timer = PreciseTimer::new().context("creating a timerfd")?;
    let mut number = 0u64;
    loop {
        let due = scheduled_at(schedule.t0, rate, phase, number);
        if due >= schedule.send_end || state.stopping() {
            return Ok(());
        }
        timer.sleep_until(due).await.context("waiting on the timerfd")?;
        let now = mono_ns();
        // Everything due by now leaves now (more than one only if the
        // client fell behind); lateness is recorded, not hidden.
        loop {
            let due = scheduled_at(schedule.t0, rate, phase, number);
            if due > now || due >= schedule.send_end {
                break;
            }
            let visitor = &visitors[(number % visitors.len() as u64) as usize];
            let attachment =
                plan.attachment.as_ref().filter(|_| rand::random::<f64>() < plan.attachment_share);
            let kind = if attachment.is_some() { Kind::Attachment } else { Kind::Text };
            let send = Command::Send {
                conv: visitor.conv,
                cid: make_kind_cid(kind, state.thread, number, due),
                text: Some(plan.text.clone()),
                attachment: attachment.cloned(),
            };
            {
                let mut encoder = state.encoder.borrow_mut();
                let bytes = plan.codec.encode_client(&ClientFrame { id: None, body: send }, &mut encoder);
                visitor.out.send(opcode, bytes);
            }
            let mut tally = state.tally.borrow_mut();
            if schedule.in_window(now) {
                tally.sent_in_window += 1;
            }
            if schedule.measured(due) {
                tally.sent += 1;
                tally.by_kind[kind.index()].sent += 1;
                if let Some(slice) = tally.slice(&schedule, due) {
                    slice.sent += 1;
                }
                tally.send_lag.record(Duration::from_nanos(now - due), 1);
                state.global.sent.fetch_add(1, Ordering::AcqRel);
            }
            if let Some(failure) = visitor.out.failure() {
                // Counted as sent (it was due) and so as undelivered; the
                // failure is counted once per message it swallowed.
                *tally.connection_errors.entry(format!("visitor {failure}")).or_default() += 1;
            }
            number += 1;
        }
    }
}

/// The run's results as a table.
pub fn table(report: &ChatReport) -> Table {
    let mut table = Table::new(format!(
        "chat: {}/{} visitors, {}/{} agents, {} B {:?}{}, {} s window",
        report.visitors_ready,
        report.visitors,
        report.agents_online,
        report.agents,
        report.size,
        report.subprotocol,
        match report.attachment_bytes {
            Some(bytes) => format!(", {:.0}% with a {bytes} B attachment", report.attachment_share * 100.0),
            None => String::new(),
        },
        report.window_s
    ));
    add_sections(&mut table, report, "");
    table
}

/// A run's sections of a [`Table`], their titles prefixed with `run` (the
/// abuse scenarios put a clean and an abused run in one table).
pub fn add_sections(table: &mut Table, report: &ChatReport, run: &str) {
    table
        .section(format!("{run}rates"))
        .row("sent", format!("{} (target {:.0})", report::per_s(report.send_rate), report.target_rate))
        .row("delivered", report::per_s(report.delivered_per_s))
        .row("setup", format!("{:.1} s", report.setup_s));
    table
        .section(format!("{run}latency from the scheduled send"))
        .latency("delivery", report.delivered, &report.delivery_latency_us)
        .latency("ack", report.acked, &report.ack_latency_us);
    let split = &report.delivery_split_at_home_us;
    // The home's `ts` is whole milliseconds: each half is good to ±0.5 ms.
    table.latency("delivery, send → ts", report.delivered, &split.to_home).latency(
        "delivery, ts → agent",
        report.delivered,
        &split.from_home,
    );
    // One slice is the whole window again.
    if report.delivery_by_slice.len() > 1 {
        for slice in &report.delivery_by_slice {
            table.latency(
                format!("delivery, {}–{} s", slice.start_s, slice.end_s),
                slice.delivered,
                &slice.delivery_latency_us,
            );
        }
    }
    for (name, kind) in [("with attachment", &report.with_attachment), ("text only", &report.text_only)] {
        if let Some(kind) = kind {
            table.latency(format!("delivery, {name}"), kind.delivered, &kind.delivery_latency_us).latency(
                format!("ack, {name}"),
                kind.acked,
                &kind.ack_latency_us,
            );
        }
    }
    table.latency("send lag (client)", report.sent, &report.send_lag_us);
    table
        .section(format!("{run}cost"))
        .row("client CPU", report::cpu(report.client_cpu_cores, report.client_cpu_us_per_msg))
        .row_opt(
            "server CPU",
            report.server_cpu_cores.map(|cores| report::cpu(cores, report.server_cpu_us_per_msg)),
        )
        .row_opt("server RSS", report.server_rss_bytes.map(report::mib))
        .row_opt("hook server CPU", report.helper_cpu_cores.map(|c| format!("{c:.2} cores")))
        .row("other processes", format!("{:.2} cores", report.other_cpu_cores))
        .row("host steal, by CPU", stats::steal_row(&report.steal_by_cpu));
    if let Some(per_burst) = report.acks_per_burst {
        table.row(
            "group commits (ack bursts)",
            format!("{:.0}/s, {per_burst:.1} acks each", report.ack_bursts_per_s),
        );
    }
    if let Some(f) = &report.fsync_probe_us {
        table.row("fsync probe p50 / p99", format!("{:.0} / {:.0} µs", f.p50, f.p99));
    }
    table
        .section(format!("{run}losses"))
        .row("window messages sent", report.sent.to_string())
        .row("undelivered / unacked", format!("{} / {}", report.undelivered, report.unacked))
        .row("duplicates", report.duplicates.to_string())
        .row("rate_limited", report.rate_limited.to_string());
    if let Some(kind) = &report.with_attachment {
        table.row("sent with attachment", kind.sent.to_string());
    }
    for (code, n) in &report.error_codes {
        table.row(format!("error frame {code}"), n.to_string());
    }
    for (kind, n) in &report.connection_errors {
        table.row(format!("connection error: {kind}"), n.to_string());
    }
}

/// What a run's figures need said beside them, on stderr: how commits
/// batched, the server's threads, every error and every reason to distrust
/// the numbers.
pub fn print_summary(report: &ChatReport) {
    if let Some(per_burst) = report.acks_per_burst {
        eprintln!(
            "  acks came in {:.0} bursts/s of {per_burst:.1} (one per group commit: back to back under load, \
             so ~{:.0} µs per commit); fastest ack {:.0} µs",
            report.ack_bursts_per_s,
            1e6 / report.ack_bursts_per_s,
            report.ack_latency_us.min
        );
    }
    if let Some(f) = &report.fsync_probe_us {
        eprintln!(
            "  fsync probe in the data dir: µs p50 {:.0} p90 {:.0} p99 {:.0} max {:.0} \
             (a durable commit costs one or two of these)",
            f.p50, f.p90, f.p99, f.max
        );
    }
    if let Some(threads) = &report.server_threads_cores {
        let busy: Vec<String> = threads
            .iter()
            .filter(|(_, cores)| cores.user + cores.system >= 0.005)
            .map(|(name, cores)| format!("{name} {:.2} ({:.2} user)", cores.user + cores.system, cores.user))
            .collect();
        eprintln!("  server CPU by thread (cores): {}", busy.join(", "));
    }
    for (code, n) in &report.error_codes {
        let message = report.error_messages.get(code).map(String::as_str).unwrap_or("");
        eprintln!("  error frames ×{n}: {code} (first: {message:?})");
    }
    for (kind, n) in &report.connection_errors {
        eprintln!("  connection error ×{n}: {kind}");
    }
    if report.rate_limited > 0 {
        eprintln!(
            "WARNING: {} sends were REFUSED WITH rate_limited: the gateway limits each connection below {:.2} msg/s. \
             These numbers measure the limiter. Restart the gateway with KEFU_LIMITS_MESSAGES_PER_S and \
             KEFU_LIMITS_BURST above the per-visitor rate.",
            report.rate_limited,
            report.target_rate / f64::from(report.visitors.max(1))
        );
    }
    if report.undelivered > 0 || report.unacked > 0 {
        eprintln!(
            "WARNING: {} of {} window messages were not delivered and {} not acked within the window + {} s grace",
            report.undelivered, report.sent, report.unacked, report.grace_s
        );
    }
    if report.visitors_ready < u64::from(report.visitors) {
        eprintln!("WARNING: only {} of {} visitors were set up", report.visitors_ready, report.visitors);
    }
    if report.other_cpu_cores > 0.1 {
        eprintln!(
            "WARNING: other processes used {:.2} cores during the window: numbers are contended",
            report.other_cpu_cores
        );
    }
    stats::warn_if_stolen(&report.steal_by_cpu);
    let client_busy = report.client_cores_busy.unwrap_or(report.client_cpu_cores / f64::from(report.threads));
    if client_busy > 0.7 || report.send_lag_us.p99 > 1000.0 {
        eprintln!(
            "WARNING: the client may be in the way (its cores {:.0}% busy, send lag p99 {:.0} µs): \
             try more --threads on other cores",
            100.0 * client_busy,
            report.send_lag_us.p99
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpListener, TcpStream as StdStream},
        sync::Mutex,
    };

    use clap::Parser as _;
    use kefu_proto::client::{AgentRef, Msg, Sender, User};

    use super::*;

    #[test]
    fn cids_carry_their_schedule() {
        let cid = make_cid(3, 123_456_789, u64::MAX);
        assert!(cid.len() <= kefu_proto::client::CID_BYTES_MAX, "{cid}");
        assert_eq!(cid_scheduled(&cid), Some(u64::MAX));
        assert_eq!(cid_scheduled(&make_cid(0, 0, 42)), Some(42));
        assert_eq!(cid_scheduled("m-1"), None);
        assert_eq!(cid_scheduled("1-2-x"), None);
        assert_eq!(cid_scheduled("1-2-3-4"), None);
    }

    #[test]
    fn threads_interleave_into_an_even_schedule() {
        // 3 threads at a third of 3000/s each: together one message every
        // 333 µs, alternating threads.
        let (t0, threads, rate) = (1_000_000_000u64, 3usize, 3000.0);
        let mut all: Vec<u64> = (0..threads)
            .flat_map(|t| {
                (0..100).map(move |n| scheduled_at(t0, rate / threads as f64, t as f64 / threads as f64, n))
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all[0], t0);
        for pair in all.windows(2) {
            let gap = pair[1] - pair[0];
            assert!((333_000..=334_000).contains(&gap), "gap {gap} ns");
        }
    }

    #[test]
    fn capacity_must_fit() {
        assert_eq!(capacity_for(2000, 20, 100), Some(100));
        assert_eq!(capacity_for(2001, 20, 100), None);
        assert_eq!(capacity_for(10, 3, 100), Some(4));
    }

    #[test]
    fn the_timer_is_finer_than_a_millisecond() {
        let mut runtime = build_runtime(None, 64, TaskRun::Defer).expect("runtime");
        let mut late: Vec<u64> = runtime.block_on(async {
            let timer = PreciseTimer::new().expect("timerfd");
            let mut late = Vec::new();
            for _ in 0..50 {
                let deadline = mono_ns() + 300_000;
                timer.sleep_until(deadline).await.expect("sleep");
                let now = mono_ns();
                assert!(now >= deadline, "woke {} ns early", deadline - now);
                late.push(now - deadline);
            }
            // A deadline in the past returns at once.
            timer.sleep_until(1).await.expect("past deadline");
            late
        });
        late.sort_unstable();
        // monoio's own timer rounds up to the next millisecond tick, which
        // would make the median ~0.5-1 ms late.
        assert!(late[late.len() / 2] < 400_000, "median lateness {} ns", late[late.len() / 2]);
    }

    /// A stand-in gateway, one thread per connection, speaking just enough
    /// of the protocol for the bench: connect, presence, open (every other
    /// conversation queued first), send (ack + msg to the agent).
    struct Fake {
        secret: String,
        /// Refuse every n-th send with rate_limited.
        rate_limit_every: Option<u64>,
        /// How long a send waits before its `ts` is stamped, and how long
        /// after that it reaches its agent.
        stamp_after: Duration,
        deliver_after: Duration,
        agents: Mutex<Vec<FakeAgent>>,
        convs: Mutex<HashMap<u64, (usize, u64)>>,
        sends: AtomicU64,
    }

    /// An online agent: id, writer, encoding.
    type FakeAgent = (String, Arc<Mutex<StdStream>>, Codec);

    fn fake_gateway(rate_limit_every: Option<u64>) -> (SocketAddr, Arc<Fake>) {
        slow_fake_gateway(rate_limit_every, Duration::ZERO, Duration::ZERO)
    }

    fn slow_fake_gateway(
        rate_limit_every: Option<u64>,
        stamp_after: Duration,
        deliver_after: Duration,
    ) -> (SocketAddr, Arc<Fake>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Arc::new(Fake {
            secret: format!("{:032x}", rand::random::<u128>()),
            rate_limit_every,
            stamp_after,
            deliver_after,
            agents: Mutex::new(Vec::new()),
            convs: Mutex::new(HashMap::new()),
            sends: AtomicU64::new(0),
        });
        let shared = fake.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let fake = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &fake);
                });
            }
        });
        (addr, fake)
    }

    fn write_frame(out: &Mutex<StdStream>, codec: Codec, frame: &ServerFrame) -> io::Result<()> {
        let mut encoder = Encoder::new();
        let bytes = codec.encode_server(frame, &mut encoder);
        let mut wire = vec![if codec.is_binary() { 0x82 } else { 0x81 }];
        match bytes.len() {
            n @ 0..=125 => wire.push(n as u8),
            n @ 126..=0xFFFF => {
                wire.push(126);
                wire.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                wire.push(127);
                wire.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        wire.extend_from_slice(bytes);
        out.lock().expect("lock").write_all(&wire)
    }

    fn read_frame(stream: &mut StdStream) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head)?;
        let len = match head[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                stream.read_exact(&mut b)?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                stream.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut mask = [0u8; 4];
        stream.read_exact(&mut mask)?;
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload)?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        Ok((head[0] & 0x0F, payload))
    }

    fn serve(mut stream: StdStream, fake: &Fake) -> io::Result<()> {
        // The upgrade, read byte by byte so nothing after the head is taken.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
                })
                .unwrap_or("")
                .to_owned()
        };
        let codec = Codec::from_subprotocol(&header("sec-websocket-protocol")).unwrap_or(Codec::Json);
        write!(
            stream,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            ws::accept_for(&header("sec-websocket-key")),
            codec.subprotocol()
        )?;
        let out = Arc::new(Mutex::new(stream.try_clone()?));
        let key = JwtKey::new(fake.secret.as_bytes(), AuthPolicy::default()).expect("key");
        let mut me = String::new();
        loop {
            let (opcode, payload) = read_frame(&mut stream)?;
            if opcode == ws::OP_CLOSE {
                return Ok(());
            }
            let frame = codec.decode_client(&payload).expect("the bench sends valid frames");
            let id = frame.id;
            let reply = match frame.body {
                Command::Connect { token, .. } => {
                    let role = match token {
                        Some(token) => {
                            let claims =
                                key.verify(&token, mono_ns() / 1_000_000).expect("valid agent token");
                            me = claims.sub;
                            claims.role
                        }
                        None => {
                            me = format!("anon-{}", rand::random::<u32>());
                            Role::Visitor
                        }
                    };
                    Event::Connected {
                        session: "s".into(),
                        role,
                        user: User { id: me.clone(), ..User::default() },
                        visitor_key: (role == Role::Visitor).then(|| "0".repeat(32)),
                        conversations: Vec::new(),
                        heartbeat_s: 25,
                        text_bytes_max: None,
                        attachment_bytes_max: None,
                        groups: None,
                    }
                }
                Command::Presence { status, capacity } => {
                    assert!(capacity.is_some_and(|c| c > 0));
                    fake.agents.lock().expect("lock").push((me.clone(), out.clone(), codec));
                    Event::Presence { agent: me.clone(), status, name: None }
                }
                Command::Open { .. } => {
                    let mut convs = fake.convs.lock().expect("lock");
                    let conv = convs.len() as u64 + 1;
                    let agents = fake.agents.lock().expect("lock").len();
                    convs.insert(conv, (conv as usize % agents, 0));
                    let conversation = |status| Event::Conversation {
                        conv: ConvId(conv),
                        status,
                        agent: Some(AgentRef::default()),
                        group: None,
                        visitor: User::default(),
                        queue_position: None,
                        agents_online: None,
                        since: None,
                    };
                    if conv % 2 == 1 {
                        write_frame(&out, codec, &ServerFrame::reply(id, conversation(ConvStatus::Queued)))?;
                        ServerFrame::push(conversation(ConvStatus::Assigned)).body
                    } else {
                        conversation(ConvStatus::Assigned)
                    }
                }
                Command::Send { conv, cid, text, attachment } => {
                    let n = fake.sends.fetch_add(1, Ordering::AcqRel) + 1;
                    if fake.rate_limit_every.is_some_and(|every| n.is_multiple_of(every)) {
                        Event::Error { code: ErrorCode::RateLimited, message: "slow down".into() }
                    } else {
                        let (agent, seq) = {
                            let mut convs = fake.convs.lock().expect("lock");
                            let entry = convs.get_mut(&conv.0).expect("known conversation");
                            entry.1 += 1;
                            (entry.0, entry.1)
                        };
                        let (_, agent_out, agent_codec) = fake.agents.lock().expect("lock")[agent].clone();
                        std::thread::sleep(fake.stamp_after);
                        let msg = Msg {
                            conv,
                            seq,
                            cid: cid.clone(),
                            from: Sender { role: Role::Visitor, id: me.clone(), name: String::new() },
                            text,
                            attachment,
                            ts: (wall_ns() / 1_000_000),
                        };
                        std::thread::sleep(fake.deliver_after);
                        write_frame(&agent_out, agent_codec, &ServerFrame::push(Event::Msg(msg)))?;
                        Event::Ack { cid, conv, seq, ts: 0, duplicate: false }
                    }
                }
                other => panic!("unexpected command {other:?}"),
            };
            // Replies to open are pushes when the conversation was queued.
            let frame = match (&reply, id) {
                (Event::Conversation { conv, .. }, _) if conv.0 % 2 == 1 => ServerFrame::push(reply),
                _ => ServerFrame::reply(id, reply),
            };
            write_frame(&out, codec, &frame)?;
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ChatArgs,
    }

    fn args(addr: SocketAddr, secret_file: &std::path::Path, extra: &[&str]) -> ChatArgs {
        let url = format!("ws://{addr}/ws");
        let mut argv = vec![
            "chat",
            "--url",
            &url,
            "--jwt-secret-file",
            secret_file.to_str().expect("utf-8 path"),
            "--visitors",
            "20",
            "--agents",
            "3",
            "--rate",
            "400",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--grace",
            "1",
            "--setup-timeout",
            "20",
        ];
        // Options in `extra` replace the defaults above.
        for pair in extra.chunks(2) {
            if let Some(i) = argv.iter().position(|a| *a == pair[0]) {
                argv.drain(i..i + 2);
            }
        }
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    fn secret_file(fake: &Fake) -> PathBuf {
        let path = std::env::temp_dir().join(format!("kefu-bench-chat-test-{}", rand::random::<u64>()));
        fs::write(&path, format!("{}\n", fake.secret)).expect("secret file");
        path
    }

    #[test]
    fn every_message_is_timed_end_to_end() {
        for (subprotocol, threads) in [("json", "1"), ("fb", "2")] {
            let (addr, fake) = fake_gateway(None);
            let secret = secret_file(&fake);
            let report = measure(&args(addr, &secret, &["--subprotocol", subprotocol, "--threads", threads]))
                .expect("run against the fake gateway");
            let _ = fs::remove_file(&secret);
            assert_eq!(report.visitors_ready, 20, "{report:?}");
            assert_eq!(report.agents_online, 3, "{report:?}");
            assert_eq!(report.capacity, 7);
            // 400/s × 0.5 s, by scheduled time.
            assert!((199..=201).contains(&report.sent), "{report:?}");
            assert_eq!(report.delivered, report.sent, "{report:?}");
            assert_eq!(report.acked, report.sent, "{report:?}");
            assert_eq!(
                (report.undelivered, report.unacked, report.duplicates, report.rate_limited),
                (0, 0, 0, 0)
            );
            assert!(report.delivery_latency_us.p50 > 0.0 && report.ack_latency_us.p50 > 0.0, "{report:?}");
            assert!(report.connection_errors.is_empty(), "{report:?}");
            // Warmup and window: 0.7 s at 400/s, plus setup.
            let total = fake.sends.load(Ordering::Acquire);
            assert!((279..=281).contains(&total), "{total} sends");
        }
    }

    #[test]
    fn the_window_is_also_timed_by_slice() {
        let (addr, fake) = fake_gateway(None);
        let secret = secret_file(&fake);
        let report = measure(&args(addr, &secret, &["--rate", "200", "--duration", "2.5", "--slice", "1"]))
            .expect("run against the fake gateway");
        let _ = fs::remove_file(&secret);
        let slices = &report.delivery_by_slice;
        let bounds: Vec<(f64, f64)> = slices.iter().map(|s| (s.start_s, s.end_s)).collect();
        assert_eq!(bounds, [(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)], "{report:?}");
        // 200/s by scheduled time: a second's slice holds ~200, the last
        // half second ~100, and together they are the window.
        assert!((199..=201).contains(&slices[0].delivered) && (99..=101).contains(&slices[2].delivered));
        assert_eq!(slices.iter().map(|s| s.delivered).sum::<u64>(), report.delivered);
        assert!(
            slices.iter().all(|s| s.sent == s.delivered && s.delivery_latency_us.p99 > 0.0),
            "{slices:?}"
        );
        assert!(table(&report).render().contains("delivery, 2–2.5 s"), "{}", table(&report).render());

        // The default slice (60 s) holds a short window whole: one slice,
        // the window itself, which the table does not repeat.
        let (addr, fake) = fake_gateway(None);
        let secret = secret_file(&fake);
        let report = measure(&args(addr, &secret, &[])).expect("run against the fake gateway");
        let _ = fs::remove_file(&secret);
        assert_eq!(report.delivery_by_slice.len(), 1);
        assert!(!table(&report).render().contains("delivery, 0–"));
        assert!(parse_slice("0.5").is_err() && parse_slice("0").is_ok() && parse_slice("60").is_ok());
    }

    /// The split at the home's `ts` puts each delay on its side of the
    /// stamp: the fake holds a send 20 ms before stamping it, 30 ms after.
    #[test]
    fn delivery_is_split_at_the_home_s_stamp() {
        let (addr, fake) = slow_fake_gateway(None, Duration::from_millis(20), Duration::from_millis(30));
        let secret = secret_file(&fake);
        let report = measure(&args(addr, &secret, &["--rate", "50", "--duration", "1"]))
            .expect("run against the fake gateway");
        let _ = fs::remove_file(&secret);
        let split = report.delivery_split_at_home_us;
        let (to, from, whole) = (split.to_home.p50, split.from_home.p50, report.delivery_latency_us.p50);
        assert!(report.delivered > 0, "{report:?}");
        assert!((19_000.0..28_000.0).contains(&to), "send → stamp holds the 20 ms: {split:?}");
        assert!((29_000.0..40_000.0).contains(&from), "stamp → agent holds the 30 ms: {split:?}");
        assert!((to + from - whole).abs() < 2_000.0, "the halves add up to the whole: {split:?} vs {whole}");
        assert!(table(&report).render().contains("ts → agent"));
    }

    #[test]
    fn a_mix_of_attachments_is_timed_by_kind() {
        for subprotocol in ["json", "fb"] {
            // A fresh fake per run: it routes to every agent it ever saw.
            let (addr, fake) = fake_gateway(None);
            let secret = secret_file(&fake);
            let extra =
                ["--attachment-share", "0.5", "--attachment-bytes", "3000", "--subprotocol", subprotocol];
            let report = measure(&args(addr, &secret, &extra)).expect("run against the fake gateway");
            let _ = fs::remove_file(&secret);
            let (with, text) = (report.with_attachment.expect("mix"), report.text_only.expect("mix"));
            // About half of ~200 window sends, each kind timed apart; the
            // kinds add up to the whole.
            assert!((50..=150).contains(&with.sent), "{with:?}");
            assert_eq!(with.sent + text.sent, report.sent, "{report:?}");
            assert_eq!((with.delivered, with.acked), (with.sent, with.sent), "{subprotocol}: {report:?}");
            assert_eq!((text.delivered, text.acked), (text.sent, text.sent), "{text:?}");
            assert!(with.delivery_latency_us.p50 > 0.0 && text.ack_latency_us.p50 > 0.0);
            assert_eq!(report.attachment_bytes, Some(3000));
            let names: Vec<&str> = report.curves.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names.len(), 7, "{names:?}");
            assert!(table(&report).render().contains("delivery, with attachment"));
        }
    }

    #[test]
    fn attachment_arguments_are_checked() {
        for (share, wrong) in [("1.5", "not a share"), ("=-0.1", "not a share"), ("x", "not a number")] {
            let error = Cli::try_parse_from([
                "chat",
                &format!("--attachment-share={}", share.trim_start_matches('=')),
            ])
            .err()
            .expect("refused");
            assert!(error.to_string().contains(wrong), "{error}");
        }
        let error = Cli::try_parse_from(["chat", "--attachment-bytes", "0"]).err().expect("refused");
        assert!(error.to_string().contains("--attachment-bytes"), "{error}");
        let too_big = (ATTACHMENT_BYTES_MAX + 1).to_string();
        assert!(Cli::try_parse_from(["chat", "--attachment-bytes", &too_big]).is_err());
        let plain = Cli::try_parse_from(["chat"]).expect("defaults").args;
        assert_eq!(plain.attachment_share, 0.0);
        assert_eq!(cid_kind(&make_kind_cid(Kind::Attachment, 1, 2, 3)), Kind::Attachment);
        assert_eq!(cid_kind(&make_kind_cid(Kind::Text, 1, 2, 3)), Kind::Text);
        let cid = make_kind_cid(Kind::Attachment, 63, u64::MAX, u64::MAX);
        assert!(
            cid.len() <= kefu_proto::client::CID_BYTES_MAX && cid_scheduled(&cid) == Some(u64::MAX),
            "{cid}"
        );
    }

    #[test]
    fn rate_limited_sends_are_counted_and_fail_the_run() {
        let (addr, fake) = fake_gateway(Some(10));
        let secret = secret_file(&fake);
        let args = args(addr, &secret, &["--grace", "0.5"]);
        let report = measure(&args).expect("run against the fake gateway");
        let _ = fs::remove_file(&secret);
        assert!(report.rate_limited >= 15, "{report:?}");
        assert_eq!(report.error_codes.get("rate_limited"), Some(&report.rate_limited));
        assert_eq!(report.error_messages.get("rate_limited").map(String::as_str), Some("slow down"));
        assert!(report.undelivered >= 15 && report.unacked >= 15, "{report:?}");
    }

    #[test]
    fn refuses_what_cannot_fit_or_sign() {
        let (addr, fake) = fake_gateway(None);
        let secret = secret_file(&fake);
        let error =
            measure(&args(addr, &secret, &["--visitors", "500", "--agents", "2"])).expect_err("too many");
        assert!(format!("{error:#}").contains("at least 5 agents"), "{error:#}");
        let missing = std::env::temp_dir().join("kefu-bench-no-such-secret");
        let error = measure(&args(addr, &missing, &[])).expect_err("no secret");
        assert!(format!("{error:#}").contains("JWT secret"), "{error:#}");
        let _ = fs::remove_file(&secret);
    }
}
