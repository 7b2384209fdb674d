//! What the machines' unit tests and the simulation ([`super::sim`], feature
//! `sim`) share: a store in memory that implements [`Stored`] and applies
//! the writes a test commits, and a reader for the WebSocket frames the
//! machines encode.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

use kefu_proto::client::{Codec, ConvSummary, Msg, ServerFrame};
use kefu_proto::{ConvId, ErrorCode, Role};

use super::SessionAddr;
use super::home::Durable;
use super::outbox::{ConvState, Write};
use super::stored::{Earlier, ReadError, Stored, StoredUser, UserControl};
use crate::conversation::RestoredConversation;
use crate::identity::{AgentRef, Visitor};

/// A store in memory.
#[derive(Default)]
pub struct MemStore {
    convs: RefCell<BTreeMap<ConvId, ConvState>>,
    messages: RefCell<BTreeMap<(ConvId, u64), Msg>>,
    users: RefCell<HashMap<(Role, String), StoredUser>>,
    controls: RefCell<HashMap<(Role, String), UserControl>>,
    /// Reads fail while this is set, with `unavailable`.
    pub fail_reads: Cell<bool>,
    /// Reads of the dedupe index made (the window answers the others).
    pub dedupe_reads: Cell<u32>,
}

impl MemStore {
    fn check(&self) -> Result<(), ReadError> {
        match self.fail_reads.get() {
            true => Err(ReadError { code: ErrorCode::Unavailable, message: "disk on fire".into() }),
            false => Ok(()),
        }
    }

    /// Applies a write as the store's writer would, with its outcome
    /// (a message's seq is taken as given: see [`Self::commit`]).
    pub fn apply(&self, write: &Write) -> Durable {
        match write {
            Write::Message(m) => {
                if let Some(earlier) = self.resent(m) {
                    return earlier;
                }
                self.messages.borrow_mut().insert((m.conv, m.seq), m.clone());
                Durable { seq: m.seq, ts_ms: m.ts, duplicate: false }
            }
            Write::Conversation(c) => {
                self.convs.borrow_mut().insert(c.conv, c.clone());
                Durable { seq: 0, ts_ms: 0, duplicate: false }
            }
            Write::User(p) => {
                let user = StoredUser {
                    id: p.id.clone(),
                    name: p.name.clone(),
                    meta: p.meta.clone(),
                    visitor_key_hash: p.visitor_key_hash,
                };
                self.users.borrow_mut().insert((p.role, p.id.clone()), user);
                Durable { seq: 0, ts_ms: 0, duplicate: false }
            }
            Write::Control { user, control } => {
                self.controls.borrow_mut().insert((user.role, user.id.to_string()), control.clone());
                Durable { seq: 0, ts_ms: 0, duplicate: false }
            }
            Write::Read { .. } | Write::Presence { .. } => Durable { seq: 0, ts_ms: 0, duplicate: false },
        }
    }

    /// Applies a write as the store's writer does, refusal included: a
    /// message that is no resend and whose seq is not its conversation's
    /// next is refused (the writer's seq conflict, `unavailable`) and
    /// nothing is stored, so the log stays gap-free whatever the machines
    /// ask for.
    pub fn commit(&self, write: &Write) -> Result<Durable, ReadError> {
        if let Write::Message(m) = write
            && self.resent(m).is_none()
        {
            let last = self.messages_of_last(m.conv);
            if m.seq != last + 1 {
                let message = format!("{}: seq conflict: expected {}, got {}", m.conv, last + 1, m.seq);
                return Err(ReadError { code: ErrorCode::Unavailable, message });
            }
        }
        Ok(self.apply(write))
    }

    /// The original of a resent message (same conversation, sender and
    /// cid), as the writer's dedupe index finds it.
    fn resent(&self, m: &Msg) -> Option<Durable> {
        let messages = self.messages.borrow();
        let mut of_conv = messages.range((m.conv, 0)..=(m.conv, u64::MAX)).map(|(_, o)| o);
        of_conv
            .find(|o| o.cid == m.cid && o.from.role == m.from.role && o.from.id == m.from.id)
            .map(|o| Durable { seq: o.seq, ts_ms: o.ts, duplicate: true })
    }

    fn messages_of_last(&self, conv: ConvId) -> u64 {
        let messages = self.messages.borrow();
        messages.range((conv, 0)..=(conv, u64::MAX)).next_back().map_or(0, |((_, seq), _)| *seq)
    }

    /// A conversation's stored state.
    pub fn conversation_state(&self, conv: ConvId) -> Option<ConvState> {
        self.convs.borrow().get(&conv).cloned()
    }

    /// Every stored message of `conv`, in seq order.
    pub fn messages_of(&self, conv: ConvId) -> Vec<Msg> {
        self.messages.borrow().range((conv, 0)..=(conv, u64::MAX)).map(|(_, m)| m.clone()).collect()
    }

    fn range(&self, conv: ConvId, seqs: impl std::ops::RangeBounds<u64>) -> Vec<Msg> {
        let messages = self.messages.borrow();
        let of_conv = messages.range((conv, 0)..=(conv, u64::MAX)).map(|(_, m)| m);
        of_conv.filter(|m| seqs.contains(&m.seq)).cloned().collect()
    }
}

impl Stored for MemStore {
    fn conversation(&self, conv: ConvId) -> Result<Option<RestoredConversation>, ReadError> {
        self.check()?;
        let Some(c) = self.convs.borrow().get(&conv).cloned() else { return Ok(None) };
        let last = self.messages_of(conv).pop();
        let visitor = self.users.borrow().get(&(Role::Visitor, c.visitor_id.clone())).cloned();
        Ok(Some(RestoredConversation {
            id: conv,
            visitor: Visitor {
                id: c.visitor_id.as_str().into(),
                name: visitor.as_ref().map_or(c.visitor_id.as_str(), |u| u.name.as_str()).into(),
                meta: visitor.map(|u| u.meta.into_iter().collect()).unwrap_or_default(),
            },
            status: c.status,
            group: c.group.as_deref().unwrap_or("default").into(),
            agent: c.agent.map(|a| AgentRef { id: a.id.as_str().into(), name: a.name.as_str().into() }),
            last_seq: last.as_ref().map_or(0, |m| m.seq),
            last_ts: last.map_or(c.at_ms, |m| m.ts),
            since_ms: c.at_ms,
        }))
    }

    fn user(&self, role: Role, id: &str) -> Result<Option<StoredUser>, ReadError> {
        self.check()?;
        Ok(self.users.borrow().get(&(role, id.to_string())).cloned())
    }

    fn control(&self, role: Role, id: &str) -> Result<Option<UserControl>, ReadError> {
        self.check()?;
        Ok(self.controls.borrow().get(&(role, id.to_string())).cloned())
    }

    fn earlier(
        &self,
        role: Role,
        id: &str,
        conv: ConvId,
        cid: &str,
        below: u64,
    ) -> Result<Option<Earlier>, ReadError> {
        self.check()?;
        self.dedupe_reads.set(self.dedupe_reads.get() + 1);
        Ok(self
            .range(conv, ..below)
            .into_iter()
            .find(|m| m.cid == cid && m.from.role == role && m.from.id == id)
            .map(|m| Earlier { seq: m.seq, ts_ms: m.ts }))
    }

    fn after(&self, conv: ConvId, seq: u64, limit: usize) -> Result<Vec<Msg>, ReadError> {
        self.check()?;
        Ok(self.range(conv, seq + 1..).into_iter().take(limit).collect())
    }

    fn before(&self, conv: ConvId, seq: u64, limit: usize) -> Result<Vec<Msg>, ReadError> {
        self.check()?;
        let page = self.range(conv, ..seq);
        Ok(page[page.len().saturating_sub(limit)..].to_vec())
    }

    fn sizes(
        &self,
        conv: ConvId,
        seqs: std::ops::RangeInclusive<u64>,
        visit: &mut dyn FnMut(u64, usize, Option<usize>) -> bool,
    ) -> Result<(), ReadError> {
        self.check()?;
        for m in self.range(conv, seqs).into_iter().rev() {
            let text = m.text.as_ref().map_or(0, String::len);
            if !visit(m.seq, text, m.attachment.as_ref().map(|a| a.data.len())) {
                break;
            }
        }
        Ok(())
    }

    fn last_seq(&self, conv: ConvId) -> Result<u64, ReadError> {
        self.check()?;
        Ok(self.messages_of_last(conv))
    }

    fn conversations_of(&self, visitor: &str, limit: usize) -> Result<Vec<ConvSummary>, ReadError> {
        self.check()?;
        let convs = self.convs.borrow();
        let mine = convs.values().rev().filter(|c| c.visitor_id == visitor).take(limit);
        Ok(mine
            .map(|c| ConvSummary {
                conv: c.conv,
                status: c.status,
                last_seq: self.messages_of(c.conv).last().map_or(0, |m| m.seq),
            })
            .collect())
    }
}

/// The server frames packed in `bytes`, decoded with `codec`.
pub fn decode_frames(codec: Codec, bytes: &[u8]) -> Vec<ServerFrame> {
    kefu_proto::ws::payloads(bytes)
        .map(|p| codec.decode_server(p).expect("a frame the machine encoded decodes"))
        .collect()
}

/// A connection on shard `shard`, registry slot `slot`.
pub fn addr(shard: u16, slot: u32) -> SessionAddr {
    SessionAddr { shard, slot, generation: 1 }
}
