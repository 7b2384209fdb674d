//! `kefu.v1.Events`: the event log, followed by offset.
//!
//! Every change kefu makes durable gets one place in storage's global log,
//! in the group commit that makes it durable (DESIGN.md, "One message, end
//! to end"). This service hands that log out as events:
//!
//! - **Offsets** are storage's log offsets plus one, so the first event is
//!   1 and 0 can mean "not given". They only grow and have no gaps.
//! - **Subscribe** streams every event from a start, in order: `from_offset`
//!   N > 0 starts at offset N; 0 starts after the consumer's last commit
//!   (the start of the log for a consumer that never committed). It first
//!   reads what is stored, a page at a time, then follows the live tail.
//! - **Commit** stores the last offset a consumer processed, durably, as
//!   a `consumer_offsets` write through the bridge's storage source; it
//!   answers once the commit is on disk.
//!
//! Only durable events are ever shown. The writer thread publishes the
//! log's end after each group commit has returned (`Store::on_log_end`,
//! into a [`watch`] channel), and a subscriber reads the log only below
//! that end, whatever redb would let it see: an event a crash could take
//! back is never sent. The same channel is how the live tail waits: a
//! subscriber that has caught up sleeps on it until the next commit, with
//! no polling of storage.
//!
//! Memory is bounded per subscriber: storage is read a page at a time
//! (`admin.events_page_size_max`) into a bounded channel
//! (`admin.subscribe_buffer_events`) that the gRPC stream drains, so a slow
//! consumer holds the reader back instead of growing a buffer. At most
//! `admin.subscribers_max` streams run at once; one more is refused
//! `RESOURCE_EXHAUSTED`.
//!
//! REST mirrors both calls: `GET /api/v1/events` returns one page (a
//! stream does not fit a JSON answer) and `POST /api/v1/events/commit`
//! commits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kefu_proto::ids::ConvId;
use kefu_storage::{ConvChange, ConversationRecord, LogEvent, LogRecord, Reader, StorageError, WriteOp};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::codegen::tokio_stream::StreamExt as _;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response as GrpcResponse, Status};
use tracing::{debug, warn};

use super::calls::message;
use super::pb;
use super::writes::BridgeWrites;
use crate::config::AdminConfig;
use crate::metrics;

/// Longest consumer name, in bytes. Names are keys of a storage table and
/// travel in every commit; a business system needs a few words, not more.
pub const CONSUMER_BYTES_MAX: usize = 256;

/// How often a waiting subscriber looks at the stop flag: a subscriber
/// must not hold the bridge's graceful stop open.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The limits of the service, from `[admin]`.
#[derive(Debug, Clone)]
pub struct EventLimits {
    /// `admin.subscribers_max`.
    pub subscribers_max: usize,
    /// `admin.subscribe_buffer_events`.
    pub subscribe_buffer_events: usize,
    /// `admin.events_page_size_default`.
    pub page_size_default: u32,
    /// `admin.events_page_size_max`.
    pub page_size_max: u32,
}

impl EventLimits {
    /// The limits of `admin`.
    pub fn new(admin: &AdminConfig) -> EventLimits {
        EventLimits {
            subscribers_max: admin.subscribers_max,
            subscribe_buffer_events: admin.subscribe_buffer_events,
            page_size_default: admin.events_page_size_default,
            page_size_max: admin.events_page_size_max,
        }
    }
}

/// What the service is built from.
pub struct EventsInit {
    /// Reads the log and the consumers' offsets.
    pub reader: Reader,
    /// Makes commits durable.
    pub writes: Arc<BridgeWrites>,
    /// The log's end (storage numbering: the offset the next record gets)
    /// as of the last group commit that returned.
    pub log_end: watch::Receiver<u64>,
    /// Its limits.
    pub limits: EventLimits,
}

impl std::fmt::Debug for EventsInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsInit").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// `kefu.v1.Events`, for gRPC and REST alike. Cheap to clone.
#[derive(Clone)]
pub struct EventsApi {
    inner: Arc<Inner>,
}

struct Inner {
    reader: Reader,
    writes: Arc<BridgeWrites>,
    log_end: watch::Receiver<u64>,
    limits: EventLimits,
    subscribers: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    /// Where each live stream is, for the lag in `/metrics`: at most
    /// `admin.subscribers_max` entries, since a place is taken first.
    places: Mutex<Vec<Place>>,
    next_place: AtomicU64,
}

/// A live stream's consumer and the API offset of the last event it sent
/// (storage's next offset to send).
struct Place {
    id: u64,
    consumer: String,
    next: Arc<AtomicU64>,
}

/// Removes a stream's [`Place`] when its task ends, however it ends.
struct Placed {
    api: EventsApi,
    id: u64,
    next: Arc<AtomicU64>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        let mut places = self.api.inner.places.lock().unwrap_or_else(|e| e.into_inner());
        places.retain(|p| p.id != self.id);
    }
}

impl std::fmt::Debug for EventsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsApi").field("limits", &self.inner.limits).finish_non_exhaustive()
    }
}

fn storage(e: StorageError) -> Status {
    warn!(error = %e, "bridge: reading the event log failed");
    Status::internal(format!("storage read failed: {e}"))
}

fn check_consumer(consumer: &str) -> Result<(), Status> {
    if consumer.is_empty() {
        return Err(Status::invalid_argument("consumer: required (the name offsets are committed under)"));
    }
    if consumer.len() > CONSUMER_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "consumer: {} bytes, at most {CONSUMER_BYTES_MAX}",
            consumer.len()
        )));
    }
    if consumer.chars().any(char::is_control) {
        return Err(Status::invalid_argument("consumer: control characters are not allowed"));
    }
    Ok(())
}

/// A stored conversation state as the contract spells it. Events carry
/// what the log holds: the visitor's id (its profile travels in `user`
/// events) and no `last_seq` (messages travel as their own events).
fn conversation(c: ConversationRecord) -> pb::Conversation {
    pb::Conversation {
        conv: ConvId(c.id).to_string(),
        status: c.status.as_str().into(),
        agent: c.agent.map(|a| pb::AgentRef { id: a.id, name: a.name }),
        group: c.group,
        visitor: Some(pb::Visitor { id: c.visitor_id, name: String::new(), meta: Default::default() }),
        created_ms: c.created_ms,
        updated_ms: c.updated_ms,
        last_seq: 0,
    }
}

/// A log record as the contract's event, at its API offset (storage's + 1).
pub fn event(e: LogEvent) -> pb::Event {
    use pb::event::Kind;
    let (ts, kind) = match e.record {
        LogRecord::Message(m) => (m.ts_ms, Kind::Message(message(m))),
        LogRecord::Conversation(c) => {
            let change = e.change.map_or("", ConvChange::as_str).to_string();
            (
                c.updated_ms,
                Kind::Conversation(pb::ConversationChanged { change, conversation: Some(conversation(c)) }),
            )
        }
        // A profile records no time of change.
        LogRecord::User(u) => {
            let user = pb::User { role: u.role.as_str().into(), id: u.id, name: u.name };
            (0, Kind::User(pb::UserSynced { user: Some(user), meta: u.meta.into_iter().collect() }))
        }
        // A read mark records the reader's id, not its role.
        LogRecord::Read(r) => {
            let by = pb::User { role: String::new(), id: r.user_id, name: String::new() };
            (r.ts_ms, Kind::Read(pb::ReadMark { conv: ConvId(r.conv).to_string(), by: Some(by), seq: r.seq }))
        }
        LogRecord::Presence(p) => {
            (p.ts_ms, Kind::Presence(pb::PresenceChanged { agent_id: p.agent_id, status: p.status }))
        }
    };
    pb::Event { offset: e.offset + 1, ts, kind: Some(kind) }
}

impl EventsApi {
    /// The service; it ends its streams once `stop` is raised.
    pub fn new(init: EventsInit, stop: Arc<AtomicBool>) -> EventsApi {
        let subscribers = Arc::new(Semaphore::new(init.limits.subscribers_max));
        EventsApi {
            inner: Arc::new(Inner {
                reader: init.reader,
                writes: init.writes,
                log_end: init.log_end,
                limits: init.limits,
                subscribers,
                stop,
                places: Mutex::new(Vec::new()),
                next_place: AtomicU64::new(0),
            }),
        }
    }

    /// The storage offset a read for `consumer` from API offset
    /// `from_offset` starts at.
    fn start(&self, consumer: &str, from_offset: u64) -> Result<u64, Status> {
        check_consumer(consumer)?;
        match from_offset {
            // A commit of API offset N is stored as N: storage's next
            // offset to read, since API offsets are storage's plus one.
            0 => Ok(self.inner.reader.consumer_offset(consumer).map_err(storage)?.unwrap_or(0)),
            n => Ok(n - 1),
        }
    }

    /// One page of events from storage offset `from`, below the durable end.
    fn page(&self, from: u64, limit: usize) -> Result<Vec<LogEvent>, Status> {
        let end = *self.inner.log_end.borrow();
        let page = self.inner.reader.events(from, end, limit).map_err(storage)?;
        // The log has no gaps: a page starts where it was asked to and
        // counts up by one. Checked here, where records leave storage.
        for (i, e) in page.iter().enumerate() {
            if e.offset != from + i as u64 {
                return Err(Status::internal(format!(
                    "the event log has offset {} where {} belongs",
                    e.offset + 1,
                    from + i as u64 + 1
                )));
            }
        }
        Ok(page)
    }

    /// Registers a stream of `consumer` starting at storage offset `next`.
    fn place(&self, consumer: &str, next: u64) -> Placed {
        let id = self.inner.next_place.fetch_add(1, Ordering::Relaxed);
        let next = Arc::new(AtomicU64::new(next));
        let place = Place { id, consumer: consumer.to_string(), next: next.clone() };
        self.inner.places.lock().unwrap_or_else(|e| e.into_inner()).push(place);
        Placed { api: self.clone(), id, next }
    }

    /// Appends the event log's series: its head, the live streams, and per
    /// consumer with a live stream how far its stream and its last commit
    /// are behind the head. Consumers without a stream are left out, so
    /// the label's values are bounded by `admin.subscribers_max`.
    pub fn render_lag(&self, out: &mut String) {
        use std::fmt::Write as _;
        // Storage's log end is the last API offset (API offsets are
        // storage's plus one), and a stream's next storage offset is the
        // API offset of the last event it handed out.
        let head = *self.inner.log_end.borrow();
        let mut lag: Vec<(String, u64)> = {
            let places = self.inner.places.lock().unwrap_or_else(|e| e.into_inner());
            places
                .iter()
                .map(|p| (p.consumer.clone(), head.saturating_sub(p.next.load(Ordering::Relaxed))))
                .collect()
        };
        let streams = lag.len();
        // One series per consumer: its most behind stream.
        lag.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        lag.dedup_by(|later, first| later.0 == first.0);
        metrics::family(out, "kefu_events_head_offset", "gauge", "Offset of the last durable event.");
        let _ = writeln!(out, "kefu_events_head_offset {head}");
        metrics::family(out, "kefu_events_subscribers", "gauge", "Subscribe streams open.");
        let _ = writeln!(out, "kefu_events_subscribers {streams}");
        metrics::family(
            out,
            "kefu_events_subscriber_lag_events",
            "gauge",
            "Events between the head and the last one a consumer's stream handed out (its most behind stream).",
        );
        for (consumer, n) in &lag {
            let _ = writeln!(
                out,
                "kefu_events_subscriber_lag_events{{consumer=\"{}\"}} {n}",
                metrics::escape_label(consumer)
            );
        }
        metrics::family(
            out,
            "kefu_events_commit_lag_events",
            "gauge",
            "Events between the head and a consumer's last commit (consumers with an open stream).",
        );
        for (consumer, _) in &lag {
            let Ok(committed) = self.inner.reader.consumer_offset(consumer) else { continue };
            let n = head.saturating_sub(committed.unwrap_or(0));
            let _ = writeln!(
                out,
                "kefu_events_commit_lag_events{{consumer=\"{}\"}} {n}",
                metrics::escape_label(consumer)
            );
        }
    }

    /// `Commit`: durable once it answers.
    pub async fn commit(&self, req: pb::CommitRequest) -> Result<pb::CommitResponse, Status> {
        check_consumer(&req.consumer)?;
        let last = *self.inner.log_end.borrow();
        if req.offset > last {
            return Err(Status::invalid_argument(format!(
                "offset: {} is past the last event ({last})",
                req.offset
            )));
        }
        self.inner.writes.write(WriteOp::CommitOffset { consumer: req.consumer, offset: req.offset }).await?;
        Ok(pb::CommitResponse {})
    }

    /// A page of events for REST: from `from_offset` as `Subscribe` starts.
    pub fn list(&self, q: EventsQuery) -> Result<EventPage, Status> {
        let limits = &self.inner.limits;
        let limit = match q.limit {
            0 => limits.page_size_default,
            n => n.min(limits.page_size_max),
        };
        let from = self.start(&q.consumer, q.from_offset)?;
        let page = self.page(from, limit as usize)?;
        let next = page.last().map_or(from, |e| e.offset + 1);
        Ok(EventPage { events: page.into_iter().map(event).collect(), next_offset: next + 1 })
    }
}

/// Sends `item`, waiting for room; false when the subscriber is gone or
/// the bridge is stopping.
async fn send(
    tx: &mpsc::Sender<Result<pb::Event, Status>>,
    item: Result<pb::Event, Status>,
    stop: &AtomicBool,
) -> bool {
    // Room is the common case: no timer for it.
    let mut item = match tx.try_send(item) {
        Ok(()) => return true,
        Err(TrySendError::Closed(_)) => return false,
        Err(TrySendError::Full(back)) => back,
    };
    loop {
        match tx.send_timeout(item, STOP_POLL).await {
            Ok(()) => return true,
            Err(SendTimeoutError::Closed(_)) => return false,
            Err(SendTimeoutError::Timeout(back)) if !stop.load(Ordering::Relaxed) => item = back,
            Err(SendTimeoutError::Timeout(_)) => return false,
        }
    }
}

/// One subscriber: catches up from storage offset `next`, then follows the
/// log's durable end until the client goes, an error ends the stream, or
/// the bridge stops. Holds its place among `admin.subscribers_max`.
async fn follow(
    api: EventsApi,
    mut next: u64,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
    _place: OwnedSemaphorePermit,
) {
    let inner = &api.inner;
    let mut log_end = inner.log_end.clone();
    let page_size = inner.limits.page_size_max as usize;
    loop {
        if inner.stop.load(Ordering::Relaxed) {
            let _ = tx.try_send(Err(Status::unavailable("kefu is stopping; subscribe again to resume")));
            return;
        }
        let end = *log_end.borrow_and_update();
        // A long catch-up still notices a stop, page by page.
        while next < end && !inner.stop.load(Ordering::Relaxed) {
            let page = match api.page(next, page_size) {
                Ok(p) if p.is_empty() => {
                    Err(Status::internal(format!("the event log has no offset {}", next + 1)))
                }
                other => other,
            };
            let page = match page {
                Ok(p) => p,
                Err(status) => {
                    send(&tx, Err(status), &inner.stop).await;
                    return;
                }
            };
            for e in page {
                next = e.offset + 1;
                if !send(&tx, Ok(event(e)), &inner.stop).await {
                    return;
                }
            }
        }
        tokio::select! {
            changed = log_end.changed() => {
                if changed.is_err() {
                    // The store is gone: nothing more will be logged.
                    let _ = tx.try_send(Err(Status::unavailable("storage closed")));
                    return;
                }
            }
            () = tx.closed() => return,
            () = tokio::time::sleep(STOP_POLL) => {}
        }
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for EventsApi {
    type SubscribeStream = tonic::codegen::BoxStream<pb::Event>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<GrpcResponse<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        let from = self.start(&req.consumer, req.from_offset)?;
        let Ok(place) = self.inner.subscribers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{} subscribers already (admin.subscribers_max); retry shortly",
                self.inner.limits.subscribers_max
            )));
        };
        debug!(consumer = %req.consumer, from = from + 1, "events: subscriber starts");
        let (tx, rx) = mpsc::channel(self.inner.limits.subscribe_buffer_events);
        tokio::spawn(follow(self.clone(), from, tx, place));
        // Counted where the server takes an event off the buffer to send
        // it, not where the reader fills the buffer: a slow consumer's lag
        // shows even while the buffer holds the events it has not read.
        // Owned by the stream, so the place goes with the client.
        let placed = self.place(&req.consumer, from);
        let stream = ReceiverStream::new(rx).map(move |item| {
            if let Ok(e) = &item {
                placed.next.store(e.offset, Ordering::Relaxed);
            }
            item
        });
        Ok(GrpcResponse::new(Box::pin(stream)))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<GrpcResponse<pb::CommitResponse>, Status> {
        Ok(GrpcResponse::new(EventsApi::commit(self, req.into_inner()).await?))
    }
}

// ---- REST -------------------------------------------------------------

/// `GET /api/v1/events?consumer=&from_offset=&limit=`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsQuery {
    /// The consumer (required, as for `Subscribe`).
    pub consumer: String,
    /// As `Subscribe`'s.
    pub from_offset: u64,
    /// Events at most (0: `admin.events_page_size_default`; capped at
    /// `admin.events_page_size_max`).
    pub limit: u32,
}

/// One page of `GET /api/v1/events`.
#[derive(Debug, Serialize)]
pub struct EventPage {
    /// In offset order; possibly none (nothing newer yet).
    pub events: Vec<pb::Event>,
    /// The offset to ask for next (`from_offset` of the next page).
    pub next_offset: u64,
}

/// The REST routes of the service.
pub fn routes(api: EventsApi) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/events", get(list))
        .route("/api/v1/events/commit", post(commit))
        .with_state(api)
}

fn rest_error(status: &Status) -> Response {
    let (http, code) = match status.code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    super::rest::error(http, code, status.message())
}

async fn list(State(api): State<EventsApi>, query: Result<Query<EventsQuery>, QueryRejection>) -> Response {
    match query {
        Ok(Query(q)) => match api.list(q) {
            Ok(page) => Json(page).into_response(),
            Err(status) => rest_error(&status),
        },
        Err(e) => super::rest::error(StatusCode::BAD_REQUEST, "invalid_argument", &e.body_text()),
    }
}

async fn commit(
    State(api): State<EventsApi>,
    body: Result<Json<pb::CommitRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(req)) => match api.commit(req).await {
            Ok(answer) => Json(answer).into_response(),
            Err(status) => rest_error(&status),
        },
        Err(e) => super::rest::error(StatusCode::BAD_REQUEST, "invalid_argument", &e.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kefu_proto::ids::{ConvStatus, Role};
    use kefu_storage::{AgentRef, MessageRecord, ReadMark, Sender, UserRecord};

    #[test]
    fn offsets_are_storage_offsets_plus_one_and_each_kind_maps() {
        let m = MessageRecord {
            conv: 3,
            seq: 2,
            cid: "x".into(),
            from: Sender { role: Role::Visitor, id: "v1".into(), name: "V".into() },
            ts_ms: 5,
            text: Some("hi".into()),
            attachment: None,
        };
        let e = event(LogEvent { offset: 0, record: LogRecord::Message(m), change: None });
        assert_eq!((e.offset, e.ts), (1, 5));
        assert!(matches!(e.kind, Some(pb::event::Kind::Message(ref m)) if m.conv == "c3" && m.seq == 2));

        let c = ConversationRecord {
            id: 3,
            visitor_id: "v1".into(),
            status: ConvStatus::Assigned,
            agent: Some(AgentRef { id: "a2".into(), name: "B".into() }),
            group: Some("g".into()),
            created_ms: 1,
            updated_ms: 9,
            last_seq: 0,
        };
        let record = LogRecord::Conversation(c);
        let e = event(LogEvent { offset: 41, record, change: Some(ConvChange::Transferred) });
        assert_eq!((e.offset, e.ts), (42, 9));
        let Some(pb::event::Kind::Conversation(c)) = e.kind else { panic!("not a conversation event") };
        assert_eq!(c.change, "transferred");
        let state = c.conversation.unwrap();
        assert_eq!((state.conv.as_str(), state.status.as_str()), ("c3", "assigned"));
        assert_eq!(state.agent.map(|a| a.id), Some("a2".into()));

        let u = UserRecord {
            id: "v1".into(),
            role: Role::Visitor,
            name: "V".into(),
            meta: vec![("vip_level".into(), "3".into())],
            visitor_key_hash: Some([1; 32]),
            created_ms: 1,
        };
        let e = event(LogEvent { offset: 1, record: LogRecord::User(u), change: None });
        let Some(pb::event::Kind::User(u)) = e.kind else { panic!("not a user event") };
        assert_eq!(u.user.map(|u| (u.role, u.id)), Some(("visitor".into(), "v1".into())));
        assert_eq!(u.meta.get("vip_level").map(String::as_str), Some("3"));

        let r = ReadMark { conv: 3, user_id: "a2".into(), seq: 2, ts_ms: 7 };
        let e = event(LogEvent { offset: 2, record: LogRecord::Read(r), change: None });
        assert_eq!((e.offset, e.ts), (3, 7));
        assert!(matches!(e.kind, Some(pb::event::Kind::Read(ref r)) if r.seq == 2 && r.conv == "c3"));

        let p = kefu_storage::PresenceRecord { agent_id: "a2".into(), status: "away".into(), ts_ms: 8 };
        let e = event(LogEvent { offset: 3, record: LogRecord::Presence(p), change: None });
        assert_eq!((e.offset, e.ts), (4, 8));
        assert!(
            matches!(e.kind, Some(pb::event::Kind::Presence(ref p)) if p.agent_id == "a2" && p.status == "away")
        );
    }

    #[test]
    fn consumer_names_are_checked() {
        assert!(check_consumer("billing-sync").is_ok());
        assert_eq!(check_consumer("").unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(check_consumer("a\nb").unwrap_err().code(), Code::InvalidArgument);
        assert!(check_consumer(&"x".repeat(CONSUMER_BYTES_MAX)).is_ok());
        let long = check_consumer(&"x".repeat(CONSUMER_BYTES_MAX + 1)).unwrap_err();
        assert!(long.message().contains("at most"), "{long:?}");
    }
}
