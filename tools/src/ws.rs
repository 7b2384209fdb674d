//! The client side of WebSocket (RFC 6455), as small as a load generator
//! needs it.
//!
//! A load tool must spend less per message than the server it measures, so
//! this is not a general client: it is the few pieces `kefu-bench` drives by
//! hand from its own loops.
//!
//! - [`WsUrl`]: `ws://host:port/path`, resolved once, refused unless it
//!   points at a loopback address (this tool floods what it targets).
//! - [`handshake_request`] / [`parse_handshake_response`]: the HTTP/1.1
//!   upgrade, sans-IO, with the `Sec-WebSocket-Accept` check.
//! - [`encode_frame`]: a masked client frame. Clients must mask; the key
//!   may be the same for every frame without the server being able to tell,
//!   so hot loops encode their frames once and write the same bytes forever.
//! - [`FrameReader`]: a streaming parser of the server's unmasked frames. It
//!   is fed whatever a read returned and reports headers and payload slices
//!   through a callback, keeping at most one partial header (14 bytes) of
//!   its own: nothing is allocated or copied per message, and a 16 KiB
//!   payload split over three reads costs three slice hand-outs.
//! - [`connect`] and [`handshake`]: the two monoio steps that open a
//!   connection, the first optionally from a chosen source address so that
//!   tens of thousands of connections can be spread over 127.0.0.2, .3, …
//!   instead of exhausting one address's ephemeral ports.

use std::{
    io,
    net::{IpAddr, SocketAddr, ToSocketAddrs as _},
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use monoio::{
    io::{AsyncReadRent as _, AsyncWriteRentExt as _},
    net::TcpStream,
};
use sha1::{Digest as _, Sha1};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Status code of a normal close (RFC 6455 §7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The longest HTTP response head we wait for before calling it malformed.
const RESPONSE_HEAD_BYTES_MAX: usize = 8 * 1024;

/// A parsed and resolved `ws://` URL.
#[derive(Debug, Clone)]
pub struct WsUrl {
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Request target, starting with `/`.
    pub path: String,
}

impl WsUrl {
    /// Parses `ws://host[:port][/path]` and resolves the host. Unless
    /// `allow_non_loopback`, anything outside 127.0.0.0/8 and ::1 is refused:
    /// a mistyped URL must not turn a benchmark into an attack.
    pub fn parse(url: &str, allow_non_loopback: bool) -> anyhow::Result<Self> {
        let rest =
            url.strip_prefix("ws://").ok_or_else(|| anyhow!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            bail!("{url}: no host");
        }
        // A port is present after the last ':' unless that ':' is inside an
        // IPv6 literal's brackets.
        let has_port = match authority.rfind(':') {
            Some(i) => !authority[i..].contains(']'),
            None => false,
        };
        let with_port = if has_port { authority.to_owned() } else { format!("{authority}:80") };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("{url}: resolving {with_port}"))?
            .next()
            .ok_or_else(|| anyhow!("{url}: {with_port} resolved to nothing"))?;
        if !allow_non_loopback && !addr.ip().is_loopback() {
            bail!("{url}: {} is not a loopback address; pass --allow-non-loopback if you mean it", addr.ip());
        }
        Ok(Self { authority: authority.to_owned(), addr, path: path.to_owned() })
    }
}

/// A fresh random `Sec-WebSocket-Key`.
pub fn random_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with.
pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The upgrade request for `url`, asking for `protocol` if given.
pub fn handshake_request(url: &WsUrl, key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        url.path, url.authority
    );
    if let Some(protocol) = protocol {
        request.push_str("Sec-WebSocket-Protocol: ");
        request.push_str(protocol);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// Where a 429's error text gives the response's `Retry-After`
/// (seconds, `?` without one): [`retry_after`] reads it back.
const RETRY_AFTER: &str = "Retry-After: ";

/// The `Retry-After` of a 429 that [`handshake`] reported as `error`, if
/// it was one and gave a number of seconds.
pub fn retry_after(error: &str) -> Option<Duration> {
    let (_, after) = error.rsplit_once(RETRY_AFTER)?;
    let secs: u64 = after.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// `error` without the `Retry-After` a 429's text ends with, so that
/// refusals are counted as one kind whatever wait each was given.
pub fn without_retry_after(error: &str) -> &str {
    error.rsplit_once(RETRY_AFTER).map_or(error, |(before, _)| before.trim_end())
}

/// Parses the server's answer to the upgrade. `Ok(None)`: the head is not
/// complete yet, read more. `Ok(Some(n))`: the first `n` bytes were a valid
/// 101 response; anything after them is already WebSocket frames.
pub fn parse_handshake_response(buf: &[u8], key: &str) -> anyhow::Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf).context("malformed HTTP response")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= RESPONSE_HEAD_BYTES_MAX => {
            bail!("HTTP response head longer than {RESPONSE_HEAD_BYTES_MAX} bytes")
        }
        httparse::Status::Partial => return Ok(None),
    };
    let code = response.code.unwrap_or(0);
    if code == 429 {
        // kefu's per-address handshake limit: a load test from a few
        // addresses meets it unless the gateway's run lifts it.
        let retry_after = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .unwrap_or("?");
        bail!(
            "server answered 429 Too Many Requests instead of 101 (kefu's \
             limits.new_connections_per_s_per_ip / new_connections_burst_per_ip; lift them for a load test) \
             {RETRY_AFTER}{retry_after}"
        );
    }
    if code != 101 {
        bail!("server answered {code} {} instead of 101", response.reason.unwrap_or(""));
    }
    let accept = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .ok_or_else(|| anyhow!("101 without Sec-WebSocket-Accept"))?;
    if accept.value != accept_for(key).as_bytes() {
        bail!("wrong Sec-WebSocket-Accept");
    }
    Ok(Some(head_len))
}

/// Appends one masked client frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    match payload.len() {
        // The casts are exact: each arm bounds the length.
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// One server frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub payload_len: u64,
}

/// What [`FrameReader::feed`] reports, in stream order.
#[derive(Debug)]
pub enum Event<'a> {
    /// A frame begins; its payload follows.
    Start(Header),
    /// A piece of the current frame's payload (never empty).
    Payload(&'a [u8]),
    /// The current frame's payload is complete.
    End(Header),
}

/// Why the server's byte stream is not valid WebSocket. Any of these ends the
/// connection: after one bad header the framing is lost.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("server frame is masked (RFC 6455 §5.1 forbids it)")]
    Masked,
    #[error("reserved bits {0:#x} set without a negotiated extension")]
    Reserved(u8),
    #[error("reserved opcode {0:#x}")]
    Opcode(u8),
    #[error("control frame {opcode:#x} fragmented or longer than 125 bytes ({len})")]
    Control { opcode: u8, len: u64 },
    #[error("64-bit payload length with the high bit set")]
    Length,
}

#[derive(Debug, Clone, Copy)]
enum ReadState {
    Header,
    Payload { header: Header, remaining: u64 },
}

/// Streaming parser of server (unmasked) frames; see the module comment.
#[derive(Debug)]
pub struct FrameReader {
    state: ReadState,
    /// The header being assembled when it arrives split across reads.
    header: [u8; 14],
    header_len: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        Self { state: ReadState::Header, header: [0; 14], header_len: 0 }
    }

    /// Consumes all of `data`, calling `on` for each event. On error the
    /// reader is left as it was at the bad header; drop the connection.
    pub fn feed(&mut self, mut data: &[u8], mut on: impl FnMut(Event<'_>)) -> Result<(), FrameError> {
        loop {
            match self.state {
                ReadState::Header => {
                    // Collect 2 bytes, then as many as those 2 say the header
                    // has; at most 14 bytes are ever copied per frame.
                    let wanted = if self.header_len < 2 { 2 } else { header_len(self.header[1]) };
                    if self.header_len < wanted {
                        if data.is_empty() {
                            return Ok(());
                        }
                        let take = (wanted - self.header_len).min(data.len());
                        self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                        self.header_len += take;
                        data = &data[take..];
                        continue;
                    }
                    let header = parse_header(&self.header[..self.header_len])?;
                    self.header_len = 0;
                    on(Event::Start(header));
                    // A frame with no payload ends here, even when its header
                    // was the last byte of `data`: a bare ping or close must
                    // not wait for the next read to be seen.
                    if header.payload_len == 0 {
                        on(Event::End(header));
                    } else {
                        self.state = ReadState::Payload { header, remaining: header.payload_len };
                    }
                }
                ReadState::Payload { header, remaining } => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    // `take` fits in usize: it is at most data.len().
                    let take = remaining.min(data.len() as u64) as usize;
                    on(Event::Payload(&data[..take]));
                    data = &data[take..];
                    let remaining = remaining - take as u64;
                    if remaining == 0 {
                        on(Event::End(header));
                        self.state = ReadState::Header;
                    } else {
                        self.state = ReadState::Payload { header, remaining };
                    }
                }
            }
        }
    }
}

/// Header length implied by the second header byte of an unmasked frame.
fn header_len(second: u8) -> usize {
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    match second & 0x7F {
        126 => 4 + mask,
        127 => 10 + mask,
        _ => 2 + mask,
    }
}

fn parse_header(bytes: &[u8]) -> Result<Header, FrameError> {
    let (first, second) = (bytes[0], bytes[1]);
    if second & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    if first & 0x70 != 0 {
        return Err(FrameError::Reserved(first & 0x70));
    }
    let fin = first & 0x80 != 0;
    let opcode = first & 0x0F;
    let payload_len = match second & 0x7F {
        126 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
        127 => {
            let mut eight = [0; 8];
            eight.copy_from_slice(&bytes[2..10]);
            let len = u64::from_be_bytes(eight);
            if len >> 63 != 0 {
                return Err(FrameError::Length);
            }
            len
        }
        n => u64::from(n),
    };
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || payload_len > 125 {
                return Err(FrameError::Control { opcode, len: payload_len });
            }
        }
        other => return Err(FrameError::Opcode(other)),
    }
    Ok(Header { fin, opcode, payload_len })
}

/// Opens a TCP connection to `dst`, from `source` if given, with Nagle off.
///
/// Binding first (with `IP_BIND_ADDRESS_NO_PORT`, so the port is still
/// chosen at connect time per destination) is how one host opens more
/// connections to one server port than one address's ephemeral range
/// allows. The socket is connected non-blocking and handed to monoio, which
/// waits for writability: monoio's own connect cannot bind first.
pub async fn connect(dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    connect_with(dst, source, None).await
}

/// [`connect`], with the socket's receive buffer set to `rcvbuf_bytes`
/// first if given: set before the connect, it also bounds the window the
/// peer is offered, so a client that stops reading stalls the sender after
/// a few KiB instead of megabytes of autotuned buffer.
pub async fn connect_with(
    dst: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf_bytes: Option<usize>,
) -> io::Result<TcpStream> {
    if source.is_none() && rcvbuf_bytes.is_none() {
        let stream = TcpStream::connect_addr(dst).await?;
        stream.set_nodelay(true)?;
        return Ok(stream);
    }
    let domain = socket2::Domain::for_address(dst);
    let socket = socket2::Socket::new(
        domain,
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(bytes) = rcvbuf_bytes {
        socket.set_recv_buffer_size(bytes)?;
    }
    if let Some(source) = source {
        if source.is_ipv4() {
            // Best effort: without it the bind still works, it just reserves
            // the port for every destination.
            let _ = set_bind_address_no_port(socket.as_raw_fd());
        }
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    socket.set_tcp_nodelay(true)?;
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable(false).await?;
    // Writability also signals a failed connect; the reason is in SO_ERROR.
    match socket_error(stream.as_raw_fd())? {
        0 => Ok(stream),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux ≥ 4.2), which socket2 does not wrap.
fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket owned by the caller for the duration of
    // the call; the option value points at a live c_int and the length
    // passed is exactly its size, so the kernel reads only valid memory.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Reads and clears `SO_ERROR`: the outcome of a non-blocking connect.
fn socket_error(fd: RawFd) -> io::Result<libc::c_int> {
    let mut errno: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket borrowed from a live stream; `errno`
    // and `len` are live locals, and `len` tells the kernel the exact size
    // of the buffer it may write.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut errno).cast(), &raw mut len)
    };
    if rc == 0 { Ok(errno) } else { Err(io::Error::last_os_error()) }
}

/// Runs the upgrade on `stream` and returns the bytes that arrived after the
/// 101 response (usually none; they are frames and belong to the caller).
pub async fn handshake(
    stream: &mut TcpStream,
    url: &WsUrl,
    protocol: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    let key = random_key();
    let (result, _) = stream.write_all(handshake_request(url, &key, protocol)).await;
    result.context("writing the upgrade request")?;
    let mut head: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let chunk = Vec::with_capacity(1024);
        let (result, chunk) = stream.read(chunk).await;
        if result.context("reading the upgrade response")? == 0 {
            bail!("server closed during the handshake");
        }
        head.extend_from_slice(&chunk);
        if let Some(n) = parse_handshake_response(&head, &key)? {
            return Ok(head.split_off(n));
        }
    }
}

/// Connects (from `source` if given) and upgrades, all within `limit`.
/// The error is short and names its kind (`connect: EMFILE`,
/// `handshake: …`, `timeout`), because reports tally errors by it.
pub async fn open(
    url: &WsUrl,
    source: Option<IpAddr>,
    protocol: Option<&str>,
    limit: Duration,
) -> Result<(TcpStream, Vec<u8>), String> {
    let attempt = async {
        let mut stream =
            connect(url.addr, source).await.map_err(|e| format!("connect: {}", errno_name(&e)))?;
        let leftover =
            handshake(&mut stream, url, protocol).await.map_err(|e| format!("handshake: {e:#}"))?;
        Ok((stream, leftover))
    };
    match monoio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timeout: no connect+handshake within {} ms", limit.as_millis())),
    }
}

/// A name for the limit an OS error met, for reports that must say which
/// wall was hit (EMFILE, EADDRNOTAVAIL, …) rather than "error".
pub fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        Some(libc::EADDRINUSE) => "EADDRINUSE",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::ENOBUFS) => "ENOBUFS",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EPIPE) => "EPIPE",
        Some(n) => return format!("errno {n}"),
        None => return format!("{:?}", e.kind()),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(n as u8),
            n @ 126..=0xFFFF => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `bytes` in pieces of `step` and returns (frames, payload bytes).
    fn collect(bytes: &[u8], step: usize) -> (Vec<Header>, Vec<u8>) {
        let mut reader = FrameReader::new();
        let mut ends = Vec::new();
        let mut payload = Vec::new();
        for chunk in bytes.chunks(step) {
            reader
                .feed(chunk, |event| match event {
                    Event::Start(_) => {}
                    Event::Payload(p) => payload.extend_from_slice(p),
                    Event::End(h) => ends.push(h),
                })
                .expect("valid frames");
        }
        (ends, payload)
    }

    #[test]
    fn frames_survive_any_split() {
        let big = vec![7u8; 70_000];
        let mut stream = server_frame(true, OP_TEXT, b"hello");
        stream.extend(server_frame(true, OP_PING, b""));
        stream.extend(server_frame(true, OP_BINARY, &big));
        stream.extend(server_frame(true, OP_BINARY, &big[..300]));
        for step in [1, 2, 3, 7, 13, 1000, 1 << 20] {
            let (ends, payload) = collect(&stream, step);
            assert_eq!(ends.len(), 4, "step {step}");
            assert_eq!(ends[1].opcode, OP_PING);
            assert_eq!(ends[2].payload_len, 70_000);
            assert_eq!(payload.len(), 5 + 70_000 + 300, "step {step}");
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut reader = FrameReader::new();
        assert_eq!(reader.feed(&[0x81, 0x85, 1, 2, 3, 4], |_| {}), Err(FrameError::Masked));
        let mut reader = FrameReader::new();
        assert_eq!(reader.feed(&[0xC1, 0x00], |_| {}), Err(FrameError::Reserved(0x40)));
        let mut reader = FrameReader::new();
        assert_eq!(reader.feed(&[0x83, 0x00], |_| {}), Err(FrameError::Opcode(3)));
        let mut reader = FrameReader::new();
        assert!(matches!(reader.feed(&[0x09, 0x00], |_| {}), Err(FrameError::Control { .. })));
    }

    #[test]
    fn masked_frames_unmask_to_the_payload() {
        let mask = [1, 2, 3, 4];
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, true, OP_BINARY, &payload, mask);
            let head = out.len() - len;
            let unmasked: Vec<u8> = out[head..].iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m).collect();
            assert_eq!(unmasked, payload, "len {len}");
            assert_eq!(&out[head - 4..head], &mask);
        }
    }

    #[test]
    fn accept_matches_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn handshake_response_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_handshake_response(ok, key).ok().flatten(), Some(ok.len() - 2));
        assert!(matches!(parse_handshake_response(&ok[..20], key), Ok(None)));
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(parse_handshake_response(wrong, key).is_err());
        let refused = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert!(parse_handshake_response(refused, key).is_err());
    }

    #[test]
    fn a_429_says_when_to_come_back() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let limited = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\n\r\n";
        let error = parse_handshake_response(limited, key).expect_err("a 429 is an error").to_string();
        assert_eq!(retry_after(&error), Some(Duration::from_secs(2)), "{error}");
        assert!(without_retry_after(&error).ends_with("lift them for a load test)"), "{error}");
        let bare = b"HTTP/1.1 429 Too Many Requests\r\n\r\n";
        let error = parse_handshake_response(bare, key).expect_err("a 429 is an error").to_string();
        assert_eq!(retry_after(&error), None, "{error}");
        assert_eq!(retry_after("connect: ECONNREFUSED"), None);
    }

    #[test]
    fn socket_options_reach_the_kernel() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        set_bind_address_no_port(socket.as_raw_fd()).expect("IP_BIND_ADDRESS_NO_PORT");
        assert_eq!(socket_error(socket.as_raw_fd()).expect("SO_ERROR"), 0);
        assert!(set_bind_address_no_port(-1).is_err());
        assert!(socket_error(-1).is_err());
    }

    #[test]
    fn connect_from_a_source_address_reports_refusal() {
        // Bind a port and drop the listener so that nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dst = SocketAddr::from(([127, 0, 0, 1], port));
        let result = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(connect(dst, Some(IpAddr::from([127, 0, 0, 2]))));
        let Err(error) = result else {
            panic!("connected to {dst}, where nothing listens");
        };
        assert_eq!(error.raw_os_error(), Some(libc::ECONNREFUSED), "{error}");
    }

    #[test]
    fn urls_parse_and_non_loopback_is_refused() {
        let url = WsUrl::parse("ws://127.0.0.1:8080/ws/echo", false).expect("loopback url");
        assert_eq!(url.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(url.path, "/ws/echo");
        assert_eq!(url.authority, "127.0.0.1:8080");
        let bare = WsUrl::parse("ws://127.0.0.2", false).expect("bare url");
        assert_eq!(bare.addr.port(), 80);
        assert_eq!(bare.path, "/");
        assert!(WsUrl::parse("ws://10.1.2.3:80/", false).is_err());
        assert!(WsUrl::parse("wss://127.0.0.1/", false).is_err());
    }
}
