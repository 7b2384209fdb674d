//! The router: which agent gets which conversation, and who waits where.
//!
//! There is one router (on shard 0), because every decision needs the whole
//! picture: every agent's status, groups, capacity and load, and every
//! waiting visitor. Decisions are rare next to messages (an open, a close,
//! a transfer, a presence change), so one owner costs nothing and needs no
//! locks. The router owns only *open* conversations; a closed one is
//! forgotten (its home shard still answers for it).
//!
//! ## The rules
//!
//! - **Queues.** Each group has a queue. Higher `meta.vip_level` first,
//!   then first come, first served. "First come" is the conversation id
//!   (ids are handed out in opening order), so a conversation that comes
//!   back to a queue (transfer to a group, agent offline) keeps its place
//!   in line instead of starting over. Positions are 1..n per group. A
//!   conversation that enters a queue is told its position at once
//!   ([`Action::Queue`]); the positions that other operations move are
//!   announced together ([`Action::QueuePosition`]), at most once per
//!   `routing.position_update_ms`, by [`Router::tick`]: a dequeue with
//!   50,000 waiting moves 50,000 positions, and a burst of dequeues should
//!   cost one announcement each, not one per dequeue.
//! - **Who serves what.** An agent serves the groups of its token; an agent
//!   with no groups serves every group ([`crate::identity::serves`]).
//! - **Auto-assign** (`routing.auto_assign`, default on): whenever a
//!   conversation waits and an agent is `online` with free capacity in its
//!   group, it is assigned, highest priority first, to the least-loaded
//!   such agent (fewest conversations; ties go to the agent idle longest,
//!   then the smaller id). Off: conversations wait for `accept`.
//! - **Capacity.** An agent holds at most `capacity` conversations
//!   (`routing.default_capacity`, or the agent's `presence.capacity`). The
//!   router never assigns past it, by any path. Lowering capacity below the
//!   current load keeps the conversations and takes no new ones.
//! - **Accept** needs the conversation queued in a group the agent serves
//!   (else `not_found`: the agent cannot see it), the agent `online`, with
//!   free capacity (else `conflict`). Accepting one's own conversation
//!   again is fine. One already taken by another agent is `conflict`.
//! - **Transfer** (by the assigned agent, or by an agent serving the group
//!   of a queued conversation) to an agent: the target must exist (else
//!   `not_found`) and be `online` with free capacity (else `conflict`). To
//!   `group:NAME`: the conversation is queued in that group, and the agent
//!   who gave it away is skipped when auto-assign picks an agent for it.
//! - **Close** (by the visitor, the assigned agent, an agent serving the
//!   group of a queued conversation, or a bot) frees capacity, which
//!   assigns the next waiting conversation.
//! - **Offline.** Presence is aggregated per agent ([`crate::presence`]).
//!   With `routing.offline_policy = "keep"` an offline agent keeps its
//!   conversations. With `"requeue"`, still offline `offline_grace_s` after
//!   going offline, its conversations go back to their queues. Coming back
//!   online (or away) within the grace period cancels that. Time only moves
//!   through [`Router::tick`]; [`Router::next_deadline`] says when to call it.
//! - **Abandoned.** The router counts each visitor's connected sessions
//!   ([`Router::visitor_connected`], [`Router::visitor_disconnected`]). A
//!   conversation that waits in a queue while no session of its visitor has
//!   been connected for `routing.abandon_after_s` is closed
//!   ([`Action::Abandon`]), so that the queue (and `routing.max_queued`)
//!   holds people, not the ghosts of tabs closed long ago. A visitor back in
//!   time keeps their place. After a restart nobody is connected yet, so
//!   every queued conversation starts a fresh period.
//!
//! ## Outputs
//!
//! Every operation changes state at once and queues [`Action`]s, which the
//! gateway drains with [`Router::poll_action`]: first make each decision
//! durable, then announce it (PROTOCOL.md, "Guarantees"). A conversation
//! that enters a queue and is assigned within the same operation is only
//! announced as assigned.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use kefu_proto::ids::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};

use crate::config::{OfflinePolicy, RoutingConfig};
use crate::identity::{Actor, AgentRef, GroupName, UserId, serves};
use crate::presence::{DeviceId, Presence};
use crate::session::TransferTarget;

/// Why a conversation was assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignReason {
    /// Auto-assign picked the agent.
    Auto,
    /// The agent accepted it.
    Accepted,
    /// It was transferred to the agent.
    Transferred,
}

/// Why a conversation entered a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueReason {
    /// The visitor opened it.
    Opened,
    /// Transferred to the group.
    Transferred,
    /// Its agent stayed offline past the grace period (`requeue` policy).
    AgentOffline,
}

/// A decision for the gateway to persist, then announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `conv` is now assigned to `agent`.
    Assign {
        /// The conversation.
        conv: ConvId,
        /// Its new agent.
        agent: AgentRef,
        /// Its group.
        group: GroupName,
        /// The agent who had it before (a transfer), to be told.
        previous: Option<UserId>,
        /// Why.
        reason: AssignReason,
        /// The group whose queue it left, where that group's agents saw
        /// it wait: they are told it was taken. Usually `group`; another
        /// one when it was transferred out of a queue and assigned at once.
        left_queue: Option<GroupName>,
    },
    /// `conv` now waits in `group` at `position`.
    Queue {
        /// The conversation.
        conv: ConvId,
        /// Its group.
        group: GroupName,
        /// 1-based position in that group's queue.
        position: u32,
        /// The agent who had it before, to be told.
        previous: Option<UserId>,
        /// Why.
        reason: QueueReason,
        /// The other group whose queue it left (a transfer between
        /// queues), where that group's agents saw it wait: they are told
        /// it went.
        left_queue: Option<GroupName>,
    },
    /// A waiting conversation moved in its queue.
    QueuePosition {
        /// The conversation.
        conv: ConvId,
        /// Its group.
        group: GroupName,
        /// Its new 1-based position.
        position: u32,
    },
    /// `conv` is closed.
    Close {
        /// The conversation.
        conv: ConvId,
        /// The agent who had it, to be told.
        agent: Option<UserId>,
        /// Who closed it.
        by: Role,
        /// The group whose queue it left, where that group's agents saw it
        /// wait: they are told it went.
        left_queue: Option<GroupName>,
    },
    /// An agent's aggregate status changed: tell the agents.
    PresenceChanged {
        /// The agent.
        agent: UserId,
        /// The new status.
        status: PresenceStatus,
    },
    /// `conv` waited in `group` with no session of its visitor connected
    /// for `routing.abandon_after_s`: it is closed (as abandoned).
    Abandon {
        /// The conversation.
        conv: ConvId,
        /// The group it waited in (its agents see it go).
        group: GroupName,
    },
    /// An agent connected one device too many: close this one with 4002.
    ReplaceDevice {
        /// The agent.
        agent: UserId,
        /// The connection to close.
        device: DeviceId,
    },
}

/// Why the router refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No such open conversation, or not one the actor may touch.
    #[error("no such conversation")]
    NotFound,
    /// No such agent (transfer target).
    #[error("no such agent")]
    NoSuchAgent,
    /// The state does not allow it now.
    #[error("{0}")]
    Conflict(&'static str),
    /// The actor's role may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// Invalid argument.
    #[error("{0}")]
    BadCommand(&'static str),
    /// All queues are full (`routing.max_queued`).
    #[error("too many visitors are waiting; try again later")]
    QueueFull,
}

impl RouteError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::NotFound | RouteError::NoSuchAgent => ErrorCode::NotFound,
            RouteError::Conflict(_) => ErrorCode::Conflict,
            RouteError::Forbidden(_) => ErrorCode::Forbidden,
            RouteError::BadCommand(_) => ErrorCode::BadCommand,
            RouteError::QueueFull => ErrorCode::Unavailable,
        }
    }
}

/// A visitor's `open`, resolved by the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// The visitor.
    pub visitor: UserId,
    /// The group to queue in.
    pub group: GroupName,
    /// Queue priority (higher first).
    pub vip_level: i64,
}

/// The answer to `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The visitor's open conversation.
    pub conv: ConvId,
    /// Whether it was created now (else it was already open: no actions).
    pub created: bool,
}

/// The answer to `accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Assigned now (an [`Action::Assign`] follows).
    Assigned,
    /// It already was this agent's.
    AlreadyYours,
}

/// An agent as its token describes it, at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// User id.
    pub id: UserId,
    /// Display name.
    pub name: Arc<str>,
    /// Groups served (empty: all).
    pub groups: Arc<[GroupName]>,
}

/// An open conversation as the durable record has it, to rebuild the
/// router at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredRoute {
    /// The conversation.
    pub conv: ConvId,
    /// Its visitor.
    pub visitor: UserId,
    /// Its group.
    pub group: GroupName,
    /// Queue priority.
    pub vip_level: i64,
    /// The agent it is assigned to, or `None` if queued.
    pub agent: Option<AgentRef>,
}

/// An open conversation as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    /// Its visitor.
    pub visitor: UserId,
    /// Its group.
    pub group: GroupName,
    /// Queue priority.
    pub vip_level: i64,
    /// Queued or assigned.
    pub status: ConvStatus,
    /// The agent, if assigned.
    pub agent: Option<UserId>,
    /// 1-based queue position, if queued.
    pub position: Option<u32>,
}

/// An agent as the router sees it (for the console's agent list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// User id.
    pub id: UserId,
    /// Display name.
    pub name: Arc<str>,
    /// Groups served.
    pub groups: Arc<[GroupName]>,
    /// Aggregate status.
    pub status: PresenceStatus,
    /// Conversations it may hold.
    pub capacity: u32,
    /// Conversations it holds.
    pub load: u32,
    /// Connected devices.
    pub devices: usize,
}

#[derive(Debug)]
struct Agent {
    name: Arc<str>,
    groups: Arc<[GroupName]>,
    presence: Presence,
    capacity: u32,
    convs: BTreeSet<ConvId>,
    /// Value of the router's assignment clock at its last assignment.
    last_assigned: u64,
    /// While offline: when the grace period ends.
    offline_deadline: Option<u64>,
}

impl Agent {
    fn load(&self) -> u32 {
        u32::try_from(self.convs.len()).unwrap_or(u32::MAX)
    }

    fn has_room(&self) -> bool {
        self.load() < self.capacity
    }

    fn available(&self) -> bool {
        self.presence.status() == PresenceStatus::Online && self.has_room()
    }
}

#[derive(Debug)]
enum State {
    Queued {
        /// The position last announced (0: not yet).
        announced: u32,
        /// Not yet announced: why it entered the queue, who had it, and
        /// the queue it left for this one, if its agents saw it wait.
        entered: Option<Entered>,
        /// Skipped by auto-assign (the agent who transferred it here).
        avoid: Option<UserId>,
    },
    Assigned {
        agent: UserId,
    },
}

/// How a conversation entered its queue, until that is announced.
#[derive(Debug)]
struct Entered {
    reason: QueueReason,
    /// The agent who had it.
    previous: Option<UserId>,
    /// The group whose queue it came from (a transfer), if that group's
    /// agents were shown it waiting there.
    left: Option<GroupName>,
}

impl Entered {
    fn new(reason: QueueReason, previous: Option<UserId>) -> Option<Self> {
        Some(Self { reason, previous, left: None })
    }
}

impl Entry {
    /// The group whose agents have been shown it waiting and not yet told
    /// it went: its own once its entering the queue was announced (one
    /// assigned in the same operation that queued it was never shown
    /// there), or the queue a transfer took it from.
    fn shown_queue(&self) -> Option<GroupName> {
        match &self.state {
            State::Queued { entered: None, .. } => Some(self.group.clone()),
            State::Queued { entered: Some(e), .. } => e.left.clone(),
            State::Assigned { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    visitor: UserId,
    group: GroupName,
    vip: i64,
    state: State,
    /// When the visitor's last session went (`None` while one is connected):
    /// while queued, the conversation is abandoned `abandon_after_s` later.
    gone_since: Option<u64>,
}

/// Queue order: higher VIP level first, then lower conversation id.
type QueueKey = (Reverse<i64>, ConvId);

/// A group's waiting conversations in queue order. A deque, because the
/// usual dequeue is the first in line (O(1)), and positions are indexes,
/// found by binary search.
type Queue = VecDeque<QueueKey>;

fn key(vip: i64, conv: ConvId) -> QueueKey {
    (Reverse(vip), conv)
}

/// The router. See the module doc for its rules.
#[derive(Debug)]
pub struct Router {
    config: RoutingConfig,
    agents: BTreeMap<UserId, Agent>,
    convs: BTreeMap<ConvId, Entry>,
    /// Per group, waiting conversations in queue order.
    queues: BTreeMap<GroupName, Queue>,
    by_visitor: BTreeMap<UserId, ConvId>,
    queued: usize,
    next_conv: u64,
    assign_clock: u64,
    /// Connected sessions (devices) per visitor (none: absent from the
    /// map). Devices rather than a count: a session whose `Hello` a full
    /// backlog refused still sends its goodbye, which must not count
    /// another tab out.
    visitors: HashMap<UserId, Vec<DeviceId>>,
    /// Queued conversations whose visitor is gone, by when they are
    /// abandoned: the first is the next abandon deadline.
    abandons: BTreeSet<(u64, ConvId)>,
    /// Per group, the first queue index whose position may have moved since
    /// positions were last announced; the ones before it are announced.
    moved: BTreeMap<GroupName, usize>,
    /// When positions were last announced.
    positions_announced_ms: Option<u64>,
    /// Conversations that entered a queue in the current operation, to be
    /// told their position at its end.
    entered: Vec<ConvId>,
    /// The latest time an input carried: when a conversation is opened by a
    /// visitor with no session (which the edges' ordering rules out), its
    /// visitor counts as gone since then.
    clock_ms: u64,
    actions: VecDeque<Action>,
    /// The first offline grace period's end, kept as deadlines are set and
    /// cleared, so [`Router::next_deadline`] costs nothing: the gateway asks
    /// after every command.
    deadline_hint: Option<u64>,
}

impl Router {
    /// An empty router that numbers new conversations from `next_conv_id`
    /// (one more than the largest id in storage).
    pub fn new(config: RoutingConfig, next_conv_id: u64) -> Router {
        Router {
            config,
            agents: BTreeMap::new(),
            convs: BTreeMap::new(),
            queues: BTreeMap::new(),
            by_visitor: BTreeMap::new(),
            queued: 0,
            next_conv: next_conv_id.max(1),
            assign_clock: 0,
            visitors: HashMap::new(),
            abandons: BTreeSet::new(),
            moved: BTreeMap::new(),
            positions_announced_ms: None,
            entered: Vec::new(),
            clock_ms: 0,
            actions: VecDeque::new(),
            deadline_hint: None,
        }
    }

    /// The next decision to persist and announce.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Rebuilds the open conversations at start, silently (no actions;
    /// nobody is connected yet). Queues are sorted once at the end, so a
    /// large backlog restores in O(n log n). An agent named here who has not
    /// connected is offline, and under `requeue` its conversations go back
    /// to the queue once the grace period from `now_ms` ends. No visitor is
    /// connected yet either: a queued conversation is abandoned
    /// `abandon_after_s` after `now_ms` unless its visitor comes back. Call
    /// it before any agent or visitor connects.
    ///
    /// Returns the conversations it refused: a second open conversation of
    /// the same visitor (a visitor has one at most), which the gateway
    /// should close. Repeated ids are ignored.
    pub fn restore(&mut self, routes: impl IntoIterator<Item = RestoredRoute>, now_ms: u64) -> Vec<ConvId> {
        let grace_ms = self.grace_ms();
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut refused = Vec::new();
        for r in routes {
            if self.convs.contains_key(&r.conv) {
                continue;
            }
            if self.by_visitor.contains_key(&r.visitor) {
                refused.push(r.conv);
                continue;
            }
            self.next_conv = self.next_conv.max(r.conv.0 + 1);
            self.by_visitor.insert(r.visitor.clone(), r.conv);
            let state = match &r.agent {
                None => {
                    self.queues.entry(r.group.clone()).or_default().push_back(key(r.vip_level, r.conv));
                    self.queued += 1;
                    State::Queued { announced: 0, entered: None, avoid: None }
                }
                Some(a) => {
                    let agent = self.agents.entry(a.id.clone()).or_insert_with(|| Agent {
                        name: a.name.clone(),
                        groups: Arc::from([]),
                        presence: Presence::new(self.config.max_devices_per_agent),
                        capacity: self.config.default_capacity,
                        convs: BTreeSet::new(),
                        last_assigned: 0,
                        offline_deadline: Some(now_ms.saturating_add(grace_ms)),
                    });
                    agent.convs.insert(r.conv);
                    let d = now_ms.saturating_add(grace_ms);
                    self.deadline_hint = Some(self.deadline_hint.map_or(d, |h| h.min(d)));
                    State::Assigned { agent: a.id.clone() }
                }
            };
            let gone_since = Some(now_ms);
            let entry = Entry { visitor: r.visitor, group: r.group, vip: r.vip_level, state, gone_since };
            self.convs.insert(r.conv, entry);
        }
        let abandon_at = self.abandon_ms().map(|ms| now_ms.saturating_add(ms));
        for q in self.queues.values_mut() {
            let mut sorted = Vec::from(std::mem::take(q));
            sorted.sort_unstable();
            sorted.dedup();
            *q = Queue::from(sorted);
            for (i, (_, c)) in q.iter().enumerate() {
                if let Some(Entry { state: State::Queued { announced, .. }, .. }) = self.convs.get_mut(c) {
                    *announced = position(i);
                }
                if let Some(at) = abandon_at {
                    self.abandons.insert((at, *c));
                }
            }
        }
        refused
    }

    /// A visitor opens a conversation (or gets the one already open).
    pub fn open(&mut self, req: OpenRequest) -> Result<Opened, RouteError> {
        if let Some(&conv) = self.by_visitor.get(&req.visitor) {
            return Ok(Opened { conv, created: false });
        }
        if self.queued >= self.config.max_queued {
            return Err(RouteError::QueueFull);
        }
        let conv = ConvId(self.next_conv);
        self.next_conv += 1;
        self.by_visitor.insert(req.visitor.clone(), conv);
        let state =
            State::Queued { announced: 0, entered: Entered::new(QueueReason::Opened, None), avoid: None };
        let gone_since = (!self.visitors.contains_key(&req.visitor)).then_some(self.clock_ms);
        let entry = Entry { visitor: req.visitor, group: req.group, vip: req.vip_level, state, gone_since };
        self.convs.insert(conv, entry);
        self.insert_queued(conv);
        self.finish();
        Ok(Opened { conv, created: true })
    }

    /// An agent takes a queued conversation.
    pub fn accept(&mut self, agent_id: &str, conv: ConvId) -> Result<Accepted, RouteError> {
        let entry = self.convs.get(&conv).ok_or(RouteError::NotFound)?;
        let agent = self.agents.get(agent_id).ok_or(RouteError::Conflict("agent is not connected"))?;
        let visible = serves(&agent.groups, &entry.group);
        match &entry.state {
            State::Assigned { agent: a } if **a == *agent_id => return Ok(Accepted::AlreadyYours),
            State::Assigned { .. } if visible => {
                return Err(RouteError::Conflict("already taken by another agent"));
            }
            State::Assigned { .. } => return Err(RouteError::NotFound),
            State::Queued { .. } if !visible => return Err(RouteError::NotFound),
            State::Queued { .. } => {}
        }
        if agent.presence.status() != PresenceStatus::Online {
            return Err(RouteError::Conflict("set presence online to accept conversations"));
        }
        if !agent.has_room() {
            return Err(RouteError::Conflict("at capacity"));
        }
        let id = UserId::from(agent_id);
        self.remove_queued(conv);
        self.assign(conv, &id, AssignReason::Accepted, None);
        self.finish();
        Ok(Accepted::Assigned)
    }

    /// Whether `by` may transfer or close `entry` (visitors: close only).
    fn may_manage(&self, by: &Actor, entry: &Entry) -> bool {
        match by.role {
            Role::Bot => true,
            Role::Visitor => entry.visitor == by.id,
            // An agent's groups are its newest token's, as `accept` judges
            // them: a session opened with an older token has neither more
            // nor fewer rights than the agent's other sessions.
            Role::Agent => match &entry.state {
                State::Assigned { agent } => *agent == by.id,
                State::Queued { .. } => {
                    let groups = self.agents.get(&by.id).map_or(&by.groups, |a| &a.groups);
                    serves(groups, &entry.group)
                }
            },
        }
    }

    /// Hands a conversation to an agent or back to a group's queue.
    pub fn transfer(&mut self, by: &Actor, conv: ConvId, to: TransferTarget) -> Result<(), RouteError> {
        if by.role == Role::Visitor {
            return Err(RouteError::Forbidden("visitors may not transfer"));
        }
        let entry = self.convs.get(&conv).ok_or(RouteError::NotFound)?;
        if !self.may_manage(by, entry) {
            return Err(RouteError::NotFound);
        }
        let previous = match &entry.state {
            State::Assigned { agent } => Some(agent.clone()),
            State::Queued { .. } => None,
        };
        match to {
            TransferTarget::Agent(target) => {
                if previous.as_ref() == Some(&target) {
                    return Err(RouteError::Conflict("already assigned to that agent"));
                }
                let t = self.agents.get(&target).ok_or(RouteError::NoSuchAgent)?;
                if t.presence.status() != PresenceStatus::Online {
                    return Err(RouteError::Conflict("that agent is not online"));
                }
                if !t.has_room() {
                    return Err(RouteError::Conflict("that agent is at capacity"));
                }
                self.unassign_or_dequeue(conv);
                self.assign(conv, &target, AssignReason::Transferred, previous);
            }
            TransferTarget::Group(group) => {
                if previous.is_none() && entry.group == group {
                    return Err(RouteError::Conflict("already queued in that group"));
                }
                // Another group's agents saw it wait: they must see it go.
                let left = entry.shown_queue();
                self.unassign_or_dequeue(conv);
                let avoid = previous.clone().or_else(|| (by.role == Role::Agent).then(|| by.id.clone()));
                if let Some(e) = self.convs.get_mut(&conv) {
                    e.group = group;
                    let entered = Entered { reason: QueueReason::Transferred, previous, left };
                    e.state = State::Queued { announced: 0, entered: Some(entered), avoid };
                }
                self.insert_queued(conv);
            }
        }
        self.finish();
        Ok(())
    }

    /// Closes a conversation. Returns the agent who had it.
    pub fn close(&mut self, by: &Actor, conv: ConvId) -> Result<Option<UserId>, RouteError> {
        let entry = self.convs.get(&conv).ok_or(RouteError::NotFound)?;
        if !self.may_manage(by, entry) {
            return Err(RouteError::NotFound);
        }
        let agent = match &entry.state {
            State::Assigned { agent } => Some(agent.clone()),
            State::Queued { .. } => None,
        };
        let left_queue = entry.shown_queue();
        self.unassign_or_dequeue(conv);
        if let Some(e) = self.convs.remove(&conv) {
            self.by_visitor.remove(&e.visitor);
        }
        self.actions.push_back(Action::Close { conv, agent: agent.clone(), by: by.role, left_queue });
        self.finish();
        Ok(agent)
    }

    /// A profile change (`SyncUser`) moved a visitor's priority: its
    /// waiting conversation moves in line.
    pub fn update_vip_level(&mut self, visitor: &str, vip_level: i64) {
        let Some(&conv) = self.by_visitor.get(visitor) else { return };
        let Some(entry) = self.convs.get(&conv) else { return };
        if entry.vip == vip_level {
            return;
        }
        let queued = matches!(entry.state, State::Queued { .. });
        if queued {
            self.remove_queued(conv);
        }
        if let Some(e) = self.convs.get_mut(&conv) {
            e.vip = vip_level;
        }
        if queued {
            self.insert_queued(conv);
        }
        self.finish();
    }

    /// An agent's device connected at `now_ms`. Name and groups follow the
    /// newest token.
    pub fn agent_connected(&mut self, info: AgentInfo, device: DeviceId, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        let max_devices = self.config.max_devices_per_agent;
        let capacity = self.config.default_capacity;
        let agent = self.agents.entry(info.id.clone()).or_insert_with(|| Agent {
            name: info.name.clone(),
            groups: info.groups.clone(),
            presence: Presence::new(max_devices),
            capacity,
            convs: BTreeSet::new(),
            last_assigned: 0,
            offline_deadline: None,
        });
        agent.name = info.name;
        agent.groups = info.groups;
        let out = agent.presence.connect(device, now_ms);
        if let Some(device) = out.replaced {
            self.actions.push_back(Action::ReplaceDevice { agent: info.id.clone(), device });
        }
        if let Some(status) = out.changed {
            self.status_changed(&info.id, status, now_ms);
        }
        self.finish();
    }

    /// An agent's device disconnected at `now_ms`.
    pub fn agent_disconnected(&mut self, agent_id: &str, device: DeviceId, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        let grace_ms = self.grace_ms();
        let Some(id) = self.agents.get_key_value(agent_id).map(|(id, _)| id.clone()) else { return };
        let Some(agent) = self.agents.get_mut(&id) else { return };
        if let Some(status) = agent.presence.disconnect(device, now_ms, grace_ms) {
            self.status_changed(&id, status, now_ms);
        }
        self.forget_if_idle(&id);
        self.finish();
    }

    /// A session (`device`) of `visitor` connected at `now_ms`. If it is
    /// the only one, the visitor is back: a waiting conversation of theirs
    /// is no longer on its way to being abandoned.
    pub fn visitor_connected(&mut self, visitor: &UserId, device: DeviceId, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        // Most visitors have one tab: room for one, not the four of a
        // `Vec`'s first push.
        let devices = self.visitors.entry(visitor.clone()).or_insert_with(|| Vec::with_capacity(1));
        if !devices.contains(&device) {
            devices.push(device);
        }
        if devices.len() == 1
            && let Some(&conv) = self.by_visitor.get(visitor)
        {
            self.set_gone_since(conv, None);
        }
        self.finish();
    }

    /// A session (`device`) of `visitor` disconnected at `now_ms`. If it
    /// was the last, a waiting conversation of theirs is abandoned
    /// `abandon_after_s` later unless they come back. A session the router
    /// did not count is ignored.
    pub fn visitor_disconnected(&mut self, visitor: &str, device: DeviceId, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        let Some(devices) = self.visitors.get_mut(visitor) else { return };
        let Some(i) = devices.iter().position(|d| *d == device) else { return };
        devices.swap_remove(i);
        if devices.is_empty() {
            self.visitors.remove(visitor);
            if let Some(&conv) = self.by_visitor.get(visitor) {
                self.set_gone_since(conv, Some(now_ms));
            }
        }
        self.finish();
    }

    /// `presence {status, capacity}` from one of the agent's devices.
    /// Returns the agent's status after it.
    pub fn presence(
        &mut self,
        agent_id: &str,
        device: DeviceId,
        status: PresenceStatus,
        capacity: Option<u32>,
        now_ms: u64,
    ) -> Result<PresenceStatus, RouteError> {
        self.clock_ms = self.clock_ms.max(now_ms);
        if capacity.is_some_and(|c| c > self.config.max_capacity) {
            return Err(RouteError::BadCommand("presence.capacity is above routing.max_capacity"));
        }
        let Some(id) = self.agents.get_key_value(agent_id).map(|(id, _)| id.clone()) else {
            return Err(RouteError::Conflict("agent is not connected"));
        };
        let Some(agent) = self.agents.get_mut(&id) else {
            return Err(RouteError::Conflict("agent is not connected"));
        };
        let changed = agent
            .presence
            .set(device, status)
            .map_err(|_| RouteError::Conflict("device is not connected"))?;
        if let Some(c) = capacity {
            agent.capacity = c;
        }
        if let Some(status) = changed {
            self.status_changed(&id, status, now_ms);
        }
        self.finish();
        Ok(status)
    }

    /// Lets time pass: applies the offline policy to agents whose grace
    /// period ended by `now_ms`, closes the conversations abandoned by then,
    /// and, if `routing.position_update_ms` has passed since the last time,
    /// announces the queue positions that moved since.
    pub fn tick(&mut self, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.requeue_offline(now_ms);
        while let Some(&(at, conv)) = self.abandons.first() {
            if at > now_ms {
                break;
            }
            self.abandon(conv);
        }
        self.finish();
        if self.positions_due().is_some_and(|due| due <= now_ms) {
            self.announce_positions();
            self.positions_announced_ms = Some(now_ms);
        }
        #[cfg(test)]
        assert_eq!(self.check_invariants(), Ok(()));
    }

    /// The offline policy, for agents whose grace period ended by `now_ms`.
    fn requeue_offline(&mut self, now_ms: u64) {
        let due: Vec<UserId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.offline_deadline.is_some_and(|d| d <= now_ms))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(agent) = self.agents.get_mut(&id) else { continue };
            agent.offline_deadline = None;
            if agent.presence.status() != PresenceStatus::Offline {
                continue;
            }
            if self.config.offline_policy == OfflinePolicy::Requeue {
                let convs = std::mem::take(&mut agent.convs);
                for conv in convs {
                    if let Some(e) = self.convs.get_mut(&conv) {
                        e.state = State::Queued {
                            announced: 0,
                            entered: Entered::new(QueueReason::AgentOffline, Some(id.clone())),
                            avoid: None,
                        };
                        self.insert_queued(conv);
                    }
                }
            }
            self.forget_if_idle(&id);
        }
        self.deadline_hint = self.agents.values().filter_map(|a| a.offline_deadline).min();
    }

    /// When [`Router::tick`] next has something to do: when the first
    /// offline grace period ends, the first waiting conversation is
    /// abandoned, or moved positions are due to be announced, whichever
    /// comes first. Cheap: the gateway asks after every command.
    pub fn next_deadline(&self) -> Option<u64> {
        let abandon = self.abandons.first().map(|(at, _)| *at);
        [self.deadline_hint, abandon, self.positions_due()].into_iter().flatten().min()
    }

    /// The open conversation `conv`, if the router has it.
    pub fn route(&self, conv: ConvId) -> Option<RouteView> {
        let e = self.convs.get(&conv)?;
        let (status, agent, position) = match &e.state {
            State::Assigned { agent } => (ConvStatus::Assigned, Some(agent.clone()), None),
            State::Queued { .. } => (ConvStatus::Queued, None, self.position_of(conv)),
        };
        Some(RouteView {
            visitor: e.visitor.clone(),
            group: e.group.clone(),
            vip_level: e.vip,
            status,
            agent,
            position,
        })
    }

    /// The open conversation of a visitor.
    pub fn open_conversation_of(&self, visitor: &str) -> Option<ConvId> {
        self.by_visitor.get(visitor).copied()
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Option<AgentView> {
        self.agents.get_key_value(id).map(|(id, a)| view(id, a))
    }

    /// Every agent the router knows, by id.
    pub fn agents(&self) -> impl Iterator<Item = AgentView> + '_ {
        self.agents.iter().map(|(id, a)| view(id, a))
    }

    /// The conversations assigned to an agent.
    pub fn conversations_of(&self, agent: &str) -> impl Iterator<Item = ConvId> + '_ {
        self.agents.get(agent).into_iter().flat_map(|a| a.convs.iter().copied())
    }

    /// A group's queue, first in line first.
    pub fn queue(&self, group: &str) -> impl Iterator<Item = ConvId> + '_ {
        self.queues.get(group).into_iter().flat_map(|q| q.iter().map(|(_, c)| *c))
    }

    /// Groups with someone waiting.
    pub fn groups(&self) -> impl Iterator<Item = &GroupName> + '_ {
        self.queues.keys()
    }

    /// Conversations waiting, all groups together.
    pub fn queued_len(&self) -> usize {
        self.queued
    }

    /// Checks every internal invariant; `Err` names the first one broken.
    /// Cheap enough for tests and debug builds, O(conversations + agents).
    pub fn check_invariants(&self) -> Result<(), String> {
        let first_deadline = self.agents.values().filter_map(|a| a.offline_deadline).min();
        if self.deadline_hint != first_deadline {
            return Err(format!(
                "next deadline {:?}, but the first is {first_deadline:?}",
                self.deadline_hint
            ));
        }
        if !self.entered.is_empty() {
            return Err(format!("{:?} entered a queue and were not told", self.entered));
        }
        let mut queued = 0;
        let mut abandoning = 0;
        for (group, q) in &self.queues {
            if q.is_empty() {
                return Err(format!("empty queue {group} kept"));
            }
            if q.iter().zip(q.iter().skip(1)).any(|(a, b)| a >= b) {
                return Err(format!("queue {group} out of order"));
            }
            // Positions from here on may have moved since they were told.
            let moved_from = self.moved.get(group).copied().unwrap_or(usize::MAX);
            for (i, k) in q.iter().enumerate() {
                let c = &k.1;
                let e = self.convs.get(c).ok_or_else(|| format!("{c} queued but unknown"))?;
                match &e.state {
                    State::Queued { announced, entered, .. } => {
                        if (i < moved_from && *announced != position(i)) || entered.is_some() {
                            return Err(format!("{c} position {} announced as {announced}", i + 1));
                        }
                    }
                    State::Assigned { .. } => return Err(format!("{c} queued and assigned")),
                }
                if e.group != *group || *k != key(e.vip, *c) {
                    return Err(format!("{c} in the wrong queue or with a stale key"));
                }
                if let Some(at) = self.abandon_at(e) {
                    if !self.abandons.contains(&(at, *c)) {
                        return Err(format!("{c} waits without its visitor and no abandon deadline"));
                    }
                    abandoning += 1;
                }
            }
            queued += q.len();
        }
        if abandoning != self.abandons.len() {
            return Err(format!("{} abandon deadlines for {abandoning} conversations", self.abandons.len()));
        }
        if let Some((c, e)) =
            self.convs.iter().find(|(_, e)| e.gone_since.is_some() == self.visitors.contains_key(&e.visitor))
        {
            return Err(format!("{c}: visitor {} connected or gone, not as counted", e.visitor));
        }
        if self.visitors.values().any(Vec::is_empty) {
            return Err("a visitor counted with no session".into());
        }
        if queued != self.queued {
            return Err(format!("queued count {} but {queued} in queues", self.queued));
        }
        let mut assigned = 0;
        for (id, a) in &self.agents {
            for c in &a.convs {
                match self.convs.get(c).map(|e| &e.state) {
                    Some(State::Assigned { agent }) if agent == id => {}
                    _ => return Err(format!("{c} listed by agent {id} but not assigned to it")),
                }
            }
            assigned += a.convs.len();
        }
        if queued + assigned != self.convs.len() {
            return Err(format!(
                "{} open conversations, {queued} queued + {assigned} assigned",
                self.convs.len()
            ));
        }
        if self.by_visitor.len() != self.convs.len()
            || self.by_visitor.iter().any(|(v, c)| self.convs.get(c).is_none_or(|e| e.visitor != *v))
        {
            return Err("visitor index out of step".into());
        }
        if self.config.auto_assign {
            for (group, q) in &self.queues {
                for (_, c) in q {
                    let avoid = match &self.convs[c].state {
                        State::Queued { avoid, .. } => avoid.as_ref(),
                        State::Assigned { .. } => None,
                    };
                    if let Some(a) = self.pick_agent(group, avoid) {
                        return Err(format!("{c} waits in {group} while {a} is free"));
                    }
                }
            }
        }
        Ok(())
    }

    // ---- internals ----

    fn grace_ms(&self) -> u64 {
        self.config.offline_grace_s.saturating_mul(1000)
    }

    /// `abandon_after_s` in ms; `None`: conversations are never abandoned.
    fn abandon_ms(&self) -> Option<u64> {
        (self.config.abandon_after_s > 0).then(|| self.config.abandon_after_s.saturating_mul(1000))
    }

    /// When a waiting conversation is abandoned: `None` while its visitor
    /// is connected (or abandoning is off).
    fn abandon_at(&self, e: &Entry) -> Option<u64> {
        Some(e.gone_since?.saturating_add(self.abandon_ms()?))
    }

    /// Sets when `conv`'s visitor went (`None`: they are connected), moving
    /// its abandon deadline if it waits.
    fn set_gone_since(&mut self, conv: ConvId, gone_since: Option<u64>) {
        let Some(e) = self.convs.get(&conv) else { return };
        let queued = matches!(e.state, State::Queued { .. });
        if queued && let Some(at) = self.abandon_at(e) {
            self.abandons.remove(&(at, conv));
        }
        let Some(e) = self.convs.get_mut(&conv) else { return };
        e.gone_since = gone_since;
        let Some(e) = self.convs.get(&conv) else { return };
        if queued && let Some(at) = self.abandon_at(e) {
            self.abandons.insert((at, conv));
        }
    }

    /// Closes a waiting conversation whose visitor stayed away.
    fn abandon(&mut self, conv: ConvId) {
        let Some(e) = self.convs.get(&conv) else { return };
        debug_assert!(matches!(e.state, State::Queued { .. }), "only a waiting conversation is abandoned");
        let group = e.group.clone();
        self.remove_queued(conv);
        if let Some(e) = self.convs.remove(&conv) {
            self.by_visitor.remove(&e.visitor);
        }
        self.actions.push_back(Action::Abandon { conv, group });
    }

    /// Notes that positions in `group` from `index` on may have moved.
    fn moved_from(&mut self, group: &GroupName, index: usize) {
        self.moved.entry(group.clone()).and_modify(|i| *i = (*i).min(index)).or_insert(index);
    }

    /// When moved positions are next due to be announced, if any moved:
    /// `position_update_ms` after the last announcement.
    fn positions_due(&self) -> Option<u64> {
        if self.moved.is_empty() {
            return None;
        }
        Some(self.positions_announced_ms.map_or(0, |t| t.saturating_add(self.config.position_update_ms)))
    }

    /// Announces every position that moved since the last time, once each:
    /// work in proportion to the part of each queue that moved.
    fn announce_positions(&mut self) {
        for (group, from) in std::mem::take(&mut self.moved) {
            let Some(q) = self.queues.get(&group) else { continue };
            for (i, (_, conv)) in q.range(from.min(q.len())..).enumerate() {
                let pos = position(from + i);
                let Some(Entry { state: State::Queued { announced, .. }, .. }) = self.convs.get_mut(conv)
                else {
                    continue;
                };
                if *announced != pos {
                    *announced = pos;
                    self.actions.push_back(Action::QueuePosition {
                        conv: *conv,
                        group: group.clone(),
                        position: pos,
                    });
                }
            }
        }
    }

    fn position_of(&self, conv: ConvId) -> Option<u32> {
        let e = self.convs.get(&conv)?;
        let q = self.queues.get(&e.group)?;
        q.binary_search(&key(e.vip, conv)).ok().map(position)
    }

    /// Puts a conversation (already in `convs`, state `Queued`) in its queue.
    fn insert_queued(&mut self, conv: ConvId) {
        let Some(e) = self.convs.get(&conv) else { return };
        let k = key(e.vip, conv);
        let group = e.group.clone();
        let entered = matches!(e.state, State::Queued { entered: Some(_), .. });
        let abandon_at = self.abandon_at(e);
        let q = self.queues.entry(group.clone()).or_default();
        let Err(i) = q.binary_search(&k) else { return };
        q.insert(i, k);
        let behind = q.len() - i - 1;
        self.queued += 1;
        if let Some(at) = abandon_at {
            self.abandons.insert((at, conv));
        }
        // One that entered is told its place at the end of the operation;
        // those behind it moved.
        if entered {
            self.entered.push(conv);
            if behind > 0 {
                self.moved_from(&group, i + 1);
            }
        } else {
            self.moved_from(&group, i);
        }
    }

    /// Takes a conversation out of its queue (its state is left to the caller).
    fn remove_queued(&mut self, conv: ConvId) {
        let Some(e) = self.convs.get(&conv) else { return };
        let group = e.group.clone();
        let k = key(e.vip, conv);
        let abandon_at = self.abandon_at(e);
        let Some(q) = self.queues.get_mut(&group) else { return };
        let Ok(i) = q.binary_search(&k) else { return };
        q.remove(i);
        self.queued -= 1;
        let behind = q.len() - i;
        if q.is_empty() {
            self.queues.remove(&group);
            self.moved.remove(&group);
        }
        if let Some(at) = abandon_at {
            self.abandons.remove(&(at, conv));
        }
        // Those behind it moved up; taking the last moves nobody.
        if behind > 0 {
            self.moved_from(&group, i);
        }
    }

    /// Takes a conversation off its agent or out of its queue.
    fn unassign_or_dequeue(&mut self, conv: ConvId) {
        let Some(e) = self.convs.get(&conv) else { return };
        match &e.state {
            State::Queued { .. } => self.remove_queued(conv),
            State::Assigned { agent } => {
                if let Some(a) = self.agents.get_mut(agent) {
                    a.convs.remove(&conv);
                }
            }
        }
    }

    /// Assigns `conv` (out of any queue already) to `agent` and says so.
    /// `previous` is the agent who had it; if `None`, the one recorded when
    /// it entered the queue in this same operation, if any.
    fn assign(&mut self, conv: ConvId, agent_id: &UserId, reason: AssignReason, previous: Option<UserId>) {
        let (Some(e), Some(agent)) = (self.convs.get_mut(&conv), self.agents.get_mut(agent_id)) else {
            return;
        };
        debug_assert!(agent.has_room(), "assigning past capacity");
        let left_queue = e.shown_queue();
        let from_queue = match &mut e.state {
            State::Queued { entered, .. } => entered.take().and_then(|e| e.previous),
            State::Assigned { .. } => None,
        };
        let previous = previous.or(from_queue);
        e.state = State::Assigned { agent: agent_id.clone() };
        agent.convs.insert(conv);
        self.assign_clock += 1;
        agent.last_assigned = self.assign_clock;
        self.actions.push_back(Action::Assign {
            conv,
            agent: AgentRef { id: agent_id.clone(), name: agent.name.clone() },
            group: e.group.clone(),
            previous,
            reason,
            left_queue,
        });
    }

    /// The least-loaded available agent serving `group`, other than `avoid`.
    fn pick_agent(&self, group: &str, avoid: Option<&UserId>) -> Option<&UserId> {
        self.agents
            .iter()
            .filter(|(id, a)| a.available() && serves(&a.groups, group) && Some(*id) != avoid)
            .min_by(|(ia, a), (ib, b)| (a.load(), a.last_assigned, ia).cmp(&(b.load(), b.last_assigned, ib)))
            .map(|(id, _)| id)
    }

    /// Auto-assign until no waiting conversation has an agent for it.
    fn drain(&mut self) {
        if !self.config.auto_assign {
            return;
        }
        loop {
            let mut best: Option<(QueueKey, UserId)> = None;
            for (group, q) in &self.queues {
                for k in q {
                    if best.as_ref().is_some_and(|(b, _)| b < k) {
                        break; // the rest of this queue comes after the best so far
                    }
                    let avoid = match &self.convs[&k.1].state {
                        State::Queued { avoid, .. } => avoid.as_ref(),
                        State::Assigned { .. } => None,
                    };
                    if let Some(agent) = self.pick_agent(group, avoid) {
                        best = Some((*k, agent.clone()));
                        break;
                    }
                    if avoid.is_none() {
                        break; // nobody serves this group now
                    }
                }
            }
            let Some(((_, conv), agent)) = best else { break };
            self.remove_queued(conv);
            self.assign(conv, &agent, AssignReason::Auto, None);
        }
    }

    /// Ends every operation: auto-assign, then announce what entered a
    /// queue (and still waits) with its position. Positions that moved are
    /// left for [`Router::tick`].
    fn finish(&mut self) {
        self.drain();
        let mut entered = std::mem::take(&mut self.entered);
        // In line order, as the gateway would list them.
        entered.sort_by_cached_key(|c| self.convs.get(c).map(|e| (e.group.clone(), key(e.vip, *c))));
        for conv in entered {
            let Some(pos) = self.position_of(conv) else { continue };
            let Some(Entry { group, state: State::Queued { announced, entered, .. }, .. }) =
                self.convs.get_mut(&conv)
            else {
                continue;
            };
            let Some(Entered { reason, previous, left }) = entered.take() else { continue };
            *announced = pos;
            self.actions.push_back(Action::Queue {
                conv,
                group: group.clone(),
                position: pos,
                previous,
                reason,
                left_queue: left,
            });
        }
        #[cfg(test)]
        assert_eq!(self.check_invariants(), Ok(()));
    }

    fn status_changed(&mut self, id: &UserId, status: PresenceStatus, now_ms: u64) {
        let grace_ms = self.grace_ms();
        if let Some(agent) = self.agents.get_mut(id) {
            let before = agent.offline_deadline;
            agent.offline_deadline =
                (status == PresenceStatus::Offline).then(|| now_ms.saturating_add(grace_ms));
            match agent.offline_deadline {
                Some(d) => self.deadline_hint = Some(self.deadline_hint.map_or(d, |h| h.min(d))),
                // Presence changes are rare next to commands: recount here,
                // so asking stays free.
                None if before.is_some() && before == self.deadline_hint => {
                    self.deadline_hint = self.agents.values().filter_map(|a| a.offline_deadline).min();
                }
                None => {}
            }
        }
        self.actions.push_back(Action::PresenceChanged { agent: id.clone(), status });
    }

    /// Drops an agent nobody needs to remember: no devices, no
    /// conversations, no grace period running.
    fn forget_if_idle(&mut self, id: &UserId) {
        if self
            .agents
            .get(id)
            .is_some_and(|a| a.presence.devices() == 0 && a.convs.is_empty() && a.offline_deadline.is_none())
        {
            self.agents.remove(id);
        }
    }
}

fn position(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

fn view(id: &UserId, a: &Agent) -> AgentView {
    AgentView {
        id: id.clone(),
        name: a.name.clone(),
        groups: a.groups.clone(),
        status: a.presence.status(),
        capacity: a.capacity,
        load: a.load(),
        devices: a.presence.devices(),
    }
}

#[cfg(test)]
mod tests;
