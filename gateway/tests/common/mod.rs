//! Starting the real `kefu` binary on 127.0.0.1 for integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A gateway child process; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub data: tempfile::TempDir,
    /// Log lines up to and including "kefu listening".
    pub startup_log: Vec<String>,
    /// Every later log line, as it arrives.
    pub log: mpsc::Receiver<String>,
}

impl Gateway {
    /// Starts `kefu serve` on ephemeral ports with `args` and `env` added.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::start_in(tempfile::tempdir().expect("tempdir"), args, env)
    }

    /// Kills the process with SIGKILL and starts a new one on the same data.
    pub fn kill9_and_restart(mut self, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().expect("tempdir"));
        Self::start_in(data, args, env)
    }

    /// A client token signed with this gateway's secret.
    pub fn token(&self, role: &str, sub: &str, extra: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_kefu"))
            .args(["token", "--role", role, "--sub", sub, "--data"])
            .arg(self.data.path())
            .args(extra)
            .output()
            .expect("kefu token");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Starts `kefu serve` as [`Self::start`] does, on the data directory
    /// given (a small tmpfs, say).
    pub fn start_in(data: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::start_cmd(data, args, env, None)
    }

    /// Starts `kefu serve` as [`Self::start`] does, with its descriptor
    /// limit (`RLIMIT_NOFILE`, soft and hard) set to `nofile` from the start.
    pub fn start_with_nofile(args: &[&str], env: &[(&str, &str)], nofile: u64) -> Gateway {
        Self::start_cmd(tempfile::tempdir().expect("tempdir"), args, env, Some(nofile))
    }

    fn start_cmd(
        data: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kefu"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt as _;
            let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.arg("serve");
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--admin-listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kefu");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut startup_log = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let line = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    startup_log.push(line.clone());
                    if line.contains("kefu listening") {
                        break line;
                    }
                }
                Err(_) => panic!("gateway did not report listening; log: {startup_log:#?}"),
            }
        };
        let field = |name: &str| -> SocketAddr {
            let key = format!("{name}=");
            let start = line.find(&key).unwrap_or_else(|| panic!("no {name} in {line:?}")) + key.len();
            line[start..].split_whitespace().next().unwrap().parse().unwrap()
        };
        let (addr, admin) = (field("addr"), field("admin"));
        Gateway { child, addr, admin, data, startup_log, log: rx }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we spawned and still own.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A plain HTTP/1.1 exchange on the client listener: sends `request`
    /// verbatim and returns everything until the server closes.
    pub fn raw(&self, request: &[u8]) -> String {
        raw_exchange(self.addr, request)
    }

    /// `GET path` on the admin listener (one request, then the server
    /// closes).
    pub fn admin_get(&self, path: &str) -> String {
        raw_exchange(
            self.admin,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a log line containing `needle`.
pub fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Some(line),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A WebSocket upgrade request for `path`, with extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A masked client frame.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one unmasked server frame: (fin, opcode, payload).
pub fn read_frame(s: &mut TcpStream) -> std::io::Result<(bool, u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((h[0] & 0x80 != 0, h[0] & 0x0f, payload))
}

/// Opens a raw WebSocket on `path` and returns the socket after the 101.
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request(path, "").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// One HTTP/1.1 request to `addr` (the admin listener), with `key` as a
/// bearer key and `body` as JSON: (status, body).
pub fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = raw_exchange(addr, request.as_bytes());
    let status = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{response}"));
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The client side of a `/ws` connection.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A JSON WebSocket client of `/ws` that numbers its commands and waits
/// for their replies (skipping pushes), each within `patience`.
pub struct WsClient {
    pub ws: Ws,
    next_id: i64,
    patience: Duration,
}

impl WsClient {
    /// Connects to `gw`'s `/ws`.
    pub async fn open(gw: &Gateway, patience: Duration) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr)).await.unwrap();
        WsClient { ws, next_id: 1, patience }
    }

    /// Sends `v` with the next id and returns the reply to it; `None` once
    /// the connection is gone or no reply came in time.
    pub async fn try_call(&mut self, mut v: serde_json::Value) -> Option<serde_json::Value> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = serde_json::json!(id);
        self.ws.send(Message::text(v.to_string())).await.ok()?;
        loop {
            let m = tokio::time::timeout(self.patience, self.ws.next()).await.ok()??.ok()?;
            if let Message::Text(t) = m {
                let reply: serde_json::Value = serde_json::from_str(&t).unwrap();
                if reply["id"] == serde_json::json!(id) {
                    return Some(reply);
                }
            }
        }
    }

    /// [`Self::try_call`], which must be answered.
    pub async fn call(&mut self, v: serde_json::Value) -> serde_json::Value {
        let patience = self.patience;
        self.try_call(v).await.unwrap_or_else(|| panic!("a reply within {patience:?}"))
    }

    /// Sends without waiting for a reply (`read` has none).
    pub async fn post(&mut self, v: serde_json::Value) {
        use futures_util::SinkExt;
        self.ws.send(tokio_tungstenite::tungstenite::Message::text(v.to_string())).await.unwrap();
    }
}

/// The sum of the `/metrics` samples of `name` whose labels include every
/// one of `labels` (`key="value"`); 0 if there is none.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|want| rest.split([',', '}']).any(|l| l == *want))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

/// Polls `/metrics` until `check` holds (counters of other threads land a
/// moment after the frame that shows them).
pub fn metrics_until(gw: &Gateway, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = gw.admin_get("/metrics");
        if check(&metrics) {
            return metrics;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {metrics}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `promtool check metrics` on a `/metrics` answer, if promtool is
/// installed (Debian's `prometheus`; CI has it): the series as they are
/// with traffic, histograms filled and consumer labels escaped, not only
/// an idle gateway's (`tools/check-metrics.sh`).
pub fn promtool_check(response: &str) {
    use std::process::Stdio;
    let body = response.split_once("\r\n\r\n").map_or(response, |(_, body)| body);
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("promtool not found: /metrics not linted");
        return;
    };
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{body}");
}

/// The ways a shard can move a socket's bytes on io_uring, by name: system
/// calls after a one-shot poll, system calls after a multishot poll (with
/// connections taken from a multishot accept), or the ring's own reads and
/// writes.
pub const SOCKET_MODES: [&str; 3] = ["syscall", "multishot", "ring"];

/// The environment that selects one of [`SOCKET_MODES`].
pub fn socket_mode_env(mode: &str) -> [(&'static str, &'static str); 3] {
    let (socket_io, poll, accept) = match mode {
        "syscall" => ("syscall", "oneshot", "oneshot"),
        "multishot" => ("syscall", "multishot", "multishot"),
        "ring" => ("ring", "oneshot", "oneshot"),
        _ => panic!("no socket mode {mode}"),
    };
    [
        ("KEFU_SERVER_SOCKET_IO", socket_io),
        ("KEFU_SERVER_URING_POLL", poll),
        ("KEFU_SERVER_URING_ACCEPT", accept),
    ]
}
