//! The server side of the WebSocket opening handshake (RFC 6455 §4.2),
//! sans-IO.
//!
//! A WebSocket starts life as an HTTP/1.1 `GET` that asks to switch
//! protocols:
//!
//! ```text
//! GET /ws HTTP/1.1
//! Host: chat.example.com
//! Upgrade: websocket
//! Connection: Upgrade
//! Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==
//! Sec-WebSocket-Version: 13
//! Sec-WebSocket-Protocol: kefu.v1.fb, kefu.v1.json
//! ```
//!
//! and the server agrees with a `101`, proving it understood the request by
//! hashing the client's key with a fixed GUID (so that no cache or
//! non-WebSocket server can accept by accident):
//!
//! ```text
//! HTTP/1.1 101 Switching Protocols
//! Upgrade: websocket
//! Connection: Upgrade
//! Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=
//! Sec-WebSocket-Protocol: kefu.v1.fb
//! ```
//!
//! [`accept`] checks a parsed request (the HTTP parsing is the caller's) and
//! returns either an [`Accept`], which writes that response into a
//! caller-provided buffer, or a [`HandshakeError`] that says which HTTP error
//! to answer with. It also chooses the kefu [`Subprotocol`]: the first one in
//! the client's order that the gateway speaks. A client that names none gets
//! JSON (so any plain WebSocket client works); a client that names only
//! protocols we do not speak is refused rather than silently given one it
//! did not ask for.
//!
//! No extensions are negotiated: `Sec-WebSocket-Extensions` is ignored and
//! the response never carries it, so every frame's reserved bits must be 0.

use std::fmt;
use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 §1.3 appends to the client's key before hashing.
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only WebSocket version (RFC 6455) the gateway speaks.
pub const WEBSOCKET_VERSION: &str = "13";

/// The `Sec-WebSocket-Accept` value: base64 of a 20-byte SHA-1 digest.
pub const ACCEPT_KEY_BYTES: usize = 28;

/// The `Sec-WebSocket-Key` value: base64 of 16 random bytes, padded.
const CLIENT_KEY_BYTES: usize = 24;

/// An upper bound on the length of any response [`Accept::write_response`]
/// writes (the longest is about 170 bytes); a buffer this size always fits.
pub const MAX_RESPONSE_BYTES: usize = 192;

/// The application protocol spoken over the WebSocket, chosen with
/// `Sec-WebSocket-Protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subprotocol {
    /// `kefu.v1.json`: JSON commands in text frames (the console, any
    /// standard client). The default when the client names none.
    Json,
    /// `kefu.v1.fb`: FlatBuffers commands in binary frames (SDKs, the bench
    /// tool).
    FlatBuffers,
}

impl Subprotocol {
    /// Every subprotocol the gateway speaks.
    pub const ALL: [Subprotocol; 2] = [Subprotocol::Json, Subprotocol::FlatBuffers];

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::Json => "kefu.v1.json",
            Subprotocol::FlatBuffers => "kefu.v1.fb",
        }
    }

    /// The subprotocol with this exact name. Subprotocol names are tokens
    /// compared as is (RFC 6455 §4.1 lets a server compare them
    /// case-sensitively), so `KEFU.V1.JSON` is not ours.
    pub fn from_name(name: &[u8]) -> Option<Subprotocol> {
        Subprotocol::ALL.into_iter().find(|p| p.name().as_bytes() == name)
    }
}

/// Why an upgrade request was refused, and the HTTP answer it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not a `GET` (405, with `Allow: GET`).
    MethodNotAllowed,
    /// Not HTTP/1.1 (400): RFC 6455 requires 1.1 or later, and the parser
    /// reads only 1.0 and 1.1.
    HttpVersion,
    /// No `Upgrade: websocket` (400).
    MissingUpgrade,
    /// No `upgrade` token in `Connection` (400).
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13 (426, with
    /// `Sec-WebSocket-Version: 13` telling the client what we speak).
    UnsupportedVersion,
    /// No `Sec-WebSocket-Key` (400).
    MissingKey,
    /// A `Sec-WebSocket-Key` that is not base64 of exactly 16 bytes, or more
    /// than one (400).
    InvalidKey,
    /// `Sec-WebSocket-Protocol` names no subprotocol the gateway speaks
    /// (400).
    UnsupportedSubprotocol,
}

impl HandshakeError {
    /// The HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::HttpVersion
            | HandshakeError::MissingUpgrade
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::MissingKey
            | HandshakeError::InvalidKey
            | HandshakeError::UnsupportedSubprotocol => 400,
        }
    }

    /// The status line's reason phrase.
    pub fn reason_phrase(self) -> &'static str {
        match self.status() {
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            _ => "Bad Request",
        }
    }

    /// Headers the error response must carry besides the usual ones.
    pub fn extra_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            HandshakeError::MethodNotAllowed => &[("Allow", "GET")],
            HandshakeError::UnsupportedVersion => {
                &[("Sec-WebSocket-Version", WEBSOCKET_VERSION), ("Upgrade", "websocket")]
            }
            _ => &[],
        }
    }

    /// A short explanation for the response body and logs.
    pub fn message(self) -> &'static str {
        match self {
            HandshakeError::MethodNotAllowed => "websocket upgrade requires GET",
            HandshakeError::HttpVersion => "websocket upgrade requires HTTP/1.1",
            HandshakeError::MissingUpgrade => "missing Upgrade: websocket",
            HandshakeError::MissingConnectionUpgrade => "missing Connection: Upgrade",
            HandshakeError::UnsupportedVersion => "unsupported Sec-WebSocket-Version (want 13)",
            HandshakeError::MissingKey => "missing Sec-WebSocket-Key",
            HandshakeError::InvalidKey => "invalid Sec-WebSocket-Key",
            HandshakeError::UnsupportedSubprotocol => "unsupported subprotocol",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for HandshakeError {}

/// The output buffer cannot hold the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferTooSmall;

impl fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response does not fit in the output buffer")
    }
}

impl std::error::Error for BufferTooSmall {}

/// An accepted upgrade: everything needed to write the `101` response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    accept_key: [u8; ACCEPT_KEY_BYTES],
    subprotocol: Subprotocol,
    /// Whether the client sent `Sec-WebSocket-Protocol`, so the response
    /// must name the chosen one (and must not if it did not).
    echo_subprotocol: bool,
}

impl Accept {
    /// The subprotocol the connection speaks from now on.
    pub fn subprotocol(&self) -> Subprotocol {
        self.subprotocol
    }

    /// The `Sec-WebSocket-Protocol` value of the response, if any.
    pub fn response_subprotocol(&self) -> Option<&'static str> {
        self.echo_subprotocol.then(|| self.subprotocol.name())
    }

    /// The `Sec-WebSocket-Accept` value.
    pub fn accept_key(&self) -> &str {
        // Base64 output is ASCII; the fallback is never taken.
        std::str::from_utf8(&self.accept_key).unwrap_or("")
    }

    /// Writes the `101 Switching Protocols` response into `out` and returns
    /// its length. A buffer of [`MAX_RESPONSE_BYTES`] always suffices.
    pub fn write_response(&self, out: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let capacity = out.len();
        let mut w: &mut [u8] = out;
        let written = (|| -> std::io::Result<()> {
            w.write_all(b"HTTP/1.1 101 Switching Protocols\r\n")?;
            w.write_all(b"Upgrade: websocket\r\nConnection: Upgrade\r\n")?;
            w.write_all(b"Sec-WebSocket-Accept: ")?;
            w.write_all(&self.accept_key)?;
            w.write_all(b"\r\n")?;
            if let Some(name) = self.response_subprotocol() {
                w.write_all(b"Sec-WebSocket-Protocol: ")?;
                w.write_all(name.as_bytes())?;
                w.write_all(b"\r\n")?;
            }
            w.write_all(b"\r\n")
        })();
        match written {
            Ok(()) => Ok(capacity - w.len()),
            Err(_) => Err(BufferTooSmall),
        }
    }
}

/// Checks an upgrade request and, if it is a valid RFC 6455 handshake for a
/// subprotocol we speak, returns how to answer it.
///
/// `version` is the HTTP minor version as `httparse` reports it (1 for
/// HTTP/1.1). Header names are compared case-insensitively; `Upgrade` and
/// `Connection` are comma-separated token lists, possibly spread over several
/// header lines. The request path is the caller's business (routing).
pub fn accept(method: &str, version: u8, headers: &[httparse::Header<'_>]) -> Result<Accept, HandshakeError> {
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if version != 1 {
        return Err(HandshakeError::HttpVersion);
    }
    if !has_token(headers, "upgrade", b"websocket") {
        return Err(HandshakeError::MissingUpgrade);
    }
    if !has_token(headers, "connection", b"upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    if !has_token(headers, "sec-websocket-version", WEBSOCKET_VERSION.as_bytes()) {
        return Err(HandshakeError::UnsupportedVersion);
    }

    let mut keys = values(headers, "sec-websocket-key");
    let key = keys.next().ok_or(HandshakeError::MissingKey)?.trim_ascii();
    if keys.next().is_some() || !is_valid_key(key) {
        return Err(HandshakeError::InvalidKey);
    }

    let (subprotocol, echo_subprotocol) = choose_subprotocol(headers)?;
    Ok(Accept { accept_key: accept_key(key), subprotocol, echo_subprotocol })
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`:
/// base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> [u8; ACCEPT_KEY_BYTES] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID.as_bytes());
    let digest = sha.finalize();
    let mut out = [0u8; ACCEPT_KEY_BYTES];
    // Cannot fail: 20 bytes encode to exactly 28.
    let _ = STANDARD.encode_slice(digest, &mut out);
    out
}

/// The client's first subprotocol that we speak, and whether the client
/// asked for any.
fn choose_subprotocol(headers: &[httparse::Header<'_>]) -> Result<(Subprotocol, bool), HandshakeError> {
    let mut asked = false;
    for value in values(headers, "sec-websocket-protocol") {
        asked = true;
        if let Some(p) = tokens(value).find_map(Subprotocol::from_name) {
            return Ok((p, true));
        }
    }
    if asked { Err(HandshakeError::UnsupportedSubprotocol) } else { Ok((Subprotocol::Json, false)) }
}

/// A key must be base64 (with padding) of exactly 16 bytes (RFC 6455
/// §4.2.1). The length check first bounds the work a client can cause.
fn is_valid_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; CLIENT_KEY_BYTES / 4 * 3];
    key.len() == CLIENT_KEY_BYTES && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// The values of every header called `name` (lowercase), in order.
fn values<'a>(headers: &'a [httparse::Header<'_>], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

/// The comma-separated tokens of a header value, trimmed, empty ones
/// skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// Whether any header called `name` lists `token` (case-insensitively).
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    values(headers, name).any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(token)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use httparse::Header;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn h<'a>(name: &'a str, value: &'a str) -> Header<'a> {
        Header { name, value: value.as_bytes() }
    }

    fn base() -> Vec<Header<'static>> {
        vec![
            h("Host", "chat.example.com"),
            h("Upgrade", "websocket"),
            h("Connection", "Upgrade"),
            h("Sec-WebSocket-Key", KEY),
            h("Sec-WebSocket-Version", "13"),
        ]
    }

    fn with(mut headers: Vec<Header<'static>>, extra: &[Header<'static>]) -> Vec<Header<'static>> {
        headers.extend_from_slice(extra);
        headers
    }

    fn without(headers: Vec<Header<'static>>, name: &str) -> Vec<Header<'static>> {
        headers.into_iter().filter(|h| !h.name.eq_ignore_ascii_case(name)).collect()
    }

    fn response(a: &Accept) -> String {
        let mut out = [0u8; MAX_RESPONSE_BYTES];
        let n = a.write_response(&mut out).unwrap();
        String::from_utf8(out[..n].to_vec()).unwrap()
    }

    #[test]
    fn the_rfc_example_key_gives_the_rfc_accept_value() {
        assert_eq!(&accept_key(KEY.as_bytes()), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn a_valid_request_without_subprotocol_gets_json_and_no_protocol_header() {
        let a = accept("GET", 1, &base()).unwrap();
        assert_eq!(a.subprotocol(), Subprotocol::Json);
        assert_eq!(a.response_subprotocol(), None);
        assert_eq!(a.accept_key(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(
            response(&a),
            "HTTP/1.1 101 Switching Protocols\r\n\
             Upgrade: websocket\r\n\
             Connection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             \r\n"
        );
    }

    #[test]
    fn the_first_supported_subprotocol_in_client_order_wins() {
        let cases: &[(&[&str], Subprotocol)] = &[
            (&["kefu.v1.json"], Subprotocol::Json),
            (&["kefu.v1.fb"], Subprotocol::FlatBuffers),
            (&["chat, kefu.v1.fb, kefu.v1.json"], Subprotocol::FlatBuffers),
            (&["kefu.v1.json,kefu.v1.fb"], Subprotocol::Json),
            (&["  soap ,  kefu.v1.fb  "], Subprotocol::FlatBuffers),
            (&["chat", "kefu.v1.json, kefu.v1.fb"], Subprotocol::Json),
            (&["", "kefu.v1.fb"], Subprotocol::FlatBuffers),
        ];
        for (values, expected) in cases {
            let mut headers = base();
            for v in *values {
                headers.push(h("Sec-WebSocket-Protocol", v));
            }
            let a = accept("GET", 1, &headers).unwrap();
            assert_eq!(a.subprotocol(), *expected, "{values:?}");
            assert_eq!(a.response_subprotocol(), Some(expected.name()));
            assert!(
                response(&a).contains(&format!("\r\nSec-WebSocket-Protocol: {}\r\n", expected.name())),
                "{values:?}"
            );
        }
    }

    #[test]
    fn a_subprotocol_header_naming_nothing_we_speak_is_400() {
        for values in [&["chat"][..], &["chat, superchat"], &["KEFU.V1.JSON"], &[""], &["kefu.v1"]] {
            let mut headers = base();
            for v in values {
                headers.push(h("sec-websocket-protocol", v));
            }
            let e = accept("GET", 1, &headers).unwrap_err();
            assert_eq!(e, HandshakeError::UnsupportedSubprotocol, "{values:?}");
            assert_eq!(e.status(), 400);
            assert_eq!(e.to_string(), "unsupported subprotocol");
        }
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive() {
        let padded_key = format!("  {KEY} ");
        let headers = vec![
            h("UPGRADE", "WebSocket"),
            h("connection", "keep-alive, UPGRADE"),
            h("sec-websocket-key", &padded_key),
            h("SEC-WEBSOCKET-VERSION", " 13 "),
        ];
        let a = accept("GET", 1, &headers).unwrap();
        assert_eq!(a.accept_key(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        // Tokens spread over several header lines.
        let headers = with(
            without(without(base(), "Connection"), "Upgrade"),
            &[
                h("Connection", "keep-alive"),
                h("Connection", "Upgrade"),
                h("Upgrade", "h2c"),
                h("Upgrade", "websocket"),
            ],
        );
        assert!(accept("GET", 1, &headers).is_ok());
    }

    #[test]
    fn the_method_must_be_get() {
        for method in ["POST", "HEAD", "get", "PUT", ""] {
            let e = accept(method, 1, &base()).unwrap_err();
            assert_eq!(e, HandshakeError::MethodNotAllowed);
            assert_eq!(e.status(), 405);
            assert_eq!(e.reason_phrase(), "Method Not Allowed");
            assert_eq!(e.extra_headers(), &[("Allow", "GET")]);
        }
    }

    #[test]
    fn the_http_version_must_be_1_1() {
        let e = accept("GET", 0, &base()).unwrap_err();
        assert_eq!(e, HandshakeError::HttpVersion);
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn upgrade_and_connection_must_ask_for_websocket() {
        let no_upgrade = without(base(), "upgrade");
        assert_eq!(accept("GET", 1, &no_upgrade), Err(HandshakeError::MissingUpgrade));
        let wrong = with(no_upgrade.clone(), &[h("Upgrade", "h2c, websocket2")]);
        assert_eq!(accept("GET", 1, &wrong), Err(HandshakeError::MissingUpgrade));

        let no_conn = without(base(), "connection");
        assert_eq!(accept("GET", 1, &no_conn), Err(HandshakeError::MissingConnectionUpgrade));
        for value in ["keep-alive", "upgrades", "close", "", "up grade"] {
            let headers = with(no_conn.clone(), &[h("Connection", value)]);
            let e = accept("GET", 1, &headers).unwrap_err();
            assert_eq!(e, HandshakeError::MissingConnectionUpgrade, "{value:?}");
            assert_eq!(e.status(), 400);
            assert_eq!(e.extra_headers(), &[]);
        }
    }

    #[test]
    fn other_versions_are_426_naming_13() {
        let no_version = without(base(), "sec-websocket-version");
        for version in [None, Some("8"), Some("12"), Some("14"), Some("130"), Some("")] {
            let headers = match version {
                Some(v) => with(no_version.clone(), &[h("Sec-WebSocket-Version", v)]),
                None => no_version.clone(),
            };
            let e = accept("GET", 1, &headers).unwrap_err();
            assert_eq!(e, HandshakeError::UnsupportedVersion, "{version:?}");
            assert_eq!(e.status(), 426);
            assert_eq!(e.reason_phrase(), "Upgrade Required");
            assert!(e.extra_headers().contains(&("Sec-WebSocket-Version", "13")));
        }
    }

    #[test]
    fn the_key_must_be_base64_of_16_bytes() {
        let no_key = without(base(), "sec-websocket-key");
        assert_eq!(accept("GET", 1, &no_key), Err(HandshakeError::MissingKey));
        for key in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",     // unpadded
            "dGhlIHNhbXBsZSBub25j",       // 15 bytes
            "dGhlIHNhbXBsZSBub25jZQ==AA", // too long
            "dGhlIHNhbXBsZSBub25jZQ=x",   // bad padding
            "dGhlIHNhbXBsZSBub25jZ!==",   // not base64
            "dGhlIHNhbXBsZSBub25jZQ",
            "AAAAAAAAAAAAAAAAAAAAAAAA", // 18 bytes
            "dGhlIHNhbXBsZSBub25jZQ==dGhlIHNhbXBsZSBub25jZQ==",
        ] {
            let headers = with(no_key.clone(), &[h("Sec-WebSocket-Key", key)]);
            let e = accept("GET", 1, &headers).unwrap_err();
            assert_eq!(e, HandshakeError::InvalidKey, "{key:?}");
            assert_eq!(e.status(), 400);
        }
        // Two keys are ambiguous.
        let twice = with(base(), &[h("Sec-WebSocket-Key", KEY)]);
        assert_eq!(accept("GET", 1, &twice), Err(HandshakeError::InvalidKey));
        // Any 16 bytes will do.
        let other = with(no_key, &[h("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")]);
        assert!(accept("GET", 1, &other).is_ok());
    }

    #[test]
    fn responses_fit_the_advertised_bound_and_refuse_small_buffers() {
        let headers = with(base(), &[h("Sec-WebSocket-Protocol", "kefu.v1.json")]);
        let a = accept("GET", 1, &headers).unwrap();
        let full = response(&a);
        assert!(full.len() <= MAX_RESPONSE_BYTES);
        assert!(full.ends_with("\r\nSec-WebSocket-Protocol: kefu.v1.json\r\n\r\n"));
        let mut exact = vec![0u8; full.len()];
        assert_eq!(a.write_response(&mut exact), Ok(full.len()));
        assert_eq!(exact, full.as_bytes());
        for len in [0, 1, 30, full.len() - 1] {
            let mut small = vec![0u8; len];
            assert_eq!(a.write_response(&mut small), Err(BufferTooSmall), "{len}");
        }
        assert!(!BufferTooSmall.to_string().is_empty());
    }

    #[test]
    fn every_error_has_a_status_phrase_and_message() {
        use HandshakeError::*;
        for e in [
            MethodNotAllowed,
            HttpVersion,
            MissingUpgrade,
            MissingConnectionUpgrade,
            UnsupportedVersion,
            MissingKey,
            InvalidKey,
            UnsupportedSubprotocol,
        ] {
            assert!(matches!(e.status(), 400 | 405 | 426));
            assert!(!e.reason_phrase().is_empty());
            assert!(!e.message().is_empty());
        }
    }
}
