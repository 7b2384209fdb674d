//! The control plane against the real binary: gRPC (tonic) and REST on the
//! admin listener, API keys, reflection, `/readyz`, and tokens minted by
//! `IssueToken` accepted by the WebSocket `connect`.

mod common;

use std::time::Duration;

use common::{Gateway, WsClient};
use futures_util::StreamExt;
use kefu_gateway::bridge::pb;
use kefu_gateway::bridge::pb::gateway_client::GatewayClient;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const KEY: &str = "bridge-test-key-0123456789";
/// How long a WebSocket command may take to be answered.
const REPLY_WITHIN: Duration = Duration::from_secs(10);
const OTHER_KEY: &str = "bridge-test-key-second-one";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn start() -> Gateway {
    let keys = format!("[\"{KEY}\", \"{OTHER_KEY}\"]");
    Gateway::start(&["--shards", "2"], &[("KEFU_ADMIN_API_KEYS", keys.as_str())])
}

/// What the test clients add to every call.
type AddKey = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Client = GatewayClient<InterceptedService<Channel, AddKey>>;

/// A gRPC client presenting `authorization: Bearer <key>` (none if `None`).
async fn grpc(gw: &Gateway, key: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{}", gw.admin)).unwrap().connect().await.unwrap();
    let header: Option<MetadataValue<_>> = key.map(|k| format!("Bearer {k}").parse().unwrap());
    let add_key: AddKey = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    GatewayClient::with_interceptor(channel, add_key)
}

/// One HTTP/1.1 request on the admin listener: (status, body).
fn http(gw: &Gateway, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> (u16, String) {
    common::admin_request(gw.admin, method, path, key, body)
}

/// `GET path` with the key, parsed as JSON; asserts 200.
fn rest_json(gw: &Gateway, path: &str) -> Value {
    let (status, body) = http(gw, "GET", path, Some(KEY), None);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// What [`seed`] made.
struct Seeded {
    /// Assigned to a1, four messages (the third is the visitor's "bug",
    /// the fourth the bot's auto-reply), then one from the agent.
    open_conv: String,
    /// Assigned to a1, a text and a picture, then closed by a1.
    closed_conv: String,
    visitor_id: String,
}

/// A real chat over WebSocket: agent a1 online, two visitors, messages
/// both ways, one conversation closed.
async fn seed(gw: &Gateway) -> Seeded {
    let token = gw.token("agent", "a1", &["--name", "Alice"]);
    let mut agent = WsClient::open(gw, REPLY_WITHIN).await;
    assert_eq!(agent.call(json!({"type": "connect", "token": token})).await["type"], "connected");
    assert_eq!(agent.call(json!({"type": "presence", "status": "online"})).await["status"], "online");

    let mut visitor = WsClient::open(gw, REPLY_WITHIN).await;
    let c = visitor.call(json!({"type": "connect"})).await;
    let visitor_id = c["user"]["id"].as_str().unwrap().to_string();
    let open_conv = visitor.call(json!({"type": "open"})).await["conv"].as_str().unwrap().to_string();
    for (cid, text) in [("v1", "hello"), ("v2", "are you there?"), ("v3", "I found a bug")] {
        let ack = visitor.call(json!({"type": "send", "conv": open_conv, "cid": cid, "text": text})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }

    let mut other = WsClient::open(gw, REPLY_WITHIN).await;
    other.call(json!({"type": "connect"})).await;
    let closed_conv = other.call(json!({"type": "open"})).await["conv"].as_str().unwrap().to_string();
    let ack = other.call(json!({"type": "send", "conv": closed_conv, "cid": "o1", "text": "bye"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let picture = json!({"mime": "image/png", "data": "AAEC/w=="});
    let ack =
        other.call(json!({"type": "send", "conv": closed_conv, "cid": "o2", "attachment": picture})).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // The agent's calls wait for both assignments to be durable: its
    // reply to a send comes only once it holds the conversation.
    let ack = agent
        .call(json!({"type": "send", "conv": open_conv, "cid": "a1-1", "text": "how can I help?"}))
        .await;
    assert_eq!(ack["seq"], 5, "{ack}");
    let closed = agent.call(json!({"type": "close", "conv": closed_conv})).await;
    assert_eq!(closed["status"], "closed", "{closed}");
    Seeded { open_conv, closed_conv, visitor_id }
}

#[test]
fn storage_calls_answer_over_grpc_and_rest_alike() {
    let gw = start();
    rt().block_on(async {
        let s = seed(&gw).await;
        let mut client = grpc(&gw, Some(KEY)).await;

        // History: newest page by default, ascending; `before` pages back.
        let req = pb::GetHistoryRequest { conv: s.open_conv.clone(), before: 0, limit: 0 };
        let all = client.get_history(req).await.unwrap().into_inner();
        let seqs: Vec<u64> = all.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let first = &all.messages[0];
        assert_eq!(
            (first.conv.as_str(), first.cid.as_str(), first.text.as_deref()),
            (s.open_conv.as_str(), "v1", Some("hello"))
        );
        let from = first.from.as_ref().unwrap();
        assert_eq!((from.role.as_str(), from.id.as_str()), ("visitor", s.visitor_id.as_str()));
        assert!(first.ts > 1_700_000_000_000, "ts is ms since the epoch: {}", first.ts);
        assert_eq!(all.messages[3].from.as_ref().unwrap().role, "bot", "the seed's bug rule replied");
        let agent_msg = all.messages[4].from.as_ref().unwrap();
        assert_eq!(
            (agent_msg.role.as_str(), agent_msg.id.as_str(), agent_msg.name.as_str()),
            ("agent", "a1", "Alice")
        );
        let req = pb::GetHistoryRequest { conv: s.open_conv.clone(), before: 4, limit: 2 };
        let page = client.get_history(req).await.unwrap().into_inner();
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
        let rest = rest_json(&gw, &format!("/api/v1/conversations/{}/messages", s.open_conv));
        assert_eq!(rest, serde_json::to_value(&all).unwrap());
        assert_eq!(rest["messages"][0]["from"]["role"], "visitor", "{rest}");
        let rest =
            rest_json(&gw, &format!("/api/v1/conversations/{}/messages?before=4&limit=2", s.open_conv));
        assert_eq!(rest, serde_json::to_value(&page).unwrap());

        // One conversation.
        let req = pb::GetConversationRequest { conv: s.open_conv.clone() };
        let open = client.get_conversation(req).await.unwrap().into_inner();
        assert_eq!((open.status.as_str(), open.last_seq), ("assigned", 5));
        assert_eq!(open.agent.as_ref().map(|a| a.id.as_str()), Some("a1"));
        assert_eq!(open.visitor.as_ref().map(|v| v.id.as_str()), Some(s.visitor_id.as_str()));
        assert!(open.created_ms > 0 && open.updated_ms >= open.created_ms, "{open:?}");
        let rest = rest_json(&gw, &format!("/api/v1/conversations/{}", s.open_conv));
        assert_eq!(rest, serde_json::to_value(&open).unwrap());
        let req = pb::GetConversationRequest { conv: s.closed_conv.clone() };
        let closed = client.get_conversation(req).await.unwrap().into_inner();
        assert_eq!((closed.status.as_str(), closed.last_seq), ("closed", 2));

        // An attachment: bytes over gRPC, base64 over REST, as the client sent it.
        let req = pb::GetHistoryRequest { conv: s.closed_conv.clone(), before: 0, limit: 0 };
        let history = client.get_history(req).await.unwrap().into_inner();
        let picture = history.messages[1].attachment.as_ref().expect("the attachment");
        assert_eq!((picture.mime.as_str(), picture.data.as_slice()), ("image/png", &[0u8, 1, 2, 255][..]));
        assert_eq!(history.messages[1].text, None);
        let rest = rest_json(&gw, &format!("/api/v1/conversations/{}/messages", s.closed_conv));
        assert_eq!(rest["messages"][1]["attachment"]["data"], "AAEC/w==", "{rest}");
        assert_eq!(rest, serde_json::to_value(&history).unwrap());

        // Lists: newest first, filtered, paged.
        let list = |status: &str, agent_id: &str, group: &str, page_size, page_token: &str| {
            pb::ListConversationsRequest {
                status: status.into(),
                agent_id: agent_id.into(),
                group: group.into(),
                page_size,
                page_token: page_token.into(),
            }
        };
        let ids = |r: &pb::ListConversationsResponse| {
            r.conversations.iter().map(|c| c.conv.clone()).collect::<Vec<_>>()
        };
        let every = client.list_conversations(list("", "", "", 0, "")).await.unwrap().into_inner();
        assert_eq!(ids(&every), [s.closed_conv.clone(), s.open_conv.clone()]);
        assert_eq!(every.next_page_token, "");
        assert_eq!(rest_json(&gw, "/api/v1/conversations"), serde_json::to_value(&every).unwrap());
        let closed_only =
            client.list_conversations(list("closed", "", "", 0, "")).await.unwrap().into_inner();
        assert_eq!(ids(&closed_only), std::slice::from_ref(&s.closed_conv));
        assert_eq!(
            rest_json(&gw, "/api/v1/conversations?status=closed"),
            serde_json::to_value(&closed_only).unwrap()
        );
        let by_a1 = client.list_conversations(list("", "a1", "default", 0, "")).await.unwrap().into_inner();
        assert_eq!(ids(&by_a1).len(), 2);
        let nobody = client.list_conversations(list("", "a2", "", 0, "")).await.unwrap().into_inner();
        assert!(nobody.conversations.is_empty());
        let first = client.list_conversations(list("", "", "", 1, "")).await.unwrap().into_inner();
        assert_eq!(ids(&first), std::slice::from_ref(&s.closed_conv));
        assert_ne!(first.next_page_token, "");
        let rest = rest_json(&gw, "/api/v1/conversations?page_size=1");
        assert_eq!(rest, serde_json::to_value(&first).unwrap());
        let second = client
            .list_conversations(list("", "", "", 1, &first.next_page_token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ids(&second), std::slice::from_ref(&s.open_conv));
        assert_eq!(second.next_page_token, "", "nothing is left after the oldest");
        let rest = rest_json(
            &gw,
            &format!("/api/v1/conversations?page_size=1&page_token={}", first.next_page_token),
        );
        assert_eq!(rest, serde_json::to_value(&second).unwrap());

        // Errors: same kind on both sides.
        let req = pb::GetConversationRequest { conv: "c999".into() };
        assert_eq!(client.get_conversation(req).await.unwrap_err().code(), Code::NotFound);
        assert_eq!(http(&gw, "GET", "/api/v1/conversations/c999", Some(KEY), None).0, 404);
        let req = pb::GetHistoryRequest { conv: "nope".into(), before: 0, limit: 0 };
        let err = client.get_history(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("conv"), "{err:?}");
        let (status, body) = http(&gw, "GET", "/api/v1/conversations/nope/messages", Some(KEY), None);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("invalid_argument"), "{body}");
        let err = client.list_conversations(list("open", "", "", 0, "")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(http(&gw, "GET", "/api/v1/conversations?status=open", Some(KEY), None).0, 400);
    });
}

#[test]
fn issued_tokens_are_accepted_by_connect() {
    let gw = start();
    rt().block_on(async {
        let mut client = grpc(&gw, Some(KEY)).await;
        let req = pb::IssueTokenRequest {
            role: "agent".into(),
            user_id: "a7".into(),
            name: "Grace".into(),
            groups: vec!["vip".into()],
            ttl_s: 600,
            ..Default::default()
        };
        let minted = client.issue_token(req).await.unwrap().into_inner();
        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!((now_s + 590..=now_s + 610).contains(&minted.expires_at_s), "{minted:?}");
        let mut ws = WsClient::open(&gw, REPLY_WITHIN).await;
        let c = ws.call(json!({"type": "connect", "token": minted.token})).await;
        assert_eq!(c["type"], "connected", "{c}");
        assert_eq!(
            (c["role"].as_str(), c["user"]["id"].as_str(), c["user"]["name"].as_str()),
            (Some("agent"), Some("a7"), Some("Grace"))
        );

        // Over REST, for a visitor with a profile.
        let body = json!({"role": "visitor", "user_id": "customer-9", "meta": {"vip_level": "3"}});
        let (status, text) = http(&gw, "POST", "/api/v1/tokens", Some(KEY), Some(&body));
        assert_eq!(status, 200, "{text}");
        let minted: Value = serde_json::from_str(&text).unwrap();
        let mut ws = WsClient::open(&gw, REPLY_WITHIN).await;
        let c = ws.call(json!({"type": "connect", "token": minted["token"]})).await;
        assert_eq!(c["type"], "connected", "{c}");
        assert_eq!(
            (c["role"].as_str(), c["user"]["id"].as_str()),
            (Some("visitor"), Some("customer-9")),
            "{c}"
        );
        assert_eq!(c["user"]["meta"]["vip_level"], "3", "{c}");

        // What connect would refuse is refused here, with the reason.
        for (role, user_id, ttl_s, why) in [
            ("bot", "b1", 0, "role"),
            ("agent", "", 0, "sub"),
            ("visitor", "anon-123", 0, "anon-"),
            ("agent", "a1", 365 * 86_400, "token_ttl_s_max"),
        ] {
            let req = pb::IssueTokenRequest {
                role: role.into(),
                user_id: user_id.into(),
                ttl_s,
                ..Default::default()
            };
            let err = client.issue_token(req).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{role} {user_id}: {err:?}");
            assert!(err.message().contains(why), "{role} {user_id}: {err:?}");
        }
        let (status, text) =
            http(&gw, "POST", "/api/v1/tokens", Some(KEY), Some(&json!({"role": "bot", "user_id": "b"})));
        assert_eq!(status, 400, "{text}");
    });
}

#[test]
fn api_keys_are_required_on_grpc_and_rest() {
    let gw = start();
    rt().block_on(async {
        let req = || pb::ListConversationsRequest::default();
        grpc(&gw, Some(KEY)).await.list_conversations(req()).await.unwrap();
        grpc(&gw, Some(OTHER_KEY)).await.list_conversations(req()).await.unwrap();
        for key in [None, Some("bridge-test-key-012345678"), Some("wrong"), Some("")] {
            let err = grpc(&gw, key).await.list_conversations(req()).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
            assert!(!err.message().contains("bridge-test"), "a refusal never echoes the key: {err:?}");
        }
        // Refused before routing: an unknown method is not told apart.
        let err = grpc(&gw, Some("wrong")).await.sync_user(pb::SyncUserRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    });
    for path in
        ["/api/v1/conversations", "/api/v1/conversations/c1/messages", "/api/v1/openapi.json", "/api/v1/nope"]
    {
        for key in [None, Some("wrong-key-0123456789")] {
            let (status, body) = http(&gw, "GET", path, key, None);
            assert_eq!(status, 401, "{path} {key:?}: {body}");
            assert!(body.contains("unauthenticated"), "{body}");
        }
    }
    let (status, _) =
        http(&gw, "POST", "/api/v1/tokens", None, Some(&json!({"role": "agent", "user_id": "x"})));
    assert_eq!(status, 401);
    // The operator endpoints need none, and count the refusals.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http(&gw, "GET", path, None, None).0, 200, "{path}");
    }
    let metrics = http(&gw, "GET", "/metrics", None, None).1;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kefu_bridge_requests_total{outcome=\"unauthenticated\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(refused, Some(14), "{metrics}");
}

#[test]
fn without_configured_keys_every_call_is_refused_saying_why() {
    let gw = Gateway::start(&["--shards", "1"], &[]);
    let log = gw.startup_log.join("\n");
    assert!(log.contains("admin.api_keys is empty"), "{log}");
    rt().block_on(async {
        let err = grpc(&gw, Some(KEY))
            .await
            .list_conversations(pb::ListConversationsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("[admin] api_keys"), "{err:?}");
    });
    let (status, body) = http(&gw, "GET", "/api/v1/conversations", Some(KEY), None);
    assert_eq!(status, 401);
    assert!(body.contains("[admin] api_keys"), "{body}");
    assert_eq!(http(&gw, "GET", "/readyz", None, None).0, 200);
}

/// The calls the chat machines answer: a message from the business
/// system is durable before it is answered, idempotent by cid (over gRPC
/// and REST alike), delivered as the bot, and refused as a client's would
/// be; conversation changes answer with the conversation as stored.
#[test]
fn chat_calls_are_served_by_the_chat_service() {
    let gw = start();
    rt().block_on(async {
        let s = seed(&gw).await;
        let mut c = grpc(&gw, Some(KEY)).await;
        let send = |cid: &str| pb::SendMessageRequest {
            conv: s.open_conv.clone(),
            cid: cid.into(),
            text: Some("your order shipped".into()),
            attachment: None,
            sender_name: "Shop".into(),
        };
        let first = c.send_message(send("order-1")).await.unwrap().into_inner();
        assert_eq!((first.seq, first.duplicate), (6, false), "{first:?}");
        let again = c.send_message(send("order-1")).await.unwrap().into_inner();
        assert_eq!((again.seq, again.ts, again.duplicate), (6, first.ts, true));
        let path = format!("/api/v1/conversations/{}/messages", s.open_conv);
        let body = json!({"cid": "order-1", "text": "your order shipped", "sender_name": "Shop"});
        let (status, rest) = http(&gw, "POST", &path, Some(KEY), Some(&body));
        assert_eq!(status, 200, "{rest}");
        let rest: Value = serde_json::from_str(&rest).unwrap();
        assert_eq!((rest["seq"].as_u64(), rest["duplicate"].as_bool()), (Some(6), Some(true)), "{rest}");
        let history = rest_json(&gw, &format!("{path}?before=7&limit=1"));
        let m = &history["messages"][0];
        assert_eq!(
            (m["seq"].as_u64(), m["from"]["role"].as_str(), m["from"]["name"].as_str()),
            (Some(6), Some("bot"), Some("Shop")),
            "{m}"
        );

        let closed = c
            .send_message(pb::SendMessageRequest { conv: s.closed_conv.clone(), ..send("late") })
            .await
            .unwrap_err();
        assert_eq!(closed.code(), Code::FailedPrecondition, "{closed:?}");
        let missing =
            c.send_message(pb::SendMessageRequest { conv: "c999".into(), ..send("x") }).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
        let empty =
            c.send_message(pb::SendMessageRequest { cid: String::new(), ..send("") }).await.unwrap_err();
        assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");

        let path = format!("/api/v1/conversations/{}/transfer", s.open_conv);
        let (status, queued) = http(&gw, "POST", &path, Some(KEY), Some(&json!({"group": "billing"})));
        assert_eq!(status, 200, "{queued}");
        let queued: Value = serde_json::from_str(&queued).unwrap();
        assert_eq!(
            (queued["status"].as_str(), queued["group"].as_str()),
            (Some("queued"), Some("billing")),
            "{queued}"
        );
        let both = pb::TransferConversationRequest {
            conv: s.open_conv.clone(),
            agent_id: "a1".into(),
            group: "x".into(),
        };
        assert_eq!(c.transfer_conversation(both).await.unwrap_err().code(), Code::InvalidArgument);
        // The seed's agent has left; a2 comes online, serving "sales" only
        // (serving every group, it would take the billing queue at once).
        let token = gw.token("agent", "a2", &["--group", "sales"]);
        let mut a2 = WsClient::open(&gw, REPLY_WITHIN).await;
        assert_eq!(a2.call(json!({"type": "connect", "token": token})).await["type"], "connected");
        assert_eq!(a2.call(json!({"type": "presence", "status": "online"})).await["status"], "online");
        let assign = pb::AssignConversationRequest { conv: s.open_conv.clone(), agent_id: "a2".into() };
        let assigned = c.assign_conversation(assign.clone()).await.unwrap().into_inner();
        assert_eq!((assigned.status.as_str(), assigned.agent.map(|a| a.id)), ("assigned", Some("a2".into())));
        // The business system syncs the visitor: the agent sees it live, and
        // the stored profile has it.
        let sync = pb::SyncUserRequest {
            user_id: s.visitor_id.clone(),
            name: "Ann Buyer".into(),
            meta: [("vip_level".to_string(), "3".to_string())].into(),
            ..Default::default()
        };
        c.sync_user(sync).await.unwrap();
        let pushed = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), a2.ws.next())
                .await
                .expect("a push")
                .unwrap()
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "conversation" && v["visitor"]["meta"]["vip_level"] == "3" {
                break v;
            }
        };
        assert_eq!(pushed["visitor"]["name"], "Ann Buyer", "{pushed}");
        let path = format!("/api/v1/users/visitor/{}", s.visitor_id);
        let (status, body) = http(&gw, "PUT", &path, Some(KEY), Some(&json!({"meta": {"plan": "gold"}})));
        assert_eq!(status, 200, "{body}");
        let stored = c
            .get_conversation(pb::GetConversationRequest { conv: s.open_conv.clone() })
            .await
            .unwrap()
            .into_inner();
        let visitor = stored.visitor.unwrap();
        assert_eq!(
            (
                visitor.name.as_str(),
                visitor.meta.get("vip_level").map(String::as_str),
                visitor.meta.get("plan").map(String::as_str)
            ),
            ("Ann Buyer", Some("3"), Some("gold")),
            "key by key over what is stored"
        );
        let nobody = pb::AssignConversationRequest { agent_id: "a9".into(), ..assign };
        assert_eq!(c.assign_conversation(nobody).await.unwrap_err().code(), Code::NotFound);
        let close = pb::CloseConversationRequest { conv: s.open_conv.clone(), reason: "resolved".into() };
        let closed = c.close_conversation(close.clone()).await.unwrap().into_inner();
        assert_eq!(closed.status, "closed");
        assert_eq!(c.close_conversation(close).await.unwrap().into_inner().status, "closed", "closing again");

        let presence =
            c.get_presence(pb::GetPresenceRequest { agent_ids: vec!["a2".into(), "a9".into()] }).await;
        let agents = presence.unwrap().into_inner().agents;
        assert_eq!(agents.len(), 1, "an unknown agent is left out: {agents:?}");
        let a = &agents[0];
        assert_eq!((a.agent_id.as_str(), a.status.as_str(), a.conversations), ("a2", "online", 0), "{a:?}");
        let rest = rest_json(&gw, "/api/v1/presence?agents=a2");
        assert_eq!(
            (rest["agents"][0]["agent_id"].as_str(), rest["agents"].as_array().map(Vec::len)),
            (Some("a2"), Some(1)),
            "{rest}"
        );
        let (status, body) = http(
            &gw,
            "POST",
            "/api/v1/users/agent/a2/disconnect",
            Some(KEY),
            Some(&json!({"reason": "shift over"})),
        );
        assert_eq!(status, 200, "{body}");
        let gone: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(gone["sessions"], 1, "a2's one session: {gone}");
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(10), a2.ws.next())
                .await
                .expect("closed within 10 s")
            {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        };
        assert_eq!(closed.map(|f| u16::from(f.code)), Some(4000));
        let nobody =
            pb::DisconnectUserRequest { role: "agent".into(), user_id: "a9".into(), reason: String::new() };
        assert_eq!(c.disconnect_user(nobody).await.unwrap().into_inner().sessions, 0);
        let bad =
            pb::DisconnectUserRequest { role: "bot".into(), user_id: "x".into(), reason: String::new() };
        assert_eq!(c.disconnect_user(bad).await.unwrap_err().code(), Code::InvalidArgument);
    });
}

/// The close code the server ends `ws` with (skipping other frames).
async fn close_code(ws: &mut WsClient) -> Option<u16> {
    loop {
        match tokio::time::timeout(REPLY_WITHIN, ws.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

/// A visitor's `connect` with `token`: its answer, and the connection.
async fn visitor_connect(gw: &Gateway, token: &str) -> (Value, WsClient) {
    let mut ws = WsClient::open(gw, REPLY_WITHIN).await;
    let answer = ws.call(json!({"type": "connect", "token": token})).await;
    (answer, ws)
}

#[test]
fn synced_keys_override_the_token_and_blocked_visitors_are_refused() {
    let gw = start();
    rt().block_on(async {
        let mut c = grpc(&gw, Some(KEY)).await;
        let issue = pb::IssueTokenRequest {
            role: "visitor".into(),
            user_id: "vb".into(),
            name: "Token Name".into(),
            meta: [("vip_level", "1"), ("plan", "free")].map(|(k, v)| (k.into(), v.into())).into(),
            ..Default::default()
        };
        let token = c.issue_token(issue).await.unwrap().into_inner().token;
        let (first, mut one) = visitor_connect(&gw, &token).await;
        assert_eq!(first["user"]["meta"]["vip_level"], "1", "{first}");

        // Synced keys win over the token's at the next connect, key by key.
        let sync = pb::SyncUserRequest {
            user_id: "vb".into(),
            name: "Vera".into(),
            meta: [("vip_level".to_string(), "3".to_string())].into(),
            ..Default::default()
        };
        c.sync_user(sync).await.unwrap();
        let (second, mut two) = visitor_connect(&gw, &token).await;
        assert_eq!(
            (&second["user"]["name"], &second["user"]["meta"]),
            (&json!("Vera"), &json!({"vip_level": "3", "plan": "free"})),
            "{second}"
        );

        // A block closes every session with 4501 and refuses the next connect.
        let (status, body) =
            http(&gw, "POST", "/api/v1/visitors/vb/block", Some(KEY), Some(&json!({"reason": "abuse"})));
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["sessions"], 2, "{body}");
        assert_eq!(close_code(&mut one).await, Some(4501));
        assert_eq!(close_code(&mut two).await, Some(4501));
        let (refused, mut three) = visitor_connect(&gw, &token).await;
        assert_eq!(
            (&refused["code"], &refused["message"]),
            (&json!("forbidden"), &json!("abuse")),
            "{refused}"
        );
        assert_eq!(close_code(&mut three).await, Some(4501));

        // Lifted, it connects again; a block with a duration runs out by itself.
        c.unblock_visitor(pb::UnblockVisitorRequest { visitor_id: "vb".into() }).await.unwrap();
        let (back, mut four) = visitor_connect(&gw, &token).await;
        assert_eq!(back["type"], "connected", "{back}");
        let timed = pb::BlockVisitorRequest { visitor_id: "vb".into(), reason: String::new(), duration_s: 1 };
        // At least `four`; the sessions closed above may not have gone from
        // every shard's directory yet.
        assert!(c.block_visitor(timed).await.unwrap().into_inner().sessions >= 1);
        assert_eq!(close_code(&mut four).await, Some(4501));
        let (refused, _) = visitor_connect(&gw, &token).await;
        assert_eq!(
            (&refused["code"], &refused["message"]),
            (&json!("forbidden"), &json!("blocked")),
            "{refused}"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (back, _five) = visitor_connect(&gw, &token).await;
        assert_eq!(back["type"], "connected", "the block ran out: {back}");

        let (status, body) = http(&gw, "DELETE", "/api/v1/visitors/vb/block", Some(KEY), None);
        assert_eq!(status, 200, "unblocking with nothing to lift: {body}");
        let empty = c.block_visitor(pb::BlockVisitorRequest::default()).await.unwrap_err();
        assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
        let long =
            pb::BlockVisitorRequest { visitor_id: "vb".into(), reason: "x".repeat(100_000), duration_s: 0 };
        assert_eq!(c.block_visitor(long).await.unwrap_err().code(), Code::InvalidArgument);
    });
}

#[test]
fn the_openapi_description_lists_every_rest_route() {
    let gw = start();
    let spec = rest_json(&gw, "/api/v1/openapi.json");
    let mut paths: Vec<&str> = spec["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/v1/conversations",
            "/api/v1/conversations/{conv}",
            "/api/v1/conversations/{conv}/assign",
            "/api/v1/conversations/{conv}/close",
            "/api/v1/conversations/{conv}/messages",
            "/api/v1/conversations/{conv}/transfer",
            "/api/v1/events",
            "/api/v1/events/commit",
            "/api/v1/presence",
            "/api/v1/tokens",
            "/api/v1/users/{role}/{id}",
            "/api/v1/users/{role}/{id}/disconnect",
            "/api/v1/visitors/{id}/block"
        ]
    );
    let block = &spec["paths"]["/api/v1/visitors/{id}/block"];
    assert!(block["post"].is_object() && block["delete"].is_object(), "{block}");
}

#[test]
fn reflection_lists_and_describes_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let gw = start();
    rt().block_on(async {
        let channel = Channel::from_shared(format!("http://{}", gw.admin)).unwrap().connect().await.unwrap();
        let header: MetadataValue<_> = format!("Bearer {KEY}").parse().unwrap();
        let mut client =
            ServerReflectionClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", header.clone());
                Ok(r)
            });
        let ask =
            |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
        let requests = tokio_stream_of([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("kefu.v1.Gateway".into())),
            ask(MessageRequest::FileContainingSymbol("kefu.v1.Hooks".into())),
        ]);
        let mut answers = client.server_reflection_info(requests).await.unwrap().into_inner();
        let listed = answers.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
            panic!("{listed:?}")
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for want in ["kefu.v1.Gateway", "kefu.v1.Events"] {
            assert!(names.contains(&want), "{names:?}");
        }
        assert!(!names.contains(&"kefu.v1.Hooks"), "kefu calls Hooks, it does not serve them: {names:?}");
        // Both are described, Hooks too: a business system implements it.
        for _ in 0..2 {
            let described = answers.next().await.unwrap().unwrap();
            let Some(MessageResponse::FileDescriptorResponse(files)) = described.message_response else {
                panic!("{described:?}")
            };
            assert!(!files.file_descriptor_proto.is_empty());
        }
    });
}

/// A stream of the given requests (what a bidirectional call sends).
fn tokio_stream_of<T: Send + 'static>(
    items: impl IntoIterator<Item = T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static
where
    <Vec<T> as IntoIterator>::IntoIter: Send,
{
    futures_util::stream::iter(items.into_iter().collect::<Vec<_>>())
}

#[test]
fn readyz_is_200_when_storage_and_every_shard_are_up() {
    let gw = start();
    let (status, body) = http(&gw, "GET", "/readyz", None, None);
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = http(&gw, "GET", "/healthz", None, None);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[test]
fn calls_past_the_concurrency_bound_are_refused_at_once() {
    let keys = format!("[\"{KEY}\"]");
    let gw = Gateway::start(
        &["--shards", "1"],
        &[("KEFU_ADMIN_API_KEYS", keys.as_str()), ("KEFU_ADMIN_MAX_CONCURRENT_REQUESTS", "1")],
    );
    // A REST call whose body never comes holds the only place while its
    // handler waits for the body.
    use std::io::Write as _;
    let mut held = std::net::TcpStream::connect(gw.admin).unwrap();
    let head = format!(
        "POST /api/v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    held.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = http(&gw, "GET", "/api/v1/conversations", Some(KEY), None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("admin.max_concurrent_requests"), "{body}");
    rt().block_on(async {
        let err = grpc(&gw, Some(KEY))
            .await
            .list_conversations(pb::ListConversationsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    });
    // The operator endpoints are not API calls: they still answer.
    assert_eq!(http(&gw, "GET", "/healthz", None, None).0, 200);
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http(&gw, "GET", "/api/v1/conversations", Some(KEY), None).0, 200, "the place is free again");
    let metrics = http(&gw, "GET", "/metrics", None, None).1;
    assert!(metrics.contains("kefu_bridge_requests_total{outcome=\"busy\"} 2"), "{metrics}");
}
