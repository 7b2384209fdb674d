//! Two shards' chat services driven by hand, one message at a time, so
//! that an interleaving of their inbox loops (full inboxes included) can be
//! replayed exactly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kefu_core::CoreConfig;
use kefu_core::auth::{Claims, JwtKey};
use kefu_proto::client::Codec;
use kefu_proto::{ConvId, Role};
use kefu_storage::{Store, StoreConfig};
use serde_json::{Value, json};

use super::service::{ChatInit, ChatService, Local};
use super::{SessionAddr, ShardMsg};
use crate::mailbox::Mailbox;

const SECRET: &str = "chat-tests-secret";
const SHARDS: usize = 2;
const INBOX: usize = 4;

struct Cluster {
    _dir: tempfile::TempDir,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    shards: Vec<ChatService>,
    core: Arc<CoreConfig>,
    /// What each connection got, as JSON.
    out: HashMap<SessionAddr, Vec<Value>>,
    next_slot: u32,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { dir: dir.path().to_path_buf(), sources: SHARDS, ..StoreConfig::default() };
        let (store, recovery) = Store::open(config, Arc::new(|_| {})).unwrap();
        let store = Arc::new(store);
        let mailboxes: Arc<[Mailbox<ShardMsg>]> =
            (0..SHARDS).map(|_| Mailbox::new(INBOX).unwrap()).collect::<Vec<_>>().into();
        let core = Arc::new(CoreConfig::default());
        let mut restores = crate::chat::service::restore_open(
            &store.reader(),
            recovery.open_conversations,
            recovery.next_conv_id,
            &core,
            SHARDS,
        )
        .unwrap();
        let shards = (0..SHARDS)
            .map(|shard| {
                ChatService::new(ChatInit {
                    shard,
                    mailboxes: mailboxes.clone(),
                    core: core.clone(),
                    jwt_secret: SECRET.into(),
                    allow_anonymous: true,
                    heartbeat_s: 30,
                    store: store.clone(),
                    held_frames_max: 512,
                    replay_bytes_max: 24 << 20,
                    restore: std::mem::take(&mut restores[shard]),
                })
                .unwrap()
            })
            .collect();
        Cluster { _dir: dir, mailboxes, shards, core, out: HashMap::new(), next_slot: 1 }
    }

    fn token(&self, role: Role, sub: &str) -> String {
        let key = JwtKey::new(SECRET.as_bytes(), self.core.auth.clone()).unwrap();
        let exp = super::service::now_ms() / 1000 + 3600;
        key.sign(&Claims {
            sub: sub.into(),
            role,
            name: None,
            groups: Vec::new(),
            meta: Default::default(),
            exp,
            nbf: None,
        })
    }

    /// A new connection on `shard`.
    fn conn(&mut self, shard: u16) -> SessionAddr {
        self.next_slot += 1;
        SessionAddr { shard, slot: self.next_slot, generation: 1 }
    }

    /// The connection's command `v` (with `id`), as its shard's chat service
    /// takes it from the inbox.
    fn command(&mut self, from: SessionAddr, v: Value) {
        let frame = Codec::Json.decode_client(v.to_string().as_bytes()).unwrap();
        self.shards[from.shard as usize].handle(ShardMsg::Frame { from, codec: Codec::Json, frame });
        self.flush(from.shard as usize);
    }

    /// Writes what shard `i` produced for its own connections.
    fn flush(&mut self, i: usize) {
        let local: Vec<Local> = self.shards[i].take_local().collect();
        for l in local {
            if let Local::Deliver(to, bytes, _) = l {
                self.record(to, &bytes);
            }
        }
    }

    fn record(&mut self, to: SessionAddr, bytes: &[u8]) {
        let got = self.out.entry(to).or_default();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (len, at) = match rest[1] & 0x7F {
                126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
                127 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            got.push(serde_json::from_slice(&rest[at..at + len]).unwrap());
            rest = &rest[at + len..];
        }
    }

    /// One step of shard `i`'s inbox loop: the next message in its inbox.
    /// False if the inbox was empty.
    fn step(&mut self, i: usize) -> bool {
        let Some(msg) = self.mailboxes[i].try_recv() else { return false };
        match msg {
            ShardMsg::Deliver { to, bytes, .. } => {
                if let Some(bytes) = self.shards[i].pass(to, bytes) {
                    self.record(to, &bytes);
                }
            }
            ShardMsg::Close { .. } => {}
            other => self.shards[i].handle(other),
        }
        self.flush(i);
        true
    }

    /// The rest of shard `i`'s loop iteration: completions, then backlog.
    fn end_of_batch(&mut self, i: usize) {
        self.shards[i].poll_completions();
        self.flush(i);
        self.shards[i].retry_backlog();
    }

    /// Runs every shard's loop until nothing moves, waiting for storage.
    fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut idle_since = Instant::now();
        while Instant::now() < deadline {
            let mut moved = false;
            for i in 0..SHARDS {
                while self.step(i) {
                    moved = true;
                }
                self.end_of_batch(i);
            }
            if moved || self.shards.iter().any(|s| s.has_completions()) {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > Duration::from_millis(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the shards never settled");
    }

    /// A message that changes nothing, to fill an inbox with.
    fn filler(&mut self, i: usize) {
        let nobody = SessionAddr { shard: i as u16, slot: u32::MAX, generation: 0 };
        self.mailboxes[i].send(ShardMsg::Gone { from: nobody }).unwrap();
    }

    fn fill(&mut self, i: usize) {
        while self.mailboxes[i].len() < INBOX {
            self.filler(i);
        }
    }

    /// The reply to command `id` on `addr`.
    fn reply(&self, addr: SessionAddr, id: i64) -> &Value {
        let got = self.out.get(&addr).map(Vec::as_slice).unwrap_or_default();
        got.iter().find(|v| v["id"] == json!(id)).unwrap_or_else(|| panic!("no reply to {id}: {got:?}"))
    }

    /// A visitor connected on shard `edge` with an open conversation homed
    /// on shard `home`.
    fn visitor(&mut self, edge: u16, home: usize) -> (SessionAddr, ConvId) {
        let (addr, conv, _) = self.visitor_named(edge, home);
        (addr, conv)
    }

    /// [`Self::visitor`], with its token's `sub`.
    fn visitor_named(&mut self, edge: u16, home: usize) -> (SessionAddr, ConvId, String) {
        for n in 0.. {
            let addr = self.conn(edge);
            let sub = format!("v{n}");
            let token = self.token(Role::Visitor, &sub);
            self.command(addr, json!({"type": "connect", "id": 1, "token": token}));
            self.settle();
            assert_eq!(self.reply(addr, 1)["type"], "connected");
            self.command(addr, json!({"type": "open", "id": 2}));
            self.settle();
            let conv = self.reply(addr, 2)["conv"].as_str().unwrap().to_string();
            let conv = ConvId(conv[1..].parse().unwrap());
            if conv.home(SHARDS) == home {
                return (addr, conv, sub);
            }
        }
        unreachable!()
    }
}

/// A send relayed through the router (it came right behind a routing
/// command) waits in the router's backlog when the home's inbox is full;
/// the edge, told `Routed`, sends the next one straight to the home, which
/// must still store them in the order the client sent them.
#[test]
fn a_relayed_send_is_not_overtaken_by_a_later_direct_one() {
    let mut c = Cluster::new();
    // Edge on shard 1; router and home on shard 0.
    let (v, conv) = c.visitor(1, 0);
    let conv = conv.to_string();
    c.command(v, json!({"type": "open", "id": 10}));
    c.command(v, json!({"type": "send", "id": 11, "conv": conv, "cid": "a", "text": "first"}));
    // Shard 0 handles the open (its answer goes to its own inbox) ...
    assert!(c.step(0));
    // ... then the relayed send, while shard 1 has filled its inbox again.
    let relay = c.mailboxes[0].try_recv().unwrap();
    c.fill(0);
    c.shards[0].handle(relay);
    c.flush(0);
    // Shard 1 hears `Routed` (twice) and the client's next send goes out.
    while c.step(1) {}
    // Shard 0's loop goes on draining its inbox, so there is room.
    assert!(c.step(0));
    c.command(v, json!({"type": "send", "id": 12, "conv": conv, "cid": "b", "text": "second"}));
    c.end_of_batch(1);
    c.settle();
    let (a, b) = (c.reply(v, 11).clone(), c.reply(v, 12).clone());
    assert_eq!((a["type"].as_str(), b["type"].as_str()), (Some("ack"), Some("ack")), "{a} {b}");
    assert!(a["seq"].as_u64() < b["seq"].as_u64(), "sent a then b, stored b first: {a} {b}");
}

/// A send that waits in the edge's backlog (its own inbox, the home's, was
/// full) must not be overtaken by a `close` sent after it: the router's
/// decision reaches the home directly.
#[test]
fn a_direct_send_is_not_overtaken_by_a_later_close() {
    let mut c = Cluster::new();
    // Edge and home on shard 1, router on shard 0.
    let (v, conv) = c.visitor(1, 1);
    let conv = conv.to_string();
    c.fill(1);
    c.command(v, json!({"type": "send", "id": 11, "conv": conv, "cid": "a", "text": "before close"}));
    c.command(v, json!({"type": "close", "id": 12, "conv": conv}));
    // The router decides (shard 1's inbox has room again, as shard 1 drains it).
    while c.step(1) {}
    while c.step(0) {}
    c.end_of_batch(0);
    c.settle();
    let (send, close) = (c.reply(v, 11).clone(), c.reply(v, 12).clone());
    assert_eq!(close["status"], "closed", "{close}");
    assert_eq!(send["type"], "ack", "sent before the close: {send}");
}

/// A conversation closed between the router's answer to a `connect` (it
/// was open) and `connected` (storage says closed) is listed once.
#[test]
fn connected_lists_a_conversation_closed_meanwhile_once() {
    let mut c = Cluster::new();
    // First tab on shard 0, with the home; the second tab on shard 1.
    let (tab1, conv, sub) = c.visitor_named(0, 0);
    let tab2 = c.conn(1);
    let token = c.token(Role::Visitor, &sub);
    c.command(tab2, json!({"type": "connect", "id": 1, "token": token}));
    assert!(c.step(0), "SessionUp");
    assert!(c.step(0), "Hello");
    assert!(c.step(1), "SessionUp");
    // The router's Welcome waits in shard 1's inbox while the first tab
    // closes the conversation.
    let welcome = c.mailboxes[1].try_recv().unwrap();
    c.command(tab1, json!({"type": "close", "id": 3, "conv": conv.to_string()}));
    c.settle();
    assert_eq!(c.reply(tab1, 3)["status"], "closed");
    c.shards[1].handle(welcome);
    c.flush(1);
    let listed = c.reply(tab2, 1)["conversations"].as_array().unwrap().clone();
    let mine: Vec<&Value> = listed.iter().filter(|s| s["conv"] == json!(conv.to_string())).collect();
    assert_eq!(mine.len(), 1, "{listed:?}");
}
