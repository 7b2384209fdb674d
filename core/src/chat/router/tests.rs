//! The router machine's rules, driven with fed inputs and time: what each
//! command comes to, where it goes, and in what order.

use std::sync::Arc;

use kefu_proto::client::Codec;
use kefu_proto::{ConvId, ErrorCode, PresenceStatus, Role};

use super::*;
use crate::chat::SessionAddr;
use crate::config::{CoreConfig, OfflinePolicy};
use crate::identity::{GroupName, Meta, Visitor};
use crate::session::TransferTarget;

const T0: u64 = 1_000_000;
const SHARDS: usize = 2;

fn machine(configure: impl FnOnce(&mut CoreConfig)) -> Router {
    let mut config = CoreConfig::default();
    configure(&mut config);
    Router::new(Arc::new(config), SHARDS, 1, Vec::new(), T0).0
}

fn addr(shard: u16, slot: u32) -> SessionAddr {
    SessionAddr { shard, slot, generation: 1 }
}

fn reply(shard: u16, slot: u32, id: i64) -> Reply {
    (addr(shard, slot), Codec::Json, Some(id))
}

fn identity(role: Role, id: &str) -> Identity {
    Identity {
        role,
        id: Arc::from(id),
        name: Arc::from(id),
        groups: Arc::from([]),
        meta: Meta::new(),
        anonymous: false,
    }
}

fn outputs(r: &mut Router) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

/// An agent connected at `slot` of shard 1, online with `capacity`.
fn agent(r: &mut Router, id: &str, slot: u32, capacity: u32) -> Reply {
    let rep = reply(1, slot, 1);
    r.handle_hello(rep, identity(Role::Agent, id), T0);
    let presence = RouteRequest::Presence { status: PresenceStatus::Online, capacity: Some(capacity) };
    r.handle_route(rep, identity(Role::Agent, id).actor(), presence, T0);
    outputs(r);
    rep
}

/// A visitor connects and opens a conversation from `slot` of shard 0; its id.
fn open(r: &mut Router, visitor: &str, slot: u32) -> ConvId {
    let v = identity(Role::Visitor, visitor);
    r.handle_hello(reply(0, slot, 1), v.clone(), T0);
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let request = RouteRequest::Open { visitor, group: GroupName::from("default"), vip_level: 0 };
    r.handle_route(reply(0, slot, 2), v.actor(), request, T0);
    let out = outputs(r);
    out.iter()
        .find_map(|o| match o {
            Output::Post { msg: ChatMsg::Change { conv, change: Change::Create { .. }, .. }, .. } => {
                Some(*conv)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Create in {out:?}"))
}

fn changes(out: &[Output]) -> Vec<(usize, ConvId, &Change, Option<Reply>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Post { shard, msg: ChatMsg::Change { conv, change, reply, .. } } => {
                Some((*shard, *conv, change, *reply))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn an_open_goes_to_the_home_with_its_reply_then_the_edge_hears_routed() {
    let mut r = machine(|_| {});
    let v = identity(Role::Visitor, "v1");
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let request = RouteRequest::Open { visitor, group: GroupName::from("sales"), vip_level: 0 };
    r.handle_route(reply(0, 7, 3), v.actor(), request, T0);
    let out = outputs(&mut r);
    let [
        Output::Post {
            shard,
            msg: ChatMsg::Change { conv, change: Change::Create { group, .. }, reply: rep, route },
        },
        Output::Post { shard: edge, msg: ChatMsg::Routed { addr: routed } },
    ] = &out[..]
    else {
        panic!("{out:?}");
    };
    assert_eq!(*shard, conv.home(SHARDS), "decisions go to the conversation's home");
    assert_eq!(&**group, "sales");
    assert_eq!(*rep, Some(reply(0, 7, 3)), "the home answers the open");
    assert_eq!(route.position, Some(1), "queued first");
    assert!(route.notify.is_empty(), "nobody serves it yet");
    assert_eq!((*edge, *routed), (0, addr(0, 7)), "Routed comes last, to the edge");
    // Opening again describes the same conversation.
    let v = identity(Role::Visitor, "v1");
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let request = RouteRequest::Open { visitor, group: GroupName::from("sales"), vip_level: 0 };
    r.handle_route(reply(0, 7, 4), v.actor(), request, T0);
    let out = outputs(&mut r);
    assert!(matches!(changes(&out)[..], [(_, c, Change::Describe, Some(_))] if c == *conv), "{out:?}");
}

#[test]
fn a_queued_conversation_names_the_agents_who_serve_it_and_auto_assign_takes_it() {
    let mut r = machine(|c| c.routing.auto_assign = false);
    let rep = agent(&mut r, "a1", 1, 5);
    let conv = open(&mut r, "v1", 1);
    assert_eq!(r.routing().route(conv).map(|v| v.status), Some(ConvStatus::Queued));
    // With auto-assign off, the agent accepts; the home answers the accept.
    r.handle_route(rep, identity(Role::Agent, "a1").actor(), RouteRequest::Accept { conv }, T0);
    let out = outputs(&mut r);
    let got = changes(&out);
    assert!(
        matches!(&got[..], [(_, c, Change::Assign { agent, previous: None, .. }, Some(answer))]
            if *c == conv && &*agent.id == "a1" && *answer == rep),
        "{out:?}"
    );
}

#[test]
fn queued_changes_notify_the_agents_serving_the_group_by_role() {
    let mut r = machine(|c| c.routing.auto_assign = false);
    agent(&mut r, "42", 1, 5);
    let v = identity(Role::Visitor, "42");
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let request = RouteRequest::Open { visitor, group: GroupName::from("default"), vip_level: 0 };
    r.handle_route(reply(0, 9, 2), v.actor(), request, T0);
    let out = outputs(&mut r);
    let Some(Output::Post { msg: ChatMsg::Change { route, .. }, .. }) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(route.notify, [UserKey::agent(Arc::from("42"))], "the agent 42, not the visitor 42");
}

#[test]
fn a_transfer_names_who_had_it_and_answers_the_agent() {
    let mut r = machine(|_| {});
    let a1 = agent(&mut r, "a1", 1, 5);
    agent(&mut r, "a2", 2, 5);
    let conv = open(&mut r, "v1", 1);
    let had = r.routing().route(conv).and_then(|v| v.agent).unwrap();
    let (from, other) = if &*had == "a1" { (a1, "a2") } else { (reply(1, 2, 1), "a1") };
    let transfer = RouteRequest::Transfer { conv, to: TransferTarget::Agent(Arc::from(other)) };
    r.handle_route(from, identity(Role::Agent, &had).actor(), transfer, T0);
    let out = outputs(&mut r);
    let got = changes(&out);
    assert!(
        matches!(&got[..], [(_, c, Change::Assign { agent, previous: Some(p), .. }, Some(answer))]
            if *c == conv && &*agent.id == other && *p == UserKey::agent(had.clone()) && *answer == from),
        "{out:?}"
    );
}

#[test]
fn refusals_are_answered_here_and_still_release_the_edge() {
    let mut r = machine(|_| {});
    let rep = agent(&mut r, "a1", 1, 5);
    r.handle_route(rep, identity(Role::Agent, "a1").actor(), RouteRequest::Accept { conv: ConvId(99) }, T0);
    let out = outputs(&mut r);
    let [Output::Write { reply: to, frame }, Output::Post { msg: ChatMsg::Routed { .. }, .. }] = &out[..]
    else {
        panic!("{out:?}");
    };
    assert_eq!(*to, rep);
    let kefu_proto::client::Event::Error { code, .. } = &frame.body else { panic!("{frame:?}") };
    assert_eq!(*code, ErrorCode::NotFound);
    // Closing an unknown or closed conversation asks its home, which knows.
    let close = RouteRequest::Close { conv: ConvId(99) };
    r.handle_route(rep, identity(Role::Agent, "a1").actor(), close, T0);
    let out = outputs(&mut r);
    assert!(matches!(changes(&out)[..], [(_, ConvId(99), Change::CloseClosed { .. }, Some(_))]), "{out:?}");
}

#[test]
fn a_relayed_command_goes_on_to_its_home_before_routed() {
    let mut r = machine(|_| {});
    let v = identity(Role::Visitor, "v1");
    let conv = ConvId(5);
    r.handle_relay(reply(1, 3, 8), v.actor(), HomeRequest::Typing { conv });
    let out = outputs(&mut r);
    let [
        Output::PostHome { shard, request: HomeRequest::Typing { .. }, .. },
        Output::Post { shard: 1, msg: ChatMsg::Routed { .. } },
    ] = &out[..]
    else {
        panic!("{out:?}");
    };
    assert_eq!(*shard, conv.home(SHARDS));
}

#[test]
fn hello_lists_an_agents_conversations_and_the_queue_it_serves() {
    let mut r = machine(|c| {
        c.routing.auto_assign = false;
        c.routing.connected_queued_max = 2;
    });
    for n in 0..3 {
        open(&mut r, &format!("v{n}"), n);
    }
    r.handle_hello(reply(1, 1, 1), identity(Role::Agent, "a1"), T0);
    let out = outputs(&mut r);
    let welcome = out.iter().find_map(|o| match o {
        Output::Post { shard: 1, msg: ChatMsg::Welcome { conversations, .. } } => Some(conversations),
        _ => None,
    });
    let listed = welcome.unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(listed.len(), 2, "routing.connected_queued_max bounds the queue listed");
    assert!(listed.iter().all(|(_, s)| *s == ConvStatus::Queued));
    // A visitor's hello lists its open conversation only.
    r.handle_hello(reply(0, 0, 1), identity(Role::Visitor, "v0"), T0);
    let out = outputs(&mut r);
    let Some(Output::Post { msg: ChatMsg::Welcome { conversations, .. }, .. }) = out.last() else { panic!() };
    assert_eq!(conversations.len(), 1);
}

#[test]
fn an_offline_agents_conversations_requeue_when_the_grace_period_ends() {
    let mut r = machine(|c| {
        c.routing.offline_policy = OfflinePolicy::Requeue;
        c.routing.offline_grace_s = 60;
    });
    agent(&mut r, "a1", 1, 5);
    let conv = open(&mut r, "v1", 1);
    assert_eq!(r.routing().route(conv).and_then(|v| v.agent).as_deref(), Some("a1"));
    r.handle_agent_gone("a1", device_of(addr(1, 1)), T0);
    let out = outputs(&mut r);
    assert!(
        matches!(
            out[..],
            [Output::ToAgents { .. }, Output::LogPresence { status: PresenceStatus::Offline, .. }]
        ),
        "presence goes to every agent, then to the log: {out:?}"
    );
    assert_eq!(r.next_deadline(), Some(T0 + 60_000), "the loop is asked to come back then");
    r.handle_tick(T0 + 59_999);
    assert!(outputs(&mut r).is_empty(), "not before");
    r.handle_tick(T0 + 60_000);
    let out = outputs(&mut r);
    assert!(
        matches!(changes(&out)[..], [(_, c, Change::Queue { previous: Some(p), .. }, None)]
            if c == conv && *p == UserKey::agent(Arc::from("a1"))),
        "{out:?}"
    );
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn a_device_past_the_limit_replaces_the_oldest() {
    let mut r = machine(|c| c.routing.max_devices_per_agent = 2);
    for slot in 1..=3 {
        r.handle_hello(reply(1, slot, 1), identity(Role::Agent, "a1"), T0);
    }
    let out = outputs(&mut r);
    let replaced: Vec<u64> = out
        .iter()
        .filter_map(|o| match o {
            Output::ReplaceDevice { device, .. } => Some(*device),
            _ => None,
        })
        .collect();
    assert_eq!(replaced, [device_of(addr(1, 1))], "{out:?}");
}

#[test]
fn the_queue_reaches_a_connected_agent_whatever_their_presence() {
    let mut r = machine(|c| c.routing.auto_assign = false);
    // Connected, never set a presence (offline): still told of the queue.
    r.handle_hello(reply(1, 1, 1), identity(Role::Agent, "fresh"), T0);
    // Away.
    let away = reply(1, 2, 1);
    r.handle_hello(away, identity(Role::Agent, "away"), T0);
    let presence = RouteRequest::Presence { status: PresenceStatus::Away, capacity: None };
    r.handle_route(away, identity(Role::Agent, "away").actor(), presence, T0);
    // Gone: an offline agent with no device hears nothing.
    r.handle_hello(reply(1, 3, 1), identity(Role::Agent, "gone"), T0);
    r.handle_agent_gone("gone", device_of(addr(1, 3)), T0);
    r.handle_tick(T0 + 3_600_000);
    outputs(&mut r);
    let v = identity(Role::Visitor, "v1");
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let request = RouteRequest::Open { visitor, group: GroupName::from("default"), vip_level: 0 };
    r.handle_route(reply(0, 9, 2), v.actor(), request, T0 + 3_600_000);
    let out = outputs(&mut r);
    let Some(Output::Post { msg: ChatMsg::Change { route, .. }, .. }) = out.first() else {
        panic!("{out:?}")
    };
    let mut notify: Vec<&str> = route.notify.iter().map(|k| &*k.id).collect();
    notify.sort();
    assert_eq!(notify, ["away", "fresh"]);
}

#[test]
fn an_agents_hello_is_followed_by_each_conversation_and_the_agents_present() {
    let mut r = machine(|c| c.routing.auto_assign = false);
    agent(&mut r, "bob", 5, 5);
    let queued = open(&mut r, "v1", 1);
    let me = reply(1, 1, 7);
    r.handle_hello(me, identity(Role::Agent, "a1"), T0);
    let out = outputs(&mut r);
    let welcome = out.iter().position(|o| matches!(o, Output::Post { msg: ChatMsg::Welcome { .. }, .. }));
    let welcome = welcome.unwrap_or_else(|| panic!("{out:?}"));
    let push = (me.0, me.1, None);
    // Each listed conversation is described to this session, as a push (the
    // connect's id belongs to `connected`), after the welcome.
    let described = changes(&out[welcome..]);
    assert!(
        matches!(described[..], [(shard, c, Change::Describe, Some(to))]
            if c == queued && shard == queued.home(SHARDS) && to == push),
        "{out:?}"
    );
    // Then who else is present: bob, not a1 (offline, and itself).
    let presences: Vec<_> = out[welcome..]
        .iter()
        .filter_map(|o| match o {
            Output::Write { reply, frame } => match &frame.body {
                kefu_proto::client::Event::Presence { agent, status, name } => {
                    Some((*reply, frame.id, agent.clone(), *status, name.clone()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    let bob = Some("bob".to_string());
    assert_eq!(presences, [(push, None, "bob".to_string(), PresenceStatus::Online, bob)]);
    // A visitor's hello is followed by nothing: its `open` says the state.
    r.handle_hello(reply(0, 3, 1), identity(Role::Visitor, "v1"), T0);
    let out = outputs(&mut r);
    assert!(matches!(&out[..], [Output::Post { msg: ChatMsg::Welcome { .. }, .. }]), "{out:?}");
}

/// The position updates in `out` (they go to visitors only), with whether
/// an agent is online as the router saw it, by conversation (each shard's
/// batch is in queue order, the shards' batches one after the other).
fn availability(out: &[Output]) -> Vec<(ConvId, Option<bool>)> {
    let mut got: Vec<_> = positions(out).into_iter().map(|(_, u)| (u.conv, Some(u.agents_online))).collect();
    got.sort();
    got
}

/// The position updates in `out`, with the shard each was posted to.
fn positions(out: &[Output]) -> Vec<(usize, PositionUpdate)> {
    out.iter()
        .flat_map(|o| match o {
            Output::Post { shard, msg: ChatMsg::Positions { updates } } => {
                updates.iter().map(|u| (*shard, *u)).collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn waiting_visitors_are_told_when_their_group_gains_or_loses_its_last_online_agent() {
    let mut r = machine(|c| c.routing.auto_assign = false);
    let first = open(&mut r, "v1", 1);
    let second = open(&mut r, "v2", 2);
    // Opened with nobody online: the frame says so.
    let v = identity(Role::Visitor, "v3");
    let visitor = Visitor { id: v.id.clone(), name: v.name.clone(), meta: Meta::new() };
    let request = RouteRequest::Open { visitor, group: GroupName::from("default"), vip_level: 0 };
    r.handle_route(reply(0, 3, 2), v.actor(), request, T0);
    let out = outputs(&mut r);
    let third = match changes(&out)[..] {
        [(_, c, Change::Create { .. }, _)] => c,
        _ => panic!("{out:?}"),
    };
    let Some(Output::Post { msg: ChatMsg::Change { route, .. }, .. }) = out.first() else { panic!() };
    assert_eq!(route.agents_online, Some(false));
    // The first online agent: every waiting visitor hears it, in queue order.
    let a1 = reply(1, 1, 1);
    r.handle_hello(a1, identity(Role::Agent, "a1"), T0);
    let presence = |status| RouteRequest::Presence { status, capacity: None };
    r.handle_route(a1, identity(Role::Agent, "a1").actor(), presence(PresenceStatus::Online), T0);
    let out = outputs(&mut r);
    assert_eq!(availability(&out), [(first, Some(true)), (second, Some(true)), (third, Some(true))]);
    // A second agent online, then the first away: no flip, nobody is told.
    let a2 = agent(&mut r, "a2", 2, 5);
    r.handle_route(a1, identity(Role::Agent, "a1").actor(), presence(PresenceStatus::Away), T0);
    assert_eq!(availability(&outputs(&mut r)), [], "still online through a2");
    // The last online agent leaves: told once.
    r.handle_route(a2, identity(Role::Agent, "a2").actor(), presence(PresenceStatus::Offline), T0);
    let out = outputs(&mut r);
    assert_eq!(availability(&out), [(first, Some(false)), (second, Some(false)), (third, Some(false))]);
    r.handle_route(a1, identity(Role::Agent, "a1").actor(), presence(PresenceStatus::Offline), T0);
    assert_eq!(availability(&outputs(&mut r)), [], "away to offline changes nothing for visitors");
    // And a describe says it too.
    r.handle_hello(reply(1, 9, 1), identity(Role::Agent, "a9"), T0);
    let out = outputs(&mut r);
    let described: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Post { msg: ChatMsg::Change { change: Change::Describe, route, .. }, .. } => {
                Some(route.agents_online)
            }
            _ => None,
        })
        .collect();
    assert_eq!(described, [Some(false); 3]);
}

#[test]
fn the_agents_introduced_after_hello_are_bounded_online_first() {
    let mut r = machine(|c| c.routing.connected_presence_max = 2);
    for (slot, id) in [(1, "away1"), (2, "away2")] {
        let rep = reply(1, slot, 1);
        r.handle_hello(rep, identity(Role::Agent, id), T0);
        let away = RouteRequest::Presence { status: PresenceStatus::Away, capacity: None };
        r.handle_route(rep, identity(Role::Agent, id).actor(), away, T0);
    }
    agent(&mut r, "online1", 3, 5);
    outputs(&mut r);
    r.handle_hello(reply(1, 9, 1), identity(Role::Agent, "me"), T0);
    let introduced: Vec<(String, PresenceStatus)> = outputs(&mut r)
        .into_iter()
        .filter_map(|o| match o {
            Output::Write { frame, .. } => match frame.body {
                kefu_proto::client::Event::Presence { agent, status, .. } => Some((agent, status)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(introduced.len(), 2, "routing.connected_presence_max: {introduced:?}");
    assert_eq!(introduced[0], ("online1".to_string(), PresenceStatus::Online), "online first");
}

#[test]
fn a_dequeue_with_50000_waiting_is_one_positions_post_per_shard_after_the_tick() {
    const WAITING: u64 = 50_000;
    let mut config = CoreConfig::default();
    config.routing.auto_assign = false;
    let routes = (1..=WAITING).map(|n| RestoredRoute {
        conv: ConvId(n),
        visitor: Arc::from(format!("v{n}")),
        group: GroupName::from("default"),
        vip_level: 0,
        agent: None,
    });
    let (mut r, refused) = Router::new(Arc::new(config), SHARDS, 1, routes.collect(), T0);
    assert_eq!(refused, 0);
    let me = agent(&mut r, "a1", 1, 5);
    r.handle_route(me, identity(Role::Agent, "a1").actor(), RouteRequest::Accept { conv: ConvId(1) }, T0);
    let out = outputs(&mut r);
    assert!(positions(&out).is_empty(), "nobody is told at the dequeue: {} outputs", out.len());
    assert_eq!(r.next_deadline(), Some(0), "the moves are due at the next tick");
    r.handle_tick(T0);
    let out = outputs(&mut r);
    let posts: Vec<usize> = out
        .iter()
        .filter_map(|o| match o {
            Output::Post { shard, msg: ChatMsg::Positions { .. } } => Some(*shard),
            _ => None,
        })
        .collect();
    // Two posts, where there were 49,999: far below any backlog bound
    // (`server.backlog_messages_max`), past which positions are skipped.
    assert_eq!(posts, [0, 1], "one post per shard, whatever the queue's length");
    let updates = positions(&out);
    assert_eq!(updates.len(), WAITING as usize - 1, "each who moved, once");
    for (shard, u) in &updates {
        assert_eq!(*shard, u.conv.home(SHARDS));
        assert_eq!(u64::from(u.position), u.conv.0 - 1, "{u:?}");
    }
}

#[test]
fn a_waiting_visitor_gone_too_long_is_closed_and_the_groups_agents_see_it_go() {
    let mut r = machine(|c| c.routing.abandon_after_s = 300);
    // An away agent sees the queue, and takes nothing from it.
    let away = reply(1, 1, 1);
    r.handle_hello(away, identity(Role::Agent, "a1"), T0);
    let presence = RouteRequest::Presence { status: PresenceStatus::Away, capacity: None };
    r.handle_route(away, identity(Role::Agent, "a1").actor(), presence, T0);
    let conv = open(&mut r, "v1", 1);
    let v1 = UserKey { role: Role::Visitor, id: Arc::from("v1") };
    r.handle_session_down(addr(0, 7), &v1, T0 + 1_000);
    assert_eq!(r.next_deadline(), None, "a session the router never counted changes nothing");
    r.handle_session_down(addr(0, 1), &v1, T0 + 1_000);
    // Agents' sessions going are counted elsewhere (`handle_agent_gone`).
    r.handle_session_down(addr(1, 1), &UserKey::agent(Arc::from("a1")), T0 + 1_000);
    assert!(outputs(&mut r).is_empty());
    assert_eq!(r.next_deadline(), Some(T0 + 301_000));
    r.handle_tick(T0 + 301_000);
    let out = outputs(&mut r);
    let closes = changes(&out);
    assert!(matches!(closes[..], [(_, c, Change::Close, None)] if c == conv), "{out:?}");
    let Some(Output::Post { msg: ChatMsg::Change { route, .. }, .. }) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(route.notify, [UserKey::agent(Arc::from("a1"))], "the agents who saw it wait");
    assert!(matches!(out.last(), Some(Output::Abandoned { conv: c }) if *c == conv), "{out:?}");
    assert_eq!(r.routing().open_conversation_of("v1"), None);
}

#[test]
fn a_transfer_between_queues_tells_the_agents_of_both() {
    let mut r = machine(|c| c.routing.auto_assign = false);
    let with_groups = |id: &str, groups: &[&str]| Identity {
        groups: groups.iter().map(|g| GroupName::from(*g)).collect(),
        ..identity(Role::Agent, id)
    };
    for (slot, (id, groups)) in
        [("s1", &["default"][..]), ("b1", &["billing"]), ("all", &[])].into_iter().enumerate()
    {
        let rep = reply(1, 10 + slot as u32, 1);
        r.handle_hello(rep, with_groups(id, groups), T0);
        let presence = RouteRequest::Presence { status: PresenceStatus::Online, capacity: Some(5) };
        r.handle_route(rep, with_groups(id, groups).actor(), presence, T0);
    }
    outputs(&mut r);
    let conv = open(&mut r, "v1", 1);
    let to = TransferTarget::Group(GroupName::from("billing"));
    r.handle_route(
        reply(1, 10, 2),
        with_groups("s1", &["default"]).actor(),
        RouteRequest::Transfer { conv, to },
        T0,
    );
    let out = outputs(&mut r);
    let Some(Output::Post { msg: ChatMsg::Change { change: Change::Queue { .. }, route, .. }, .. }) =
        out.first()
    else {
        panic!("{out:?}")
    };
    let mut told: Vec<&str> = route.notify.iter().map(|k| &*k.id).collect();
    told.sort_unstable();
    // Billing's agents see it arrive; s1 saw it wait in default and sees it
    // go; an agent of both queues is told once.
    assert_eq!(told, ["all", "b1", "s1"], "{out:?}");
}
