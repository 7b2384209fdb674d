//! A business system's changes to users (`SyncUser`, `BlockVisitor`), as
//! the router's shard serves them (the gateway's loop keeps one
//! [`UserChanges`] there and carries out its writes): every such call goes to that one shard,
//! so they are applied in the order they came.
//!
//! A change reads what is stored, changes it and writes it back. Two
//! changes to one user a few microseconds apart would both read the store
//! before the first is durable, and the second would write back without
//! the first's keys: a lost update. So the latest state of a user with a
//! change in flight is kept here, and a later change builds on it instead
//! of on the store. It is forgotten once the user's last change in flight
//! has completed (or failed: a later change may then still carry a failed
//! one's keys, as if it had been sent again).
//!
//! A change is one or two writes: what the business system set apart from
//! the profile (`user_controls`: the synced keys, a block), then, for a
//! sync, the profile itself (logged, so the event stream sees it). They
//! are chained (see [`Pending::UserChanged`]), so the call is answered
//! `Done` only once both are durable.

use std::collections::HashMap;

use super::outbox::{Pending, Profile, Write};
use super::stored::{Block, ReadError, Stored, UserControl};
use crate::identity::{Meta, UserKey, merge_meta};

/// A user with a change in flight: its state as the change leaves it.
struct InFlight {
    profile: Option<Profile>,
    control: UserControl,
    changes: u32,
}

/// The changes in flight, by user.
#[derive(Default)]
pub struct UserChanges {
    in_flight: HashMap<UserKey, InFlight>,
}

impl UserChanges {
    /// `SyncUser`: `name` if given and `meta` key by key, over the stored
    /// profile and over the synced keys. Returns the change's first write
    /// and what to do once it is durable.
    pub fn sync(
        &mut self,
        call: u64,
        user: UserKey,
        name: Option<String>,
        meta: Meta,
        now_ms: u64,
        store: &dyn Stored,
    ) -> Result<(Write, Pending), ReadError> {
        let (profile, mut control) = self.latest(&user, store)?;
        let mut profile = profile.unwrap_or_else(|| Profile {
            role: user.role,
            id: user.id.to_string(),
            name: user.id.to_string(),
            meta: Vec::new(),
            visitor_key_hash: None,
            created_ms: now_ms,
        });
        if profile.created_ms == 0 {
            // The store does not say when a stored user was first seen.
            profile.created_ms = now_ms;
        }
        if let Some(name) = &name {
            profile.name = name.clone();
            control.name = Some(name.clone());
        }
        profile.meta = merged(std::mem::take(&mut profile.meta), &meta);
        control.meta = merged(std::mem::take(&mut control.meta), &meta);
        self.remember(&user, Some(profile.clone()), control.clone());
        let next = Some(Box::new(Write::User(profile)));
        Ok((
            Write::Control { user: user.clone(), control },
            Pending::UserChanged { user, call, next, close: false },
        ))
    }

    /// `BlockVisitor` (a block) or lifting it (`None`): the synced keys stay.
    pub fn block(
        &mut self,
        call: u64,
        user: UserKey,
        block: Option<Block>,
        store: &dyn Stored,
    ) -> Result<(Write, Pending), ReadError> {
        let (profile, mut control) = self.latest(&user, store)?;
        let close = block.is_some();
        control.block = block;
        self.remember(&user, profile, control.clone());
        Ok((
            Write::Control { user: user.clone(), control },
            Pending::UserChanged { user, call, next: None, close },
        ))
    }

    /// A change to `user` has completed, durably or not.
    pub fn done(&mut self, user: &UserKey) {
        if let Some(f) = self.in_flight.get_mut(user) {
            f.changes -= 1;
            if f.changes == 0 {
                self.in_flight.remove(user);
            }
        }
    }

    /// The user's state: as the last change in flight leaves it, else as
    /// stored.
    fn latest(
        &self,
        user: &UserKey,
        store: &dyn Stored,
    ) -> Result<(Option<Profile>, UserControl), ReadError> {
        if let Some(f) = self.in_flight.get(user) {
            return Ok((f.profile.clone(), f.control.clone()));
        }
        let profile = store.user(user.role, &user.id)?.map(|u| Profile {
            role: user.role,
            id: u.id,
            name: u.name,
            meta: u.meta,
            visitor_key_hash: u.visitor_key_hash,
            created_ms: 0,
        });
        Ok((profile, store.control(user.role, &user.id)?.unwrap_or_default()))
    }

    fn remember(&mut self, user: &UserKey, profile: Option<Profile>, control: UserControl) {
        let f = self.in_flight.entry(user.clone()).or_insert(InFlight {
            profile: None,
            control: UserControl::default(),
            changes: 0,
        });
        if profile.is_some() {
            f.profile = profile;
        }
        f.control = control;
        f.changes += 1;
    }
}

/// `updates` over `base`, key by key, sorted by key.
fn merged(base: Vec<(String, String)>, updates: &Meta) -> Vec<(String, String)> {
    let mut all: Meta = base.into_iter().collect();
    merge_meta(&mut all, updates);
    all.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use kefu_proto::Role;

    use crate::chat::testing::MemStore;

    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> Meta {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn visitor(id: &str) -> UserKey {
        UserKey::visitor(id.into())
    }

    /// Applies a change's writes to `store`, as the chained completions would.
    fn land(store: &MemStore, changes: &mut UserChanges, (write, pending): (Write, Pending)) {
        store.apply(&write);
        let Pending::UserChanged { user, next, .. } = pending else { panic!("{pending:?}") };
        if let Some(next) = next {
            store.apply(&next);
        }
        changes.done(&user);
    }

    #[test]
    fn two_syncs_in_flight_keep_both_changes() {
        let (store, mut changes) = (MemStore::default(), UserChanges::default());
        let first = changes.sync(1, visitor("v1"), None, meta(&[("vip_level", "3")]), 5, &store).unwrap();
        let second =
            changes.sync(2, visitor("v1"), Some("Ada".into()), meta(&[("plan", "gold")]), 6, &store).unwrap();
        land(&store, &mut changes, first);
        land(&store, &mut changes, second);
        let control = store.control(Role::Visitor, "v1").unwrap().unwrap();
        assert_eq!(control.meta, Vec::from_iter(meta(&[("plan", "gold"), ("vip_level", "3")])));
        assert_eq!(control.name.as_deref(), Some("Ada"));
        let user = store.user(Role::Visitor, "v1").unwrap().unwrap();
        assert_eq!(user.meta, control.meta, "the profile got both too");
        assert!(changes.in_flight.is_empty(), "forgotten once nothing is in flight");
    }

    #[test]
    fn a_block_keeps_the_synced_keys_and_lifting_it_keeps_them_too() {
        let (store, mut changes) = (MemStore::default(), UserChanges::default());
        let sync = changes.sync(1, visitor("v1"), None, meta(&[("vip_level", "3")]), 5, &store).unwrap();
        let block = Block { until_ms: 0, reason: "spam".into(), at_ms: 6 };
        let blocking = changes.block(2, visitor("v1"), Some(block.clone()), &store).unwrap();
        assert!(matches!(blocking.1, Pending::UserChanged { close: true, next: None, .. }));
        land(&store, &mut changes, sync);
        land(&store, &mut changes, blocking);
        let control = store.control(Role::Visitor, "v1").unwrap().unwrap();
        assert_eq!((control.block, control.meta.len()), (Some(block), 1));
        let lifting = changes.block(3, visitor("v1"), None, &store).unwrap();
        land(&store, &mut changes, lifting);
        let control = store.control(Role::Visitor, "v1").unwrap().unwrap();
        assert_eq!((control.block, control.meta.len()), (None, 1));
        assert_eq!(
            store.user(Role::Visitor, "v1").unwrap().unwrap().meta.len(),
            1,
            "a block leaves the profile"
        );
    }
}
