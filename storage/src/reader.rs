//! Reads, from any thread, without blocking the writer.
//!
//! Each call opens a redb read transaction (MVCC): it sees the last commit
//! that had finished when it began, and never anything half-committed.
//! Every value is validated as it is read (rkyv bytecheck for archives, the
//! compact message format's own checks for messages), and the index
//! and the log are checked against each other (the record an index entry
//! points at must be that conversation's message with that seq), so a
//! damaged file surfaces as [`StorageError::Corrupt`] at the record that
//! is damaged.
//!
//! The `visit_*` methods hand out records in place (zero-copy, straight
//! from redb's page: a [`MessageView`] whichever format a message was
//! stored in, an archive for any other record); the others return owned
//! copies built from them.

use std::ops::{Bound, ControlFlow, RangeBounds};
use std::sync::{Arc, Mutex};

use kefu_proto::ids::{ConvStatus, Role};
use redb::{ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::compact::MessageView;
use crate::compact_state::ConversationView;
use crate::dedupe::{SlotCache, U64Map};
use crate::error::{IoContext, StorageError};
use crate::record::{
    ArchivedUserControlRecord, ConvChange, ConversationRecord, LogRecord, LogView, MessageRecord, SenderMemo,
    UserControlRecord, UserRecord, access, access_conversation, access_log_with, access_user, to_owned,
};
use crate::tables;
use crate::tail::{self, TailView};

/// A record and where it sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged<T> {
    /// The log offset.
    pub offset: u64,
    /// The record.
    pub record: T,
}

/// One log record as a consumer of the log sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    /// The log offset (from 0; the control plane adds 1).
    pub offset: u64,
    /// The record.
    pub record: LogRecord,
    /// For a conversation record, what it changed; else `None`.
    pub change: Option<ConvChange>,
}

/// What the dedupe index remembers of the first append of a
/// (sender, conversation, cid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeHit {
    /// Its seq.
    pub seq: u64,
    /// Its log offset.
    pub offset: u64,
    /// Its ts_ms.
    pub ts_ms: u64,
}

/// Which conversations [`Reader::list_conversations`] keeps; an unset
/// field keeps all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationFilter {
    /// Only conversations in this state.
    pub status: Option<ConvStatus>,
    /// Only those assigned (or, once closed, last assigned) to this agent id.
    pub agent_id: Option<String>,
    /// Only those of this skill group.
    pub group: Option<String>,
}

impl ConversationFilter {
    fn matches(&self, c: &ConversationView<'_>) -> bool {
        self.status.is_none_or(|s| c.status == s)
            && self.agent_id.as_deref().is_none_or(|want| c.agent.is_some_and(|a| a.id == want))
            && self.group.as_deref().is_none_or(|want| c.group == Some(want))
    }
}

/// One page of [`Reader::list_conversations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationPage {
    /// Newest first, each with `last_seq`.
    pub conversations: Vec<ConversationRecord>,
    /// Pass as `before` for the next page; `None` when nothing is left.
    pub next_before: Option<u64>,
}

/// Read access to the store. Cheap to clone; `Send` and `Sync`.
#[derive(Clone)]
pub struct Reader {
    pub(crate) db: Arc<crate::reopen::DbSlot>,
    pub(crate) slots: Arc<Mutex<SlotCache>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

/// `seqs` of one conversation as an inclusive key range of the index,
/// or `None` if empty.
fn index_range(conv: u64, seqs: impl RangeBounds<u64>) -> Option<((u64, u64), (u64, u64))> {
    let lo = match seqs.start_bound() {
        Bound::Included(&a) => a,
        Bound::Excluded(&a) => a.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let hi = match seqs.end_bound() {
        Bound::Included(&b) => b,
        Bound::Excluded(&b) => b.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (lo <= hi).then_some(((conv, lo), (conv, hi)))
}

impl Reader {
    /// A reader with a dedupe cache of its own, for a thread that looks up
    /// only its own conversations (a shard, for those homed on it): its
    /// lookups never wait on another thread's, and the cache holds only
    /// what that thread asks about.
    pub fn with_own_dedupe_cache(&self) -> Reader {
        let cache = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).empty_like();
        Reader { db: self.db.clone(), slots: Arc::new(Mutex::new(cache)) }
    }

    fn txn(&self) -> Result<ReadTransaction, StorageError> {
        self.db.get()?.begin_read().ctx("begin read")
    }

    /// A read transaction and the last seq of every conversation's index
    /// tail, consistent (`tail.rs`): for reads over many conversations,
    /// which would hold the writer up if they held the tails throughout.
    fn txn_and_last_seqs(&self) -> Result<(ReadTransaction, U64Map<u64>), StorageError> {
        let tails = self.db.tails.read();
        let txn = self.txn()?;
        Ok((txn, tails.last_seqs()))
    }

    /// A read transaction and `conv`'s index tail, consistent (`tail.rs`).
    fn txn_and_tail(&self, conv: u64) -> Result<(ReadTransaction, TailView), StorageError> {
        let tails = self.db.tails.read();
        let txn = self.txn()?;
        Ok((txn, tails.view(conv)))
    }

    /// Visits up to `limit` messages of `conv` with seq in `seqs`, in
    /// ascending seq order (descending if `newest_first`), zero-copy.
    /// `f` gets each message's offset and view and may stop
    /// the visit early.
    pub fn visit_messages(
        &self,
        conv: u64,
        seqs: impl RangeBounds<u64>,
        newest_first: bool,
        limit: usize,
        mut f: impl FnMut(u64, &MessageView<'_>) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        let Some((lo, hi)) = index_range(conv, seqs) else { return Ok(()) };
        if limit == 0 {
            return Ok(());
        }
        let (txn, tail) = self.txn_and_tail(conv)?;
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let log = txn.open_table(tables::LOG).ctx("open table log")?;
        let range = tail::entries(&index, &tail, conv, lo.1, hi.1)?;
        let mut senders = SenderMemo::default();
        let mut visit = |entry: Result<(u64, u64, u64), StorageError>| {
            let (seq, offset, _slot) = entry?;
            let guard = log.get(offset).ctx("read log")?.ok_or_else(|| StorageError::Corrupt {
                table: "conv_runs",
                key: format!("({conv}, {seq})"),
                message: format!("points at offset {offset}, which is not in the log"),
            })?;
            access_log_with(&log, &mut senders, offset, guard.value(), |view| match view {
                LogView::Message(m) if m.conv == conv && m.seq == seq => Ok(f(offset, &m)),
                _ => Err(StorageError::Corrupt {
                    table: "log",
                    key: offset.to_string(),
                    message: format!("is not message ({conv}, {seq}) that the conversation index says it is"),
                }),
            })?
        };
        let mut n = 0;
        if newest_first {
            for entry in range.rev() {
                n += 1;
                if visit(entry)?.is_break() || n >= limit {
                    break;
                }
            }
        } else {
            for entry in range {
                n += 1;
                if visit(entry)?.is_break() || n >= limit {
                    break;
                }
            }
        }
        Ok(())
    }

    fn collect_messages(
        &self,
        conv: u64,
        seqs: impl RangeBounds<u64>,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<Logged<MessageRecord>>, StorageError> {
        let mut out = Collected::with_capacity(limit.min(256));
        self.visit_messages(conv, seqs, newest_first, limit, |offset, m| out.push(offset, m.to_record()))?;
        out.finish()
    }

    /// A page of history: up to `limit` messages of `conv` with
    /// `seq < before` (without `before`: the newest), ascending.
    pub fn history(
        &self,
        conv: u64,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Logged<MessageRecord>>, StorageError> {
        let mut page = match before {
            Some(b) => self.collect_messages(conv, ..b, true, limit)?,
            None => self.collect_messages(conv, .., true, limit)?,
        };
        page.reverse();
        Ok(page)
    }

    /// What a resuming client missed: up to `limit` messages of `conv` with
    /// `seq > after_seq`, ascending.
    pub fn after(
        &self,
        conv: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Logged<MessageRecord>>, StorageError> {
        match after_seq.checked_add(1) {
            Some(from) => self.collect_messages(conv, from.., false, limit),
            None => Ok(Vec::new()),
        }
    }

    /// One message by its seq.
    pub fn message(&self, conv: u64, seq: u64) -> Result<Option<Logged<MessageRecord>>, StorageError> {
        Ok(self.collect_messages(conv, seq..=seq, false, 1)?.pop())
    }

    /// The last seq of `conv` (0: no messages).
    pub fn last_seq(&self, conv: u64) -> Result<u64, StorageError> {
        let (txn, tail) = self.txn_and_tail(conv)?;
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        tail::last_seq(&index, conv, tail.last_seq())
    }

    /// A conversation, with `last_seq` from the index.
    pub fn conversation(&self, conv: u64) -> Result<Option<ConversationRecord>, StorageError> {
        let (txn, tail) = self.txn_and_tail(conv)?;
        let table = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
        let Some(guard) = table.get(conv).ctx("read conversations")? else { return Ok(None) };
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let view = access_conversation(guard.value(), conv)?;
        Ok(Some(conversation_record(&view, conv, &index, tail.last_seq())?))
    }

    /// A visitor's conversations, newest first, at most `limit`, each with
    /// `last_seq` (what a returning visitor is shown).
    pub fn conversations_of(
        &self,
        visitor: &str,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, StorageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The visitor's newest conversations and their tails' last seqs are
        // read with the tails held (`tail.rs`): `limit` keys, and the writer
        // waits no longer than that. (A conversation is stored with its
        // `user_conversations` key, so each key has its record.)
        let (txn, convs) = {
            let tails = self.db.tails.read();
            let txn = self.txn()?;
            let mine = txn.open_table(tables::USER_CONVERSATIONS).ctx("open table user_conversations")?;
            let mut convs = Vec::new();
            for entry in mine.range((visitor, 0)..=(visitor, u64::MAX)).ctx("read user_conversations")?.rev()
            {
                let (key, _) = entry.ctx("read user_conversations")?;
                let (_, conv) = key.value();
                convs.push((conv, tails.last_seq(conv)));
                if convs.len() >= limit {
                    break;
                }
            }
            (txn, convs)
        };
        let table = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let mut out = Vec::new();
        for (conv, tail_last) in convs {
            let Some(guard) = table.get(conv).ctx("read conversations")? else { continue };
            let view = access_conversation(guard.value(), conv)?;
            out.push(conversation_record(&view, conv, &index, tail_last)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every conversation that is not closed, by id, with `last_seq`: what
    /// the gateway routes and serves after a restart.
    pub fn open_conversations(&self) -> Result<Vec<ConversationRecord>, StorageError> {
        let (txn, lasts) = self.txn_and_last_seqs()?;
        let table = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let mut out = Vec::new();
        for entry in table.iter().ctx("read conversations")? {
            let (key, value) = entry.ctx("read conversations")?;
            let id = key.value();
            let view = access_conversation(value.value(), id)?;
            if view.status == ConvStatus::Closed {
                continue;
            }
            out.push(conversation_record(&view, id, &index, lasts.get(&id).copied())?);
        }
        Ok(out)
    }

    /// A page of every conversation, newest (highest id) first, that
    /// passes `filter`: those with an id below `before` (`None`: from the
    /// newest), at most `page_size` of them, after examining at most
    /// `scan_max` conversations. The filter reads the archived records in
    /// place, so conversations it skips cost no copy.
    ///
    /// A page can be short, even empty, when `scan_max` ran out first;
    /// [`ConversationPage::next_before`] then says where to go on. It is
    /// `None` only when no conversation below the page is left.
    pub fn list_conversations(
        &self,
        filter: &ConversationFilter,
        before: Option<u64>,
        page_size: usize,
        scan_max: usize,
    ) -> Result<ConversationPage, StorageError> {
        let mut page = ConversationPage { conversations: Vec::new(), next_before: None };
        let upper = before.unwrap_or(u64::MAX);
        if page_size == 0 || scan_max == 0 || upper == 0 {
            return Ok(page);
        }
        let (txn, lasts) = self.txn_and_last_seqs()?;
        let table = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        // `before = None` must include id u64::MAX too.
        let range = match before {
            Some(b) => table.range::<u64>(..b),
            None => table.range::<u64>(..),
        };
        let mut scanned = 0;
        let mut entries = range.ctx("read conversations")?.rev();
        for entry in entries.by_ref() {
            let (key, value) = entry.ctx("read conversations")?;
            let id = key.value();
            let view = access_conversation(value.value(), id)?;
            scanned += 1;
            if filter.matches(&view) {
                page.conversations.push(conversation_record(&view, id, &index, lasts.get(&id).copied())?);
            }
            if page.conversations.len() >= page_size || scanned >= scan_max {
                page.next_before = Some(id);
                break;
            }
        }
        // Stopped at a bound with nothing below: there is no next page.
        if page.next_before.is_some() && entries.next().is_none() {
            page.next_before = None;
        }
        Ok(page)
    }

    /// How many conversations were ever stored.
    pub fn conversation_count(&self) -> Result<u64, StorageError> {
        let txn = self.txn()?;
        let table = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
        table.len().ctx("read conversations")
    }

    /// The profile of the user `id` acting as `role` (an agent and a
    /// visitor with the same id are two users).
    pub fn user(&self, role: Role, id: &str) -> Result<Option<UserRecord>, StorageError> {
        let txn = self.txn()?;
        let table = txn.open_table(tables::USERS).ctx("open table users")?;
        let Some(guard) = table.get((role.as_str(), id)).ctx("read users")? else { return Ok(None) };
        let view = access_user(guard.value(), &format_args!("{} {id}", role.as_str()))?;
        Ok(Some(view.to_record()))
    }

    /// What the business system set for the user `id` acting as `role`
    /// apart from the profile (synced keys, a block).
    pub fn user_control(&self, role: Role, id: &str) -> Result<Option<UserControlRecord>, StorageError> {
        let txn = self.txn()?;
        let table = txn.open_table(tables::USER_CONTROLS).ctx("open table user_controls")?;
        let Some(guard) = table.get((role.as_str(), id)).ctx("read user_controls")? else { return Ok(None) };
        let archived: &ArchivedUserControlRecord =
            access(guard.value(), "user_controls", &format_args!("{} {id}", role.as_str()))?;
        Ok(Some(to_owned(archived)?))
    }

    /// The first append of (sender, conversation, cid), if there was one;
    /// the sender is `role` and `sender` (its id). Costs about one short
    /// index read (the readers share a cache of the conversation's dedupe
    /// slots, extended with what was appended since).
    pub fn dedupe(
        &self,
        role: Role,
        sender: &str,
        conv: u64,
        cid: &str,
    ) -> Result<Option<DedupeHit>, StorageError> {
        // Held across the read transaction: see `SlotCache::find`.
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (txn, tail) = self.txn_and_tail(conv)?;
        let index = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let log = txn.open_table(tables::LOG).ctx("open table log")?;
        let hit = slots.find(&index, &tail, &log, conv, (role, sender), cid)?;
        Ok(hit.map(|o| DedupeHit { seq: o.seq, offset: o.offset, ts_ms: o.ts_ms }))
    }

    /// As [`Self::dedupe`], for a caller that knows every append of the
    /// conversation from `before_seq` on (its own window of recent cids):
    /// when the shared cache has already read the conversation's index
    /// below `before_seq` and holds no slot of (sender, cid), the answer is
    /// `None` without a read transaction. `before_seq` 1 is always `None`.
    pub fn dedupe_before(
        &self,
        role: Role,
        sender: &str,
        conv: u64,
        cid: &str,
        before_seq: u64,
    ) -> Result<Option<DedupeHit>, StorageError> {
        if before_seq <= 1 {
            return Ok(None);
        }
        {
            let slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if slots.knows_absent(conv, (role, sender), cid, before_seq) {
                return Ok(None);
            }
        }
        self.dedupe(role, sender, conv, cid)
    }

    /// Visits up to `limit` log records from `from_offset` on, in offset
    /// order, zero-copy.
    pub fn visit_log(
        &self,
        from_offset: u64,
        limit: usize,
        mut f: impl FnMut(u64, &LogView<'_>) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        if limit == 0 {
            return Ok(());
        }
        let txn = self.txn()?;
        let log = txn.open_table(tables::LOG).ctx("open table log")?;
        let mut senders = SenderMemo::default();
        for (n, entry) in log.range(from_offset..).ctx("read log")?.enumerate() {
            let (key, value) = entry.ctx("read log")?;
            let offset = key.value();
            if access_log_with(&log, &mut senders, offset, value.value(), |view| f(offset, &view))?.is_break()
                || n + 1 >= limit
            {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` log records from `from_offset` on, in offset order:
    /// the event stream a business system consumes.
    pub fn scan(&self, from_offset: u64, limit: usize) -> Result<Vec<Logged<LogRecord>>, StorageError> {
        let mut out = Collected::with_capacity(limit.min(1024));
        self.visit_log(from_offset, limit, |offset, view| out.push(offset, view.to_owned()))?;
        out.finish()
    }

    /// Up to `limit` log records with offsets in `from_offset..end`, in
    /// offset order, each conversation record with what it changed. `end`
    /// is where the caller stops: the store's [`log_end`](crate::Store::log_end),
    /// so that nothing a crash could take back is ever handed out.
    pub fn events(&self, from_offset: u64, end: u64, limit: usize) -> Result<Vec<LogEvent>, StorageError> {
        let mut out = Vec::new();
        if limit == 0 || from_offset >= end {
            return Ok(out);
        }
        out.reserve(limit.min(1024));
        let txn = self.txn()?;
        let log = txn.open_table(tables::LOG).ctx("open table log")?;
        let changes = txn.open_table(tables::CONV_CHANGES).ctx("open table conv_changes")?;
        let mut senders = SenderMemo::default();
        for entry in log.range(from_offset..end).ctx("read log")? {
            let (key, value) = entry.ctx("read log")?;
            let offset = key.value();
            let record = access_log_with(&log, &mut senders, offset, value.value(), |view| view.to_owned())??;
            let change = match record {
                LogRecord::Conversation(_) => {
                    let byte = changes.get(offset).ctx("read conv_changes")?.map(|g| g.value());
                    let change = byte.and_then(ConvChange::from_byte);
                    Some(change.ok_or_else(|| StorageError::Corrupt {
                        table: "conv_changes",
                        key: offset.to_string(),
                        message: format!("holds {byte:?}, not the change of the conversation record there"),
                    })?)
                }
                _ => None,
            };
            out.push(LogEvent { offset, record, change });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// A consumer's committed offset.
    pub fn consumer_offset(&self, consumer: &str) -> Result<Option<u64>, StorageError> {
        let txn = self.txn()?;
        let table = txn.open_table(tables::CONSUMER_OFFSETS).ctx("open table consumer_offsets")?;
        Ok(table.get(consumer).ctx("read consumer_offsets")?.map(|g| g.value()))
    }

    /// The offset the next log record will get (= records logged).
    pub fn next_offset(&self) -> Result<u64, StorageError> {
        let txn = self.txn()?;
        let log = txn.open_table(tables::LOG).ctx("open table log")?;
        Ok(log.last().ctx("read log")?.map_or(0, |(k, _)| k.value() + 1))
    }

    /// One more than the highest conversation id stored: where the gateway
    /// starts allocating ids after a restart.
    pub fn next_conv_id(&self) -> Result<u64, StorageError> {
        let txn = self.txn()?;
        let meta = txn.open_table(tables::META).ctx("open table meta")?;
        Ok(meta.get(tables::META_NEXT_CONV_ID).ctx("read meta")?.map_or(1, |g| g.value()))
    }
}

/// Owned copies of the records a visit hands out, up to the first that
/// cannot be copied, whose error stops the visit.
struct Collected<T> {
    out: Vec<Logged<T>>,
    failed: Option<StorageError>,
}

impl<T> Collected<T> {
    fn with_capacity(n: usize) -> Self {
        Collected { out: Vec::with_capacity(n), failed: None }
    }

    fn push(&mut self, offset: u64, record: Result<T, StorageError>) -> ControlFlow<()> {
        match record {
            Ok(record) => {
                self.out.push(Logged { offset, record });
                ControlFlow::Continue(())
            }
            Err(e) => {
                self.failed = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    fn finish(self) -> Result<Vec<Logged<T>>, StorageError> {
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }
}

/// A stored conversation, owned, with `last_seq` from the index.
fn conversation_record(
    view: &ConversationView<'_>,
    id: u64,
    index: &impl ReadableTable<(u64, u64), &'static [u8]>,
    tail_last: Option<u64>,
) -> Result<ConversationRecord, StorageError> {
    let mut record = view.to_record();
    record.last_seq = tail::last_seq(index, id, tail_last)?;
    Ok(record)
}
