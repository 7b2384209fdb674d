//! What is stored: the records of the log and of the state tables.
//!
//! Every value kefu writes to redb is one byte of format version followed
//! by the record: a chat message in the compact format (byte 2,
//! `compact.rs`), a conversation's state, a user's profile and a read mark
//! in theirs (bytes 3 to 5, `compact_state.rs`), every other record as an rkyv
//! archive (byte 1; records stored before schema versions 6 and 8 are
//! archives too, and still read). rkyv
//! is built with its `unaligned` feature, so archived types have alignment
//! 1 and can be read in place from the byte slice redb hands out, whatever
//! its address. Reads of an archive always go through
//! [`rkyv::access`], which validates the archive (bytecheck) first: a
//! corrupted page yields [`StorageError::Corrupt`], never undefined
//! behaviour or a panic.
//!
//! The log is what a consumer streams and what the gateway rebuilds from:
//! each [`LogRecord`] is a fact that happened (a message, a conversation's
//! new state, a user's profile, a read mark), in commit order.

use kefu_proto::client::{self, Msg};
use kefu_proto::ids::{ConvId, ConvStatus, Role};
use redb::ReadableTable;
use rkyv::rancor;
use rkyv::with::Skip;
use rkyv::{Archive, Deserialize, Serialize};

use crate::cid::Cid;
use crate::compact::{self, AttachmentView, FORMAT_COMPACT_MESSAGE, MessageView};
use crate::compact_state::{
    ConversationView, FORMAT_COMPACT_CONVERSATION, FORMAT_COMPACT_READ, FORMAT_COMPACT_USER, ReadView,
    UserView, encode_read_record, encode_user_record,
};
use crate::dedupe::U64Map;
use crate::error::{IoContext, StorageError};

/// The first byte of every stored value. Bump it (and keep a reader for the
/// old one) when an archived layout changes. Messages are written in the
/// compact format (`compact.rs`, byte 2) since schema version 6,
/// conversation states, profiles and read marks in theirs
/// (`compact_state.rs`, bytes 3 to 5) since 8; format 1 records of older
/// stores read as before.
pub(crate) const FORMAT_V1: u8 = 1;

/// Who wrote a message.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Sender {
    /// Visitor, agent or bot.
    #[rkyv(with = RoleDef)]
    pub role: Role,
    /// The user id (JWT `sub`, or the server-issued visitor id).
    pub id: String,
    /// Display name at the time of writing.
    pub name: String,
}

/// A file sent with a message, stored inline with it.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Attachment {
    /// Its MIME type, as the sender declared it.
    pub mime: String,
    /// The raw bytes (base64 is a wire concern, not a storage one).
    pub bytes: Vec<u8>,
}

/// One chat message, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct MessageRecord {
    /// The conversation.
    pub conv: u64,
    /// Position in the conversation: from 1, no gaps.
    pub seq: u64,
    /// The client's message id (idempotency key, with sender and conversation).
    pub cid: String,
    /// The author.
    pub from: Sender,
    /// Milliseconds since the epoch, set by the gateway.
    pub ts_ms: u64,
    /// The text, if any.
    pub text: Option<String>,
    /// The attachment, if any.
    pub attachment: Option<Attachment>,
}

impl MessageRecord {
    /// The record of `msg` stored at `seq`; the strings move.
    #[cfg(test)]
    pub(crate) fn from_msg(msg: Msg, seq: u64) -> MessageRecord {
        MessageRecord {
            conv: msg.conv.0,
            seq,
            cid: msg.cid,
            from: Sender { role: msg.from.role, id: msg.from.id, name: msg.from.name },
            ts_ms: msg.ts,
            text: msg.text,
            attachment: msg.attachment.map(|a| Attachment { mime: a.mime, bytes: a.data }),
        }
    }

    /// The message as clients see it (`msg`); the strings move. The one
    /// place a stored message becomes a wire one.
    pub fn into_msg(self) -> Msg {
        Msg {
            conv: ConvId(self.conv),
            seq: self.seq,
            cid: self.cid,
            from: client::Sender { role: self.from.role, id: self.from.id, name: self.from.name },
            text: self.text,
            attachment: self.attachment.map(|a| client::Attachment { mime: a.mime, data: a.bytes }),
            ts: self.ts_ms,
        }
    }
}

/// The agent a conversation is assigned to.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct AgentRef {
    /// The agent's user id.
    pub id: String,
    /// Display name at the time of assignment.
    pub name: String,
}

/// A conversation's state, as stored in `conversations` and logged on every
/// change.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct ConversationRecord {
    /// The conversation id (`ConvId.0`).
    pub id: u64,
    /// The visitor who opened it.
    pub visitor_id: String,
    /// Queued, assigned or closed.
    #[rkyv(with = ConvStatusDef)]
    pub status: ConvStatus,
    /// The assigned agent, when `status` is assigned (or was, when closed).
    pub agent: Option<AgentRef>,
    /// The skill group it is queued in or was routed through.
    pub group: Option<String>,
    /// When it was opened, ms since the epoch.
    pub created_ms: u64,
    /// When this state was set, ms since the epoch.
    pub updated_ms: u64,
    /// The last message's `seq` (0: none yet). Not stored: the index is
    /// its only source of truth, so it cannot disagree with the log. The
    /// [`Reader`](crate::Reader) fills it in; a write ignores it.
    #[rkyv(with = Skip)]
    pub last_seq: u64,
}

/// A user's profile (agents, visitors, bots), upserted by the gateway or the
/// business system.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct UserRecord {
    /// The user id.
    pub id: String,
    /// Visitor, agent or bot.
    #[rkyv(with = RoleDef)]
    pub role: Role,
    /// Display name.
    pub name: String,
    /// Profile fields (`vip_level`, `plan`, …), sorted by key, keys unique.
    /// A write sorts them and keeps the last value of a repeated key.
    pub meta: Vec<(String, String)>,
    /// SHA-256 of an anonymous visitor's key. The key itself is never
    /// stored: a stolen database file does not let anyone impersonate a
    /// visitor.
    pub visitor_key_hash: Option<[u8; 32]>,
    /// When the user was first seen, ms since the epoch.
    pub created_ms: u64,
}

/// What the business system decided about a user, apart from the profile
/// the log carries: the name and meta keys it set (`SyncUser`), which a
/// later `connect` lays over the credentials' own, and a block
/// (`BlockVisitor`). Kept in its own table, not in [`UserRecord`], because
/// a profile mixes what tokens brought with what was synced, and only the
/// synced keys may override a newer token. Not logged: a block is not an
/// event, and a sync is logged as the profile it produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct UserControlRecord {
    /// The display name `SyncUser` set, if it set one.
    pub synced_name: Option<String>,
    /// The meta keys `SyncUser` set, sorted by key, keys unique.
    pub synced_meta: Vec<(String, String)>,
    /// The user is refused at `connect` while this holds.
    pub block: Option<BlockRecord>,
}

/// A block on a user's connections.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct BlockRecord {
    /// Until when, ms since the epoch; 0: until unblocked.
    pub until_ms: u64,
    /// Why, as the refused client is told.
    pub reason: String,
    /// When it was decided, ms since the epoch.
    pub at_ms: u64,
}

impl BlockRecord {
    /// Whether it still refuses at `now_ms`.
    pub fn holds_at(&self, now_ms: u64) -> bool {
        self.until_ms == 0 || now_ms < self.until_ms
    }
}

/// An agent's presence, as the router decided it.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// The agent.
    pub agent_id: String,
    /// `online`, `away` or `offline` (the wire names).
    pub status: String,
    /// When, ms since the epoch.
    pub ts_ms: u64,
}

/// "Everything up to `seq` is read" by one participant.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct ReadMark {
    /// The conversation.
    pub conv: u64,
    /// Who read. Not yet their role: a log consumer cannot tell agent
    /// `42`'s mark from visitor `42`'s in the rare conversation that has
    /// both (adding it changes this archive's layout, a new format byte).
    pub user_id: String,
    /// Up to which message.
    pub seq: u64,
    /// When, ms since the epoch.
    pub ts_ms: u64,
}

/// What a logged conversation state changed, decided by the writer from
/// the state it replaced (in the same transaction), so a log consumer need
/// not have seen the earlier states to tell a transfer from an assignment.
/// Stored beside the log, keyed by offset (`conv_changes`), since the log
/// record's archived layout is fixed by its format byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvChange {
    /// The first state stored for this conversation.
    Opened,
    /// Assigned to an agent from a queue (or given another group while
    /// keeping its agent).
    Assigned,
    /// Taken from the agent it was assigned to: to another agent, or back
    /// to a queue (a transfer to a group, or the agent stayed offline past
    /// the grace period).
    Transferred,
    /// Closed.
    Closed,
    /// Queued again without having been assigned (a queued conversation
    /// moved to another group).
    Requeued,
}

impl ConvChange {
    /// The change from `before` (status and agent id of the replaced state;
    /// `None`: nothing was stored) to `status` with `agent`.
    pub fn between(
        before: Option<(ConvStatus, Option<&str>)>,
        status: ConvStatus,
        agent: Option<&str>,
    ) -> Self {
        let Some((was, was_agent)) = before else { return ConvChange::Opened };
        match status {
            ConvStatus::Closed => ConvChange::Closed,
            ConvStatus::Assigned if was == ConvStatus::Assigned && was_agent != agent => {
                ConvChange::Transferred
            }
            ConvStatus::Assigned => ConvChange::Assigned,
            ConvStatus::Queued if was == ConvStatus::Assigned => ConvChange::Transferred,
            ConvStatus::Queued => ConvChange::Requeued,
        }
    }

    /// Its name on the wire: `opened`, `assigned`, `transferred`, `closed`
    /// or `requeued`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConvChange::Opened => "opened",
            ConvChange::Assigned => "assigned",
            ConvChange::Transferred => "transferred",
            ConvChange::Closed => "closed",
            ConvChange::Requeued => "requeued",
        }
    }

    /// Its stored byte (never reuse one).
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            ConvChange::Opened => 1,
            ConvChange::Assigned => 2,
            ConvChange::Transferred => 3,
            ConvChange::Closed => 4,
            ConvChange::Requeued => 5,
        }
    }

    /// The change a stored byte stands for.
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => ConvChange::Opened,
            2 => ConvChange::Assigned,
            3 => ConvChange::Transferred,
            4 => ConvChange::Closed,
            5 => ConvChange::Requeued,
            _ => return None,
        })
    }
}

/// One entry of the global log, in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum LogRecord {
    /// A chat message.
    Message(MessageRecord),
    /// A conversation's new state (opened, assigned, transferred, closed).
    Conversation(ConversationRecord),
    /// A user's profile was created or changed.
    User(UserRecord),
    /// A participant read a conversation up to a seq.
    Read(ReadMark),
    /// An agent's presence changed. Last, and smaller than the largest
    /// variant, so the records stored before it existed read as they did
    /// (see `the_archived_log_record_keeps_its_size`).
    Presence(PresenceRecord),
}

/// rkyv's stand-in for [`Role`], which lives in `kefu-proto` and knows
/// nothing of rkyv. Its archive is [`ArchivedRole`].
#[derive(Debug, Archive, Serialize, Deserialize)]
#[rkyv(remote = Role)]
#[rkyv(archived = ArchivedRole)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[allow(missing_docs)]
pub enum RoleDef {
    Visitor,
    Agent,
    Bot,
}

impl From<RoleDef> for Role {
    fn from(r: RoleDef) -> Role {
        match r {
            RoleDef::Visitor => Role::Visitor,
            RoleDef::Agent => Role::Agent,
            RoleDef::Bot => Role::Bot,
        }
    }
}

impl ArchivedRole {
    /// The role this archived value stands for.
    pub fn get(&self) -> Role {
        match self {
            ArchivedRole::Visitor => Role::Visitor,
            ArchivedRole::Agent => Role::Agent,
            ArchivedRole::Bot => Role::Bot,
        }
    }
}

/// rkyv's stand-in for [`ConvStatus`]. Its archive is
/// [`ArchivedConvStatus`].
#[derive(Debug, Archive, Serialize, Deserialize)]
#[rkyv(remote = ConvStatus)]
#[rkyv(archived = ArchivedConvStatus)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[allow(missing_docs)]
pub enum ConvStatusDef {
    Queued,
    Assigned,
    Closed,
}

impl From<ConvStatusDef> for ConvStatus {
    fn from(s: ConvStatusDef) -> ConvStatus {
        match s {
            ConvStatusDef::Queued => ConvStatus::Queued,
            ConvStatusDef::Assigned => ConvStatus::Assigned,
            ConvStatusDef::Closed => ConvStatus::Closed,
        }
    }
}

impl ArchivedConvStatus {
    /// The status this archived value stands for.
    pub fn get(&self) -> ConvStatus {
        match self {
            ArchivedConvStatus::Queued => ConvStatus::Queued,
            ArchivedConvStatus::Assigned => ConvStatus::Assigned,
            ArchivedConvStatus::Closed => ConvStatus::Closed,
        }
    }
}

/// Appends the version byte and the archive of `value` to `out` (cleared
/// first), reusing its capacity.
pub(crate) fn encode_into<T>(value: &T, out: &mut Vec<u8>) -> Result<(), StorageError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    let mut buf = std::mem::take(out);
    buf.clear();
    buf.push(FORMAT_V1);
    match rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, buf) {
        Ok(buf) => {
            *out = buf;
            Ok(())
        }
        Err(e) => Err(StorageError::Encode(e.to_string())),
    }
}

/// Encodes `value` into a fresh buffer.
#[cfg(test)]
pub(crate) fn encode<T>(value: &T) -> Result<Vec<u8>, StorageError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// A validated, zero-copy view of a stored value. `table` and `key` only
/// name the place in the error.
pub(crate) fn access<'b, T>(
    bytes: &'b [u8],
    table: &'static str,
    key: &dyn std::fmt::Display,
) -> Result<&'b T, StorageError>
where
    T: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
{
    let corrupt = corrupt_in(table, key);
    match bytes.split_first() {
        Some((&FORMAT_V1, archive)) => {
            rkyv::access::<T, rancor::Error>(archive).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("unknown format version {v}"))),
        None => Err(corrupt("empty value".to_string())),
    }
}

/// What makes the error for a value of `table` at `key` that cannot be
/// read, from what was wrong with it.
fn corrupt_in<'k>(
    table: &'static str,
    key: &'k dyn std::fmt::Display,
) -> impl Fn(String) -> StorageError + Copy + 'k {
    move |message| StorageError::Corrupt { table, key: key.to_string(), message }
}

/// A log record read in place: a message, a conversation's state, a
/// profile or a read mark in either of its formats, or a presence change's
/// archive.
#[derive(Clone, Copy)]
pub enum LogView<'a> {
    /// A chat message (format 1 or 2).
    Message(MessageView<'a>),
    /// A conversation's new state (format 1 or 3).
    Conversation(ConversationView<'a>),
    /// A user's profile (format 1 or 4).
    User(UserView<'a>),
    /// A read mark (format 1 or 5).
    Read(ReadView<'a>),
    /// A presence change (format 1). Never a message, a conversation, a
    /// user or a read mark: those are always handed out as their views.
    Other(&'a ArchivedLogRecord),
}

impl std::fmt::Debug for LogView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogView::Message(m) => f.debug_tuple("Message").field(m).finish(),
            LogView::Conversation(c) => f.debug_tuple("Conversation").field(c).finish(),
            LogView::User(u) => f.debug_tuple("User").field(u).finish(),
            LogView::Read(r) => f.debug_tuple("Read").field(r).finish(),
            // An archive has no `Debug` of its own; its owned copy does.
            LogView::Other(_) => match self.to_owned() {
                Ok(record) => f.debug_tuple("Other").field(&record).finish(),
                Err(e) => f.debug_tuple("Other").field(&e).finish(),
            },
        }
    }
}

impl LogView<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Result<LogRecord, StorageError> {
        match self {
            LogView::Message(m) => Ok(LogRecord::Message(m.to_record()?)),
            LogView::Conversation(c) => Ok(LogRecord::Conversation(c.to_record())),
            LogView::User(u) => Ok(LogRecord::User(u.to_record())),
            LogView::Read(r) => Ok(LogRecord::Read(r.to_record())),
            LogView::Other(archived) => to_owned(*archived),
        }
    }
}

/// A validated, zero-copy view of the log value at `offset`, whichever
/// format it was stored in, handed to `f`; a message whose sender is
/// stored in an earlier record (`compact.rs`) with that sender read from
/// there, in the same transaction. Every reader of the log reads through
/// here, or through [`access_log_with`] when it reads many records.
pub(crate) fn access_log_in<R>(
    log: &impl ReadableTable<crate::tables::LogOffset, &'static [u8]>,
    offset: u64,
    bytes: &[u8],
    f: impl FnOnce(LogView<'_>) -> R,
) -> Result<R, StorageError> {
    access_log_with(log, &mut SenderMemo::default(), offset, bytes, f)
}

/// The senders a read has followed pointers to: a page of a
/// conversation's messages names a visitor and an agent or two, and
/// reading each one's record once instead of once per message took a
/// page of 50 from 21% slower than with every sender in full to 5%
/// faster (BENCHMARKS.md, "a message's sender named once"). A read of the
/// log's records in order (the event stream, the tails' rebuild at open)
/// meets every active sender: it holds up to [`SenderMemo::MAX`] and
/// forgets them all when full; the rebuild of the tails at open holds up
/// to [`SenderMemo::REBUILD`] (a memo of 4,096 made a restart's open at
/// 10,000 senders 1.7× as long: BENCHMARKS.md).
pub(crate) struct SenderMemo {
    /// The record's offset → its sender's role, id and name.
    held: U64Map<(Role, Box<str>, Box<str>)>,
    max: usize,
}

impl Default for SenderMemo {
    fn default() -> Self {
        SenderMemo::holding(Self::MAX)
    }
}

impl SenderMemo {
    /// Senders held at most (~100 bytes each); a test's few senders
    /// fill it.
    const MAX: usize = if cfg!(test) { 8 } else { 4096 };

    /// Senders the rebuild at open holds at most: more than the records
    /// it reads at the default `storage.index_lag` (100,000), ~100 MB at
    /// most for a longer lag with as many senders.
    pub(crate) const REBUILD: usize = 1 << 20;

    /// A memo of up to `max` senders.
    pub(crate) fn holding(max: usize) -> Self {
        SenderMemo { held: U64Map::default(), max }
    }
}

/// [`access_log_in`] for a read of many records: the senders it follows
/// pointers to are kept in `memo`.
pub(crate) fn access_log_with<R>(
    log: &impl ReadableTable<crate::tables::LogOffset, &'static [u8]>,
    memo: &mut SenderMemo,
    offset: u64,
    bytes: &[u8],
    f: impl FnOnce(LogView<'_>) -> R,
) -> Result<R, StorageError> {
    let view = decode_log(bytes, &offset)?;
    let LogView::Message(m) = view else { return Ok(f(view)) };
    let Some(back) = m.sender_back else { return Ok(f(view)) };
    let corrupt = |message: String| StorageError::Corrupt { table: "log", key: offset.to_string(), message };
    let at = offset
        .checked_sub(back)
        .ok_or_else(|| corrupt(format!("its sender is {back} records before it, before the log's start")))?;
    if !memo.held.contains_key(&at) {
        let guard = log
            .get(at)
            .ctx("read log")?
            .ok_or_else(|| corrupt(format!("its sender is in record {at}, which is not in the log")))?;
        let sender = match decode_log(guard.value(), &at)? {
            LogView::Message(h) if h.sender_back.is_none() => {
                (h.role, Box::from(h.sender_id), Box::from(h.sender_name))
            }
            _ => {
                return Err(corrupt(format!(
                    "its sender is in record {at}, which is not a message naming a sender"
                )));
            }
        };
        if memo.held.len() >= memo.max {
            memo.held.clear();
        }
        memo.held.insert(at, sender);
    }
    let (role, id, name) = &memo.held[&at];
    if *role != m.role {
        return Err(corrupt(format!(
            "its sender is in record {at}, which is not a message naming a sender of its role"
        )));
    }
    let m = MessageView { sender_id: id, sender_name: name, sender_back: None, ..m };
    Ok(f(LogView::Message(m)))
}

/// A validated, zero-copy view of the log value at `offset`, whichever
/// format it was stored in; a message's sender may still be elsewhere
/// (`sender_back`): readers go through [`access_log_in`].
pub(crate) fn decode_log<'b>(
    bytes: &'b [u8],
    offset: &dyn std::fmt::Display,
) -> Result<LogView<'b>, StorageError> {
    let corrupt = corrupt_in("log", offset);
    match bytes.split_first() {
        Some((&FORMAT_COMPACT_MESSAGE, rest)) => {
            MessageView::decode(rest).map(LogView::Message).map_err(corrupt)
        }
        Some((&head, rest)) if compact::is_packed(head) => {
            MessageView::decode_packed(head, rest).map(LogView::Message).map_err(corrupt)
        }
        Some((&FORMAT_COMPACT_CONVERSATION, rest)) => {
            ConversationView::decode(rest).map(LogView::Conversation).map_err(corrupt)
        }
        Some((&FORMAT_COMPACT_USER, rest)) => UserView::decode(rest).map(LogView::User).map_err(corrupt),
        Some((&FORMAT_COMPACT_READ, rest)) => ReadView::decode(rest).map(LogView::Read).map_err(corrupt),
        _ => match access::<ArchivedLogRecord>(bytes, "log", offset)? {
            ArchivedLogRecord::Message(m) => Ok(LogView::Message(MessageView::of_archived(m))),
            ArchivedLogRecord::Conversation(c) => Ok(LogView::Conversation(ConversationView::of_archived(c))),
            ArchivedLogRecord::User(u) => Ok(LogView::User(UserView::of_archived(u))),
            ArchivedLogRecord::Read(r) => Ok(LogView::Read(ReadView::of_archived(r))),
            other => Ok(LogView::Other(other)),
        },
    }
}

/// A validated, zero-copy view of the `conversations` value of `id`,
/// whichever format it was stored in.
pub(crate) fn access_conversation(bytes: &[u8], id: u64) -> Result<ConversationView<'_>, StorageError> {
    match bytes.split_first() {
        Some((&FORMAT_COMPACT_CONVERSATION, rest)) => {
            ConversationView::decode(rest).map_err(corrupt_in("conversations", &id))
        }
        _ => access::<ArchivedConversationRecord>(bytes, "conversations", &id)
            .map(ConversationView::of_archived),
    }
}

/// A validated, zero-copy view of a `users` value (`key` names it in the
/// error), whichever format it was stored in.
pub(crate) fn access_user<'b>(
    bytes: &'b [u8],
    key: &dyn std::fmt::Display,
) -> Result<UserView<'b>, StorageError> {
    match bytes.split_first() {
        Some((&FORMAT_COMPACT_USER, rest)) => UserView::decode(rest).map_err(corrupt_in("users", key)),
        _ => access::<ArchivedUserRecord>(bytes, "users", key).map(UserView::of_archived),
    }
}

impl<'a> MessageView<'a> {
    /// The view of a message stored as an rkyv archive (format 1).
    fn of_archived(m: &'a ArchivedMessageRecord) -> Self {
        MessageView {
            conv: m.conv.to_native(),
            seq: m.seq.to_native(),
            ts_ms: m.ts_ms.to_native(),
            cid: Cid::from(m.cid.as_str()),
            role: m.from.role.get(),
            sender_id: m.from.id.as_str(),
            sender_name: m.from.name.as_str(),
            sender_back: None,
            text: m.text.as_ref().map(|t| t.as_str()),
            attachment: m
                .attachment
                .as_ref()
                .map(|a| AttachmentView { mime: a.mime.as_str(), bytes: a.bytes.as_slice() }),
        }
    }
}

/// A log value as redb holds it, read as every reader reads it: validated
/// first, then turned into an owned record. Corrupt bytes are an error,
/// never a panic, and so is a message that points back for its sender,
/// which only the log can complete. Public for the fuzzer (`fuzz/`,
/// target `log_record`).
pub fn decode_log_record(bytes: &[u8]) -> Result<LogRecord, StorageError> {
    decode_log(bytes, &"(given bytes)")?.to_owned()
}

/// A log value read in place as it is stored, for tools that look at the
/// bytes (the disk benchmark): a message may still point back for its
/// sender ([`MessageView::sender_back`]), which a [`Reader`](crate::Reader)
/// follows.
#[doc(hidden)]
pub fn view_log_record(bytes: &[u8]) -> Result<LogView<'_>, StorageError> {
    decode_log(bytes, &"(given bytes)")
}

/// A log record as the writer stores it: a message, a conversation's
/// state, a profile or a read mark in its compact format, a presence change
/// as its archive, each after its format byte. The writer encodes each kind
/// with the same functions, into the buffer it reuses (`group_commit.rs`).
pub fn encode_log_record(record: &LogRecord) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    match record {
        LogRecord::Message(m) => MessageView::of_record(m).encode_into(&mut out),
        LogRecord::Conversation(c) => ConversationView::of_record(c).encode_into(&mut out),
        LogRecord::User(u) => encode_user_record(u, &mut out),
        LogRecord::Read(r) => encode_read_record(r, &mut out),
        LogRecord::Presence(_) => encode_into(record, &mut out)?,
    }
    Ok(out)
}

/// Turns a validated archive into an owned value.
pub(crate) fn to_owned<A, T>(archived: &A) -> Result<T, StorageError>
where
    A: rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| StorageError::Corrupt {
        table: "?",
        key: "?".into(),
        message: format!("validated archive failed to deserialize: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::message_record as message;

    /// Stored log records are read where the archive's root sits, which
    /// depends on the archived enum's size: a new variant must not change
    /// it, or every record already stored would be misread.
    #[test]
    fn the_archived_log_record_keeps_its_size() {
        assert_eq!(std::mem::size_of::<ArchivedLogRecord>(), 76, "pinned");
    }

    #[test]
    fn records_round_trip_at_any_alignment() {
        let records = [
            LogRecord::Message(message()),
            LogRecord::Conversation(ConversationRecord {
                id: 9,
                visitor_id: "v1".into(),
                status: ConvStatus::Assigned,
                agent: Some(AgentRef { id: "a1".into(), name: "Alice".into() }),
                group: Some("sales".into()),
                created_ms: 1,
                updated_ms: 2,
                last_seq: 0,
            }),
            LogRecord::User(UserRecord {
                id: "v1".into(),
                role: Role::Visitor,
                name: "Bob".into(),
                meta: vec![("plan".into(), "gold".into()), ("vip_level".into(), "3".into())],
                visitor_key_hash: Some([7; 32]),
                created_ms: 5,
            }),
            LogRecord::Read(ReadMark { conv: 9, user_id: "a1".into(), seq: 4, ts_ms: 6 }),
        ];
        for record in records {
            let bytes = encode(&record).unwrap();
            // Copy to every offset of an over-aligned buffer: the archive must
            // validate and read the same wherever redb's slice happens to start.
            for shift in 0..8 {
                let mut buf = vec![0u8; shift];
                buf.extend_from_slice(&bytes);
                let archived: &ArchivedLogRecord = access(&buf[shift..], "log", &0).unwrap();
                let back: LogRecord = to_owned(archived).unwrap();
                assert_eq!(back, record);
            }
        }
    }

    #[test]
    fn conversation_changes_are_told_apart_from_the_state_replaced() {
        use ConvStatus::{Assigned, Closed, Queued};
        let between = ConvChange::between;
        assert_eq!(between(None, Queued, None), ConvChange::Opened);
        assert_eq!(between(Some((Queued, None)), Assigned, Some("a1")), ConvChange::Assigned);
        assert_eq!(between(Some((Assigned, Some("a1"))), Assigned, Some("a2")), ConvChange::Transferred);
        assert_eq!(between(Some((Assigned, Some("a1"))), Queued, Some("a1")), ConvChange::Transferred);
        // Assigned again from a queue it was transferred to: an assignment.
        assert_eq!(between(Some((Queued, Some("a1"))), Assigned, Some("a2")), ConvChange::Assigned);
        assert_eq!(between(Some((Assigned, Some("a1"))), Assigned, Some("a1")), ConvChange::Assigned);
        assert_eq!(between(Some((Queued, None)), Queued, None), ConvChange::Requeued);
        assert_eq!(between(Some((Assigned, Some("a1"))), Closed, Some("a1")), ConvChange::Closed);
        for c in [
            ConvChange::Opened,
            ConvChange::Assigned,
            ConvChange::Transferred,
            ConvChange::Closed,
            ConvChange::Requeued,
        ] {
            assert_eq!(ConvChange::from_byte(c.to_byte()), Some(c));
        }
        assert_eq!(ConvChange::from_byte(0), None);
        assert_eq!(ConvChange::from_byte(9), None);
    }

    #[test]
    fn archived_fields_read_in_place() {
        let bytes = encode(&LogRecord::Message(message())).unwrap();
        let archived: &ArchivedLogRecord = access(&bytes, "log", &0).unwrap();
        let ArchivedLogRecord::Message(m) = archived else { panic!("not a message") };
        assert_eq!(m.seq.to_native(), 3);
        assert_eq!(m.from.role.get(), Role::Agent);
        assert_eq!(m.text.as_ref().map(|t| t.as_str()), Some("你好, how can I help?"));
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        let bytes = encode(&LogRecord::Message(message())).unwrap();
        assert!(matches!(access::<ArchivedLogRecord>(&[], "log", &1), Err(StorageError::Corrupt { .. })));
        assert!(matches!(
            access::<ArchivedLogRecord>(&[9, 1, 2], "log", &1),
            Err(StorageError::Corrupt { .. })
        ));
        // Every truncation and many single-byte flips: each either fails
        // validation or still reads as a well-formed record.
        for len in 1..bytes.len() {
            let _ = access::<ArchivedLogRecord>(&bytes[..len], "log", &1).map(to_owned::<_, LogRecord>);
        }
        for b in crate::testkit::bit_flips(&bytes, 2000) {
            let _ = access::<ArchivedLogRecord>(&b, "log", &1).map(to_owned::<_, LogRecord>);
        }
        // A flipped enum tag is caught.
        let mut b = bytes.clone();
        let tag_at = b.len() - std::mem::size_of::<ArchivedLogRecord>();
        b[tag_at] = 200;
        assert!(access::<ArchivedLogRecord>(&b, "log", &1).is_err());
    }
}
