//! The chat core's reads ([`Stored`]) over the store's [`Reader`]. Every
//! failed read is logged here, once, whatever the machine then answers.

use kefu_core::chat::stored::{Block, Earlier, ReadError, Stored, StoredUser, UserControl};
use kefu_core::conversation::RestoredConversation;
use kefu_proto::client::{ConvSummary, Msg};
use kefu_proto::{ConvId, Role};
use kefu_storage::{Reader, StorageError};
use tracing::warn;

use super::service::restored_conversation;

/// A shard's reads.
pub struct Reads {
    /// The shard's reader (its dedupe cache covers the conversations homed there).
    pub reader: Reader,
    /// `routing.default_group`, for conversations stored without one.
    pub default_group: String,
}

fn read<T>(what: &str, r: Result<T, StorageError>) -> Result<T, ReadError> {
    r.map_err(|e| {
        warn!(error = %e, what, "read failed");
        ReadError { code: e.code(), message: e.to_string() }
    })
}

impl Stored for Reads {
    fn conversation(&self, conv: ConvId) -> Result<Option<RestoredConversation>, ReadError> {
        let restored = self.reader.conversation(conv.0).and_then(|rec| {
            rec.map(|rec| restored_conversation(&self.reader, rec, &self.default_group)).transpose()
        });
        read("conversation", restored)
    }

    fn user(&self, role: Role, id: &str) -> Result<Option<StoredUser>, ReadError> {
        let user = read("user", self.reader.user(role, id))?;
        Ok(user.map(|u| StoredUser {
            id: u.id,
            name: u.name,
            meta: u.meta,
            visitor_key_hash: u.visitor_key_hash,
        }))
    }

    fn control(&self, role: Role, id: &str) -> Result<Option<UserControl>, ReadError> {
        let control = read("user control", self.reader.user_control(role, id))?;
        Ok(control.map(|c| UserControl {
            name: c.synced_name,
            meta: c.synced_meta,
            block: c.block.map(|b| Block { until_ms: b.until_ms, reason: b.reason, at_ms: b.at_ms }),
        }))
    }

    fn earlier(
        &self,
        role: Role,
        id: &str,
        conv: ConvId,
        cid: &str,
        below: u64,
    ) -> Result<Option<Earlier>, ReadError> {
        let hit = read("dedupe", self.reader.dedupe_before(role, id, conv.0, cid, below))?;
        Ok(hit.map(|h| Earlier { seq: h.seq, ts_ms: h.ts_ms }))
    }

    fn after(&self, conv: ConvId, seq: u64, limit: usize) -> Result<Vec<Msg>, ReadError> {
        let page = read("messages", self.reader.after(conv.0, seq, limit))?;
        Ok(page.into_iter().map(|m| m.record.into_msg()).collect())
    }

    fn before(&self, conv: ConvId, seq: u64, limit: usize) -> Result<Vec<Msg>, ReadError> {
        let page = read("history", self.reader.history(conv.0, Some(seq), limit))?;
        Ok(page.into_iter().map(|m| m.record.into_msg()).collect())
    }

    fn sizes(
        &self,
        conv: ConvId,
        seqs: std::ops::RangeInclusive<u64>,
        visit: &mut dyn FnMut(u64, usize, Option<usize>) -> bool,
    ) -> Result<(), ReadError> {
        let visited = self.reader.visit_messages(conv.0, seqs, true, usize::MAX, |_, m| {
            let text = m.text.map_or(0, str::len);
            match visit(m.seq, text, m.attachment.map(|a| a.bytes.len())) {
                true => std::ops::ControlFlow::Continue(()),
                false => std::ops::ControlFlow::Break(()),
            }
        });
        read("message sizes", visited)
    }

    fn last_seq(&self, conv: ConvId) -> Result<u64, ReadError> {
        read("last seq", self.reader.last_seq(conv.0))
    }

    fn conversations_of(&self, visitor: &str, limit: usize) -> Result<Vec<ConvSummary>, ReadError> {
        let list = read("a visitor's conversations", self.reader.conversations_of(visitor, limit))?;
        Ok(list
            .into_iter()
            .map(|c| ConvSummary { conv: ConvId(c.id), status: c.status, last_seq: c.last_seq })
            .collect())
    }
}
