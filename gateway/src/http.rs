//! HTTP/1.1 request heads and small responses, sans-IO.
//!
//! Every connection to the gateway starts as HTTP/1.1: a WebSocket upgrade
//! (see `ws::handshake`), `/healthz`, `/metrics`, the console's files. This
//! file parses the request head (request line and headers) out of whatever
//! bytes a read produced, without copying, and writes the short responses
//! the gateway sends, into a caller's buffer, without allocating.
//!
//! The head is parsed with `httparse` against a fixed array of header slots
//! the caller provides, and only the first `max_head_bytes` of the input are
//! ever looked at. Those two bounds are the whole defence against a client
//! that sends an endless head: it gets 431 and the connection closes, having
//! cost one read buffer. A head that is merely incomplete asks for more
//! bytes; the caller keeps what it has and reads again.
//!
//! Bytes after the head (a pipelined request, or a client's first WebSocket
//! frames sent before our 101 arrived) are not part of the head:
//! [`Head::len`] says where they start, so the caller keeps them.

use std::fmt;
use std::io::Write;

/// Why a request head was refused, and the status to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The head is longer than the limit, or has more headers than there
    /// are slots for (431 Request Header Fields Too Large).
    TooLarge,
    /// The head is not valid HTTP/1.x (400 Bad Request).
    Malformed,
}

impl HttpError {
    /// The HTTP status to answer with before closing.
    pub fn status(self) -> u16 {
        match self {
            HttpError::TooLarge => 431,
            HttpError::Malformed => 400,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpError::TooLarge => "request head too large",
            HttpError::Malformed => "malformed request head",
        })
    }
}

impl std::error::Error for HttpError {}

/// A parsed request head. It borrows the input buffer (`'b`) and the
/// caller's header slots (`'h`), so nothing is copied.
#[derive(Clone, Copy, Debug)]
pub struct Head<'h, 'b> {
    method: &'b str,
    target: &'b str,
    version: u8,
    headers: &'h [httparse::Header<'b>],
    len: usize,
}

impl<'h, 'b> Head<'h, 'b> {
    /// The method, such as `GET` (case-sensitive, as HTTP defines it).
    pub fn method(&self) -> &'b str {
        self.method
    }

    /// The request target as sent, such as `/ws?token=abc`.
    pub fn target(&self) -> &'b str {
        self.target
    }

    /// The path: the target up to any `?`.
    pub fn path(&self) -> &'b str {
        self.target.split_once('?').map_or(self.target, |(path, _)| path)
    }

    /// The query string after the `?`, if there was one (possibly empty).
    /// Not percent-decoded.
    pub fn query(&self) -> Option<&'b str> {
        self.target.split_once('?').map(|(_, query)| query)
    }

    /// The HTTP minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Every header, in order.
    pub fn headers(&self) -> &'h [httparse::Header<'b>] {
        self.headers
    }

    /// The value of the first header called `name` (compared
    /// case-insensitively), if any.
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }

    /// The length of the head in bytes, including the blank line that ends
    /// it. Input bytes from here on belong to whatever follows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a complete head has at least a request line.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Parses the request head at the start of `buf` into the caller's header
/// slots.
///
/// Returns `Ok(None)` if the head is not complete yet and `buf` is still
/// shorter than `max_head_bytes` (read more and call again with the longer
/// buffer), `Err(HttpError::TooLarge)` if the head does not end within
/// `max_head_bytes` or has more headers than `headers` has slots, and
/// `Err(HttpError::Malformed)` if it is not valid HTTP/1.x or its target is
/// not a path (origin form, starting with `/`).
pub fn parse_head<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
    max_head_bytes: usize,
) -> Result<Option<Head<'h, 'b>>, HttpError> {
    // Never look past the limit, whatever the read delivered.
    let window = buf.get(..max_head_bytes).unwrap_or(buf);
    let mut request = httparse::Request::new(headers);
    match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => {
            let httparse::Request { method, path, version, headers } = request;
            // httparse fills all three on a complete parse; a missing one is
            // treated as malformed rather than trusted.
            let (Some(method), Some(target), Some(version)) = (method, path, version) else {
                return Err(HttpError::Malformed);
            };
            if !target.starts_with('/') {
                return Err(HttpError::Malformed);
            }
            Ok(Some(Head { method, target, version, headers, len }))
        }
        Ok(httparse::Status::Partial) if buf.len() < max_head_bytes => Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => Err(HttpError::TooLarge),
        Err(_) => Err(HttpError::Malformed),
    }
}

/// The standard reason phrase for the statuses the gateway sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Why a response could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// The output buffer is too small for the response.
    BufferTooSmall,
    /// A reason phrase, header name or value contains a character that
    /// would break the response apart (CR, LF, or `:` in a name), or a name
    /// is empty. Refused so that no value can inject headers.
    InvalidHeader,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteError::BufferTooSmall => "response does not fit in the output buffer",
            WriteError::InvalidHeader => "invalid character in a response header",
        })
    }
}

impl std::error::Error for WriteError {}

/// Writes a complete response with a body into `out` and returns its
/// length.
///
/// The head is `HTTP/1.1 {status} {reason}`, then `Content-Type` (left out
/// if `content_type` is empty), `Content-Length`, `extra_headers` in order,
/// and `Connection: close` if `close`. The gateway closes after every
/// plain HTTP response except where it deliberately keeps the connection
/// (`close == false`); the 101 of a WebSocket upgrade is written by
/// `ws::handshake` instead.
pub fn write_simple_response(
    out: &mut [u8],
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    close: bool,
) -> Result<usize, WriteError> {
    let head = write_head(out, status, reason, content_type, body.len(), extra_headers, close)?;
    let end = head + body.len();
    out.get_mut(head..end).ok_or(WriteError::BufferTooSmall)?.copy_from_slice(body);
    Ok(end)
}

/// Writes a response head announcing a body of `content_length` bytes,
/// which the caller sends after it (a large static file is written from
/// where it lives rather than copied behind the head). Same layout and
/// checks as [`write_simple_response`]; returns the head's length.
pub fn write_head(
    out: &mut [u8],
    status: u16,
    reason: &str,
    content_type: &str,
    content_length: usize,
    extra_headers: &[(&str, &str)],
    close: bool,
) -> Result<usize, WriteError> {
    let names_ok = extra_headers.iter().all(|(name, value)| is_header_name(name) && is_header_text(value));
    if !names_ok || !is_header_text(reason) || !is_header_text(content_type) {
        return Err(WriteError::InvalidHeader);
    }
    let capacity = out.len();
    let mut w: &mut [u8] = out;
    let written = (|| -> std::io::Result<()> {
        write!(w, "HTTP/1.1 {status} {reason}\r\n")?;
        if !content_type.is_empty() {
            write!(w, "Content-Type: {content_type}\r\n")?;
        }
        write!(w, "Content-Length: {content_length}\r\n")?;
        for (name, value) in extra_headers {
            write!(w, "{name}: {value}\r\n")?;
        }
        if close {
            w.write_all(b"Connection: close\r\n")?;
        }
        w.write_all(b"\r\n")
    })();
    match written {
        Ok(()) => Ok(capacity - w.len()),
        Err(_) => Err(WriteError::BufferTooSmall),
    }
}

/// Writes an error (or other body-less status) response: a `text/plain`
/// body saying `message`, the standard reason phrase, `extra_headers`, and
/// `Connection: close`.
pub fn write_error_response(
    out: &mut [u8],
    status: u16,
    message: &str,
    extra_headers: &[(&str, &str)],
) -> Result<usize, WriteError> {
    write_simple_response(
        out,
        status,
        reason_phrase(status),
        "text/plain; charset=utf-8",
        message.as_bytes(),
        extra_headers,
        true,
    )
}

fn is_header_text(s: &str) -> bool {
    !s.bytes().any(|b| b == b'\r' || b == b'\n')
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use httparse::EMPTY_HEADER;

    const MAX: usize = 8192;

    const UPGRADE: &[u8] = b"GET /ws?token=abc&v=1 HTTP/1.1\r\n\
        Host: chat.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\
        \r\n";

    fn parse(buf: &[u8], max: usize) -> Result<Option<usize>, HttpError> {
        let mut headers = [EMPTY_HEADER; 16];
        parse_head(buf, &mut headers, max).map(|h| h.map(|h| h.len()))
    }

    #[test]
    fn a_complete_head_exposes_its_parts() {
        let mut headers = [EMPTY_HEADER; 16];
        let head = parse_head(UPGRADE, &mut headers, MAX).unwrap().unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.target(), "/ws?token=abc&v=1");
        assert_eq!(head.path(), "/ws");
        assert_eq!(head.query(), Some("token=abc&v=1"));
        assert_eq!(head.version(), 1);
        assert_eq!(head.len(), UPGRADE.len());
        assert!(!head.is_empty());
        assert_eq!(head.headers().len(), 5);
        assert_eq!(head.header("host"), Some(&b"chat.example.com"[..]));
        assert_eq!(head.header("SEC-WEBSOCKET-VERSION"), Some(&b"13"[..]));
        assert_eq!(head.header("Origin"), None);
        // The parsed head feeds the WebSocket handshake directly.
        let accept = crate::ws::handshake::accept(head.method(), head.version(), head.headers()).unwrap();
        assert_eq!(accept.accept_key(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn paths_and_queries() {
        for (target, path, query) in [
            ("/", "/", None),
            ("/healthz", "/healthz", None),
            ("/ws?", "/ws", Some("")),
            ("/a/b?x=1?y", "/a/b", Some("x=1?y")),
        ] {
            let req = format!("GET {target} HTTP/1.1\r\n\r\n");
            let mut headers = [EMPTY_HEADER; 4];
            let head = parse_head(req.as_bytes(), &mut headers, MAX).unwrap().unwrap();
            assert_eq!((head.path(), head.query()), (path, query), "{target}");
        }
    }

    #[test]
    fn first_header_of_a_name_wins_and_http_1_0_is_reported() {
        let req = b"GET / HTTP/1.0\r\nX-A: 1\r\nx-a: 2\r\n\r\n";
        let mut headers = [EMPTY_HEADER; 4];
        let head = parse_head(req, &mut headers, MAX).unwrap().unwrap();
        assert_eq!(head.version(), 0);
        assert_eq!(head.header("X-a"), Some(&b"1"[..]));
    }

    #[test]
    fn an_incomplete_head_asks_for_more_at_every_prefix() {
        for end in 0..UPGRADE.len() {
            assert_eq!(parse(&UPGRADE[..end], MAX), Ok(None), "prefix of {end}");
        }
        assert_eq!(parse(UPGRADE, MAX), Ok(Some(UPGRADE.len())));
    }

    #[test]
    fn bytes_after_the_head_are_not_part_of_it() {
        let mut buf = UPGRADE.to_vec();
        let frame = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        buf.extend_from_slice(&frame);
        assert_eq!(parse(&buf, MAX), Ok(Some(UPGRADE.len())));
        assert_eq!(&buf[UPGRADE.len()..], frame);
        // Two pipelined requests: the first head is parsed, the second kept.
        let pipelined = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(parse(pipelined, MAX), Ok(Some(19)));
        assert_eq!(parse(&pipelined[19..], MAX), Ok(Some(19)));
    }

    #[test]
    fn a_head_over_the_limit_is_too_large() {
        let n = UPGRADE.len();
        // Exactly the limit fits; one byte less does not.
        assert_eq!(parse(UPGRADE, n), Ok(Some(n)));
        assert_eq!(parse(UPGRADE, n - 1), Err(HttpError::TooLarge));
        // Still incomplete at the limit: too large, without waiting.
        assert_eq!(parse(&UPGRADE[..40], 40), Err(HttpError::TooLarge));
        assert_eq!(parse(&UPGRADE[..39], 40), Ok(None));
        // An endless header line.
        let mut endless = b"GET / HTTP/1.1\r\nX-Junk: ".to_vec();
        endless.extend(std::iter::repeat_n(b'a', 10_000));
        assert_eq!(parse(&endless, 4096), Err(HttpError::TooLarge));
        assert_eq!(HttpError::TooLarge.status(), 431);
    }

    #[test]
    fn more_headers_than_slots_is_too_large() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..5 {
            req.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let mut four = [EMPTY_HEADER; 4];
        assert_eq!(parse_head(&req, &mut four, MAX).map(|h| h.is_some()), Err(HttpError::TooLarge));
        let mut five = [EMPTY_HEADER; 5];
        assert!(parse_head(&req, &mut five, MAX).unwrap().is_some());
    }

    #[test]
    fn malformed_heads_are_400() {
        for bad in [
            &b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"\x00\x01\x02\x03",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET http://example.com/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(bad, MAX), Err(HttpError::Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(HttpError::Malformed.status(), 400);
        assert_eq!(HttpError::Malformed.to_string(), "malformed request head");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 {
                let mut prefixed = b"GET / HTTP/1.1\r\n".to_vec();
                prefixed.append(&mut buf);
                buf = prefixed;
            }
            let max = (next() % 80) as usize;
            let _ = parse(&buf, max);
        }
    }

    fn written(
        status: u16,
        reason: &str,
        ct: &str,
        body: &[u8],
        extra: &[(&str, &str)],
        close: bool,
    ) -> String {
        let mut out = [0u8; 512];
        let n = write_simple_response(&mut out, status, reason, ct, body, extra, close).unwrap();
        String::from_utf8(out[..n].to_vec()).unwrap()
    }

    #[test]
    fn simple_responses_are_written_exactly() {
        assert_eq!(
            written(200, "OK", "text/plain", b"ok\n", &[], true),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        assert_eq!(
            written(503, "Service Unavailable", "", b"", &[("Retry-After", "5")], true),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            written(200, "OK", "application/json", b"{}", &[], false),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn error_responses_use_the_standard_phrase_and_close() {
        for status in [400u16, 403, 404, 405, 426, 431, 503] {
            let mut out = [0u8; 256];
            let n =
                write_error_response(&mut out, status, "nope", &[("Sec-WebSocket-Version", "13")]).unwrap();
            let text = std::str::from_utf8(&out[..n]).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status))), "{text}");
            assert!(!reason_phrase(status).is_empty());
            assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
            assert!(text.contains("\r\nConnection: close\r\n\r\nnope"));
            // The response parses back as HTTP.
            let mut headers = [EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut headers);
            assert_eq!(resp.parse(&out[..n]), Ok(httparse::Status::Complete(n - 4)));
            assert_eq!(resp.code, Some(status));
        }
        assert_eq!(reason_phrase(299), "");
    }

    #[test]
    fn too_small_buffers_are_refused_at_every_length() {
        let full = written(404, "Not Found", "text/plain", b"missing", &[("X", "y")], true);
        for len in 0..full.len() {
            let mut out = vec![0u8; len];
            assert_eq!(
                write_simple_response(
                    &mut out,
                    404,
                    "Not Found",
                    "text/plain",
                    b"missing",
                    &[("X", "y")],
                    true
                ),
                Err(WriteError::BufferTooSmall),
                "{len}"
            );
        }
        let mut out = vec![0u8; full.len()];
        assert_eq!(
            write_simple_response(&mut out, 404, "Not Found", "text/plain", b"missing", &[("X", "y")], true),
            Ok(full.len())
        );
    }

    #[test]
    fn header_injection_is_refused() {
        let mut out = [0u8; 256];
        for (reason, ct, extra) in [
            ("OK\r\nSet-Cookie: x", "text/plain", &[][..]),
            ("OK", "text/plain\r\nX: y", &[]),
            ("OK", "text/plain", &[("X", "a\nb")]),
            ("OK", "text/plain", &[("X: y", "z")]),
            ("OK", "text/plain", &[("", "z")]),
            ("OK", "text/plain", &[("X Y", "z")]),
        ] {
            assert_eq!(
                write_simple_response(&mut out, 200, reason, ct, b"", extra, true),
                Err(WriteError::InvalidHeader)
            );
        }
        assert!(!WriteError::InvalidHeader.to_string().is_empty());
    }
}
