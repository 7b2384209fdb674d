//! The router machine: the one place that sees every agent and every
//! waiting visitor, on one shard ([`super::ROUTER_SHARD`]).
//!
//! [`crate::routing::Router`] decides (queues, assignment, presence, the
//! offline policy); this machine is what feeds it the edges' commands and
//! turns its decisions into work for the shard loop, in the sans-IO shape
//! of the others: inputs through `handle_*(…, now_ms)`, work out through
//! [`Router::poll_output`], in order.
//!
//! - `connect` ([`Router::handle_hello`]): an agent's device counts for
//!   presence, and the edge gets the user's conversations for `connected`.
//! - A routing command ([`Router::handle_route`]): the decision goes to
//!   the conversation's home as a [`Change`], which makes it durable and
//!   answers the command; an agent's `presence` is answered here.
//! - A home command sent behind a routing command ([`Router::handle_relay`])
//!   goes on to its home after what that command decided.
//! - After either, the edge is told [`ChatMsg::Routed`], so it may go
//!   straight to homes again: it comes after every change it must not
//!   overtake.
//! - Visitors' sessions coming and going ([`Router::handle_hello`],
//!   [`Router::handle_session_down`]) tell the router who is still there:
//!   a waiting conversation whose visitor stays gone is abandoned.
//! - Queue positions go out in one [`ChatMsg::Positions`] post per shard
//!   for everything one router step announced, not one post per visitor.
//!
//! Every command gets exactly one answer: an error here, or the home's
//! answer to the [`Change`] that carries its reply (a command whose router
//! call changed nothing carries a [`Change::Describe`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kefu_proto::client::{Event, ServerFrame};
use kefu_proto::{ConvId, ConvStatus, PresenceStatus, Role};

use super::{Change, ChatMsg, PositionUpdate, Reply, RouteInfo, SessionAddr, device_of};
use crate::config::CoreConfig;
use crate::identity::{Actor, GroupName, Identity, UserId, UserKey, serves};
use crate::routing::{
    self, Action, AgentInfo, AgentView, OpenRequest, QueueReason, RestoredRoute, RouteError,
};
use crate::session::{HomeRequest, RouteRequest};

/// Work the router machine asks of its shard loop.
#[derive(Debug)]
pub enum Output {
    /// Post a message to shard `shard` (its own shard included: the loop
    /// runs that directly).
    Post {
        /// Where.
        shard: usize,
        /// What.
        msg: ChatMsg,
    },
    /// Hand a relayed command on to the conversation's home.
    PostHome {
        /// The home shard.
        shard: usize,
        /// Who gets the answer.
        reply: Reply,
        /// Who sent it.
        actor: Actor,
        /// What they asked.
        request: HomeRequest,
    },
    /// Answer a command (`frame.id` is the command's).
    Write {
        /// The connection and its subprotocol.
        reply: Reply,
        /// The answer.
        frame: ServerFrame,
    },
    /// Tell every agent session (a presence change).
    ToAgents {
        /// The event.
        frame: ServerFrame,
    },
    /// Log an agent's presence change (for the event stream), after telling
    /// the agents ([`Output::ToAgents`]).
    LogPresence {
        /// The agent.
        agent: UserId,
        /// Its presence now.
        status: PresenceStatus,
    },
    /// Close an agent's device that a newer one replaced (4002).
    ReplaceDevice {
        /// The agent.
        agent: UserId,
        /// The device, as [`device_of`] numbers it.
        device: u64,
    },
    /// A waiting conversation was closed as abandoned (its close is on its
    /// way to the home): count it.
    Abandoned {
        /// The conversation.
        conv: ConvId,
    },
}

/// The router machine (see the module doc).
#[derive(Debug)]
pub struct Router {
    routing: routing::Router,
    config: Arc<CoreConfig>,
    shards: usize,
    /// Commands (accept, transfer, close) answered by the router's next
    /// change to their conversation, within the same input.
    reply_on_change: Vec<(ConvId, Reply)>,
    /// For each group with someone waiting: whether an agent serving it was
    /// online when its visitors were last told (see
    /// [`Router::announce_availability`]).
    groups_online: HashMap<GroupName, bool>,
    /// Per shard, the queue positions of the current step, posted together
    /// at its end ([`ChatMsg::Positions`]).
    positions: Vec<Vec<PositionUpdate>>,
    out: VecDeque<Output>,
}

impl Router {
    /// A router for `shards` shards, numbering new conversations from
    /// `next_conv_id`, with every open conversation's route restored.
    /// Returns the routes it refused (they name no known state).
    pub fn new(
        config: Arc<CoreConfig>,
        shards: usize,
        next_conv_id: u64,
        routes: Vec<RestoredRoute>,
        now_ms: u64,
    ) -> (Router, usize) {
        let mut routing = routing::Router::new(config.routing.clone(), next_conv_id);
        let refused = routing.restore(routes, now_ms).len();
        let router = Router {
            routing,
            config,
            shards,
            reply_on_change: Vec::new(),
            groups_online: HashMap::new(),
            positions: vec![Vec::new(); shards],
            out: VecDeque::new(),
        };
        (router, refused)
    }

    /// The next piece of work, in the order it was decided.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Router::handle_tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.routing.next_deadline()
    }

    /// The routing state, to read.
    pub fn routing(&self) -> &routing::Router {
        &self.routing
    }

    /// A session connected: count an agent's device, and tell its edge the
    /// user's open conversations (and, for an agent, what waits in the
    /// queues it serves) for `connected`.
    pub fn handle_hello(&mut self, reply: Reply, identity: Identity, now_ms: u64) {
        let (addr, _, _) = reply;
        let routing = &mut self.routing;
        if identity.role == Role::Visitor {
            routing.visitor_connected(&identity.id, device_of(addr), now_ms);
        }
        let mut convs: Vec<ConvId> = match identity.role {
            Role::Agent => {
                let info = AgentInfo {
                    id: identity.id.clone(),
                    name: identity.name.clone(),
                    groups: identity.groups.clone(),
                };
                routing.agent_connected(info, device_of(addr), now_ms);
                routing.conversations_of(&identity.id).collect()
            }
            _ => routing.open_conversation_of(&identity.id).into_iter().collect(),
        };
        if identity.role == Role::Agent {
            // What waits for this agent, so a console that reconnects shows
            // the queue without waiting for the next change.
            let waiting = routing
                .groups()
                .filter(|g| serves(&identity.groups, g))
                .flat_map(|g| routing.queue(g))
                .take(self.config.routing.connected_queued_max);
            convs.extend(waiting);
        }
        let conversations: Vec<(ConvId, ConvStatus)> =
            convs.into_iter().filter_map(|c| routing.route(c).map(|r| (c, r.status))).collect();
        self.drain();
        let shard = addr.shard as usize;
        let listed: Vec<ConvId> = conversations.iter().map(|(c, _)| *c).collect();
        self.out.push_back(Output::Post { shard, msg: ChatMsg::Welcome { reply, conversations } });
        if identity.role == Role::Agent {
            self.introduce(reply, &identity.id, &listed);
        }
    }

    /// What a console needs after an agent's `connected` (its edge holds
    /// these until that is written): each listed conversation's state (its
    /// visitor, group, agent and queue position, which `connected` does not
    /// carry), then the presence of every other agent who is not offline,
    /// so that the console can offer whom to transfer to.
    fn introduce(&mut self, reply: Reply, me: &UserId, listed: &[ConvId]) {
        let (addr, codec, _) = reply;
        let push = (addr, codec, None);
        for &conv in listed {
            self.change(conv, Change::Describe, Some(push));
        }
        let mut present: Vec<AgentView> =
            self.routing.agents().filter(|a| a.status != PresenceStatus::Offline && a.id != *me).collect();
        // Online first: they are the ones a conversation can go to.
        present.sort_by_key(|a| a.status != PresenceStatus::Online);
        present.truncate(self.config.routing.connected_presence_max);
        for a in present {
            let name = Some(a.name.to_string());
            let frame =
                ServerFrame::push(Event::Presence { agent: a.id.to_string(), status: a.status, name });
            self.out.push_back(Output::Write { reply: push, frame });
        }
    }

    /// An agent's device has gone.
    pub fn handle_agent_gone(&mut self, agent: &str, device: u64, now_ms: u64) {
        self.routing.agent_disconnected(agent, device, now_ms);
        self.drain();
    }

    /// A session has gone (every shard hears it; the router's shard hands
    /// it here): a visitor's last session gone starts the wait after which
    /// their queued conversation is abandoned. Agents' devices are counted
    /// by [`Router::handle_agent_gone`].
    pub fn handle_session_down(&mut self, addr: SessionAddr, user: &UserKey, now_ms: u64) {
        if user.role == Role::Visitor {
            self.routing.visitor_disconnected(&user.id, device_of(addr), now_ms);
            self.drain();
        }
    }

    /// Time passes: offline grace periods that ended take effect, waiting
    /// conversations whose visitor stayed gone are closed, and queue
    /// positions that moved are announced.
    pub fn handle_tick(&mut self, now_ms: u64) {
        self.routing.tick(now_ms);
        self.drain();
    }

    /// A routing command, checked by the sender's session.
    pub fn handle_route(&mut self, reply: Reply, actor: Actor, request: RouteRequest, now_ms: u64) {
        let (from, _, id) = reply;
        let routing = &mut self.routing;
        let outcome = match request {
            RouteRequest::Open { visitor, group, vip_level } => {
                let req = OpenRequest { visitor: visitor.id.clone(), group: group.clone(), vip_level };
                routing.open(req).map(|opened| {
                    let change =
                        if opened.created { Change::Create { visitor, group } } else { Change::Describe };
                    Decided::Change(opened.conv, change)
                })
            }
            RouteRequest::Presence { status, capacity } => {
                routing.presence(&actor.id, device_of(from), status, capacity, now_ms).map(Decided::Presence)
            }
            RouteRequest::Accept { conv } => routing.accept(&actor.id, conv).map(|_| Decided::OnChange(conv)),
            RouteRequest::Transfer { conv, to } => {
                routing.transfer(&actor, conv, to).map(|()| Decided::OnChange(conv))
            }
            RouteRequest::Close { conv } => match routing.close(&actor, conv) {
                Ok(_) => Ok(Decided::OnChange(conv)),
                // Not open, or not this actor's to close: the home knows
                // whether it is closed and readable (closing again answers
                // with the closed state).
                Err(RouteError::NotFound) => {
                    Ok(Decided::Change(conv, Change::CloseClosed { actor: actor.clone() }))
                }
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(Decided::Change(conv, change)) => self.change(conv, change, Some(reply)),
            Ok(Decided::OnChange(conv)) => self.reply_on_change.push((conv, reply)),
            Ok(Decided::Presence(status)) => {
                let (agent, name) = (actor.id.to_string(), Some(actor.name.to_string()));
                let frame = ServerFrame::reply(id, Event::Presence { agent, status, name });
                self.out.push_back(Output::Write { reply, frame });
            }
            Err(e) => {
                let frame = ServerFrame::error(id, e.code(), e.to_string());
                self.out.push_back(Output::Write { reply, frame });
            }
        }
        self.drain();
        self.routed(reply);
    }

    /// A command for a home, sent behind a routing command of the same
    /// session: on to the home, after what that routing command decided.
    pub fn handle_relay(&mut self, reply: Reply, actor: Actor, request: HomeRequest) {
        let shard = request.conv().home(self.shards);
        self.out.push_back(Output::PostHome { shard, reply, actor, request });
        self.routed(reply);
    }

    /// Tells the edge one more of its session's routing commands or relays
    /// is handled: after everything it decided, so a home hears of those
    /// first.
    fn routed(&mut self, reply: Reply) {
        let (addr, _, _) = reply;
        self.out.push_back(Output::Post { shard: addr.shard as usize, msg: ChatMsg::Routed { addr } });
    }

    /// Turns the routing decisions into work, in order.
    fn drain(&mut self) {
        // A tick's positions come group by group: whether a group has an
        // online agent is asked once per group, not once per visitor.
        let mut online: Option<(GroupName, bool)> = None;
        while let Some(action) = self.routing.poll_action() {
            match action {
                // The router's `previous` is always an agent (it keeps
                // agents and visitors apart); the key says so from here on.
                Action::Assign { conv, agent, group, previous, left_queue, .. } => {
                    let reply = self.take_reply(conv);
                    let previous = previous.map(UserKey::agent);
                    self.change_leaving(conv, Change::Assign { agent, group, previous }, reply, left_queue);
                }
                // A new conversation's first queueing is its Create, which
                // is already on its way to the home.
                Action::Queue { reason: QueueReason::Opened, .. } => {}
                Action::Queue { conv, group, previous, left_queue, .. } => {
                    let reply = self.take_reply(conv);
                    let previous = previous.map(UserKey::agent);
                    self.change_leaving(conv, Change::Queue { group, previous }, reply, left_queue);
                }
                Action::QueuePosition { conv, group, position } => {
                    let agents_online = match &online {
                        Some((g, yes)) if *g == group => *yes,
                        _ => {
                            let yes = group_online(self.routing.agents(), &group);
                            online = Some((group, yes));
                            yes
                        }
                    };
                    self.positions[conv.home(self.shards)].push(PositionUpdate {
                        conv,
                        position,
                        agents_online,
                    });
                }
                Action::Close { conv, left_queue, .. } => {
                    let reply = self.take_reply(conv);
                    self.change_leaving(conv, Change::Close, reply, left_queue);
                }
                Action::Abandon { conv, group } => {
                    // The visitor is gone; the agents who saw it wait are
                    // told it went (the router has forgotten its group).
                    let notify = serving(self.routing.agents(), &group);
                    let route = RouteInfo { notify, ..RouteInfo::default() };
                    let shard = conv.home(self.shards);
                    let msg = ChatMsg::Change { conv, change: Change::Close, reply: None, route };
                    self.out.push_back(Output::Post { shard, msg });
                    self.out.push_back(Output::Abandoned { conv });
                }
                Action::PresenceChanged { agent, status } => {
                    // An agent forgotten as it went offline has no name left.
                    let name = self.routing.agent(&agent).map(|a| a.name.to_string());
                    let frame = ServerFrame::push(Event::Presence { agent: agent.to_string(), status, name });
                    self.out.push_back(Output::ToAgents { frame });
                    self.out.push_back(Output::LogPresence { agent, status });
                    self.announce_availability();
                }
                Action::ReplaceDevice { agent, device } => {
                    self.out.push_back(Output::ReplaceDevice { agent, device });
                }
            }
        }
        // Commands whose router call changed nothing still get an answer.
        for (conv, reply) in std::mem::take(&mut self.reply_on_change) {
            self.change(conv, Change::Describe, Some(reply));
        }
        for (shard, updates) in self.positions.iter_mut().enumerate() {
            if !updates.is_empty() {
                let updates = std::mem::take(updates);
                self.out.push_back(Output::Post { shard, msg: ChatMsg::Positions { updates } });
            }
        }
    }

    /// Tells the visitors waiting in a group when it gains its first online
    /// agent or loses its last one (a `conversation` frame, to the visitor
    /// only, as for a queue position), so that a widget can say nobody is
    /// there. Only on a flip: presence changes are rare next to commands,
    /// and for most of them no group's answer changes.
    fn announce_availability(&mut self) {
        let routing = &self.routing;
        self.groups_online.retain(|g, _| routing.queue(g).next().is_some());
        let waiting: Vec<GroupName> = routing.groups().cloned().collect();
        for group in waiting {
            let online = group_online(self.routing.agents(), &group);
            if self.groups_online.insert(group.clone(), online) == Some(online) {
                continue;
            }
            for (i, conv) in self.routing.queue(&group).enumerate() {
                let position = u32::try_from(i + 1).unwrap_or(u32::MAX);
                let update = PositionUpdate { conv, position, agents_online: online };
                self.positions[conv.home(self.shards)].push(update);
            }
        }
    }

    fn take_reply(&mut self, conv: ConvId) -> Option<Reply> {
        let i = self.reply_on_change.iter().position(|(c, _)| *c == conv)?;
        Some(self.reply_on_change.remove(i).1)
    }

    /// Sends a change to `conv`'s home, with the router's view of it.
    fn change(&mut self, conv: ConvId, change: Change, reply: Option<Reply>) {
        self.change_leaving(conv, change, reply, None);
    }

    /// As [`Self::change`], for a change that took `conv` out of the queue
    /// of `left` (whose agents saw it wait, and are told it was taken,
    /// closed or moved to another group's queue, so that no console keeps
    /// a stale entry).
    fn change_leaving(
        &mut self,
        conv: ConvId,
        change: Change,
        reply: Option<Reply>,
        left: Option<GroupName>,
    ) {
        let mut route = self.route_info(conv);
        if let Some(group) = left {
            // Beside the new queue's agents, if it waits in one. The
            // directory sends each session once anyway; the set keeps an
            // agent of both groups out of `notify` twice, so that what a
            // test reads of it is what is meant.
            let new: HashSet<UserKey> = route.notify.iter().cloned().collect();
            let old = serving(self.routing.agents(), &group).into_iter().filter(|k| !new.contains(k));
            route.notify.extend(old);
        }
        let shard = conv.home(self.shards);
        self.out.push_back(Output::Post { shard, msg: ChatMsg::Change { conv, change, reply, route } });
    }

    fn route_info(&self, conv: ConvId) -> RouteInfo {
        match self.routing.route(conv) {
            Some(r) if r.status == ConvStatus::Queued => RouteInfo {
                position: r.position,
                notify: serving(self.routing.agents(), &r.group),
                agents_online: Some(group_online(self.routing.agents(), &r.group)),
            },
            _ => RouteInfo::default(),
        }
    }
}

/// Agents who serve `group` and are connected or not offline, by the
/// router's view: the queue is shown to an agent whatever their presence
/// (an away agent, or one who has not chosen yet, still sees who waits).
fn serving(agents: impl Iterator<Item = AgentView>, group: &str) -> Vec<UserKey> {
    agents
        .filter(|a| (a.devices > 0 || a.status != PresenceStatus::Offline) && serves(&a.groups, group))
        .map(|a| UserKey::agent(a.id))
        .collect()
}

/// Whether an agent who serves `group` is online.
fn group_online(mut agents: impl Iterator<Item = AgentView>, group: &str) -> bool {
    agents.any(|a| a.status == PresenceStatus::Online && serves(&a.groups, group))
}

/// What a routing command came to, once the router has decided.
enum Decided {
    /// Tell the conversation's home (and answer from there).
    Change(ConvId, Change),
    /// Answered by the router's next change to it (or its state, if none).
    OnChange(ConvId),
    /// The agent's new aggregate status.
    Presence(PresenceStatus),
}

#[cfg(test)]
mod tests;
