//! One client connection, from the first byte of its HTTP request to the
//! last byte of its close handshake.
//!
//! A connection is one task on its shard. It owns its socket; the shard's
//! sweep and (later) other connections reach it only through [`Conn`]: its
//! outbound queue, its close request and its clock stamps.
//!
//! Memory is the design constraint here (≤ 2 KB per idle connection), so:
//! - no read buffer is parked on an idle socket: the task waits for
//!   readiness (a `PollAdd`, which owns no buffer), then takes a buffer from
//!   the shard's slab, reads, decodes what arrived and gives it back; that
//!   wait stays armed while frames queued meanwhile go out;
//! - once a socket is ready, its bytes move by non-blocking `recv` and
//!   `send` system calls (`server.socket_io = "syscall"`, the default),
//!   the ring's own read or write taking over only when the socket turns
//!   out empty or full. DESIGN.md has the shard read with io_uring; this
//!   departs from it because each completion the ring reports costs the
//!   shard a task wake and poll, three an echo, and a system call on a
//!   ready socket costs less than that: 2–12% less server CPU per small
//!   echo, 5–23% at 16 KiB, under every client (BENCHMARKS.md, issue 11).
//!   `"ring"` keeps every read and write in the ring;
//! - with `server.uring_poll = "multishot"` that readiness comes from one
//!   multishot `PollAdd` per connection, armed once (kefu's patch of
//!   monoio, `vendor/monoio`), instead of a `PollAdd` submitted, armed
//!   and torn down for every message. It reports input only when input
//!   comes, so a read that fills its buffer is followed by another read,
//!   not by a wait, and a read that finds nothing goes back to waiting
//!   without a buffer;
//! - bytes of an unfinished frame (at most [`LEFTOVER_BYTES`]) are kept
//!   until the next read, since payload bytes are consumed as they come:
//!   inline up to 22 bytes (any frame header), on the heap beyond (only a
//!   control frame cut by a read);
//! - a message being reassembled lives in a slab buffer with room in front
//!   for its outbound header, so echoing it is one write, no copy. The
//!   buffer grows with the bytes that arrive, never with the length a
//!   frame header announces: announcing costs a peer nothing, so sizing
//!   from it let a few thousand sockets, each announcing 60 KB and sending
//!   one byte, take every large buffer of a shard;
//! - a message may stay incomplete for `limits.partial_message_timeout_ms`
//!   at most (the shard's sweep closes it with 1008); before `connect` it
//!   may be `limits.unauthenticated_message_bytes_max` at most, and all such
//!   connections of a shard hold `limits.unauthenticated_buffer_bytes_max`
//!   of buffers at most;
//! - no connection waits for a buffer longer than
//!   `limits.buffer_wait_timeout_ms`: the one that cannot get one is closed
//!   with 1013, and a socket read takes a smaller buffer rather than wait;
//! - the outbound queue holds shared frames and is bounded in frames and
//!   bytes: a reader too slow for it is closed with 4001.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{ReadReadiness, TcpStream};
use std::future::Future;
use tracing::debug;

use kefu_proto::ErrorCode;
use kefu_proto::client::{Codec, Command, DecodeError, Event, ServerFrame};

use crate::assets;
use crate::batch::WriteBatch;
use crate::chat::SessionAddr;
use crate::chat::frames::SharedFrame;
use crate::http::{self, HttpError};
use crate::metrics::{Initiator, ShardStats};
use crate::proxy_protocol;
use crate::shard::Shard;
use crate::slab::{Frame, SlabBuf};
use crate::ws::close;
use crate::ws::decoder::{DataKind, Decoded, Decoder, Limits, Role};
use crate::ws::frame::{ControlFrame, MAX_CONTROL_PAYLOAD_BYTES, MAX_HEADER_BYTES, OpCode, encode_header};
use crate::ws::handshake::{self, Subprotocol};

/// Bytes of an unfinished frame kept between reads: a control frame
/// (6-byte masked header + 125 bytes) is the longest thing the decoder
/// waits for whole.
pub const LEFTOVER_BYTES: usize = 136;

/// Of those, what a connection keeps inline: a data frame's header (at most
/// 14 bytes) and short control frames. Sized so that [`Leftover`] is 32
/// bytes.
const LEFTOVER_INLINE: usize = 22;

/// The bytes of an unfinished frame, kept between reads. Every connection's
/// task holds one for its whole life, and all but a control frame cut by a
/// read fit inline, so the rare longer rest goes on the heap until the next
/// read takes it, rather than 136 bytes in every task.
struct Leftover {
    len: u8,
    inline: [u8; LEFTOVER_INLINE],
    spilled: Option<Box<[u8; LEFTOVER_BYTES]>>,
}

impl Leftover {
    fn new() -> Self {
        Self { len: 0, inline: [0; LEFTOVER_INLINE], spilled: None }
    }

    /// Keeps `rest` (at most [`LEFTOVER_BYTES`]) for the next read.
    fn keep(&mut self, rest: &[u8]) {
        debug_assert!(rest.len() <= LEFTOVER_BYTES);
        if rest.len() <= LEFTOVER_INLINE {
            self.inline[..rest.len()].copy_from_slice(rest);
            self.spilled = None;
        } else {
            self.spilled.get_or_insert_with(|| Box::new([0; LEFTOVER_BYTES]))[..rest.len()]
                .copy_from_slice(rest);
        }
        self.len = rest.len() as u8;
    }

    /// Copies what was kept to the start of `to` and forgets it; returns
    /// how many bytes that was.
    fn take_into(&mut self, to: &mut [u8]) -> usize {
        let len = std::mem::take(&mut self.len) as usize;
        match self.spilled.take() {
            Some(spilled) => to[..len].copy_from_slice(&spilled[..len]),
            None => to[..len].copy_from_slice(&self.inline[..len]),
        }
        len
    }
}

// The decoder leaves fewer than MIN_BUFFER_BYTES unconsumed after NeedMore.
const _: () = assert!(LEFTOVER_BYTES >= crate::ws::decoder::MIN_BUFFER_BYTES);

/// An echoed message goes out of its read buffer, uncopied, when it is at
/// least 1/`ECHO_IN_PLACE_SHARE` of that buffer (4 KiB of the default
/// 64 KiB): below that, copying it costs less than the memory its frame
/// would pin while queued.
const ECHO_IN_PLACE_SHARE: usize = 16;

/// Header lines a request head may have.
pub const MAX_HEADERS: usize = 64;

/// A server ping with no payload; shared by every heartbeat.
static PING: [u8; 2] = [0x89, 0x00];

/// The close frame for a connection that could not get a buffer: built
/// without one, since there is none to build it in.
static NO_BUFFER_CLOSE: [u8; 13] = {
    let reason = *b"no buffer";
    let code = close::TRY_AGAIN_LATER.to_be_bytes();
    let mut f = [0u8; 13];
    f[0] = 0x88;
    f[1] = 11;
    f[2] = code[0];
    f[3] = code[1];
    let mut i = 0;
    while i < reason.len() {
        f[4 + i] = reason[i];
        i += 1;
    }
    f
};

/// The smallest buffer a socket read may fall back to (the smallest slab
/// class is at least this large; see `Config::validate`).
const READ_BUFFER_BYTES_MIN: usize = 256;
const _: () = assert!(READ_BUFFER_BYTES_MIN > LEFTOVER_BYTES);

/// Something queued for writing: a shared slab frame or a static one.
pub enum Out {
    /// Bytes in a slab buffer (possibly shared with other connections).
    Frame(Frame),
    /// Bytes that live for the whole program.
    Static(&'static [u8]),
    /// A frame made by a chat service (possibly on another shard) for many
    /// connections, from an offset.
    Shared(SharedFrame, usize),
}

impl Out {
    fn len(&self) -> usize {
        match self {
            Out::Frame(f) => f.len(),
            Out::Static(s) => s.len(),
            Out::Shared(b, at) => b.len() - at,
        }
    }

    /// Drops the first `n` bytes (after a partial write).
    pub(crate) fn advance(&mut self, n: usize) {
        match self {
            Out::Frame(f) => f.advance(n),
            Out::Static(s) => *s = &s[n.min(s.len())..],
            Out::Shared(b, at) => *at = (*at + n).min(b.len()),
        }
    }
}

// SAFETY: every variant points at memory that stays valid and unchanged while
// the value lives (a slab buffer kept alive by the Frame's count, frozen or
// written only past its shared ranges (`SlabBuf::share`), a
// 'static slice, or a SharedFrame this value holds a count of: its pool
// refills it only through Arc::get_mut, i.e. once no such count is left),
// and bytes_init is exactly the length from that pointer.
unsafe impl monoio::buf::IoBuf for Out {
    fn read_ptr(&self) -> *const u8 {
        match self {
            Out::Frame(f) => f.as_slice().as_ptr(),
            Out::Static(s) => s.as_ptr(),
            Out::Shared(b, at) => b[*at..].as_ptr(),
        }
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

/// Which endpoint a WebSocket was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: the client protocol.
    Client,
    /// `/ws/echo`: every message comes back as it was sent.
    Echo,
}

/// What the shard (and later other connections) may do to a connection.
pub struct Conn {
    fd: RawFd,
    out: RefCell<VecDeque<Out>>,
    out_bytes: Cell<usize>,
    /// The connection's task, kept from one wait to the next (it is the
    /// same task every time: no clone per wait).
    waker: Cell<Option<Waker>>,
    /// The task is parked in a wait for [`Conn::wake`]: between waits it is
    /// running and will look at the queue before it waits again.
    waiting: Cell<bool>,
    last_rx_ms: Cell<u64>,
    last_ping_ms: Cell<u64>,
    upgraded: Cell<Option<Endpoint>>,
    addr: Cell<Option<SessionAddr>>,
    close_request: Cell<Option<(u16, &'static str)>>,
    closing_since_ms: Cell<Option<u64>>,
    /// Since when a message (or a frame header) has been incomplete.
    partial_since_ms: Cell<Option<u64>>,
    /// The shard drains: read no more commands, only write what is queued.
    reads_stopped: Cell<bool>,
    /// The client's address: the TCP peer's, or the one a trusted proxy's
    /// `X-Forwarded-For` names (set from the request head).
    client: Cell<IpAddr>,
    queue_frames_max: usize,
    queue_bytes_max: usize,
}

/// The outbound queue is full: the connection is being closed with 4001.
#[derive(Debug)]
pub struct SlowConsumer;

impl Conn {
    fn new(fd: RawFd, now_ms: u64, shard: &Shard, peer: IpAddr) -> Self {
        Self {
            fd,
            out: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            waker: Cell::new(None),
            waiting: Cell::new(false),
            last_rx_ms: Cell::new(now_ms),
            last_ping_ms: Cell::new(now_ms),
            upgraded: Cell::new(None),
            addr: Cell::new(None),
            close_request: Cell::new(None),
            closing_since_ms: Cell::new(None),
            partial_since_ms: Cell::new(None),
            reads_stopped: Cell::new(false),
            client: Cell::new(peer),
            queue_frames_max: shard.limits.outbound_queue_frames,
            queue_bytes_max: shard.limits.outbound_queue_bytes,
        }
    }

    /// Shard-clock time of the last bytes received.
    pub fn last_rx_ms(&self) -> u64 {
        self.last_rx_ms.get()
    }

    /// Shard-clock time of the last heartbeat ping.
    pub fn last_ping_ms(&self) -> u64 {
        self.last_ping_ms.get()
    }

    /// When a server-initiated close began, if one did.
    pub fn closing_since_ms(&self) -> Option<u64> {
        self.closing_since_ms.get()
    }

    /// Since when (shard clock) the message being received has been
    /// incomplete, if one is.
    pub fn partial_since_ms(&self) -> Option<u64> {
        self.partial_since_ms.get()
    }

    /// Whether the connection is a WebSocket yet (heartbeats start then).
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.get().is_some()
    }

    /// Queues a frame, or, if the queue is over its bound, starts closing the
    /// connection with 4001 and drops what was queued.
    pub fn push(&self, out: Out) -> Result<(), SlowConsumer> {
        if self.closing_since_ms.get().is_some() {
            return Ok(());
        }
        let len = out.len();
        let mut q = self.out.borrow_mut();
        if q.len() >= self.queue_frames_max || self.out_bytes.get() + len > self.queue_bytes_max {
            q.clear();
            self.out_bytes.set(0);
            drop(q);
            self.close_request.set(Some((close::SLOW_CONSUMER, "slow consumer")));
            self.closing_since_ms.set(Some(self.last_rx_ms.get().max(self.last_ping_ms.get())));
            self.wake();
            return Err(SlowConsumer);
        }
        q.push_back(out);
        self.out_bytes.set(self.out_bytes.get() + len);
        drop(q);
        self.wake();
        Ok(())
    }

    /// Asks the connection to close with `code`; the first request wins.
    pub fn request_close(&self, code: u16, reason: &'static str, now_ms: u64) {
        if self.closing_since_ms.get().is_none() {
            self.close_request.set(Some((code, reason)));
            self.closing_since_ms.set(Some(now_ms));
            self.wake();
        }
    }

    /// Queues a heartbeat ping (skipped if the queue has no room: a peer that
    /// far behind is handled by the queue bound).
    pub fn send_ping(&self, now_ms: u64) {
        self.last_ping_ms.set(now_ms);
        let q = self.out.borrow();
        if q.len() < self.queue_frames_max {
            drop(q);
            let _ = self.push(Out::Static(&PING));
        }
    }

    /// Stops reading commands (a drain): the answers to those already read
    /// are still written, and then the shard closes the connection.
    pub fn stop_reading(&self) {
        self.reads_stopped.set(true);
        self.wake();
    }

    /// Cuts the socket both ways, so any pending read or write on it ends.
    pub fn force_shutdown(&self) {
        // SAFETY: shutdown(2) on a descriptor has no memory effects; the fd is
        // open for as long as the Conn is registered (the task unregisters
        // before dropping the socket).
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }

    /// Gives back the outbound queue's storage if nothing is queued. A
    /// queue keeps its capacity after it drains, and most chat sessions are
    /// idle between rare frames: the shard's sweep calls this so that
    /// write buffers are held only while writing. A busy connection pays
    /// one allocation per sweep for it, not one per frame.
    pub fn release_idle_queue(&self) {
        let mut q = self.out.borrow_mut();
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
    }

    fn wake(&self) {
        if self.waiting.replace(false)
            && let Some(w) = self.waker.take()
        {
            w.wake_by_ref();
            self.waker.set(Some(w));
        }
    }

    /// Parks the task until [`Conn::wake`].
    fn wait(&self, cx: &mut Context<'_>) {
        self.waiting.set(true);
        let waker = match self.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => w,
            _ => cx.waker().clone(),
        };
        self.waker.set(Some(waker));
    }

    /// A wait ended by another branch of a `select` (the socket became
    /// readable, a write completed): the task runs, and looks at the queue
    /// before it waits again, so a frame queued meanwhile (the echo of what
    /// it just read) needs no wake. A wake then would make the running task
    /// poll a second time for nothing (with the waker clone and drop around
    /// it, ~1.3% of an echo's server CPU in a profile).
    fn done_waiting(&self) {
        self.waiting.set(false);
    }

    fn pop(&self) -> Option<Out> {
        let out = self.out.borrow_mut().pop_front()?;
        self.out_bytes.set(self.out_bytes.get() - out.len());
        Some(out)
    }

    /// Puts a popped frame back at the front (a full write batch).
    fn unpop(&self, out: Out) {
        self.out_bytes.set(self.out_bytes.get() + out.len());
        self.out.borrow_mut().push_front(out);
    }

    fn queued_frames(&self) -> usize {
        self.out.borrow().len()
    }

    /// Resolves when something is queued or a close was requested, or
    /// (with `or_stopped`) reading should stop.
    async fn outbound(&self, or_stopped: bool) {
        std::future::poll_fn(|cx| {
            let stopped = or_stopped && self.reads_stopped.get();
            if !self.out.borrow().is_empty() || self.close_request_pending() || stopped {
                Poll::Ready(())
            } else {
                self.wait(cx);
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves once the connection is found to be a slow consumer (its
    /// queue overflowed while a write waits on its full socket).
    async fn cut_as_slow(&self) {
        std::future::poll_fn(|cx| {
            if matches!(self.close_request.get(), Some((close::SLOW_CONSUMER, _))) {
                Poll::Ready(())
            } else {
                self.wait(cx);
                Poll::Pending
            }
        })
        .await
    }

    /// A close or a drain was asked for: the connection reads no more.
    fn stops_reading(&self) -> bool {
        self.close_request_pending() || self.reads_stopped.get()
    }

    fn close_request_pending(&self) -> bool {
        let r = self.close_request.get();
        r.is_some()
    }
}

/// Serves one accepted socket to the end.
///
/// Not an `async fn`: its arguments would be stored twice in the task (once
/// as arguments, once as locals), and every byte of this future is paid by
/// every idle connection. The block below captures them once; the `Conn` is
/// made before it, so the peer's address is not kept in the task as well,
/// and the session's address is read back from the `Conn` rather than held
/// across the connection's life. monoio's task is this future plus 40
/// bytes, served from mimalloc's size classes (768, 896, 1,024 bytes):
/// `connection_future_stays_small` keeps it in the 768-byte one.
#[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
pub fn serve(shard: Rc<Shard>, mut stream: TcpStream, peer: IpAddr) -> impl Future<Output = ()> {
    let conn = Rc::new(Conn::new(stream.as_raw_fd(), shard.now_ms(), &shard, peer));
    async move {
        let stream = &mut stream;
        let Some(addr) = shard.register(conn.clone()) else {
            ShardStats::inc(&shard.stats().refused_full);
            let _ = Box::pin(respond(&shard, stream, 503, "Service Unavailable", b"shard full\n")).await;
            return;
        };
        conn.addr.set(Some(addr));
        if let Err(e) = run(&shard, &conn, stream).await {
            debug!(shard = shard.id, client = %conn.client.get(), error = %e, "connection ended");
        }
        let Some(addr) = conn.addr.get() else { return };
        shard.unregister(addr);
        if conn.upgraded.get() == Some(Endpoint::Client) {
            gone(&shard, addr);
        }
    }
}

/// Not an `async fn`, for [`serve`]'s reason: this future is part of every
/// connection's task.
#[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
fn run<'a>(
    shard: &'a Shard,
    conn: &'a Conn,
    stream: &'a mut TcpStream,
) -> impl Future<Output = std::io::Result<()>> + 'a {
    async move {
        let mut session = Session::new(shard);
        // The upgrade's result is taken apart before `drive`: matched around
        // the `drive` call, it would be kept in the task for the
        // connection's whole life.
        let flow = match Box::pin(upgrade(shard, conn, stream, &mut session)).await {
            Ok(Some(flow)) => flow,
            other => {
                session.drop_message(shard);
                return other.map(|_| ());
            }
        };
        let result = session.drive(shard, conn, stream, flow).await;
        session.drop_message(shard);
        result
    }
}

/// Everything before the connection is a WebSocket. Boxed by the caller: its
/// state (header array, parse buffers) is large and needed once, so on the
/// heap it is freed when the upgrade is done instead of sizing every idle
/// connection's task.
async fn upgrade(
    shard: &Shard,
    conn: &Conn,
    stream: &mut TcpStream,
    session: &mut Session,
) -> std::io::Result<Option<Flow>> {
    let deadline = shard.limits.handshake_timeout;
    let upgrade = match monoio::time::timeout(deadline, handshake(shard, conn, stream)).await {
        Ok(r) => r?,
        Err(_) => {
            ShardStats::inc(&shard.stats().http_rejected);
            respond(shard, stream, 408, "Request Timeout", b"request head timed out\n").await?;
            return Ok(None);
        }
    };
    let (endpoint, protocol, head) = match upgrade {
        Handshake::Upgrade { endpoint, protocol, rest } => (endpoint, protocol, rest),
        // Outside the head's deadline: a file may take longer to send
        // than a head to arrive, and a 408 must never follow half of it.
        Handshake::Asset { served, with_body } => {
            serve_asset(shard, stream, &served, with_body).await?;
            return Ok(None);
        }
        Handshake::Answered => return Ok(None),
    };
    conn.upgraded.set(Some(endpoint));
    session.codec = match protocol {
        Subprotocol::Json => Codec::Json,
        Subprotocol::FlatBuffers => Codec::FlatBuffers,
    };
    conn.last_rx_ms.set(shard.now_ms());
    ShardStats::inc(&shard.stats().upgrades);
    session.endpoint = endpoint;
    // Frames a client sent right behind its request head are input too.
    let flow = match head {
        Some((mut buf, start)) => session.input(shard, conn, &mut buf, start).await,
        None => Flow::Continue,
    };
    Ok(Some(flow))
}

/// How a request head was answered.
enum Handshake {
    /// With a 101: the connection is a WebSocket on `endpoint`, and `rest`
    /// holds any bytes that came after the head (its first frames).
    Upgrade { endpoint: Endpoint, protocol: Subprotocol, rest: Option<(SlabBuf, usize)> },
    /// With an embedded file, still to be sent.
    Asset { served: assets::Served, with_body: bool },
    /// Already (an error status), or the peer left.
    Answered,
}

/// Reads the request head and answers it: the 101 for a WebSocket, an error
/// status for anything else; a file of the console is left to the caller.
async fn handshake(shard: &Shard, conn: &Conn, stream: &mut TcpStream) -> std::io::Result<Handshake> {
    let mut buf: Option<SlabBuf> = None;
    // A trusted proxy's PROXY header is still to come; the request starts
    // at `head_at`, after it.
    let mut proxy_header_due = shard.limits.proxy_protocol
        && shard.limits.trusted_proxies.contains(conn.client.get().to_canonical());
    let mut head_at = 0;
    loop {
        stream.readable(true).await?;
        let b = match buf.take() {
            Some(b) => b,
            None => acquire(shard, shard.limits.read_buffer_bytes).await?,
        };
        let filled = b.len();
        let (res, slice) = stream.read(b.slice_mut(filled..)).await;
        let b = slice.into_inner();
        let n = res?;
        if n == 0 {
            return Ok(Handshake::Answered);
        }
        shard.stats().bytes_in.add(n as u64);
        if proxy_header_due {
            match proxy_protocol::parse(b.filled()) {
                Ok(proxy_protocol::Parsed::NeedMore) => {
                    buf = Some(b);
                    continue;
                }
                Ok(proxy_protocol::Parsed::Header { len, client }) => {
                    (proxy_header_due, head_at) = (false, len);
                    if let Some(client) = client {
                        conn.client.set(client);
                    }
                }
                Err(proxy_protocol::Invalid(why)) => {
                    ShardStats::inc(&shard.stats().http_rejected);
                    let body = format!("{why} (server.proxy_protocol)\n");
                    respond(shard, stream, 400, "Bad Request", body.as_bytes()).await?;
                    return Ok(Handshake::Answered);
                }
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let parsed = http::parse_head(&b.filled()[head_at..], &mut headers, shard.limits.max_head_bytes);
        let head = match parsed {
            Ok(None) => {
                buf = Some(b);
                continue;
            }
            Err(e) => {
                ShardStats::inc(&shard.stats().http_rejected);
                let (status, reason) = match e {
                    HttpError::TooLarge => (431, "Request Header Fields Too Large"),
                    _ => (400, "Bad Request"),
                };
                respond(shard, stream, status, reason, b"malformed request head\n").await?;
                return Ok(Handshake::Answered);
            }
            Ok(Some(head)) => head,
        };
        let endpoint = match head.path() {
            "/ws" => Endpoint::Client,
            "/ws/echo" if shard.limits.echo => Endpoint::Echo,
            path => {
                let served = assets::lookup(path, head.header("if-none-match"));
                let is_get = matches!(head.method(), "GET" | "HEAD");
                match served {
                    Some(served) if is_get => {
                        return Ok(Handshake::Asset { served, with_body: head.method() == "GET" });
                    }
                    Some(_) => {
                        ShardStats::inc(&shard.stats().http_rejected);
                        let allow = [("Allow", "GET, HEAD")];
                        respond_with(shard, stream, (405, "Method Not Allowed"), b"GET or HEAD\n", &allow)
                            .await?;
                        return Ok(Handshake::Answered);
                    }
                    None => {}
                }
                ShardStats::inc(&shard.stats().http_rejected);
                respond(shard, stream, 404, "Not Found", b"not found\n").await?;
                return Ok(Handshake::Answered);
            }
        };
        let forwarded_for = head.headers().iter().filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"));
        let client =
            shard.limits.trusted_proxies.client_ip(conn.client.get(), forwarded_for.map(|h| h.value));
        conn.client.set(client);
        // Every `/ws` request counts, valid or not: the limit is on what
        // one address makes the gateway do.
        if endpoint == Endpoint::Client
            && let Err(wait) = shard.handshakes.try_take(client, crate::chat::service::now_ms())
        {
            ShardStats::inc(&shard.stats().handshakes_rate_limited);
            ShardStats::inc(&shard.stats().http_rejected);
            // Whole seconds (RFC 9110), rounded up so a client that waits
            // as told finds a token.
            let retry_after_s = wait.0.div_ceil(1000).max(1).to_string();
            let body = b"too many connections from this address (limits.new_connections_per_s_per_ip)\n";
            let retry = [("Retry-After", retry_after_s.as_str())];
            respond_with(shard, stream, (429, "Too Many Requests"), body, &retry).await?;
            return Ok(Handshake::Answered);
        }
        if endpoint == Endpoint::Client
            && !assets::origin_allowed(
                head.header("origin"),
                head.header("host"),
                &shard.limits.allowed_origins,
            )
        {
            ShardStats::inc(&shard.stats().http_rejected);
            respond(shard, stream, 403, "Forbidden", b"origin not allowed (server.allowed_origins)\n")
                .await?;
            return Ok(Handshake::Answered);
        }
        let accepted = match handshake::accept(head.method(), head.version(), head.headers()) {
            Ok(accepted) => accepted,
            Err(e) => {
                ShardStats::inc(&shard.stats().http_rejected);
                let (status, reason, extra) = (e.status(), e.reason_phrase(), e.extra_headers());
                respond_with(shard, stream, (status, reason), e.message().as_bytes(), extra).await?;
                return Ok(Handshake::Answered);
            }
        };
        let head_len = head_at + head.len();
        let protocol = accepted.subprotocol();
        let mut out = acquire(shard, handshake::MAX_RESPONSE_BYTES).await?;
        let len = accepted.write_response(out.as_full_mut()).map_err(std::io::Error::other)?;
        out.set_len(len);
        let (res, _) = stream.write_all(out).await;
        res?;
        let rest = (head_len < b.len()).then_some((b, head_len));
        return Ok(Handshake::Upgrade { endpoint, protocol, rest });
    }
}

/// Writes an embedded file (or its `304`): the head from a slab buffer,
/// then the body straight from the binary's read-only data.
async fn serve_asset(
    shard: &Shard,
    stream: &mut TcpStream,
    served: &assets::Served,
    with_body: bool,
) -> std::io::Result<()> {
    let mut out = acquire(shard, 4096).await?;
    let body = served.body();
    let len = http::write_head(
        out.as_full_mut(),
        served.status,
        http::reason_phrase(served.status),
        served.asset.content_type,
        body.len(),
        &served.headers(),
        true,
    )
    .map_err(std::io::Error::other)?;
    out.set_len(len);
    let (res, _) = stream.write_all(out).await;
    res?;
    if with_body && !body.is_empty() {
        let (res, _) = stream.write_all(body).await;
        res?;
    }
    shard.stats().bytes_out.add((len + body.len()) as u64);
    Ok(())
}

/// Writes a small `Connection: close` response.
async fn respond(
    shard: &Shard,
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    body: &[u8],
) -> std::io::Result<()> {
    respond_with(shard, stream, (status, reason), body, &[]).await
}

/// [`respond`] with headers of its own (`Allow` on a 405).
async fn respond_with(
    shard: &Shard,
    stream: &mut TcpStream,
    (status, reason): (u16, &str),
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut out = acquire(shard, 1024).await?;
    let len = http::write_simple_response(
        out.as_full_mut(),
        status,
        reason,
        "text/plain",
        body,
        extra_headers,
        true,
    )
    .map_err(std::io::Error::other)?;
    out.set_len(len);
    let (res, _) = stream.write_all(out).await;
    res.map(|_| ())
}

/// A slab buffer of at least `bytes`, waiting for one at most
/// `limits.buffer_wait_timeout_ms`: a wait without end would hold this
/// connection (and what it holds) for as long as others hold the buffers.
/// Fails with `TimedOut` then, or at once if no class is that large.
async fn acquire(shard: &Shard, bytes: usize) -> std::io::Result<SlabBuf> {
    if let Some(b) = shard.slab.try_acquire(bytes) {
        return Ok(b);
    }
    // Boxed: the timer lives only while waiting, not in every idle
    // connection's task.
    Box::pin(wait_for_buffer(shard, bytes)).await
}

async fn wait_for_buffer(shard: &Shard, bytes: usize) -> std::io::Result<SlabBuf> {
    ShardStats::inc(&shard.stats().slab_waits);
    match monoio::time::timeout(shard.limits.buffer_wait_timeout, shard.slab.acquire(bytes)).await {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(std::io::Error::other("no slab class is that large")),
        Err(_) => {
            ShardStats::inc(&shard.stats().buffer_wait_timeouts);
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no slab buffer free in time"))
        }
    }
}

/// What the input handler decided.
enum Flow {
    /// Keep reading.
    Continue,
    /// The peer sent close; our reply is queued. Flush and hang up.
    PeerClosed,
    /// Close with this code (protocol error or server decision).
    Close(u16, &'static str),
}

/// The WebSocket side of a connection.
struct Session {
    endpoint: Endpoint,
    decoder: Decoder,
    /// The message being reassembled, from `payload_at` on (at least
    /// `MAX_HEADER_BYTES` of headroom for the outbound header).
    message: Option<SlabBuf>,
    kind: DataKind,
    /// Where the message's payload starts in its buffer.
    payload_at: u8,
    codec: Codec,
    leftover: Leftover,
    /// A `connect` has gone to the chat service: from then on `ping` goes
    /// there too, so its `pong` cannot overtake `connected`.
    connect_sent: bool,
    /// Capacity of `message` counted in the shard's
    /// `unauthenticated_bytes` (0 once `connect` was sent).
    budgeted: u32,
}

impl Session {
    fn new(shard: &Shard) -> Self {
        let limits = Limits {
            max_frame_bytes: shard.limits.max_frame_bytes,
            max_message_bytes: shard.limits.max_message_bytes,
        };
        Self {
            endpoint: Endpoint::Client,
            decoder: Decoder::new(Role::Server, limits),
            message: None,
            kind: DataKind::Binary,
            payload_at: MAX_HEADER_BYTES as u8,
            codec: Codec::Json,
            leftover: Leftover::new(),
            connect_sent: false,
            budgeted: 0,
        }
    }

    /// A `/ws` connection that has not sent `connect`: what the
    /// unauthenticated limits bound. (`/ws/echo`, a diagnostics endpoint
    /// off by default, has no `connect`, and takes conformance suites'
    /// large messages.)
    fn before_connect(&self) -> bool {
        self.endpoint == Endpoint::Client && !self.connect_sent
    }

    /// Gives back the message being assembled, and its share of the
    /// unauthenticated budget.
    fn drop_message(&mut self, shard: &Shard) {
        self.message = None;
        self.unbudget(shard);
    }

    fn unbudget(&mut self, shard: &Shard) {
        let held = shard.unauthenticated_bytes.get();
        debug_assert!(held >= self.budgeted as usize);
        shard.unauthenticated_bytes.set(held.saturating_sub(self.budgeted as usize));
        self.budgeted = 0;
    }

    /// The read/write loop once the connection is a WebSocket. Not an
    /// `async fn`, for [`serve`]'s reason: its arguments would be kept
    /// twice in every connection's task.
    #[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
    fn drive<'a>(
        &'a mut self,
        shard: &'a Shard,
        conn: &'a Conn,
        stream: &'a mut TcpStream,
        mut flow: Flow,
    ) -> impl Future<Output = std::io::Result<()>> + 'a {
        async move {
            // `server.uring_poll = "multishot"`: the poll for input, armed
            // once for the connection's life (and dropped with this loop,
            // before the caller's stream, as it must be). Unsupported only
            // on a runtime without the ring, where the one-shot wait serves.
            let readiness = match shard.limits.multishot_poll {
                true => match stream.read_readiness() {
                    Ok(readiness) => Some(readiness),
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported => None,
                    Err(e) => return Err(e),
                },
                false => None,
            };
            // The last read filled the buffer, so the socket may hold more,
            // which a multishot poll does not report again: the next read
            // comes without a wait (after the shard's other tasks had a turn).
            let mut full_read = false;
            loop {
                match flow {
                    Flow::Continue => {}
                    Flow::PeerClosed => return flush(shard, conn, stream).await,
                    Flow::Close(code, reason) => {
                        if matches!(code, close::PROTOCOL_ERROR | close::INVALID_PAYLOAD | close::TOO_BIG) {
                            ShardStats::inc(&shard.stats().protocol_closes);
                        }
                        conn.request_close(code, reason, shard.now_ms());
                    }
                }
                if let Some((code, reason)) = conn.close_request.take() {
                    if code == close::SLOW_CONSUMER {
                        ShardStats::inc(&shard.stats().slow_consumer_closes);
                    }
                    let code = match (code, self.endpoint) {
                        // The client protocol's own shutdown code; echo keeps RFC 6455's.
                        (close::GOING_AWAY, Endpoint::Client) if shard.stopping() => close::SERVER_SHUTDOWN,
                        _ => code,
                    };
                    // What was half received will not be finished: free its buffer
                    // now rather than after the close handshake.
                    self.drop_message(shard);
                    conn.partial_since_ms.set(None);
                    // Boxed: closing happens once, so its state need not size the
                    // loop that runs for the connection's whole life.
                    return Box::pin(self.close_and_drain(shard, conn, stream, code, reason)).await;
                }
                flush(shard, conn, stream).await?;
                if conn.reads_stopped.get() {
                    // Draining: what was read is answered, nothing more is read.
                    conn.outbound(false).await;
                    flow = Flow::Continue;
                    continue;
                }
                if full_read {
                    full_read = false;
                    yield_once().await;
                    // As in `until_readable`: a drain or a close asked for
                    // while others ran lets no more reads through.
                    if conn.stops_reading() {
                        flow = Flow::Continue;
                        continue;
                    }
                } else if !until_readable(shard, conn, stream, readiness.as_ref()).await? {
                    flow = Flow::Continue;
                    continue;
                }
                let mut buf = match read_buffer(shard).await {
                    Ok(buf) => buf,
                    Err(_) => {
                        flow = Flow::Close(close::TRY_AGAIN_LATER, "no buffer");
                        continue;
                    }
                };
                let kept = self.leftover.take_into(buf.as_full_mut());
                buf.set_len(kept);
                let now = match shard.limits.socket_syscalls {
                    true => match recv_now(stream.as_raw_fd(), &mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            ShardStats::inc(&shard.stats().empty_reads);
                            if readiness.is_some() {
                                // Input that a read already took: the poll
                                // stays armed and reports the next, so the
                                // wait goes on without a buffer.
                                self.leftover.keep(buf.filled());
                                flow = Flow::Continue;
                                continue;
                            }
                            None
                        }
                        read => Some(read?),
                    },
                    false => None,
                };
                full_read = readiness.is_some() && now.is_some_and(|n| n > 0) && buf.len() == buf.capacity();
                let n = match now {
                    Some(n) => n,
                    // Ready was a false alarm (or syscalls are off): a read
                    // that waits, holding the buffer meanwhile.
                    None => {
                        let (res, slice) = stream.read(buf.slice_mut(kept..)).await;
                        buf = slice.into_inner();
                        res?
                    }
                };
                if n == 0 {
                    return Ok(());
                }
                shard.stats().bytes_in.add(n as u64);
                conn.last_rx_ms.set(shard.now_ms());
                flow = self.input(shard, conn, &mut buf, 0).await;
            }
        }
    }

    /// Decodes the bytes of `buf` from `from` on, acting on each frame.
    async fn input(&mut self, shard: &Shard, conn: &Conn, buf: &mut SlabBuf, from: usize) -> Flow {
        let mut pos = from;
        // A message ended in this input: one still incomplete began here.
        let mut finished = false;
        loop {
            let (used, decoded) = self.decoder.decode(buf.filled_mut_from(pos));
            let base = pos;
            pos += used;
            let decoded = match decoded {
                Ok(d) => d,
                Err(e) => return Flow::Close(e.code, e.reason),
            };
            match decoded {
                Decoded::NeedMore => {
                    let rest = &buf.filled()[pos..];
                    if rest.len() > LEFTOVER_BYTES {
                        return Flow::Close(close::INTERNAL, "decoder kept too many bytes");
                    }
                    self.leftover.keep(rest);
                    let incomplete =
                        self.message.is_some() || self.decoder.frame_remaining() > 0 || !rest.is_empty();
                    conn.partial_since_ms.set(match conn.partial_since_ms.get() {
                        _ if !incomplete => None,
                        Some(since) if !finished => Some(since),
                        _ => Some(shard.now_ms()),
                    });
                    return Flow::Continue;
                }
                Decoded::Data { payload, kind, message_start, message_end } => {
                    let payload = base + payload.start..base + payload.end;
                    if message_start {
                        self.kind = kind;
                        if message_end && let Some(frame) = self.echo_in_place(buf, base, payload.clone()) {
                            finished = true;
                            shard.stats().messages_in.inc();
                            if let Err(flow) = push(shard, conn, Out::Frame(frame)) {
                                return flow;
                            }
                            continue;
                        }
                    }
                    let more = usize::try_from(self.decoder.frame_remaining()).unwrap_or(usize::MAX);
                    if let Err(flow) = self.append(shard, &buf.filled()[payload], more).await {
                        return flow;
                    }
                    if message_end && let Some(message) = self.message.take() {
                        finished = true;
                        self.unbudget(shard);
                        shard.stats().messages_in.inc();
                        if let Err(flow) = self.deliver(shard, conn, message).await {
                            return flow;
                        }
                    }
                }
                Decoded::Ping { payload } => {
                    let out = match control_buffer(shard).await {
                        Ok(out) => out,
                        Err(flow) => return flow,
                    };
                    // The decoder bounds control payloads at 125 bytes.
                    if let Ok(pong) =
                        ControlFrame::pong(&buf.filled()[base + payload.start..base + payload.end])
                        && let Err(flow) = push(shard, conn, control_out(out, &pong))
                    {
                        return flow;
                    }
                }
                Decoded::Pong { .. } => {}
                Decoded::Close { code, reason } => {
                    if conn.closing_since_ms().is_some() {
                        // The reply to our own close: the handshake is done.
                        return Flow::PeerClosed;
                    }
                    let out = match control_buffer(shard).await {
                        Ok(out) => out,
                        Err(flow) => return flow,
                    };
                    let reply = match code {
                        Some(code) => {
                            let reason =
                                std::str::from_utf8(&buf.filled()[base + reason.start..base + reason.end])
                                    .unwrap_or("");
                            ControlFrame::close(code, reason)
                        }
                        None => ControlFrame::close_empty(),
                    };
                    shard.stats().closes.count(Initiator::Client, code);
                    conn.closing_since_ms.set(Some(shard.now_ms()));
                    queue_forced(conn, control_out(out, &reply));
                    return Flow::PeerClosed;
                }
            }
        }
    }

    /// Echoes a whole one-frame message out of the buffer it was read into,
    /// with no copy: its outbound header is written over the tail of its
    /// inbound one (a client's header is 4 mask bytes longer than the same
    /// frame's from the server), and the frame shares the read buffer.
    /// `None` where a copy is the better deal: not the echo endpoint, or a
    /// message small next to the buffer, which its frame would pin until it
    /// is written (a peer that stops reading would hold a whole read buffer
    /// per few bytes queued).
    fn echo_in_place(&mut self, buf: &mut SlabBuf, header_at: usize, payload: Range<usize>) -> Option<Frame> {
        let len = payload.end - payload.start;
        if self.endpoint != Endpoint::Echo || len < buf.capacity() / ECHO_IN_PLACE_SHARE {
            return None;
        }
        let opcode = match self.kind {
            DataKind::Text => OpCode::Text,
            DataKind::Binary => OpCode::Binary,
        };
        let mut header = [0u8; MAX_HEADER_BYTES];
        let h = encode_header(&mut header, true, opcode, len as u64, None);
        let start = payload.start.checked_sub(h).filter(|&s| s >= header_at)?;
        buf.filled_mut_from(start)[..h].copy_from_slice(&header[..h]);
        Some(buf.share(start..payload.end))
    }

    /// Appends a payload chunk (`more` bytes of its frame still to come) to
    /// the message being reassembled, moving it to a larger slab buffer
    /// when it outgrows its own.
    async fn append(&mut self, shard: &Shard, chunk: &[u8], more: usize) -> Result<(), Flow> {
        if self.message.is_none() {
            self.payload_at = payload_offset(chunk.as_ptr() as usize) as u8;
        }
        let at = self.payload_at as usize;
        let now = match &self.message {
            Some(m) => m.len() + chunk.len(),
            None => at + chunk.len(),
        };
        // Refused at the header, before the buffers it would take are read.
        let announced = (now - at).saturating_add(more) as u64;
        if self.before_connect() && announced > shard.limits.unauthenticated_message_bytes_max {
            ShardStats::inc(&shard.stats().unauthenticated_refusals);
            return Err(Flow::Close(close::TOO_BIG, "message too big before connect"));
        }
        if self.message.as_ref().is_none_or(|m| now > m.capacity()) {
            self.grow(shard, now, more).await?;
        }
        if self.message.as_mut().is_some_and(|m| m.extend(chunk)) {
            Ok(())
        } else {
            Err(Flow::Close(close::INTERNAL, "message buffer overrun"))
        }
    }

    /// Moves the message to a buffer for at least `now` bytes: room for what
    /// has arrived and as much again, never more than its frame still
    /// brings (`more`), so a peer gets buffer for what it sent, not for
    /// what it announced. Doubling keeps the copies to about one per byte.
    async fn grow(&mut self, shard: &Shard, now: usize, more: usize) -> Result<(), Flow> {
        let want = now.saturating_add(more.min(now)).min(shard.slab.max_bytes()).max(now);
        let bigger = match shard.slab.try_acquire(want).or_else(|| shard.slab.try_acquire(now)) {
            Some(b) => b,
            None => acquire(shard, now).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => Flow::Close(close::TRY_AGAIN_LATER, "no buffer"),
                _ => Flow::Close(close::TOO_BIG, "message too big"),
            })?,
        };
        if self.before_connect() {
            let held = shard.unauthenticated_bytes.get() - self.budgeted as usize + bigger.capacity();
            if held > shard.limits.unauthenticated_buffer_bytes_max {
                ShardStats::inc(&shard.stats().unauthenticated_refusals);
                return Err(Flow::Close(close::TRY_AGAIN_LATER, "too many connections before connect"));
            }
            shard.unauthenticated_bytes.set(held);
            // Below 4 GiB: the largest slab class is a message buffer.
            self.budgeted = bigger.capacity() as u32;
        }
        let mut bigger = bigger;
        match self.message.take() {
            Some(old) => {
                // `bigger` holds at least `now` bytes, more than `old` has.
                let copied = bigger.extend(old.filled());
                debug_assert!(copied);
            }
            None => bigger.set_len(self.payload_at as usize),
        }
        self.message = Some(bigger);
        Ok(())
    }

    /// Hands a complete message to its endpoint.
    async fn deliver(&mut self, shard: &Shard, conn: &Conn, mut message: SlabBuf) -> Result<(), Flow> {
        match self.endpoint {
            Endpoint::Echo => {
                let opcode = match self.kind {
                    DataKind::Text => OpCode::Text,
                    DataKind::Binary => OpCode::Binary,
                };
                let at = self.payload_at as usize;
                let len = message.len() - at;
                let mut header = [0u8; MAX_HEADER_BYTES];
                let h = encode_header(&mut header, true, opcode, len as u64, None);
                let start = at - h;
                message.as_full_mut()[start..at].copy_from_slice(&header[..h]);
                let end = message.len();
                push(shard, conn, Out::Frame(message.freeze(start..end)))
            }
            Endpoint::Client => self.deliver_client(shard, conn, message),
        }
    }

    /// A `/ws` message: decoded here, answered here if it is malformed or a
    /// `ping` before `connect`, otherwise handed to this shard's chat service.
    fn deliver_client(&mut self, shard: &Shard, conn: &Conn, message: SlabBuf) -> Result<(), Flow> {
        let payload = &message.filled()[self.payload_at as usize..];
        let expected = if self.codec.is_binary() { DataKind::Binary } else { DataKind::Text };
        let decoded = if self.kind == expected {
            self.codec.decode_client_reusing(payload, &mut shard.strings.borrow_mut())
        } else {
            Err(DecodeError {
                code: ErrorCode::BadFrame,
                message: format!("{} takes {} frames", self.codec.subprotocol(), kind_name(expected)),
                id: None,
            })
        };
        drop(message);
        let reply = match decoded {
            Err(e) => {
                let reply = e.reply();
                // After `connect`, even a refusal goes through the chat
                // service, which holds it until `connected` is written.
                match conn.addr.get().filter(|_| self.connect_sent) {
                    Some(to) => {
                        let codec = self.codec;
                        if shard.chat(|chat| chat.answer(to, codec, &reply)).is_some() {
                            return Ok(());
                        }
                        reply
                    }
                    None => reply,
                }
            }
            Ok(frame) if matches!(frame.body, Command::Ping) && !self.connect_sent => {
                ServerFrame::reply(frame.id, Event::Pong)
            }
            Ok(frame) => {
                let Some(from) = conn.addr.get() else { return Ok(()) };
                self.connect_sent |= matches!(frame.body, Command::Connect { .. });
                if matches!(frame.body, Command::Send { .. }) {
                    ShardStats::inc(&shard.stats().chat_messages_in);
                }
                let codec = self.codec;
                let client = Some(conn.client.get());
                shard.chat(|chat| chat.frame(from, client, codec, frame));
                return Ok(());
            }
        };
        let bytes = shard.encode(self.codec, &reply);
        push(shard, conn, Out::Shared(bytes, 0))
    }

    /// Sends our close frame, half-closes, and reads until the peer hangs up
    /// (the sweep cuts the socket after `close_timeout_ms`).
    async fn close_and_drain(
        &mut self,
        shard: &Shard,
        conn: &Conn,
        stream: &mut TcpStream,
        code: u16,
        reason: &'static str,
    ) -> std::io::Result<()> {
        shard.stats().closes.count(Initiator::Server, Some(code));
        let buf = match shard.slab.try_acquire(2 + MAX_CONTROL_PAYLOAD_BYTES) {
            Some(buf) => Ok(buf),
            // Short of buffers: the close that says so needs none.
            None if code == close::TRY_AGAIN_LATER => Err(()),
            None => control_buffer(shard).await.map_err(|_| ()),
        };
        match buf {
            Ok(buf) => queue_forced(conn, control_out(buf, &ControlFrame::close(code, reason))),
            Err(()) if code == close::TRY_AGAIN_LATER => queue_forced(conn, Out::Static(&NO_BUFFER_CLOSE)),
            Err(()) => {}
        }
        // A slow consumer's socket may be full already (its queue
        // overflowed before its task ran again). A write that waited for
        // room would not see the verdict, taken above, and would hold the
        // socket until the sweep's `close_timeout_ms`: so its close frame
        // goes only if the socket takes it now, and the socket is cut
        // either way if not.
        if code == close::SLOW_CONSUMER && !flush_now(shard, conn, stream.as_raw_fd())? {
            conn.force_shutdown();
            return Ok(());
        }
        flush(shard, conn, stream).await?;
        stream.shutdown().await?;
        loop {
            // Not relaxed, as in `wait_readable`: on epoll a relaxed wait
            // would park a read buffer until the peer's close comes.
            stream.readable(false).await?;
            let buf = read_buffer(shard).await?;
            let (res, _buf) = stream.read(buf).await;
            if res? == 0 {
                return Ok(());
            }
        }
    }
}

/// Waits until the socket is readable, writing what is queued meanwhile (an
/// ack, a delivery) without cancelling the wait: arming it again for every
/// frame going out would cost two more io_uring operations (a cancel and a
/// poll) and a poll of the socket each. `Ok(false)`: a close or a drain was
/// asked for, which the caller handles.
///
/// Not an `async fn`, for [`serve`]'s reason. The wait lives only in this
/// future, and the flush in it is boxed, so neither sizes the rest of the
/// connection's loop: the write after a read, the busy echo case, stays
/// unboxed there.
#[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
fn until_readable<'a>(
    shard: &'a Shard,
    conn: &'a Conn,
    stream: &'a mut TcpStream,
    readiness: Option<&'a ReadReadiness>,
) -> impl Future<Output = std::io::Result<bool>> + 'a {
    async move {
        let mut once = std::pin::pin!(match readiness {
            Some(_) => None,
            // SAFETY: the wait is polled by the `biased` select below (or
            // dropped unpolled, if a stop was already asked for) before any
            // flush writes to the stream, and it is dropped with this
            // future, whose borrow of the stream outlives it.
            None => Some(unsafe { wait_readable(stream) }),
        });
        let mut readable =
            std::pin::pin!(std::future::poll_fn(|cx| match (readiness, once.as_mut().as_pin_mut()) {
                (Some(readiness), _) => readiness.poll_ready(cx),
                (None, Some(once)) => once.poll(cx),
                (None, None) => unreachable!("a wait is either multishot or one-shot"),
            }));
        loop {
            // Checked after every flush too: a drain or a close asked for
            // while a write waited must not let one more read through.
            if conn.stops_reading() {
                return Ok(false);
            }
            let ready = monoio::select! {
                biased;
                r = readable.as_mut() => Some(r),
                _ = conn.outbound(true) => None,
            };
            match ready {
                Some(ready) => {
                    conn.done_waiting();
                    return ready.map(|()| true);
                }
                None if conn.stops_reading() => return Ok(false),
                None => Box::pin(flush(shard, conn, stream)).await?,
            }
        }
    }
}

/// Lets the shard's other tasks run once, as a wait for input would.
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Waits until `stream` is readable, without holding it borrowed, so that
/// the same stream can write while the wait is armed.
///
/// monoio's `readable` reads the stream once, at its first poll, to clone
/// its descriptor (an `Rc`) into the poll operation; after that it uses
/// only that clone, though its state still holds the reference, unused.
/// Writes (`write`, `writev`) also only clone the descriptor, so they leave
/// the stream's bytes as they are.
///
/// # Safety
///
/// Until its first poll the returned future may read the stream: it must
/// be polled once (or dropped) before the stream is used in any other way,
/// and dropped before the stream is. Its `'static` borrow is not checked.
unsafe fn wait_readable(stream: &mut TcpStream) -> impl Future<Output = std::io::Result<()>> + 'static {
    // SAFETY: the caller keeps the stream alive for as long as the future,
    // and polls it (the one read through this reference) before writing.
    let stream: &'static TcpStream = unsafe { &*(stream as *const TcpStream) };
    // Not relaxed: on epoll a relaxed wait trusts the readiness cached since
    // the last read, which stays set after a read that emptied the socket.
    // The read that follows would then wait for the peer holding a read
    // buffer, and frames queued meanwhile (a delivery, a heartbeat) would
    // wait with it. io_uring's poll ignores the flag.
    stream.readable(false)
}

/// Reads what `fd` holds now into `buf` after its filled bytes, without
/// waiting; `WouldBlock` when it holds nothing.
fn recv_now(fd: RawFd, buf: &mut SlabBuf) -> std::io::Result<usize> {
    let from = buf.len();
    let spare = &mut buf.as_full_mut()[from..];
    // SAFETY: `spare` is writable memory of that length, borrowed for the call.
    let n = moved(|| unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            spare.as_mut_ptr(),
            spare.len(),
            libc::MSG_DONTWAIT,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    })?;
    buf.set_len(from + n);
    Ok(n)
}

/// Runs a send or receive until a signal does not interrupt it, and gives
/// its return as bytes moved, or the error it set.
///
/// They are called through `syscall(2)` rather than libc's `send` and
/// `recv`: those are thread cancellation points, and their wrappers cost
/// ~1% of an echo's CPU (perf) for a cancellation kefu never uses.
fn moved(mut call: impl FnMut() -> libc::c_long) -> std::io::Result<usize> {
    loop {
        match usize::try_from(call()) {
            Ok(n) => return Ok(n),
            Err(_) => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::Interrupted => continue,
                e => return Err(e),
            },
        }
    }
}

/// A buffer to read a socket into: `limits.read_buffer_bytes` if one is
/// free, else a smaller one (a read makes progress in any), and only when
/// there is none at all, a bounded wait.
async fn read_buffer(shard: &Shard) -> std::io::Result<SlabBuf> {
    match shard.slab.try_acquire_or_smaller(shard.limits.read_buffer_bytes, READ_BUFFER_BYTES_MIN) {
        Some(buf) => Ok(buf),
        None => acquire(shard, READ_BUFFER_BYTES_MIN).await,
    }
}

/// Where in a (64-byte aligned) message buffer a payload read from address
/// `src` should start: the same offset modulo 64 as its source, so the copy
/// runs on matching alignment (a mismatched `rep movsb` costs ~2.5× here),
/// and never less than the outbound header needs.
fn payload_offset(src: usize) -> usize {
    let phase = src % 64;
    if phase >= MAX_HEADER_BYTES { phase } else { phase + 64 }
}

fn kind_name(kind: DataKind) -> &'static str {
    match kind {
        DataKind::Text => "text",
        DataKind::Binary => "binary",
    }
}

/// Tells this shard's chat service a connection has gone (a direct call:
/// it cannot be refused, so every shard's directory and the router hear of it).
fn gone(shard: &Rc<Shard>, from: SessionAddr) {
    shard.chat(|chat| chat.gone(from));
}

fn push(shard: &Shard, conn: &Conn, out: Out) -> Result<(), Flow> {
    shard.stats().frames_out.inc();
    conn.push(out).map_err(|SlowConsumer| Flow::Close(close::SLOW_CONSUMER, "slow consumer"))
}

/// A slab buffer for a control frame, taken before the frame is built so
/// that no `ControlFrame` value lives across the wait (it would sit in every
/// connection's task state).
async fn control_buffer(shard: &Shard) -> Result<SlabBuf, Flow> {
    acquire(shard, 2 + MAX_CONTROL_PAYLOAD_BYTES).await.map_err(|_| Flow::Close(close::INTERNAL, "no buffer"))
}

fn control_out(mut buf: SlabBuf, frame: &ControlFrame) -> Out {
    let bytes = frame.as_bytes();
    buf.extend(bytes);
    Out::Frame(buf.freeze(0..bytes.len()))
}

/// Queues a close frame even though the connection is already closing.
fn queue_forced(conn: &Conn, out: Out) {
    conn.out_bytes.set(conn.out_bytes.get() + out.len());
    conn.out.borrow_mut().push_back(out);
}

/// Writes everything queued: a lone frame with `write`, several with one
/// `writev` per [`WRITEV_FRAMES_MAX`](crate::batch::WRITEV_FRAMES_MAX) of them. Plain writes in a loop
/// rather than `write_all`: the latter's state is several times larger and
/// would sit in every connection's task.
///
/// A write that waits on a full socket is the usual state of a reader that
/// stopped reading, and its queue overflowing then is what makes it a slow
/// consumer: so the wait gives way to that verdict. No close frame can get
/// through the full socket (and a frame may be half written), so the
/// socket is cut at once, counted as a server close 4001; waiting for the
/// sweep's `close_timeout_ms` instead left the close uncounted.
async fn flush(shard: &Shard, conn: &Conn, stream: &mut TcpStream) -> std::io::Result<()> {
    loop {
        match conn.queued_frames() {
            0 => return Ok(()),
            1 => {
                let Some(out) = conn.pop() else { return Ok(()) };
                write_whole(shard, conn, stream, out).await?;
            }
            _ => {
                // Boxed: a batch is the busy case, and its state need not
                // size every idle connection's task.
                Box::pin(write_batch(shard, conn, stream)).await?;
            }
        }
    }
}

/// Writes what is queued as far as the socket takes it now, by system
/// calls whatever `server.socket_io` says (this is no per-message path):
/// `false` if some of it did not fit, and that rest is dropped.
fn flush_now(shard: &Shard, conn: &Conn, fd: RawFd) -> std::io::Result<bool> {
    while let Some(mut out) = conn.pop() {
        let n = match out.send_now(fd) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            sent => sent?,
        };
        shard.stats().bytes_out.add(n as u64);
        out.consume(n);
        if !out.is_done() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What a flush writes: a lone frame, or a batch of them.
trait Outgoing: Sized {
    fn is_done(&self) -> bool;
    /// Drops the first `n` bytes, which were written.
    fn consume(&mut self, n: usize);
    fn write_to(self, stream: &mut TcpStream) -> impl Future<Output = monoio::BufResult<usize, Self>>;
    /// Writes what the socket takes now, without waiting.
    fn send_now(&self, fd: RawFd) -> std::io::Result<usize>;
}

impl Outgoing for Out {
    fn is_done(&self) -> bool {
        self.len() == 0
    }
    fn consume(&mut self, n: usize) {
        self.advance(n);
    }
    fn write_to(self, stream: &mut TcpStream) -> impl Future<Output = monoio::BufResult<usize, Self>> {
        stream.write(self)
    }
    fn send_now(&self, fd: RawFd) -> std::io::Result<usize> {
        use monoio::buf::IoBuf;
        // SAFETY: read_ptr points at bytes_init readable bytes (IoBuf's
        // contract) that stay put for the call.
        moved(|| unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                self.read_ptr(),
                self.bytes_init(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0,
            )
        })
    }
}

impl Outgoing for WriteBatch {
    fn is_done(&self) -> bool {
        WriteBatch::is_done(self)
    }
    fn consume(&mut self, n: usize) {
        self.advance(n);
    }
    fn write_to(self, stream: &mut TcpStream) -> impl Future<Output = monoio::BufResult<usize, Self>> {
        stream.writev(self)
    }
    fn send_now(&self, fd: RawFd) -> std::io::Result<usize> {
        use monoio::buf::IoVecBuf;
        // SAFETY: a zeroed msghdr is a valid one (no address, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.read_iovec_ptr().cast_mut();
        msg.msg_iovlen = self.read_iovec_len() as _;
        // SAFETY: the vector points at the batch's unwritten bytes
        // (`prepare` after every advance), which stay put for the call;
        // sendmsg only reads through it.
        moved(|| unsafe {
            libc::syscall(libc::SYS_sendmsg, fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        })
    }
}

/// Writes `out` whole (short writes resumed), or gives way to the
/// slow-consumer verdict; hands back what was written, emptied.
async fn write_whole<T: Outgoing>(
    shard: &Shard,
    conn: &Conn,
    stream: &mut TcpStream,
    mut out: T,
) -> std::io::Result<T> {
    // System calls until the socket is full; the driver's write after that,
    // which waits for room.
    let mut now = shard.limits.socket_syscalls;
    while !out.is_done() {
        let n = if now {
            match out.send_now(stream.as_raw_fd()) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ShardStats::inc(&shard.stats().full_socket_writes);
                    now = false;
                    continue;
                }
                sent => sent?,
            }
        } else {
            let written = monoio::select! {
                biased;
                w = out.write_to(stream) => Some(w),
                _ = conn.cut_as_slow() => None,
            };
            conn.done_waiting();
            let Some((res, rest)) = written else { return Err(cut_as_slow(shard, conn)) };
            out = rest;
            res?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        shard.stats().bytes_out.add(n as u64);
        out.consume(n);
    }
    Ok(out)
}

async fn write_batch(shard: &Shard, conn: &Conn, stream: &mut TcpStream) -> std::io::Result<()> {
    let mut batch = shard.batches.take();
    while let Some(out) = conn.pop() {
        if let Err(out) = batch.push(out) {
            conn.unpop(out);
            break;
        }
    }
    batch.prepare();
    ShardStats::inc(&shard.stats().writev_calls);
    let batch = write_whole(shard, conn, stream, batch).await?;
    shard.batches.give_back(batch);
    Ok(())
}

/// A write gave way to the slow-consumer verdict: count it and cut the
/// socket.
fn cut_as_slow(shard: &Shard, conn: &Conn) -> std::io::Error {
    ShardStats::inc(&shard.stats().slow_consumer_closes);
    shard.stats().closes.count(Initiator::Server, Some(close::SLOW_CONSUMER));
    conn.force_shutdown();
    std::io::Error::other("slow consumer: cut while its socket was full")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_offsets_match_the_source_phase_and_leave_header_room() {
        for src in 0..256usize {
            let at = payload_offset(src);
            assert_eq!(at % 64, src % 64);
            assert!((MAX_HEADER_BYTES..MAX_HEADER_BYTES + 64).contains(&at), "{src} -> {at}");
        }
    }

    /// `Conn::wait` and the multishot poll keep the task's waker from one
    /// wait to the next and clone it only when `will_wake` says it is
    /// another task's. That holds only if every waker of a task carries the
    /// same vtable address: monoio's (before kefu's patch) came from a
    /// constant that each codegen unit could emit again, so a kept waker
    /// was never recognised and every wait cloned it anew.
    #[test]
    fn a_task_knows_its_own_waker_across_polls() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build().unwrap();
        let recognised = rt.block_on(async {
            monoio::spawn(async {
                let kept: RefCell<Option<Waker>> = RefCell::new(None);
                let mut recognised = Vec::new();
                for _ in 0..3 {
                    let mut yielded = false;
                    std::future::poll_fn(|cx| {
                        if let Some(w) = kept.borrow().as_ref() {
                            recognised.push(w.will_wake(cx.waker()));
                        }
                        if std::mem::replace(&mut yielded, true) {
                            return Poll::Ready(());
                        }
                        *kept.borrow_mut() = Some(cx.waker().clone());
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    })
                    .await;
                }
                recognised
            })
            .await
        });
        assert_eq!(recognised.len(), 5);
        assert!(recognised.iter().all(|&r| r), "{recognised:?}");
    }

    /// The kernel may end a multishot poll on its own (older kernels do on a
    /// full completion queue; 6.18 here queues the overflow instead, so the
    /// burst test in `tests/serve.rs` cannot reach this). Its last
    /// completion (`ECANCELED`, no `IORING_CQE_F_MORE`) must make the owner
    /// look at the socket once, and the next wait must arm the poll again
    /// under the same slot, or the connection never hears of input again.
    /// The poll is ended here by a `PollRemove` from the test.
    #[test]
    fn a_poll_the_kernel_ends_is_armed_again_at_the_next_wait() {
        use std::io::Write;
        use std::time::Duration;
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let readiness = stream.read_readiness().unwrap();
            let fd = stream.as_raw_fd();
            // A non-blocking read of everything there is: the byte count.
            let drain = || {
                let mut buf = [0u8; 64];
                let mut got = 0;
                loop {
                    // SAFETY: a read into a local buffer of its own length.
                    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                    if n <= 0 {
                        return got;
                    }
                    got += n as usize;
                }
            };
            let within = |what: &'static str| {
                let readiness = &readiness;
                async move {
                    monoio::time::timeout(Duration::from_secs(5), readiness.ready())
                        .await
                        .unwrap_or_else(|_| panic!("no readiness within 5 s: {what}"))
                        .unwrap();
                }
            };

            peer.write_all(b"a").unwrap();
            within("the first input").await;
            assert_eq!(drain(), 1);

            readiness.end_in_kernel_for_test().unwrap();
            within("the poll's last completion").await;
            assert_eq!(drain(), 0, "the end came with no input");

            peer.write_all(b"bc").unwrap();
            within("input after the poll was ended").await;
            assert_eq!(drain(), 2);
            // And it stays armed: a multishot poll again, not a one-off.
            peer.write_all(b"d").unwrap();
            within("the next input").await;
            assert_eq!(drain(), 1);
            drop(readiness);
        });
    }

    /// A shard with the default config, alone (no other shard, no runtime
    /// of its own), for tests of one connection.
    fn lone_shard() -> Rc<Shard> {
        let config = crate::config::Config::default();
        let slab = crate::slab::Slab::new(&config.slab.classes).unwrap();
        let stats: std::sync::Arc<[ShardStats]> = vec![ShardStats::new(config.slab.classes.len())].into();
        let mailboxes: std::sync::Arc<[crate::mailbox::Mailbox<crate::chat::ShardMsg>]> =
            vec![crate::mailbox::Mailbox::new(4, 1).unwrap()].into();
        let handshakes =
            std::sync::Arc::new(kefu_core::per_ip::PerIpLimiter::new(kefu_core::per_ip::PerIpRate {
                rate: 1,
                burst: 1,
                period_ms: 1000,
                entries_max: 64,
            }));
        Rc::new(Shard::new(0, &config, slab, stats, mailboxes, handshakes))
    }

    /// The system calls behind `server.socket_io = "syscall"`: a read lands
    /// after the bytes a buffer already holds, an empty socket and a full
    /// one say `WouldBlock` (the ring takes over then), a batch goes out as
    /// one vector, and a peer gone is an error (`EPIPE`). The socket is a
    /// blocking one, as monoio's io_uring accept makes them: a call that
    /// forgot `MSG_DONTWAIT` would hang here.
    #[test]
    fn system_calls_read_after_what_is_kept_and_yield_to_the_ring_when_empty_or_full() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let shard = lone_shard();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        // SAFETY: F_GETFL on a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "the socket must block, as accepted ones do");

        let mut buf = shard.slab.try_acquire(4096).unwrap();
        buf.as_full_mut()[..3].copy_from_slice(b"old");
        buf.set_len(3);
        assert_eq!(recv_now(fd, &mut buf).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert_eq!(buf.filled(), b"old");
        peer.write_all(b" new").unwrap();
        assert_eq!(recv_now(fd, &mut buf).unwrap(), 4);
        assert_eq!(buf.filled(), b"old new");

        let mut batch = shard.batches.take();
        assert!(batch.push(Out::Static(b"one ")).is_ok());
        assert!(batch.push(Out::Static(b"two")).is_ok());
        batch.prepare();
        assert_eq!(batch.send_now(fd).unwrap(), 7);
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one two");

        let chunk = Out::Static(&[7u8; 4096]);
        let full = loop {
            match chunk.send_now(fd) {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(full.kind(), std::io::ErrorKind::WouldBlock);
        drop(peer);
        assert_eq!(chunk.send_now(fd).unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
    }

    /// A drained queue keeps its storage until the sweep asks for it back;
    /// a queue with frames in it keeps it.
    #[test]
    fn idle_queue_gives_its_storage_back() {
        let shard = lone_shard();
        let conn = Conn::new(-1, 0, &shard, IpAddr::from([127, 0, 0, 1]));
        conn.push(Out::Static(&PING)).unwrap();
        conn.release_idle_queue();
        assert_eq!(conn.out.borrow().len(), 1, "a queued frame is never dropped");
        assert!(conn.out.borrow().capacity() > 0);
        assert!(conn.pop().is_some());
        assert!(conn.out.borrow().capacity() > 0, "draining alone keeps the storage");
        conn.release_idle_queue();
        assert_eq!(conn.out.borrow().capacity(), 0);
        assert_eq!(conn.out_bytes.get(), 0);
        // It still queues afterwards.
        conn.push(Out::Static(&PING)).unwrap();
        assert_eq!(conn.pop().map(|o| o.len()), Some(PING.len()));
    }

    /// A slow consumer's close frame is written only if its socket takes
    /// it now: into a full socket nothing goes, and `false` says the
    /// socket is to be cut rather than waited on.
    #[test]
    fn a_full_socket_takes_no_close_frame_and_says_so() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let shard = lone_shard();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        let conn = Conn::new(fd, 0, &shard, IpAddr::from([127, 0, 0, 1]));
        let close_frame = || {
            let buf = shard.slab.try_acquire(2 + MAX_CONTROL_PAYLOAD_BYTES).unwrap();
            control_out(buf, &ControlFrame::close(close::SLOW_CONSUMER, "slow consumer"))
        };

        queue_forced(&conn, close_frame());
        assert!(flush_now(&shard, &conn, fd).unwrap(), "room: the close frame goes");
        assert_eq!(conn.queued_frames(), 0);
        let mut got = [0u8; 64];
        let n = peer.read(&mut got).unwrap();
        assert_eq!(&got[..2], &[0x88, 15], "a close frame, code and reason");
        assert_eq!(&got[4..n], b"slow consumer");

        let chunk = Out::Static(&[7u8; 4096]);
        while chunk.send_now(fd).is_ok() {}
        queue_forced(&conn, close_frame());
        assert!(!flush_now(&shard, &conn, fd).unwrap(), "a full socket: to be cut");
        assert_eq!(conn.queued_frames(), 0, "what did not fit is dropped");
        assert_eq!(conn.out_bytes.get(), 0);
    }

    /// Every idle connection holds its task's future, so its size is the
    /// per-connection memory floor; this prints it and bounds it.
    #[test]
    fn leftover_keeps_short_rests_inline_and_long_ones_until_the_next_read() {
        let mut left = Leftover::new();
        let mut to = [0u8; LEFTOVER_BYTES];
        assert_eq!(left.take_into(&mut to), 0);
        let header = [0x89u8, 0xfd, 1, 2, 3, 4];
        left.keep(&header);
        assert!(left.spilled.is_none(), "a frame header stays inline");
        assert_eq!(left.take_into(&mut to), header.len());
        assert_eq!(to[..header.len()], header);
        assert_eq!(left.take_into(&mut to), 0, "taken once");
        let cut_ping: Vec<u8> = (0..LEFTOVER_BYTES as u8).collect();
        for long in [&cut_ping[..LEFTOVER_INLINE + 1], &cut_ping[..]] {
            left.keep(long);
            assert!(left.spilled.is_some());
            to.fill(0);
            assert_eq!(left.take_into(&mut to), long.len());
            assert_eq!(to[..long.len()], *long);
            assert!(left.spilled.is_none(), "the heap part goes with the read that took it");
        }
        // A long rest replaced by a short one before any read: the short one.
        left.keep(&cut_ping);
        left.keep(&header);
        assert!(left.spilled.is_none());
        assert_eq!(left.take_into(&mut to), header.len());
        assert_eq!(to[..header.len()], header);
        assert_eq!(std::mem::size_of::<Leftover>(), 32);
    }

    #[test]
    fn connection_future_stays_small() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = TcpStream::connect(addr).await.unwrap();
            let shard = lone_shard();
            let fut = serve(shard.clone(), stream, addr.ip());
            let total = std::mem::size_of_val(&fut);
            let session = std::mem::size_of::<Session>();
            let conn = std::mem::size_of::<Conn>();
            let drive = {
                let mut session = Session::new(&shard);
                let c = Conn::new(0, 0, &shard, addr.ip());
                let mut stream = TcpStream::connect(addr).await.unwrap();
                std::mem::size_of_val(&session.drive(&shard, &c, &mut stream, Flow::Continue))
            };
            println!("serve future {total} B, drive future {drive} B, Session {session} B, Conn {conn} B");
            // monoio's task is this future plus 40 bytes (header and
            // trailer): up to 728 it is one of mimalloc's 768-byte blocks,
            // past it an 896-byte one, for every connection held.
            assert!(total <= 728, "serve future is {total} B");
        });
    }
}
