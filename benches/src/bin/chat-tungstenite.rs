//! Visitor → agent delivery latency of kefu's chat, measured by a client
//! that shares no code with kefu: tokio-tungstenite for the WebSocket,
//! serde_json for the `kefu.v1.json` frames written from docs/protocol.md,
//! and HS256 tokens signed here with the hmac and sha2 crates.
//!
//! `kefu-bench chat` is kefu's own client (kefu's codec and protocol types
//! on monoio); a chat latency measured only with it could be a figure about
//! that client. This one drives the same shape of load, on one
//! current-thread tokio runtime:
//!
//! 1. `--agents` agents connect with agent tokens and go online with room
//!    for every visitor (`capacity` = visitors / agents, rounded up: at
//!    most `routing.max_capacity`, 100 by default);
//! 2. `--visitors` visitors connect with visitor tokens (so no per-address
//!    limit on anonymous visitors applies), `open` and wait until their
//!    conversation is `assigned`;
//! 3. every visitor sends `--rate / --visitors` messages a second, open
//!    loop on a fixed schedule, each text starting with its scheduled send
//!    time; an agent's `msg` gives the delivery latency (receipt − schedule),
//!    a visitor's `ack` the ack latency (the cid carries the schedule too).
//!
//! Latency counts from when the message is handed to the socket, not from
//! its scheduled time: tokio's timer wakes on whole milliseconds, and that
//! lag (reported apart as `send_lag_us`) is the client's. Only messages
//! sent in the window (after `--warmup`, for `--duration`) count. The gateway
//! must let a connection send `rate / visitors` messages a second
//! (`limits.messages_per_s`) and the run's connections through
//! (`limits.new_connections_*_per_ip`): tools/bench-chat.sh sets both.
//!
//! Output: one JSON line, with the field names `kefu-bench chat` uses for
//! the same figures (`delivery_latency_us`, `ack_latency_us`, `undelivered`,
//! `unacked`, `send_rate`, `client_cpu_cores`, and with `--slice` the
//! window's slices in `delivery_by_slice`).

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use clap::Parser;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use hmac::{KeyInit as _, Mac as _};
use kefu_benches::load::{dial, process_cpu};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Digits of the scheduled send time (ns since the run's start) that open
/// every text and every cid.
const STAMP_DIGITS: usize = 16;

#[derive(Debug, Parser)]
#[command(about = "kefu chat delivery latency from an independent client (tokio-tungstenite)")]
struct Args {
    /// The gateway's client endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// The gateway's data directory, whose `jwt_secret` signs the tokens.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A file holding the gateway's JWT secret, instead of --data.
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Visitors, each with its own connection and conversation.
    #[arg(long, default_value_t = 2000)]
    visitors: usize,
    /// Agents sharing the conversations.
    #[arg(long, default_value_t = 20)]
    agents: usize,
    /// Visitor messages per second, all visitors together.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Text bytes per message (at least the 16-digit stamp).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds of load before the window.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Seconds after the last send to wait for deliveries and acks.
    #[arg(long, default_value_t = 3.0)]
    grace: f64,
    /// Also report the delivery latency of each slice of the window this
    /// many seconds long (by send stamp): a long run's first minute beside
    /// its last. 0: no slices; else at least 1.
    #[arg(long, default_value_t = 60.0)]
    slice: f64,
    /// Local addresses to connect from, round robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Connections set up at once.
    #[arg(long, default_value_t = 200)]
    setup_concurrency: usize,
    /// A label for the report.
    #[arg(long, default_value = "")]
    label: String,
    /// The gateway's process: its CPU over the window is reported.
    #[arg(long)]
    server_pid: Option<u32>,
}

type Ws = WebSocketStream<TcpStream>;

/// What the run counts, shared by every task on the one thread.
struct Tally {
    start: Instant,
    window: (u64, u64),
    delivery: Histogram<u64>,
    /// Length of a slice of the window in ns (0: none), and each slice's
    /// sends and delivery latency, every slice of the window from the
    /// start (one nothing arrived in included).
    slice_ns: u64,
    slices: Vec<Slice>,
    ack: Histogram<u64>,
    send_lag: Histogram<u64>,
    sent: u64,
    delivered: u64,
    acked: u64,
    errors: Vec<String>,
}

impl Tally {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn in_window(&self, stamp: u64) -> bool {
        (self.window.0..self.window.1).contains(&stamp)
    }

    /// The slice a window message stamped `stamp` belongs to.
    fn slice(&mut self, stamp: u64) -> Option<&mut Slice> {
        if self.slice_ns == 0 {
            return None;
        }
        let i = (stamp.saturating_sub(self.window.0) / self.slice_ns) as usize;
        self.slices.get_mut(i)
    }

    /// Records a delivery of a window message stamped `stamp`.
    fn delivered(&mut self, stamp: u64, us: u64) {
        self.delivered += 1;
        self.delivery.saturating_record(us);
        if let Some(slice) = self.slice(stamp) {
            slice.delivery.saturating_record(us);
        }
    }
}

/// One `--slice` of the window.
struct Slice {
    sent: u64,
    delivery: Histogram<u64>,
}

/// A latency histogram in µs, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

type Shared = Rc<RefCell<Tally>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.size < STAMP_DIGITS || args.visitors == 0 || args.agents == 0 || args.rate <= 0.0 {
        bail!("--size must be at least {STAMP_DIGITS}, and --visitors, --agents and --rate positive");
    }
    if !(args.slice == 0.0 || (1.0..=86_400.0).contains(&args.slice)) {
        bail!("--slice {}: give 0 (no slices) or from 1 to 86400 seconds", args.slice);
    }
    let secret = read_secret(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&runtime, run(args, secret))?;
    println!("{report}");
    Ok(())
}

async fn run(args: Args, secret: String) -> anyhow::Result<Value> {
    let addr: SocketAddr = args
        .url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| anyhow!("--url must be ws://HOST:PORT/PATH"))?
        .parse()
        .context("--url's host:port")?;
    let run_id: u32 = std::process::id() ^ (SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos());
    let capacity = args.visitors.div_ceil(args.agents);
    let setup_started = Instant::now();

    // Agents first, online, each reading its deliveries from then on.
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let token = sign(&secret, &format!("chat-tung-{run_id:08x}-a{i}"), "agent")?;
        let mut ws = connect(&args, i, addr, &token).await.with_context(|| format!("agent {i}"))?;
        let presence = json!({"type": "presence", "id": 2, "status": "online", "capacity": capacity});
        ws.send(Message::text(presence.to_string())).await?;
        reply(&mut ws, 2).await.with_context(|| format!("agent {i}'s presence"))?;
        agents.push(ws);
    }
    // Visitors, `setup_concurrency` at a time, each until assigned.
    let mut visitors = Vec::with_capacity(args.visitors);
    for chunk in (0..args.visitors).collect::<Vec<_>>().chunks(args.setup_concurrency) {
        let opened = futures_util::future::join_all(chunk.iter().map(|&i| {
            let token = sign(&secret, &format!("chat-tung-{run_id:08x}-v{i}"), "visitor");
            let args = &args;
            async move {
                let mut ws = connect(args, args.agents + i, addr, &token?).await?;
                ws.send(Message::text(json!({"type": "open", "id": 2}).to_string())).await?;
                let conv = assigned(&mut ws).await?;
                anyhow::Ok((ws, conv))
            }
        }))
        .await;
        for (k, v) in opened.into_iter().enumerate() {
            visitors.push(v.with_context(|| format!("visitor {}", chunk[k]))?);
        }
    }
    let setup_s = setup_started.elapsed().as_secs_f64();

    let start = Instant::now();
    let ns = |s: f64| (s * 1e9) as u64;
    let window = (ns(args.warmup), ns(args.warmup + args.duration));
    let tally: Shared = Rc::new(RefCell::new(Tally {
        start,
        window,
        delivery: histogram(),
        slice_ns: ns(args.slice),
        slices: (0..slice_count(args.duration, args.slice))
            .map(|_| Slice { sent: 0, delivery: histogram() })
            .collect(),
        ack: histogram(),
        send_lag: histogram(),
        sent: 0,
        delivered: 0,
        acked: 0,
        errors: Vec::new(),
    }));
    let stop_at = start + Duration::from_secs_f64(args.warmup + args.duration + args.grace);
    let cpu_start = process_cpu();
    let server_cpu = args.server_pid.map(|pid| {
        let (from, to) = (start + Duration::from_nanos(window.0), start + Duration::from_nanos(window.1));
        tokio::task::spawn_local(async move {
            tokio::time::sleep_until(from.into()).await;
            let before = process_ticks(pid)?;
            tokio::time::sleep_until(to.into()).await;
            Some(process_ticks(pid)?.saturating_sub(before))
        })
    });

    for ws in agents {
        let (_, read) = ws.split();
        tokio::task::spawn_local(read_agent(read, tally.clone(), stop_at));
    }
    let interval_ns = args.visitors as f64 / args.rate * 1e9;
    let last_send = window.1;
    let mut tasks = Vec::new();
    for (i, (ws, conv)) in visitors.into_iter().enumerate() {
        let first = (i as f64 / args.rate * 1e9) as u64;
        let (write, read) = ws.split();
        tokio::task::spawn_local(read_visitor(read, tally.clone(), stop_at));
        tasks.push(tokio::task::spawn_local(send_loop(
            write,
            conv,
            tally.clone(),
            (first, interval_ns, last_send),
            args.size,
        )));
    }
    for t in tasks {
        t.await?;
    }
    tokio::time::sleep_until(stop_at.into()).await;
    let cpu = process_cpu().saturating_sub(cpu_start).as_secs_f64();
    let server_cpu_s = match server_cpu {
        Some(task) => task.await?.map(|ticks| ticks as f64 / clock_ticks_per_s()),
        None => None,
    };

    let t = tally.borrow();
    let wall = (args.warmup + args.duration + args.grace).max(f64::EPSILON);
    let summary = |h: &Histogram<u64>| {
        json!({
            "p50": h.value_at_quantile(0.50), "p90": h.value_at_quantile(0.90),
            "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999),
            "max": h.max(), "count": h.len(),
        })
    };
    let mut report = json!({
        "client": "tokio-tungstenite (benches/src/bin/chat-tungstenite.rs)",
        "label": args.label,
        "visitors": args.visitors,
        "agents": args.agents,
        "target_rate": args.rate,
        "size": args.size,
        "setup_s": setup_s,
        "window_s": args.duration,
        "sent": t.sent,
        "send_rate": t.sent as f64 / args.duration,
        "delivered": t.delivered,
        "acked": t.acked,
        "undelivered": t.sent.saturating_sub(t.delivered),
        "unacked": t.sent.saturating_sub(t.acked),
        "delivery_latency_us": summary(&t.delivery),
        "ack_latency_us": summary(&t.ack),
        "send_lag_us": summary(&t.send_lag),
        "client_cpu_cores": cpu / wall,
        "server_cpu_cores": server_cpu_s.map(|s| s / args.duration),
        "server_cpu_us_per_msg": server_cpu_s.filter(|_| t.sent > 0).map(|s| s * 1e6 / t.sent as f64),
        "errors": t.errors,
    });
    if !t.slices.is_empty() {
        let slices: Vec<Value> = t
            .slices
            .iter()
            .enumerate()
            .map(|(i, slice)| {
                json!({
                    "start_s": i as f64 * args.slice,
                    "end_s": ((i + 1) as f64 * args.slice).min(args.duration),
                    "sent": slice.sent,
                    "delivered": slice.delivery.len(),
                    "delivery_latency_us": summary(&slice.delivery),
                })
            })
            .collect();
        report["delivery_by_slice"] = Value::Array(slices);
    }
    Ok(report)
}

/// Slices of `slice_s` seconds in a window of `duration_s` (the last may
/// be shorter); none with `slice_s` 0.
fn slice_count(duration_s: f64, slice_s: f64) -> usize {
    if slice_s > 0.0 { (duration_s / slice_s).ceil() as usize } else { 0 }
}

/// Connects connection `i` and signs in with `token`.
async fn connect(args: &Args, i: usize, addr: SocketAddr, token: &str) -> anyhow::Result<Ws> {
    let source = SocketAddr::new(args.sources[i % args.sources.len()], 0);
    let stream = dial(source, addr).await?;
    let mut request = args.url.as_str().into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "kefu.v1.json".parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    ws.send(Message::text(json!({"type": "connect", "id": 1, "token": token}).to_string())).await?;
    let connected = reply(&mut ws, 1).await?;
    if connected["type"] != "connected" {
        bail!("connect answered {connected}");
    }
    Ok(ws)
}

/// The next frame answering command `id`; an `error` is a failure.
async fn reply(ws: &mut Ws, id: u64) -> anyhow::Result<Value> {
    loop {
        let frame = next_frame(ws).await?;
        if frame["id"] == id {
            if frame["type"] == "error" {
                bail!("refused: {frame}");
            }
            return Ok(frame);
        }
    }
}

/// Waits until the visitor's conversation is `assigned`; its id.
async fn assigned(ws: &mut Ws) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let frame = tokio::time::timeout_at(deadline.into(), next_frame(ws))
            .await
            .context("not assigned in 60 s")??;
        match frame["type"].as_str() {
            Some("error") if frame["id"] == 2 => bail!("open refused: {frame}"),
            Some("conversation") if frame["status"] == "assigned" => {
                return frame["conv"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("no conv in {frame}"));
            }
            _ => {}
        }
    }
}

async fn next_frame(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await.context("closed by the gateway")?? {
            Message::Text(t) => return Ok(serde_json::from_str(&t)?),
            Message::Close(c) => bail!("closed by the gateway: {c:?}"),
            _ => {}
        }
    }
}

/// One visitor's sends, on its schedule: (first, interval, end) in ns.
async fn send_loop(
    mut write: futures_util::stream::SplitSink<Ws, Message>,
    conv: String,
    tally: Shared,
    (first, interval_ns, end): (u64, f64, u64),
    size: usize,
) {
    let start = tally.borrow().start;
    let pad = "x".repeat(size - STAMP_DIGITS);
    for k in 0u64.. {
        let stamp = first + (k as f64 * interval_ns) as u64;
        if stamp >= end {
            break;
        }
        tokio::time::sleep_until((start + Duration::from_nanos(stamp)).into()).await;
        // Stamped when it goes, not when it was due: tokio's timer wakes on
        // whole milliseconds, and that lag is the client's (reported apart).
        let sent = {
            let mut t = tally.borrow_mut();
            let now = t.now_ns();
            if t.in_window(now) {
                t.sent += 1;
                t.send_lag.saturating_record((now.saturating_sub(stamp) / 1000).max(1));
                if let Some(slice) = t.slice(now) {
                    slice.sent += 1;
                }
            }
            now
        };
        let text = format!("{sent:0STAMP_DIGITS$}{pad}");
        let cid = format!("{sent:0STAMP_DIGITS$}");
        let frame = json!({"type": "send", "id": k + 10, "conv": conv, "cid": cid, "text": text});
        if let Err(e) = write.send(Message::text(frame.to_string())).await {
            tally.borrow_mut().errors.push(format!("send: {e}"));
            return;
        }
    }
}

/// The stamp a text or cid opens with.
fn stamp_of(v: &Value) -> Option<u64> {
    v.as_str()?.get(..STAMP_DIGITS)?.parse().ok()
}

async fn read_agent(mut read: SplitStream<Ws>, tally: Shared, stop_at: Instant) {
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(stop_at.into(), read.next()).await {
        let Message::Text(t) = message else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(&t) else { continue };
        if frame["type"] != "msg" || frame["from"]["role"] != "visitor" {
            continue;
        }
        let Some(stamp) = stamp_of(&frame["text"]) else { continue };
        let mut t = tally.borrow_mut();
        if t.in_window(stamp) {
            let us = (t.now_ns().saturating_sub(stamp) / 1000).max(1);
            t.delivered(stamp, us);
        }
    }
}

async fn read_visitor(mut read: SplitStream<Ws>, tally: Shared, stop_at: Instant) {
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(stop_at.into(), read.next()).await {
        let Message::Text(t) = message else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(&t) else { continue };
        match frame["type"].as_str() {
            Some("ack") => {
                let Some(stamp) = stamp_of(&frame["cid"]) else { continue };
                let mut t = tally.borrow_mut();
                if t.in_window(stamp) {
                    let us = (t.now_ns().saturating_sub(stamp) / 1000).max(1);
                    t.acked += 1;
                    t.ack.saturating_record(us);
                }
            }
            Some("error") => tally.borrow_mut().errors.push(frame.to_string()),
            _ => {}
        }
    }
}

/// User plus system CPU of process `pid`, in clock ticks (`/proc/PID/stat`).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// An HS256 token for `sub` in `role`, valid for a day.
fn sign(secret: &str, sub: &str, role: &str) -> anyhow::Result<String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(json!({"sub": sub, "role": role, "exp": exp}).to_string());
    let signed = format!("{header}.{claims}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(signed.as_bytes());
    Ok(format!("{signed}.{}", b64.encode(mac.finalize().into_bytes())))
}

fn read_secret(args: &Args) -> anyhow::Result<String> {
    let path = match (&args.jwt_secret_file, &args.data) {
        (Some(file), _) => file.clone(),
        (None, Some(dir)) => dir.join("jwt_secret"),
        (None, None) => bail!("tokens need the gateway's secret: --data DIR or --jwt-secret-file FILE"),
    };
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}
