//! The agent console, the visitor widget and the demo shop page: files
//! compiled into the binary and served on the client listener.
//!
//! There is no build step and no outside service: each file under
//! `gateway/assets/` is embedded with `include_bytes!`, so the binary a
//! user runs is the whole product. A file is identified by an ETag (a hash
//! of its bytes, computed once at start), answered `304` when the browser
//! already has it, and revalidated on every load (`Cache-Control:
//! no-cache`): the URLs are fixed (`/widget.js` is pasted into shop pages),
//! so a stale copy must never outlive an upgrade.
//!
//! Every response carries a strict Content-Security-Policy: scripts and
//! styles only from the gateway's own files (no inline code, no `eval`),
//! the WebSocket to the gateway itself, images only from the gateway or
//! from `data:`/`blob:` URLs (attachments arrive as base64), and no
//! framing. The widget script is the exception that proves the rule: it
//! runs inside the shop's page, under the shop's policy, so its own
//! response only needs `nosniff`.
//!
//! This module is sans-IO: [`lookup`] turns a path and an `If-None-Match`
//! header into what to answer; `conn.rs` writes it.

use std::sync::LazyLock;

/// The policy on every HTML page the gateway serves.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The path it is served at.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// Every embedded file. `/console` and `/demo` are pages; the rest are what
/// they load.
pub static ASSETS: &[Asset] = &[
    page("/console", include_bytes!("../assets/console/index.html")),
    script("/console/app.js", include_bytes!("../assets/console/app.js")),
    script("/console/i18n.js", include_bytes!("../assets/console/i18n.js")),
    script("/console/conn.js", include_bytes!("../assets/console/conn.js")),
    style("/console/console.css", include_bytes!("../assets/console/console.css")),
    script("/widget.js", include_bytes!("../assets/widget.js")),
    page("/demo", include_bytes!("../assets/demo/index.html")),
    style("/demo/demo.css", include_bytes!("../assets/demo/demo.css")),
];

const fn page(path: &'static str, body: &'static [u8]) -> Asset {
    Asset { path, content_type: "text/html; charset=utf-8", body }
}

const fn script(path: &'static str, body: &'static [u8]) -> Asset {
    Asset { path, content_type: "text/javascript; charset=utf-8", body }
}

const fn style(path: &'static str, body: &'static [u8]) -> Asset {
    Asset { path, content_type: "text/css; charset=utf-8", body }
}

/// Each asset's ETag, in the order of [`ASSETS`]: a quoted hex FNV-1a
/// hash of its bytes. Not a security property, only "did it change", so a
/// fast non-cryptographic hash is enough.
static ETAGS: LazyLock<Vec<String>> =
    LazyLock::new(|| ASSETS.iter().map(|a| format!("\"{:016x}\"", fnv1a(a.body))).collect());

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// What to answer for an asset request.
#[derive(Debug)]
pub struct Served {
    /// `200`, or `304` when the client's copy is current.
    pub status: u16,
    /// The file.
    pub asset: &'static Asset,
    /// Its ETag.
    pub etag: &'static str,
}

impl Served {
    /// The response headers besides `Content-Type` and `Content-Length`.
    pub fn headers(&self) -> [(&'static str, &'static str); 6] {
        [
            ("ETag", self.etag),
            ("Cache-Control", "no-cache"),
            ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
        ]
    }

    /// The body to send: none for a `304` (or a `HEAD`, which the caller
    /// decides).
    pub fn body(&self) -> &'static [u8] {
        if self.status == 304 { b"" } else { self.asset.body }
    }
}

/// The asset at `path`, if there is one, answered against the client's
/// `If-None-Match` (a list of ETags, or `*`).
pub fn lookup(path: &str, if_none_match: Option<&[u8]>) -> Option<Served> {
    let i = ASSETS.iter().position(|a| a.path == path)?;
    let etag = ETAGS[i].as_str();
    let current = if_none_match.is_some_and(|v| {
        v.split(|b| *b == b',').map(|t| t.trim_ascii()).any(|t| t == b"*" || t == etag.as_bytes())
    });
    Some(Served { status: if current { 304 } else { 200 }, asset: &ASSETS[i], etag })
}

/// Whether a WebSocket upgrade with this `Origin` may proceed.
///
/// No `Origin` at all is a client that is not a browser (kefu-bench, SDKs,
/// tests), which a cross-site page cannot impersonate: allowed. A browser
/// always sends one; it is allowed when it is the gateway's own origin
/// (its host and port equal the request's `Host`) or is listed in
/// `server.allowed_origins` (exactly, or `*` for any).
pub fn origin_allowed(origin: Option<&[u8]>, host: Option<&[u8]>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.iter().any(|a| a == "*" || a.as_bytes() == origin) {
        return true;
    }
    let authority = origin.strip_prefix(b"http://").or_else(|| origin.strip_prefix(b"https://"));
    matches!((authority, host), (Some(a), Some(h)) if !a.is_empty() && a.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_with_its_etag_and_the_policy() {
        for asset in ASSETS {
            let served = lookup(asset.path, None).unwrap();
            assert_eq!(served.status, 200);
            assert!(!served.body().is_empty(), "{} is empty", asset.path);
            let headers = served.headers();
            assert!(headers.contains(&("Content-Security-Policy", CONTENT_SECURITY_POLICY)));
            assert!(headers.iter().any(|(n, v)| *n == "ETag" && v.starts_with('"') && v.len() == 18));
        }
        assert!(lookup("/console/", None).is_none());
        assert!(lookup("/nope", None).is_none());
        // Distinct files, distinct tags.
        let mut tags: Vec<_> = ETAGS.iter().collect();
        tags.sort();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len());
    }

    #[test]
    fn a_current_copy_is_304_without_a_body() {
        let etag = lookup("/console", None).unwrap().etag;
        let served = lookup("/console", Some(etag.as_bytes())).unwrap();
        assert_eq!((served.status, served.body().len()), (304, 0));
        let list = format!("\"old\", {etag}");
        assert_eq!(lookup("/console", Some(list.as_bytes())).unwrap().status, 304);
        assert_eq!(lookup("/console", Some(b"*")).unwrap().status, 304);
        assert_eq!(lookup("/console", Some(b"\"stale\"")).unwrap().status, 200);
    }

    #[test]
    fn the_policy_allows_no_inline_code() {
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert!(CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
        // The pages load their code from files, never inline.
        for asset in ASSETS.iter().filter(|a| a.content_type.starts_with("text/html")) {
            let html = std::str::from_utf8(asset.body).unwrap();
            assert!(!html.contains("<script>"), "{} has an inline script", asset.path);
            assert!(!html.contains("<style"), "{} has an inline style", asset.path);
            assert!(!html.contains("style=\""), "{} has a style attribute", asset.path);
            assert!(!has_inline_handler(html), "{} has an inline handler", asset.path);
        }
    }

    /// An attribute named `on…=`, such as `onclick="…"`.
    fn has_inline_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name > 0 && rest[name..].starts_with('=')
        })
    }

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        let listed = vec!["https://shop.example".to_string()];
        let any = vec!["*".to_string()];
        let host = Some(&b"127.0.0.1:8080"[..]);
        // Non-browser clients send no Origin.
        assert!(origin_allowed(None, host, &none));
        assert!(origin_allowed(None, None, &none));
        // The gateway's own origin, whatever the scheme.
        assert!(origin_allowed(Some(b"http://127.0.0.1:8080"), host, &none));
        assert!(origin_allowed(Some(b"https://127.0.0.1:8080"), host, &none));
        assert!(!origin_allowed(Some(b"http://127.0.0.1:8081"), host, &none));
        assert!(!origin_allowed(Some(b"http://evil.example"), host, &none));
        assert!(!origin_allowed(Some(b"null"), host, &none));
        assert!(!origin_allowed(Some(b"http://127.0.0.1:8080"), None, &none));
        assert!(!origin_allowed(Some(b"http://"), Some(b""), &none));
        // Listed ones, exactly.
        assert!(origin_allowed(Some(b"https://shop.example"), host, &listed));
        assert!(!origin_allowed(Some(b"https://shop.example.evil"), host, &listed));
        assert!(!origin_allowed(Some(b"http://shop.example"), host, &listed));
        assert!(origin_allowed(Some(b"http://anything"), host, &any));
    }
}
