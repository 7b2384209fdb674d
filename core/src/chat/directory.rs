//! The user directory: where each user's sessions are, so a frame reaches
//! every tab of every participant. Every shard keeps a replica, fed by the
//! edges' `SessionUp` / `SessionDown` broadcasts (see [`super`]).
//!
//! A user is (role, id): visitors and agents are looked up in separate
//! maps, so a visitor whose token `sub` equals an agent's id never receives
//! that agent's frames, nor the agent the visitor's. Every lookup names the
//! role; there is no lookup by id alone.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::identity::{UserId, UserKey};
use kefu_proto::client::Codec;
use kefu_proto::{ConvStatus, Role};

use super::SessionAddr;

/// A session somewhere, as the directory knows it.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Where the session's connection is.
    pub addr: SessionAddr,
    /// Its subprotocol, to encode frames for it.
    pub codec: Codec,
}

/// A user's sessions. Every shard holds an entry per connected user, and
/// most users have one session: it is kept in the entry itself, so a
/// user costs each replica no allocation; a second tab spills to a `Vec`.
#[derive(Debug)]
enum Sessions {
    One(Member),
    Many(Vec<Member>),
}

impl Sessions {
    fn as_slice(&self) -> &[Member] {
        match self {
            Sessions::One(m) => std::slice::from_ref(m),
            Sessions::Many(list) => list,
        }
    }

    fn push(&mut self, member: Member) {
        match self {
            Sessions::One(first) => *self = Sessions::Many(vec![*first, member]),
            Sessions::Many(list) => list.push(member),
        }
    }

    /// Drops the session at `addr`; whether any is left.
    fn remove(&mut self, addr: SessionAddr) -> bool {
        match self {
            Sessions::One(m) => m.addr != addr,
            Sessions::Many(list) => {
                list.retain(|m| m.addr != addr);
                match list.as_slice() {
                    [] => false,
                    [only] => {
                        *self = Sessions::One(*only);
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

/// User → sessions, one map per role that connects.
#[derive(Debug, Default)]
pub struct Directory {
    visitors: HashMap<UserId, Sessions>,
    agents: HashMap<UserId, Sessions>,
}

impl Directory {
    /// The map of `role`; `None` for bots, which have no sessions.
    fn of(&self, role: Role) -> Option<&HashMap<UserId, Sessions>> {
        match role {
            Role::Visitor => Some(&self.visitors),
            Role::Agent => Some(&self.agents),
            Role::Bot => None,
        }
    }

    fn of_mut(&mut self, role: Role) -> Option<&mut HashMap<UserId, Sessions>> {
        match role {
            Role::Visitor => Some(&mut self.visitors),
            Role::Agent => Some(&mut self.agents),
            Role::Bot => None,
        }
    }

    /// A session of `user` is connected.
    pub fn add(&mut self, user: UserKey, member: Member) {
        if let Some(map) = self.of_mut(user.role) {
            match map.entry(user.id) {
                Entry::Occupied(mut e) => e.get_mut().push(member),
                Entry::Vacant(e) => {
                    e.insert(Sessions::One(member));
                }
            }
        }
    }

    /// The session at `addr` of `user` has gone.
    pub fn remove(&mut self, user: &UserKey, addr: SessionAddr) {
        let Some(map) = self.of_mut(user.role) else { return };
        if let Some(sessions) = map.get_mut(&user.id)
            && !sessions.remove(addr)
        {
            map.remove(&user.id);
        }
    }

    /// Every session of the user `id` acting as `role`.
    pub fn sessions(&self, role: Role, id: &str) -> impl Iterator<Item = Member> + '_ {
        self.of(role).and_then(|map| map.get(id)).into_iter().flat_map(Sessions::as_slice).copied()
    }

    /// Every session of `user`.
    pub fn sessions_of<'a>(&'a self, user: &UserKey) -> impl Iterator<Item = Member> + 'a {
        self.sessions(user.role, &user.id)
    }

    /// Every agent session (for presence pushes).
    pub fn agents(&self) -> impl Iterator<Item = Member> + '_ {
        self.agents.values().flat_map(Sessions::as_slice).copied()
    }

    /// Who takes part in a conversation, by its state: the visitor's
    /// sessions, and the agent's unless it is queued (then `agent` is
    /// whoever gave it away, who no longer takes part). A closed
    /// conversation's last agent still reads it.
    pub fn participants<'a>(
        &'a self,
        visitor: &'a str,
        agent: Option<&'a str>,
        status: ConvStatus,
    ) -> impl Iterator<Item = Member> + 'a {
        let agent = agent.filter(|_| status != ConvStatus::Queued);
        self.sessions(Role::Visitor, visitor)
            .chain(agent.into_iter().flat_map(|a| self.sessions(Role::Agent, a)))
    }

    /// Who is told of a conversation's new state (a `conversation` event):
    /// its participants in that state, the agent who just lost it
    /// (`previous`), and, while it waits in a queue and as it leaves one
    /// (taken, closed, or moved to another group's queue), the agents who
    /// serve that queue (`notify`; the router names them); each session
    /// once, and not `except` (the session whose command caused it, which
    /// gets the answer instead).
    pub fn change_audience(
        &self,
        visitor: &str,
        agent: Option<&str>,
        status: ConvStatus,
        previous: Option<&UserKey>,
        notify: &[UserKey],
        except: Option<SessionAddr>,
    ) -> Vec<Member> {
        let mut audience: Vec<Member> = self.participants(visitor, agent, status).collect();
        audience.extend(previous.into_iter().flat_map(|p| self.sessions_of(p)));
        // Those who saw it queued: while it waits, and as it leaves the
        // queue (taken, closed, or moved to another group's), once.
        audience.extend(notify.iter().flat_map(|a| self.sessions_of(a)));
        audience.sort_by_key(|m| m.addr);
        audience.dedup_by_key(|m| m.addr);
        audience.retain(|m| Some(m.addr) != except);
        audience
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

    /// Every shard holds an entry per connected user, so what one entry
    /// costs is paid once per session per shard: a user with one session
    /// keeps it in the entry (no allocation), and an entry stays three
    /// words, as small as the `Vec` it replaced.
    #[test]
    fn a_user_with_one_session_keeps_it_inline() {
        assert!(std::mem::size_of::<Member>() <= 16, "Member is {} B", std::mem::size_of::<Member>());
        assert_eq!(std::mem::size_of::<Sessions>(), std::mem::size_of::<Vec<Member>>());
        let mut d = Directory::default();
        let v = UserKey::visitor(Arc::from("v1"));
        d.add(v.clone(), member(1));
        assert!(matches!(d.visitors[&v.id], Sessions::One(_)));
        d.add(v.clone(), member(2));
        d.add(v.clone(), member(3));
        assert_eq!(slots(d.sessions_of(&v)), [1, 2, 3], "more tabs spill over");
        d.remove(&v, member(1).addr);
        d.remove(&v, member(3).addr);
        assert!(matches!(d.visitors[&v.id], Sessions::One(m) if m.addr.slot == 2), "back inline");
        d.remove(&v, member(4).addr);
        assert_eq!(slots(d.sessions_of(&v)), [2], "another session's goodbye changes nothing");
        d.remove(&v, member(2).addr);
        assert!(!d.visitors.contains_key(&v.id), "the last one takes the entry");
    }

    fn directory() -> Directory {
        // Visitor v1 (slots 1, 2), agents a1 (3), a2 (4), a3 (5), and a
        // visitor whose id is an agent's: a2 (6).
        let mut d = Directory::default();
        d.add(UserKey::visitor(Arc::from("v1")), member(1));
        d.add(UserKey::visitor(Arc::from("v1")), member(2));
        d.add(UserKey::agent(Arc::from("a1")), member(3));
        d.add(UserKey::agent(Arc::from("a2")), member(4));
        d.add(UserKey::agent(Arc::from("a3")), member(5));
        d.add(UserKey::visitor(Arc::from("a2")), member(6));
        d
    }

    #[test]
    fn participants_follow_the_conversations_state() {
        let d = directory();
        let of = |agent, status| slots(d.participants("v1", agent, status));
        assert_eq!(of(Some("a1"), ConvStatus::Assigned), [1, 2, 3], "every tab of both");
        assert_eq!(of(Some("a1"), ConvStatus::Queued), [1, 2], "who gave it away takes no part");
        assert_eq!(of(Some("a1"), ConvStatus::Closed), [1, 2, 3], "the last agent still reads it");
        assert_eq!(of(None, ConvStatus::Queued), [1, 2]);
        assert_eq!(slots(d.participants("a2", None, ConvStatus::Queued)), [6], "visitor a2, not agent a2");
    }

    #[test]
    fn a_change_reaches_the_participants_who_lost_it_and_the_queue_s_agents_once() {
        let d = directory();
        let a = |id: &str| UserKey::agent(Arc::from(id));
        // A transfer from a1 to a2: both agents and the visitor hear it.
        let got = d.change_audience("v1", Some("a2"), ConvStatus::Assigned, Some(&a("a1")), &[], None);
        assert_eq!(slots(got.into_iter()), [1, 2, 3, 4]);
        // Taken out of a queue by a2: who served that queue hears it once.
        let got = d.change_audience("v1", Some("a2"), ConvStatus::Assigned, None, &[a("a2"), a("a3")], None);
        assert_eq!(slots(got.into_iter()), [1, 2, 4, 5], "the queue's agents see it taken");
        // Back in a queue: the visitor, a1 who gave it away, and who serves
        // the queue (a1 named twice is told once); the replying tab not at all.
        let notify = [a("a1"), a("a3")];
        let got = d.change_audience(
            "v1",
            Some("a1"),
            ConvStatus::Queued,
            Some(&a("a1")),
            &notify,
            Some(member(2).addr),
        );
        assert_eq!(slots(got.into_iter()), [1, 3, 5]);
    }
}
