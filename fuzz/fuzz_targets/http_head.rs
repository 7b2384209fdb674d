//! The HTTP/1.1 request-head parser every connection goes through before
//! it is a WebSocket: any bytes, never a panic, never a look past the
//! head limit, and a complete head names only what lies inside it. The
//! same bytes go through the PROXY protocol parser (a trusted proxy's
//! connections start with its header): never a panic, and a header ends
//! within the bytes and within its version's bound.
#![no_main]

use kefu_gateway::http::parse_head;
use kefu_gateway::proxy_protocol::{self, Parsed};
use libfuzzer_sys::fuzz_target;

/// The gateway's default bound on a request head.
const MAX_HEAD_BYTES: usize = 8192;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Header { len, .. }) = proxy_protocol::parse(data) {
        assert!(len <= data.len(), "the header ends within the bytes read");
        assert!(len <= proxy_protocol::V1_MAX_BYTES.max(proxy_protocol::V2_MAX_BYTES));
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    if let Ok(Some(head)) = parse_head(data, &mut headers, MAX_HEAD_BYTES) {
        let len = head.len();
        assert!(len <= data.len().min(MAX_HEAD_BYTES), "the head ends within the limit");
        let lo = data.as_ptr() as usize;
        let inside = |s: &[u8]| s.is_empty() || {
            let start = s.as_ptr() as usize;
            start >= lo && start + s.len() <= lo + len
        };
        assert!(inside(head.method().as_bytes()) && inside(head.target().as_bytes()));
        assert!(inside(head.path().as_bytes()));
        assert!(head.path().starts_with('/'), "origin form only");
        for h in head.headers() {
            assert!(inside(h.name.as_bytes()) && inside(h.value));
        }
    }
});
