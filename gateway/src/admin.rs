//! The operator listener: `GET /healthz` and `GET /metrics` (Prometheus).
//!
//! It runs on shard 0, apart from the client listener, so that scraping and
//! health checks never queue behind client traffic limits. Requests here are
//! rare, so this path allocates freely.

use std::rc::Rc;
use std::sync::Arc;

use kefu_storage::StatsSource;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::http;
use crate::metrics::{self, ShardStats};
use crate::shard::Shard;

/// Largest admin request head.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Serves the admin listener until the shard's runtime ends.
pub async fn serve(
    listener: TcpListener,
    stats: Arc<[ShardStats]>,
    store: StatsSource,
    driver: &'static str,
    shard: Rc<Shard>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                monoio::spawn(handle(stream, stats.clone(), store.clone(), driver, shard.clone()));
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    stats: Arc<[ShardStats]>,
    store: StatsSource,
    driver: &'static str,
    shard: Rc<Shard>,
) {
    let deadline = shard.limits.handshake_timeout;
    let _ = monoio::time::timeout(deadline, answer(&mut stream, &stats, &store, driver, &shard)).await;
}

async fn answer(
    stream: &mut TcpStream,
    stats: &[ShardStats],
    store: &StatsSource,
    driver: &str,
    shard: &Shard,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let (status, reason, ctype, body): (u16, &str, &str, Vec<u8>) = loop {
        let spare = vec![0u8; 1024];
        let (res, spare) = stream.read(spare).await;
        let n = res?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&spare[..n]);
        let mut headers = [httparse::EMPTY_HEADER; crate::conn::MAX_HEADERS];
        match http::parse_head(&buf, &mut headers, MAX_HEAD_BYTES) {
            Ok(None) => continue,
            Err(_) => break (400, "Bad Request", "text/plain", b"malformed request\n".to_vec()),
            Ok(Some(head)) => {
                break match (head.method(), head.path()) {
                    ("GET", "/healthz") if shard.stopping() => {
                        (503, "Service Unavailable", "text/plain", b"draining\n".to_vec())
                    }
                    ("GET", "/healthz") => (200, "OK", "text/plain", b"ok\n".to_vec()),
                    ("GET", "/metrics") => (
                        200,
                        "OK",
                        "text/plain; version=0.0.4",
                        metrics::render(stats, &shard.mailboxes, &store.stats(), driver).into_bytes(),
                    ),
                    (_, "/healthz" | "/metrics") => {
                        (405, "Method Not Allowed", "text/plain", b"method not allowed\n".to_vec())
                    }
                    _ => (404, "Not Found", "text/plain", b"not found\n".to_vec()),
                };
            }
        }
    };
    let mut out = vec![0u8; body.len() + 512];
    let len = http::write_simple_response(&mut out, status, reason, ctype, &body, &[], true)
        .map_err(std::io::Error::other)?;
    out.truncate(len);
    let (res, _) = stream.write_all(out).await;
    res.map(|_| ())
}
