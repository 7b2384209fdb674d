//! A WebSocket echo server written straight on io_uring (the `io-uring`
//! crate, no runtime, no tasks): a probe, not a product. It answers one
//! question issue 11 left open: how much of the echo gap between kefu and
//! fastwebsockets is the pattern of io_uring operations kefu's runtime
//! (monoio 0.2) allows, and how much a multishot receive into a
//! provided-buffer ring, which monoio 0.2 does not expose, would save.
//!
//! Two modes, on one ring per process with `SINGLE_ISSUER | DEFER_TASKRUN`
//! (kefu's default ring setup):
//!
//! - `poll`: the operations kefu issues today for one echo: a `PollAdd`
//!   for readiness, a `Recv` into a buffer taken from a pool only then, a
//!   `Send` of the reply, and after it the next `PollAdd`. Three
//!   completions per echo, as kefu, but no task, waker or future around
//!   them: the difference to kefu is the runtime's and kefu's own code.
//! - `multishot`: one `RecvMulti` per connection, armed once, filling
//!   buffers the kernel picks from a ring registered with the ring
//!   (`IORING_REGISTER_PBUF_RING`), each handed back as soon as its bytes
//!   are decoded. Two completions per echo (the receive and the send), and
//!   no poll armed per message.
//!
//! The WebSocket side is the minimum an echo benchmark needs: the HTTP
//! upgrade, masked client frames of any length (a frame may span reads),
//! data frames echoed as they came (fragments as fragments), ping answered
//! with pong, close echoed. No UTF-8 validation, no limits: run it only on
//! loopback, against the benchmark clients.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::Context as _;
use base64::Engine as _;
use clap::Parser;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use sha1::{Digest, Sha1};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Readiness, then a receive, then the send: kefu's operations today.
    Poll,
    /// One multishot receive per connection into a provided-buffer ring.
    Multishot,
}

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (loopback only: this server has no limits).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value = "multishot")]
    mode: Mode,
    /// Receive buffer size in bytes (each ring buffer, or each pool buffer).
    #[arg(long, default_value_t = 4096)]
    buffer_bytes: u32,
    /// Buffers in the provided-buffer ring (a power of two, at most 32768).
    #[arg(long, default_value_t = 4096)]
    ring_buffers: u16,
    /// Submission queue entries.
    #[arg(long, default_value_t = 4096)]
    entries: u32,
}

/// What a completion is for: the low 2 bits of its user data; the
/// connection's slot is the rest.
const ACCEPT: u64 = 0;
const POLL: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const BUFFER_GROUP: u16 = 0;
/// The WebSocket GUID of RFC 6455 section 1.3.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.listen.ip().is_loopback(), "echo-uring serves loopback only");
    anyhow::ensure!(
        args.ring_buffers.is_power_of_two() && args.ring_buffers <= 32768,
        "--ring-buffers must be a power of two up to 32768"
    );
    let listener = TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(args.entries)
        .context("building the ring (needs SINGLE_ISSUER and DEFER_TASKRUN: Linux 6.1)")?;
    let mut server = Server::new(ring, args.mode, args.buffer_bytes, args.ring_buffers)?;
    eprintln!("echo-uring listening on {} ({:?}, {} B buffers)", args.listen, args.mode, args.buffer_bytes);
    server.listener = listener.as_raw_fd();
    server.push(server.accept_sqe())?;
    server.run()
}

/// One connection: its socket and the bytes between the wire and the echo.
struct Conn {
    fd: RawFd,
    /// After the 101: bytes are frames.
    open: bool,
    /// Bytes of an unfinished request or frame.
    pending: Vec<u8>,
    /// Reply bytes not yet handed to a send.
    out: Vec<u8>,
    /// Reply bytes a send owns until it completes (`sent` of them done).
    sending: Vec<u8>,
    sent: usize,
    /// A send is in flight.
    send_busy: bool,
    /// A close frame went into `out`: close once it is sent.
    close_after_send: bool,
    /// Operations in flight: the slot is freed only when none is left, so
    /// a late completion never names the slot's next connection.
    in_flight: u32,
    /// A multishot receive is armed.
    receiving: bool,
    /// The pool buffer a `poll` mode receive fills.
    read_buf: Option<Vec<u8>>,
    /// Shut down: no more reads, close once nothing is in flight.
    closing: bool,
}

struct Server {
    ring: IoUring,
    mode: Mode,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// `poll` mode's receive buffers.
    pool: Vec<Vec<u8>>,
    buffer_bytes: u32,
    ring_bufs: BufRing,
    completions: Vec<(u64, i32, u32)>,
    listener: RawFd,
    /// Connections with replies to send once this batch is handled.
    dirty: VecDeque<usize>,
}

impl Server {
    fn new(ring: IoUring, mode: Mode, buffer_bytes: u32, ring_buffers: u16) -> anyhow::Result<Self> {
        let ring_bufs =
            BufRing::new(&ring, ring_buffers, buffer_bytes).context("registering the buffer ring")?;
        Ok(Self {
            ring,
            mode,
            conns: Vec::new(),
            free: Vec::new(),
            pool: Vec::new(),
            buffer_bytes,
            ring_bufs,
            completions: Vec::with_capacity(4096),
            listener: -1,
            dirty: VecDeque::new(),
        })
    }

    fn accept_sqe(&self) -> squeue::Entry {
        opcode::AcceptMulti::new(types::Fd(self.listener)).build().user_data(ACCEPT)
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry points at memory that outlives its operation:
        // a connection's `sending` and `read_buf` stay put until their
        // completion (the slot is not freed while anything is in flight),
        // the buffer ring lives as long as the server.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn run(&mut self) -> anyhow::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e).context("io_uring_enter"),
            }
            self.completions.clear();
            self.completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            for i in 0..self.completions.len() {
                let (data, res, flags) = self.completions[i];
                self.complete(data, res, flags)?;
            }
            while let Some(slot) = self.dirty.pop_front() {
                self.flush(slot)?;
            }
        }
    }

    fn complete(&mut self, data: u64, res: i32, flags: u32) -> anyhow::Result<()> {
        let kind = data & 3;
        let slot = (data >> 2) as usize;
        match kind {
            ACCEPT => {
                if res < 0 {
                    eprintln!("accept: {}", io::Error::from_raw_os_error(-res));
                } else {
                    self.accepted(res);
                }
                if !cqueue::more(flags) {
                    // Ended by an error (EMFILE, say): armed again, so the
                    // server keeps accepting once descriptors are free.
                    self.push(self.accept_sqe())?;
                }
            }
            POLL => {
                self.conn(slot).in_flight -= 1;
                if res < 0 {
                    self.close(slot);
                }
                if self.conn(slot).closing {
                    self.finish(slot);
                    return Ok(());
                }
                let mut buf = self.pool.pop().unwrap_or_else(|| vec![0; self.buffer_bytes as usize]);
                let fd = self.conn(slot).fd;
                let sqe = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
                    .build()
                    .user_data(slot as u64 * 4 + RECV);
                let conn = self.conn(slot);
                conn.read_buf = Some(buf);
                conn.in_flight += 1;
                self.push(sqe)?;
            }
            RECV => match self.mode {
                Mode::Poll => {
                    self.conn(slot).in_flight -= 1;
                    let buf = self.conn(slot).read_buf.take().expect("a receive in flight has its buffer");
                    if res > 0 && !self.conn(slot).closing {
                        self.input(slot, &buf[..res as usize]);
                    } else {
                        self.close(slot);
                    }
                    self.pool.push(buf);
                    // The next wait for input follows the reply's send, as
                    // in kefu; with nothing to send it is armed now.
                    self.dirty.push_back(slot);
                    self.finish(slot);
                }
                Mode::Multishot => {
                    if !cqueue::more(flags) {
                        let conn = self.conn(slot);
                        conn.in_flight -= 1;
                        conn.receiving = false;
                    }
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        if res > 0 && !self.conn(slot).closing {
                            // SAFETY: the kernel filled `res` bytes of
                            // buffer `bid`, which is ours until it goes back
                            // on the ring below.
                            let bytes = unsafe { self.ring_bufs.bytes(bid, res as usize) };
                            self.input(slot, bytes);
                        }
                        self.ring_bufs.give_back(bid);
                    }
                    if res == 0 || (res < 0 && res != -libc::ENOBUFS) {
                        self.close(slot);
                    }
                    self.dirty.push_back(slot);
                    self.finish(slot);
                }
            },
            SEND => {
                let conn = self.conn(slot);
                conn.in_flight -= 1;
                conn.send_busy = false;
                if res < 0 {
                    conn.sending.clear();
                    conn.sent = 0;
                    self.close(slot);
                } else {
                    conn.sent += res as usize;
                    if conn.sent == conn.sending.len() {
                        conn.sending.clear();
                        conn.sent = 0;
                    }
                }
                self.dirty.push_back(slot);
                self.finish(slot);
            }
            _ => unreachable!("two bits hold four kinds"),
        }
        Ok(())
    }

    fn conn(&mut self, slot: usize) -> &mut Conn {
        self.conns[slot].as_mut().expect("a completion names a live slot")
    }

    fn accepted(&mut self, fd: RawFd) {
        let one: libc::c_int = 1;
        // SAFETY: `fd` is the socket the accept just made; the option is a
        // plain int. Echo replies are small writes answering small reads,
        // which Nagle would hold back for a delayed ACK.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let conn = Conn::new(fd);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.dirty.push_back(slot);
    }

    /// Sends what is queued, or arms the next receive: the one place a
    /// connection's next operations are chosen.
    fn flush(&mut self, slot: usize) -> io::Result<()> {
        let mode = self.mode;
        let Some(conn) = self.conns[slot].as_mut() else { return Ok(()) };
        let mut next = Vec::with_capacity(0);
        if conn.sending.is_empty() && !conn.out.is_empty() {
            std::mem::swap(&mut conn.sending, &mut conn.out);
        }
        let send_pending = !conn.sending.is_empty();
        if send_pending && !conn.send_busy {
            let rest = &conn.sending[conn.sent..];
            next.push(
                opcode::Send::new(types::Fd(conn.fd), rest.as_ptr(), rest.len() as u32)
                    .build()
                    .user_data(slot as u64 * 4 + SEND),
            );
            conn.send_busy = true;
            conn.in_flight += 1;
        }
        if !send_pending && conn.close_after_send && !conn.closing {
            self.close(slot);
            self.finish(slot);
            return Ok(());
        }
        if !conn.closing {
            match mode {
                Mode::Multishot if !conn.receiving => {
                    next.push(
                        opcode::RecvMulti::new(types::Fd(conn.fd), BUFFER_GROUP)
                            .build()
                            .user_data(slot as u64 * 4 + RECV),
                    );
                    conn.receiving = true;
                    conn.in_flight += 1;
                }
                Mode::Poll if !send_pending && conn.in_flight == 0 => {
                    next.push(
                        opcode::PollAdd::new(types::Fd(conn.fd), libc::POLLIN as u32)
                            .build()
                            .user_data(slot as u64 * 4 + POLL),
                    );
                    conn.in_flight += 1;
                }
                _ => {}
            }
        }
        for sqe in next {
            self.push(sqe)?;
        }
        Ok(())
    }

    /// Decodes what arrived and queues the replies.
    fn input(&mut self, slot: usize, bytes: &[u8]) {
        let conn = self.conn(slot);
        if conn.close_after_send {
            return;
        }
        if conn.pending.is_empty() {
            let used = conn.decode(bytes);
            conn.pending.extend_from_slice(&bytes[used..]);
        } else {
            let mut pending = std::mem::take(&mut conn.pending);
            pending.extend_from_slice(bytes);
            let used = conn.decode(&pending);
            pending.drain(..used);
            conn.pending = pending;
        }
    }

    fn close(&mut self, slot: usize) {
        let conn = self.conn(slot);
        if !conn.closing {
            conn.closing = true;
            // SAFETY: the connection's own socket. Shutting it down ends
            // its armed receive (with 0), after which its slot is freed.
            unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
        }
    }

    /// Frees a closing connection's slot once nothing of it is in flight.
    fn finish(&mut self, slot: usize) {
        let conn = self.conn(slot);
        if conn.closing && conn.in_flight == 0 {
            // SAFETY: nothing in flight names the descriptor any more.
            unsafe { libc::close(conn.fd) };
            self.conns[slot] = None;
            self.free.push(slot);
        }
    }
}

impl Conn {
    fn new(fd: RawFd) -> Self {
        Conn {
            fd,
            open: false,
            pending: Vec::new(),
            out: Vec::new(),
            sending: Vec::new(),
            sent: 0,
            send_busy: false,
            close_after_send: false,
            in_flight: 0,
            receiving: false,
            read_buf: None,
            closing: false,
        }
    }

    /// Decodes complete requests or frames from `bytes`, queueing replies;
    /// returns how many bytes it used.
    fn decode(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        if !self.open {
            let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else { return 0 };
            let request = &bytes[..end];
            let key = std::str::from_utf8(request).ok().and_then(|text| {
                text.split("\r\n").find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim().eq_ignore_ascii_case("sec-websocket-key").then(|| value.trim().to_owned())
                })
            });
            let Some(key) = key else {
                self.out.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                self.close_after_send = true;
                return bytes.len();
            };
            let accept = base64::engine::general_purpose::STANDARD
                .encode(Sha1::new().chain_update(key.as_bytes()).chain_update(WS_GUID).finalize());
            self.out.extend_from_slice(
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                     sec-websocket-accept: {accept}\r\n\r\n"
                )
                .as_bytes(),
            );
            self.open = true;
            used = end + 4;
        }
        loop {
            let rest = &bytes[used..];
            let Some(Frame { opcode, mask, body, len }) = frame(rest) else { return used };
            match opcode {
                0x8 => {
                    // Echo the status code (if any) and stop reading.
                    let code = &body[..body.len().min(2)];
                    let mut unmasked = [0u8; 2];
                    for (i, b) in code.iter().enumerate() {
                        unmasked[i] = b ^ mask[i];
                    }
                    self.out.extend_from_slice(&[0x88, code.len() as u8]);
                    self.out.extend_from_slice(&unmasked[..code.len()]);
                    self.close_after_send = true;
                    return bytes.len();
                }
                0x9 => self.reply(0x8A, mask, body),
                0xA => {}
                _ => self.reply(rest[0], mask, body),
            }
            used += len;
        }
    }

    /// Queues an unmasked frame with header byte `first` and `body`.
    fn reply(&mut self, first: u8, mask: [u8; 4], body: &[u8]) {
        let len = body.len();
        self.out.push(first);
        if len < 126 {
            self.out.push(len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let start = self.out.len();
        self.out.extend_from_slice(body);
        unmask(&mut self.out[start..], mask);
    }
}

/// A whole client frame, its payload still masked.
struct Frame<'a> {
    opcode: u8,
    mask: [u8; 4],
    body: &'a [u8],
    /// Its length on the wire.
    len: usize,
}

/// The next whole client frame in `bytes`; `None` until all of it arrived.
fn frame(bytes: &[u8]) -> Option<Frame<'_>> {
    let (&b0, rest) = bytes.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let (len, rest) = match b1 & 0x7F {
        126 => (u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)), &rest[2..]),
        127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), &rest[8..]),
        n => (u64::from(n), rest),
    };
    let mask: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    let body = rest.get(4..4 + usize::try_from(len).ok()?)?;
    let header = bytes.len() - rest.len() + 4;
    Some(Frame { opcode: b0 & 0x0F, mask, body, len: header + body.len() })
}

/// XORs `bytes` with the repeating `mask`, eight bytes at a time.
fn unmask(bytes: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = bytes.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks
/// from for multishot receives, handed back one by one after use.
struct BufRing {
    entries: *mut types::BufRingEntry,
    count: u16,
    tail: u16,
    size: u32,
    memory: Vec<u8>,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, size: u32) -> io::Result<Self> {
        let ring_bytes = usize::from(count) * size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping (page-aligned, as the kernel
        // wants the ring), never unmapped: it lives as long as the process.
        let entries = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if entries == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut this = Self {
            entries: entries.cast(),
            count,
            tail: 0,
            size,
            memory: vec![0; usize::from(count) * size as usize],
        };
        // SAFETY: the ring's memory is mapped above for `count` entries and
        // stays mapped; the buffers it names live in `memory`, which is
        // never resized.
        unsafe { ring.submitter().register_buf_ring(this.entries as u64, count, BUFFER_GROUP)? };
        for bid in 0..count {
            this.give_back(bid);
        }
        Ok(this)
    }

    /// The first `len` bytes of buffer `bid`, not borrowed from the ring so
    /// that the server can be used while they are read.
    ///
    /// # Safety
    ///
    /// The kernel must have just filled `len` bytes of buffer `bid`, the
    /// buffer must not go back on the ring while the slice lives, and the
    /// ring must outlive it.
    unsafe fn bytes<'a>(&self, bid: u16, len: usize) -> &'a [u8] {
        assert!(bid < self.count && len <= self.size as usize);
        let start = usize::from(bid) * self.size as usize;
        // SAFETY: in bounds (asserted); the caller keeps the bytes unchanged
        // and alive while the slice lives.
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr().add(start), len) }
    }

    fn give_back(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: `index` is below `count`, the entries mapped in `new`;
        // the kernel reads only entries behind the tail published below.
        unsafe {
            let entry = &mut *self.entries.add(index);
            entry.set_addr(self.memory.as_ptr() as u64 + u64::from(bid) * u64::from(self.size));
            entry.set_len(self.size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the u16 the kernel reads in the ring's first
        // entry; the release store publishes the entry written above.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn open_conn() -> Conn {
        Conn { open: true, ..Conn::new(-1) }
    }

    #[test]
    fn frames_of_every_length_form_echo_unmasked() {
        for len in [0, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let wire = masked(0x82, &payload, [0x12, 0x34, 0x56, 0x78]);
            let mut conn = open_conn();
            // One byte short decodes nothing; all of it, one frame.
            assert_eq!(conn.decode(&wire[..wire.len() - 1]), 0, "len {len}");
            assert_eq!(conn.decode(&wire), wire.len(), "len {len}");
            let reply = frame_unmasked(&conn.out);
            assert_eq!(reply, (0x82, payload.as_slice()), "len {len}");
        }
    }

    #[test]
    fn two_frames_in_one_read_and_a_ping() {
        let mut wire = masked(0x81, b"hello", [1, 2, 3, 4]);
        wire.extend(masked(0x89, b"p", [9, 9, 9, 9]));
        wire.extend(masked(0x81, b"wor", [5, 6, 7, 8])[..4].iter());
        let mut conn = open_conn();
        let used = conn.decode(&wire);
        assert_eq!(used, wire.len() - 4, "the cut third frame is left");
        assert_eq!(conn.out, [0x81, 5, b'h', b'e', b'l', b'l', b'o', 0x8A, 1, b'p']);
    }

    #[test]
    fn the_upgrade_is_answered_with_the_rfc_accept() {
        // RFC 6455 section 1.3's example key and accept.
        let mut conn = open_conn();
        conn.open = false;
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(conn.decode(request), request.len());
        let answer = String::from_utf8(conn.out.clone()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        assert!(answer.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{answer}");
    }

    /// The opcode byte and payload of one unmasked server frame.
    fn frame_unmasked(bytes: &[u8]) -> (u8, &[u8]) {
        let (len, start) = match bytes[1] {
            126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize, 10),
            n => (usize::from(n), 2),
        };
        assert_eq!(bytes.len(), start + len);
        (bytes[0], &bytes[start..])
    }
}
