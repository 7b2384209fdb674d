//! The router on its shard (shard 0 only): the loop feeds
//! [`kefu_core::chat::router::Router`] its inputs and carries out its
//! outputs here: posts (a refused one answered `unavailable` to whoever
//! waits for it), answers, presence pushes and their log records, device
//! replacements, and the count of conversations closed as abandoned.

use kefu_core::chat::device_of;
use kefu_core::chat::outbox::{Pending, Write};
use kefu_core::chat::router::{Output, Router};
use kefu_proto::Role;
use kefu_proto::ws::close;
use tracing::debug;

use super::ShardMsg;
use super::service::{ChatService, now_ms};
use crate::metrics::ShardStats;

impl ChatService {
    /// Hands an input to the router, if this shard runs it.
    pub(super) fn route(&mut self, input: impl FnOnce(&mut Router)) {
        if let Some(router) = self.router.as_mut() {
            input(router);
        }
    }

    /// Carries out the router's next output, if it has one.
    pub(super) fn carry_router(&mut self) -> bool {
        let Some(output) = self.router.as_mut().and_then(Router::poll_output) else { return false };
        match output {
            Output::Post { shard, msg } => self.post(shard, ShardMsg::Chat(Box::new(msg))),
            Output::PostHome { shard, reply, actor, request } => {
                self.post(shard, ShardMsg::Home { reply, actor, request })
            }
            Output::Write { reply: (to, codec, _), frame } => self.out.send(to, codec, &frame),
            Output::ToAgents { frame } => self.out.deliver(self.directory.agents(), &frame),
            Output::LogPresence { agent, status } => {
                let write = Write::Presence { agent, status, at_ms: now_ms() };
                self.submit(write, Pending::Nothing);
            }
            Output::Abandoned { conv } => {
                ShardStats::inc(&self.own_stats().conversations_abandoned);
                debug!(%conv, "closed as abandoned: its visitor stayed gone");
            }
            Output::ReplaceDevice { agent, device } => {
                let old = self.directory.sessions(Role::Agent, &agent).find(|m| device_of(m.addr) == device);
                if let Some(m) = old {
                    self.out.close(m.addr, close::REPLACED, "replaced by a newer device");
                }
            }
        }
        true
    }
}
