//! What `kefu-bench junk` and `slow` share: the chat run twice, once clean
//! and once with a hostile load beside it, and the verdict.
//!
//! The question both ask is a regression question: do honest visitors and
//! agents notice someone else misbehaving? So the same honest load (the
//! chat engine of `chat.rs`, same clients, rate and duration) runs first
//! alone, then with the [`Beside`] load, against the same gateway, and the
//! two runs are compared:
//!
//! - **up**: the gateway answers `/healthz` on its admin port after the
//!   abuse, and every honest client was set up and stayed connected;
//! - **latency**: the honest delivery and ack p99 under abuse are at most
//!   `--p99-ratio-max` (2) times the clean run's;
//! - **nothing lost**: every window message was delivered and acked, in
//!   both runs, and none was refused as `rate_limited`;
//! - **memory**: the gateway's RSS (`/proc/PID/status` `VmRSS`, `--server-pid`)
//!   is sampled through both runs; the abused run's start, peak and end are
//!   reported, and it may grow at most `--rss-growth-max-mib` more than the
//!   clean run did (the honest load alone grows it: the store's cache, slab
//!   pages touched for the first time).
//!
//! Each scenario adds its own checks (`junk.rs`, `slow.rs`). The table at
//! the end shows both runs and every check; a failed check makes the
//! command exit non-zero; the one JSON line on stdout holds both runs, the
//! scenario's tally and the checks.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    chat::{self, Beside, ChatArgs, ChatReport},
    html::Series,
    report::{Output, Table},
    stats,
};

/// How often the gateway's RSS is read during a run.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Bound on one admin HTTP request (connect, write, read).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest admin response read (the /metrics page is a few KiB).
const ADMIN_RESPONSE_BYTES_MAX: u64 = 4 << 20;

/// The checks' options, shared by `junk` and `slow`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The gateway's admin listener (host:port): `/healthz` must answer 200
    /// after the abuse, and `/metrics` closes are counted over it.
    #[arg(long, value_name = "HOST:PORT")]
    pub admin: Option<SocketAddr>,

    /// The honest p99 (delivery and ack) under abuse may be at most this
    /// many times the clean run's.
    #[arg(long, default_value_t = 2.0)]
    pub p99_ratio_max: f64,

    /// How much more the gateway's RSS may grow over the abused run than
    /// over the clean one, MiB (needs --server-pid).
    #[arg(long, default_value_t = 64)]
    pub rss_growth_max_mib: u64,

    /// Seconds between the clean run and the abused one (the first run's
    /// connections close; the gateway settles).
    #[arg(long, default_value_t = 1.0)]
    pub pause: f64,
}

/// One check and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, ok: bool, detail: String) -> Self {
        Self { name: name.to_owned(), ok, detail }
    }
}

/// The gateway's RSS over a run, bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RssSummary {
    pub start: u64,
    pub peak: u64,
    pub end: u64,
    pub samples: u64,
}

/// Reads a process's RSS every [`RSS_SAMPLE_INTERVAL`] on its own thread
/// until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<RssSummary>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut summary = RssSummary::default();
            loop {
                // A process that is gone has no RSS; the samples so far stand.
                if let Ok(rss) = stats::process_rss_bytes(pid) {
                    if summary.samples == 0 {
                        summary.start = rss;
                    }
                    summary.peak = summary.peak.max(rss);
                    summary.end = rss;
                    summary.samples += 1;
                }
                if flag.load(Ordering::Acquire) {
                    return summary;
                }
                std::thread::sleep(RSS_SAMPLE_INTERVAL);
            }
        });
        Self { stop, handle }
    }

    pub fn finish(self) -> RssSummary {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

/// `GET path` on the admin listener: the status and the body.
pub fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    admin_get_within(admin, path, ADMIN_TIMEOUT)
}

/// [`admin_get`], each step (connect, write, read) bounded by `limit`.
pub fn admin_get_within(admin: SocketAddr, path: &str, limit: Duration) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&admin, limit)
        .with_context(|| format!("connecting to the admin listener {admin}"))?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(ADMIN_RESPONSE_BYTES_MAX).read_to_end(&mut response).context("reading the admin response")?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {:?}", head.lines().next().unwrap_or("")))?;
    Ok((status, body.to_owned()))
}

/// The gateway's close counters from `/metrics`, summed over shards:
/// `kefu_closes_total` by code (`close 1002`, …, also by who began the
/// handshake) and the slow consumer, heartbeat and protocol closes
/// (`slow_consumer`, …); `None` if there is no admin listener or it did not
/// answer.
pub fn close_counters(admin: Option<SocketAddr>) -> Option<BTreeMap<String, u64>> {
    let (status, body) = admin_get(admin?, "/metrics").ok()?;
    (status == 200).then(|| parse_close_counters(&body))
}

fn parse_close_counters(metrics: &str) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    for line in metrics.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let key = match name {
            "kefu_closes_total" => {
                let Some(code) = labels.split("code=\"").nth(1).and_then(|rest| rest.split('"').next())
                else {
                    continue;
                };
                format!("close {code}")
            }
            "kefu_slow_consumer_closes_total" => "slow_consumer".to_owned(),
            "kefu_heartbeat_closes_total" => "heartbeat".to_owned(),
            "kefu_protocol_closes_total" => "protocol".to_owned(),
            _ => continue,
        };
        *counters.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0) as u64;
    }
    counters
}

/// `after - before`, counter by counter, leaving out those that did not
/// move.
pub fn counters_delta(
    before: &Option<BTreeMap<String, u64>>,
    after: &Option<BTreeMap<String, u64>>,
) -> Option<BTreeMap<String, u64>> {
    let (before, after) = (before.as_ref()?, after.as_ref()?);
    Some(
        after
            .iter()
            .map(|(key, n)| (key.clone(), n.saturating_sub(before.get(key).copied().unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect(),
    )
}

/// The two runs and what was seen of the gateway around the abused one.
#[derive(Debug, Serialize)]
pub struct Pair {
    pub clean: ChatReport,
    pub abused: ChatReport,
    /// The gateway's RSS over the clean run and over the abused run.
    pub rss_clean: Option<RssSummary>,
    pub rss_abused: Option<RssSummary>,
    /// The gateway's close counters over the abused run (admin listener;
    /// see [`close_counters`]).
    pub gateway_closes: Option<BTreeMap<String, u64>>,
    /// `/healthz` status after the abused run.
    pub healthz_after: Option<u16>,
}

/// Runs the chat clean, then with `beside`, and gathers what the checks
/// need.
pub fn run_pair(chat_args: &ChatArgs, checks: &CheckArgs, beside: &mut dyn Beside) -> anyhow::Result<Pair> {
    if let Some(admin) = checks.admin {
        let (status, _) = admin_get(admin, "/healthz")?;
        if status != 200 {
            bail!("the gateway's /healthz answers {status} before the run");
        }
    }
    eprintln!("== clean run (the honest load alone)");
    let sampler = chat_args.client.server_pid.map(RssSampler::start);
    let clean = chat::measure_beside(chat_args, &mut chat::Alone).context("the clean run")?;
    let rss_clean = sampler.map(RssSampler::finish);
    chat::print_summary(&clean);
    std::thread::sleep(Duration::from_secs_f64(checks.pause.max(0.0)));

    eprintln!("== abused run (the same honest load, with the abuse beside it)");
    let closes_before = close_counters(checks.admin);
    let sampler = chat_args.client.server_pid.map(RssSampler::start);
    let abused = chat::measure_beside(chat_args, beside).context("the abused run")?;
    let rss_abused = sampler.map(RssSampler::finish);
    chat::print_summary(&abused);
    let gateway_closes = counters_delta(&closes_before, &close_counters(checks.admin));
    // A gateway that died answers nothing: that is the failed check, not
    // an error of the tool.
    let healthz_after = checks.admin.map(|admin| admin_get(admin, "/healthz").map(|(s, _)| s).unwrap_or(0));
    Ok(Pair { clean, abused, rss_clean, rss_abused, gateway_closes, healthz_after })
}

/// The checks every scenario makes of a [`Pair`].
pub fn common_checks(pair: &Pair, checks: &CheckArgs) -> Vec<Check> {
    let (clean, abused) = (&pair.clean, &pair.abused);
    let mut out = Vec::new();
    if let Some(status) = pair.healthz_after {
        out.push(Check::new(
            "gateway up (/healthz)",
            status == 200,
            format!("status {status} after the abuse"),
        ));
    }
    let all_set_up = abused.visitors_ready == u64::from(abused.visitors)
        && abused.agents_online == u64::from(abused.agents);
    out.push(Check::new(
        "honest clients all connected",
        all_set_up && abused.connection_errors.is_empty(),
        format!(
            "{}/{} visitors, {}/{} agents set up; connection errors {:?}",
            abused.visitors_ready,
            abused.visitors,
            abused.agents_online,
            abused.agents,
            abused.connection_errors
        ),
    ));
    for (name, clean_p99, abused_p99) in [
        ("honest delivery p99", clean.delivery_latency_us.p99, abused.delivery_latency_us.p99),
        ("honest ack p99", clean.ack_latency_us.p99, abused.ack_latency_us.p99),
    ] {
        let ratio = abused_p99 / clean_p99.max(1.0);
        out.push(Check::new(
            name,
            ratio <= checks.p99_ratio_max,
            format!(
                "clean {clean_p99:.0} µs, abused {abused_p99:.0} µs: ×{ratio:.2} (at most ×{})",
                checks.p99_ratio_max
            ),
        ));
    }
    for (run, report) in [("clean", clean), ("abused", abused)] {
        out.push(Check::new(
            &format!("nothing lost ({run})"),
            report.sent > 0 && report.undelivered == 0 && report.unacked == 0 && report.rate_limited == 0,
            format!(
                "{} sent, {} undelivered, {} unacked, {} rate_limited",
                report.sent, report.undelivered, report.unacked, report.rate_limited
            ),
        ));
    }
    if let (Some(clean), Some(abused)) = (pair.rss_clean, pair.rss_abused) {
        // The honest load alone grows the RSS too (the store's cache, slab
        // pages touched for the first time): what counts is how much more
        // the abused run grew than the clean one.
        let clean_growth = clean.peak.saturating_sub(clean.start);
        let abused_growth = abused.peak.saturating_sub(abused.start);
        out.push(Check::new(
            "gateway RSS bounded",
            abused_growth.saturating_sub(clean_growth) <= checks.rss_growth_max_mib << 20,
            format!(
                "abused run: start {:.1} MiB, peak {:.1} MiB, end {:.1} MiB ({} samples); it grew {:.1} MiB, \
                 the clean run {:.1} MiB (at most {} MiB more)",
                mib(abused.start),
                mib(abused.peak),
                mib(abused.end),
                abused.samples,
                mib(abused_growth),
                mib(clean_growth),
                checks.rss_growth_max_mib
            ),
        ));
    }
    out
}

/// Both runs side by side in one table, with the checks, and the curves of
/// their honest latencies.
fn table(scenario: &str, pair: &Pair, checks: &[Check]) -> (Table, Vec<Series>) {
    let mut table = Table::new(format!(
        "{scenario}: honest chat clean, then with the abuse beside it ({} visitors, {} agents, {:.0} msg/s)",
        pair.clean.visitors, pair.clean.agents, pair.clean.target_rate
    ));
    chat::add_sections(&mut table, &pair.clean, "clean run: ");
    chat::add_sections(&mut table, &pair.abused, "abused run: ");
    table.section("checks");
    for check in checks {
        table.check(&check.name, check.ok, &check.detail);
    }
    let mut series = Vec::new();
    for (run, report) in [("clean", &pair.clean), ("abused", &pair.abused)] {
        // The honest delivery and ack: the two latencies the checks compare.
        for curve in report.curves.iter().take(2) {
            series.push(Series { name: format!("{run} {}", curve.name), ..curve.clone() });
        }
    }
    (table, series)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Emits both runs and the checks (table, JSON line, HTML page); fails if
/// a check did.
pub fn conclude<T: Serialize>(
    scenario: &str,
    pair: &Pair,
    tally: &T,
    checks: &[Check],
    out: &Output,
) -> anyhow::Result<()> {
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
    #[derive(Serialize)]
    struct Line<'a, T> {
        scenario: &'a str,
        pass: bool,
        checks: &'a [Check],
        #[serde(flatten)]
        pair: &'a Pair,
        beside: &'a T,
    }
    let line = Line { scenario, pass: failed.is_empty(), checks, pair, beside: tally };
    let (table, series) = table(scenario, pair, checks);
    out.emit(&line, &table, &series)?;
    if !failed.is_empty() {
        bail!("{scenario}: {} check(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_counters_are_summed_over_shards() {
        let metrics = "# TYPE kefu_closes_total counter\n\
            kefu_closes_total{shard=\"0\",by=\"server\",code=\"1002\"} 3\n\
            kefu_closes_total{shard=\"1\",by=\"server\",code=\"1002\"} 4\n\
            kefu_closes_total{shard=\"0\",by=\"client\",code=\"4001\"} 1\n\
            kefu_slow_consumer_closes_total{shard=\"0\"} 2\n\
            kefu_slow_consumer_closes_total{shard=\"1\"} 5\n\
            kefu_closes_totally_else 9\n";
        let counters = parse_close_counters(metrics);
        assert_eq!(counters.get("close 1002"), Some(&7));
        assert_eq!(counters.get("close 4001"), Some(&1));
        assert_eq!(counters.get("slow_consumer"), Some(&7));
        assert_eq!(counters.len(), 3);
        let before = Some(BTreeMap::from([("close 1002".to_owned(), 5), ("slow_consumer".to_owned(), 7)]));
        let delta = counters_delta(&before, &Some(counters)).expect("both sides");
        assert_eq!(delta, BTreeMap::from([("close 1002".to_owned(), 2), ("close 4001".to_owned(), 1)]));
    }
}
