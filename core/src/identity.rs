//! Who someone is, once `connect` has proven it.
//!
//! [`crate::auth`] checks credentials; this file holds what they prove: an
//! [`Identity`] (role, id, display name, skill groups, profile `meta`) that
//! a session keeps for its whole life, and the slimmer [`Actor`] that rides
//! along with every command sent to a conversation's home shard or to the
//! router, so they can decide membership without asking the session.
//!
//! Ids, names and groups are `Arc<str>`: a command crossing to another
//! shard clones a pointer, not a string, and the hot path allocates
//! nothing for them.

use std::collections::BTreeMap;
use std::sync::Arc;

use kefu_proto::ids::Role;

/// A user id: a JWT `sub`, or a server-issued anonymous visitor id.
/// Visitors and agents live in separate namespaces: an agent `a1` and a
/// visitor `a1` are two people (every check compares the role too).
pub type UserId = Arc<str>;

/// A user as the gateway keys one: in the directory of sessions and among
/// the recipients of an event (storage's cid dedupe index takes the same
/// pair). The role is part of the key because ids are only unique within a
/// role: a visitor whose JWT `sub` is `42` is not agent `42`, and a lookup
/// by id alone would hand one the other's conversations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserKey {
    /// Visitor or agent (bots have no sessions, but a key may name one).
    pub role: Role,
    /// The id within that role.
    pub id: UserId,
}

impl UserKey {
    /// Agent `id`.
    pub fn agent(id: UserId) -> UserKey {
        UserKey { role: Role::Agent, id }
    }

    /// Visitor `id`.
    pub fn visitor(id: UserId) -> UserKey {
        UserKey { role: Role::Visitor, id }
    }
}

/// A skill group (`groups` claim, `open.group`, `transfer` to `group:NAME`).
pub type GroupName = Arc<str>;

/// A visitor profile: string keys to string values (`vip_level`, `plan`, …),
/// ordered so it encodes the same way every time.
pub type Meta = BTreeMap<String, String>;

/// The profile key whose integer value orders the queue (higher first).
pub const VIP_LEVEL_KEY: &str = "vip_level";

/// The queue priority a profile asks for: `meta.vip_level` as an integer;
/// absent or not an integer counts as 0.
pub fn vip_level(meta: &Meta) -> i64 {
    meta.get(VIP_LEVEL_KEY).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Overlays `updates` onto `base` key by key (PROTOCOL.md: `SyncUser` keys
/// override the JWT's). Returns whether anything changed.
pub fn merge_meta(base: &mut Meta, updates: &Meta) -> bool {
    let mut changed = false;
    for (k, v) in updates {
        if base.get(k) != Some(v) {
            base.insert(k.clone(), v.clone());
            changed = true;
        }
    }
    changed
}

/// What a successful `connect` proved about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `visitor` or `agent` (never `bot`: bots do not connect).
    pub role: Role,
    /// The user id (`connected.user.id`).
    pub id: UserId,
    /// Display name (`connected.user.name`).
    pub name: Arc<str>,
    /// Agent: groups served (empty: every group). Visitor: groups asked
    /// for; the first is where an `open` without `group` goes.
    pub groups: Arc<[GroupName]>,
    /// Visitor profile shown to agents; empty for agents.
    pub meta: Meta,
    /// A server-issued visitor id (no token).
    pub anonymous: bool,
}

impl Identity {
    /// The part of the identity that travels with each command.
    pub fn actor(&self) -> Actor {
        Actor { role: self.role, id: self.id.clone(), name: self.name.clone(), groups: self.groups.clone() }
    }

    /// Who this is, as a key.
    pub fn key(&self) -> UserKey {
        UserKey { role: self.role, id: self.id.clone() }
    }
}

/// Who is doing something, as the home shard and the router see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Visitor, agent, or bot (hooks and the business system).
    pub role: Role,
    /// The user id (bots: the configured bot id or the caller's name).
    pub id: UserId,
    /// Display name, for `msg.from.name`.
    pub name: Arc<str>,
    /// Agents: groups served (empty: all). Ignored for other roles.
    pub groups: Arc<[GroupName]>,
}

impl Actor {
    /// A bot actor (an auto-reply, a hook or the business system).
    pub fn bot(id: impl Into<UserId>, name: impl Into<Arc<str>>) -> Actor {
        Actor { role: Role::Bot, id: id.into(), name: name.into(), groups: Arc::from([]) }
    }

    /// Who this is, as a key.
    pub fn key(&self) -> UserKey {
        UserKey { role: self.role, id: self.id.clone() }
    }

    /// Whether this actor is the user `id` acting as `role`.
    pub fn is(&self, role: Role, id: &str) -> bool {
        self.role == role && &*self.id == id
    }
}

/// A visitor as agents see it (`conversation.visitor = {id, name, meta}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visitor {
    /// The visitor's user id.
    pub id: UserId,
    /// Display name.
    pub name: Arc<str>,
    /// Profile (`vip_level`, `plan`, …).
    pub meta: Meta,
}

/// An agent as conversations name it (`conversation.agent = {id, name}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRef {
    /// The agent's user id.
    pub id: UserId,
    /// Display name.
    pub name: Arc<str>,
}

/// Whether an agent with skill groups `groups` serves `group`. An agent
/// whose token names no groups is a generalist and serves every group, so
/// a small team needs no group set-up at all. The router (assignment) and
/// the conversation (who may read a queued conversation) both use this one
/// rule.
pub fn serves(groups: &[GroupName], group: &str) -> bool {
    groups.is_empty() || groups.iter().any(|g| &**g == group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_level_parses_integers_and_defaults_to_zero() {
        let mut m = Meta::new();
        assert_eq!(vip_level(&m), 0);
        m.insert("vip_level".into(), " 3 ".into());
        assert_eq!(vip_level(&m), 3);
        m.insert("vip_level".into(), "gold".into());
        assert_eq!(vip_level(&m), 0);
        m.insert("vip_level".into(), "-1".into());
        assert_eq!(vip_level(&m), -1);
    }

    #[test]
    fn merge_overrides_key_by_key() {
        let mut base: Meta = [("plan".into(), "free".into()), ("city".into(), "Hangzhou".into())].into();
        let upd: Meta = [("plan".into(), "pro".into()), ("vip_level".into(), "2".into())].into();
        assert!(merge_meta(&mut base, &upd));
        assert_eq!(base["plan"], "pro");
        assert_eq!(base["city"], "Hangzhou");
        assert_eq!(base["vip_level"], "2");
        assert!(!merge_meta(&mut base, &upd), "same values change nothing");
    }

    #[test]
    fn agents_without_groups_serve_every_group() {
        let none: Arc<[GroupName]> = Arc::from([]);
        let sales: Arc<[GroupName]> = Arc::from([GroupName::from("sales")]);
        assert!(serves(&none, "anything"));
        assert!(serves(&sales, "sales"));
        assert!(!serves(&sales, "billing"));
    }
}
