//! The client protocol end to end: the real binary, agents and visitors
//! speaking PROTOCOL.md over `kefu.v1.json` and `kefu.v1.fb`.

mod common;

use std::time::Duration;

use common::Gateway;
use futures_util::{SinkExt, StreamExt};
use kefu_proto::client::{ClientFrame, Codec, Command, Encoder, Event, ServerFrame};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A JSON client.
struct Client {
    ws: Ws,
    next_id: i64,
}

impl Client {
    async fn open(gw: &Gateway) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr)).await.unwrap();
        Client { ws, next_id: 1 }
    }

    async fn send(&mut self, mut v: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.ws.send(Message::text(v.to_string())).await.unwrap();
        id
    }

    async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("stream open")
                .expect("no error");
            match m {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => return json!({"type": "_close", "code": c.map(|c| u16::from(c.code))}),
                _ => continue,
            }
        }
    }

    /// The next frame of `kind`, skipping others (presence and queue noise).
    async fn expect(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
            assert_ne!(v["type"], "error", "unexpected error while waiting for {kind}: {v}");
        }
    }

    /// The next frame of `kind` for which `pred` holds.
    async fn expect_where(&mut self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self.expect(kind).await;
            if pred(&v) {
                return v;
            }
        }
    }

    /// The reply to command `id` (skipping pushes).
    async fn reply(&mut self, id: i64) -> Value {
        loop {
            let v = self.recv().await;
            if v["id"] == json!(id) {
                return v;
            }
        }
    }

    /// Asserts nothing of `kind` arrives within `wait`.
    async fn none_of(&mut self, kind: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["type"], kind, "unexpected {v}");
            }
        }
    }
}

#[test]
fn visitor_and_agent_chat_end_to_end() {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    let token = gw.token("agent", "a1", &["--name", "Alice"]);
    rt().block_on(async {
        let mut agent = Client::open(&gw).await;
        let id = agent.send(json!({"type": "connect", "token": token})).await;
        let c = agent.reply(id).await;
        assert_eq!(c["type"], "connected", "{c}");
        assert_eq!(c["role"], "agent");
        assert_eq!(c["user"]["name"], "Alice");
        let id = agent.send(json!({"type": "presence", "status": "online"})).await;
        let p = agent.reply(id).await;
        assert_eq!((p["type"].as_str(), p["status"].as_str()), (Some("presence"), Some("online")), "{p}");

        // An anonymous visitor gets an id and a key.
        let mut visitor = Client::open(&gw).await;
        let id = visitor.send(json!({"type": "connect"})).await;
        let c = visitor.reply(id).await;
        assert_eq!(c["type"], "connected", "{c}");
        let visitor_id = c["user"]["id"].as_str().unwrap().to_string();
        let visitor_key = c["visitor_key"].as_str().expect("a new visitor gets a key").to_string();

        // Opening assigns it to the only online agent.
        let id = visitor.send(json!({"type": "open"})).await;
        let conv_frame = visitor.reply(id).await;
        assert_eq!(conv_frame["type"], "conversation", "{conv_frame}");
        let conv = conv_frame["conv"].as_str().unwrap().to_string();
        let assigned = agent.expect("conversation").await;
        assert_eq!(assigned["conv"], conv.as_str());
        assert_eq!(assigned["status"], "assigned", "{assigned}");
        assert_eq!(assigned["agent"]["id"], "a1");

        // Messages both ways: ack to the sender, msg to the other side.
        let id = visitor.send(json!({"type": "send", "conv": conv, "cid": "v1", "text": "hello"})).await;
        let ack = visitor.reply(id).await;
        assert_eq!((ack["type"].as_str(), ack["seq"].as_u64()), (Some("ack"), Some(1)), "{ack}");
        let msg = agent.expect("msg").await;
        assert_eq!((msg["seq"].as_u64(), msg["text"].as_str()), (Some(1), Some("hello")));
        assert_eq!(msg["from"]["role"], "visitor");
        let id = agent.send(json!({"type": "send", "conv": conv, "cid": "a1-1", "text": "hi, how can I help?"})).await;
        assert_eq!(agent.reply(id).await["seq"], 2);
        assert_eq!(visitor.expect("msg").await["seq"], 2);

        // A resent cid is acked again, marked duplicate, and not delivered.
        let id = visitor.send(json!({"type": "send", "conv": conv, "cid": "v1", "text": "hello"})).await;
        let dup = visitor.reply(id).await;
        assert_eq!((dup["seq"].as_u64(), dup["duplicate"].as_bool()), (Some(1), Some(true)), "{dup}");

        // The seed's keyword rule: "bug" gets an automatic reply from the bot.
        let id = visitor.send(json!({"type": "send", "conv": conv, "cid": "v2", "text": "I found a bug"})).await;
        assert_eq!(visitor.reply(id).await["seq"], 3);
        let bot = visitor.expect("msg").await;
        assert_eq!((bot["seq"].as_u64(), bot["from"]["role"].as_str()), (Some(4), Some("bot")), "{bot}");
        assert_eq!(agent.expect("msg").await["seq"], 3);
        assert_eq!(agent.expect("msg").await["seq"], 4);
        agent.none_of("msg", Duration::from_millis(200)).await;

        // Typing and read marks reach the other side.
        visitor.send(json!({"type": "typing", "conv": conv})).await;
        assert_eq!(agent.expect("typing").await["by"], visitor_id.as_str());
        agent.send(json!({"type": "read", "conv": conv, "seq": 3})).await;
        let read = visitor.expect("read").await;
        assert_eq!((read["seq"].as_u64(), read["by"].as_str()), (Some(3), Some("a1")));

        // History pages ascending.
        let id = agent.send(json!({"type": "history", "conv": conv, "limit": 3})).await;
        let h = agent.reply(id).await;
        let seqs: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [2, 3, 4], "{h}");
        let id = agent.send(json!({"type": "history", "conv": conv, "before": 2})).await;
        assert_eq!(agent.reply(id).await["messages"][0]["text"], "hello");

        // A visitor coming back with its key resumes what it missed.
        drop(visitor);
        let mut back = Client::open(&gw).await;
        let id = back
            .send(json!({"type": "connect", "visitor_id": visitor_id, "visitor_key": visitor_key, "resume": {conv.as_str(): 1}}))
            .await;
        let c = back.reply(id).await;
        assert_eq!(c["type"], "connected", "{c}");
        assert!(c.get("visitor_key").is_none(), "the key is given once: {c}");
        let mut tab = Client::open(&gw).await;
        let id = tab.send(json!({"type": "connect", "visitor_id": visitor_id, "visitor_key": visitor_key})).await;
        let t = tab.reply(id).await;
        assert_ne!(t["session"], c["session"], "each connection is its own session");
        assert_eq!(c["conversations"][0]["last_seq"], 4, "{c}");
        for seq in 2..=4 {
            assert_eq!(back.expect("msg").await["seq"], seq);
        }
        let resumed = back.expect("resumed").await;
        assert_eq!((resumed["from"].as_u64(), resumed["to"].as_u64()), (Some(2), Some(4)), "{resumed}");

        // Someone else's conversation is not found; a wrong key is refused.
        let mut other = Client::open(&gw).await;
        let id = other.send(json!({"type": "connect"})).await;
        other.reply(id).await;
        let id = other.send(json!({"type": "send", "conv": conv, "cid": "x", "text": "hi"})).await;
        assert_eq!(other.reply(id).await["code"], "not_found");
        let mut thief = Client::open(&gw).await;
        let key = "0".repeat(32);
        let id = thief.send(json!({"type": "connect", "visitor_id": visitor_id, "visitor_key": key})).await;
        assert_eq!(thief.reply(id).await["code"], "unauthorized");
        assert_eq!(thief.recv().await["code"], 4500);

        // The agent closes; both sides see it.
        let id = agent.send(json!({"type": "close", "conv": conv})).await;
        assert_eq!(agent.reply(id).await["status"], "closed");
        assert_eq!(back.expect("conversation").await["status"], "closed");
    });
}

#[test]
fn commands_before_connect_are_refused_and_queue_positions_are_pushed() {
    let gw = Gateway::start(&[], &[]);
    rt().block_on(async {
        let mut c = Client::open(&gw).await;
        let id = c.send(json!({"type": "open"})).await;
        assert_eq!(c.reply(id).await["code"], "unauthorized");
        assert_eq!(c.recv().await["code"], 4500);

        // No agent online: visitors queue, in order, with positions.
        let mut first = Client::open(&gw).await;
        let id = first.send(json!({"type": "connect"})).await;
        first.reply(id).await;
        let id = first.send(json!({"type": "open"})).await;
        let q = first.reply(id).await;
        assert_eq!((q["status"].as_str(), q["queue_position"].as_u64()), (Some("queued"), Some(1)), "{q}");
        let mut second = Client::open(&gw).await;
        let id = second.send(json!({"type": "connect"})).await;
        second.reply(id).await;
        let id = second.send(json!({"type": "open"})).await;
        assert_eq!(second.reply(id).await["queue_position"], 2);
        // Opening again returns the same conversation.
        let id = second.send(json!({"type": "open"})).await;
        let again = second.reply(id).await;
        assert_eq!(again["conv"], q["conv"].as_str().map(|_| again["conv"].clone()).unwrap());

        // An agent takes the first one with accept (auto-assign is on, so
        // going online assigns it); the second moves up.
        let token = gw.token("agent", "a9", &["--name", "Bob"]);
        let mut agent = Client::open(&gw).await;
        let id = agent.send(json!({"type": "connect", "token": token})).await;
        agent.reply(id).await;
        agent.send(json!({"type": "presence", "status": "online", "capacity": 1})).await;
        let assigned = first.expect_where("conversation", |v| v["status"] != "queued").await;
        assert_eq!(assigned["status"], "assigned", "{assigned}");
        assert_eq!(assigned["agent"]["id"], "a9", "{assigned}");
        second.expect_where("conversation", |v| v["queue_position"] == 1).await;
    });
}

#[test]
fn flatbuffers_clients_speak_the_same_protocol() {
    let gw = Gateway::start(&[], &[]);
    rt().block_on(async {
        let mut req = format!("ws://{}/ws", gw.addr).into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "kefu.v1.fb".parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut enc = Encoder::new();
        let mut send = async |ws: &mut Ws, id: i64, body: Command| {
            let bytes =
                Codec::FlatBuffers.encode_client(&ClientFrame { id: Some(id), body }, &mut enc).to_vec();
            ws.send(Message::binary(bytes)).await.unwrap();
        };
        // The reply to command `id`, skipping pushes.
        let recv = async |ws: &mut Ws, id: i64| -> ServerFrame {
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap()
                {
                    Message::Binary(b) => {
                        let frame = Codec::FlatBuffers.decode_server(&b).unwrap();
                        if frame.id == Some(id) {
                            return frame;
                        }
                    }
                    Message::Text(t) => panic!("a text frame on kefu.v1.fb: {t}"),
                    _ => continue,
                }
            }
        };
        send(
            &mut ws,
            1,
            Command::Connect { token: None, visitor_id: None, visitor_key: None, resume: Default::default() },
        )
        .await;
        let c = recv(&mut ws, 1).await;
        assert!(matches!(c.body, Event::Connected { .. }), "{c:?}");
        send(&mut ws, 2, Command::Open { group: None, meta: Default::default() }).await;
        let Event::Conversation { conv, .. } = recv(&mut ws, 2).await.body else {
            panic!("expected conversation")
        };
        let attachment = kefu_proto::client::Attachment {
            mime: "image/png".into(),
            data: vec![0x89, b'P', b'N', b'G', 0, 1, 2],
        };
        send(
            &mut ws,
            3,
            Command::Send { conv, cid: "f1".into(), text: None, attachment: Some(attachment.clone()) },
        )
        .await;
        let ack = recv(&mut ws, 3).await;
        assert_eq!(ack.id, Some(3));
        assert!(matches!(ack.body, Event::Ack { seq: 1, .. }), "{ack:?}");
        send(&mut ws, 4, Command::History { conv, before: None, limit: None }).await;
        let Event::History { messages, .. } = recv(&mut ws, 4).await.body else { panic!("expected history") };
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].attachment.as_ref(), Some(&attachment), "raw bytes survive storage");
    });
}

#[test]
fn acked_messages_survive_kill_9() {
    let gw = Gateway::start(&[], &[]);
    let (conv, visitor_id, visitor_key) = rt().block_on(async {
        let mut v = Client::open(&gw).await;
        let id = v.send(json!({"type": "connect"})).await;
        let c = v.reply(id).await;
        let id = v.send(json!({"type": "open"})).await;
        let conv = v.reply(id).await["conv"].as_str().unwrap().to_string();
        for i in 1..=20 {
            let id = v
                .send(json!({"type": "send", "conv": conv, "cid": format!("k{i}"), "text": format!("m{i}")}))
                .await;
            assert_eq!(v.reply(id).await["seq"], i);
        }
        (conv, c["user"]["id"].as_str().unwrap().to_string(), c["visitor_key"].as_str().unwrap().to_string())
    });
    let gw = gw.kill9_and_restart(&[], &[]);
    rt().block_on(async {
        let mut v = Client::open(&gw).await;
        let id =
            v.send(json!({"type": "connect", "visitor_id": visitor_id, "visitor_key": visitor_key})).await;
        let c = v.reply(id).await;
        assert_eq!(c["type"], "connected", "the key survived: {c}");
        assert_eq!(c["conversations"][0]["last_seq"], 20, "{c}");
        let id = v.send(json!({"type": "history", "conv": conv, "limit": 200})).await;
        let h = v.reply(id).await;
        let seqs: Vec<u64> =
            h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        // A retry of an acked cid after the restart is still a duplicate.
        let id = v.send(json!({"type": "send", "conv": conv, "cid": "k7", "text": "m7"})).await;
        let dup = v.reply(id).await;
        assert_eq!((dup["seq"].as_u64(), dup["duplicate"].as_bool()), (Some(7), Some(true)), "{dup}");
        let id = v.send(json!({"type": "send", "conv": conv, "cid": "k21", "text": "m21"})).await;
        assert_eq!(v.reply(id).await["seq"], 21, "seq continues gap-free");
    });
}

/// kill -9 under load, three times: visitors keep sending (retrying the same
/// cid until acked, reconnecting with their key); afterwards every acked
/// message is in history exactly once and seq is gap-free from 1.
#[test]
fn kill_9_under_load_loses_and_duplicates_nothing() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    const VISITORS: usize = 12;
    const KILLS: usize = 3;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", listen.as_str()];
    // The token bucket is per connection; lift it so the load is real.
    let env = [("KEFU_LIMITS_MESSAGES_PER_S", "1000000"), ("KEFU_LIMITS_BURST", "1000000")];
    let mut gw = Gateway::start(&args, &env);
    let addr = gw.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // Per visitor: (conv, cid → acked seq).
    type Acked = Vec<(String, BTreeMap<String, u64>)>;
    let acked: Arc<Mutex<Acked>> = Arc::new(Mutex::new(Vec::new()));
    let creds: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));

    let load = {
        let (stop, acked, creds) = (stop.clone(), acked.clone(), creds.clone());
        std::thread::spawn(move || {
            rt().block_on(async move {
                let mut tasks = Vec::new();
                for v in 0..VISITORS {
                    let (stop, acked, creds) = (stop.clone(), acked.clone(), creds.clone());
                    tasks.push(tokio::spawn(async move {
                        let url = format!("ws://{addr}/ws");
                        let mut ident: Option<(String, String)> = None;
                        let mut conv: Option<String> = None;
                        let mut mine = BTreeMap::new();
                        let mut i = 0u64;
                        'outer: while !stop.load(Ordering::Relaxed) {
                            let Ok(Ok((ws, _))) = tokio::time::timeout(
                                Duration::from_secs(2),
                                tokio_tungstenite::connect_async(&url),
                            )
                            .await
                            else {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            };
                            let mut c = Client { ws, next_id: 1 };
                            let connect = match &ident {
                                Some((id, key)) => {
                                    json!({"type": "connect", "visitor_id": id, "visitor_key": key})
                                }
                                None => json!({"type": "connect"}),
                            };
                            let id = c.send(connect).await;
                            let Some(reply) = try_reply(&mut c, id).await else { continue };
                            if reply["type"] != "connected" {
                                panic!("visitor {v} refused: {reply}");
                            }
                            if ident.is_none() {
                                ident = Some((
                                    reply["user"]["id"].as_str().unwrap().to_string(),
                                    reply["visitor_key"].as_str().unwrap().to_string(),
                                ));
                            }
                            if conv.is_none() {
                                let id = c.send(json!({"type": "open"})).await;
                                let Some(reply) = try_reply(&mut c, id).await else { continue };
                                conv = Some(reply["conv"].as_str().unwrap().to_string());
                            }
                            let conv_id = conv.clone().unwrap();
                            while !stop.load(Ordering::Relaxed) {
                                let cid = format!("v{v}-{i}");
                                let id = c
                                    .send(json!({"type": "send", "conv": conv_id, "cid": cid, "text": cid}))
                                    .await;
                                let Some(ack) = try_reply(&mut c, id).await else { continue 'outer };
                                match ack["type"].as_str() {
                                    Some("ack") => {
                                        let seq = ack["seq"].as_u64().unwrap();
                                        if let Some(prev) = mine.insert(cid.clone(), seq) {
                                            assert_eq!(prev, seq, "a cid acked with two seqs");
                                        }
                                        i += 1;
                                    }
                                    Some("error")
                                        if ack["code"] == "rate_limited" || ack["code"] == "unavailable" =>
                                    {
                                        tokio::time::sleep(Duration::from_millis(60)).await;
                                    }
                                    _ => panic!("visitor {v}: {ack}"),
                                }
                            }
                        }
                        if let (Some(conv), Some(ident)) = (conv, ident) {
                            acked.lock().unwrap().push((conv, mine));
                            creds.lock().unwrap().push(ident);
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
        })
    };
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(700));
        gw = gw.kill9_and_restart(&args, &env);
        assert_eq!(gw.addr, addr);
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let acked = acked.lock().unwrap().clone();
    let creds = creds.lock().unwrap().clone();
    assert_eq!(acked.len(), VISITORS);
    let total: usize = acked.iter().map(|(_, m)| m.len()).sum();
    assert!(total > VISITORS * 10, "too little load to mean anything: {total} acks");
    rt().block_on(async {
        for ((conv, mine), (vid, key)) in acked.iter().zip(&creds) {
            let mut c = Client::open(&gw).await;
            let id = c.send(json!({"type": "connect", "visitor_id": vid, "visitor_key": key})).await;
            assert_eq!(c.reply(id).await["type"], "connected");
            let mut seen: Vec<(u64, String)> = Vec::new();
            let mut before: Option<u64> = None;
            loop {
                let mut q = json!({"type": "history", "conv": conv, "limit": 200});
                if let Some(b) = before {
                    q["before"] = json!(b);
                }
                let id = c.send(q).await;
                let page = c.reply(id).await;
                let msgs = page["messages"].as_array().unwrap().clone();
                if msgs.is_empty() {
                    break;
                }
                before = msgs[0]["seq"].as_u64();
                for m in msgs.into_iter().rev() {
                    seen.push((m["seq"].as_u64().unwrap(), m["cid"].as_str().unwrap().to_string()));
                }
                if before == Some(1) {
                    break;
                }
            }
            seen.reverse();
            let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, (1..=seen.len() as u64).collect::<Vec<_>>(), "{conv}: seq gap-free from 1");
            let mut cids: Vec<&String> = seen.iter().map(|(_, c)| c).collect();
            cids.sort();
            let n = cids.len();
            cids.dedup();
            assert_eq!(cids.len(), n, "{conv}: a cid stored twice");
            for (cid, seq) in mine {
                assert!(seen.contains(&(*seq, cid.clone())), "{conv}: acked {cid} at {seq} is missing");
            }
        }
    });
    eprintln!(
        "kill -9 x{KILLS} under load: {total} acked messages over {VISITORS} visitors, none lost or doubled"
    );
}

/// The reply to `id`, or None if the connection broke (a kill -9).
async fn try_reply(c: &mut Client, id: i64) -> Option<Value> {
    loop {
        let m = match tokio::time::timeout(Duration::from_secs(3), c.ws.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => return None,
        };
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == json!(id) {
                    return Some(v);
                }
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

async fn agent(gw: &Gateway, sub: &str, extra: &[&str], capacity: u32) -> Client {
    let token = gw.token("agent", sub, extra);
    let mut a = Client::open(gw).await;
    let id = a.send(json!({"type": "connect", "token": token})).await;
    assert_eq!(a.reply(id).await["type"], "connected");
    let id = a.send(json!({"type": "presence", "status": "online", "capacity": capacity})).await;
    assert_eq!(a.reply(id).await["status"], "online");
    a
}

async fn visitor(gw: &Gateway) -> (Client, String) {
    let mut v = Client::open(gw).await;
    let id = v.send(json!({"type": "connect"})).await;
    assert_eq!(v.reply(id).await["type"], "connected");
    let id = v.send(json!({"type": "open"})).await;
    let conv = v.reply(id).await["conv"].as_str().unwrap().to_string();
    (v, conv)
}

#[test]
fn transfers_move_conversations_between_agents_and_groups() {
    let gw = Gateway::start(&[], &[]);
    rt().block_on(async {
        let mut alice = agent(&gw, "alice", &["--group", "sales"], 5).await;
        let (mut v, conv) = visitor(&gw).await;
        // "default" group: alice has groups, so she does not serve it; nobody does.
        let q = v.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
        assert_eq!(q["status"], "queued", "{q}");
        let mut bob = agent(&gw, "bob", &[], 5).await;
        let got = bob.expect_where("conversation", |c| c["status"] == "assigned").await;
        assert_eq!(got["agent"]["id"], "bob");
        // Bob hands it to alice by name.
        let id = bob.send(json!({"type": "transfer", "conv": conv, "to": "alice"})).await;
        let r = bob.reply(id).await;
        assert_eq!(
            (r["status"].as_str(), r["agent"]["id"].as_str()),
            (Some("assigned"), Some("alice")),
            "{r}"
        );
        assert_eq!(alice.expect("conversation").await["agent"]["id"], "alice");
        assert_eq!(
            v.expect_where("conversation", |c| c["agent"]["id"] == "alice").await["status"],
            "assigned"
        );
        // Bob lost it.
        let id = bob.send(json!({"type": "send", "conv": conv, "cid": "b", "text": "still here?"})).await;
        assert_eq!(bob.reply(id).await["code"], "not_found");
        // Alice sends it to a group queue; with bob away nobody takes it.
        let id = bob.send(json!({"type": "presence", "status": "away"})).await;
        assert_eq!(bob.reply(id).await["status"], "away");
        let id = alice.send(json!({"type": "transfer", "conv": conv, "to": "group:vip"})).await;
        let r = alice.reply(id).await;
        assert_eq!((r["status"].as_str(), r["group"].as_str()), (Some("queued"), Some("vip")), "{r}");
        // A visitor may not transfer.
        let id = v.send(json!({"type": "transfer", "conv": conv, "to": "bob"})).await;
        assert_eq!(v.reply(id).await["code"], "forbidden");
        // Bob back online (he serves every group) takes it, in group vip.
        bob.send(json!({"type": "presence", "status": "online"})).await;
        let got = bob.expect_where("conversation", |c| c["status"] == "assigned").await;
        assert_eq!((got["agent"]["id"].as_str(), got["group"].as_str()), (Some("bob"), Some("vip")), "{got}");
    });
}

#[test]
fn rate_limits_are_retryable_and_attachments_travel_as_base64() {
    let gw = Gateway::start(&[], &[("KEFU_LIMITS_MESSAGES_PER_S", "5"), ("KEFU_LIMITS_BURST", "5")]);
    rt().block_on(async {
        let (mut v, conv) = visitor(&gw).await;
        let png = [0x89u8, b'P', b'N', b'G', 0, 0xff];
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(png);
        let id = v
            .send(json!({"type": "send", "conv": conv, "cid": "img", "attachment": {"mime": "image/png", "data": data}}))
            .await;
        assert_eq!(v.reply(id).await["type"], "ack");
        let id = v.send(json!({"type": "history", "conv": conv})).await;
        let h = v.reply(id).await;
        assert_eq!(h["messages"][0]["attachment"]["data"], data.as_str(), "{h}");
        // The burst is spent (connect is free; open, send and history took three).
        let mut limited = None;
        for i in 0..10 {
            let id = v.send(json!({"type": "send", "conv": conv, "cid": format!("r{i}"), "text": "x"})).await;
            let r = v.reply(id).await;
            if r["code"] == "rate_limited" {
                limited = Some(format!("r{i}"));
                break;
            }
        }
        let cid = limited.expect("a flood is rate limited");
        // Retrying the same cid after a back-off succeeds.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let id = v.send(json!({"type": "send", "conv": conv, "cid": cid, "text": "x"})).await;
        assert_eq!(v.reply(id).await["type"], "ack");
    });
}

#[test]
fn several_agents_share_many_visitors_least_loaded_first() {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    rt().block_on(async {
        let mut agents = Vec::new();
        for name in ["a1", "a2", "a3"] {
            agents.push(agent(&gw, name, &[], 10).await);
        }
        let mut visitors = Vec::new();
        for _ in 0..24 {
            let (mut v, conv) = visitor(&gw).await;
            let assigned = v.expect_where("conversation", |c| c["status"] == "assigned").await;
            visitors.push((v, conv, assigned["agent"]["id"].as_str().unwrap().to_string()));
        }
        let mut load = std::collections::BTreeMap::new();
        for (_, _, a) in &visitors {
            *load.entry(a.clone()).or_insert(0) += 1;
        }
        assert_eq!(
            load.values().copied().collect::<Vec<_>>(),
            [8, 8, 8],
            "least-loaded spreads evenly: {load:?}"
        );
        // Every visitor's message reaches exactly its own agent.
        for (v, conv, _) in visitors.iter_mut() {
            let id = v.send(json!({"type": "send", "conv": conv, "cid": "hi", "text": conv.clone()})).await;
            assert_eq!(v.reply(id).await["type"], "ack");
        }
        for (i, a) in agents.iter_mut().enumerate() {
            let name = format!("a{}", i + 1);
            let mine: Vec<&String> =
                visitors.iter().filter(|(_, _, who)| *who == name).map(|(_, c, _)| c).collect();
            for _ in 0..mine.len() {
                let m = a.expect("msg").await;
                assert!(mine.contains(&&m["conv"].as_str().unwrap().to_string()), "{name} got {m}");
            }
            a.none_of("msg", Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn offline_agents_conversations_requeue_after_the_grace_period() {
    let env = [("KEFU_ROUTING_OFFLINE_POLICY", "requeue"), ("KEFU_ROUTING_OFFLINE_GRACE_S", "1")];
    let gw = Gateway::start(&[], &env);
    rt().block_on(async {
        let a = agent(&gw, "gone", &[], 5).await;
        let (mut v, _conv) = visitor(&gw).await;
        v.expect_where("conversation", |c| c["status"] == "assigned").await;
        drop(a);
        let back = v.expect_where("conversation", |c| c["status"] == "queued").await;
        assert_eq!(back["queue_position"], 1, "{back}");
    });
}
