//! `kefu.v1.Events` against the real binary: every kind of event from a
//! real WebSocket chat, in order, with offsets from 1 and no gaps; where
//! `from_offset` starts; commits and resuming from them, over gRPC and
//! REST; the subscriber bound; keys refused; and a subscriber that resumes
//! across a `kill -9` of the gateway with nothing lost.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Gateway, WsClient};
use kefu_gateway::bridge::pb;
use kefu_gateway::bridge::pb::event::Kind;
use kefu_gateway::bridge::pb::events_client::EventsClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const KEY: &str = "events-test-key-0123456789";

/// What a test waits for at most, for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

const ENV: &[(&str, &str)] = &[
    ("KEFU_ADMIN_API_KEYS", "[\"events-test-key-0123456789\"]"),
    ("KEFU_LIMITS_MESSAGES_PER_S", "100000"),
    ("KEFU_LIMITS_BURST", "100000"),
];

fn start() -> Gateway {
    Gateway::start(&["--shards", "2"], ENV)
}

type AddKey = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = EventsClient<InterceptedService<Channel, AddKey>>;

async fn events(admin: std::net::SocketAddr, key: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{admin}")).unwrap().connect().await.unwrap();
    let header: Option<MetadataValue<_>> = key.map(|k| format!("Bearer {k}").parse().unwrap());
    let add_key: AddKey = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    EventsClient::with_interceptor(channel, add_key)
}

fn subscribe(consumer: &str, from_offset: u64) -> pb::SubscribeRequest {
    pb::SubscribeRequest { consumer: consumer.into(), from_offset }
}

/// The next `n` events of `stream`, each within [`PATIENCE`].
async fn take(stream: &mut tonic::Streaming<pb::Event>, n: usize) -> Vec<pb::Event> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(PATIENCE, stream.message()).await.expect("an event in time");
        out.push(next.expect("no error").expect("the stream goes on"));
    }
    out
}

/// Events of `stream` until `done` says so, each within [`PATIENCE`].
async fn take_until(
    stream: &mut tonic::Streaming<pb::Event>,
    done: impl Fn(&pb::Event) -> bool,
) -> Vec<pb::Event> {
    let mut out = Vec::new();
    loop {
        let e = take(stream, 1).await.pop().unwrap();
        let last = done(&e);
        out.push(e);
        if last {
            return out;
        }
    }
}

fn assert_contiguous(events: &[pb::Event], first: u64) {
    let offsets: Vec<u64> = events.iter().map(|e| e.offset).collect();
    let want: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(offsets, want, "offsets grow by one, from {first}");
}

/// One HTTP/1.1 request on the admin listener: (status, body as JSON).
fn http(gw: &Gateway, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let (status, body) = common::admin_request(gw.admin, method, path, key, body);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn agent(gw: &Gateway, id: &str) -> WsClient {
    let token = gw.token("agent", id, &["--name", id]);
    let mut a = WsClient::open(gw, PATIENCE).await;
    assert_eq!(a.call(json!({"type": "connect", "token": token})).await["type"], "connected");
    assert_eq!(a.call(json!({"type": "presence", "status": "online"})).await["status"], "online");
    a
}

/// A visitor with an open conversation: (client, its id, the conversation).
async fn visitor(gw: &Gateway) -> (WsClient, String, String) {
    let mut v = WsClient::open(gw, PATIENCE).await;
    let c = v.call(json!({"type": "connect"})).await;
    let id = c["user"]["id"].as_str().unwrap().to_string();
    let conv = v.call(json!({"type": "open"})).await["conv"].as_str().unwrap().to_string();
    (v, id, conv)
}

fn change_of(e: &pb::Event, conv: &str) -> Option<String> {
    match &e.kind {
        Some(Kind::Conversation(c)) if c.conversation.as_ref().is_some_and(|s| s.conv == conv) => {
            Some(c.change.clone())
        }
        _ => None,
    }
}

/// A chat with every kind of event, followed live from the start of the
/// log: (every event, the conversation, the visitor id, the clients: kept
/// connected, so no later presence change adds events).
async fn chat_followed_live(gw: &Gateway) -> (Vec<pb::Event>, String, String, Vec<WsClient>) {
    let mut client = events(gw.admin, Some(KEY)).await;
    let mut live = client.subscribe(subscribe("live", 0)).await.unwrap().into_inner();

    let mut a1 = agent(gw, "a1").await;
    let (mut v, visitor_id, conv) = visitor(gw).await;
    for (cid, text) in [("v1", "hello"), ("v2", "anyone?"), ("v3", "still there?")] {
        let ack = v.call(json!({"type": "send", "conv": conv, "cid": cid, "text": text})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let mut a2 = agent(gw, "a2").await;
    let moved = a1.call(json!({"type": "transfer", "conv": conv, "to": "a2"})).await;
    assert_eq!(
        (moved["status"].as_str(), moved["agent"]["id"].as_str()),
        (Some("assigned"), Some("a2")),
        "{moved}"
    );
    a2.post(json!({"type": "read", "conv": conv, "seq": 2})).await;
    let ack = a2.call(json!({"type": "send", "conv": conv, "cid": "a2-1", "text": "here"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let closed = a2.call(json!({"type": "close", "conv": conv})).await;
    assert_eq!(closed["status"], "closed", "{closed}");

    // The close is the last write of the chat, but the read mark may
    // commit after it: wait for both.
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let has_read = |seen: &[pb::Event]| seen.iter().any(|e| matches!(e.kind, Some(Kind::Read(_))));
    let has_closed =
        |seen: &[pb::Event]| seen.iter().any(|e| change_of(e, &conv).as_deref() == Some("closed"));
    while !(has_read(&seen) && has_closed(&seen)) {
        assert!(Instant::now() < deadline, "the chat's events did not all arrive: {seen:#?}");
        seen.extend(take(&mut live, 1).await);
    }
    (seen, conv, visitor_id, vec![a1, a2, v])
}

#[test]
fn a_chat_streams_every_kind_of_event_in_order_from_offset_1() {
    let gw = start();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let (seen, conv, visitor_id, _clients) = chat_followed_live(&gw).await;
        assert_contiguous(&seen, 1);

        let changes: Vec<String> = seen.iter().filter_map(|e| change_of(e, &conv)).collect();
        assert_eq!(changes, ["opened", "assigned", "transferred", "closed"], "{seen:#?}");
        let transferred = seen.iter().find(|e| change_of(e, &conv).as_deref() == Some("transferred")).unwrap();
        let Some(Kind::Conversation(t)) = &transferred.kind else { unreachable!() };
        let state = t.conversation.as_ref().unwrap();
        assert_eq!(state.agent.as_ref().map(|a| a.id.as_str()), Some("a2"));
        assert_eq!(state.visitor.as_ref().map(|v| v.id.as_str()), Some(visitor_id.as_str()));

        let texts: Vec<(&str, u64, &str)> = seen
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Message(m)) if m.conv == conv => {
                    Some((m.cid.as_str(), m.seq, m.text.as_deref().unwrap_or("")))
                }
                _ => None,
            })
            .collect();
        assert_eq!(texts, [("v1", 1, "hello"), ("v2", 2, "anyone?"), ("v3", 3, "still there?"), ("a2-1", 4, "here")]);
        for e in &seen {
            if let Some(Kind::Message(m)) = &e.kind {
                assert_eq!(e.ts, m.ts, "a message event's time is the message's");
                assert!(e.ts > 1_700_000_000_000, "ms since the epoch: {}", e.ts);
            }
        }
        let read = seen.iter().find_map(|e| match &e.kind {
            Some(Kind::Read(r)) => Some(r.clone()),
            _ => None,
        });
        let read = read.unwrap();
        assert_eq!((read.conv.as_str(), read.seq), (conv.as_str(), 2));
        assert_eq!(read.by.map(|u| u.id), Some("a2".into()));
        let synced = seen.iter().any(|e| {
            matches!(&e.kind, Some(Kind::User(u)) if u.user.as_ref().is_some_and(|u| u.id == visitor_id && u.role == "visitor"))
        });
        assert!(synced, "the visitor's profile is an event: {seen:#?}");
        let online: Vec<&str> = seen
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Presence(p)) if p.status == "online" => Some(p.agent_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(online, ["a1", "a2"], "each agent's presence is an event: {seen:#?}");
        // Opened before any message; the messages before the transfer.
        let at = |want: &str| seen.iter().position(|e| change_of(e, &conv).as_deref() == Some(want)).unwrap();
        let first_message = seen.iter().position(|e| matches!(e.kind, Some(Kind::Message(_)))).unwrap();
        assert!(at("opened") < first_message && first_message < at("transferred"));
    });
}

#[test]
fn from_offset_commits_and_rest_pages_start_where_they_say() {
    let gw = start();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let (all, _, _, _clients) = chat_followed_live(&gw).await;
        let n = all.len() as u64;
        assert!(n >= 10, "{n} events");
        let mut client = events(gw.admin, Some(KEY)).await;

        // N > 0: from offset N, the very same events.
        let mut s = client.subscribe(subscribe("x", 4)).await.unwrap().into_inner();
        assert_eq!(take(&mut s, 3).await, all[3..6]);
        // 0, for a consumer that never committed: from the start.
        let mut s = client.subscribe(subscribe("fresh", 0)).await.unwrap().into_inner();
        assert_eq!(take(&mut s, 2).await, all[..2]);
        drop(s);

        // A commit, then 0 resumes after it.
        client.commit(pb::CommitRequest { consumer: "c1".into(), offset: 5 }).await.unwrap();
        let mut s = client.subscribe(subscribe("c1", 0)).await.unwrap().into_inner();
        assert_eq!(take(&mut s, 2).await, all[5..7]);
        drop(s);
        // A later commit moves it on; committing 0 starts over.
        client.commit(pb::CommitRequest { consumer: "c1".into(), offset: 7 }).await.unwrap();
        let mut s = client.subscribe(subscribe("c1", 0)).await.unwrap().into_inner();
        assert_eq!(take(&mut s, 1).await[0].offset, 8);
        drop(s);

        // Bad commits are refused, saying why.
        let past =
            client.commit(pb::CommitRequest { consumer: "c1".into(), offset: n + 1000 }).await.unwrap_err();
        assert_eq!(past.code(), Code::InvalidArgument, "{past:?}");
        assert!(past.message().contains("past the last event"), "{past:?}");
        let nameless =
            client.commit(pb::CommitRequest { consumer: String::new(), offset: 1 }).await.unwrap_err();
        assert_eq!(nameless.code(), Code::InvalidArgument);
        let nameless = client.subscribe(subscribe("", 1)).await.unwrap_err();
        assert_eq!(nameless.code(), Code::InvalidArgument);

        // REST: a page, the same events as JSON; a commit; 0 resumes.
        let (status, page) =
            http(&gw, "GET", "/api/v1/events?consumer=c1&from_offset=0&limit=2", Some(KEY), None);
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["events"], serde_json::to_value(&all[7..9]).unwrap());
        assert_eq!(page["next_offset"], 10);
        let kinds: Vec<&str> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["kind"].as_object().unwrap().keys().map(String::as_str))
            .collect();
        assert!(
            kinds.iter().all(|k| ["message", "conversation", "user", "read", "presence"].contains(k)),
            "a kind is named as in the .proto: {kinds:?}"
        );
        let (status, body) =
            http(&gw, "GET", "/api/v1/events?consumer=c1&from_offset=2&limit=1", Some(KEY), None);
        assert_eq!((status, &body["events"][0]["offset"]), (200, &json!(2)), "{body}");
        let (status, body) = http(
            &gw,
            "POST",
            "/api/v1/events/commit",
            Some(KEY),
            Some(&json!({"consumer": "c1", "offset": 9})),
        );
        assert_eq!((status, body), (200, json!({})));
        let (_, page) = http(&gw, "GET", "/api/v1/events?consumer=c1", Some(KEY), None);
        assert_eq!(page["events"][0]["offset"], 10, "{page}");
        let end = format!("/api/v1/events?consumer=c1&from_offset={}", n + 1);
        let (status, page) = http(&gw, "GET", &end, Some(KEY), None);
        assert_eq!((status, page["events"].as_array().map(Vec::len)), (200, Some(0)), "{page}");
        assert_eq!(page["next_offset"], n + 1);
        let (status, body) = http(&gw, "GET", "/api/v1/events?consumer=c1&from_offset=x", Some(KEY), None);
        assert_eq!((status, &body["code"]), (400, &json!("invalid_argument")), "{body}");
        let bad = json!({"consumer": "c1", "offset": n + 1000});
        let (status, body) = http(&gw, "POST", "/api/v1/events/commit", Some(KEY), Some(&bad));
        assert_eq!((status, &body["code"]), (400, &json!("invalid_argument")), "{body}");
    });
}

#[test]
fn metrics_show_each_consumers_lag_behind_the_head() {
    let gw = start();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let (all, _, _, _clients) = chat_followed_live(&gw).await;
        let n = all.len() as f64;
        let mut client = events(gw.admin, Some(KEY)).await;
        // A name that needs escaping as a label value.
        let consumer = "crm \"eu\"";
        let label = "consumer=\"crm \\\"eu\\\"\"";
        client.commit(pb::CommitRequest { consumer: consumer.into(), offset: 3 }).await.unwrap();
        let mut s = client.subscribe(subscribe(consumer, 0)).await.unwrap().into_inner();
        assert_eq!(take(&mut s, 1).await[0].offset, 4);
        let metrics = common::metrics_until(&gw, "one stream, past offset 4", |m| {
            common::sample(m, "kefu_events_subscribers", &[]) == 1.0
                && common::sample(m, "kefu_events_subscriber_lag_events", &[label]) <= n - 4.0
        });
        assert_eq!(common::sample(&metrics, "kefu_events_head_offset", &[]), n, "{metrics}");
        assert_eq!(common::sample(&metrics, "kefu_events_commit_lag_events", &[label]), n - 3.0, "{metrics}");
        assert!(metrics.contains(&format!("kefu_events_subscriber_lag_events{{{label}}} ")), "{metrics}");
        common::promtool_check(&metrics);
    });
    // The runtime, and with it the client, is gone.
    let metrics = common::metrics_until(&gw, "the stream's lag gone with it", |m| {
        common::sample(m, "kefu_events_subscribers", &[]) == 0.0
    });
    assert!(!metrics.contains("kefu_events_subscriber_lag_events{"), "{metrics}");
}

#[test]
fn keys_are_refused_and_subscribers_are_bounded() {
    let env: Vec<(&str, &str)> = ENV.iter().copied().chain([("KEFU_ADMIN_SUBSCRIBERS_MAX", "3")]).collect();
    let gw = Gateway::start(&["--shards", "2"], &env);
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let mut none = events(gw.admin, None).await;
        let e = none.subscribe(subscribe("x", 1)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let mut wrong = events(gw.admin, Some("not-the-key-0123456789")).await;
        let e = wrong.commit(pb::CommitRequest { consumer: "x".into(), offset: 0 }).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let (status, _) = http(&gw, "GET", "/api/v1/events?consumer=x", None, None);
        assert_eq!(status, 401);
        let (status, _) =
            http(&gw, "POST", "/api/v1/events/commit", Some("nope-nope-nope-nope-nope"), Some(&json!({})));
        assert_eq!(status, 401);

        // admin.subscribers_max = 3: a fourth is refused until one goes.
        let mut client = events(gw.admin, Some(KEY)).await;
        let mut open = Vec::new();
        for i in 0..3 {
            open.push(client.subscribe(subscribe(&format!("s{i}"), 0)).await.unwrap().into_inner());
        }
        let e = client.subscribe(subscribe("s3", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("admin.subscribers_max"), "{e:?}");
        drop(open.pop());
        let deadline = Instant::now() + PATIENCE;
        loop {
            match client.subscribe(subscribe("s3", 0)).await {
                Ok(_) => break,
                Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("a place should have freed: {e:?}"),
            }
        }
    });
}

/// What the subscriber of the crash test saw and committed.
#[derive(Default)]
struct Followed {
    events: Vec<pb::Event>,
    /// The last commit answered before the crash.
    committed: u64,
}

#[test]
fn a_subscriber_resumes_across_kill_9_with_no_gap_and_no_loss() {
    const CONSUMER: &str = "crash";
    let gw = start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let followed: Arc<Mutex<Followed>> = Arc::default();

    let (_agent, mut v, conv) = rt.block_on(async {
        let a = agent(&gw, "a1").await;
        let (v, _, conv) = visitor(&gw).await;
        (a, v, conv)
    });
    // A visitor sends as fast as acks come back, until the gateway dies.
    let sender = {
        let acked = acked.clone();
        rt.spawn(async move {
            for i in 0.. {
                let cid = format!("m{i}");
                let send = json!({"type": "send", "conv": conv, "cid": cid, "text": format!("message {i}")});
                match v.try_call(send).await {
                    Some(ack) if ack["type"] == "ack" => acked.lock().unwrap().push((conv.clone(), cid)),
                    _ => return,
                }
            }
        })
    };
    // A subscriber follows and commits every 25 events.
    let follower = {
        let followed = followed.clone();
        let admin = gw.admin;
        rt.spawn(async move {
            let mut client = events(admin, Some(KEY)).await;
            let Ok(s) = client.subscribe(subscribe(CONSUMER, 0)).await else { return };
            let mut s = s.into_inner();
            while let Ok(Some(e)) = s.message().await {
                let offset = e.offset;
                followed.lock().unwrap().events.push(e);
                if offset % 25 == 0 {
                    let commit = pb::CommitRequest { consumer: CONSUMER.into(), offset };
                    if client.commit(commit).await.is_err() {
                        return;
                    }
                    followed.lock().unwrap().committed = offset;
                }
            }
        })
    };
    let deadline = Instant::now() + PATIENCE;
    while acked.lock().unwrap().len() < 300 || followed.lock().unwrap().committed < 100 {
        assert!(Instant::now() < deadline, "the chat and the subscriber did not get going");
        std::thread::sleep(Duration::from_millis(5));
    }
    let gw = gw.kill9_and_restart(&["--shards", "2"], ENV);
    rt.block_on(async {
        tokio::time::timeout(2 * PATIENCE, sender).await.expect("the sender stops").unwrap();
        tokio::time::timeout(2 * PATIENCE, follower).await.expect("the subscriber stops").unwrap();
    });
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let before = std::mem::take(&mut *followed.lock().unwrap());
    assert_contiguous(&before.events, 1);

    rt.block_on(async {
        // A mark after the restart, to read up to.
        let (mut v, _, conv) = visitor(&gw).await;
        let ack = v.call(json!({"type": "send", "conv": conv, "cid": "mark", "text": "after"})).await;
        assert_eq!(ack["type"], "ack", "{ack}");

        let mut client = events(gw.admin, Some(KEY)).await;
        let mut s = client.subscribe(subscribe(CONSUMER, 0)).await.unwrap().into_inner();
        let after =
            take_until(&mut s, |e| matches!(&e.kind, Some(Kind::Message(m)) if m.cid == "mark")).await;
        // It resumes after its last answered commit (or a later one that
        // made it to disk before the kill): never past what it saw.
        let first = after[0].offset;
        assert!(first > before.committed, "resumed at {first}, committed {}", before.committed);
        assert!(
            first <= before.events.len() as u64 + 1,
            "a gap: resumed at {first}, saw {}",
            before.events.len()
        );
        assert_contiguous(&after, first);
        // Seen twice (at least once): the same events at the same offsets.
        let overlap = &before.events[(first - 1) as usize..];
        assert_eq!(overlap, &after[..overlap.len()], "the log did not change under the consumer");

        let mut all = before.events[..(first - 1) as usize].to_vec();
        all.extend(after);
        assert_contiguous(&all, 1);
        let logged: std::collections::HashSet<(String, String)> = all
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Message(m)) => Some((m.conv.clone(), m.cid.clone())),
                _ => None,
            })
            .collect();
        let lost: Vec<_> = acked.iter().filter(|k| !logged.contains(k)).collect();
        assert!(
            lost.is_empty(),
            "{} acked messages have no event: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        assert!(acked.len() >= 300);
    });
}
