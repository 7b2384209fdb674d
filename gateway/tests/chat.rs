//! The client protocol end to end: the real binary, agents and visitors
//! speaking PROTOCOL.md over `kefu.v1.json` and `kefu.v1.fb`.

mod common;

use std::time::Duration;

use common::Gateway;
use futures_util::{SinkExt, StreamExt};
use kefu_proto::client::{Codec, Encoder};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Which subprotocol each side of a scenario speaks.
#[derive(Clone, Copy, Debug)]
struct Wire {
    agents: Codec,
    visitors: Codec,
}

const JSON: Wire = Wire { agents: Codec::Json, visitors: Codec::Json };
const FB: Wire = Wire { agents: Codec::FlatBuffers, visitors: Codec::FlatBuffers };
/// Agents on FlatBuffers, visitors on JSON: one event fanned out to both
/// encodings at once.
const MIXED: Wire = Wire { agents: Codec::FlatBuffers, visitors: Codec::Json };

/// Runs a scenario once per subprotocol (and once per extra `name =
/// WIRE`), each as its own test.
macro_rules! over_both_subprotocols {
    ($scenario:ident $(, $extra:ident = $wire:ident)*) => {
        mod $scenario {
            #[test]
            fn json() {
                super::$scenario(super::JSON)
            }
            #[test]
            fn flatbuffers() {
                super::$scenario(super::FB)
            }
            $(
                #[test]
                fn $extra() {
                    super::$scenario(super::$wire)
                }
            )*
        }
    };
}

/// A client of either subprotocol. Scenarios are written once, in the JSON
/// shape of PROTOCOL.md; on `kefu.v1.fb` each command goes through the JSON
/// decoder and out as a FlatBuffers frame, and each FlatBuffers frame that
/// arrives is decoded and shown to the scenario as the same JSON. So every
/// byte on a FlatBuffers connection is FlatBuffers, and a field the
/// FlatBuffers side loses or mangles fails the same assertion it would on
/// JSON.
struct Client {
    ws: Ws,
    next_id: i64,
    codec: Codec,
    enc: Encoder,
}

impl Client {
    async fn open(gw: &Gateway, codec: Codec) -> Client {
        Client::dial(gw.addr, codec).await.expect("WebSocket upgrade")
    }

    /// Connects to `/ws`; JSON clients send no subprotocol (it is the
    /// default), FlatBuffers clients ask for `kefu.v1.fb`.
    async fn dial(addr: std::net::SocketAddr, codec: Codec) -> Result<Client, String> {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        if codec == Codec::FlatBuffers {
            req.headers_mut().insert("Sec-WebSocket-Protocol", codec.subprotocol().parse().unwrap());
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.map_err(|e| e.to_string())?;
        if codec == Codec::FlatBuffers {
            let chosen = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
            assert_eq!(chosen, Some(codec.subprotocol()));
        }
        Ok(Client { ws, next_id: 1, codec, enc: Encoder::new() })
    }

    async fn send(&mut self, v: Value) -> i64 {
        let (id, message) = self.command(v);
        self.ws.send(message).await.unwrap();
        id
    }

    /// `v` with the next `id`, in this client's subprotocol.
    fn command(&mut self, mut v: Value) -> (i64, Message) {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        let text = v.to_string();
        let message = match self.codec {
            Codec::Json => Message::text(text),
            Codec::FlatBuffers => {
                let frame =
                    Codec::Json.decode_client(text.as_bytes()).expect("the scenario's command is valid");
                Message::binary(Codec::FlatBuffers.encode_client(&frame, &mut self.enc).to_vec())
            }
        };
        (id, message)
    }

    /// Sends several commands in one write, so the gateway reads them
    /// together; returns their ids.
    async fn send_batch(&mut self, cmds: Vec<Value>) -> Vec<i64> {
        let mut ids = Vec::new();
        for v in cmds {
            let (id, message) = self.command(v);
            self.ws.feed(message).await.unwrap();
            ids.push(id);
        }
        self.ws.flush().await.unwrap();
        ids
    }

    /// Sends a frame as is, bypassing the codec (for garbage).
    async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// What a received message says, as PROTOCOL.md's JSON; None for
    /// pings and pongs. A close shows as `{"type": "_close", "code": N}`.
    fn parse(&mut self, m: Message) -> Option<Value> {
        match m {
            Message::Text(t) => {
                assert_eq!(self.codec, Codec::Json, "a text frame on kefu.v1.fb: {t}");
                Some(serde_json::from_str(&t).unwrap())
            }
            Message::Binary(b) => {
                assert_eq!(self.codec, Codec::FlatBuffers, "a binary frame on kefu.v1.json");
                let frame = Codec::FlatBuffers.decode_server(&b).expect("a valid FlatBuffers frame");
                Some(serde_json::from_slice(Codec::Json.encode_server(&frame, &mut self.enc)).unwrap())
            }
            Message::Close(c) => Some(json!({"type": "_close", "code": c.map(|c| u16::from(c.code))})),
            _ => None,
        }
    }

    async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("stream open")
                .expect("no error");
            if let Some(v) = self.parse(m) {
                return v;
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
        self.each_for(wait, |v| assert_ne!(v["type"], kind, "unexpected {v}")).await;
    }

    /// Runs `check` on every frame that arrives within `wait`.
    async fn each_for(&mut self, wait: Duration, check: impl Fn(&Value)) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Some(v) = self.parse(m) {
                check(&v);
            }
        }
    }
}

over_both_subprotocols!(visitor_and_agent_chat_end_to_end, mixed = MIXED);

fn visitor_and_agent_chat_end_to_end(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    let token = gw.token("agent", "a1", &["--name", "Alice"]);
    rt().block_on(async {
        let mut agent = Client::open(&gw, w.agents).await;
        let id = agent.send(json!({"type": "connect", "token": token})).await;
        let c = agent.reply(id).await;
        assert_eq!(c["type"], "connected", "{c}");
        assert_eq!(c["role"], "agent");
        assert_eq!(c["user"]["name"], "Alice");
        let id = agent.send(json!({"type": "presence", "status": "online"})).await;
        let p = agent.reply(id).await;
        assert_eq!((p["type"].as_str(), p["status"].as_str()), (Some("presence"), Some("online")), "{p}");

        // An anonymous visitor gets an id and a key.
        let mut visitor = Client::open(&gw, w.visitors).await;
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
        // Each state is announced once it is durable, and once: the opened
        // state answers the open, the assignment follows as a push.
        assert_eq!(conv_frame["status"], "queued", "{conv_frame}");
        let pushed = visitor.expect("conversation").await;
        assert_eq!((pushed["status"].as_str(), pushed["agent"]["id"].as_str()), (Some("assigned"), Some("a1")));
        agent.none_of("conversation", Duration::from_millis(150)).await;

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
        let mut back = Client::open(&gw, w.visitors).await;
        let id = back
            .send(json!({"type": "connect", "visitor_id": visitor_id, "visitor_key": visitor_key, "resume": {conv.as_str(): 1}}))
            .await;
        let c = back.reply(id).await;
        assert_eq!(c["type"], "connected", "{c}");
        assert!(c.get("visitor_key").is_none(), "the key is given once: {c}");
        let mut tab = Client::open(&gw, w.visitors).await;
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
        let mut other = Client::open(&gw, w.visitors).await;
        let id = other.send(json!({"type": "connect"})).await;
        other.reply(id).await;
        let id = other.send(json!({"type": "send", "conv": conv, "cid": "x", "text": "hi"})).await;
        assert_eq!(other.reply(id).await["code"], "not_found");
        let mut thief = Client::open(&gw, w.visitors).await;
        let key = "0".repeat(32);
        let id = thief.send(json!({"type": "connect", "visitor_id": visitor_id, "visitor_key": key})).await;
        assert_eq!(thief.reply(id).await["code"], "unauthorized");
        assert_eq!(thief.recv().await["code"], 4500);

        // The agent closes; both sides see it.
        let id = agent.send(json!({"type": "close", "conv": conv})).await;
        assert_eq!(agent.reply(id).await["status"], "closed");
        assert_eq!(back.expect("conversation").await["status"], "closed");
    });
    // The chat work is counted, in CPU time (shard 0 runs the router).
    let metrics = gw.admin_get("/metrics");
    let chat_cpu: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kefu_inbox_cpu_seconds_total{shard=\"0\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no inbox CPU for shard 0: {metrics}"));
    assert!(chat_cpu > 0.0, "{metrics}");
    // Shards talk through their inboxes, and never to themselves: what a
    // shard does for itself is a direct call.
    let mut cross = 0;
    for line in metrics.lines().filter(|l| l.starts_with("kefu_mailbox_posts_total{")) {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let value: u64 = value.parse().unwrap();
        let (from, to) = labels.split_once(",to=").unwrap();
        if from.trim_start_matches("kefu_mailbox_posts_total{from=") == to.trim_end_matches('}') {
            assert_eq!(value, 0, "a shard posted to itself: {line}");
        } else {
            cross += value;
        }
    }
    assert!(cross > 0, "no posts between the two shards counted: {metrics}");
}

over_both_subprotocols!(commands_before_connect_are_refused_and_queue_positions_are_pushed);

fn commands_before_connect_are_refused_and_queue_positions_are_pushed(w: Wire) {
    let gw = Gateway::start(&[], &[]);
    rt().block_on(async {
        let mut c = Client::open(&gw, w.visitors).await;
        let id = c.send(json!({"type": "open"})).await;
        assert_eq!(c.reply(id).await["code"], "unauthorized");
        assert_eq!(c.recv().await["code"], 4500);

        // No agent online: visitors queue, in order, with positions.
        let mut first = Client::open(&gw, w.visitors).await;
        let id = first.send(json!({"type": "connect"})).await;
        first.reply(id).await;
        let id = first.send(json!({"type": "open"})).await;
        let q = first.reply(id).await;
        assert_eq!((q["status"].as_str(), q["queue_position"].as_u64()), (Some("queued"), Some(1)), "{q}");
        let mut second = Client::open(&gw, w.visitors).await;
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
        let mut agent = Client::open(&gw, w.agents).await;
        let id = agent.send(json!({"type": "connect", "token": token})).await;
        agent.reply(id).await;
        agent.send(json!({"type": "presence", "status": "online", "capacity": 1})).await;
        let assigned = first.expect_where("conversation", |v| v["status"] != "queued").await;
        assert_eq!(assigned["status"], "assigned", "{assigned}");
        assert_eq!(assigned["agent"]["id"], "a9", "{assigned}");
        second.expect_where("conversation", |v| v["queue_position"] == 1).await;
    });
}

over_both_subprotocols!(acked_messages_survive_kill_9);

fn acked_messages_survive_kill_9(w: Wire) {
    let gw = Gateway::start(&[], &[]);
    let (conv, visitor_id, visitor_key) = rt().block_on(async {
        let mut v = Client::open(&gw, w.visitors).await;
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
        let mut v = Client::open(&gw, w.visitors).await;
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
    // Per visitor: (visitor, conv, cid → acked seq).
    type Acked = Vec<(usize, String, BTreeMap<String, u64>)>;
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
                        // Half the visitors speak each subprotocol.
                        let codec = Codec::ALL[v % 2];
                        let mut ident: Option<(String, String)> = None;
                        let mut conv: Option<String> = None;
                        let mut mine = BTreeMap::new();
                        let mut i = 0u64;
                        'outer: while !stop.load(Ordering::Relaxed) {
                            let Ok(Ok(mut c)) =
                                tokio::time::timeout(Duration::from_secs(2), Client::dial(addr, codec)).await
                            else {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            };
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
                            acked.lock().unwrap().push((v, conv, mine));
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
    let total: usize = acked.iter().map(|(_, _, m)| m.len()).sum();
    assert!(total > VISITORS * 10, "too little load to mean anything: {total} acks");
    rt().block_on(async {
        for ((v, conv, mine), (vid, key)) in acked.iter().zip(&creds) {
            let mut c = Client::open(&gw, Codec::ALL[v % 2]).await;
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
        match c.parse(m) {
            Some(v) if v["type"] == "_close" => return None,
            Some(v) if v["id"] == json!(id) => return Some(v),
            _ => {}
        }
    }
}

async fn agent(gw: &Gateway, w: Wire, sub: &str, extra: &[&str], capacity: u32) -> Client {
    let token = gw.token("agent", sub, extra);
    let mut a = Client::open(gw, w.agents).await;
    let id = a.send(json!({"type": "connect", "token": token})).await;
    assert_eq!(a.reply(id).await["type"], "connected");
    let id = a.send(json!({"type": "presence", "status": "online", "capacity": capacity})).await;
    assert_eq!(a.reply(id).await["status"], "online");
    a
}

async fn visitor(gw: &Gateway, w: Wire) -> (Client, String) {
    let mut v = Client::open(gw, w.visitors).await;
    let id = v.send(json!({"type": "connect"})).await;
    assert_eq!(v.reply(id).await["type"], "connected");
    let id = v.send(json!({"type": "open"})).await;
    let conv = v.reply(id).await["conv"].as_str().unwrap().to_string();
    (v, conv)
}

over_both_subprotocols!(agents_who_saw_a_conversation_wait_are_told_it_left_the_queue);

/// Agents of a group see a queued conversation wait; when its visitor
/// closes it they are told, once, so no console keeps a stale entry. (One
/// assigned as it opened was never shown waiting and is not announced:
/// see `routing::tests`.)
fn agents_who_saw_a_conversation_wait_are_told_it_left_the_queue(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[("KEFU_ROUTING_AUTO_ASSIGN", "false")]);
    rt().block_on(async {
        let mut ann = agent(&gw, w, "ann", &[], 5).await;
        let mut ben = agent(&gw, w, "ben", &[], 5).await;
        let (mut v, conv) = visitor(&gw, w).await;
        for a in [&mut ann, &mut ben] {
            let q = a.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
            assert_eq!(q["status"], "queued", "{q}");
        }
        let id = v.send(json!({"type": "close", "conv": conv})).await;
        assert_eq!(v.reply(id).await["status"], "closed");
        for a in [&mut ann, &mut ben] {
            let gone = a.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
            assert_eq!(gone["status"], "closed", "{gone}");
        }
    });
}

over_both_subprotocols!(transfers_move_conversations_between_agents_and_groups);

fn transfers_move_conversations_between_agents_and_groups(w: Wire) {
    let gw = Gateway::start(&[], &[]);
    rt().block_on(async {
        let mut alice = agent(&gw, w, "alice", &["--group", "sales"], 5).await;
        let mut v = Client::open(&gw, w.visitors).await;
        let id = v.send(json!({"type": "connect"})).await;
        v.reply(id).await;
        let id = v.send(json!({"type": "open"})).await;
        let q = v.reply(id).await;
        let conv = q["conv"].as_str().unwrap().to_string();
        // "default" group: alice has groups, so she does not serve it; nobody does.
        assert_eq!(q["status"], "queued", "{q}");
        let mut bob = agent(&gw, w, "bob", &[], 5).await;
        let got = bob.expect_where("conversation", |c| c["status"] == "assigned").await;
        assert_eq!(got["agent"]["id"], "bob");
        // Bob's second console tab.
        let token = gw.token("agent", "bob", &[]);
        let mut bob_tab = Client::open(&gw, w.agents).await;
        let id = bob_tab.send(json!({"type": "connect", "token": token})).await;
        assert_eq!(bob_tab.reply(id).await["conversations"][0]["conv"], conv.as_str());
        // Then its state, which `connected` does not carry, as a push.
        let described = bob_tab.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
        assert_eq!(described["agent"]["id"], "bob", "{described}");
        assert_eq!(described.get("id"), None, "{described}");
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
        // Bob lost it, and his other tab is told where it went.
        let gone = bob_tab.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
        assert_eq!(gone["agent"]["id"], "alice", "{gone}");
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

over_both_subprotocols!(rate_limits_are_retryable_and_attachments_are_stored);

fn rate_limits_are_retryable_and_attachments_are_stored(w: Wire) {
    let gw = Gateway::start(&[], &[("KEFU_LIMITS_MESSAGES_PER_S", "5"), ("KEFU_LIMITS_BURST", "5")]);
    rt().block_on(async {
        let (mut v, conv) = visitor(&gw, w).await;
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

over_both_subprotocols!(several_agents_share_many_visitors_least_loaded_first);

fn several_agents_share_many_visitors_least_loaded_first(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    rt().block_on(async {
        let mut agents = Vec::new();
        for name in ["a1", "a2", "a3"] {
            agents.push(agent(&gw, w, name, &[], 10).await);
        }
        let mut visitors = Vec::new();
        for _ in 0..24 {
            let (mut v, conv) = visitor(&gw, w).await;
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

over_both_subprotocols!(offline_agents_conversations_requeue_after_the_grace_period);

fn offline_agents_conversations_requeue_after_the_grace_period(w: Wire) {
    let env = [("KEFU_ROUTING_OFFLINE_POLICY", "requeue"), ("KEFU_ROUTING_OFFLINE_GRACE_S", "1")];
    let gw = Gateway::start(&[], &env);
    rt().block_on(async {
        let a = agent(&gw, w, "gone", &[], 5).await;
        let (mut v, _conv) = visitor(&gw, w).await;
        v.expect_where("conversation", |c| c["status"] == "assigned").await;
        drop(a);
        let back = v.expect_where("conversation", |c| c["status"] == "queued").await;
        assert_eq!(back["queue_position"], 1, "{back}");
    });
}

over_both_subprotocols!(queue_accept_presence_tabs_resume_and_errors, mixed = MIXED);

/// Without auto-assign: VIP queue order, queued conversations pushed to the
/// agents who serve them, `accept` and its conflict, presence pushed to the
/// other agents, a visitor's second tab seeing its own messages, an agent's
/// resume, `ping`, every client-caused error code, and a visitor's close.
fn queue_accept_presence_tabs_resume_and_errors(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[("KEFU_ROUTING_AUTO_ASSIGN", "false")]);
    rt().block_on(async {
        let mut ann = agent(&gw, w, "ann", &["--name", "Ann"], 5).await;
        let mut ben = agent(&gw, w, "ben", &[], 5).await;
        let p = ann.expect_where("presence", |p| p["agent"] == "ben").await;
        assert_eq!(p["status"], "online", "{p}");

        // An anonymous visitor queues first, a VIP (by token meta) second
        // and goes ahead of it.
        let (mut anon, anon_conv) = visitor(&gw, w).await;
        let q = ann.expect_where("conversation", |c| c["conv"] == anon_conv.as_str()).await;
        assert_eq!((q["status"].as_str(), q["queue_position"].as_u64()), (Some("queued"), Some(1)), "{q}");
        let vip_token =
            gw.token("visitor", "vip-7", &["--name", "Vera", "--meta", "vip_level=3", "--meta", "plan=gold"]);
        let mut vip = Client::open(&gw, w.visitors).await;
        let id = vip.send(json!({"type": "connect", "token": vip_token})).await;
        let c = vip.reply(id).await;
        assert_eq!(
            (c["user"]["id"].as_str(), c["user"]["meta"]["plan"].as_str()),
            (Some("vip-7"), Some("gold")),
            "{c}"
        );
        let id = vip.send(json!({"type": "open", "meta": {"page": "/pricing"}})).await;
        let opened = vip.reply(id).await;
        assert_eq!(opened["queue_position"], 1, "VIP first: {opened}");
        let conv = opened["conv"].as_str().unwrap().to_string();
        assert_eq!(opened["visitor"]["meta"]["page"], "/pricing", "{opened}");
        anon.expect_where("conversation", |c| c["queue_position"] == 2).await;
        let seen = ben.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
        assert_eq!(
            (seen["status"].as_str(), seen["visitor"]["name"].as_str()),
            (Some("queued"), Some("Vera")),
            "{seen}"
        );

        // ping needs no connect and costs nothing.
        let id = vip.send(json!({"type": "ping"})).await;
        assert_eq!(vip.reply(id).await["type"], "pong");

        // Ann accepts; Ben sees it taken (his console drops it from the
        // queue), and is too late.
        let id = ann.send(json!({"type": "accept", "conv": conv})).await;
        let r = ann.reply(id).await;
        assert_eq!((r["status"].as_str(), r["agent"]["id"].as_str()), (Some("assigned"), Some("ann")), "{r}");
        assert_eq!(vip.expect("conversation").await["agent"]["name"], "Ann");
        let taken = ben.expect_where("conversation", |c| c["conv"] == conv.as_str()).await;
        assert_eq!(
            (taken["status"].as_str(), taken["agent"]["id"].as_str()),
            (Some("assigned"), Some("ann"))
        );
        let id = ben.send(json!({"type": "accept", "conv": conv})).await;
        assert_eq!(ben.reply(id).await["code"], "conflict");
        anon.expect_where("conversation", |c| c["queue_position"] == 1).await;

        // The VIP's second tab sees what the first sends, and so does Ann.
        let mut tab = Client::open(&gw, w.visitors).await;
        let id = tab.send(json!({"type": "connect", "token": vip_token})).await;
        assert_eq!(tab.reply(id).await["conversations"][0]["conv"], conv.as_str());
        let id = vip.send(json!({"type": "send", "conv": conv, "cid": "t1", "text": "two tabs"})).await;
        assert_eq!(vip.reply(id).await["seq"], 1);
        assert_eq!(tab.expect("msg").await["text"], "two tabs");
        assert_eq!(ann.expect("msg").await["cid"], "t1");

        // Client-caused errors, each answered with the command's id, and the
        // connection stays open.
        let garbage = match w.visitors {
            Codec::Json => Message::text("{not json"),
            Codec::FlatBuffers => Message::binary(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3]),
        };
        vip.send_raw(garbage).await;
        assert_eq!(vip.expect_where("error", |_| true).await["code"], "bad_frame");
        // A command the decoder refuses (an empty cid), which the JSON
        // path of `send` cannot carry, so it is built here.
        let empty_cid = kefu_proto::client::ClientFrame {
            id: Some(99),
            body: kefu_proto::client::Command::Send {
                conv: conv.parse().unwrap(),
                cid: String::new(),
                text: Some("x".into()),
                attachment: None,
            },
        };
        let mut enc = Encoder::new();
        let bytes = w.visitors.encode_client(&empty_cid, &mut enc).to_vec();
        vip.send_raw(match w.visitors {
            Codec::Json => Message::text(String::from_utf8(bytes).unwrap()),
            Codec::FlatBuffers => Message::binary(bytes),
        })
        .await;
        let e = vip.reply(99).await;
        assert_eq!(e["code"], "bad_command", "{e}");
        let errors = [
            (
                json!({"type": "send", "conv": conv, "cid": "big", "text": "x".repeat(16 * 1024 + 1)}),
                "too_large",
            ),
            (json!({"type": "read", "conv": conv, "seq": 9}), "bad_command"),
            (json!({"type": "typing", "conv": anon_conv}), "not_found"),
            (json!({"type": "accept", "conv": conv}), "forbidden"),
        ];
        for (cmd, code) in errors {
            let id = vip.send(cmd.clone()).await;
            let e = vip.reply(id).await;
            assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{cmd}: {e}");
        }
        let id = vip.send(json!({"type": "ping"})).await;
        assert_eq!(vip.reply(id).await["type"], "pong", "still open after errors");

        // Ann's console reconnects and resumes from nothing.
        let token = gw.token("agent", "ann", &["--name", "Ann"]);
        let mut console = Client::open(&gw, w.agents).await;
        let id = console.send(json!({"type": "connect", "token": token, "resume": {conv.as_str(): 0}})).await;
        let c = console.reply(id).await;
        assert_eq!(c["conversations"][0]["conv"], conv.as_str(), "{c}");
        // The queue comes along, so the console shows what waits.
        assert_eq!(c["conversations"][1]["conv"], anon_conv.as_str(), "{c}");
        assert_eq!(c["conversations"][1]["status"], "queued", "{c}");
        assert_eq!(console.expect("msg").await["text"], "two tabs");
        let r = console.expect("resumed").await;
        assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(1), Some(1)), "{r}");

        // Ben going away is pushed to Ann.
        let id = ben.send(json!({"type": "presence", "status": "away"})).await;
        assert_eq!(ben.reply(id).await["status"], "away");
        assert_eq!(ann.expect_where("presence", |p| p["agent"] == "ben").await["status"], "away");

        // The visitor closes; sending afterwards is a conflict, history stays.
        let id = vip.send(json!({"type": "close", "conv": conv})).await;
        assert_eq!(vip.reply(id).await["status"], "closed");
        assert_eq!(
            ann.expect_where("conversation", |c| c["conv"] == conv.as_str()).await["status"],
            "closed"
        );
        let id = vip.send(json!({"type": "send", "conv": conv, "cid": "late", "text": "x"})).await;
        assert_eq!(vip.reply(id).await["code"], "conflict");
        let id = vip.send(json!({"type": "history", "conv": conv, "limit": 500})).await;
        assert_eq!(vip.reply(id).await["messages"].as_array().map(Vec::len), Some(1));
    });
}

over_both_subprotocols!(random_commands_are_all_answered_and_break_nothing);

/// Codes a client may be told; anything else (or no answer) fails.
const ERROR_CODES: [&str; 10] = [
    "bad_frame",
    "bad_command",
    "unauthorized",
    "forbidden",
    "not_found",
    "too_large",
    "rate_limited",
    "conflict",
    "unavailable",
    "internal",
];

/// Agents and visitors send a seeded storm of random commands, mostly
/// wrong (unknown and others' conversations, bad seqs, odd targets, huge
/// texts, garbage frames). Every command that must be answered is answered
/// with its own `id` and either its event or a known error code; commands
/// answered only on error (`read`, `typing`) are followed by a `ping` whose
/// `pong` bounds the wait. Afterwards the gateway still serves a normal
/// conversation and logged no panic. `KEFU_CHAOS_SEED` replays a run.
fn random_commands_are_all_answered_and_break_nothing(w: Wire) {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let seed: u64 =
        std::env::var("KEFU_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (set KEFU_CHAOS_SEED={seed} to replay)");
    let env = [("KEFU_LIMITS_MESSAGES_PER_S", "1000000"), ("KEFU_LIMITS_BURST", "1000000")];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        let mut clients = Vec::new();
        for i in 0..3 {
            // ag0 serves g1 only; the others serve every group.
            let groups: &[&str] = if i == 0 { &["--group", "g1"] } else { &[] };
            clients.push(agent(&gw, w, &format!("ag{i}"), groups, 3).await);
        }
        let mut convs = Vec::new();
        for _ in 0..6 {
            let (v, conv) = visitor(&gw, w).await;
            clients.push(v);
            convs.push(conv);
        }
        let mut targets = convs.clone();
        targets.extend(["c0", "c999999", "c18446744073709551615"].map(String::from));
        let mut rng = StdRng::seed_from_u64(seed);
        let mut answered = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..600 {
            let who = rng.random_range(0..clients.len());
            let c = &mut clients[who];
            if rng.random_ratio(1, 25) {
                // A frame that is no command at all, in the connection's own
                // frame kind or the other one.
                let bytes: Vec<u8> =
                    (0..rng.random_range(0..64)).map(|_| rng.random_range(b' '..=b'~')).collect();
                let text = String::from_utf8(bytes.clone()).unwrap();
                c.send_raw(if rng.random() { Message::text(text) } else { Message::binary(bytes) }).await;
                let e = c.expect_where("error", |_| true).await;
                assert!(ERROR_CODES.contains(&e["code"].as_str().unwrap()), "{e}");
                continue;
            }
            let cmd = random_command(&mut rng, &targets);
            let kind = cmd["type"].as_str().unwrap().to_string();
            let id = c.send(cmd.clone()).await;
            let quiet_on_success = kind == "read" || kind == "typing";
            let ping = if quiet_on_success { Some(c.send(json!({"type": "ping"})).await) } else { None };
            let outcome = loop {
                let v = c.recv().await;
                assert_ne!(v["type"], "_close", "{cmd} closed the connection: {v}");
                if v["id"] == json!(id) {
                    break v;
                }
                if ping.is_some() && v["id"] == json!(ping) {
                    break json!({"type": "(no reply)"});
                }
            };
            // Conversations opened along the way become targets too.
            if outcome["type"] == "conversation"
                && let Some(conv) = outcome["conv"].as_str()
                && !targets.iter().any(|t| t == conv)
            {
                targets.push(conv.to_string());
            }
            if outcome["type"] == "error" {
                let code = outcome["code"].as_str().unwrap_or_default();
                assert!(ERROR_CODES.contains(&code), "{cmd}: {outcome}");
                assert_ne!(code, "internal", "{cmd}: {outcome}");
                *answered.entry(format!("{kind} → {code}")).or_default() += 1;
            } else {
                *answered.entry(format!("{kind} → {}", outcome["type"].as_str().unwrap())).or_default() += 1;
            }
            if let Some(ping) = ping
                && outcome["type"] != "(no reply)"
            {
                c.reply(ping).await;
            }
        }
        eprintln!("outcomes: {answered:#?}");
        assert!(answered.keys().any(|k| k.ends_with("→ ack")), "some sends succeeded: {answered:?}");

        // Still a working gateway: new users connect, route, store and answer.
        let mut a = agent(&gw, w, "after", &[], 5).await;
        let (mut v, conv) = visitor(&gw, w).await;
        let id = v.send(json!({"type": "send", "conv": conv, "cid": "ok", "text": "still here"})).await;
        assert_eq!(v.reply(id).await["type"], "ack");
        let id = a.send(json!({"type": "presence", "status": "away"})).await;
        assert_eq!(a.reply(id).await["status"], "away");
    });
    let log: Vec<String> = gw.log.try_iter().collect();
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:#?}");
}

/// One random command in PROTOCOL.md's JSON shape: a known type with
/// plausible, edge-case or wrong field values.
fn random_command(rng: &mut impl rand::Rng, targets: &[String]) -> Value {
    let conv = targets[rng.random_range(0..targets.len())].clone();
    let seq = [0u64, 1, 2, 5, 1 << 40][rng.random_range(0..5)];
    let text = match rng.random_range(0..6) {
        0 => "bug report: 客服 🐛".to_string(),
        1 => "x".repeat(16 * 1024 + 1),
        _ => format!("hello {}", rng.random::<u16>()),
    };
    let cid = format!("r{}", rng.random_range(0..40));
    let mut pick = |options: &[&str]| options[rng.random_range(0..options.len())].to_string();
    let mime = pick(&["image/png", "x/y", "text/plain"]);
    let status = pick(&["online", "away", "offline"]);
    let to = pick(&["ag0", "ag1", "ag2", "nobody", "group:g1", "group:vip"]);
    let group = pick(&["g1", "default", "vip"]);
    match rng.random_range(0..24) {
        0 => json!({"type": "send", "conv": conv, "cid": cid, "text": text}),
        1 => {
            json!({"type": "send", "conv": conv, "cid": cid, "attachment": {"mime": mime, "data": "AAECAw=="}})
        }
        2 => json!({"type": "read", "conv": conv, "seq": seq}),
        3 => json!({"type": "typing", "conv": conv}),
        4 => json!({"type": "history", "conv": conv, "before": seq, "limit": rng.random_range(1..300)}),
        5 => {
            json!({"type": "presence", "status": status, "capacity": rng.random_range(0..120)})
        }
        6 => json!({"type": "accept", "conv": conv}),
        7 => {
            json!({"type": "transfer", "conv": conv, "to": to})
        }
        8 if rng.random_ratio(1, 3) => json!({"type": "close", "conv": conv}),
        9 => json!({"type": "open", "group": group}),
        10 => json!({"type": "connect"}),
        // Mostly messages and reads, as in a real conversation.
        12..=17 => json!({"type": "send", "conv": conv, "cid": cid, "text": text}),
        _ => json!({"type": "read", "conv": conv, "seq": seq}),
    }
}

/// An agent, and an anonymous visitor whose conversation it was assigned
/// and who has gone: the agent, the visitor's (id, key), the conversation.
async fn visitor_away_from_agent(gw: &Gateway, w: Wire, agent_id: &str) -> (Client, (Value, Value), String) {
    let mut a = agent(gw, w, agent_id, &[], 5).await;
    let mut v = Client::open(gw, w.visitors).await;
    let id = v.send(json!({"type": "connect"})).await;
    let c = v.reply(id).await;
    let (vid, key) = (c["user"]["id"].clone(), c["visitor_key"].clone());
    let id = v.send(json!({"type": "open"})).await;
    let conv = v.reply(id).await["conv"].as_str().unwrap().to_string();
    a.expect_where("conversation", |c| c["status"] == "assigned").await;
    (a, (vid, key), conv)
}

over_both_subprotocols!(resume_under_live_traffic_is_gap_free_and_in_order);

/// A visitor reconnects again and again with `resume` while its agent keeps
/// sending: every session sees `connected` first, then exactly the missed
/// messages, `resumed`, and the live ones, with `seq` contiguous throughout
/// and nothing twice.
fn resume_under_live_traffic_is_gap_free_and_in_order(w: Wire) {
    let env = [("KEFU_LIMITS_MESSAGES_PER_S", "1000000"), ("KEFU_LIMITS_BURST", "1000000")];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        let (mut a, (vid, key), conv) = visitor_away_from_agent(&gw, w, "busy").await;

        const MESSAGES: u64 = 300;
        let sender = {
            let conv = conv.clone();
            async move {
                for i in 1..=MESSAGES {
                    let id = a.send(json!({"type": "send", "conv": conv, "cid": format!("a{i}"), "text": "live"})).await;
                    assert_eq!(a.reply(id).await["seq"], i);
                }
                a
            }
        };
        let reader = async {
            let mut last_seen = 0u64;
            let mut sessions = 0;
            while last_seen < MESSAGES {
                sessions += 1;
                let mut v = Client::open(&gw, w.visitors).await;
                let connect = json!({"type": "connect", "visitor_id": vid, "visitor_key": key, "resume": {conv.as_str(): last_seen}});
                let id = v.send(connect).await;
                let first = v.recv().await;
                assert_eq!((first["type"].as_str(), first["id"].as_i64()), (Some("connected"), Some(id)), "{first}");
                let mut resumed_to = None;
                // Read a few, then drop the connection mid-stream.
                for _ in 0..25 {
                    if last_seen == MESSAGES && resumed_to.is_some() {
                        break;
                    }
                    let f = v.recv().await;
                    match f["type"].as_str() {
                        Some("msg") => {
                            let seq = f["seq"].as_u64().unwrap();
                            assert_eq!(seq, last_seen + 1, "session {sessions}: gap or repeat: {f}");
                            if let Some(to) = resumed_to {
                                assert!(seq > to, "a replayed seq after resumed: {f}");
                            }
                            last_seen = seq;
                        }
                        Some("resumed") => {
                            let to = f["to"].as_u64().unwrap();
                            assert_eq!(to, last_seen, "resumed right after the replay: {f}");
                            resumed_to = Some(to);
                        }
                        _ => {}
                    }
                }
                assert!(resumed_to.is_some() || last_seen == MESSAGES, "session {sessions} saw no resumed");
            }
            sessions
        };
        let (_a, sessions) = tokio::join!(sender, reader);
        assert!(sessions > 3, "the visitor reconnected mid-stream: {sessions} sessions");
    });
}

over_both_subprotocols!(commands_pipelined_behind_connect_are_answered_after_connected);

/// A client may send commands right behind `connect` without waiting, with
/// a token or as a new anonymous visitor (whose commands wait until it is
/// durable): `connected` still comes first, then the answers (each by its
/// `id`; answers to different commands may come in any order).
fn commands_pipelined_behind_connect_are_answered_after_connected(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    let token = gw.token("visitor", "eager", &["--name", "Eager"]);
    rt().block_on(async {
        for connect in [json!({"type": "connect", "token": token}), json!({"type": "connect"})] {
            let mut v = Client::open(&gw, w.visitors).await;
            let connect = v.send(connect).await;
            let open = v.send(json!({"type": "open"})).await;
            let read = v.send(json!({"type": "read", "conv": "c999", "seq": 1})).await;
            let first = v.recv().await;
            assert_eq!(
                (first["type"].as_str(), first["id"].as_i64()),
                (Some("connected"), Some(connect)),
                "{first}"
            );
            let mut answers = std::collections::BTreeMap::new();
            while answers.len() < 2 {
                let f = v.recv().await;
                if let Some(id) = f["id"].as_i64() {
                    answers.insert(id, f);
                }
            }
            assert_eq!(answers[&open]["type"], "conversation", "{answers:?}");
            assert_eq!(answers[&read]["code"], "not_found", "{answers:?}");
            // One announcement of the new conversation: the reply.
            v.none_of("conversation", Duration::from_millis(200)).await;
        }

        // A new visitor's backlog is bounded while it is being stored: 40
        // commands in one write behind connect all arrive before the
        // visitor is durable; 16 wait and are served, the rest are refused.
        let mut v = Client::open(&gw, w.visitors).await;
        let mut batch = vec![json!({"type": "connect"})];
        batch.extend((0..40).map(|_| json!({"type": "read", "conv": "c999", "seq": 1})));
        let sent = v.send_batch(batch).await.split_off(1);
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        while codes.values().sum::<usize>() < sent.len() {
            let f = v.recv().await;
            if f["id"].as_i64().is_some_and(|id| sent.contains(&id)) {
                *codes.entry(f["code"].as_str().unwrap_or("?").to_string()).or_default() += 1;
            }
        }
        let expected = [("bad_command".to_string(), 24), ("not_found".to_string(), 16)].into();
        assert_eq!(codes, expected, "every command answered; 16 kept while storing");
    });
}

over_both_subprotocols!(a_returning_visitor_sees_its_past_conversations);

/// `connected` lists a visitor's open conversation first, then its closed
/// ones newest first, each with its last seq, and their history stays
/// readable; across a restart too.
fn a_returning_visitor_sees_its_past_conversations(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    let (vid, key, first) = rt().block_on(async {
        let mut v = Client::open(&gw, w.visitors).await;
        let id = v.send(json!({"type": "connect"})).await;
        let c = v.reply(id).await;
        assert_eq!(c["conversations"], json!([]), "{c}");
        let id = v.send(json!({"type": "open"})).await;
        let first = v.reply(id).await["conv"].as_str().unwrap().to_string();
        for i in 1..=2 {
            let id =
                v.send(json!({"type": "send", "conv": first, "cid": format!("f{i}"), "text": "x"})).await;
            assert_eq!(v.reply(id).await["seq"], i);
        }
        let id = v.send(json!({"type": "close", "conv": first})).await;
        assert_eq!(v.reply(id).await["status"], "closed");
        (c["user"]["id"].as_str().unwrap().to_string(), c["visitor_key"].as_str().unwrap().to_string(), first)
    });
    let gw = gw.kill9_and_restart(&["--shards", "2"], &[]);
    rt().block_on(async {
        let connect = json!({"type": "connect", "visitor_id": vid, "visitor_key": key});
        let mut v = Client::open(&gw, w.visitors).await;
        let id = v.send(connect.clone()).await;
        let c = v.reply(id).await;
        assert_eq!(c["conversations"], json!([{"conv": first, "status": "closed", "last_seq": 2}]), "{c}");
        let id = v.send(json!({"type": "open"})).await;
        let second = v.reply(id).await["conv"].as_str().unwrap().to_string();
        assert_ne!(second, first, "a new conversation after close");
        drop(v);

        let mut v = Client::open(&gw, w.visitors).await;
        let id = v.send(connect).await;
        let c = v.reply(id).await;
        let listed: Vec<(&str, &str)> = c["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["conv"].as_str().unwrap(), c["status"].as_str().unwrap()))
            .collect();
        assert_eq!(listed, [(second.as_str(), "queued"), (first.as_str(), "closed")], "{c}");
        let id = v.send(json!({"type": "history", "conv": first})).await;
        assert_eq!(v.reply(id).await["messages"].as_array().map(Vec::len), Some(2));
    });
}

over_both_subprotocols!(commands_pipelined_behind_an_anonymous_connect_come_after_connected);

/// A new anonymous visitor's `connected` waits for its profile to be
/// durable; a command sent right behind `connect` must not be answered
/// before it (`connected` is the first frame a session gets).
fn commands_pipelined_behind_an_anonymous_connect_come_after_connected(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    rt().block_on(async {
        let mut v = Client::open(&gw, w.visitors).await;
        let ids =
            v.send_batch(vec![json!({"type": "connect"}), json!({"type": "typing", "conv": "c999"})]).await;
        let (connect, typing) = (ids[0], ids[1]);
        let first = v.recv().await;
        assert_eq!(
            (first["type"].as_str(), first["id"].as_i64()),
            (Some("connected"), Some(connect)),
            "{first}"
        );
        let answer = v.reply(typing).await;
        assert_eq!(answer["type"], "error", "{answer}");
    });
}

over_both_subprotocols!(a_ping_pipelined_behind_connect_is_answered_after_connected);

/// `ping` right behind a token `connect`: `pong` may not overtake
/// `connected`.
fn a_ping_pipelined_behind_connect_is_answered_after_connected(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    let token = gw.token("visitor", "pinger", &[]);
    rt().block_on(async {
        let mut v = Client::open(&gw, w.visitors).await;
        let ids =
            v.send_batch(vec![json!({"type": "connect", "token": token}), json!({"type": "ping"})]).await;
        let (connect, ping) = (ids[0], ids[1]);
        let first = v.recv().await;
        assert_eq!(
            (first["type"].as_str(), first["id"].as_i64()),
            (Some("connected"), Some(connect)),
            "{first}"
        );
        assert_eq!(v.reply(ping).await["type"], "pong");

        // Nor may the refusal of a frame that is no command at all.
        let mut v = Client::open(&gw, w.visitors).await;
        let (connect, message) = v.command(json!({"type": "connect", "token": token}));
        v.ws.feed(message).await.unwrap();
        v.ws.feed(match w.visitors {
            Codec::Json => Message::text("{not json"),
            Codec::FlatBuffers => Message::binary(vec![0xde, 0xad, 0xbe, 0xef]),
        })
        .await
        .unwrap();
        v.ws.flush().await.unwrap();
        let first = v.recv().await;
        assert_eq!(first["id"].as_i64(), Some(connect), "connected first: {first}");
        assert_eq!(v.recv().await["code"], "bad_frame");
    });
}

over_both_subprotocols!(a_send_pipelined_behind_close_is_a_conflict);

/// A client's commands take effect in the order it sent them: a `send`
/// right behind `close` finds the conversation closed.
fn a_send_pipelined_behind_close_is_a_conflict(w: Wire) {
    let gw = Gateway::start(&[], &[]);
    rt().block_on(async {
        let (mut v, conv) = visitor(&gw, w).await;
        let ids = v
            .send_batch(vec![
                json!({"type": "close", "conv": conv}),
                json!({"type": "send", "conv": conv, "cid": "late", "text": "after close"}),
            ])
            .await;
        let (close, send) = (ids[0], ids[1]);
        let mut answers = std::collections::BTreeMap::new();
        while answers.len() < 2 {
            let f = v.recv().await;
            if let Some(id) = f["id"].as_i64() {
                answers.insert(id, f);
            }
        }
        assert_eq!(answers[&close]["status"], "closed", "{answers:?}");
        let s = &answers[&send];
        assert_eq!((s["type"].as_str(), s["code"].as_str()), (Some("error"), Some("conflict")), "{s}");
        let id = v.send(json!({"type": "history", "conv": conv})).await;
        assert_eq!(v.reply(id).await["messages"], json!([]), "nothing stored after the close");
    });
}

over_both_subprotocols!(a_resume_with_a_long_backlog_is_replayed_in_full);

/// A visitor that missed more messages than a connection's outbound queue
/// holds (`limits.outbound_queue_frames`, 1024) still gets them all, then
/// `resumed`, instead of being cut as a slow consumer.
fn a_resume_with_a_long_backlog_is_replayed_in_full(w: Wire) {
    let env = [("KEFU_LIMITS_MESSAGES_PER_S", "1000000"), ("KEFU_LIMITS_BURST", "1000000")];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        let (mut a, (vid, key), conv) = visitor_away_from_agent(&gw, w, "chatty").await;
        const MESSAGES: u64 = 1500;
        for chunk in (1..=MESSAGES).collect::<Vec<_>>().chunks(100) {
            let cmds = chunk
                .iter()
                .map(|i| json!({"type": "send", "conv": conv, "cid": format!("m{i}"), "text": "backlog"}))
                .collect();
            let ids = a.send_batch(cmds).await;
            a.reply(*ids.last().unwrap()).await;
        }
        let mut v = Client::open(&gw, w.visitors).await;
        let id = v.send(json!({"type": "connect", "visitor_id": vid, "visitor_key": key, "resume": {conv.as_str(): 0}})).await;
        assert_eq!(v.reply(id).await["type"], "connected");
        for seq in 1..=MESSAGES {
            let m = v.recv().await;
            assert_eq!((m["type"].as_str(), m["seq"].as_u64()), (Some("msg"), Some(seq)), "{m}");
        }
        let r = v.expect("resumed").await;
        assert_eq!(r["to"], MESSAGES, "{r}");
    });
}

over_both_subprotocols!(full_inboxes_hold_messages_back_instead_of_dropping_them);

/// With inboxes of 4 messages, bursts from many visitors overflow them all
/// the time. A connection's own command may be refused with a retryable
/// `unavailable` (its shard's inbox is full), and the visitor retries it
/// with the same cid; but nothing the gateway has taken on is lost: every
/// send is acked once with seq gap-free, and every message reaches the
/// agent once and in order per conversation.
fn full_inboxes_hold_messages_back_instead_of_dropping_them(w: Wire) {
    let env = [
        ("KEFU_SERVER_MAILBOX_CAPACITY", "4"),
        ("KEFU_LIMITS_MESSAGES_PER_S", "1000000"),
        ("KEFU_LIMITS_BURST", "1000000"),
    ];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        let mut a = agent(&gw, w, "steady", &[], 100).await;
        const VISITORS: usize = 8;
        const EACH: usize = 40;
        let mut visitors = Vec::new();
        for _ in 0..VISITORS {
            visitors.push(visitor(&gw, w).await);
        }
        // Per visitor: command id -> cid of what is in flight.
        let mut flights: Vec<std::collections::BTreeMap<i64, String>> = Vec::new();
        for (v, conv) in visitors.iter_mut() {
            let cids: Vec<String> = (1..=EACH).map(|i| format!("b{i}")).collect();
            let cmds = cids.iter().map(|c| json!({"type": "send", "conv": conv, "cid": c, "text": c}));
            let ids = v.send_batch(cmds.collect()).await;
            flights.push(ids.into_iter().zip(cids).collect());
        }
        let mut retries = 0;
        for ((v, conv), flight) in visitors.iter_mut().zip(&mut flights) {
            let mut acked = std::collections::BTreeMap::new();
            while acked.len() < EACH {
                let f = v.recv().await;
                let Some(cid) = f["id"].as_i64().and_then(|id| flight.remove(&id)) else { continue };
                match (f["type"].as_str(), f["code"].as_str()) {
                    (Some("ack"), _) => {
                        assert!(acked.insert(cid, f["seq"].as_u64().unwrap()).is_none(), "acked twice: {f}");
                    }
                    (Some("error"), Some("unavailable")) => {
                        retries += 1;
                        let id = v.send(json!({"type": "send", "conv": conv, "cid": cid, "text": cid})).await;
                        flight.insert(id, cid);
                    }
                    _ => panic!("{f}"),
                }
            }
            let mut seqs: Vec<u64> = acked.values().copied().collect();
            seqs.sort();
            assert_eq!(seqs, (1..=EACH as u64).collect::<Vec<_>>(), "gap-free, each once");
        }
        let mut last: std::collections::BTreeMap<String, u64> = Default::default();
        for _ in 0..VISITORS * EACH {
            let m = a.expect("msg").await;
            let seq = last.entry(m["conv"].as_str().unwrap().to_string()).or_default();
            assert_eq!(m["seq"].as_u64(), Some(*seq + 1), "in order per conversation: {m}");
            *seq += 1;
        }
        a.none_of("msg", Duration::from_millis(200)).await;
        eprintln!("{retries} sends were refused as unavailable and retried");
    });
}

over_both_subprotocols!(a_resume_past_its_cap_replays_the_newest_and_says_where_they_start);

/// With `messages.max_resume_messages` = 100, a visitor that missed 250
/// gets the newest 100 and `resumed {from: 151, to: 250}`; the rest is
/// there for `history`.
fn a_resume_past_its_cap_replays_the_newest_and_says_where_they_start(w: Wire) {
    let env = [
        ("KEFU_MESSAGES_MAX_RESUME_MESSAGES", "100"),
        ("KEFU_LIMITS_MESSAGES_PER_S", "1000000"),
        ("KEFU_LIMITS_BURST", "1000000"),
    ];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        let (mut a, (vid, key), conv) = visitor_away_from_agent(&gw, w, "talker").await;
        let cmds =
            (1..=250).map(|i| json!({"type": "send", "conv": conv, "cid": format!("m{i}"), "text": "x"}));
        let ids = a.send_batch(cmds.collect()).await;
        a.reply(*ids.last().unwrap()).await;
        let mut v = Client::open(&gw, w.visitors).await;
        let resume =
            json!({"type": "connect", "visitor_id": vid, "visitor_key": key, "resume": {conv.as_str(): 0}});
        let id = v.send(resume).await;
        assert_eq!(v.reply(id).await["type"], "connected");
        for seq in 151..=250 {
            let m = v.recv().await;
            assert_eq!((m["type"].as_str(), m["seq"].as_u64()), (Some("msg"), Some(seq)), "{m}");
        }
        let r = v.recv().await;
        assert_eq!(
            (r["type"].as_str(), r["from"].as_u64(), r["to"].as_u64()),
            (Some("resumed"), Some(151), Some(250))
        );
        let id = v.send(json!({"type": "history", "conv": conv, "before": 151, "limit": 200})).await;
        assert_eq!(v.reply(id).await["messages"].as_array().map(Vec::len), Some(150), "the rest, by history");
    });
}

over_both_subprotocols!(a_resume_of_big_attachments_stays_within_the_outbound_bound);

/// With a 1 MiB outbound bound, a backlog of 30 attachments of 64 KiB
/// (about 2.6 MB on the wire in JSON) is not replayed whole: the newest
/// that fit half the bound come, `resumed.from` says where they start, and
/// the connection stays open.
fn a_resume_of_big_attachments_stays_within_the_outbound_bound(w: Wire) {
    let env = [
        ("KEFU_LIMITS_OUTBOUND_QUEUE_BYTES", "1048576"),
        ("KEFU_LIMITS_MESSAGES_PER_S", "1000000"),
        ("KEFU_LIMITS_BURST", "1000000"),
    ];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        use base64::Engine;
        let (mut a, (vid, key), conv) = visitor_away_from_agent(&gw, w, "sender").await;
        let data = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 64 * 1024]);
        for i in 1..=30 {
            let cmd = json!({"type": "send", "conv": conv, "cid": format!("f{i}"), "attachment": {"mime": "application/octet-stream", "data": data}});
            let id = a.send(cmd).await;
            assert_eq!(a.reply(id).await["seq"], i);
        }
        let mut v = Client::open(&gw, w.visitors).await;
        let resume = json!({"type": "connect", "visitor_id": vid, "visitor_key": key, "resume": {conv.as_str(): 0}});
        let id = v.send(resume).await;
        assert_eq!(v.reply(id).await["type"], "connected");
        let mut seqs = Vec::new();
        let resumed = loop {
            let f = v.recv().await;
            match f["type"].as_str() {
                Some("msg") => seqs.push(f["seq"].as_u64().unwrap()),
                Some("resumed") => break f,
                _ => panic!("{}", f["type"]),
            }
        };
        let from = resumed["from"].as_u64().unwrap();
        assert!(from > 1 && from < 30, "some, not all: {resumed}");
        assert_eq!(seqs, (from..=30).collect::<Vec<_>>(), "the newest, in order");
        let id = v.send(json!({"type": "ping"})).await;
        assert_eq!(v.reply(id).await["type"], "pong", "still connected");
    });
}

impl Client {
    /// The next frame of `kind` about `conv`, asserting on the way that no
    /// frame is about `foreign` (a conversation this client has no part in).
    async fn expect_about(&mut self, kind: &str, conv: &str, foreign: &str) -> Value {
        loop {
            let v = self.recv().await;
            assert_ne!(v["conv"], foreign, "a frame of someone else's conversation: {v}");
            assert_ne!(v["type"], "error", "unexpected error while waiting for {kind}: {v}");
            if v["type"] == kind && v["conv"] == conv {
                return v;
            }
        }
    }

    /// Asserts that nothing about `foreign` arrives within `wait`.
    async fn nothing_about(&mut self, foreign: &str, wait: Duration) {
        self.each_for(wait, |v| {
            assert_ne!(v["conv"], foreign, "a frame of someone else's conversation: {v}")
        })
        .await;
    }
}

over_both_subprotocols!(an_agent_and_a_visitor_with_the_same_id_are_two_people, mixed = MIXED);

/// Agent `42` and visitor `42` (a token's `sub`) are two people: neither
/// sees any frame of the other's conversations, and in a conversation of
/// them both, the same cid from each is two messages (a user is (role, id)
/// in the directory, among recipients and in the durable dedupe index).
fn an_agent_and_a_visitor_with_the_same_id_are_two_people(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    rt().block_on(async {
        // Groups keep each agent away from the other's queue, so any frame
        // agent 42 gets of visitor 42's conversation is a leak.
        let mut agent42 = agent(&gw, w, "42", &["--group", "sales"], 5).await;
        let mut bob = agent(&gw, w, "bob", &["--group", "support"], 5).await;

        let token = gw.token("visitor", "42", &[]);
        let mut visitor42 = Client::open(&gw, w.visitors).await;
        let id = visitor42.send(json!({"type": "connect", "token": token})).await;
        let c = visitor42.reply(id).await;
        assert_eq!((c["role"].as_str(), c["user"]["id"].as_str()), (Some("visitor"), Some("42")), "{c}");
        assert_eq!(c["conversations"], json!([]), "agent 42's conversations are not visitor 42's: {c}");
        let id = visitor42.send(json!({"type": "open", "group": "support"})).await;
        let own = visitor42.reply(id).await["conv"].as_str().unwrap().to_string();
        let got = bob.expect_where("conversation", |c| c["status"] == "assigned").await;
        assert_eq!(got["conv"], own.as_str());

        // Another visitor's conversation goes to agent 42.
        let mut anon = Client::open(&gw, w.visitors).await;
        let id = anon.send(json!({"type": "connect"})).await;
        anon.reply(id).await;
        let id = anon.send(json!({"type": "open", "group": "sales"})).await;
        let theirs = anon.reply(id).await["conv"].as_str().unwrap().to_string();
        let got = agent42.expect_about("conversation", &theirs, &own).await;
        assert_eq!(
            (got["status"].as_str(), got["agent"]["id"].as_str()),
            (Some("assigned"), Some("42")),
            "{got}"
        );

        // Traffic of both conversations: msg, typing and read, each way.
        let id = anon.send(json!({"type": "send", "conv": theirs, "cid": "x", "text": "to agent 42"})).await;
        assert_eq!(anon.reply(id).await["type"], "ack");
        agent42.expect_about("msg", &theirs, &own).await;
        anon.send(json!({"type": "typing", "conv": theirs})).await;
        agent42.expect_about("typing", &theirs, &own).await;
        let id = agent42.send(json!({"type": "send", "conv": theirs, "cid": "x", "text": "hello"})).await;
        assert_eq!(agent42.reply(id).await["type"], "ack");
        agent42.send(json!({"type": "read", "conv": theirs, "seq": 1})).await;
        agent42.send(json!({"type": "typing", "conv": theirs})).await;
        // In causal order: the ack came after the fan-out.
        assert_eq!(anon.expect("msg").await["from"]["id"], "42");
        anon.expect("read").await;
        anon.expect("typing").await;

        let id = visitor42.send(json!({"type": "send", "conv": own, "cid": "y", "text": "to bob"})).await;
        assert_eq!(visitor42.reply(id).await["type"], "ack");
        visitor42.send(json!({"type": "typing", "conv": own})).await;
        bob.expect("msg").await;
        bob.expect("typing").await;
        let id = bob.send(json!({"type": "send", "conv": own, "cid": "y", "text": "hi"})).await;
        assert_eq!(bob.reply(id).await["type"], "ack");
        bob.send(json!({"type": "read", "conv": own, "seq": 1})).await;
        bob.send(json!({"type": "typing", "conv": own})).await;
        visitor42.expect_about("msg", &own, &theirs).await;
        visitor42.expect_about("read", &own, &theirs).await;
        visitor42.expect_about("typing", &own, &theirs).await;

        // A last message of each: once it has arrived, so has anything the
        // other conversation's traffic could have leaked before it.
        let id = anon.send(json!({"type": "send", "conv": theirs, "cid": "z", "text": "last"})).await;
        anon.reply(id).await;
        agent42.expect_about("msg", &theirs, &own).await;
        let id = bob.send(json!({"type": "send", "conv": own, "cid": "z", "text": "last"})).await;
        bob.reply(id).await;
        visitor42.expect_about("msg", &own, &theirs).await;
        agent42.nothing_about(&own, Duration::from_millis(200)).await;
        visitor42.nothing_about(&theirs, Duration::from_millis(200)).await;

        // Bob hands visitor 42's conversation to agent 42: now one
        // conversation has both, and each sends the same cid.
        let id = bob.send(json!({"type": "transfer", "conv": own, "to": "42"})).await;
        assert_eq!(bob.reply(id).await["agent"]["id"], "42");
        agent42.expect_where("conversation", |c| c["conv"] == own.as_str()).await;
        visitor42.expect_where("conversation", |c| c["agent"]["id"] == "42").await;
        // Each waits for the other's message before sending (a reply
        // skips the pushes before it). `duplicate` is left out when false.
        let id = visitor42
            .send(json!({"type": "send", "conv": own, "cid": "same", "text": "from visitor 42"}))
            .await;
        let first = visitor42.reply(id).await;
        assert_eq!((first["type"].as_str(), first["duplicate"].as_bool()), (Some("ack"), None), "{first}");
        let m = agent42.expect_where("msg", |m| m["conv"] == own.as_str()).await;
        assert_eq!((&m["seq"], m["from"]["role"].as_str()), (&first["seq"], Some("visitor")), "{m}");
        let id =
            agent42.send(json!({"type": "send", "conv": own, "cid": "same", "text": "from agent 42"})).await;
        let second = agent42.reply(id).await;
        assert_eq!((second["type"].as_str(), second["duplicate"].as_bool()), (Some("ack"), None), "{second}");
        assert_ne!(first["seq"], second["seq"], "two messages, not one: {first} {second}");
        let m = visitor42.expect("msg").await;
        assert_eq!((&m["seq"], m["from"]["role"].as_str()), (&second["seq"], Some("agent")), "{m}");
        // Each one's resend is answered with its own original.
        let id = visitor42.send(json!({"type": "send", "conv": own, "cid": "same", "text": "again"})).await;
        let again = visitor42.reply(id).await;
        assert_eq!(
            (again["seq"].clone(), again["duplicate"].as_bool()),
            (first["seq"].clone(), Some(true)),
            "{again}"
        );
        let id = agent42.send(json!({"type": "send", "conv": own, "cid": "same", "text": "again"})).await;
        let again = agent42.reply(id).await;
        assert_eq!(
            (again["seq"].clone(), again["duplicate"].as_bool()),
            (second["seq"].clone(), Some(true)),
            "{again}"
        );
        // Neither sees its own message twice.
        visitor42.none_of("msg", Duration::from_millis(150)).await;
        agent42.none_of("msg", Duration::from_millis(150)).await;
    });
}

#[test]
fn metrics_follow_a_chat() {
    let gw = Gateway::start(&["--shards", "2"], &[]);
    let token = gw.token("agent", "a1", &["--name", "Alice"]);
    let before = gw.admin_get("/metrics");
    for family in [
        "kefu_connections_by_role",
        "kefu_chat_messages_in_total",
        "kefu_chat_messages_out_total",
        "kefu_conversations_abandoned_total",
        "kefu_errors_total",
        "kefu_closes_total",
        "kefu_ack_latency_seconds",
        "kefu_delivery_latency_seconds",
        "kefu_storage_batch_records",
        "kefu_storage_commit_seconds",
        "kefu_storage_fsync_seconds",
        "kefu_storage_checkpoint_seconds",
        "kefu_events_head_offset",
        "kefu_events_subscriber_lag_events",
    ] {
        assert!(before.contains(&format!("# TYPE {family} ")), "{family} missing: {before}");
    }
    assert_eq!(common::sample(&before, "kefu_ack_latency_seconds_count", &[]), 0.0);
    rt().block_on(async {
        let mut agent = Client::open(&gw, Codec::Json).await;
        let id = agent.send(json!({"type": "connect", "token": token})).await;
        assert_eq!(agent.reply(id).await["type"], "connected");
        let id = agent.send(json!({"type": "presence", "status": "online"})).await;
        agent.reply(id).await;
        let mut visitor = Client::open(&gw, Codec::Json).await;
        let id = visitor.send(json!({"type": "connect"})).await;
        assert_eq!(visitor.reply(id).await["type"], "connected");
        let id = visitor.send(json!({"type": "open"})).await;
        let conv = visitor.reply(id).await["conv"].as_str().unwrap().to_string();
        agent.expect("conversation").await;
        for i in 0..3 {
            let id = visitor
                .send(json!({"type": "send", "conv": conv, "cid": format!("v{i}"), "text": "hi"}))
                .await;
            assert_eq!(visitor.reply(id).await["type"], "ack");
            agent.expect("msg").await;
        }
        let id = agent.send(json!({"type": "send", "conv": conv, "cid": "a0", "text": "hello"})).await;
        assert_eq!(agent.reply(id).await["type"], "ack");
        visitor.expect("msg").await;
        // A command without its conversation: bad_command.
        let id = visitor.send(json!({"type": "send", "cid": "x", "text": "hi"})).await;
        assert_eq!(visitor.reply(id).await["code"], "bad_command");

        let metrics = gw.admin_get("/metrics");
        let role =
            |r: &str| common::sample(&metrics, "kefu_connections_by_role", &[&format!("role=\"{r}\"")]);
        assert_eq!((role("visitor"), role("agent"), role("none")), (1.0, 1.0, 0.0), "{metrics}");
        // The send that did not decode is an error, not a message.
        assert_eq!(common::sample(&metrics, "kefu_chat_messages_in_total", &[]), 4.0, "{metrics}");
        assert_eq!(common::sample(&metrics, "kefu_chat_messages_out_total", &[]), 4.0, "{metrics}");
        assert_eq!(common::sample(&metrics, "kefu_ack_latency_seconds_count", &[]), 4.0, "{metrics}");
        assert_eq!(common::sample(&metrics, "kefu_delivery_latency_seconds_count", &[]), 4.0, "{metrics}");
        let inf = common::sample(&metrics, "kefu_delivery_latency_seconds_bucket", &["le=\"+Inf\""]);
        assert_eq!(inf, 4.0, "{metrics}");
        assert_eq!(
            common::sample(&metrics, "kefu_errors_total", &["code=\"bad_command\""]),
            1.0,
            "{metrics}"
        );
        for h in ["kefu_storage_batch_records", "kefu_storage_commit_seconds", "kefu_storage_fsync_seconds"] {
            assert!(common::sample(&metrics, &format!("{h}_count"), &[]) >= 4.0, "{h}: {metrics}");
        }
        assert!(common::sample(&metrics, "kefu_storage_fsync_seconds_sum", &[]) > 0.0, "{metrics}");
        common::promtool_check(&metrics);
        // The write-ahead log's checkpoint follows within checkpoint_ms.
        let mut checkpoints = 0.0;
        for _ in 0..100 {
            let metrics = gw.admin_get("/metrics");
            checkpoints = common::sample(&metrics, "kefu_storage_checkpoint_seconds_count", &[]);
            if checkpoints >= 1.0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(checkpoints >= 1.0, "no checkpoint reported");

        // A refused identity: error unauthorized, closed by the server with 4500.
        let mut stranger = Client::open(&gw, Codec::Json).await;
        let id = stranger.send(json!({"type": "connect", "token": "not-a-jwt"})).await;
        assert_eq!(stranger.reply(id).await["code"], "unauthorized");
        assert_eq!(stranger.recv().await["code"], 4500);
        // The visitor leaves with 1000.
        visitor.ws.close(None).await.unwrap();
    });
    let metrics = common::metrics_until(&gw, "the visitor's close counted and its session gone", |m| {
        common::sample(m, "kefu_closes_total", &["by=\"client\""]) >= 1.0
            && common::sample(m, "kefu_connections_by_role", &["role=\"visitor\""]) == 0.0
    });
    assert_eq!(common::sample(&metrics, "kefu_errors_total", &["code=\"unauthorized\""]), 1.0, "{metrics}");
    let server = |code: &str| {
        common::sample(&metrics, "kefu_closes_total", &["by=\"server\"", &format!("code=\"{code}\"")])
    };
    assert_eq!(server("4500"), 1.0, "{metrics}");
}

over_both_subprotocols!(a_session_ends_when_its_token_expires);

/// A session does not outlive its token: at `exp` (plus the leeway, here
/// 0) the gateway says why and closes 4003, with no command from the
/// client to trigger it; reconnecting with the same token is refused.
fn a_session_ends_when_its_token_expires(w: Wire) {
    let gw = Gateway::start(&["--shards", "2"], &[("KEFU_AUTH_EXP_LEEWAY_S", "0")]);
    let token = gw.token("agent", "a1", &["--ttl-s", "2"]);
    rt().block_on(async {
        let mut agent = Client::open(&gw, w.agents).await;
        let id = agent.send(json!({"type": "connect", "token": token})).await;
        assert_eq!(agent.reply(id).await["type"], "connected");
        let started = std::time::Instant::now();
        let e = agent.expect("error").await;
        assert_eq!(
            (e["code"].as_str(), e["message"].as_str()),
            (Some("unauthorized"), Some("token expired")),
            "{e}"
        );
        assert!(e.get("id").is_none_or(Value::is_null), "it answers no command: {e}");
        assert_eq!(agent.expect("_close").await["code"], 4003);
        assert!(started.elapsed() < Duration::from_secs(4), "cut at exp, not later: {:?}", started.elapsed());

        let mut again = Client::open(&gw, w.agents).await;
        let id = again.send(json!({"type": "connect", "token": token})).await;
        assert_eq!(again.reply(id).await["code"], "unauthorized");
        assert_eq!(again.expect("_close").await["code"], 4500);
    });
}

/// A refused or undecodable `connect` is answered with its own `id`, so a
/// client can tell which attempt failed; one that does not decode leaves
/// the connection open for a corrected `connect`.
#[test]
fn a_failed_connect_is_answered_with_its_id() {
    let gw = Gateway::start(&["--shards", "1"], &[]);
    rt().block_on(async {
        let mut c = Client::open(&gw, Codec::Json).await;
        c.send_raw(Message::text(r#"{"type":"connect","id":5,"token":123}"#)).await;
        let e = c.recv().await;
        assert_eq!((e["id"].as_i64(), e["code"].as_str()), (Some(5), Some("bad_command")), "{e}");
        let id = c.send(json!({"type": "connect"})).await;
        assert_eq!(c.reply(id).await["type"], "connected");

        let mut c = Client::open(&gw, Codec::Json).await;
        c.send_raw(Message::text(r#"{"type":"connect","id":6,"token":"abc"}"#)).await;
        let e = c.recv().await;
        assert_eq!((e["id"].as_i64(), e["code"].as_str()), (Some(6), Some("unauthorized")), "{e}");
        assert_eq!(c.expect("_close").await["code"], 4500);
    });
}

/// Issue 10, item 2: a visitor who opens and goes (a closed tab, a script)
/// does not hold a place in the queue for good. Their conversation is
/// closed as abandoned once `routing.abandon_after_s` passes with no
/// session of theirs, the agents serving the queue see it go, and
/// `/metrics` counts it; a visitor who comes back in time keeps their place.
#[test]
fn a_waiting_visitor_who_stays_gone_is_closed_as_abandoned() {
    let env = [("KEFU_ROUTING_AUTO_ASSIGN", "false"), ("KEFU_ROUTING_ABANDON_AFTER_S", "1")];
    let gw = Gateway::start(&["--shards", "2"], &env);
    rt().block_on(async {
        let mut ann = agent(&gw, JSON, "ann", &[], 5).await;
        let (gone, gone_conv) = visitor(&gw, JSON).await;
        let (mut stays, stays_conv) = visitor(&gw, JSON).await;
        for conv in [&gone_conv, &stays_conv] {
            ann.expect_where("conversation", |c| c["conv"] == conv.as_str() && c["status"] == "queued").await;
        }
        drop(gone);
        let closed = ann.expect_where("conversation", |c| c["conv"] == gone_conv.as_str()).await;
        assert_eq!(closed["status"], "closed", "{closed}");
        // The one who stayed moved up.
        stays.expect_where("conversation", |c| c["queue_position"] == 1).await;
        let id = stays.send(json!({"type": "open"})).await;
        let still = stays.reply(id).await;
        assert_eq!(
            (still["conv"].as_str(), still["status"].as_str()),
            (Some(stays_conv.as_str()), Some("queued"))
        );
    });
    let metrics = common::metrics_until(&gw, "the abandon counted", |m| {
        common::sample(m, "kefu_conversations_abandoned_total", &[]) >= 1.0
    });
    assert_eq!(common::sample(&metrics, "kefu_conversations_abandoned_total", &[]), 1.0, "{metrics}");
}

/// An agent that stops reading is cut as a slow consumer (4001) once its
/// outbound queue overflows, and the cut is counted, promptly: the
/// connection's task is then waiting on a write to the full socket, and
/// used to stay there until the sweep's close timeout, uncounted. Whether
/// bytes move by system calls (which hand a full socket to the ring) or by
/// the ring alone.
#[test]
fn a_reader_that_stops_is_cut_and_counted_as_a_slow_consumer() {
    for mode in common::SOCKET_MODES {
        a_reader_that_stops_is_cut(mode);
    }
}

fn a_reader_that_stops_is_cut(mode: &str) {
    let [socket_io, poll, accept] = common::socket_mode_env(mode);
    let env = [
        ("KEFU_LIMITS_MESSAGES_PER_S", "1000000"),
        ("KEFU_LIMITS_BURST", "1000000"),
        ("KEFU_LIMITS_OUTBOUND_QUEUE_FRAMES", "32"),
        ("KEFU_SERVER_CLOSE_TIMEOUT_MS", "60000"),
        socket_io,
        poll,
        accept,
    ];
    let gw = Gateway::start(&["--shards", "1"], &env);
    let started = std::time::Instant::now();
    rt().block_on(async {
        // Once assigned, the agent's client is never polled again: its
        // socket fills.
        let mut stalled = agent(&gw, JSON, "stalled", &[], 5).await;
        let (mut v, conv) = visitor(&gw, JSON).await;
        stalled.expect_where("conversation", |c| c["status"] == "assigned").await;
        let text = "x".repeat(16 * 1024 - 64);
        for i in 0..2_000 {
            let id =
                v.send(json!({"type": "send", "conv": conv, "cid": format!("c{i}"), "text": text})).await;
            assert_eq!(v.reply(id).await["type"], "ack");
            let m = gw.admin_get("/metrics");
            if common::sample(&m, "kefu_slow_consumer_closes_total", &[]) >= 1.0 {
                break;
            }
        }
    });
    let m = common::metrics_until(&gw, "the slow consumer counted", |m| {
        common::sample(m, "kefu_slow_consumer_closes_total", &[]) >= 1.0
    });
    assert_eq!(common::sample(&m, "kefu_closes_total", &["by=\"server\"", "code=\"4001\""]), 1.0, "{m}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "{mode}: cut at the overflow, not at the close timeout"
    );
    // The system call met the full socket and left the write to the ring.
    let full = common::sample(&m, "kefu_full_socket_writes_total", &[]);
    match mode {
        "ring" => assert_eq!(full, 0.0, "{m}"),
        _ => assert!(full >= 1.0, "{mode}: {m}"),
    }
}
