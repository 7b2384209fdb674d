//! Two shards' chat services driven by hand, one message at a time, so
//! that an interleaving of their inbox loops (full inboxes included) can be
//! replayed exactly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kefu_core::CoreConfig;
use kefu_core::auth::{Claims, JwtKey};
use kefu_proto::client::{Codec, Command};
use kefu_proto::{ConvId, Role};
use kefu_storage::{Store, StoreConfig};
use serde_json::{Value, json};

use super::api::{Answer, Calls, ChatApi, HookSink};
use super::service::{ChatInit, ChatService, Local};
use super::{ChatMsg, SessionAddr, ShardMsg};
use crate::mailbox::Mailbox;
use crate::metrics::ShardStats;
use kefu_core::chat::hooks::{Admission, HookCall, Verdict};

const SECRET: &str = "chat-tests-secret";
const SHARDS: usize = 2;
const INBOX: usize = 4;
/// Large enough that only the overflow test reaches it.
const BACKLOG: usize = 1024;

struct Cluster {
    _dir: tempfile::TempDir,
    /// The chat service as the bridge calls it.
    api: ChatApi,
    mailboxes: Arc<[Mailbox<ShardMsg>]>,
    shards: Vec<ChatService>,
    core: Arc<CoreConfig>,
    /// What each connection got, as JSON.
    stats: Arc<[ShardStats]>,
    out: HashMap<SessionAddr, Vec<Value>>,
    /// Connections closed, with the code.
    closed: Vec<(SessionAddr, u16)>,
    next_slot: u32,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_backlog(BACKLOG)
    }

    fn with_backlog(backlog_max: usize) -> Cluster {
        Cluster::with(backlog_max, CoreConfig::default(), None)
    }

    fn with(backlog_max: usize, core: CoreConfig, hooks: Option<Arc<dyn HookSink>>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { dir: dir.path().to_path_buf(), sources: SHARDS, ..StoreConfig::default() };
        let (store, recovery) = Store::open(config, Arc::new(|_| {})).unwrap();
        let store = Arc::new(store);
        let mailboxes: Arc<[Mailbox<ShardMsg>]> =
            (0..SHARDS).map(|_| Mailbox::new(INBOX, SHARDS + 1).unwrap()).collect::<Vec<_>>().into();
        let core = Arc::new(core);
        let stats: Arc<[ShardStats]> = (0..SHARDS).map(|_| ShardStats::new(0)).collect();
        let calls = Arc::new(Calls::new(8));
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
                    stats: stats.clone(),
                    backlog_max,
                    calls: calls.clone(),
                    hooks: hooks.clone(),
                    anonymous_per_ip: None,
                    attachment_budgets: None,
                })
                .unwrap()
            })
            .collect();
        Cluster {
            _dir: dir,
            api: ChatApi::new(core.clone(), mailboxes.clone(), calls),
            mailboxes,
            shards,
            core,
            stats,
            out: HashMap::new(),
            closed: Vec::new(),
            next_slot: 1,
        }
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

    /// The connection's command `v` (with `id`), as its task hands it to
    /// its shard's chat service.
    fn command(&mut self, from: SessionAddr, v: Value) {
        let frame = Codec::Json.decode_client(v.to_string().as_bytes()).unwrap();
        self.shards[from.shard as usize].frame(from, None, Codec::Json, frame);
        self.flush(from.shard as usize);
    }

    /// Writes what shard `i` produced for its own connections.
    fn flush(&mut self, i: usize) {
        let local: Vec<Local> = self.shards[i].take_local().collect();
        for l in local {
            match l {
                Local::Deliver(to, bytes, _) => self.record(to, &bytes),
                Local::Close(to, code, _) => self.closed.push((to, code)),
                Local::Spare(_) => {}
            }
        }
    }

    fn record(&mut self, to: SessionAddr, bytes: &[u8]) {
        let got = self.out.entry(to).or_default();
        got.extend(kefu_proto::ws::payloads(bytes).map(|p| serde_json::from_slice::<Value>(p).unwrap()));
    }

    /// One step of shard `i`'s inbox loop: the next message in its inbox.
    /// False if the inbox was empty.
    fn step(&mut self, i: usize) -> bool {
        let Some(msg) = self.mailboxes[i].try_recv() else { return false };
        self.shards[i].handle(msg);
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
            if moved || self.shards.iter().any(|s| s.has_completions() || s.has_writes_in_flight()) {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > Duration::from_millis(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the shards never settled");
    }

    /// A message that changes nothing, to fill an inbox with (from the
    /// other shard: a shard never posts to itself).
    fn filler(&mut self, i: usize) {
        let nobody = SessionAddr { shard: i as u16, slot: u32::MAX, generation: 0 };
        let msg = ShardMsg::Chat(Box::new(ChatMsg::Routed { addr: nobody }));
        self.mailboxes[i].send(1 - i, msg).unwrap();
    }

    fn fill(&mut self, i: usize) {
        while self.mailboxes[i].len() < INBOX {
            self.filler(i);
        }
    }

    /// An agent connected on shard `edge`, online with room for many.
    fn agent(&mut self, edge: u16, sub: &str) -> SessionAddr {
        let addr = self.conn(edge);
        let token = self.token(Role::Agent, sub);
        self.command(addr, json!({"type": "connect", "id": 1, "token": token}));
        self.command(addr, json!({"type": "presence", "id": 2, "status": "online", "capacity": 100}));
        self.settle();
        assert_eq!(self.reply(addr, 2)["status"], "online");
        addr
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
            let sub = format!("v{n}-{}", self.next_slot);
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
/// the `Routed` that lets the edge go straight to the home again waits
/// behind it, so a later send cannot overtake it.
#[test]
fn a_relayed_send_is_not_overtaken_by_a_later_direct_one() {
    let mut c = Cluster::new();
    // Edge and home on shard 1; the router on shard 0.
    let (v, conv) = c.visitor(1, 1);
    let conv = conv.to_string();
    c.command(v, json!({"type": "open", "id": 10}));
    c.command(v, json!({"type": "send", "id": 11, "conv": conv, "cid": "a", "text": "first"}));
    // The router handles the open, then the relayed send while the home's
    // inbox is full: the send and its `Routed` wait in its backlog.
    assert!(c.step(0));
    c.fill(1);
    assert!(c.step(0));
    // The edge's next send, before shard 1 drained anything.
    c.command(v, json!({"type": "send", "id": 12, "conv": conv, "cid": "b", "text": "second"}));
    c.settle();
    let (a, b) = (c.reply(v, 11).clone(), c.reply(v, 12).clone());
    assert_eq!((a["type"].as_str(), b["type"].as_str()), (Some("ack"), Some("ack")), "{a} {b}");
    assert!(a["seq"].as_u64() < b["seq"].as_u64(), "sent a then b, stored b first: {a} {b}");
}

/// A send that waits in the edge's backlog (the home's inbox was full)
/// must not be overtaken by a `close` sent after it, which the router on
/// the edge's own shard decides at once: its decision waits behind the send.
#[test]
fn a_direct_send_is_not_overtaken_by_a_later_close() {
    let mut c = Cluster::new();
    // Edge and router on shard 0, home on shard 1.
    let (v, conv) = c.visitor(0, 1);
    let conv = conv.to_string();
    c.fill(1);
    c.command(v, json!({"type": "send", "id": 11, "conv": conv, "cid": "a", "text": "before close"}));
    c.command(v, json!({"type": "close", "id": 12, "conv": conv}));
    c.settle();
    let (send, close) = (c.reply(v, 11).clone(), c.reply(v, 12).clone());
    assert_eq!(close["status"], "closed", "{close}");
    assert_eq!(send["type"], "ack", "sent before the close: {send}");
}

/// Nothing a shard does for itself goes through its own inbox: a whole
/// conversation (connect, open, assign, send, read, typing, close) with
/// every part on one shard posts nothing, and across shards each inbox is
/// fed by the other shard only.
#[test]
fn a_shard_never_posts_to_itself() {
    let mut c = Cluster::new();
    let agent = c.agent(0, "a1");
    for (edge, home) in [(0, 0), (1, 1), (0, 1), (1, 0)] {
        let (v, conv) = c.visitor(edge, home);
        let conv = conv.to_string();
        c.command(v, json!({"type": "send", "id": 5, "conv": conv, "cid": "x", "text": "hi"}));
        c.command(agent, json!({"type": "send", "id": 6, "conv": conv, "cid": "y", "text": "hello"}));
        c.settle();
        c.command(v, json!({"type": "read", "id": 7, "conv": conv, "seq": 2}));
        c.command(v, json!({"type": "typing", "id": 8, "conv": conv}));
        // Commands of different clients have no order between them: the
        // close waits until the rest is answered.
        c.settle();
        c.command(agent, json!({"type": "close", "id": 9, "conv": conv}));
        c.settle();
        assert_eq!(c.reply(v, 5)["type"], "ack", "{edge}->{home} {conv}: {:?}", c.out.get(&v));
        assert_eq!(c.reply(agent, 6)["type"], "ack", "{}", c.reply(agent, 6));
        assert_eq!(c.reply(agent, 9)["status"], "closed", "{}", c.reply(agent, 9));
    }
    for i in 0..SHARDS {
        assert_eq!(c.mailboxes[i].posts_from(i), 0, "shard {i} posted to itself");
        assert!(c.mailboxes[i].posts_from(1 - i) > 0, "shard {i} heard nothing from the other");
    }
}

/// With the backlog full, nothing is dropped unaccounted: a command is
/// answered `unavailable`, a frame closes its connection with 4001 after
/// the frames before it (the client resumes), and both are counted.
#[test]
fn a_full_backlog_refuses_commands_and_cuts_frames() {
    let mut c = Cluster::with_backlog(2);
    // The agent and the visitor's edge on shard 0, the home on shard 1;
    // another visitor on shard 1.
    let agent = c.agent(0, "a1");
    let (v, conv) = c.visitor(0, 1);
    let (w, _) = c.visitor(1, 1);
    let conv = conv.to_string();
    // Shard 0's inbox is full: the home's acks and fan-out for it wait in
    // shard 1's backlog, then are cut.
    c.fill(0);
    for n in 0..3 {
        let cid = format!("m{n}");
        c.command(v, json!({"type": "send", "id": 10 + n, "conv": conv, "cid": cid, "text": "hi"}));
        while c.step(1) {}
        c.end_of_batch(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.shards[1].has_writes_in_flight() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            c.end_of_batch(1);
        }
    }
    assert!(c.stats[1].frames_cut.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // A command for the router on shard 0 is refused while the backlog is full.
    c.command(w, json!({"type": "open", "id": 20}));
    assert_eq!(c.reply(w, 20)["code"], "unavailable", "{}", c.reply(w, 20));
    assert!(c.stats[1].posts_refused.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // Once shard 0 drains, what was kept arrives, then both are closed to resume.
    c.settle();
    for addr in [agent, v] {
        assert!(c.closed.contains(&(addr, crate::ws::close::SLOW_CONSUMER)), "{addr:?} {:?}", c.closed);
    }
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

/// With the backlog full, a decision the router has already applied (a
/// close here) still reaches the conversation's home, which answers it:
/// refusing it would leave the router and the home disagreeing for good.
#[test]
fn a_full_backlog_keeps_the_routers_decisions() {
    let mut c = Cluster::with_backlog(2);
    // The router on shard 0; the agent's edge and the home on shard 1; the
    // visitor's edge on shard 0.
    let agent = c.agent(1, "a1");
    let (v, conv) = c.visitor(0, 1);
    let conv = conv.to_string();
    // Shard 1's inbox is full, and shard 0's backlog fills up to its bound
    // with the visitor's commands for the home.
    c.fill(1);
    for n in 0..3 {
        c.command(v, json!({"type": "typing", "id": 30 + n, "conv": conv}));
    }
    assert_eq!(c.reply(v, 32)["code"], "unavailable", "the third waits past the bound");
    // The agent closes: its edge reaches the router, whose decision must
    // not be refused on its way to the home.
    c.command(agent, json!({"type": "close", "id": 40, "conv": conv}));
    assert!(c.step(0), "the close reaches the router");
    c.settle();
    assert_eq!(c.reply(agent, 40)["status"], "closed", "{}", c.reply(agent, 40));
    c.command(v, json!({"type": "send", "id": 41, "conv": conv, "cid": "late", "text": "hi"}));
    c.settle();
    assert_eq!(c.reply(v, 41)["code"], "conflict", "the home closed it too: {}", c.reply(v, 41));
}

/// A business system's call is a command from its bot, answered with the
/// one frame a connection would get, after the same rules: a message is
/// acked once durable, delivered to the participants as `bot`, idempotent
/// by cid; a close reaches the participants; a full inbox refuses the call
/// at once.
#[test]
fn the_business_system_calls_the_chat_service_like_a_client() {
    let mut c = Cluster::new();
    let agent = c.agent(0, "a1");
    let (v, conv) = c.visitor(0, 1);
    c.settle();
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let call = |c: &mut Cluster, command: Value| {
        let sink = answers.clone();
        let command = Codec::Json.decode_client(command.to_string().as_bytes()).unwrap().body;
        let keep = move |answer| match answer {
            Answer::Frame(frame) => sink.lock().unwrap().push(frame),
            other => panic!("a command answered with {other:?}"),
        };
        c.api.call("Shop", command, keep).unwrap();
        c.settle();
        let answer = answers.lock().unwrap().pop().expect("an answer");
        serde_json::from_slice::<Value>(Codec::Json.encode_server(&answer, &mut Default::default())).unwrap()
    };
    let send = json!({"type": "send", "conv": conv.to_string(), "cid": "order-1", "text": "shipped"});
    let ack = call(&mut c, send.clone());
    // `duplicate` is left out of the JSON when false.
    assert_eq!((ack["type"].as_str(), ack["duplicate"].as_bool()), (Some("ack"), None), "{ack}");
    let delivered = |c: &Cluster, to| {
        c.out[&to].iter().filter(|m| m["type"] == "msg" && m["cid"] == "order-1").cloned().collect::<Vec<_>>()
    };
    for to in [v, agent] {
        let got = delivered(&c, to);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0]["from"]["role"].as_str(), got[0]["from"]["name"].as_str()),
            (Some("bot"), Some("Shop"))
        );
    }
    let again = call(&mut c, send);
    assert_eq!((again["seq"].clone(), again["duplicate"].as_bool()), (ack["seq"].clone(), Some(true)));
    assert_eq!(delivered(&c, v).len(), 1, "a resend is not delivered again");
    let history = call(&mut c, json!({"type": "history", "conv": conv.to_string()}));
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "{history}");
    let closed = call(&mut c, json!({"type": "close", "conv": conv.to_string()}));
    assert_eq!(closed["status"], "closed", "{closed}");
    assert!(c.out[&v].iter().any(|m| m["type"] == "conversation" && m["status"] == "closed"));
    let missing = call(&mut c, json!({"type": "send", "conv": "c999", "cid": "x", "text": "?"}));
    assert_eq!(missing["code"], "not_found", "{missing}");
    c.fill(ConvId(conv.0).home(SHARDS));
    let refused = c.api.call("Shop", Command::Typing { conv }, |_| {});
    assert_eq!(
        refused.map_err(|e| e.code),
        Err(kefu_proto::ErrorCode::Unavailable),
        "a full inbox refuses at once"
    );
}

/// A hook sink that keeps the calls for the test to answer, or takes none.
#[derive(Default)]
struct HeldHooks {
    calls: std::sync::Mutex<Vec<(usize, u64, HookCall)>>,
    full: std::sync::atomic::AtomicBool,
}

impl HookSink for HeldHooks {
    fn call(&self, shard: usize, token: u64, call: HookCall) -> Result<(), String> {
        if self.full.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("too many hook calls".into());
        }
        self.calls.lock().unwrap().push((shard, token, call));
        Ok(())
    }
}

impl HeldHooks {
    fn take(&self) -> Vec<(usize, u64, HookCall)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

/// Each hook's answer comes back through the inbox of the shard that
/// called (as the bridge, the sender after the shards) and reaches the
/// machine that asked: `Admitted` the edge, `Hooked` the home. A call the
/// sink does not take fails at once, as `hooks.failure` says.
#[test]
fn hook_answers_reach_the_machine_that_asked() {
    let sink = Arc::new(HeldHooks::default());
    let mut core = CoreConfig::default();
    core.hooks.on_connect = true;
    core.hooks.on_message = true;
    let mut c = Cluster::with(BACKLOG, core, Some(sink.clone()));
    let bridge = SHARDS;
    let v = c.conn(1);
    let token = c.token(Role::Visitor, "v1");
    c.command(v, json!({"type": "connect", "id": 1, "token": token}));
    c.settle();
    assert!(!c.out.contains_key(&v), "nothing before the verdict");
    let calls = sink.take();
    let [(1, hook, HookCall::OnConnect { user, .. })] = &calls[..] else { panic!("{calls:?}") };
    assert_eq!(user.id, "v1");
    let meta = [("plan".to_string(), "gold".to_string())].into_iter().collect();
    let admission = Admission::Admit { name: Some("Vera".into()), meta };
    let msg = ShardMsg::Chat(Box::new(ChatMsg::Admitted { token: *hook, admission }));
    c.mailboxes[1].send(bridge, msg).unwrap();
    c.settle();
    let connected = c.reply(v, 1);
    assert_eq!(
        (connected["user"]["name"].as_str(), connected["user"]["meta"]["plan"].as_str()),
        (Some("Vera"), Some("gold"))
    );

    c.command(v, json!({"type": "open", "id": 2}));
    c.settle();
    let conv = c.reply(v, 2)["conv"].as_str().unwrap().to_string();
    let home = ConvId(conv[1..].parse().unwrap()).home(SHARDS);
    c.command(v, json!({"type": "send", "id": 3, "conv": conv, "cid": "m1", "text": "hi"}));
    c.settle();
    let calls = sink.take();
    let [(shard, hook, HookCall::OnMessage { cid, .. })] = &calls[..] else { panic!("{calls:?}") };
    assert_eq!((*shard, cid.as_str()), (home, "m1"), "the conversation's home calls");
    let verdict = Verdict::Rewrite { text: "hello".into(), replies: Vec::new() };
    let msg = ShardMsg::Chat(Box::new(ChatMsg::Hooked { token: *hook, verdict }));
    c.mailboxes[home].send(bridge, msg).unwrap();
    c.settle();
    assert_eq!(c.reply(v, 3)["seq"], 1);

    // Not taken: failed at once, and hooks.failure (open) lets it through.
    sink.full.store(true, std::sync::atomic::Ordering::Relaxed);
    c.command(v, json!({"type": "send", "id": 4, "conv": conv, "cid": "m2", "text": "again"}));
    c.settle();
    assert_eq!(c.reply(v, 4)["seq"], 2);
    assert!(sink.take().is_empty());
}
