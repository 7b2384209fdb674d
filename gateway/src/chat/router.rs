//! The router part of the chat service, on shard 0 only: presence, queues
//! and assignment need every agent and every waiting visitor at once. Its
//! decisions go to each conversation's home as [`Change`]s; the home makes
//! them durable and announces them.

use kefu_core::identity::{Actor, Identity, UserKey};
use kefu_core::routing::{Action, AgentInfo, OpenRequest, QueueReason, RouteError};
use kefu_core::session::{HomeRequest, RouteRequest};
use kefu_proto::client::{Event, ServerFrame};
use kefu_proto::{ConvId, ConvStatus, PresenceStatus, Role};

use super::home::serving;
use super::service::{ChatService, now_ms};
use super::{Change, ChatMsg, Reply, RouteInfo, ShardMsg, device_of};
use crate::ws::close;

impl ChatService {
    /// A session connected: count an agent's device, and tell its edge the
    /// user's open conversations for `connected`.
    pub(super) fn on_hello(&mut self, reply: Reply, identity: Identity) {
        let Some(router) = self.router.as_mut() else { return };
        let (addr, _, _) = reply;
        if identity.role == Role::Agent {
            let info = AgentInfo {
                id: identity.id.clone(),
                name: identity.name.clone(),
                groups: identity.groups.clone(),
            };
            router.agent_connected(info, device_of(addr), now_ms());
        }
        let mut convs: Vec<ConvId> = match identity.role {
            Role::Agent => router.conversations_of(&identity.id).collect(),
            _ => router.open_conversation_of(&identity.id).into_iter().collect(),
        };
        if identity.role == Role::Agent {
            // What waits for this agent, so a console that reconnects shows
            // the queue without waiting for the next change.
            let waiting = router
                .groups()
                .filter(|g| kefu_core::identity::serves(&identity.groups, g))
                .flat_map(|g| router.queue(g))
                .take(self.core.routing.connected_queued_max);
            convs.extend(waiting);
        }
        let conversations = convs
            .into_iter()
            .filter_map(|c| router.route(c).map(|r| (c, r.status)))
            .collect::<Vec<(ConvId, ConvStatus)>>();
        self.post_chat(addr.shard as usize, ChatMsg::Welcome { reply, conversations });
    }

    pub(super) fn on_agent_gone(&mut self, agent: &str, device: u64) {
        if let Some(router) = self.router.as_mut() {
            router.agent_disconnected(agent, device, now_ms());
        }
    }

    pub(super) fn on_route(&mut self, reply: Reply, actor: Actor, request: RouteRequest) {
        let (from, codec, id) = reply;
        let Some(router) = self.router.as_mut() else { return };
        let outcome = match request {
            RouteRequest::Open { visitor, group, vip_level } => {
                let req = OpenRequest { visitor: visitor.id.clone(), group: group.clone(), vip_level };
                router.open(req).map(|opened| {
                    let change =
                        if opened.created { Change::Create { visitor, group } } else { Change::Describe };
                    Routed::Change(opened.conv, change)
                })
            }
            RouteRequest::Presence { status, capacity } => {
                router.presence(&actor.id, device_of(from), status, capacity, now_ms()).map(Routed::Presence)
            }
            RouteRequest::Accept { conv } => router.accept(&actor.id, conv).map(|_| Routed::OnChange(conv)),
            RouteRequest::Transfer { conv, to } => {
                router.transfer(&actor, conv, to).map(|()| Routed::OnChange(conv))
            }
            RouteRequest::Close { conv } => match router.close(&actor, conv) {
                Ok(_) => Ok(Routed::OnChange(conv)),
                // Not open, or not this actor's to close: the home knows
                // whether it is closed and readable (closing again answers
                // with the closed state).
                Err(RouteError::NotFound) => {
                    Ok(Routed::Change(conv, Change::CloseClosed { actor: actor.clone() }))
                }
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(Routed::Change(conv, change)) => self.change(conv, change, Some(reply)),
            Ok(Routed::OnChange(conv)) => self.reply_on_change.push((conv, reply)),
            Ok(Routed::Presence(status)) => {
                let frame = ServerFrame::reply(id, Event::Presence { agent: actor.id.to_string(), status });
                self.send(from, codec, &frame);
            }
            Err(e) => self.send(from, codec, &ServerFrame::error(id, e.code(), e.to_string())),
        }
    }

    /// A command for a home, sent behind a routing command: on to the home,
    /// after what that routing command decided.
    pub(super) fn on_relay(&mut self, reply: Reply, actor: Actor, request: HomeRequest) {
        let home = request.conv().home(self.shards);
        if !self.post(home, ShardMsg::Home { reply, actor, request }) {
            let (to, codec, id) = reply;
            let e =
                ServerFrame::error(id, kefu_proto::ErrorCode::Unavailable, "the chat service is busy; retry");
            self.send(to, codec, &e);
        }
    }

    /// Sends the router's pending decisions to the conversations' homes.
    pub(super) fn drain_router(&mut self) {
        while let Some(action) = self.router.as_mut().and_then(|r| r.poll_action()) {
            match action {
                // The router's `previous` is always an agent (it keeps
                // agents and visitors apart); the key says so from here on.
                Action::Assign { conv, agent, group, previous, .. } => {
                    let reply = self.take_reply(conv);
                    let previous = previous.map(UserKey::agent);
                    self.change(conv, Change::Assign { agent, group, previous }, reply);
                }
                // A new conversation's first queueing is its Create, which
                // is already on its way to the home.
                Action::Queue { reason: QueueReason::Opened, .. } => {}
                Action::Queue { conv, group, previous, .. } => {
                    let reply = self.take_reply(conv);
                    let previous = previous.map(UserKey::agent);
                    self.change(conv, Change::Queue { group, previous }, reply);
                }
                Action::QueuePosition { conv, .. } => self.change(conv, Change::Position, None),
                Action::Close { conv, .. } => {
                    let reply = self.take_reply(conv);
                    self.change(conv, Change::Close, reply);
                }
                Action::PresenceChanged { agent, status } => {
                    let frame = ServerFrame::push(Event::Presence { agent: agent.to_string(), status });
                    let agents: Vec<_> = self.directory.agents().collect();
                    self.deliver(agents, &frame);
                }
                Action::ReplaceDevice { agent, device } => {
                    let old =
                        self.directory.sessions(Role::Agent, &agent).find(|m| device_of(m.addr) == device);
                    if let Some(m) = old {
                        self.close(m.addr, close::REPLACED, "replaced by a newer device");
                    }
                }
            }
        }
        // Commands whose router call changed nothing still get an answer.
        for (conv, reply) in std::mem::take(&mut self.reply_on_change) {
            self.change(conv, Change::Describe, Some(reply));
        }
    }

    fn take_reply(&mut self, conv: ConvId) -> Option<Reply> {
        let i = self.reply_on_change.iter().position(|(c, _)| *c == conv)?;
        Some(self.reply_on_change.remove(i).1)
    }

    /// Sends a change to `conv`'s home, with the router's view of it.
    fn change(&mut self, conv: ConvId, change: Change, reply: Option<Reply>) {
        let route = self.route_info(conv);
        let home = conv.home(self.shards);
        let msg = ChatMsg::Change { conv, change, reply, route };
        if !self.post_chat(home, msg)
            && let Some((to, codec, id)) = reply
        {
            let e =
                ServerFrame::error(id, kefu_proto::ErrorCode::Unavailable, "the chat service is busy; retry");
            self.send(to, codec, &e);
        }
    }

    fn route_info(&self, conv: ConvId) -> RouteInfo {
        let Some(router) = self.router.as_ref() else { return RouteInfo::default() };
        match router.route(conv) {
            Some(r) if r.status == ConvStatus::Queued => {
                RouteInfo { position: r.position, notify: serving(router.agents(), &r.group) }
            }
            _ => RouteInfo::default(),
        }
    }
}

/// What a routing command came to, once the router has decided.
enum Routed {
    /// Tell the conversation's home (and answer from there).
    Change(ConvId, Change),
    /// Answered by the router's next change to it (or its state, if none).
    OnChange(ConvId),
    /// The agent's new aggregate status.
    Presence(PresenceStatus),
}
