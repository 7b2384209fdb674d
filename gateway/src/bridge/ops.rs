//! The operator endpoints: `/healthz`, `/readyz` and `/metrics`. They need
//! no API key: a load balancer and Prometheus call them.
//!
//! - `/healthz` says the process serves: 200, or 503 once it drains.
//! - `/readyz` says it should be sent traffic: 200 only while storage takes
//!   writes (its writer runs, is not closed, and its last group commit did
//!   not fail, or it has written again since: the failure's own words are
//!   in the reason) and every shard is up (it swept within
//!   `admin.shard_stall_ms` and is not draining). Otherwise 503, with one
//!   line per reason.
//! - `/metrics` is the Prometheus text of [`crate::metrics::render`], then
//!   the bridge's own counters, the hooks', storage's group commits
//!   ([`crate::metrics::CommitStats`]) and the event log's consumers
//!   ([`super::events::EventsApi::render_lag`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kefu_storage::StatsSource;

use crate::chat::ShardMsg;
use crate::mailbox::Mailbox;
use crate::metrics::ShardStats;

/// What the operator endpoints read: all of it thread-safe counters.
pub struct Ops {
    /// Every shard's counters.
    pub stats: Arc<[ShardStats]>,
    /// Every shard's inbox (depths and posts).
    pub mailboxes: Arc<[Mailbox<ShardMsg>]>,
    /// The store's counters and writer health.
    pub store: StatsSource,
    /// `io_uring` or `epoll`.
    pub driver: &'static str,
    /// Raised when the process is asked to stop.
    pub stop: Arc<AtomicBool>,
    /// `admin.shard_stall_ms`.
    pub shard_stall_ms: u64,
    /// The bridge's own counters.
    pub bridge: BridgeStats,
    /// Hook calls by outcome, and their latency.
    pub hooks: Arc<super::hooks::HookStats>,
    /// Storage's group commits: sizes and times.
    pub commits: Arc<crate::metrics::CommitStats>,
    /// The per-address limits' tables.
    pub per_ip: crate::metrics::PerIpTables,
}

/// What the bridge counts of itself, rendered after the shards' metrics.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// API requests let through (key accepted, a place free).
    pub calls: AtomicU64,
    /// API requests refused for a missing or wrong key.
    pub unauthenticated: AtomicU64,
    /// API requests refused at `admin.max_concurrent_requests`.
    pub busy: AtomicU64,
}

impl BridgeStats {
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP kefu_bridge_requests_total API requests (gRPC and REST) by outcome at the gate.\n# TYPE kefu_bridge_requests_total counter"
        );
        for (outcome, n) in
            [("admitted", &self.calls), ("unauthenticated", &self.unauthenticated), ("busy", &self.busy)]
        {
            let _ = writeln!(
                out,
                "kefu_bridge_requests_total{{outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").field("shards", &self.stats.len()).finish_non_exhaustive()
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// `GET /healthz`.
pub fn healthz(ops: &Ops) -> Response {
    if ops.stop.load(Ordering::Relaxed) {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
    } else {
        text(StatusCode::OK, "ok\n".into())
    }
}

/// `GET /readyz`.
pub fn readyz(ops: &Ops) -> Response {
    let problems = not_ready(
        ops.store.writer_problem(),
        &ops.stats,
        ops.stop.load(Ordering::Relaxed),
        crate::metrics::unix_ms(),
        ops.shard_stall_ms,
    );
    if problems.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// `GET /metrics`.
pub fn metrics(ops: &Ops, events: &super::events::EventsApi) -> Response {
    let mut body = crate::metrics::render(&ops.stats, &ops.mailboxes, &ops.store.stats(), ops.driver);
    ops.bridge.render(&mut body);
    ops.hooks.render(&mut body);
    ops.commits.render(&mut body);
    ops.per_ip.render(&mut body);
    events.render_lag(&mut body);
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
        .into_response()
}

/// Every reason not to send this process traffic now; empty when ready.
pub fn not_ready(
    store: Option<String>,
    shards: &[ShardStats],
    stopping: bool,
    now_ms: u64,
    stall_ms: u64,
) -> Vec<String> {
    let mut problems = Vec::new();
    if stopping {
        problems.push("process: stopping".to_string());
    }
    problems.extend(store);
    for (i, s) in shards.iter().enumerate() {
        let swept = s.sweep_unix_ms.load(Ordering::Relaxed);
        if s.draining.load(Ordering::Relaxed) {
            problems.push(format!("shard {i}: draining"));
        } else if swept == 0 {
            problems.push(format!("shard {i}: not started"));
        } else if now_ms.saturating_sub(swept) > stall_ms {
            problems.push(format!("shard {i}: no sweep for {} ms", now_ms - swept));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use kefu_storage::WriterHealth;

    fn shards(swept: &[u64]) -> Vec<ShardStats> {
        swept
            .iter()
            .map(|&ms| {
                let s = ShardStats::new(0);
                s.sweep_unix_ms.store(ms, Ordering::Relaxed);
                s
            })
            .collect()
    }

    #[test]
    fn ready_when_storage_accepts_and_every_shard_swept_lately() {
        let s = shards(&[10_000, 10_050]);
        assert!(
            not_ready(WriterHealth::Accepting.problem().map(str::to_string), &s, false, 10_100, 2_000)
                .is_empty()
        );
    }

    #[test]
    fn each_reason_is_named() {
        let s = shards(&[10_000, 0, 5_000]);
        s[0].draining.store(true, Ordering::Relaxed);
        let failing = Some("storage: cannot write (No space left on device); retrying".to_string());
        let p = not_ready(failing, &s, true, 10_000, 2_000);
        assert_eq!(
            p,
            [
                "process: stopping",
                "storage: cannot write (No space left on device); retrying",
                "shard 0: draining",
                "shard 1: not started",
                "shard 2: no sweep for 5000 ms",
            ]
        );
        for health in [WriterHealth::Closed, WriterHealth::Stopped] {
            let p = not_ready(health.problem().map(str::to_string), &shards(&[10_000]), false, 10_000, 2_000);
            assert_eq!(p.len(), 1, "{p:?}");
        }
    }
}
