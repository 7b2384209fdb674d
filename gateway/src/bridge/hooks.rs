//! The hook client: kefu calling the business system's `kefu.v1.Hooks`
//! (`[hooks]`), on the bridge's tokio runtime.
//!
//! The chat machines ask for a hook as an output (`Output::Hook`); the
//! shard loop hands the call to [`HookClient::call`], which must not block
//! a shard, so it only takes a place and spawns a task on the bridge's
//! runtime. The task waits its turn among the calls in progress, makes the
//! gRPC call, and posts the answer to the shard that asked, as the bridge
//! (sender `mailboxes.len()`): `ChatMsg::Hooked` for `OnMessage`,
//! `ChatMsg::Admitted` for `OnConnect`.
//!
//! Bounds, so that a slow business system costs kefu no unbounded memory:
//! - `hooks.concurrent_calls_max` calls in progress at once; later ones
//!   wait their turn, first come first served;
//! - `hooks.queued_calls_max` calls waiting; past it a call is not taken
//!   (the shard treats it as failed at once);
//! - `hooks.timeout_ms` from the call to its answer, waiting included;
//!   past it, or on any error, the answer is `Failed` and `hooks.failure`
//!   decides;
//! - `hooks.response_bytes_max` per answer, and an answer's texts within
//!   the `[messages]` limits a client's would have to meet.
//!
//! Every answer is posted, exactly once: a message (and every later one
//! of its conversation) or a connection waits for it. A full inbox is
//! retried until it takes the answer; the call keeps its place meanwhile,
//! so a stuck shard backs up into the bound above, not into memory.
//!
//! Each call, by outcome, and its latency are counted in [`HookStats`]
//! (`/metrics`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context as _;
use kefu_core::chat::hooks::{Admission, Hook, HookCall, Verdict};
use kefu_core::chat::{ChatMsg, ShardMsg};
use kefu_core::identity::Meta;
use kefu_proto::client::Sender;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::pb;
use super::pb::hooks_client::HooksClient;
use super::pb::on_message_response::Action;
use crate::chat::api::HookSink;
use crate::config::HooksConfig;
use crate::mailbox::Mailbox;
use crate::metrics::{self, Histogram, HistogramSum, Unit};

/// How long an answer waits before trying a full inbox again.
const POST_RETRY: Duration = Duration::from_millis(1);

/// How often failed hook calls are logged at most: a business system that
/// is down fails every call, and a line per call would flood the log. The
/// counts are in `/metrics` either way.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// A business system that enforces the `grpc-timeout` kefu sends gives up
/// at the same moment as kefu's own deadline (tonic answers `CANCELLED`,
/// "Timeout expired"), and its answer may win by a timer tick: a
/// cancellation this close to the deadline is counted as the timeout it is.
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

/// What the client is configured with.
#[derive(Debug, Clone)]
pub struct HookLimits {
    /// `hooks.timeout_ms`.
    pub timeout: Duration,
    /// `hooks.concurrent_calls_max`.
    pub concurrent_calls_max: usize,
    /// `hooks.queued_calls_max`.
    pub queued_calls_max: usize,
    /// `hooks.response_bytes_max`.
    pub response_bytes_max: usize,
    /// What an answer may hold.
    pub answer: AnswerLimits,
}

impl HookLimits {
    /// The limits of `[hooks]`, with the answers' texts bounded as
    /// `[messages]` bounds a client's.
    pub fn new(hooks: &HooksConfig, messages: &kefu_core::config::LimitsConfig) -> HookLimits {
        HookLimits {
            timeout: Duration::from_millis(hooks.timeout_ms),
            concurrent_calls_max: hooks.concurrent_calls_max,
            queued_calls_max: hooks.queued_calls_max,
            response_bytes_max: hooks.response_bytes_max,
            answer: AnswerLimits {
                text_bytes_max: messages.max_text_bytes,
                meta_bytes_max: messages.max_meta_bytes,
                replies_max: hooks.replies_max,
            },
        }
    }
}

/// What a hook's answer may hold: what kefu would accept from a client.
#[derive(Debug, Clone, Copy)]
pub struct AnswerLimits {
    /// A rewritten text, each reply, a reason (`messages.max_text_bytes`).
    pub text_bytes_max: usize,
    /// `OnConnect`'s `meta`, keys and values together, and its `name`
    /// (`messages.max_meta_bytes`).
    pub meta_bytes_max: usize,
    /// Replies to one message (`hooks.replies_max`).
    pub replies_max: usize,
}

/// The `HookSink` the shards are given: a handle on the bridge's runtime
/// and the gRPC client it runs.
pub struct HookClient {
    runtime: tokio::runtime::Handle,
    /// Places for calls taken (in progress or waiting their turn).
    places: Arc<Semaphore>,
    calls: Arc<Calls>,
}

/// What every call's task shares.
struct Calls {
    client: HooksClient<tonic::transport::Channel>,
    /// Turns: calls in progress.
    turns: Semaphore,
    limits: HookLimits,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    stats: Arc<HookStats>,
    failures: FailureLog,
}

impl HookClient {
    /// A client of `endpoint` whose calls run on `runtime` (the bridge's)
    /// and whose answers go into `mailboxes`. It connects on its first call
    /// (and again after the connection is lost), so a business system that
    /// starts after kefu is fine. One connection is tried at once, only to
    /// say in the log whether the endpoint answers: a wrong address should
    /// show at start, not as the first visitor's failed call.
    pub fn new(
        endpoint: &str,
        limits: HookLimits,
        runtime: tokio::runtime::Handle,
        mailboxes: Arc<[Mailbox<ShardMsg>]>,
        stats: Arc<HookStats>,
    ) -> anyhow::Result<HookClient> {
        let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .with_context(|| format!("hooks.endpoint = {endpoint:?}"))?
            .connect_timeout(limits.timeout);
        // The channel's connection task is spawned on the runtime it is
        // made in: the bridge's.
        let channel = {
            let _in_runtime = runtime.enter();
            endpoint.connect_lazy()
        };
        let probe = endpoint.clone();
        runtime.spawn(async move {
            let uri = probe.uri().clone();
            match probe.connect().await {
                Ok(_) => tracing::info!(endpoint = %uri, "hooks.endpoint answers"),
                Err(e) => tracing::warn!(
                    endpoint = %uri,
                    error = %e,
                    "hooks.endpoint does not answer at start: hook calls fail (counted, and let through or refused as hooks.failure says) until it does; each call tries again"
                ),
            }
        });
        let client = HooksClient::new(channel).max_decoding_message_size(limits.response_bytes_max);
        let places = Arc::new(Semaphore::new(limits.concurrent_calls_max + limits.queued_calls_max));
        let turns = Semaphore::new(limits.concurrent_calls_max);
        let failures = FailureLog::new(FAILURE_LOG_EVERY);
        let calls = Calls { client, turns, limits, mailboxes, stats, failures };
        Ok(HookClient { runtime, places, calls: Arc::new(calls) })
    }
}

impl HookSink for HookClient {
    fn call(&self, shard: usize, token: u64, call: HookCall) -> Result<(), String> {
        assert!(shard < self.calls.mailboxes.len(), "a hook call from shard {shard}, which does not exist");
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            self.calls.stats.count(call.hook(), Outcome::Busy);
            let l = &self.calls.limits;
            let why = format!(
                "{} hook calls are in progress or waiting (hooks.concurrent_calls_max + hooks.queued_calls_max)",
                l.concurrent_calls_max + l.queued_calls_max
            );
            self.calls.failures.failed(call.hook(), &why);
            return Err(why);
        };
        let calls = self.calls.clone();
        self.runtime.spawn(async move {
            let answer = calls.make(token, call).await;
            calls.post(shard, answer).await;
            drop(place);
        });
        Ok(())
    }
}

/// Why a call has no answer.
#[derive(Debug)]
enum Failure {
    /// Past `hooks.timeout_ms`.
    Timeout,
    /// The call failed (transport, or the business system's status).
    Status(tonic::Status),
}

impl Calls {
    /// Makes one call and says what to post for it.
    async fn make(&self, token: u64, call: HookCall) -> ChatMsg {
        let started = Instant::now();
        let deadline = started + self.limits.timeout;
        let hook = call.hook();
        let (outcome, msg) = match call {
            HookCall::OnMessage { conv, cid, text, attachment_mime, from } => {
                let mut request = tonic::Request::new(pb::OnMessageRequest {
                    conv: conv.to_string(),
                    cid,
                    text,
                    attachment_mime,
                    from: Some(user(from)),
                });
                request.set_timeout(self.limits.timeout);
                let mut client = self.client.clone();
                let answer = self.in_turn(deadline, async move { client.on_message(request).await }).await;
                let (outcome, verdict) = verdict_of(answer, &self.limits);
                (outcome, ChatMsg::Hooked { token, verdict })
            }
            HookCall::OnConnect { user: who, meta } => {
                let mut request = tonic::Request::new(pb::OnConnectRequest { user: Some(user(who)), meta });
                request.set_timeout(self.limits.timeout);
                let mut client = self.client.clone();
                let answer = self.in_turn(deadline, async move { client.on_connect(request).await }).await;
                let (outcome, admission) = admission_of(answer, &self.limits);
                (outcome, ChatMsg::Admitted { token, admission })
            }
        };
        self.stats.count(hook, outcome);
        self.stats.observe(hook, started.elapsed());
        if let ChatMsg::Hooked { verdict: Verdict::Failed { why }, .. }
        | ChatMsg::Admitted { admission: Admission::Failed { why }, .. } = &msg
        {
            self.failures.failed(hook, why);
        }
        msg
    }

    /// Runs `call` once a turn is free, all before `deadline`.
    async fn in_turn<T>(
        &self,
        deadline: Instant,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        let attempt = async {
            // The semaphore is never closed; the error is unreachable, but
            // a failed call is the honest answer if it ever were.
            let _turn = self.turns.acquire().await.map_err(|_| Failure::Status(closed()))?;
            call.await.map(tonic::Response::into_inner).map_err(|status| {
                let late = Instant::now() + DEADLINE_SLACK >= deadline;
                match status.code() {
                    tonic::Code::Cancelled if late => Failure::Timeout,
                    _ => Failure::Status(status),
                }
            })
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(answer) => answer,
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Posts an answer to `shard` as the bridge, retrying a full inbox
    /// until it takes it.
    async fn post(&self, shard: usize, msg: ChatMsg) {
        let bridge = self.mailboxes.len();
        let mut msg = ShardMsg::Chat(Box::new(msg));
        loop {
            match self.mailboxes[shard].send(bridge, msg) {
                Ok(()) => return,
                Err(back) => {
                    msg = back;
                    tokio::time::sleep(POST_RETRY).await;
                }
            }
        }
    }
}

/// Logs failed hook calls, one line per `every` at most, with how many
/// failed unlogged since the last line.
#[derive(Debug)]
struct FailureLog {
    every: Duration,
    origin: std::time::Instant,
    /// When the next line may be written, in ms since `origin`.
    next_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl FailureLog {
    fn new(every: Duration) -> FailureLog {
        FailureLog {
            every,
            origin: std::time::Instant::now(),
            next_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Counts a failed call of `hook`; returns whether it was logged.
    fn failed(&self, hook: Hook, why: &str) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if now < next
            || self.next_ms.compare_exchange(next, now.saturating_add(every), Relaxed, Relaxed).is_err()
        {
            self.unlogged.fetch_add(1, Relaxed);
            return false;
        }
        let unlogged = self.unlogged.swap(0, Relaxed);
        tracing::warn!(
            hook = hook.name(),
            why,
            unlogged_since_last = unlogged,
            "a hook call failed; hooks.failure decides (kefu_hook_calls_total counts every one)"
        );
        true
    }
}

fn closed() -> tonic::Status {
    tonic::Status::unavailable("the hook client is closed")
}

fn user(s: Sender) -> pb::User {
    pb::User { role: s.role.as_str().into(), id: s.id, name: s.name }
}

/// Why a call failed, for the machine (and through it, the client).
fn why(failure: &Failure, limits: &HookLimits) -> (Outcome, String) {
    match failure {
        Failure::Timeout => (Outcome::Timeout, format!("no answer within {} ms", limits.timeout.as_millis())),
        Failure::Status(s) if s.code() == tonic::Code::DeadlineExceeded => {
            (Outcome::Timeout, format!("no answer within {} ms", limits.timeout.as_millis()))
        }
        Failure::Status(s) => (Outcome::Error, format!("{:?}: {}", s.code(), s.message())),
    }
}

/// The `OnMessage` answer as the home takes it, and how it is counted.
fn verdict_of(answer: Result<pb::OnMessageResponse, Failure>, limits: &HookLimits) -> (Outcome, Verdict) {
    let answer = match answer {
        Ok(a) => a,
        Err(f) => {
            let (outcome, why) = why(&f, limits);
            return (outcome, Verdict::Failed { why });
        }
    };
    match check_message(answer, &limits.answer) {
        Ok(counted) => counted,
        Err(why) => (Outcome::Invalid, Verdict::Failed { why: format!("invalid answer: {why}") }),
    }
}

/// An `OnMessage` answer checked against what a client's message may hold.
fn check_message(a: pb::OnMessageResponse, limits: &AnswerLimits) -> Result<(Outcome, Verdict), String> {
    let text_max = limits.text_bytes_max;
    let too_long = |what: &str, len: usize| -> Result<(), String> {
        if len > text_max {
            return Err(format!("{what} is {len} bytes, more than messages.max_text_bytes ({text_max})"));
        }
        Ok(())
    };
    let action = Action::try_from(a.action).map_err(|_| format!("unknown action {}", a.action))?;
    let replies = match action {
        Action::Reject => Vec::new(),
        Action::Allow | Action::Rewrite => {
            // An empty reply would be an empty message, which no client may
            // send: it is left out.
            let replies: Vec<String> = a.replies.into_iter().filter(|r| !r.is_empty()).collect();
            if replies.len() > limits.replies_max {
                return Err(format!(
                    "{} replies, more than hooks.replies_max ({})",
                    replies.len(),
                    limits.replies_max
                ));
            }
            for r in &replies {
                too_long("a reply", r.len())?;
            }
            replies
        }
    };
    Ok(match action {
        Action::Allow => (Outcome::Allow, Verdict::Allow { replies }),
        Action::Rewrite => {
            if a.text.is_empty() {
                return Err("REWRITE with an empty text".into());
            }
            too_long("the rewritten text", a.text.len())?;
            (Outcome::Rewrite, Verdict::Rewrite { text: a.text, replies })
        }
        Action::Reject => {
            too_long("the reason", a.reason.len())?;
            let reason = if a.reason.is_empty() { "refused by the message hook".into() } else { a.reason };
            (Outcome::Reject, Verdict::Reject { reason })
        }
    })
}

/// The `OnConnect` answer as the edge takes it, and how it is counted.
fn admission_of(answer: Result<pb::OnConnectResponse, Failure>, limits: &HookLimits) -> (Outcome, Admission) {
    let a = match answer {
        Ok(a) => a,
        Err(f) => {
            let (outcome, why) = why(&f, limits);
            return (outcome, Admission::Failed { why });
        }
    };
    let max = limits.answer.meta_bytes_max;
    if a.refuse {
        if a.reason.len() > limits.answer.text_bytes_max {
            let why = format!(
                "invalid answer: the reason is longer than messages.max_text_bytes ({})",
                limits.answer.text_bytes_max
            );
            return (Outcome::Invalid, Admission::Failed { why });
        }
        return (Outcome::Refuse, Admission::Refuse { reason: a.reason });
    }
    let meta_bytes: usize = a.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if meta_bytes > max || a.name.len() > max {
        let why = format!("invalid answer: name or meta larger than messages.max_meta_bytes ({max})");
        return (Outcome::Invalid, Admission::Failed { why });
    }
    if a.meta.keys().any(String::is_empty) {
        let why = "invalid answer: an empty meta key".to_string();
        return (Outcome::Invalid, Admission::Failed { why });
    }
    let name = (!a.name.is_empty()).then_some(a.name);
    let meta: Meta = a.meta.into_iter().collect();
    (Outcome::Admit, Admission::Admit { name, meta })
}

/// How a hook call ended, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `OnMessage`: store as sent.
    Allow,
    /// `OnMessage`: store rewritten.
    Rewrite,
    /// `OnMessage`: refused.
    Reject,
    /// `OnConnect`: let in.
    Admit,
    /// `OnConnect`: refused.
    Refuse,
    /// No answer within `hooks.timeout_ms` (failed).
    Timeout,
    /// The call failed: connection refused, a gRPC error status (failed).
    Error,
    /// An answer kefu cannot use: an unknown action, a text past the
    /// limits (failed).
    Invalid,
    /// Not made: the calls in progress and waiting were at their bound
    /// (failed at once).
    Busy,
}

impl Outcome {
    const ALL: [Outcome; 9] = [
        Outcome::Allow,
        Outcome::Rewrite,
        Outcome::Reject,
        Outcome::Admit,
        Outcome::Refuse,
        Outcome::Timeout,
        Outcome::Error,
        Outcome::Invalid,
        Outcome::Busy,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Rewrite => "rewrite",
            Outcome::Reject => "reject",
            Outcome::Admit => "admit",
            Outcome::Refuse => "refuse",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Invalid => "invalid",
            Outcome::Busy => "busy",
        }
    }

    /// Whether `hook` can end so (rendered only then).
    fn of(self, hook: Hook) -> bool {
        match self {
            Outcome::Allow | Outcome::Rewrite | Outcome::Reject => hook == Hook::OnMessage,
            Outcome::Admit | Outcome::Refuse => hook == Hook::OnConnect,
            Outcome::Timeout | Outcome::Error | Outcome::Invalid | Outcome::Busy => true,
        }
    }
}

/// Upper bounds of the latency histogram's buckets, in microseconds: from
/// a fast local hook to the longest `hooks.timeout_ms`.
const BOUNDS_US: &[u64] = &[
    500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Hook calls by outcome and their latency, per hook; written by the
/// bridge's tasks, read by `/metrics`.
#[derive(Debug)]
pub struct HookStats {
    calls: [[AtomicU64; Outcome::ALL.len()]; 2],
    latency: [Histogram; 2],
}

impl Default for HookStats {
    fn default() -> Self {
        Self { calls: Default::default(), latency: [Histogram::new(BOUNDS_US), Histogram::new(BOUNDS_US)] }
    }
}

fn index(hook: Hook) -> usize {
    match hook {
        Hook::OnMessage => 0,
        Hook::OnConnect => 1,
    }
}

impl HookStats {
    fn count(&self, hook: Hook, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.calls[index(hook)][i].fetch_add(1, Relaxed);
    }

    fn observe(&self, hook: Hook, took: Duration) {
        self.latency[index(hook)].observe_duration(took);
    }

    /// Calls of `hook` that ended with `outcome` so far.
    pub fn calls(&self, hook: Hook, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.calls[index(hook)][i].load(Relaxed)
    }

    /// Appends `kefu_hook_calls_total` and `kefu_hook_duration_seconds`
    /// in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP kefu_hook_calls_total Hook calls by hook and outcome (timeout, error, invalid and busy are failures, decided by hooks.failure).\n# TYPE kefu_hook_calls_total counter"
        );
        for hook in Hook::ALL {
            for outcome in Outcome::ALL.into_iter().filter(|o| o.of(hook)) {
                let _ = writeln!(
                    out,
                    "kefu_hook_calls_total{{hook=\"{}\",outcome=\"{}\"}} {}",
                    hook.name(),
                    outcome.name(),
                    self.calls(hook, outcome)
                );
            }
        }
        metrics::family(
            out,
            "kefu_hook_duration_seconds",
            "histogram",
            "Time from a hook call to its answer, waiting for a turn included (calls not made are not counted).",
        );
        for hook in Hook::ALL {
            let latency = HistogramSum::of(BOUNDS_US, [&self.latency[index(hook)]]);
            latency.render(
                out,
                "kefu_hook_duration_seconds",
                &format!("hook=\"{}\"", hook.name()),
                Unit::Seconds,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HookLimits {
        HookLimits {
            timeout: Duration::from_millis(200),
            concurrent_calls_max: 2,
            queued_calls_max: 2,
            response_bytes_max: 4096,
            answer: AnswerLimits { text_bytes_max: 16, meta_bytes_max: 24, replies_max: 2 },
        }
    }

    fn answer(action: Action, text: &str, reason: &str, replies: &[&str]) -> pb::OnMessageResponse {
        pb::OnMessageResponse {
            action: action as i32,
            reason: reason.into(),
            text: text.into(),
            replies: replies.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn failures_are_logged_once_per_interval() {
        let log = FailureLog::new(Duration::from_secs(3600));
        assert!(log.failed(Hook::OnConnect, "first"), "the first failure is logged");
        assert!(!log.failed(Hook::OnConnect, "second"));
        assert!(!log.failed(Hook::OnMessage, "third"));
        assert_eq!(log.unlogged.load(Relaxed), 2);
        // The interval is over (set back rather than slept through).
        log.next_ms.store(0, Relaxed);
        assert!(log.failed(Hook::OnMessage, "after the interval"));
        assert_eq!(log.unlogged.load(Relaxed), 0, "the line said how many went unlogged");
    }

    #[test]
    fn message_answers_map_to_verdicts() {
        let l = limits();
        let (o, v) = verdict_of(Ok(answer(Action::Allow, "", "", &["T-1", ""])), &l);
        assert_eq!(
            (o, v),
            (Outcome::Allow, Verdict::Allow { replies: vec!["T-1".into()] }),
            "empty replies left out"
        );
        let (o, v) = verdict_of(Ok(answer(Action::Rewrite, "b*g", "", &[])), &l);
        assert_eq!((o, v), (Outcome::Rewrite, Verdict::Rewrite { text: "b*g".into(), replies: vec![] }));
        let (o, v) = verdict_of(Ok(answer(Action::Reject, "", "spam", &["ignored"])), &l);
        assert_eq!((o, v), (Outcome::Reject, Verdict::Reject { reason: "spam".into() }));
        let (_, v) = verdict_of(Ok(answer(Action::Reject, "", "", &[])), &l);
        assert_eq!(
            v,
            Verdict::Reject { reason: "refused by the message hook".into() },
            "never an empty reason"
        );
    }

    #[test]
    fn answers_past_the_limits_are_failures_that_say_why() {
        let l = limits();
        let unknown = pb::OnMessageResponse { action: 7, ..Default::default() };
        for (a, why) in [
            (unknown, "unknown action 7"),
            (answer(Action::Rewrite, "", "", &[]), "empty text"),
            (answer(Action::Rewrite, &"x".repeat(17), "", &[]), "messages.max_text_bytes"),
            (answer(Action::Allow, "", "", &["a", "b", "c"]), "hooks.replies_max"),
            (answer(Action::Allow, "", "", &[&"x".repeat(17)]), "a reply"),
        ] {
            let (o, v) = verdict_of(Ok(a), &l);
            assert_eq!(o, Outcome::Invalid);
            let Verdict::Failed { why: got } = v else { panic!("{v:?}") };
            assert!(got.contains(why), "{got}");
        }
    }

    #[test]
    fn timeouts_and_errors_are_failures_counted_apart() {
        let l = limits();
        let (o, v) = verdict_of(Err(Failure::Timeout), &l);
        assert_eq!((o, v), (Outcome::Timeout, Verdict::Failed { why: "no answer within 200 ms".into() }));
        let late = Failure::Status(tonic::Status::deadline_exceeded("slow"));
        assert_eq!(verdict_of(Err(late), &l).0, Outcome::Timeout);
        let down = Failure::Status(tonic::Status::unavailable("connection refused"));
        let (o, a) = admission_of(Err(down), &l);
        assert_eq!(o, Outcome::Error);
        let Admission::Failed { why } = a else { panic!("{a:?}") };
        assert!(why.contains("connection refused"), "{why}");
    }

    #[test]
    fn connect_answers_map_to_admissions() {
        let l = limits();
        let empty = pb::OnConnectResponse::default();
        assert_eq!(
            admission_of(Ok(empty), &l),
            (Outcome::Admit, Admission::Admit { name: None, meta: Meta::new() })
        );
        let enrich = pb::OnConnectResponse {
            name: "Vera".into(),
            meta: [("plan".to_string(), "gold".to_string())].into_iter().collect(),
            ..Default::default()
        };
        let (o, a) = admission_of(Ok(enrich), &l);
        assert_eq!(o, Outcome::Admit);
        assert_eq!(
            a,
            Admission::Admit {
                name: Some("Vera".into()),
                meta: [("plan".to_string(), "gold".to_string())].into_iter().collect()
            }
        );
        let refuse = pb::OnConnectResponse { refuse: true, reason: "banned".into(), ..Default::default() };
        assert_eq!(
            admission_of(Ok(refuse), &l),
            (Outcome::Refuse, Admission::Refuse { reason: "banned".into() })
        );
        let big = pb::OnConnectResponse {
            meta: [("k".to_string(), "v".repeat(30))].into_iter().collect(),
            ..Default::default()
        };
        assert_eq!(admission_of(Ok(big), &l).0, Outcome::Invalid);
    }

    #[test]
    fn stats_render_every_outcome_and_a_cumulative_histogram() {
        let s = HookStats::default();
        s.count(Hook::OnMessage, Outcome::Allow);
        s.count(Hook::OnConnect, Outcome::Timeout);
        s.observe(Hook::OnMessage, Duration::from_micros(300));
        s.observe(Hook::OnMessage, Duration::from_millis(3));
        s.observe(Hook::OnMessage, Duration::from_secs(90));
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("kefu_hook_calls_total{hook=\"on_message\",outcome=\"allow\"} 1\n"), "{out}");
        assert!(out.contains("kefu_hook_calls_total{hook=\"on_connect\",outcome=\"timeout\"} 1\n"), "{out}");
        assert!(!out.contains("hook=\"on_connect\",outcome=\"allow\""), "only outcomes a hook can have");
        assert!(
            out.contains("kefu_hook_duration_seconds_bucket{hook=\"on_message\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("kefu_hook_duration_seconds_bucket{hook=\"on_message\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("kefu_hook_duration_seconds_bucket{hook=\"on_message\",le=\"60\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("kefu_hook_duration_seconds_bucket{hook=\"on_message\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("kefu_hook_duration_seconds_sum{hook=\"on_message\"} 90.003300\n"), "{out}");
        assert!(out.contains("kefu_hook_duration_seconds_count{hook=\"on_connect\"} 0\n"), "{out}");
    }
}
