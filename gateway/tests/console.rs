//! The console, the widget and the demo page as the real binary serves
//! them: embedded files with ETags and a strict policy, the `/ws` origin
//! check, and the console link logged at start. (The pages themselves are
//! driven in Chromium by tools/browser-test.sh.)

mod common;

use std::io::{BufRead, Write};
use std::time::Duration;

use common::{Gateway, upgrade_request, wait_for};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn get(gw: &Gateway, path: &str, extra: &str) -> String {
    gw.raw(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").as_bytes())
}

#[test]
fn pages_and_scripts_are_served_with_etags_and_a_strict_policy() {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    for (path, kind, needle) in [
        ("/console", "text/html", "data-testid=\"presence\""),
        ("/console/app.js", "text/javascript", "import"),
        ("/console/console.css", "text/css", ".app"),
        ("/widget.js", "text/javascript", "attachShadow"),
        ("/demo", "text/html", "/widget.js"),
    ] {
        let r = get(&gw, path, "");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {r:.200}");
        assert!(header(&r, "content-type").unwrap().starts_with(kind), "{path}");
        assert!(r.contains(needle), "{path}");
        let csp = header(&r, "content-security-policy").unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&r, "cache-control"), Some("no-cache"));
        // A browser holding the current copy gets 304 and no body.
        let etag = header(&r, "etag").unwrap();
        let again = get(&gw, path, &format!("If-None-Match: {etag}\r\n"));
        assert!(again.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{again}");
        assert!(again.ends_with("\r\n\r\n"), "no body: {again}");
        assert_eq!(header(&again, "etag"), Some(etag));
    }
    // HEAD: the head alone, with the length of the body it would have had.
    let head = gw.raw(b"HEAD /widget.js HTTP/1.1\r\nHost: x\r\n\r\n");
    let len: usize = header(&head, "content-length").unwrap().parse().unwrap();
    assert!(len > 1000 && head.ends_with("\r\n\r\n"), "{head}");
    // Other methods (405), and paths that are not files (404).
    let post = gw.raw(b"POST /console HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
    assert_eq!(header(&post, "allow"), Some("GET, HEAD"));
    assert!(get(&gw, "/console/nope.js", "").starts_with("HTTP/1.1 404"));
    assert!(get(&gw, "/", "").starts_with("HTTP/1.1 404"));
}

#[test]
fn ws_is_open_to_the_gateways_own_origin_listed_ones_and_non_browsers() {
    let gw =
        Gateway::start(&["--shards", "1"], &[("KEFU_SERVER_ALLOWED_ORIGINS", "[\"https://shop.example\"]")]);
    // The status line only: an accepted WebSocket stays open.
    let upgrade = |origin: &str| {
        let extra = if origin.is_empty() { String::new() } else { format!("Origin: {origin}\r\n") };
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(upgrade_request("/ws", &extra).as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line.trim_end().to_string()
    };
    // upgrade_request's Host is 127.0.0.1.
    assert_eq!(upgrade(""), "HTTP/1.1 101 Switching Protocols", "no Origin: not a browser");
    assert_eq!(upgrade("http://127.0.0.1"), "HTTP/1.1 101 Switching Protocols", "its own origin");
    assert_eq!(upgrade("https://shop.example"), "HTTP/1.1 101 Switching Protocols", "listed");
    assert_eq!(upgrade("https://evil.example"), "HTTP/1.1 403 Forbidden");
    assert_eq!(upgrade("http://127.0.0.1:1"), "HTTP/1.1 403 Forbidden", "another port is another origin");
    assert_eq!(upgrade("null"), "HTTP/1.1 403 Forbidden");
}

#[test]
fn the_logged_console_link_signs_in_the_default_agent() {
    let gw = Gateway::start(
        &["--shards", "2"],
        &[("KEFU_CONSOLE_DEFAULT_AGENT_ID", "lead"), ("KEFU_CONSOLE_DEFAULT_AGENT_NAME", "Lead Agent")],
    );
    let line = wait_for(&gw.log, "agent console: ", Duration::from_secs(5)).expect("a console link");
    let link = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap();
    let prefix = format!("http://{}/console#token=", gw.addr);
    assert!(link.starts_with(&prefix), "{link}");
    let token = &link[prefix.len()..];
    assert!(wait_for(&gw.log, &format!("http://{}/demo", gw.addr), Duration::from_secs(5)).is_some());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr)).await.unwrap();
        let connect = json!({"type": "connect", "id": 1, "token": token}).to_string();
        ws.send(Message::text(connect)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert_eq!((v["type"].as_str(), v["role"].as_str()), (Some("connected"), Some("agent")), "{v}");
        assert_eq!(
            (v["user"]["id"].as_str(), v["user"]["name"].as_str()),
            (Some("lead"), Some("Lead Agent"))
        );
        // The console asks for its canned replies: the config's, in order.
        ws.send(Message::text(json!({"type": "canned", "id": 2}).to_string())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert_eq!((v["type"].as_str(), v["id"].as_i64()), (Some("canned"), Some(2)), "{v}");
        assert_eq!(v["replies"][0]["name"], "greeting", "{v}");
    });
}

#[test]
fn no_link_is_logged_when_print_link_is_off() {
    let gw = Gateway::start(&["--shards", "1"], &[("KEFU_CONSOLE_PRINT_LINK", "false")]);
    assert!(wait_for(&gw.log, "agent console: ", Duration::from_millis(500)).is_none());
}
