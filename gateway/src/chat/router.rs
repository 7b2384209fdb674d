//! The router on its shard (shard 0 only): the loop around
//! [`kefu_core::chat::router::Router`], which decides. This file feeds it
//! the inbox's messages with the time and carries out its outputs: posts,
//! answers, presence pushes and device replacements.

use kefu_core::chat::router::{Output, Router};
use kefu_core::identity::{Actor, Identity};
use kefu_core::session::{HomeRequest, RouteRequest};
use kefu_proto::Role;

use super::service::{ChatService, now_ms};
use super::{Reply, ShardMsg, device_of};
use crate::ws::close;

impl ChatService {
    /// A session connected (see [`Router::handle_hello`]).
    pub(super) fn on_hello(&mut self, reply: Reply, identity: Identity) {
        if let Some(router) = self.router.as_mut() {
            router.handle_hello(reply, identity, now_ms());
        }
        self.run_router();
    }

    /// An agent's device has gone.
    pub(super) fn on_agent_gone(&mut self, agent: &str, device: u64) {
        if let Some(router) = self.router.as_mut() {
            router.handle_agent_gone(agent, device, now_ms());
        }
        self.run_router();
    }

    /// A routing command (see [`Router::handle_route`]).
    pub(super) fn on_route(&mut self, reply: Reply, actor: Actor, request: RouteRequest) {
        if let Some(router) = self.router.as_mut() {
            router.handle_route(reply, actor, request, now_ms());
        }
        self.run_router();
    }

    /// A home command sent behind a routing command (see [`Router::handle_relay`]).
    pub(super) fn on_relay(&mut self, reply: Reply, actor: Actor, request: HomeRequest) {
        if let Some(router) = self.router.as_mut() {
            router.handle_relay(reply, actor, request);
        }
        self.run_router();
    }

    /// Time passes for the router.
    pub(super) fn tick_router(&mut self) {
        if let Some(router) = self.router.as_mut() {
            router.handle_tick(now_ms());
        }
        self.run_router();
    }

    /// Carries out what the router asked for, in order. A post a full
    /// backlog refuses is answered `unavailable` to whoever waits for it.
    fn run_router(&mut self) {
        while let Some(output) = self.router.as_mut().and_then(Router::poll_output) {
            let refused = match output {
                Output::Post { shard, msg } => {
                    let reply = msg.reply();
                    (!self.post_chat(shard, msg)).then_some(reply).flatten()
                }
                Output::PostHome { shard, reply, actor, request } => {
                    (!self.post(shard, ShardMsg::Home { reply, actor, request })).then_some(reply)
                }
                Output::Write { reply: (to, codec, _), frame } => {
                    self.send(to, codec, &frame);
                    None
                }
                Output::ToAgents { frame } => {
                    let agents: Vec<_> = self.directory.agents().collect();
                    self.deliver(agents, &frame);
                    None
                }
                Output::ReplaceDevice { agent, device } => {
                    let old =
                        self.directory.sessions(Role::Agent, &agent).find(|m| device_of(m.addr) == device);
                    if let Some(m) = old {
                        self.close(m.addr, close::REPLACED, "replaced by a newer device");
                    }
                    None
                }
            };
            if let Some(reply) = refused {
                self.busy(reply);
            }
        }
    }
}
