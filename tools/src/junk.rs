//! `kefu-bench junk`: does the gateway keep serving honest clients while
//! others flood it with garbage?
//!
//! The honest load is `chat`'s (visitors and agents with tokens, open-loop
//! sends, delivery and ack timed); it runs clean, then again beside
//! `--junk-connections` connections that send `--junk-frames` frames of
//! junk, spread evenly over the honest load's warmup and window
//! (`abuse.rs` compares the two runs).
//!
//! # The junk
//!
//! A junk connection lives in episodes. Three in four sign in (`connect`
//! with a visitor token this tool signs: it has no conversation of its own)
//! and then send junk the gateway must answer without closing: garbage and
//! non-object JSON, no or an unknown `type`, an event's type, missing
//! fields, wrong types, malformed conversation ids, `send`, `history` and
//! `accept` to conversations that are not its own, a second `connect`, a
//! binary frame on the JSON subprotocol, a text over the size limit. About
//! one frame in `--fatal-every` is one that must close the connection: bad
//! UTF-8 (1007), a message whose header says it is too big (1009), RSV
//! bits, an unmasked frame, a reserved opcode, a continuation with nothing
//! to continue, a control frame too long or fragmented, a close with an
//! invalid code (1002). The fourth episode sends, before `connect`, a
//! command (4500), a message over the unauthenticated size limit (1009) or
//! an unmasked frame (1002). After a frame that must close, the connection
//! waits for the gateway's close (at most `--close-wait-ms`), hangs up and
//! connects again, so the junk keeps coming.
//!
//! # What is counted and checked
//!
//! Junk frames sent by kind; every close the gateway made, by code, and per
//! kind of the frame that caused it; error replies by code. Checked, besides
//! the common checks: every frame that must close did close, with its code;
//! no junk connection was closed without such a frame; and no junk
//! connection received a frame of someone else's conversation (`msg`,
//! `history`, `ack`, …): a junk visitor has none, so anything but errors,
//! `connected` and `pong` is a leak.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};
use kefu_proto::{Codec, Event, Role};
use monoio::{
    io::{AsyncReadRent as _, AsyncWriteRent as _, AsyncWriteRentExt as _, OwnedReadHalf, Splitable as _},
    net::TcpStream,
};
use rand::Rng as _;
use serde::Serialize;

use crate::{
    abuse::{self, Check, CheckArgs},
    chat::{self, Beside, ChatArgs, LoadStart, mono_ns},
    echo::{TaskRun, build_runtime},
    report::Output,
    ws::{self, FrameReader, WsUrl},
};

/// How far a junk connection's schedule may fall behind (while it waited
/// for a close or reconnected) before the lost time is given up rather
/// than made up in a burst.
const LAG_NS_MAX: u64 = 1_000_000_000;

/// Length a too-big message's header claims after `connect`: far above any
/// sane `limits.max_message_bytes`.
const OVERSIZED_BYTES: u64 = 64 << 20;

/// Length a message's header claims before `connect`: above the default
/// `limits.unauthenticated_message_bytes_max` (32 KiB), below the frame
/// limit, so only the unauthenticated bound can refuse it.
const OVERSIZED_BEFORE_CONNECT_BYTES: u64 = 40 * 1024;

/// Text of the too-large `send`: above `messages.max_text_bytes` (16 KiB),
/// far below the frame limit, so it is a `too_large` reply, not a close.
const TEXT_TOO_LARGE_BYTES: usize = 17 * 1024;

/// Pause after a failed connect, and the step of the final wait for readers.
const PAUSE: Duration = Duration::from_millis(100);

/// Arguments of `kefu-bench junk`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example (tools/bench-abuse.sh does all of it):
    kefu-bench junk --url ws://127.0.0.1:9211/ws --data DIR --visitors 1000 --agents 10 --visitor-tokens \\
        --rate 2000 --duration 10 --warmup 2 --sources 127.0.0.1,127.0.0.2 \\
        --junk-connections 1000 --junk-frames 500000 --junk-sources 127.0.0.3,127.0.0.4 \\
        --admin 127.0.0.1:9212 --server-pid PID --cpu 1")]
pub struct JunkArgs {
    #[command(flatten)]
    pub chat: ChatArgs,

    #[command(flatten)]
    pub checks: CheckArgs,

    /// Junk connections open at once; each reconnects when closed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub junk_connections: u32,

    /// Junk frames in all, spread evenly over the honest load's warmup and
    /// window (fewer if the time runs out first).
    #[arg(long, default_value_t = 500_000)]
    pub junk_frames: u64,

    /// On a signed-in junk connection, about one frame in this many is one
    /// that must close the connection.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub fatal_every: u32,

    /// Source addresses of the junk connections, round-robin (default: the
    /// honest clients' --sources).
    #[arg(long, value_delimiter = ',')]
    pub junk_sources: Vec<IpAddr>,

    /// Client threads of the junk load (on the --cpu list, like the
    /// honest ones).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub junk_threads: u16,

    /// Bound on the wait for the gateway's close after a frame that must
    /// close the connection, milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub close_wait_ms: u64,

    /// What a junk connection does when its connect is refused with 429
    /// (the gateway's per-address handshake limit): `wait` the response's
    /// `Retry-After`, or `hammer`, trying again after 100 ms. Hammering
    /// floods the handshake path too, and on a 2-core host its refused
    /// handshakes (~8,500/s) take most of the client's core, which then
    /// delays the honest clients it shares that core with.
    #[arg(long, value_enum, default_value_t = On429::Wait)]
    pub junk_on_429: On429,
}

/// A junk connection's answer to a refused reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum On429 {
    /// Wait the `Retry-After` the gateway gave (with up to 10% jitter).
    Wait,
    /// Try again after 100 ms.
    Hammer,
}

/// One kind of junk frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    // Answered with an error; the connection stays open.
    GarbageJson,
    NotAnObject,
    NoType,
    UnknownType,
    EventType,
    MissingField,
    WrongType,
    BadConvId,
    ForeignSend,
    ForeignHistory,
    AgentOnly,
    SecondConnect,
    BinaryOnJson,
    TextTooLarge,
    // Close the connection.
    BadUtf8,
    Oversized,
    ReservedBits,
    Unmasked,
    ReservedOpcode,
    OrphanContinuation,
    LongControl,
    FragmentedControl,
    BadCloseCode,
    CommandBeforeConnect,
    OversizedBeforeConnect,
}

/// Junk a signed-in connection sends that the gateway must answer.
const ANSWERED: [Kind; 14] = [
    Kind::GarbageJson,
    Kind::NotAnObject,
    Kind::NoType,
    Kind::UnknownType,
    Kind::EventType,
    Kind::MissingField,
    Kind::WrongType,
    Kind::BadConvId,
    Kind::ForeignSend,
    Kind::ForeignHistory,
    Kind::AgentOnly,
    Kind::SecondConnect,
    Kind::BinaryOnJson,
    Kind::TextTooLarge,
];

/// Junk that must close a signed-in connection.
const FATAL: [Kind; 9] = [
    Kind::BadUtf8,
    Kind::Oversized,
    Kind::ReservedBits,
    Kind::Unmasked,
    Kind::ReservedOpcode,
    Kind::OrphanContinuation,
    Kind::LongControl,
    Kind::FragmentedControl,
    Kind::BadCloseCode,
];

/// Junk that must close a connection before its `connect`.
const FATAL_BEFORE_CONNECT: [Kind; 3] =
    [Kind::CommandBeforeConnect, Kind::OversizedBeforeConnect, Kind::Unmasked];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::GarbageJson => "garbage_json",
            Kind::NotAnObject => "not_an_object",
            Kind::NoType => "no_type",
            Kind::UnknownType => "unknown_type",
            Kind::EventType => "event_type",
            Kind::MissingField => "missing_field",
            Kind::WrongType => "wrong_type",
            Kind::BadConvId => "bad_conv_id",
            Kind::ForeignSend => "foreign_send",
            Kind::ForeignHistory => "foreign_history",
            Kind::AgentOnly => "agent_only",
            Kind::SecondConnect => "second_connect",
            Kind::BinaryOnJson => "binary_on_json",
            Kind::TextTooLarge => "text_too_large",
            Kind::BadUtf8 => "bad_utf8",
            Kind::Oversized => "oversized",
            Kind::ReservedBits => "reserved_bits",
            Kind::Unmasked => "unmasked",
            Kind::ReservedOpcode => "reserved_opcode",
            Kind::OrphanContinuation => "orphan_continuation",
            Kind::LongControl => "long_control",
            Kind::FragmentedControl => "fragmented_control",
            Kind::BadCloseCode => "bad_close_code",
            Kind::CommandBeforeConnect => "command_before_connect",
            Kind::OversizedBeforeConnect => "oversized_before_connect",
        }
    }

    /// The close code docs/protocol.md gives this frame; `None`: answered,
    /// not closed.
    fn close_code(self) -> Option<u16> {
        match self {
            Kind::BadUtf8 => Some(1007),
            Kind::Oversized | Kind::OversizedBeforeConnect => Some(1009),
            Kind::ReservedBits
            | Kind::Unmasked
            | Kind::ReservedOpcode
            | Kind::OrphanContinuation
            | Kind::LongControl
            | Kind::FragmentedControl
            | Kind::BadCloseCode => Some(1002),
            Kind::CommandBeforeConnect => Some(4500),
            _ => None,
        }
    }

    /// Appends this junk frame to `out`. `conv` is a conversation id that
    /// is not the sender's (an honest one, most likely).
    fn encode(self, out: &mut Vec<u8>, mask: [u8; 4], conv: u64) {
        let text =
            |out: &mut Vec<u8>, json: &str| ws::encode_frame(out, true, ws::OP_TEXT, json.as_bytes(), mask);
        match self {
            Kind::GarbageJson => text(out, r#"{"type":"send","conv":"c1","cid":"#),
            Kind::NotAnObject => text(out, "[1,2,3]"),
            Kind::NoType => text(out, r#"{"id":1,"conv":"c1"}"#),
            Kind::UnknownType => text(out, r#"{"type":"frobnicate","id":2}"#),
            Kind::EventType => text(out, r#"{"type":"ack","id":3,"cid":"x","conv":"c1","seq":1,"ts":0}"#),
            Kind::MissingField => text(out, r#"{"type":"send","id":4,"conv":"c1"}"#),
            Kind::WrongType => text(out, r#"{"type":"read","id":5,"conv":"c1","seq":"1"}"#),
            Kind::BadConvId => text(out, r#"{"type":"typing","id":6,"conv":"x1"}"#),
            Kind::ForeignSend => text(
                out,
                &format!(r#"{{"type":"send","id":7,"conv":"c{conv}","cid":"junk-{conv}","text":"junk"}}"#),
            ),
            Kind::ForeignHistory => {
                text(out, &format!(r#"{{"type":"history","id":8,"conv":"c{conv}","limit":200}}"#))
            }
            Kind::AgentOnly => text(out, &format!(r#"{{"type":"accept","id":9,"conv":"c{conv}"}}"#)),
            Kind::SecondConnect => text(out, r#"{"type":"connect","id":10}"#),
            Kind::BinaryOnJson => ws::encode_frame(out, true, ws::OP_BINARY, b"\x00\x01junk", mask),
            Kind::TextTooLarge => {
                let mut json = format!(r#"{{"type":"send","id":11,"conv":"c{conv}","cid":"big","text":""#);
                json.extend(std::iter::repeat_n('a', TEXT_TOO_LARGE_BYTES));
                json.push_str("\"}");
                text(out, &json);
            }
            Kind::BadUtf8 => {
                ws::encode_frame(out, true, ws::OP_TEXT, b"{\"type\":\"ping\",\"x\":\"\xc3\x28\"}", mask)
            }
            Kind::Oversized => raw_frame(out, 0x81, Some(mask), OVERSIZED_BYTES, b"{\"type\":\"send\""),
            Kind::OversizedBeforeConnect => {
                raw_frame(out, 0x81, Some(mask), OVERSIZED_BEFORE_CONNECT_BYTES, b"{\"type\":\"connect\"")
            }
            // FIN + RSV1 + text: no extension was negotiated.
            Kind::ReservedBits => raw_frame(out, 0xC1, Some(mask), 15, b"{\"type\":\"ping\"}"),
            Kind::Unmasked => raw_frame(out, 0x81, None, 15, b"{\"type\":\"ping\"}"),
            Kind::ReservedOpcode => raw_frame(out, 0x83, Some(mask), 4, b"junk"),
            Kind::OrphanContinuation => raw_frame(out, 0x80, Some(mask), 4, b"junk"),
            Kind::LongControl => raw_frame(out, 0x89, Some(mask), 200, &[b'p'; 200]),
            Kind::FragmentedControl => raw_frame(out, 0x09, Some(mask), 4, b"junk"),
            // 999 is below the codes RFC 6455 §7.4 lets a close carry.
            Kind::BadCloseCode => raw_frame(out, 0x88, Some(mask), 2, &999u16.to_be_bytes()),
            Kind::CommandBeforeConnect => {
                text(out, r#"{"type":"send","id":1,"conv":"c1","cid":"early","text":"hi"}"#)
            }
        }
    }
}

/// Appends a frame built by hand: first byte `first` (FIN, RSV, opcode as
/// given), a header claiming `declared` payload bytes, masked with `mask`
/// if given, and then `payload` (which may be shorter than declared).
fn raw_frame(out: &mut Vec<u8>, first: u8, mask: Option<[u8; 4]>, declared: u64, payload: &[u8]) {
    out.push(first);
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match declared {
        // The casts are exact: each arm bounds the length.
        n @ 0..=125 => out.push(masked | n as u8),
        n @ 126..=0xFFFF => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        }
        None => out.extend_from_slice(payload),
    }
}

/// What the junk load saw; one JSON object in the report.
#[derive(Debug, Default, Serialize)]
pub struct JunkTally {
    pub connections_asked: u32,
    /// Junk frames written, in all and by kind.
    pub frames_sent: u64,
    pub frames_by_kind: BTreeMap<String, u64>,
    /// Upgrades that succeeded (episodes).
    pub connections: u64,
    /// Connects or upgrades that failed, by kind (an HTTP status shows
    /// here: a refused upgrade is not junk's business).
    pub open_errors: BTreeMap<String, u64>,
    /// How junk connections ended, by the gateway's close code, or `eof` /
    /// an errno when there was no close frame.
    pub closes: BTreeMap<String, u64>,
    /// The same, by the kind of frame that should have closed it.
    pub closes_by_kind: BTreeMap<String, BTreeMap<String, u64>>,
    /// Frames that should have closed the connection, with another close
    /// code: "kind: code".
    pub wrong_closes: BTreeMap<String, u64>,
    /// Frames that should have closed the connection, still open after
    /// --close-wait-ms, by kind.
    pub unclosed: BTreeMap<String, u64>,
    /// Closes (by code) of connections that had sent no frame that should
    /// close them.
    pub closed_unprovoked: BTreeMap<String, u64>,
    /// Error replies, by code.
    pub error_codes: BTreeMap<String, u64>,
    /// Frames a junk visitor must never get (someone's conversation), by
    /// type.
    pub leaked: BTreeMap<String, u64>,
    /// Writes that failed before a close was seen, by errno.
    pub write_errors: BTreeMap<String, u64>,
}

impl JunkTally {
    fn merge(&mut self, other: JunkTally) {
        self.frames_sent += other.frames_sent;
        self.connections += other.connections;
        for (mine, theirs) in [
            (&mut self.frames_by_kind, other.frames_by_kind),
            (&mut self.open_errors, other.open_errors),
            (&mut self.closes, other.closes),
            (&mut self.wrong_closes, other.wrong_closes),
            (&mut self.unclosed, other.unclosed),
            (&mut self.closed_unprovoked, other.closed_unprovoked),
            (&mut self.error_codes, other.error_codes),
            (&mut self.leaked, other.leaked),
            (&mut self.write_errors, other.write_errors),
        ] {
            add_all(mine, theirs);
        }
        for (kind, closes) in other.closes_by_kind {
            add_all(self.closes_by_kind.entry(kind).or_default(), closes);
        }
    }
}

fn add_all(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_owned()).or_default() += 1;
}

/// What every junk thread needs; built at start, shared read-only.
struct JunkPlan {
    url: WsUrl,
    sources: Vec<IpAddr>,
    /// A visitor token per junk connection.
    tokens: Vec<String>,
    /// Conversation ids are drawn from 1..=this (mostly honest ones).
    conv_max: u64,
    fatal_every: u32,
    connections: usize,
    /// One junk connection's frames are this far apart, ns.
    interval_ns: u64,
    t0: u64,
    send_end: u64,
    frames_max: u64,
    connect_timeout: Duration,
    close_wait: Duration,
    /// What a refused reconnect does.
    on_429: On429,
}

/// Shared by the junk threads and the chat's driver.
#[derive(Default)]
struct JunkGlobal {
    stop: AtomicBool,
    /// Frames taken from the --junk-frames budget.
    taken: AtomicU64,
}

impl JunkGlobal {
    /// Takes one frame from the budget; false once it is spent.
    fn take(&self, max: u64) -> bool {
        self.taken.fetch_add(1, Ordering::AcqRel) < max
    }
}

/// The junk load as a [`Beside`] of the chat.
pub struct JunkLoad {
    args: JunkArgs,
    global: Arc<JunkGlobal>,
    handles: Vec<JoinHandle<anyhow::Result<JunkTally>>>,
    tally: JunkTally,
}

impl JunkLoad {
    pub fn new(args: JunkArgs) -> Self {
        let tally = JunkTally { connections_asked: args.junk_connections, ..JunkTally::default() };
        Self { args, global: Arc::new(JunkGlobal::default()), handles: Vec::new(), tally }
    }
}

impl Beside for JunkLoad {
    fn start(&mut self, load: &LoadStart<'_>) -> anyhow::Result<()> {
        let args = &self.args;
        let url = WsUrl::parse(&args.chat.client.url, args.chat.client.allow_non_loopback)?;
        let sources = if args.junk_sources.is_empty() {
            args.chat.client.sources.clone()
        } else {
            args.junk_sources.clone()
        };
        if let Some(source) =
            sources.iter().find(|s| !args.chat.client.allow_non_loopback && !s.is_loopback())
        {
            bail!("junk source {source} is not a loopback address");
        }
        let tokens = chat::sign_tokens(load.secret, Role::Visitor, args.junk_connections, None)?;
        let seconds = (load.send_end - load.t0) as f64 / 1e9;
        let rate = args.junk_frames as f64 / seconds;
        let connections = args.junk_connections as usize;
        eprintln!(
            "junk: {connections} connections, {} frames over {seconds:.1} s ({rate:.0}/s), one in ~{} closing",
            args.junk_frames, args.fatal_every
        );
        let plan = Arc::new(JunkPlan {
            url,
            sources,
            tokens,
            conv_max: 2 * u64::from(args.chat.visitors),
            fatal_every: args.fatal_every,
            connections,
            interval_ns: (connections as f64 * 1e9 / rate.max(1e-3)) as u64,
            t0: load.t0,
            send_end: load.send_end,
            frames_max: args.junk_frames,
            connect_timeout: Duration::from_millis(args.chat.client.connect_timeout_ms),
            close_wait: Duration::from_millis(args.close_wait_ms),
            on_429: args.junk_on_429,
        });
        let threads = usize::from(args.junk_threads);
        for thread in 0..threads {
            let indices: Vec<usize> = (0..connections).filter(|i| i % threads == thread).collect();
            let cpu = (!args.chat.client.cpu.is_empty())
                .then(|| args.chat.client.cpu[thread % args.chat.client.cpu.len()]);
            let (plan, global) = (plan.clone(), self.global.clone());
            let ring_entries = args.chat.client.ring_entries;
            let handle = std::thread::Builder::new()
                .name(format!("junk-{thread}"))
                .spawn(move || -> anyhow::Result<JunkTally> {
                    let mut runtime = build_runtime(cpu, ring_entries, TaskRun::Defer)?;
                    Ok(runtime.block_on(junk_thread(plan, global, indices)))
                })
                .context("spawning a junk thread")?;
            self.handles.push(handle);
        }
        Ok(())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        // The junk stopped at the end of the chat's sends; connections that
        // sent a closing frame just before are still waiting for their
        // close. Let them have it (a bounded wait) before cutting the wait
        // short, or the closes of the last second go uncounted.
        let deadline = mono_ns() + (self.args.close_wait_ms + 1_000) * 1_000_000;
        while self.handles.iter().any(|h| !h.is_finished()) && mono_ns() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.global.stop.store(true, Ordering::Release);
        for handle in self.handles.drain(..) {
            match handle.join() {
                Ok(tally) => self.tally.merge(tally?),
                Err(_) => bail!("a junk thread panicked"),
            }
        }
        Ok(())
    }
}

/// One junk thread's state, shared by its tasks.
struct JunkThread {
    plan: Arc<JunkPlan>,
    global: Arc<JunkGlobal>,
    tally: RefCell<JunkTally>,
    /// Reader tasks still running.
    readers: Cell<usize>,
}

impl JunkThread {
    /// The chat has drained: nothing more is waited for.
    fn stopped(&self) -> bool {
        self.global.stop.load(Ordering::Acquire)
    }

    /// No more junk: the run is over or stopping.
    fn over(&self) -> bool {
        self.global.stop.load(Ordering::Acquire) || mono_ns() >= self.plan.send_end
    }
}

async fn junk_thread(plan: Arc<JunkPlan>, global: Arc<JunkGlobal>, indices: Vec<usize>) -> JunkTally {
    let state = Rc::new(JunkThread { plan, global, tally: RefCell::default(), readers: Cell::new(0) });
    let tasks: Vec<_> =
        indices.into_iter().map(|index| monoio::spawn(junk_connection(state.clone(), index))).collect();
    for task in tasks {
        task.await;
    }
    // Readers end once the gateway answers the hang-ups; bounded all the same.
    let deadline = mono_ns() + 2_000_000_000;
    while state.readers.get() > 0 && mono_ns() < deadline {
        monoio::time::sleep(PAUSE).await;
    }
    state.tally.take()
}

/// What a reader saw of the gateway's end of one connection.
#[derive(Default)]
struct Ending {
    /// The close code, or `eof` / an errno: set once the connection ended.
    how: RefCell<Option<String>>,
}

/// One junk connection, episode after episode, until the run is over.
async fn junk_connection(state: Rc<JunkThread>, index: usize) {
    let plan = state.plan.clone();
    let mask: [u8; 4] = rand::random();
    let mut due = plan.t0 + plan.interval_ns * index as u64 / plan.connections as u64;
    let mut episode = 0u64;
    let mut buf = Vec::new();
    while !state.over() {
        let source = (!plan.sources.is_empty()).then(|| plan.sources[index % plan.sources.len()]);
        let (stream, leftover) =
            match ws::open(&plan.url, source, Some(Codec::Json.subprotocol()), plan.connect_timeout).await {
                Ok(opened) => opened,
                Err(kind) => {
                    bump(&mut state.tally.borrow_mut().open_errors, &short(&kind));
                    // A Retry-After is obeyed within reason: never sooner than
                    // a hammer would, never past the end of the run (whose
                    // stop waits for this thread).
                    let left = Duration::from_nanos(plan.send_end.saturating_sub(mono_ns()));
                    let pause = match (plan.on_429, ws::retry_after(&kind)) {
                        (On429::Wait, Some(after)) => {
                            after.min(left).mul_f64(1.0 + rand::rng().random_range(0.0..0.1)).max(PAUSE)
                        }
                        _ => PAUSE,
                    };
                    monoio::time::sleep(pause).await;
                    continue;
                }
            };
        state.tally.borrow_mut().connections += 1;
        let (read, mut write) = stream.into_split();
        let ending = Rc::new(Ending::default());
        state.readers.set(state.readers.get() + 1);
        monoio::spawn(read_replies(read, leftover, ending.clone(), state.clone()));

        let signed_in = episode % 4 != 3;
        episode += 1;
        let answered = if signed_in {
            let connect = format!(r#"{{"type":"connect","id":0,"token":"{}"}}"#, plan.tokens[index]);
            buf.clear();
            ws::encode_frame(&mut buf, true, ws::OP_TEXT, connect.as_bytes(), mask);
            // Mean fatal_every frames per episode, the last one fatal.
            rand::rng().random_range(0..2 * plan.fatal_every as u64 - 1)
        } else {
            0
        };
        let mut sent = 0u64;
        let mut fatal = None;
        loop {
            if ending.how.borrow().is_some() || state.over() {
                break;
            }
            let now = mono_ns();
            due = due.max(now.saturating_sub(LAG_NS_MAX));
            if due > now {
                monoio::time::sleep(Duration::from_nanos(due - now)).await;
                if ending.how.borrow().is_some() || state.over() {
                    break;
                }
            }
            due += plan.interval_ns;
            if !state.global.take(plan.frames_max) {
                break;
            }
            let mut rng = rand::rng();
            let kind = match (signed_in, sent >= answered) {
                (true, false) => ANSWERED[rng.random_range(0..ANSWERED.len())],
                (true, true) => FATAL[rng.random_range(0..FATAL.len())],
                (false, _) => FATAL_BEFORE_CONNECT[rng.random_range(0..FATAL_BEFORE_CONNECT.len())],
            };
            // The first frame rides with the connect (already in `buf`).
            if sent > 0 || !signed_in {
                buf.clear();
            }
            kind.encode(&mut buf, mask, rng.random_range(1..=plan.conv_max));
            let (result, back) = write.write_all(std::mem::take(&mut buf)).await;
            buf = back;
            if let Err(e) = result {
                // The gateway may have closed already (reset): its close,
                // if it sent one, is the reader's to report.
                if ending.how.borrow().is_none() {
                    bump(&mut state.tally.borrow_mut().write_errors, &ws::errno_name(&e));
                }
                break;
            }
            sent += 1;
            {
                let mut tally = state.tally.borrow_mut();
                tally.frames_sent += 1;
                bump(&mut tally.frames_by_kind, kind.name());
            }
            if kind.close_code().is_some() {
                fatal = Some(kind);
                break;
            }
        }
        if fatal.is_some() {
            let deadline = mono_ns() + plan.close_wait.as_nanos() as u64;
            while ending.how.borrow().is_none() && mono_ns() < deadline && !state.stopped() {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        settle(&state, fatal, &ending);
        // Hang up: the gateway waits for it after its close.
        let _ = write.shutdown().await;
    }
}

/// Counts how one episode ended.
fn settle(state: &JunkThread, fatal: Option<Kind>, ending: &Ending) {
    let how = ending.how.borrow().clone();
    let mut tally = state.tally.borrow_mut();
    if let Some(how) = &how {
        bump(&mut tally.closes, how);
    }
    match (fatal, how) {
        (Some(kind), Some(how)) => {
            bump(tally.closes_by_kind.entry(kind.name().to_owned()).or_default(), &how);
            let expected = kind.close_code().map(|c| c.to_string());
            if expected.as_deref() != Some(how.as_str()) {
                bump(&mut tally.wrong_closes, &format!("{}: {how}", kind.name()));
            }
        }
        // Not closed within --close-wait-ms (a wait the end of the run cut
        // short does not count).
        (Some(kind), None) if !state.stopped() => bump(&mut tally.unclosed, kind.name()),
        (Some(_), None) => {}
        // The run ended, or the budget ran out, with the connection open.
        (None, None) => {}
        (None, Some(how)) => {
            // Our own hang-up after a failed write is not the gateway's doing.
            if !state.over() {
                bump(&mut tally.closed_unprovoked, &how);
            }
        }
    }
}

/// Reads the gateway's replies on one junk connection until it ends:
/// counts error codes and leaks, and records the close.
async fn read_replies(
    mut read: OwnedReadHalf<TcpStream>,
    leftover: Vec<u8>,
    ending: Rc<Ending>,
    state: Rc<JunkThread>,
) {
    let mut reader = FrameReader::new();
    let mut message = Vec::new();
    let mut control = Vec::new();
    let mut opcode = 0u8;
    let mut buf = Vec::with_capacity(4096);
    let mut pending = leftover;
    let how = loop {
        if pending.is_empty() {
            // No timeout: the connection's task hangs up when it is done,
            // and the gateway's close or end of stream ends this read.
            let (result, back) = read.read(std::mem::take(&mut buf)).await;
            buf = back;
            match result {
                Ok(0) => break Some("eof".to_owned()),
                Ok(_) => pending.extend_from_slice(&buf),
                Err(e) => break Some(ws::errno_name(&e)),
            }
            buf.clear();
        }
        let mut closed = None;
        let parsed = reader.feed(&pending, |event| match event {
            ws::Event::Start(header) => {
                opcode = header.opcode;
                if header.opcode >= ws::OP_CLOSE {
                    control.clear();
                } else if header.opcode != ws::OP_CONTINUATION {
                    message.clear();
                }
            }
            ws::Event::Payload(bytes) if opcode >= ws::OP_CLOSE => control.extend_from_slice(bytes),
            ws::Event::Payload(bytes) => message.extend_from_slice(bytes),
            ws::Event::End(header) if header.opcode == ws::OP_CLOSE => {
                closed = Some(match control.get(..2) {
                    Some(code) => u16::from_be_bytes([code[0], code[1]]).to_string(),
                    None => "close without code".to_owned(),
                });
            }
            ws::Event::End(header) if header.fin && header.opcode < ws::OP_CLOSE => {
                tally_reply(&state, &message);
            }
            ws::Event::End(_) => {}
        });
        pending.clear();
        if let Err(e) = parsed {
            break Some(format!("protocol: {e}"));
        }
        if closed.is_some() {
            break closed;
        }
    };
    *ending.how.borrow_mut() = how;
    state.readers.set(state.readers.get() - 1);
}

/// Counts one reply to junk: its error code, or a leak.
fn tally_reply(state: &JunkThread, message: &[u8]) {
    let mut tally = state.tally.borrow_mut();
    // Nearly every reply is an error, and the gateway writes `type` first:
    // its code is read without decoding the frame, so that the client
    // keeps up with tens of thousands of them a second.
    if let Some(code) = error_code(message) {
        bump(&mut tally.error_codes, code);
        return;
    }
    match Codec::Json.decode_server(message) {
        Ok(frame) => match frame.body {
            Event::Error { code, .. } => bump(&mut tally.error_codes, code.as_str()),
            Event::Connected { .. } | Event::Pong => {}
            other => bump(&mut tally.leaked, other.name()),
        },
        Err(_) => bump(&mut tally.error_codes, "undecodable reply"),
    }
}

/// The `code` of an `error` frame written as the gateway writes them
/// (`{"type":"error",…,"code":"…"`); `None` for anything else.
fn error_code(message: &[u8]) -> Option<&str> {
    let rest = message.strip_prefix(br#"{"type":"error","#)?;
    let at = rest.windows(8).position(|w| w == br#""code":""#)? + 8;
    let len = rest[at..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[at..at + len]).ok()
}

/// The kind of an open error, without the details that differ each time.
fn short(kind: &str) -> String {
    kind.split(" within").next().unwrap_or(kind).chars().take(80).collect()
}

/// `kefu-bench junk`.
pub fn run(args: JunkArgs, out: &Output) -> anyhow::Result<()> {
    let (chat_args, checks) = (args.chat.clone(), args.checks.clone());
    let mut load = JunkLoad::new(args);
    let pair = abuse::run_pair(&chat_args, &checks, &mut load)?;
    let tally = &load.tally;
    let mut all = abuse::common_checks(&pair, &checks);
    all.extend(junk_checks(tally));
    eprintln!("{}", summary(tally));
    abuse::conclude("junk", &pair, tally, &all, out)
}

fn junk_checks(tally: &JunkTally) -> Vec<Check> {
    let fatal_sent: u64 = tally
        .frames_by_kind
        .iter()
        .filter(|(kind, _)| FATAL.iter().chain(&FATAL_BEFORE_CONNECT).any(|k| k.name() == kind.as_str()))
        .map(|(_, n)| n)
        .sum();
    vec![
        Check::new(
            "junk was sent",
            tally.frames_sent > 0 && fatal_sent > 0,
            format!(
                "{} frames, {fatal_sent} of them closing, over {} connections",
                tally.frames_sent, tally.connections
            ),
        ),
        Check::new(
            "junk closed with the right code",
            tally.wrong_closes.is_empty() && tally.unclosed.is_empty(),
            format!("wrong codes {:?}; not closed {:?}", tally.wrong_closes, tally.unclosed),
        ),
        Check::new(
            "no junk connection closed unprovoked",
            tally.closed_unprovoked.is_empty(),
            format!("{:?}", tally.closed_unprovoked),
        ),
        Check::new("nothing leaked to junk", tally.leaked.is_empty(), format!("{:?}", tally.leaked)),
    ]
}

fn summary(tally: &JunkTally) -> String {
    let mut s = format!(
        "junk: {} frames over {} connections ({} asked at once); closes {:?}; error replies {:?}",
        tally.frames_sent, tally.connections, tally.connections_asked, tally.closes, tally.error_codes
    );
    if !tally.open_errors.is_empty() {
        let _ = write!(s, "; open errors {:?}", tally.open_errors);
    }
    if !tally.write_errors.is_empty() {
        let _ = write!(s, "; write errors {:?}", tally.write_errors);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmasks a client frame the way the gateway reads it: (first byte,
    /// masked, declared length, payload present).
    fn parse(frame: &[u8]) -> (u8, bool, u64, Vec<u8>) {
        let masked = frame[1] & 0x80 != 0;
        let (len, mut at) = match frame[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => (u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes")), 10),
            n => (u64::from(n), 2),
        };
        let mut payload = Vec::new();
        if masked {
            let mask = &frame[at..at + 4];
            at += 4;
            payload.extend(frame[at..].iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        } else {
            payload.extend_from_slice(&frame[at..]);
        }
        (frame[0], masked, len, payload)
    }

    fn frame(kind: Kind) -> (u8, bool, u64, Vec<u8>) {
        let mut out = Vec::new();
        kind.encode(&mut out, [1, 2, 3, 4], 42);
        parse(&out)
    }

    #[test]
    fn answered_junk_is_well_framed_json_or_binary() {
        for kind in ANSWERED {
            let (first, masked, len, payload) = frame(kind);
            assert!(masked, "{kind:?}");
            assert_eq!(len, payload.len() as u64, "{kind:?}");
            assert_eq!(kind.close_code(), None, "{kind:?}");
            if kind == Kind::BinaryOnJson {
                assert_eq!(first, 0x82);
            } else {
                assert_eq!(first, 0x81, "{kind:?}");
                assert!(std::str::from_utf8(&payload).is_ok(), "{kind:?}");
            }
        }
        assert!(frame(Kind::ForeignSend).3.windows(3).any(|w| w == b"c42"));
        assert!(frame(Kind::TextTooLarge).2 > TEXT_TOO_LARGE_BYTES as u64);
    }

    #[test]
    fn fatal_junk_breaks_the_rule_it_names() {
        for kind in FATAL.iter().chain(&FATAL_BEFORE_CONNECT) {
            assert!(kind.close_code().is_some(), "{kind:?}");
        }
        assert!(std::str::from_utf8(&frame(Kind::BadUtf8).3).is_err());
        assert_eq!(frame(Kind::Oversized).2, OVERSIZED_BYTES);
        assert_eq!(frame(Kind::OversizedBeforeConnect).2, OVERSIZED_BEFORE_CONNECT_BYTES);
        assert_eq!(frame(Kind::ReservedBits).0 & 0x70, 0x40);
        assert!(!frame(Kind::Unmasked).1);
        assert_eq!(frame(Kind::ReservedOpcode).0 & 0x0F, 0x3);
        assert_eq!(frame(Kind::OrphanContinuation).0, 0x80);
        let (first, _, len, payload) = frame(Kind::LongControl);
        assert_eq!((first, len, payload.len()), (0x89, 200, 200));
        assert_eq!(frame(Kind::FragmentedControl).0, 0x09);
        assert_eq!(frame(Kind::BadCloseCode).3, 999u16.to_be_bytes());
    }

    #[test]
    fn error_codes_are_read_without_decoding() {
        assert_eq!(
            error_code(br#"{"type":"error","id":7,"code":"not_found","message":"x"}"#),
            Some("not_found")
        );
        assert_eq!(
            error_code(br#"{"type":"error","code":"bad_frame","message":"\"code\":\"x\""}"#),
            Some("bad_frame")
        );
        assert_eq!(error_code(br#"{"type":"msg","conv":"c1","code":"x"}"#), None);
        assert_eq!(error_code(br#"{"type":"error","id":1}"#), None);
    }

    #[test]
    fn open_errors_lose_their_details() {
        assert_eq!(short("timeout: no connect+handshake within 5000 ms"), "timeout: no connect+handshake");
        assert_eq!(short("connect: ECONNREFUSED"), "connect: ECONNREFUSED");
    }
}
