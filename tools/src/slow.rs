//! `kefu-bench slow`: does a client that stops reading cost anyone but
//! itself?
//!
//! The honest load is `chat`'s; it runs clean, then again beside
//! `--slow-percent` (1%) as many slow clients as there are honest ones
//! (`abuse.rs` compares the two runs). A slow client is one more device of
//! an honest agent (its token, round-robin over the agents), so it is sent
//! every `msg` of that agent's conversations: chat traffic, at the agent's
//! rate. It connects with a small `SO_RCVBUF` (`--rcvbuf-bytes`, set before
//! the connect so that the window offered to the gateway stays small too),
//! reads its `connected`, and then never reads again while keeping the
//! socket open. Its kernel buffer fills in a moment, the gateway's socket
//! buffer next, then the connection's outbound queue
//! (`limits.outbound_queue_frames` / `limits.outbound_queue_bytes`), and
//! the gateway must close it with 4001 (slow consumer) and drop what it
//! held.
//!
//! # How the close is seen without reading
//!
//! While the run goes on, each slow socket's TCP state is polled
//! (`TCP_INFO`): a reset, or a FIN once what was before it got through,
//! moves it out of ESTABLISHED, which is recorded with its time. But a
//! close frame and FIN queued behind a full window do not arrive until the
//! client reads; so when the honest load has drained, every slow client
//! resumes reading (at most `--resume-timeout-ms`) and reports how its
//! connection ended: the close code, or `eof` / an errno without one. A
//! slow client passes if it ended with 4001 or was cut by the gateway
//! (reset or end of stream); one still open, or closed with another code,
//! fails the run. A client whose socket is full cannot be sent the 4001
//! frame at all (the gateway cuts it after `server.close_timeout_ms`), so
//! the gateway's own count, `kefu_slow_consumer_closes_total` on the admin
//! listener (`--admin`), must also have risen by one per slow client.
//!
//! The gateway's RSS is sampled through the run (`--server-pid`; see
//! `abuse.rs`): what slow readers make it hold must stay bounded.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsRawFd as _, RawFd},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};
use kefu_proto::{Codec, Event};
use monoio::{io::AsyncReadRent as _, io::AsyncWriteRentExt as _, net::TcpStream};
use serde::Serialize;

use crate::{
    abuse::{self, Check, CheckArgs},
    chat::{Beside, ChatArgs, LoadStart, mono_ns},
    echo::{TaskRun, build_runtime},
    report::Output,
    ws::{self, FrameReader, WsUrl},
};

/// How often the slow sockets' TCP state is polled.
const STATE_POLL: Duration = Duration::from_millis(50);

/// Linux's `TCP_ESTABLISHED` (include/net/tcp_states.h; libc does not
/// export the states).
const TCP_ESTABLISHED: u8 = 1;

/// Largest message a slow client reassembles while resuming (chat frames
/// are a few hundred bytes; the agent's `connected` a few KiB).
const MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Arguments of `kefu-bench slow`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example (tools/bench-abuse.sh does all of it):
    kefu-bench slow --url ws://127.0.0.1:9211/ws --data DIR --visitors 1000 --agents 10 --visitor-tokens \\
        --rate 2000 --duration 20 --warmup 2 --sources 127.0.0.1,127.0.0.2 --slow-percent 1 \\
        --admin 127.0.0.1:9212 --server-pid PID --cpu 1")]
pub struct SlowArgs {
    #[command(flatten)]
    pub chat: ChatArgs,

    #[command(flatten)]
    pub checks: CheckArgs,

    /// Slow clients, as a percentage of the honest ones (visitors + agents);
    /// at least one.
    #[arg(long, default_value_t = 1.0)]
    pub slow_percent: f64,

    /// SO_RCVBUF of a slow client's socket, bytes (the kernel doubles it and
    /// enforces a minimum).
    #[arg(long, default_value_t = 4096)]
    pub rcvbuf_bytes: usize,

    /// Bound on a slow client's final read, milliseconds: what the gateway
    /// had queued, then its close, must arrive within it.
    #[arg(long, default_value_t = 5_000)]
    pub resume_timeout_ms: u64,
}

/// What the slow clients saw; one JSON object in the report.
#[derive(Debug, Default, Serialize)]
pub struct SlowTally {
    pub slow_clients: u32,
    /// Slow clients that were set up (`connected` read) and then stopped
    /// reading.
    pub stopped_reading: u32,
    pub setup_errors: BTreeMap<String, u64>,
    /// Slow sockets seen leaving ESTABLISHED while the run went on
    /// (reset, or the gateway's FIN got through).
    pub closed_during_run: u32,
    /// When the first and the last of those left it, seconds from the
    /// first scheduled send.
    pub first_close_s: Option<f64>,
    pub last_close_s: Option<f64>,
    /// How each slow connection ended once it read again: the close code,
    /// or `eof` / an errno without one, or `still open`.
    pub endings: BTreeMap<String, u64>,
    /// Frames read in the final read, in all.
    pub frames_read_on_resume: u64,
}

/// The slow clients as a [`Beside`] of the chat.
pub struct SlowLoad {
    args: SlowArgs,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<SlowTally>>>,
    tally: SlowTally,
}

impl SlowLoad {
    pub fn new(args: SlowArgs) -> Self {
        Self { args, stop: Arc::new(AtomicBool::new(false)), handle: None, tally: SlowTally::default() }
    }

    /// Slow clients for this many honest ones.
    fn count(&self) -> u32 {
        let honest = f64::from(self.args.chat.visitors + self.args.chat.agents);
        ((honest * self.args.slow_percent / 100.0).ceil() as u32).max(1)
    }
}

/// What the slow thread needs.
struct SlowPlan {
    url: WsUrl,
    sources: Vec<IpAddr>,
    /// The agent token of each slow client.
    tokens: Vec<String>,
    rcvbuf_bytes: usize,
    connect_timeout: Duration,
    reply_timeout: Duration,
    resume_timeout: Duration,
    t0: u64,
}

impl Beside for SlowLoad {
    fn start(&mut self, load: &LoadStart<'_>) -> anyhow::Result<()> {
        let args = &self.args;
        let count = self.count();
        if load.agent_tokens.is_empty() {
            bail!("no agent tokens to make slow devices of");
        }
        let plan = SlowPlan {
            url: WsUrl::parse(&args.chat.client.url, args.chat.client.allow_non_loopback)?,
            sources: args.chat.client.sources.clone(),
            tokens: (0..count as usize)
                .map(|i| load.agent_tokens[i % load.agent_tokens.len()].clone())
                .collect(),
            rcvbuf_bytes: args.rcvbuf_bytes,
            connect_timeout: Duration::from_millis(args.chat.client.connect_timeout_ms),
            reply_timeout: Duration::from_millis(args.chat.client.reply_timeout_ms),
            resume_timeout: Duration::from_millis(args.resume_timeout_ms),
            t0: load.t0,
        };
        eprintln!(
            "slow: {count} slow clients (agent devices that stop reading, SO_RCVBUF {} B)",
            args.rcvbuf_bytes
        );
        let cpu = args.chat.client.cpu.first().copied();
        let ring_entries = args.chat.client.ring_entries;
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name("slow".into())
            .spawn(move || -> anyhow::Result<SlowTally> {
                let mut runtime = build_runtime(cpu, ring_entries, TaskRun::Defer)?;
                Ok(runtime.block_on(slow_thread(plan, stop)))
            })
            .context("spawning the slow thread")?;
        self.handle = Some(handle);
        Ok(())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            match handle.join() {
                Ok(tally) => self.tally = tally?,
                Err(_) => bail!("the slow thread panicked"),
            }
        }
        Ok(())
    }
}

/// One slow client's socket and what became of it.
struct Slow {
    stream: TcpStream,
    /// What was read past `connected` (frames the gateway wrote with it,
    /// in one write or one read): `resume` goes on from there, not from
    /// the middle of a frame.
    messages: Messages,
    /// Seconds from t0 when it left ESTABLISHED, if it did.
    left_established_s: Option<f64>,
}

async fn slow_thread(plan: SlowPlan, stop: Arc<AtomicBool>) -> SlowTally {
    let plan = Rc::new(plan);
    let tally =
        Rc::new(RefCell::new(SlowTally { slow_clients: plan.tokens.len() as u32, ..SlowTally::default() }));
    let setups: Vec<_> = (0..plan.tokens.len())
        .map(|i| {
            let plan = plan.clone();
            monoio::spawn(async move { set_up(&plan, i).await })
        })
        .collect();
    let mut slow = Vec::with_capacity(setups.len());
    for setup in setups {
        match setup.await {
            Ok((stream, messages)) => slow.push(Slow { stream, messages, left_established_s: None }),
            Err(kind) => *tally.borrow_mut().setup_errors.entry(kind).or_default() += 1,
        }
    }
    tally.borrow_mut().stopped_reading = slow.len() as u32;

    // Not reading; watching.
    while !stop.load(Ordering::Acquire) {
        for s in slow.iter_mut().filter(|s| s.left_established_s.is_none()) {
            if tcp_state(s.stream.as_raw_fd()).is_some_and(|state| state != TCP_ESTABLISHED) {
                s.left_established_s = Some(mono_ns().saturating_sub(plan.t0) as f64 / 1e9);
            }
        }
        monoio::time::sleep(STATE_POLL).await;
    }
    let times: Vec<f64> = slow.iter().filter_map(|s| s.left_established_s).collect();
    {
        let mut tally = tally.borrow_mut();
        tally.closed_during_run = times.len() as u32;
        tally.first_close_s = times.iter().copied().reduce(f64::min);
        tally.last_close_s = times.iter().copied().reduce(f64::max);
    }

    // Reading again, all at once, to learn how each ended.
    let resumes: Vec<_> = slow
        .into_iter()
        .map(|s| {
            let timeout = plan.resume_timeout;
            monoio::spawn(async move { resume(s.stream, s.messages, timeout).await })
        })
        .collect();
    for resume in resumes {
        let (ending, frames) = resume.await;
        let mut tally = tally.borrow_mut();
        *tally.endings.entry(ending).or_default() += 1;
        tally.frames_read_on_resume += frames;
    }
    Rc::try_unwrap(tally).map(RefCell::into_inner).unwrap_or_default()
}

/// Connects slow client `i` with its small receive buffer, signs in as its
/// agent's device and reads up to its `connected`: then it is a session the
/// gateway sends the agent's traffic to.
async fn set_up(plan: &SlowPlan, i: usize) -> Result<(TcpStream, Messages), String> {
    let source = (!plan.sources.is_empty()).then(|| plan.sources[i % plan.sources.len()]);
    let attempt = async {
        let mut stream = ws::connect_with(plan.url.addr, source, Some(plan.rcvbuf_bytes))
            .await
            .map_err(|e| format!("connect: {}", ws::errno_name(&e)))?;
        let leftover = ws::handshake(&mut stream, &plan.url, Some(Codec::Json.subprotocol()))
            .await
            .map_err(|e| format!("handshake: {e:#}"))?;
        let connect = format!(r#"{{"type":"connect","id":1,"token":"{}"}}"#, plan.tokens[i]);
        let mut frame = Vec::new();
        ws::encode_frame(&mut frame, true, ws::OP_TEXT, connect.as_bytes(), rand::random());
        let (result, _) = stream.write_all(frame).await;
        result.map_err(|e| format!("write: {}", ws::errno_name(&e)))?;
        let mut messages = Messages::new(leftover);
        loop {
            match messages.next(&mut stream).await? {
                Message::Data(bytes) => match Codec::Json.decode_server(&bytes).map(|f| f.body) {
                    Ok(Event::Connected { .. }) => return Ok((stream, messages)),
                    Ok(Event::Error { code, .. }) => return Err(format!("connect: {code}")),
                    _ => {}
                },
                Message::Close(code) => return Err(format!("closed at setup: {code}")),
            }
        }
    };
    match monoio::time::timeout(plan.connect_timeout + plan.reply_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err("timeout".into()),
    }
}

/// Reads everything a slow client had left unread, up to the gateway's
/// close: how the connection ended, and how many frames came first.
async fn resume(mut stream: TcpStream, mut messages: Messages, limit: Duration) -> (String, u64) {
    let mut frames = 0u64;
    let deadline = monoio::time::Instant::now() + limit;
    loop {
        match monoio::time::timeout_at(deadline, messages.next(&mut stream)).await {
            Err(_) => return ("still open".into(), frames),
            Ok(Err(how)) => return (how, frames),
            Ok(Ok(Message::Close(code))) => return (code, frames),
            Ok(Ok(Message::Data(_))) => frames += 1,
        }
    }
}

/// A whole server message, or its close (the code, as text).
enum Message {
    Data(Vec<u8>),
    Close(String),
}

/// Whole server messages from a stream, read as needed.
struct Messages {
    reader: FrameReader,
    pending: Vec<u8>,
    ready: std::collections::VecDeque<Message>,
    message: Vec<u8>,
    control: Vec<u8>,
    opcode: u8,
}

impl Messages {
    fn new(leftover: Vec<u8>) -> Self {
        Self {
            reader: FrameReader::new(),
            pending: leftover,
            ready: Default::default(),
            message: Vec::new(),
            control: Vec::new(),
            opcode: 0,
        }
    }

    /// The next message; Err: how the stream ended without a close frame
    /// (`eof`, an errno, a protocol error).
    async fn next(&mut self, stream: &mut TcpStream) -> Result<Message, String> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Ok(message);
            }
            if self.pending.is_empty() {
                let (result, buf) = stream.read(Vec::with_capacity(16 * 1024)).await;
                match result {
                    Ok(0) => return Err("eof".into()),
                    Ok(_) => self.pending = buf,
                    Err(e) => return Err(ws::errno_name(&e)),
                }
            }
            let Self { reader, pending, ready, message, control, opcode } = self;
            let mut too_big = false;
            let parsed = reader.feed(pending, |event| match event {
                ws::Event::Start(header) => {
                    *opcode = header.opcode;
                    if header.opcode >= ws::OP_CLOSE {
                        control.clear();
                    } else if header.opcode != ws::OP_CONTINUATION {
                        message.clear();
                    }
                }
                ws::Event::Payload(bytes) if *opcode >= ws::OP_CLOSE => control.extend_from_slice(bytes),
                ws::Event::Payload(bytes) => {
                    too_big |= message.len() + bytes.len() > MESSAGE_BYTES_MAX;
                    if !too_big {
                        message.extend_from_slice(bytes);
                    }
                }
                ws::Event::End(header) if header.opcode == ws::OP_CLOSE => {
                    ready.push_back(Message::Close(match control.get(..2) {
                        Some(code) => u16::from_be_bytes([code[0], code[1]]).to_string(),
                        None => "close without code".into(),
                    }));
                }
                ws::Event::End(header) if header.fin && header.opcode < ws::OP_CLOSE => {
                    ready.push_back(Message::Data(std::mem::take(message)));
                }
                // Pings go unanswered: a slow client does not read them in
                // time anyway.
                ws::Event::End(_) => {}
            });
            pending.clear();
            parsed.map_err(|e| format!("protocol: {e}"))?;
            if too_big {
                return Err(format!("server message over {MESSAGE_BYTES_MAX} bytes"));
            }
        }
    }
}

/// The TCP state of socket `fd` (`tcpi_state`), if it can be read.
fn tcp_state(fd: RawFd) -> Option<u8> {
    // `tcpi_state` is the first byte of struct tcp_info; the kernel copies
    // at most the length it is given.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `fd` is an open socket borrowed from a live stream; `info`
    // and `len` are live locals, and `len` is `info`'s exact size, so the
    // kernel writes only within it.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &raw mut len)
    };
    (rc == 0 && len >= 1).then_some(info[0])
}

/// `kefu-bench slow`.
pub fn run(args: SlowArgs, out: &Output) -> anyhow::Result<()> {
    let (chat_args, checks) = (args.chat.clone(), args.checks.clone());
    let mut load = SlowLoad::new(args);
    let pair = abuse::run_pair(&chat_args, &checks, &mut load)?;
    let tally = &load.tally;
    let mut all = abuse::common_checks(&pair, &checks);
    all.extend(slow_checks(tally, &pair));
    eprintln!(
        "slow: {}/{} slow clients stopped reading; {} seen closed during the run (first at {:?} s, last at {:?} s); \
         endings on resume {:?} after {} frames",
        tally.stopped_reading,
        tally.slow_clients,
        tally.closed_during_run,
        tally.first_close_s,
        tally.last_close_s,
        tally.endings,
        tally.frames_read_on_resume
    );
    abuse::conclude("slow", &pair, tally, &all, out)
}

/// Endings that mean the gateway closed the connection.
fn closed_by_gateway(ending: &str) -> bool {
    matches!(ending, "4001" | "eof" | "ECONNRESET")
}

fn slow_checks(tally: &SlowTally, pair: &abuse::Pair) -> Vec<Check> {
    let closed: u64 = tally.endings.iter().filter(|(e, _)| closed_by_gateway(e)).map(|(_, n)| n).sum();
    let with_4001 = tally.endings.get("4001").copied().unwrap_or(0);
    // The gateway's own count says the closes were 4001 even when the
    // close frame itself could not get through the full socket.
    let gateway_4001 = pair.gateway_closes.as_ref().map(|c| c.get("slow_consumer").copied().unwrap_or(0));
    let stopped = u64::from(tally.stopped_reading);
    vec![
        Check::new(
            "slow clients stopped reading",
            tally.slow_clients > 0 && tally.stopped_reading == tally.slow_clients,
            format!(
                "{}/{}; setup errors {:?}",
                tally.stopped_reading, tally.slow_clients, tally.setup_errors
            ),
        ),
        Check::new(
            "slow clients cut off by the gateway",
            closed == stopped,
            format!(
                "{closed}/{stopped} ({with_4001} with a 4001 frame read on resume), endings {:?}",
                tally.endings
            ),
        ),
        Check::new(
            "slow consumer closes counted (kefu_slow_consumer_closes_total)",
            gateway_4001.is_none_or(|n| n >= stopped),
            format!(
                "the gateway counted {} for {stopped} slow clients",
                gateway_4001.map_or("? (no --admin)".into(), |n| n.to_string())
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gateways_doing_counts_as_closed() {
        for ending in ["4001", "eof", "ECONNRESET"] {
            assert!(closed_by_gateway(ending), "{ending}");
        }
        for ending in ["still open", "1001", "4000", "protocol: reserved opcode 0x3"] {
            assert!(!closed_by_gateway(ending), "{ending}");
        }
    }

    #[test]
    fn a_socket_has_a_tcp_state() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        assert_eq!(tcp_state(client.as_raw_fd()), Some(TCP_ESTABLISHED));
        let (server, _) = listener.accept().expect("accept");
        drop(server);
        // The FIN arrives: CLOSE_WAIT.
        let deadline = mono_ns() + 2_000_000_000;
        while tcp_state(client.as_raw_fd()) == Some(TCP_ESTABLISHED) && mono_ns() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(tcp_state(client.as_raw_fd()), Some(TCP_ESTABLISHED));
    }
}
