//! The user directory: where each user's sessions are, so a frame reaches
//! every tab of every participant. Every shard keeps a replica, fed by the
//! edges' `SessionUp` / `SessionDown` broadcasts (see the gateway's `chat` module).
//!
//! A user is (role, id): visitors and agents are looked up in separate
//! maps, so a visitor whose token `sub` equals an agent's id never receives
//! that agent's frames, nor the agent the visitor's. Every lookup names the
//! role; there is no lookup by id alone.

use std::collections::HashMap;

use crate::identity::{UserId, UserKey};
use kefu_proto::Role;
use kefu_proto::client::Codec;

use super::SessionAddr;

/// A session somewhere, as the directory knows it.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Where the session's connection is.
    pub addr: SessionAddr,
    /// Its subprotocol, to encode frames for it.
    pub codec: Codec,
}

/// User → sessions, one map per role that connects.
#[derive(Debug, Default)]
pub struct Directory {
    visitors: HashMap<UserId, Vec<Member>>,
    agents: HashMap<UserId, Vec<Member>>,
}

impl Directory {
    /// The map of `role`; `None` for bots, which have no sessions.
    fn of(&self, role: Role) -> Option<&HashMap<UserId, Vec<Member>>> {
        match role {
            Role::Visitor => Some(&self.visitors),
            Role::Agent => Some(&self.agents),
            Role::Bot => None,
        }
    }

    fn of_mut(&mut self, role: Role) -> Option<&mut HashMap<UserId, Vec<Member>>> {
        match role {
            Role::Visitor => Some(&mut self.visitors),
            Role::Agent => Some(&mut self.agents),
            Role::Bot => None,
        }
    }

    /// A session of `user` is connected.
    pub fn add(&mut self, user: UserKey, member: Member) {
        if let Some(map) = self.of_mut(user.role) {
            map.entry(user.id).or_default().push(member);
        }
    }

    /// The session at `addr` of `user` has gone.
    pub fn remove(&mut self, user: &UserKey, addr: SessionAddr) {
        let Some(map) = self.of_mut(user.role) else { return };
        if let Some(list) = map.get_mut(&user.id) {
            list.retain(|m| m.addr != addr);
            if list.is_empty() {
                map.remove(&user.id);
            }
        }
    }

    /// Every session of the user `id` acting as `role`.
    pub fn sessions(&self, role: Role, id: &str) -> impl Iterator<Item = Member> + '_ {
        self.of(role).and_then(|map| map.get(id)).into_iter().flatten().copied()
    }

    /// Every session of `user`.
    pub fn sessions_of<'a>(&'a self, user: &UserKey) -> impl Iterator<Item = Member> + 'a {
        self.sessions(user.role, &user.id)
    }

    /// Every agent session (for presence pushes).
    pub fn agents(&self) -> impl Iterator<Item = Member> + '_ {
        self.agents.values().flatten().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn member(slot: u32) -> Member {
        Member { addr: SessionAddr { shard: 0, slot, generation: 1 }, codec: Codec::Json }
    }

    fn slots(it: impl Iterator<Item = Member>) -> Vec<u32> {
        it.map(|m| m.addr.slot).collect()
    }

    #[test]
    fn an_agent_and_a_visitor_with_the_same_id_are_two_users() {
        let mut d = Directory::default();
        let id: UserId = Arc::from("42");
        d.add(UserKey::agent(id.clone()), member(1));
        d.add(UserKey::visitor(id.clone()), member(2));
        d.add(UserKey::visitor(id.clone()), member(3));
        assert_eq!(slots(d.sessions(Role::Agent, "42")), [1]);
        assert_eq!(slots(d.sessions(Role::Visitor, "42")), [2, 3]);
        assert_eq!(slots(d.agents()), [1]);
        assert_eq!(slots(d.sessions(Role::Bot, "42")), Vec::<u32>::new());
        d.remove(&UserKey::agent(id.clone()), member(2).addr);
        assert_eq!(slots(d.sessions(Role::Visitor, "42")), [2, 3], "another user's session stays");
        d.remove(&UserKey::visitor(id.clone()), member(2).addr);
        d.remove(&UserKey::visitor(id.clone()), member(3).addr);
        assert_eq!(slots(d.sessions_of(&UserKey::visitor(id))), Vec::<u32>::new());
        assert_eq!(slots(d.sessions(Role::Agent, "42")), [1]);
    }
}
