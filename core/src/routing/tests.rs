//! The router's rules, one test each, and a property test that drives it
//! with random events and checks its invariants after every step.

use std::collections::BTreeMap;

use kefu_proto::ids::PresenceStatus::{Away, Offline, Online};

use super::*;

const T0: u64 = 1_000_000;

/// Visitors here are not connected unless a test says so: conversations
/// are never abandoned unless a test asks for it.
fn config(auto_assign: bool) -> RoutingConfig {
    RoutingConfig { auto_assign, offline_grace_s: 60, abandon_after_s: 0, ..RoutingConfig::default() }
}

fn groups(gs: &[&str]) -> Arc<[GroupName]> {
    gs.iter().map(|g| GroupName::from(*g)).collect()
}

fn info(id: &str, gs: &[&str]) -> AgentInfo {
    AgentInfo { id: UserId::from(id), name: Arc::from(format!("Agent {id}")), groups: groups(gs) }
}

/// Connects `id` on device `device` and sets it online with `capacity`.
fn online(r: &mut Router, id: &str, gs: &[&str], device: DeviceId, capacity: u32) {
    r.agent_connected(info(id, gs), device, T0);
    r.presence(id, device, Online, Some(capacity), T0).unwrap();
}

fn agent_actor(id: &str, gs: &[&str]) -> Actor {
    Actor { role: Role::Agent, id: UserId::from(id), name: Arc::from(id), groups: groups(gs) }
}

fn visitor_actor(id: &str) -> Actor {
    Actor { role: Role::Visitor, id: UserId::from(id), name: Arc::from(id), groups: groups(&[]) }
}

fn open(r: &mut Router, visitor: &str, group: &str, vip: i64) -> ConvId {
    let req = OpenRequest { visitor: UserId::from(visitor), group: GroupName::from(group), vip_level: vip };
    let opened = r.open(req).unwrap();
    assert!(opened.created);
    opened.conv
}

fn actions(r: &mut Router) -> Vec<Action> {
    std::iter::from_fn(|| r.poll_action()).collect()
}

fn assigned_to(r: &Router, conv: ConvId) -> Option<String> {
    r.route(conv).and_then(|v| v.agent).map(|a| a.to_string())
}

fn queue(r: &Router, group: &str) -> Vec<ConvId> {
    r.queue(group).collect()
}

fn position(r: &Router, conv: ConvId) -> Option<u32> {
    r.route(conv).and_then(|v| v.position)
}

fn assign_action(
    conv: ConvId,
    agent: &str,
    group: &str,
    previous: Option<&str>,
    reason: AssignReason,
) -> Action {
    Action::Assign {
        conv,
        agent: AgentRef { id: UserId::from(agent), name: Arc::from(format!("Agent {agent}")) },
        group: GroupName::from(group),
        previous: previous.map(UserId::from),
        reason,
        left_queue: None,
    }
}

/// `conv` transferred to the head of `group`'s queue.
fn transferred_first(
    conv: ConvId,
    group: &str,
    previous: Option<&str>,
    left_queue: Option<GroupName>,
) -> Action {
    Action::Queue {
        conv,
        group: GroupName::from(group),
        position: 1,
        previous: previous.map(UserId::from),
        reason: QueueReason::Transferred,
        left_queue,
    }
}

/// As [`assign_action`], for a conversation its group's agents saw waiting.
fn dequeue_action(conv: ConvId, agent: &str, group: &str, reason: AssignReason) -> Action {
    match assign_action(conv, agent, group, None, reason) {
        Action::Assign { conv, agent, group, previous, reason, .. } => {
            let left_queue = Some(group.clone());
            Action::Assign { conv, agent, group, previous, reason, left_queue }
        }
        _ => unreachable!(),
    }
}

#[test]
fn opened_conversations_wait_in_line_with_positions() {
    let mut r = Router::new(config(true), 1);
    let c1 = open(&mut r, "v1", "sales", 0);
    let c2 = open(&mut r, "v2", "sales", 0);
    let got = actions(&mut r);
    assert_eq!(
        got,
        [
            Action::Queue {
                conv: c1,
                group: "sales".into(),
                position: 1,
                previous: None,
                reason: QueueReason::Opened,
                left_queue: None
            },
            Action::Queue {
                conv: c2,
                group: "sales".into(),
                position: 2,
                previous: None,
                reason: QueueReason::Opened,
                left_queue: None
            },
        ]
    );
    assert_eq!((c1, c2), (ConvId(1), ConvId(2)), "ids count up from next_conv_id");
    assert_eq!(r.queued_len(), 2);
}

#[test]
fn a_visitor_has_one_open_conversation_and_a_new_one_after_close() {
    let mut r = Router::new(config(true), 10);
    let c = open(&mut r, "v1", "sales", 0);
    let again = r.open(OpenRequest { visitor: "v1".into(), group: "billing".into(), vip_level: 0 }).unwrap();
    assert_eq!(again, Opened { conv: c, created: false });
    actions(&mut r);
    r.close(&visitor_actor("v1"), c).unwrap();
    assert_eq!(r.open_conversation_of("v1"), None);
    let next = open(&mut r, "v1", "sales", 0);
    assert_ne!(next, c);
}

#[test]
fn auto_assign_picks_the_least_loaded_agent() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 5);
    online(&mut r, "a2", &[], 2, 5);
    actions(&mut r);
    let c1 = open(&mut r, "v1", "sales", 0);
    let c2 = open(&mut r, "v2", "sales", 0);
    assert_eq!(assigned_to(&r, c1).as_deref(), Some("a1"), "tie: the smaller id");
    assert_eq!(assigned_to(&r, c2).as_deref(), Some("a2"), "a1 has one, a2 none");
    // Both hold one: the one idle longest (a1) gets the next.
    let c3 = open(&mut r, "v3", "sales", 0);
    assert_eq!(assigned_to(&r, c3).as_deref(), Some("a1"));
    // a1 holds two, a2 one: a2 gets it even though a1 is listed first.
    let c4 = open(&mut r, "v4", "sales", 0);
    assert_eq!(assigned_to(&r, c4).as_deref(), Some("a2"));
    // An open that is assigned at once is announced only as assigned.
    let got = actions(&mut r);
    assert_eq!(got[0], assign_action(c1, "a1", "sales", None, AssignReason::Auto));
    assert!(got.iter().all(|a| matches!(a, Action::Assign { .. })), "{got:?}");
    assert_eq!(r.agent("a1").unwrap().load, 2);
}

#[test]
fn capacity_is_never_exceeded_and_close_assigns_the_next() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 2);
    let c1 = open(&mut r, "v1", "g", 0);
    let c2 = open(&mut r, "v2", "g", 0);
    let c3 = open(&mut r, "v3", "g", 0);
    let c4 = open(&mut r, "v4", "g", 0);
    assert_eq!(r.agent("a1").unwrap().load, 2);
    assert_eq!(queue(&r, "g"), [c3, c4]);
    actions(&mut r);
    // Closing c1 frees a seat: c3 is assigned, c4 moves up to 1.
    assert_eq!(r.close(&agent_actor("a1", &[]), c1), Ok(Some(UserId::from("a1"))));
    assert_eq!(
        actions(&mut r),
        [
            Action::Close { conv: c1, agent: Some("a1".into()), by: Role::Agent, left_queue: None },
            dequeue_action(c3, "a1", "g", AssignReason::Auto),
        ]
    );
    r.tick(T0);
    assert_eq!(actions(&mut r), [Action::QueuePosition { conv: c4, group: "g".into(), position: 1 }]);
    assert_eq!(r.agent("a1").unwrap().load, 2);
    let _ = c2;
}

#[test]
fn raising_capacity_assigns_and_lowering_keeps_conversations() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 1);
    let c1 = open(&mut r, "v1", "g", 0);
    let c2 = open(&mut r, "v2", "g", 0);
    assert_eq!(position(&r, c2), Some(1));
    r.presence("a1", 1, Online, Some(3), T0).unwrap();
    assert_eq!(assigned_to(&r, c2).as_deref(), Some("a1"));
    r.presence("a1", 1, Online, Some(0), T0).unwrap();
    assert_eq!(r.agent("a1").unwrap().load, 2, "kept, though over the new capacity");
    let c3 = open(&mut r, "v3", "g", 0);
    assert_eq!(position(&r, c3), Some(1), "no new ones");
    assert_eq!(
        r.presence("a1", 1, Online, Some(101), T0),
        Err(RouteError::BadCommand("presence.capacity is above routing.max_capacity"))
    );
    let _ = c1;
}

#[test]
fn vip_first_then_first_come() {
    let mut r = Router::new(config(false), 1);
    let plain1 = open(&mut r, "v1", "g", 0);
    let gold1 = open(&mut r, "v2", "g", 2);
    let plain2 = open(&mut r, "v3", "g", 0);
    let gold2 = open(&mut r, "v4", "g", 2);
    let silver = open(&mut r, "v5", "g", 1);
    assert_eq!(queue(&r, "g"), [gold1, gold2, silver, plain1, plain2]);
    assert_eq!(position(&r, plain2), Some(5));
    // Every arrival that jumps the line moves those behind it, and the
    // next tick says so, once for each that moved.
    let entered = actions(&mut r);
    assert!(entered.iter().all(|a| matches!(a, Action::Queue { .. })), "{entered:?}");
    r.tick(T0);
    let got = actions(&mut r);
    let moves: Vec<(ConvId, u32)> = got
        .iter()
        .filter_map(|a| match a {
            Action::QueuePosition { conv, position, .. } => Some((*conv, *position)),
            _ => None,
        })
        .collect();
    assert_eq!(moves, [(plain1, 4), (plain2, 5)], "plain1 was told 1 and plain2 3 as they entered");
    // A profile update that raises priority moves the visitor up.
    r.update_vip_level("v3", 5);
    assert_eq!(queue(&r, "g"), [plain2, gold1, gold2, silver, plain1]);
}

#[test]
fn positions_update_when_the_head_is_assigned() {
    let mut r = Router::new(config(true), 1);
    let c1 = open(&mut r, "v1", "g", 0);
    let c2 = open(&mut r, "v2", "g", 0);
    let c3 = open(&mut r, "v3", "g", 0);
    actions(&mut r);
    online(&mut r, "a1", &[], 1, 1);
    assert_eq!(
        actions(&mut r),
        [
            Action::PresenceChanged { agent: "a1".into(), status: Online },
            dequeue_action(c1, "a1", "g", AssignReason::Auto),
        ]
    );
    assert_eq!(r.next_deadline(), Some(0), "nothing announced yet: the moves are due at once");
    r.tick(T0);
    assert_eq!(
        actions(&mut r),
        [
            Action::QueuePosition { conv: c2, group: "g".into(), position: 1 },
            Action::QueuePosition { conv: c3, group: "g".into(), position: 2 },
        ]
    );
}

#[test]
fn agents_serve_their_groups_and_agents_without_groups_serve_all() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "sales1", &["sales"], 1, 5);
    let billing = open(&mut r, "v1", "billing", 0);
    assert_eq!(assigned_to(&r, billing), None, "no one serves billing yet");
    let sales = open(&mut r, "v2", "sales", 0);
    assert_eq!(assigned_to(&r, sales).as_deref(), Some("sales1"));
    online(&mut r, "any", &[], 2, 5);
    assert_eq!(assigned_to(&r, billing).as_deref(), Some("any"));
}

#[test]
fn away_keeps_conversations_but_takes_no_new_ones() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c1 = open(&mut r, "v1", "g", 0);
    r.presence("a1", 1, Away, None, T0).unwrap();
    let c2 = open(&mut r, "v2", "g", 0);
    assert_eq!(assigned_to(&r, c1).as_deref(), Some("a1"));
    assert_eq!(position(&r, c2), Some(1));
    r.presence("a1", 1, Online, None, T0).unwrap();
    assert_eq!(assigned_to(&r, c2).as_deref(), Some("a1"), "back online: takes the waiting one");
}

#[test]
fn accept_rules() {
    let mut r = Router::new(config(false), 1);
    online(&mut r, "sales1", &["sales"], 1, 1);
    online(&mut r, "sales2", &["sales"], 2, 5);
    online(&mut r, "billing1", &["billing"], 3, 5);
    let c1 = open(&mut r, "v1", "sales", 0);
    let c2 = open(&mut r, "v2", "sales", 0);
    assert_eq!(position(&r, c1), Some(1), "auto-assign off: they wait");
    actions(&mut r);
    // Not in your groups: you cannot see it.
    assert_eq!(r.accept("billing1", c1), Err(RouteError::NotFound));
    assert_eq!(RouteError::NotFound.code(), ErrorCode::NotFound);
    assert_eq!(r.accept("sales1", ConvId(999)), Err(RouteError::NotFound));
    assert_eq!(r.accept("sales1", c1), Ok(Accepted::Assigned));
    assert_eq!(actions(&mut r), [dequeue_action(c1, "sales1", "sales", AssignReason::Accepted)]);
    r.tick(T0);
    assert_eq!(actions(&mut r), [Action::QueuePosition { conv: c2, group: "sales".into(), position: 1 }]);
    assert_eq!(r.accept("sales1", c1), Ok(Accepted::AlreadyYours));
    assert!(matches!(r.accept("sales2", c1), Err(RouteError::Conflict(_))), "taken: a race lost");
    assert_eq!(r.accept("billing1", c1), Err(RouteError::NotFound));
    assert!(matches!(r.accept("sales1", c2), Err(RouteError::Conflict(_))), "at capacity");
    r.presence("sales2", 2, Away, None, T0).unwrap();
    assert!(matches!(r.accept("sales2", c2), Err(RouteError::Conflict(_))), "away takes no new ones");
    assert_eq!(RouteError::Conflict("x").code(), ErrorCode::Conflict);
    assert!(
        actions(&mut r).iter().all(|a| matches!(a, Action::PresenceChanged { .. })),
        "refusals change nothing"
    );
}

#[test]
fn transfer_to_an_agent() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = open(&mut r, "v1", "g", 0);
    online(&mut r, "a2", &["other"], 2, 1);
    actions(&mut r);
    let a1 = agent_actor("a1", &[]);
    assert_eq!(r.transfer(&a1, c, TransferTarget::Agent("nobody".into())), Err(RouteError::NoSuchAgent));
    assert_eq!(RouteError::NoSuchAgent.code(), ErrorCode::NotFound);
    assert!(matches!(r.transfer(&a1, c, TransferTarget::Agent("a1".into())), Err(RouteError::Conflict(_))));
    // Only the agent who has it (or a bot) may hand it on.
    let a2 = agent_actor("a2", &["other"]);
    assert_eq!(r.transfer(&a2, c, TransferTarget::Agent("a2".into())), Err(RouteError::NotFound));
    assert!(matches!(
        r.transfer(&visitor_actor("v1"), c, TransferTarget::Agent("a2".into())),
        Err(RouteError::Forbidden(_))
    ));
    // The target need not serve the group: an explicit transfer overrides it.
    r.transfer(&a1, c, TransferTarget::Agent("a2".into())).unwrap();
    assert_eq!(actions(&mut r), [assign_action(c, "a2", "g", Some("a1"), AssignReason::Transferred)]);
    assert_eq!((r.agent("a1").unwrap().load, r.agent("a2").unwrap().load), (0, 1));
    // a2 is now full; a1 cannot get another transfer into a full agent.
    let c2 = open(&mut r, "v2", "g", 0);
    assert_eq!(assigned_to(&r, c2).as_deref(), Some("a1"));
    assert!(matches!(r.transfer(&a1, c2, TransferTarget::Agent("a2".into())), Err(RouteError::Conflict(_))));
    r.presence("a2", 2, Offline, None, T0).unwrap();
    let a2_again = agent_actor("a2", &["other"]);
    assert!(matches!(r.transfer(&a2_again, c, TransferTarget::Agent("a1".into())), Ok(())));
    assert!(
        matches!(r.transfer(&a1, c2, TransferTarget::Agent("a2".into())), Err(RouteError::Conflict(_))),
        "offline"
    );
}

#[test]
fn transfer_to_a_group_requeues_and_skips_the_giver() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = open(&mut r, "v1", "sales", 0);
    actions(&mut r);
    let a1 = agent_actor("a1", &[]);
    // a1 serves every group, but gave it away: it waits for someone else.
    r.transfer(&a1, c, TransferTarget::Group("billing".into())).unwrap();
    assert_eq!(actions(&mut r), [transferred_first(c, "billing", Some("a1"), None)]);
    assert_eq!(r.route(c).unwrap().status, ConvStatus::Queued);
    // A billing agent comes online and gets it.
    online(&mut r, "b1", &["billing"], 2, 5);
    assert_eq!(assigned_to(&r, c).as_deref(), Some("b1"));
    // Giving it back to the same group, with someone free there, assigns at
    // once, announced as one change naming the previous agent.
    online(&mut r, "b2", &["billing"], 3, 5);
    actions(&mut r);
    r.transfer(&agent_actor("b1", &["billing"]), c, TransferTarget::Group("billing".into())).unwrap();
    assert_eq!(actions(&mut r), [assign_action(c, "b2", "billing", Some("b1"), AssignReason::Auto)]);
    // The giver can still take it back explicitly.
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = open(&mut r, "v1", "sales", 0);
    r.transfer(&a1, c, TransferTarget::Group("sales".into())).unwrap();
    assert_eq!(r.accept("a1", c), Ok(Accepted::Assigned));
}

#[test]
fn a_queued_conversation_can_be_moved_by_an_agent_of_its_group() {
    let mut r = Router::new(config(false), 1);
    online(&mut r, "s1", &["sales"], 1, 5);
    let c = open(&mut r, "v1", "sales", 0);
    let outsider = agent_actor("b1", &["billing"]);
    assert_eq!(r.transfer(&outsider, c, TransferTarget::Group("billing".into())), Err(RouteError::NotFound));
    let s1 = agent_actor("s1", &["sales"]);
    assert!(matches!(
        r.transfer(&s1, c, TransferTarget::Group("sales".into())),
        Err(RouteError::Conflict(_))
    ));
    r.transfer(&s1, c, TransferTarget::Group("billing".into())).unwrap();
    assert_eq!(queue(&r, "billing"), [c]);
    assert_eq!(queue(&r, "sales"), []);
}

#[test]
fn a_transfer_between_queues_names_the_queue_it_left() {
    let mut r = Router::new(config(true), 1);
    let c = open(&mut r, "v1", "sales", 0);
    actions(&mut r);
    // Sales' agents saw it wait; moved to billing, it leaves their queue.
    let s1 = agent_actor("s1", &["sales"]);
    r.transfer(&s1, c, TransferTarget::Group("billing".into())).unwrap();
    let left_queue = Some(GroupName::from("sales"));
    assert_eq!(actions(&mut r), [transferred_first(c, "billing", None, left_queue.clone())]);
    // Announced there, it has left nothing more: billing's agents are
    // told when it goes, as for any conversation they saw wait.
    online(&mut r, "b1", &["billing"], 1, 5);
    let taken = dequeue_action(c, "b1", "billing", AssignReason::Auto);
    assert_eq!(
        actions(&mut r).into_iter().filter(|a| matches!(a, Action::Assign { .. })).collect::<Vec<_>>(),
        [taken]
    );

    // Taken at once where it lands, it still left sales' queue.
    let c2 = open(&mut r, "v2", "sales", 0);
    actions(&mut r);
    r.transfer(&s1, c2, TransferTarget::Group("billing".into())).unwrap();
    let Some(Action::Assign { conv, group, left_queue: left, .. }) = actions(&mut r).into_iter().next()
    else {
        panic!("assigned at once")
    };
    assert_eq!((conv, &*group, left), (c2, "billing", left_queue));
}

#[test]
fn who_may_close() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &["sales"], 1, 1);
    let assigned = open(&mut r, "v1", "sales", 0);
    let queued = open(&mut r, "v2", "sales", 0);
    assert_eq!(r.close(&visitor_actor("v2"), assigned), Err(RouteError::NotFound), "not your conversation");
    assert_eq!(r.close(&agent_actor("b1", &["billing"]), queued), Err(RouteError::NotFound));
    assert_eq!(
        r.close(&agent_actor("s2", &["sales"]), assigned),
        Err(RouteError::NotFound),
        "not assigned to you"
    );
    // An agent of the group may close a queued one (spam), a visitor their own.
    assert_eq!(r.close(&agent_actor("s2", &["sales"]), queued), Ok(None));
    assert_eq!(r.close(&visitor_actor("v1"), assigned), Ok(Some("a1".into())));
    assert_eq!(
        r.close(&visitor_actor("v1"), assigned),
        Err(RouteError::NotFound),
        "the router forgets closed ones"
    );
    let c = open(&mut r, "v3", "sales", 0);
    assert!(r.close(&Actor::bot("crm", "CRM"), c).is_ok(), "the business system may close");
}

#[test]
fn offline_keep_holds_conversations_forever() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = open(&mut r, "v1", "g", 0);
    actions(&mut r);
    r.agent_disconnected("a1", 1, T0 + 10);
    assert_eq!(actions(&mut r), [Action::PresenceChanged { agent: "a1".into(), status: Offline }]);
    r.tick(T0 + 10 * 3_600_000);
    assert_eq!(assigned_to(&r, c).as_deref(), Some("a1"));
    assert!(actions(&mut r).is_empty());
    assert_eq!(r.agent("a1").unwrap().status, Offline);
}

fn requeue_config() -> RoutingConfig {
    RoutingConfig { offline_policy: OfflinePolicy::Requeue, ..config(true) }
}

#[test]
fn offline_requeue_after_grace() {
    let mut r = Router::new(requeue_config(), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c1 = open(&mut r, "v1", "g", 0);
    let c2 = open(&mut r, "v2", "g", 1);
    actions(&mut r);
    r.agent_disconnected("a1", 1, T0 + 1_000);
    assert_eq!(r.next_deadline(), Some(T0 + 61_000));
    r.tick(T0 + 60_999);
    assert_eq!(assigned_to(&r, c1).as_deref(), Some("a1"), "still within grace");
    actions(&mut r);
    r.tick(T0 + 61_000);
    assert_eq!(
        actions(&mut r),
        [
            Action::Queue {
                conv: c2,
                group: "g".into(),
                position: 1,
                previous: Some("a1".into()),
                reason: QueueReason::AgentOffline,
                left_queue: None
            },
            Action::Queue {
                conv: c1,
                group: "g".into(),
                position: 2,
                previous: Some("a1".into()),
                reason: QueueReason::AgentOffline,
                left_queue: None
            },
        ],
        "back in line by priority, then by when they first came"
    );
    assert_eq!(r.agent("a1"), None, "nothing left to remember about a1");
    assert_eq!(r.next_deadline(), None);
    // Another agent picks them up.
    online(&mut r, "a2", &[], 2, 5);
    assert_eq!(assigned_to(&r, c2).as_deref(), Some("a2"));
    let got = actions(&mut r);
    assert!(got.contains(&dequeue_action(c2, "a2", "g", AssignReason::Auto)), "{got:?}");
}

#[test]
fn offline_requeue_goes_straight_to_a_free_agent() {
    let mut r = Router::new(requeue_config(), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = open(&mut r, "v1", "g", 0);
    online(&mut r, "a2", &[], 2, 5);
    actions(&mut r);
    r.agent_disconnected("a1", 1, T0);
    r.tick(T0 + 60_000);
    assert_eq!(
        actions(&mut r)[1..],
        [assign_action(c, "a2", "g", Some("a1"), AssignReason::Auto)],
        "one change, naming who had it"
    );
}

#[test]
fn reconnecting_within_grace_cancels_the_requeue() {
    let mut r = Router::new(requeue_config(), 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = open(&mut r, "v1", "g", 0);
    r.agent_disconnected("a1", 1, T0);
    actions(&mut r);
    r.agent_connected(info("a1", &[]), 7, T0 + 59_000);
    assert_eq!(actions(&mut r), [Action::PresenceChanged { agent: "a1".into(), status: Online }]);
    assert_eq!(r.next_deadline(), None);
    r.tick(T0 + 3_600_000);
    assert_eq!(assigned_to(&r, c).as_deref(), Some("a1"));
    // An explicit offline also starts the clock, and online stops it.
    r.presence("a1", 7, Offline, None, T0 + 3_600_000).unwrap();
    assert_eq!(r.next_deadline(), Some(T0 + 3_660_000));
    r.presence("a1", 7, Away, None, T0 + 3_630_000).unwrap();
    assert_eq!(r.next_deadline(), None);
    r.tick(T0 + 3_700_000);
    assert_eq!(assigned_to(&r, c).as_deref(), Some("a1"));
}

#[test]
fn several_devices_count_as_one_agent() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "a1", &[], 1, 1);
    r.agent_connected(info("a1", &[]), 2, T0);
    assert_eq!(r.agent("a1").unwrap().devices, 2);
    let c1 = open(&mut r, "v1", "g", 0);
    let c2 = open(&mut r, "v2", "g", 0);
    assert_eq!(assigned_to(&r, c1).as_deref(), Some("a1"));
    assert_eq!(position(&r, c2), Some(1), "two tabs do not double the capacity");
    actions(&mut r);
    r.agent_disconnected("a1", 1, T0);
    assert!(actions(&mut r).is_empty(), "one tab closing changes nothing");
    r.agent_disconnected("a1", 2, T0);
    assert_eq!(actions(&mut r), [Action::PresenceChanged { agent: "a1".into(), status: Offline }]);
}

#[test]
fn one_device_too_many_replaces_the_oldest() {
    let mut r = Router::new(RoutingConfig { max_devices_per_agent: 2, ..config(true) }, 1);
    r.agent_connected(info("a1", &[]), 1, T0);
    r.agent_connected(info("a1", &[]), 2, T0);
    r.agent_connected(info("a1", &[]), 3, T0);
    assert_eq!(actions(&mut r), [Action::ReplaceDevice { agent: "a1".into(), device: 1 }]);
    assert!(matches!(r.presence("a1", 1, Online, None, T0), Err(RouteError::Conflict(_))));
}

#[test]
fn agents_are_offline_until_presence() {
    let mut r = Router::new(config(true), 1);
    r.agent_connected(info("a1", &[]), 1, T0);
    let c = open(&mut r, "v1", "g", 0);
    assert_eq!(position(&r, c), Some(1));
    assert_eq!(r.agent("a1").unwrap().status, Offline);
    assert_eq!(r.presence("a1", 1, Online, None, T0), Ok(Online));
    assert_eq!(assigned_to(&r, c).as_deref(), Some("a1"));
    assert!(matches!(r.presence("ghost", 1, Online, None, T0), Err(RouteError::Conflict(_))));
    // An agent who never said anything leaves no trace.
    r.agent_connected(info("quiet", &[]), 9, T0);
    r.agent_disconnected("quiet", 9, T0);
    assert_eq!(r.agent("quiet"), None);
}

#[test]
fn restore_rebuilds_queues_and_offline_agents() {
    let mut r = Router::new(requeue_config(), 1);
    let route = |conv, visitor: &str, vip, agent: Option<&str>| RestoredRoute {
        conv: ConvId(conv),
        visitor: visitor.into(),
        group: "g".into(),
        vip_level: vip,
        agent: agent.map(|a| AgentRef { id: a.into(), name: Arc::from(a) }),
    };
    let refused = r.restore(
        [
            route(7, "v7", 0, None),
            route(3, "v3", 0, None),
            route(5, "v5", 1, None),
            route(4, "v4", 0, Some("a1")),
            route(6, "v4", 0, None),
        ],
        T0,
    );
    assert_eq!(refused, [ConvId(6)], "one open conversation per visitor, even from bad data");
    assert!(actions(&mut r).is_empty(), "restoring announces nothing");
    assert_eq!(queue(&r, "g"), [ConvId(5), ConvId(3), ConvId(7)]);
    assert_eq!(position(&r, ConvId(7)), Some(3));
    assert_eq!(r.open_conversation_of("v4"), Some(ConvId(4)));
    assert_eq!(r.agent("a1").unwrap().status, Offline);
    let fresh = open(&mut r, "v8", "g", 0);
    assert_eq!(fresh, ConvId(8), "new ids continue after the restored ones");
    r.tick(T0 + 60_000);
    assert_eq!(queue(&r, "g"), [ConvId(5), ConvId(3), ConvId(4), ConvId(7), ConvId(8)]);
}

#[test]
fn a_full_queue_is_unavailable() {
    let mut r = Router::new(RoutingConfig { max_queued: 2, ..config(true) }, 1);
    open(&mut r, "v1", "g", 0);
    open(&mut r, "v2", "g", 0);
    let err = r.open(OpenRequest { visitor: "v3".into(), group: "g".into(), vip_level: 0 }).unwrap_err();
    assert_eq!((err.clone(), err.code()), (RouteError::QueueFull, ErrorCode::Unavailable));
    assert!(err.code().retryable());
}

// ---- property test ----

/// xorshift64*: deterministic, no crates, good enough to shuffle events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the gateway would believe after applying every action so far.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Queued { group: GroupName, position: u32 },
    Assigned { agent: UserId },
    Closed,
}

const AGENTS: [(&str, &[&str]); 6] = [
    ("a0", &[]),
    ("a1", &["sales"]),
    ("a2", &["billing"]),
    ("a3", &["sales", "billing"]),
    ("a4", &["support"]),
    ("a5", &[]),
];
const GROUPS: [&str; 4] = ["sales", "billing", "support", "vip"];

fn run_random(seed: u64, steps: usize, config: RoutingConfig) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut r = Router::new(config, 1);
    let mut seen: BTreeMap<ConvId, Seen> = BTreeMap::new();
    let mut visitor_of: BTreeMap<ConvId, String> = BTreeMap::new();
    // Devices each agent has connected, as the gateway would track them.
    let mut devices: BTreeMap<&str, Vec<DeviceId>> = BTreeMap::new();
    // Agents allowed above capacity because theirs was lowered under load.
    let mut over_ok: BTreeMap<&str, bool> = BTreeMap::new();
    let mut next_device: DeviceId = 1;
    let mut now = T0;
    // Sessions each visitor has connected, as the edges would report them.
    let mut visitor_sessions: BTreeMap<String, Vec<DeviceId>> = BTreeMap::new();

    for step in 0..steps {
        let open_convs: Vec<ConvId> =
            seen.iter().filter(|(_, s)| **s != Seen::Closed).map(|(c, _)| *c).collect();
        let any_conv = |rng: &mut Rng| -> ConvId {
            if open_convs.is_empty() || rng.below(10) == 0 {
                ConvId(rng.below(200) as u64 + 1)
            } else {
                *rng.pick(&open_convs)
            }
        };
        let (agent_id, agent_groups) = *rng.pick(&AGENTS);
        let op = rng.below(110);
        let desc;
        let result: Result<(), RouteError> = match op {
            0..=24 => {
                let visitor = format!("v{}", rng.below(40));
                let group = *rng.pick(&GROUPS);
                let vip = rng.below(4) as i64;
                desc = format!("open {visitor} {group} vip {vip}");
                r.open(OpenRequest { visitor: visitor.as_str().into(), group: group.into(), vip_level: vip })
                    .map(|o| {
                        if o.created {
                            visitor_of.insert(o.conv, visitor.clone());
                        } else {
                            assert_eq!(
                                visitor_of.get(&o.conv),
                                Some(&visitor),
                                "open returned another's conversation"
                            );
                        }
                    })
            }
            25..=34 => {
                let conv = any_conv(&mut rng);
                desc = format!("accept {agent_id} {conv}");
                r.accept(agent_id, conv).map(|_| ())
            }
            35..=49 => {
                let conv = any_conv(&mut rng);
                let by = match rng.below(3) {
                    0 => visitor_actor(visitor_of.get(&conv).map_or("v0", String::as_str)),
                    1 => match seen.get(&conv) {
                        Some(Seen::Assigned { agent }) => {
                            let groups = AGENTS.iter().find(|(a, _)| **a == **agent).map_or(&[][..], |a| a.1);
                            agent_actor(agent, groups)
                        }
                        _ => agent_actor(agent_id, agent_groups),
                    },
                    _ => agent_actor(agent_id, agent_groups),
                };
                desc = format!("close {conv} by {:?} {}", by.role, by.id);
                r.close(&by, conv).map(|_| ())
            }
            50..=59 => {
                let conv = any_conv(&mut rng);
                let by = match seen.get(&conv) {
                    Some(Seen::Assigned { agent }) if rng.below(4) != 0 => {
                        let groups = AGENTS.iter().find(|(a, _)| **a == **agent).map_or(&[][..], |a| a.1);
                        agent_actor(agent, groups)
                    }
                    _ => agent_actor(agent_id, agent_groups),
                };
                let to = if rng.below(2) == 0 {
                    TransferTarget::Agent(rng.pick(&AGENTS).0.into())
                } else {
                    TransferTarget::Group((*rng.pick(&GROUPS)).into())
                };
                desc = format!("transfer {conv} by {} to {to:?}", by.id);
                r.transfer(&by, conv, to)
            }
            60..=74 => {
                let status = *rng.pick(&[Online, Online, Away, Offline]);
                let capacity = (rng.below(3) == 0).then(|| rng.below(5) as u32);
                let list = devices.get(agent_id).cloned().unwrap_or_default();
                let device = if list.is_empty() { 0 } else { *rng.pick(&list) };
                desc = format!("presence {agent_id} dev {device} {status:?} cap {capacity:?}");
                let load_before = r.agent(agent_id).map_or(0, |a| a.load);
                let res = r.presence(agent_id, device, status, capacity, now).map(|_| ());
                if res.is_ok()
                    && let Some(c) = capacity
                    && load_before > c
                {
                    over_ok.insert(agent_id, true);
                }
                res
            }
            75..=84 => {
                let device = next_device;
                next_device += 1;
                desc = format!("connect {agent_id} dev {device}");
                let groups_arc = groups(agent_groups);
                r.agent_connected(
                    AgentInfo { id: agent_id.into(), name: Arc::from(agent_id), groups: groups_arc },
                    device,
                    now,
                );
                devices.entry(agent_id).or_default().push(device);
                Ok(())
            }
            85..=92 => {
                let list = devices.get(agent_id).cloned().unwrap_or_default();
                let device = if list.is_empty() { 12345 } else { *rng.pick(&list) };
                desc = format!("disconnect {agent_id} dev {device}");
                r.agent_disconnected(agent_id, device, now);
                if let Some(l) = devices.get_mut(agent_id) {
                    l.retain(|d| *d != device);
                }
                Ok(())
            }
            93..=95 => {
                let visitor = format!("v{}", rng.below(40));
                let vip = rng.below(4) as i64;
                desc = format!("vip {visitor} {vip}");
                r.update_vip_level(&visitor, vip);
                Ok(())
            }
            96..=102 => {
                let visitor = format!("v{}", rng.below(40));
                desc = format!("visitor {visitor} connects");
                // Two tabs at most, device 1 and 2; a repeat changes nothing.
                let device = rng.below(2) as DeviceId + 1;
                r.visitor_connected(&UserId::from(visitor.as_str()), device, now);
                let devices = visitor_sessions.entry(visitor).or_default();
                if !devices.contains(&device) {
                    devices.push(device);
                }
                Ok(())
            }
            103..=109 => {
                let visitor = format!("v{}", rng.below(40));
                desc = format!("visitor {visitor} disconnects");
                let device = rng.below(2) as DeviceId + 1;
                r.visitor_disconnected(&visitor, device, now);
                if let Some(devices) = visitor_sessions.get_mut(&visitor) {
                    devices.retain(|d| *d != device);
                    if devices.is_empty() {
                        visitor_sessions.remove(&visitor);
                    }
                }
                Ok(())
            }
            _ => {
                now += rng.below(45_000) as u64;
                desc = format!("tick {now}");
                r.tick(now);
                Ok(())
            }
        };
        let ctx = format!("seed {seed} step {step}: {desc}");

        // Apply what the router announced, as the gateway would.
        let got = actions(&mut r);
        if result.is_err() {
            assert!(got.is_empty(), "{ctx}: a refusal announced {got:?}");
        }
        let mut assigned_now: Vec<UserId> = vec![];
        for a in &got {
            match a {
                Action::Assign { conv, agent, .. } => {
                    assert_ne!(seen.get(conv), Some(&Seen::Closed), "{ctx}: closed {conv} reassigned");
                    seen.insert(*conv, Seen::Assigned { agent: agent.id.clone() });
                    assigned_now.push(agent.id.clone());
                }
                Action::Queue { conv, group, position, .. } => {
                    assert_ne!(seen.get(conv), Some(&Seen::Closed), "{ctx}: closed {conv} requeued");
                    seen.insert(*conv, Seen::Queued { group: group.clone(), position: *position });
                }
                Action::QueuePosition { conv, group, position } => match seen.get_mut(conv) {
                    Some(Seen::Queued { group: g, position: p }) if g == group => *p = *position,
                    other => panic!("{ctx}: position for {conv} which is {other:?}"),
                },
                Action::Close { conv, .. } => {
                    assert!(
                        matches!(seen.get(conv), Some(Seen::Queued { .. } | Seen::Assigned { .. })),
                        "{ctx}"
                    );
                    seen.insert(*conv, Seen::Closed);
                }
                Action::Abandon { conv, group } => {
                    assert!(
                        matches!(seen.get(conv), Some(Seen::Queued { group: g, .. }) if g == group),
                        "{ctx}: abandoned {conv} was not waiting in {group}"
                    );
                    let visitor = &visitor_of[conv];
                    assert!(
                        !visitor_sessions.contains_key(visitor),
                        "{ctx}: {visitor} is here, {conv} abandoned"
                    );
                    seen.insert(*conv, Seen::Closed);
                }
                Action::ReplaceDevice { agent, device } => {
                    if let Some(l) = devices.get_mut(&**agent) {
                        l.retain(|d| d != device);
                    }
                }
                Action::PresenceChanged { .. } => {}
            }
        }

        // Invariants. Positions are as announced once no moved one waits
        // for the next tick.
        r.check_invariants().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let told = r.moved.is_empty();
        let mut positions: BTreeMap<GroupName, Vec<u32>> = BTreeMap::new();
        let mut per_visitor: BTreeMap<&str, usize> = BTreeMap::new();
        for (conv, s) in &seen {
            let view = r.route(*conv);
            match s {
                Seen::Closed => assert_eq!(view, None, "{ctx}: closed {conv} still routed"),
                Seen::Queued { group, position } => {
                    let v = view.unwrap_or_else(|| panic!("{ctx}: {conv} lost"));
                    let want = if told { Some(*position) } else { v.position };
                    assert_eq!(
                        (v.status, &v.group, v.position),
                        (ConvStatus::Queued, group, want),
                        "{ctx}: {conv}"
                    );
                    positions.entry(group.clone()).or_default().push(*position);
                }
                Seen::Assigned { agent } => {
                    let v = view.unwrap_or_else(|| panic!("{ctx}: {conv} lost"));
                    assert_eq!(
                        (v.status, v.agent.as_ref()),
                        (ConvStatus::Assigned, Some(agent)),
                        "{ctx}: {conv}"
                    );
                }
            }
            if *s != Seen::Closed {
                *per_visitor.entry(visitor_of[conv].as_str()).or_default() += 1;
            }
        }
        for (group, mut ps) in positions.into_iter().filter(|_| told) {
            ps.sort_unstable();
            let want: Vec<u32> = (1..=ps.len() as u32).collect();
            assert_eq!(ps, want, "{ctx}: positions in {group}");
        }
        assert!(per_visitor.values().all(|n| *n == 1), "{ctx}: a visitor with two open conversations");
        let open_count = seen.values().filter(|s| **s != Seen::Closed).count();
        let load: u32 = r.agents().map(|a| a.load).sum();
        assert_eq!(r.queued_len() + load as usize, open_count, "{ctx}: queued + assigned != open");
        for a in r.agents() {
            let key = AGENTS.iter().find(|(id, _)| **id == *a.id).map(|(id, _)| *id).unwrap_or("a0");
            if a.load <= a.capacity {
                over_ok.insert(key, false);
            }
            assert!(
                a.load <= a.capacity || over_ok.get(key).copied().unwrap_or(false),
                "{ctx}: {} holds {} with capacity {}",
                a.id,
                a.load,
                a.capacity
            );
            if assigned_now.contains(&a.id) {
                assert!(a.load <= a.capacity, "{ctx}: assigned to {} past capacity", a.id);
            }
            assert_eq!(a.devices, devices.get(&*a.id).map_or(0, Vec::len), "{ctx}: devices of {}", a.id);
        }
    }
}

#[test]
fn random_events_keep_every_invariant() {
    for seed in 1..=24 {
        let mut config = config(seed % 2 == 0);
        config.offline_grace_s = 30;
        if seed % 3 == 0 {
            config.offline_policy = OfflinePolicy::Requeue;
        }
        config.default_capacity = (seed % 4) as u32 + 1;
        config.abandon_after_s = [0, 20, 60][(seed % 3) as usize];
        config.position_update_ms = [0, 1_000, 30_000][(seed / 3 % 3) as usize];
        run_random(seed, 1500, config);
    }
}

#[test]
fn an_agent_and_a_visitor_with_the_same_id_are_kept_apart() {
    let mut r = Router::new(config(true), 1);
    online(&mut r, "42", &["sales"], 1, 5);
    online(&mut r, "bob", &["support"], 2, 5);
    // Visitor 42's conversation goes to bob; another visitor's to agent 42.
    let own = open(&mut r, "42", "support", 0);
    let theirs = open(&mut r, "v1", "sales", 0);
    assert_eq!(assigned_to(&r, own).as_deref(), Some("bob"));
    assert_eq!(assigned_to(&r, theirs).as_deref(), Some("42"));
    assert_eq!(r.open_conversation_of("42"), Some(own), "the visitor's, not the agent's");
    assert_eq!(r.conversations_of("42").collect::<Vec<_>>(), [theirs], "the agent's, not the visitor's");
    // Visitor 42 may not close agent 42's conversation, nor agent 42 visitor 42's.
    assert_eq!(r.close(&visitor_actor("42"), theirs), Err(RouteError::NotFound));
    assert_eq!(r.close(&agent_actor("42", &["sales"]), own), Err(RouteError::NotFound));
    assert_eq!(
        r.transfer(&agent_actor("42", &["sales"]), own, TransferTarget::Group("sales".into())),
        Err(RouteError::NotFound)
    );
    r.check_invariants().unwrap();
}

#[test]
fn accept_transfer_and_close_judge_an_agents_groups_alike() {
    let mut r = Router::new(config(false), 1);
    online(&mut r, "a1", &["sales"], 1, 5);
    let billing = open(&mut r, "v1", "billing", 0);
    let sales = open(&mut r, "v2", "sales", 0);
    // a1 signs in again with a token for billing only; its first session
    // still carries the sales token.
    r.agent_connected(info("a1", &["billing"]), 2, T0);
    let old_session = agent_actor("a1", &["sales"]);
    assert_eq!(r.close(&old_session, sales).map(|_| ()), Err(RouteError::NotFound), "as accept would");
    assert_eq!(r.accept("a1", sales), Err(RouteError::NotFound));
    assert!(r.close(&old_session, billing).is_ok(), "the newest token's group");
}

// ---- queue positions, told once per tick ----

#[test]
fn dequeues_within_one_tick_tell_each_moved_conversation_once_after_it() {
    let mut r = Router::new(config(false), 1);
    online(&mut r, "a1", &[], 1, 5);
    actions(&mut r);
    let waiting: Vec<ConvId> = (0..10).map(|n| open(&mut r, &format!("v{n}"), "g", 0)).collect();
    let entered = actions(&mut r);
    assert_eq!(entered.len(), 10, "each is told its place as it enters: {entered:?}");
    assert_eq!(r.next_deadline(), None, "appending moves nobody");
    // A first dequeue: due at once, since nothing was announced before.
    r.accept("a1", waiting[0]).unwrap();
    actions(&mut r);
    r.tick(T0);
    assert_eq!(actions(&mut r).len(), 9);
    // Three more within one tick: nothing yet, then one update for each
    // of the six still waiting, with its place after all three.
    for &c in &waiting[1..4] {
        r.accept("a1", c).unwrap();
    }
    let got = actions(&mut r);
    assert!(got.iter().all(|a| matches!(a, Action::Assign { .. })), "{got:?}");
    assert_eq!(r.next_deadline(), Some(T0 + 1_000), "routing.position_update_ms after the last");
    r.tick(T0 + 999);
    assert!(actions(&mut r).is_empty(), "not before the tick");
    r.tick(T0 + 1_000);
    let want: Vec<Action> = waiting[4..]
        .iter()
        .enumerate()
        .map(|(i, &conv)| Action::QueuePosition { conv, group: "g".into(), position: i as u32 + 1 })
        .collect();
    assert_eq!(actions(&mut r), want);
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn a_conversation_entering_the_queue_is_told_at_once_and_those_it_passes_at_the_tick() {
    let mut r = Router::new(config(false), 1);
    let plain = open(&mut r, "v1", "g", 0);
    r.tick(T0);
    actions(&mut r);
    let gold = open(&mut r, "v2", "g", 5);
    assert_eq!(
        actions(&mut r),
        [Action::Queue {
            conv: gold,
            group: "g".into(),
            position: 1,
            previous: None,
            reason: QueueReason::Opened,
            left_queue: None
        }]
    );
    assert_eq!(position(&r, plain), Some(2), "the router knows at once");
    r.tick(T0 + 1_000);
    assert_eq!(actions(&mut r), [Action::QueuePosition { conv: plain, group: "g".into(), position: 2 }]);
}

#[test]
fn positions_that_move_back_before_the_tick_are_not_told() {
    let mut r = Router::new(config(false), 1);
    let first = open(&mut r, "v1", "g", 0);
    let second = open(&mut r, "v2", "g", 0);
    r.tick(T0);
    actions(&mut r);
    // `first` leaves and comes back (a transfer away and back): `second`
    // went to 1 and back to 2 within the tick.
    let s1 = agent_actor("s1", &[]);
    r.transfer(&s1, first, TransferTarget::Group("other".into())).unwrap();
    r.transfer(&s1, first, TransferTarget::Group("g".into())).unwrap();
    actions(&mut r);
    r.tick(T0 + 1_000);
    assert!(actions(&mut r).is_empty(), "{second} is where it was told it is");
}

// ---- abandoned conversations ----

fn abandon_config(abandon_after_s: u64) -> RoutingConfig {
    RoutingConfig { abandon_after_s, ..config(false) }
}

/// A visitor connects (one session) and opens.
fn visit(r: &mut Router, visitor: &str, now: u64) -> ConvId {
    r.visitor_connected(&UserId::from(visitor), 1, now);
    open(r, visitor, "g", 0)
}

#[test]
fn a_waiting_conversation_whose_visitor_stays_gone_is_abandoned() {
    let mut r = Router::new(abandon_config(300), 1);
    let ghost = visit(&mut r, "v1", T0);
    let next = visit(&mut r, "v2", T0);
    assert_eq!(r.next_deadline(), None, "both visitors are here");
    r.visitor_disconnected("v1", 1, T0 + 5_000);
    assert_eq!(r.next_deadline(), Some(T0 + 305_000));
    r.tick(T0 + 304_999);
    assert_eq!(position(&r, ghost), Some(1), "not before");
    actions(&mut r);
    r.tick(T0 + 305_000);
    assert_eq!(
        actions(&mut r),
        [
            Action::Abandon { conv: ghost, group: "g".into() },
            Action::QueuePosition { conv: next, group: "g".into(), position: 1 },
        ]
    );
    assert_eq!(r.route(ghost), None);
    assert_eq!(r.open_conversation_of("v1"), None, "back later, they open a new one");
    assert_eq!(r.queued_len(), 1);
}

#[test]
fn a_visitor_back_in_time_keeps_their_place() {
    let mut r = Router::new(abandon_config(300), 1);
    let first = visit(&mut r, "v1", T0);
    let second = visit(&mut r, "v2", T0);
    r.visitor_disconnected("v1", 1, T0);
    r.visitor_connected(&UserId::from("v1"), 2, T0 + 299_000);
    assert_eq!(r.next_deadline(), None);
    r.tick(T0 + 3_600_000);
    assert_eq!(queue(&r, "g"), [first, second]);
    // With two tabs, closing one leaves the visitor here.
    r.visitor_connected(&UserId::from("v1"), 3, T0);
    r.visitor_disconnected("v1", 2, T0);
    assert_eq!(r.next_deadline(), None, "one tab is still open");
    // A session the router never counted (its `Hello` refused) going, or
    // a stranger's, changes nothing.
    r.visitor_disconnected("v1", 9, T0);
    r.visitor_disconnected("stranger", 1, T0);
    assert_eq!(r.next_deadline(), None, "tab 3 is still open");
    r.check_invariants().unwrap();
}

#[test]
fn ghosts_no_longer_keep_real_visitors_out_of_a_full_queue() {
    let mut r = Router::new(RoutingConfig { max_queued: 3, ..abandon_config(60) }, 1);
    for n in 0..3 {
        let ghost = format!("anon{n}");
        visit(&mut r, &ghost, T0);
        r.visitor_disconnected(&ghost, 1, T0);
    }
    r.visitor_connected(&UserId::from("real"), 1, T0);
    let req = || OpenRequest { visitor: "real".into(), group: "g".into(), vip_level: 0 };
    assert_eq!(r.open(req()), Err(RouteError::QueueFull), "the queue is full of ghosts");
    r.tick(T0 + 60_000);
    assert_eq!(r.queued_len(), 0);
    assert!(r.open(req()).is_ok(), "room for the real visitor");
}

#[test]
fn an_assigned_conversation_is_not_abandoned_until_it_waits_again() {
    let config =
        RoutingConfig { offline_policy: OfflinePolicy::Requeue, auto_assign: true, ..abandon_config(300) };
    let mut r = Router::new(config, 1);
    online(&mut r, "a1", &[], 1, 5);
    let c = visit(&mut r, "v1", T0);
    assert_eq!(assigned_to(&r, c).as_deref(), Some("a1"));
    r.visitor_disconnected("v1", 1, T0);
    assert_eq!(r.next_deadline(), None, "the agent may still answer");
    // Its agent goes: back in the queue, where its visitor has been gone
    // since T0, so it is abandoned at T0 + 300 s, not 300 s after the requeue.
    r.agent_disconnected("a1", 1, T0 + 100_000);
    r.tick(T0 + 160_000);
    assert_eq!(position(&r, c), Some(1));
    assert_eq!(r.next_deadline(), Some(T0 + 300_000));
    actions(&mut r);
    r.tick(T0 + 300_000);
    assert_eq!(actions(&mut r), [Action::Abandon { conv: c, group: "g".into() }]);
}

#[test]
fn after_a_restore_waiting_conversations_get_a_fresh_period() {
    let mut r = Router::new(abandon_config(300), 1);
    let route = |conv, visitor: &str| RestoredRoute {
        conv: ConvId(conv),
        visitor: visitor.into(),
        group: "g".into(),
        vip_level: 0,
        agent: None,
    };
    r.restore([route(1, "v1"), route(2, "v2")], T0);
    assert_eq!(r.next_deadline(), Some(T0 + 300_000), "nobody is connected after a restart");
    r.visitor_connected(&UserId::from("v2"), 1, T0 + 1_000);
    r.tick(T0 + 300_000);
    assert_eq!(
        actions(&mut r),
        [
            Action::Abandon { conv: ConvId(1), group: "g".into() },
            Action::QueuePosition { conv: ConvId(2), group: "g".into(), position: 1 },
        ],
        "one tick closes, then tells who moved up"
    );
    assert_eq!(queue(&r, "g"), [ConvId(2)], "the visitor who came back stays");
}

#[test]
fn abandon_after_zero_never_abandons() {
    let mut r = Router::new(abandon_config(0), 1);
    let c = visit(&mut r, "v1", T0);
    r.visitor_disconnected("v1", 1, T0);
    assert_eq!(r.next_deadline(), None);
    r.tick(T0 + 7 * 24 * 3_600_000);
    assert_eq!(position(&r, c), Some(1));
}
