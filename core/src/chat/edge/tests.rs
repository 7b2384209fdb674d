//! The edge's rules, driven with fed inputs and a store in memory:
//! `connect` in its three forms, the `OnConnect` hook, what waits for
//! `connected`, pipelining, and where each checked command goes.

use std::collections::BTreeMap;

use kefu_proto::client::{ClientFrame, Codec, Command, Event, ServerFrame};
use kefu_proto::ws::close;
use kefu_proto::{ConvId, ErrorCode, Role};

use super::*;
use crate::auth::Claims;
use crate::chat::hooks::{Admission, HookCall};
use crate::chat::stored::{Block, UserControl};
use crate::chat::testing::{MemStore, addr, decode_frames};
use crate::identity::Meta;

const T0: u64 = 1_800_000_000_000;
const SHARDS: usize = 2;
const SECRET: &[u8] = b"edge-tests";

fn edge(configure: impl FnOnce(&mut EdgeConfig)) -> Edge {
    let core = Arc::new(CoreConfig::default());
    let jwt = JwtKey::new(SECRET, core.auth.clone()).expect("a key");
    let mut config = EdgeConfig {
        core,
        jwt,
        allow_anonymous: true,
        heartbeat_s: 25,
        held_frames_max: 4,
        anonymous_per_ip: None,
        attachment_budgets: None,
        counts: Default::default(),
    };
    configure(&mut config);
    Edge::new(0, SHARDS, config)
}

/// An edge that asks `OnConnect` before letting anyone in.
fn hooked_edge(failure: HookFailure) -> Edge {
    edge(|c| {
        let mut core = (*c.core).clone();
        core.hooks.on_connect = true;
        core.hooks.failure = failure;
        c.core = Arc::new(core);
    })
}

fn token(role: Role, sub: &str) -> String {
    token_with_meta(role, sub, &[])
}

fn token_with_meta(role: Role, sub: &str, meta: &[(&str, &str)]) -> String {
    let key = JwtKey::new(SECRET, CoreConfig::default().auth).expect("a key");
    key.sign(&Claims {
        sub: sub.into(),
        role,
        name: None,
        groups: Vec::new(),
        meta: meta_of(meta),
        exp: T0 / 1000 + 3600,
        nbf: None,
    })
}

fn meta_of(pairs: &[(&str, &str)]) -> Meta {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn connect(token: Option<String>, visitor: Option<(&str, &str)>) -> ClientFrame {
    ClientFrame {
        id: Some(1),
        body: Command::Connect {
            token,
            visitor_id: visitor.map(|(id, _)| id.into()),
            visitor_key: visitor.map(|(_, key)| key.into()),
            resume: BTreeMap::new(),
        },
    }
}

fn command(id: i64, body: Command) -> ClientFrame {
    ClientFrame { id: Some(id), body }
}

fn send(id: i64, conv: u64) -> ClientFrame {
    command(
        id,
        Command::Send {
            conv: ConvId(conv),
            cid: format!("c{id}"),
            text: Some("hi".into()),
            attachment: None,
        },
    )
}

/// What the edge asked for, in a form a test can read.
#[derive(Debug, PartialEq)]
enum Seen {
    /// Frames for a connection (a packed write may hold several).
    Frames(SessionAddr, Vec<ServerFrame>),
    Close(SessionAddr, u16),
    /// A chat message to a shard, by kind.
    Chat(usize, &'static str),
    /// A home command to a shard.
    Home(usize),
    StoreUser,
    /// A hook call, with its token.
    Hook(u64, HookCall),
}

fn seen(e: &mut Edge) -> Vec<Seen> {
    std::iter::from_fn(|| e.poll_output())
        .map(|out| match out {
            Output::Post { msg: ShardMsg::Deliver { to, bytes, .. }, .. } => {
                Seen::Frames(to, decode_frames(Codec::Json, &bytes))
            }
            Output::Post { msg: ShardMsg::Close { to, code, .. }, .. } => Seen::Close(to, code),
            Output::Post { to, msg: ShardMsg::Home { .. } } => Seen::Home(to),
            Output::Post { to, msg: ShardMsg::Chat(m) } => Seen::Chat(
                to,
                match *m {
                    ChatMsg::SessionUp { .. } => "SessionUp",
                    ChatMsg::SessionDown { .. } => "SessionDown",
                    ChatMsg::Hello { .. } => "Hello",
                    ChatMsg::AgentGone { .. } => "AgentGone",
                    ChatMsg::Route { .. } => "Route",
                    ChatMsg::Relay { .. } => "Relay",
                    other => panic!("an edge does not send {other:?}"),
                },
            ),
            Output::Submit { write: Write::User(_), then: Pending::Connected { .. } } => Seen::StoreUser,
            Output::Hook { token, call } => Seen::Hook(token, call),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn frame_events(seen: &[Seen]) -> Vec<&Event> {
    seen.iter()
        .flat_map(|s| match s {
            Seen::Frames(_, frames) => frames.iter().map(|f| &f.body).collect(),
            _ => Vec::new(),
        })
        .collect()
}

fn no_random() -> [u8; 16] {
    panic!("no randomness needed here")
}

fn counter() -> impl FnMut() -> [u8; 16] {
    let mut n = 0u8;
    move || {
        n += 1;
        [n; 16]
    }
}

/// Connects an agent at `a` with a token and lets the router welcome it.
fn connected_agent(e: &mut Edge, store: &MemStore, a: SessionAddr) {
    connected_as(e, store, a, Role::Agent, "a1");
}

/// Connects `role` `id` at `a` with a token, lets the router welcome it,
/// and returns what the edge did (`connected` among it).
fn connected_as(e: &mut Edge, store: &MemStore, a: SessionAddr, role: Role, id: &str) -> Vec<Seen> {
    e.handle_frame(a, Codec::Json, connect(Some(token(role, id)), None), T0, store, &mut no_random);
    e.handle_welcome((a, Codec::Json, Some(1)), Vec::new(), store);
    seen(e)
}

#[test]
fn a_token_connect_announces_the_session_everywhere_then_asks_the_router() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    assert_eq!(
        seen(&mut e),
        [Seen::Chat(0, "SessionUp"), Seen::Chat(1, "SessionUp"), Seen::Chat(0, "Hello")]
    );
}

#[test]
fn frames_wait_for_connected_which_comes_first() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    seen(&mut e);
    let early = e.out.encode(Codec::Json, &ServerFrame::push(Event::Pong));
    assert!(e.pass(a, early).is_none(), "held until connected");
    assert!(e.sessions[&a].connecting.is_some());
    e.handle_welcome((a, Codec::Json, Some(1)), Vec::new(), &store);
    assert!(e.sessions[&a].connecting.is_none(), "what only connect needs is dropped at connected");
    let out = seen(&mut e);
    let events = frame_events(&out);
    assert!(matches!(events[..], [Event::Connected { .. }, Event::Pong]), "{events:?}");
    let later = e.out.encode(Codec::Json, &ServerFrame::push(Event::Pong));
    assert!(e.pass(a, later).is_some(), "written at once after connected");
}

#[test]
fn too_much_before_connected_cuts_the_connection() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    seen(&mut e);
    for _ in 0..5 {
        let f = e.out.encode(Codec::Json, &ServerFrame::push(Event::Pong));
        assert!(e.pass(a, f).is_none());
    }
    assert_eq!(seen(&mut e), [Seen::Close(a, close::SLOW_CONSUMER)], "past held_frames_max (4)");
}

/// Found by the `chat_machines` fuzz target: the frames after the cut were
/// handed back to be written, ahead of the close, so the client got an
/// answer before `connected`.
#[test]
fn nothing_is_written_after_the_cut_until_the_close() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    seen(&mut e);
    for _ in 0..7 {
        let f = e.out.encode(Codec::Json, &ServerFrame::push(Event::Pong));
        assert!(e.pass(a, f).is_none(), "held, then dropped once cut");
    }
    assert_eq!(seen(&mut e), [Seen::Close(a, close::SLOW_CONSUMER)], "closed once");
    e.closing(a);
    let f = e.out.encode(Codec::Json, &ServerFrame::push(Event::Pong));
    assert!(e.pass(a, f).is_some(), "forgotten once it is closed");
}

#[test]
fn commands_before_connect_and_bad_tokens_are_refused_and_closed() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, send(5, 1), T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert!(matches!(frame_events(&out)[..], [Event::Error { code: ErrorCode::Unauthorized, .. }]));
    assert_eq!(out.last(), Some(&Seen::Close(a, close::UNAUTHORIZED)));
    e.handle_frame(a, Codec::Json, command(6, Command::Ping), T0, &store, &mut no_random);
    assert!(matches!(frame_events(&seen(&mut e))[..], [Event::Pong]), "ping needs no session");
    let forged = connect(Some(token(Role::Agent, "a1") + "x"), None);
    e.handle_frame(a, Codec::Json, forged, T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert_eq!(out.last(), Some(&Seen::Close(a, close::UNAUTHORIZED)));
    assert_eq!(e.sessions(), 0);
}

#[test]
fn a_new_anonymous_visitor_is_durable_before_anything_else_happens() {
    let (mut e, store, v) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(v, Codec::Json, connect(None, None), T0, &store, &mut counter());
    let out = seen(&mut e);
    assert_eq!(out, [Seen::StoreUser], "the visitor's key is stored before the session exists anywhere");
    for id in 0..17 {
        e.handle_frame(v, Codec::Json, command(10 + id, Command::Ping), T0, &store, &mut no_random);
    }
    let refused = seen(&mut e);
    assert!(
        matches!(frame_events(&refused)[..], [Event::Error { code: ErrorCode::BadCommand, .. }]),
        "the 17th"
    );
    e.handle_committed(Pending::Connected { to: v }, T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert_eq!(out[..3], [Seen::Chat(0, "SessionUp"), Seen::Chat(1, "SessionUp"), Seen::Chat(0, "Hello")]);
    assert_eq!(frame_events(&out).len(), 16, "the 16 pipelined pings are answered once announced");
}

#[test]
fn new_anonymous_visitors_are_limited_per_client_address_and_nothing_is_stored() {
    use crate::per_ip::{PerIpLimiter, PerIpRate};
    use crate::ratelimit::MS_PER_MIN;
    let rate = PerIpRate { rate: 2, burst: 2, period_ms: MS_PER_MIN, entries_max: 1024 };
    let limiter = Arc::new(PerIpLimiter::new(rate));
    let mut e = edge(|c| c.anonymous_per_ip = Some(limiter.clone()));
    let store = MemStore::default();
    let (office, other): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
    let mut random = counter();
    let mut connect_from = |e: &mut Edge, slot, ip| {
        let frame = connect(None, None);
        e.handle_client_frame(addr(0, slot), Some(ip), Codec::Json, frame, T0, &store, &mut random);
        seen(e)
    };
    assert_eq!(connect_from(&mut e, 1, office), [Seen::StoreUser]);
    assert_eq!(connect_from(&mut e, 2, office), [Seen::StoreUser]);
    let out = connect_from(&mut e, 3, office);
    let [Event::Error { code: ErrorCode::RateLimited, message }] = &frame_events(&out)[..] else {
        panic!("{out:?}")
    };
    assert!(message.starts_with("rate limited: retry after 30000 ms"), "{message}");
    assert!(
        !out.iter().any(|s| matches!(s, Seen::StoreUser | Seen::Close(..))),
        "stores nothing, stays open"
    );
    assert_eq!(e.sessions(), 2);
    assert_eq!(e.config.counts.anonymous_refused.load(Ordering::Relaxed), 1);
    assert_eq!(connect_from(&mut e, 4, other), [Seen::StoreUser], "another address is not limited");
    // A token is no new anonymous identity: not limited.
    let agent = connect(Some(token(Role::Agent, "a1")), None);
    e.handle_client_frame(addr(0, 5), Some(office), Codec::Json, agent, T0, &store, &mut no_random);
    assert!(seen(&mut e).contains(&Seen::Chat(0, "Hello")));
}

#[test]
fn a_new_visitor_that_cannot_be_stored_is_refused_and_closed() {
    let (mut e, store, v) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(v, Codec::Json, connect(None, None), T0, &store, &mut counter());
    seen(&mut e);
    let error = ReadError { code: ErrorCode::Unavailable, message: "disk full".into() };
    e.handle_failed(Pending::Connected { to: v }, &error);
    let out = seen(&mut e);
    assert!(matches!(frame_events(&out)[..], [Event::Error { code: ErrorCode::Unavailable, .. }]));
    assert_eq!(out.last(), Some(&Seen::Close(v, close::SERVER_SHUTDOWN)));
    assert_eq!(e.sessions(), 0);
}

#[test]
fn a_returning_visitor_needs_its_key() {
    let (mut e, store, v) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(v, Codec::Json, connect(None, None), T0, &store, &mut counter());
    let Some(Output::Submit { write, .. }) = e.poll_output() else { panic!("no write") };
    let Write::User(profile) = &write else { panic!("{write:?}") };
    store.apply(&write);
    e.handle_committed(Pending::Connected { to: v }, T0, &store, &mut no_random);
    e.handle_welcome((v, Codec::Json, Some(1)), Vec::new(), &store);
    let out = seen(&mut e);
    let key = frame_events(&out)
        .into_iter()
        .find_map(|ev| match ev {
            Event::Connected { visitor_key, .. } => visitor_key.clone(),
            _ => None,
        })
        .expect("a new visitor is shown its key once");
    assert!(profile.id.starts_with(&format!("anon-{T0:012x}")), "issued at T0: {}", profile.id);
    // A visitor whose id was issued before ids began with the time keeps
    // the name its profile was stored with.
    let stored = Write::User(Profile { name: "Visitor 1f1f".into(), ..profile.clone() });
    store.apply(&stored);
    let again = addr(0, 2);
    e.handle_frame(again, Codec::Json, connect(None, Some((&profile.id, &key))), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e)[0], Seen::Chat(0, "SessionUp"), "the right key reconnects");
    e.handle_welcome((again, Codec::Json, Some(1)), Vec::new(), &store);
    let name = frame_events(&seen(&mut e)).into_iter().find_map(|ev| match ev {
        Event::Connected { user, .. } => Some(user.name.clone()),
        _ => None,
    });
    assert_eq!(name.as_deref(), Some("Visitor 1f1f"));
    let wrong = addr(0, 3);
    e.handle_frame(
        wrong,
        Codec::Json,
        connect(None, Some((&profile.id, &"0".repeat(32)))),
        T0,
        &store,
        &mut no_random,
    );
    assert_eq!(seen(&mut e).last(), Some(&Seen::Close(wrong, close::UNAUTHORIZED)));
}

#[test]
fn home_commands_behind_a_routing_command_go_through_the_router_until_it_is_routed() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    connected_agent(&mut e, &store, a);
    let conv = 3;
    let home = ConvId(conv).home(SHARDS);
    e.handle_frame(a, Codec::Json, send(2, conv), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Home(home)], "straight to the home");
    e.handle_frame(
        a,
        Codec::Json,
        command(3, Command::Close { conv: ConvId(conv) }),
        T0,
        &store,
        &mut no_random,
    );
    e.handle_frame(a, Codec::Json, send(4, conv), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Chat(0, "Route"), Seen::Chat(0, "Relay")], "after the close's decision");
    e.handle_routed(a);
    e.handle_frame(a, Codec::Json, send(5, conv), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Chat(0, "Relay")], "the first relay is still with the router");
    e.handle_routed(a);
    e.handle_routed(a);
    e.handle_frame(a, Codec::Json, send(6, conv), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Home(home)]);
}

#[test]
fn a_session_that_goes_is_forgotten_everywhere_and_an_agents_device_by_the_router() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    connected_agent(&mut e, &store, a);
    e.handle_gone(a);
    let out = seen(&mut e);
    assert_eq!(out, [Seen::Chat(0, "SessionDown"), Seen::Chat(1, "SessionDown"), Seen::Chat(0, "AgentGone")]);
    assert_eq!(e.sessions(), 0);
}

// ---- the OnConnect hook -----------------------------------------------

/// The token of the one hook call in `out`, asserting it is `OnConnect`
/// for `(role, id)`.
fn on_connect_token(out: &[Seen], role: Role, id: &str) -> u64 {
    match out {
        [Seen::Hook(token, HookCall::OnConnect { user, .. })] if user.role == role && user.id == id => *token,
        other => panic!("expected one OnConnect call for {id}, got {other:?}"),
    }
}

#[test]
fn with_the_hook_a_connect_waits_for_its_verdict_and_is_let_in_enriched() {
    let (mut e, store, v) = (hooked_edge(HookFailure::Open), MemStore::default(), addr(0, 1));
    let tok = token_with_meta(Role::Visitor, "v1", &[("plan", "free"), ("lang", "en")]);
    e.handle_frame(v, Codec::Json, connect(Some(tok), None), T0, &store, &mut no_random);
    let out = seen(&mut e);
    let Seen::Hook(token, HookCall::OnConnect { user, meta }) = &out[0] else { panic!("{out:?}") };
    assert_eq!((user.role, user.id.as_str(), user.name.as_str()), (Role::Visitor, "v1", "v1"));
    assert_eq!(*meta, meta_of(&[("plan", "free"), ("lang", "en")]), "the hook sees the token's profile");
    assert_eq!(out.len(), 1, "nothing is announced before the verdict: {out:?}");
    let token = *token;
    // Pipelined commands wait, as for a new anonymous visitor.
    e.handle_frame(v, Codec::Json, command(2, Command::Ping), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [], "a ping waits for the verdict too");
    let enrich = meta_of(&[("plan", "gold"), ("vip_level", "3")]);
    let admit = Admission::Admit { name: Some("Vera".into()), meta: enrich };
    e.handle_admission(token, admit, T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert_eq!(out[..3], [Seen::Chat(0, "SessionUp"), Seen::Chat(1, "SessionUp"), Seen::Chat(0, "Hello")]);
    assert!(matches!(frame_events(&out)[..], [Event::Pong]), "the held ping is served once let in: {out:?}");
    e.handle_welcome((v, Codec::Json, Some(1)), Vec::new(), &store);
    let out = seen(&mut e);
    let events = frame_events(&out);
    let [Event::Connected { user, .. }] = events[..] else { panic!("{events:?}") };
    assert_eq!(user.name, "Vera");
    assert_eq!(
        user.meta,
        meta_of(&[("lang", "en"), ("plan", "gold"), ("vip_level", "3")]),
        "the hook's keys over the token's, key by key"
    );
}

#[test]
fn a_refused_connect_is_unauthorized_with_the_reason_and_closed_4500() {
    let (mut e, store, a) = (hooked_edge(HookFailure::Open), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    let token = on_connect_token(&seen(&mut e), Role::Agent, "a1");
    e.handle_frame(a, Codec::Json, send(2, 3), T0, &store, &mut no_random);
    e.handle_admission(
        token,
        Admission::Refuse { reason: "account suspended".into() },
        T0,
        &store,
        &mut no_random,
    );
    let out = seen(&mut e);
    let [Seen::Frames(to, frames), Seen::Close(closed, code)] = &out[..] else { panic!("{out:?}") };
    assert_eq!((*to, *closed, *code), (a, a, close::UNAUTHORIZED));
    let [ServerFrame { id: Some(1), body: Event::Error { code: ErrorCode::Unauthorized, message } }] =
        &frames[..]
    else {
        panic!("{frames:?}")
    };
    assert_eq!(message, "account suspended");
    assert_eq!(e.sessions(), 0, "the pipelined send went with it, unsent");
}

#[test]
fn a_failed_connect_hook_lets_in_or_turns_away_as_configured() {
    let failed = || Admission::Failed { why: "deadline exceeded".into() };
    let (mut e, store, a) = (hooked_edge(HookFailure::Open), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    let call = on_connect_token(&seen(&mut e), Role::Agent, "a1");
    e.handle_admission(call, failed(), T0, &store, &mut no_random);
    assert_eq!(
        seen(&mut e),
        [Seen::Chat(0, "SessionUp"), Seen::Chat(1, "SessionUp"), Seen::Chat(0, "Hello")]
    );

    let (mut e, store, a) = (hooked_edge(HookFailure::Closed), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    let call = on_connect_token(&seen(&mut e), Role::Agent, "a1");
    e.handle_admission(call, failed(), T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert!(
        matches!(frame_events(&out)[..], [Event::Error { code: ErrorCode::Unavailable, message }]
            if message.contains("deadline exceeded")),
        "{out:?}"
    );
    assert_eq!(out.last(), Some(&Seen::Close(a, close::SERVER_SHUTDOWN)), "4000: reconnecting is fine");
    assert_eq!(e.sessions(), 0);
}

#[test]
fn a_new_anonymous_visitor_is_stored_only_once_let_in_with_the_enriched_profile() {
    let (mut e, store, v) = (hooked_edge(HookFailure::Open), MemStore::default(), addr(0, 1));
    e.handle_frame(v, Codec::Json, connect(None, None), T0, &store, &mut counter());
    let out = seen(&mut e);
    let [Seen::Hook(token, HookCall::OnConnect { user, .. })] = &out[..] else { panic!("{out:?}") };
    assert!(user.id.starts_with("anon-"), "asked before anything is stored: {user:?}");
    let admit = Admission::Admit { name: None, meta: meta_of(&[("crm", "42")]) };
    e.handle_admission(*token, admit, T0, &store, &mut no_random);
    let Some(Output::Submit { write: Write::User(profile), then: Pending::Connected { to } }) =
        e.poll_output()
    else {
        panic!("the visitor is stored once let in")
    };
    assert_eq!((to, profile.meta), (v, vec![("crm".to_string(), "42".to_string())]));
    assert_eq!(seen(&mut e), [], "announced only once durable");

    // A refused new visitor leaves nothing behind.
    let w = addr(0, 2);
    e.handle_frame(w, Codec::Json, connect(None, None), T0, &store, &mut counter());
    let out = seen(&mut e);
    let [Seen::Hook(token, _)] = &out[..] else { panic!("{out:?}") };
    e.handle_admission(*token, Admission::Refuse { reason: String::new() }, T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert!(!out.contains(&Seen::StoreUser), "{out:?}");
    assert_eq!(out.last(), Some(&Seen::Close(w, close::UNAUTHORIZED)));
}

#[test]
fn a_connection_that_goes_while_admitted_is_never_announced() {
    let (mut e, store, a) = (hooked_edge(HookFailure::Open), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    let token = on_connect_token(&seen(&mut e), Role::Agent, "a1");
    e.handle_gone(a);
    assert_eq!(seen(&mut e), [], "it was known nowhere else");
    e.handle_admission(token, Admission::Admit { name: None, meta: Meta::new() }, T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [], "a late verdict changes nothing");
    assert_eq!(e.sessions(), 0);
}

#[test]
fn without_the_hook_no_call_is_made() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    e.handle_frame(a, Codec::Json, connect(Some(token(Role::Agent, "a1")), None), T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert!(!out.iter().any(|s| matches!(s, Seen::Hook(..))), "{out:?}");
}

/// Stores what the business system set for `(role, id)`.
fn control(store: &MemStore, role: Role, id: &str, control: UserControl) {
    store.apply(&Write::Control { user: crate::identity::UserKey { role, id: id.into() }, control });
}

/// `role` `id` connects at `at` with a token.
fn connect_as(e: &mut Edge, store: &MemStore, at: SessionAddr, role: Role, id: &str) {
    e.handle_frame(at, Codec::Json, connect(Some(token(role, id)), None), T0, store, &mut no_random);
}

fn blocked_until(until_ms: u64) -> UserControl {
    let block = Block { until_ms, reason: "spamming the queue".into(), at_ms: T0 - 10 };
    UserControl { block: Some(block), ..UserControl::default() }
}

#[test]
fn a_blocked_visitor_is_refused_with_its_reason_and_told_not_to_reconnect() {
    let (mut e, store, v) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    control(&store, Role::Visitor, "v9", blocked_until(0));
    connect_as(&mut e, &store, v, Role::Visitor, "v9");
    let out = seen(&mut e);
    assert!(
        matches!(frame_events(&out)[..], [Event::Error { code: ErrorCode::Forbidden, message, .. }]
            if message == "spamming the queue"),
        "{out:?}"
    );
    assert_eq!(out.last(), Some(&Seen::Close(v, close::BLOCKED)));
    assert_eq!(e.sessions(), 0, "never announced");
    // Agent `v9` is someone else.
    connect_as(&mut e, &store, addr(0, 2), Role::Agent, "v9");
    assert_eq!(seen(&mut e)[0], Seen::Chat(0, "SessionUp"));
}

#[test]
fn a_block_that_has_run_out_lets_the_visitor_in() {
    let (mut e, store, v) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    control(&store, Role::Visitor, "v9", blocked_until(T0));
    connect_as(&mut e, &store, v, Role::Visitor, "v9");
    assert_eq!(seen(&mut e)[0], Seen::Chat(0, "SessionUp"), "until_ms is not included");
    control(&store, Role::Visitor, "v8", blocked_until(T0 + 1));
    let w = addr(0, 2);
    e.handle_frame(
        w,
        Codec::Json,
        connect(Some(token(Role::Visitor, "v8")), None),
        T0,
        &store,
        &mut no_random,
    );
    assert_eq!(seen(&mut e).last(), Some(&Seen::Close(w, close::BLOCKED)), "one ms before it runs out");
}

#[test]
fn synced_keys_override_the_tokens_key_by_key_at_connect() {
    let (mut e, store, v) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    let synced = UserControl {
        name: Some("Ada Lovelace".into()),
        meta: vec![("vip_level".into(), "3".into())],
        block: None,
    };
    control(&store, Role::Visitor, "v9", synced);
    let token = token_with_meta(Role::Visitor, "v9", &[("vip_level", "1"), ("plan", "free")]);
    e.handle_frame(v, Codec::Json, connect(Some(token), None), T0, &store, &mut no_random);
    e.handle_welcome((v, Codec::Json, Some(1)), Vec::new(), &store);
    let out = seen(&mut e);
    let user = frame_events(&out)
        .into_iter()
        .find_map(|ev| match ev {
            Event::Connected { user, .. } => Some(user.clone()),
            _ => None,
        })
        .expect("connected");
    assert_eq!(user.name, "Ada Lovelace");
    assert_eq!(user.meta, meta_of(&[("plan", "free"), ("vip_level", "3")]), "the token's other keys stay");
}

#[test]
fn canned_replies_are_answered_at_the_edge_to_agents_only() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    connected_agent(&mut e, &store, a);
    e.handle_frame(a, Codec::Json, command(7, Command::Canned), T0, &store, &mut no_random);
    let out = seen(&mut e);
    let [Seen::Frames(to, frames)] = &out[..] else { panic!("answered here, no other shard asked: {out:?}") };
    assert_eq!((*to, frames[0].id), (a, Some(7)));
    let Event::Canned { replies } = &frames[0].body else { panic!("{frames:?}") };
    let config = CoreConfig::default();
    let names: Vec<_> = replies.iter().map(|r| (r.name.as_str(), r.text.as_str())).collect();
    let expected: Vec<_> = config.rules.canned.iter().map(|c| (c.name.as_str(), c.text.as_str())).collect();
    assert_eq!(names, expected, "the config's replies, in order");
    assert!(!names.is_empty());
    // Visitors have no use for them.
    let v = addr(0, 2);
    connected_as(&mut e, &store, v, Role::Visitor, "v1");
    e.handle_frame(v, Codec::Json, command(8, Command::Canned), T0, &store, &mut no_random);
    let out = seen(&mut e);
    assert!(matches!(frame_events(&out)[..], [Event::Error { code: ErrorCode::Forbidden, .. }]), "{out:?}");
}

#[test]
fn connected_says_how_large_a_message_may_be() {
    let mut e = edge(|c| {
        let mut core = (*c.core).clone();
        core.limits.max_text_bytes = 1000;
        core.limits.max_attachment_bytes = 200_000;
        c.core = Arc::new(core);
    });
    let out = connected_as(&mut e, &MemStore::default(), addr(0, 1), Role::Visitor, "v1");
    let limits = frame_events(&out).into_iter().find_map(|ev| match ev {
        Event::Connected { text_bytes_max, attachment_bytes_max, .. } => {
            Some((*text_bytes_max, *attachment_bytes_max))
        }
        _ => None,
    });
    assert_eq!(limits, Some((Some(1000), Some(200_000))), "the widget checks an image before sending it");
}

#[test]
fn a_session_is_ended_when_its_token_expires_and_told_why() {
    let (mut e, store) = (edge(|_| {}), MemStore::default());
    let (agent, visitor) = (addr(0, 1), addr(0, 2));
    connected_agent(&mut e, &store, agent);
    // An anonymous visitor has no token, so no expiry.
    e.handle_frame(visitor, Codec::Json, connect(None, None), T0, &store, &mut counter());
    e.handle_committed(Pending::Connected { to: visitor }, T0, &store, &mut no_random);
    e.handle_welcome((visitor, Codec::Json, Some(1)), Vec::new(), &store);
    seen(&mut e);
    let leeway_ms = CoreConfig::default().auth.exp_leeway_s * 1000;
    let expires = T0 + 3_600_000 + leeway_ms;
    assert_eq!(e.next_expiry_ms(), Some(expires));

    e.expire(expires - 1);
    assert_eq!(seen(&mut e), Vec::new(), "valid until its last millisecond");
    e.expire(expires);
    let out = seen(&mut e);
    assert_eq!(out.last(), Some(&Seen::Close(agent, close::TOKEN_EXPIRED)));
    let Seen::Frames(to, frames) = &out[0] else { panic!("{out:?}") };
    assert_eq!((*to, frames[0].id), (agent, None), "an error that answers no command has no id");
    assert!(
        matches!(&frames[0].body, Event::Error { code: ErrorCode::Unauthorized, message, .. } if message == "token expired")
    );
    assert_eq!(e.next_expiry_ms(), None);

    // A command that raced the close is refused, and nothing is sent twice.
    e.handle_frame(agent, Codec::Json, send(7, 1), expires, &store, &mut no_random);
    let out = seen(&mut e);
    assert!(
        matches!(frame_events(&out)[..], [Event::Error { code: ErrorCode::Unauthorized, .. }]),
        "{out:?}"
    );
    assert!(!out.iter().any(|s| matches!(s, Seen::Close(..))));
    e.handle_gone(agent);
    seen(&mut e);
    assert_eq!(e.sessions(), 1, "the visitor stays");
}

#[test]
fn a_command_on_an_expired_token_ends_the_session_before_the_timer_does() {
    let (mut e, store, a) = (edge(|_| {}), MemStore::default(), addr(0, 1));
    connected_agent(&mut e, &store, a);
    let late = e.next_expiry_ms().expect("a token session");
    e.handle_frame(a, Codec::Json, send(5, 1), late, &store, &mut no_random);
    let out = seen(&mut e);
    assert_eq!(out.last(), Some(&Seen::Close(a, close::TOKEN_EXPIRED)));
    assert!(!out.iter().any(|s| matches!(s, Seen::Home(_) | Seen::Chat(..))), "not served: {out:?}");
    e.handle_gone(a);
    seen(&mut e);
    assert_eq!((e.sessions(), e.next_expiry_ms()), (0, None));
}

#[test]
fn a_senders_attachment_budget_is_one_over_all_its_connections() {
    use crate::per_ip::{PerIpLimiter, PerIpRate};
    use crate::ratelimit::MS_PER_MIN;
    use kefu_proto::client::Attachment;
    let rate = PerIpRate { rate: 600, burst: 600, period_ms: MS_PER_MIN, entries_max: 1024 };
    let budgets = Arc::new(PerIpLimiter::new(rate));
    let mut e = edge(|c| c.attachment_budgets = Some(budgets.clone()));
    let store = MemStore::default();
    let (tab1, tab2, other) = (addr(0, 1), addr(0, 2), addr(0, 3));
    connected_as(&mut e, &store, tab1, Role::Visitor, "v1");
    connected_as(&mut e, &store, tab2, Role::Visitor, "v1");
    connected_as(&mut e, &store, other, Role::Visitor, "v2");
    let image = |id: i64, bytes: usize| {
        let attachment = Some(Attachment { mime: "image/png".into(), data: vec![0; bytes] });
        command(id, Command::Send { conv: ConvId(7), cid: format!("c{id}"), text: None, attachment })
    };
    let home = ConvId(7).home(SHARDS);
    e.handle_frame(tab1, Codec::Json, image(1, 400), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Home(home)]);
    // The second tab spends the same budget: 200 left, 300 asked.
    e.handle_frame(tab2, Codec::Json, image(2, 300), T0, &store, &mut no_random);
    let out = seen(&mut e);
    let [Event::Error { code: ErrorCode::RateLimited, message }] = &frame_events(&out)[..] else {
        panic!("{out:?}")
    };
    assert!(message.starts_with("rate limited: retry after 10000 ms"), "{message}");
    assert_eq!(e.config.counts.attachments_refused.load(Ordering::Relaxed), 1);
    e.handle_frame(other, Codec::Json, image(3, 600), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Home(home)], "another visitor has a budget of their own");
    e.handle_frame(tab2, Codec::Json, send(4, 7), T0, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Home(home)], "text costs no attachment budget");
    e.handle_frame(tab2, Codec::Json, image(5, 300), T0 + 10_000, &store, &mut no_random);
    assert_eq!(seen(&mut e), [Seen::Home(home)], "fits after the wait");
}
