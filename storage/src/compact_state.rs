//! The compact formats of a conversation's state (format byte 3) and a
//! user's profile (format byte 4), in their tables and in the log, and of
//! a read mark (format byte 5), in the log.
//!
//! Every new visitor stores one profile and two conversation states (queued,
//! then assigned), each in its table and in the log, and every read receipt
//! that moves a participant's mark is logged. As rkyv archives their fixed
//! parts cost 60–77 bytes before any string (the log's record is as large
//! as its largest variant, the message), and those pages are what a
//! gateway's page cache fills with as visitors arrive (BENCHMARKS.md,
//! "Issue 11: memory per session under 4 KB on a fresh gateway"). These
//! formats write the same fields as `compact.rs` writes a message: LEB128
//! numbers and lengths, one byte per enum, and nothing for what is absent.
//!
//! ```text
//! 3  id  status  flags  visitor_id  [agent_id  agent_name]  [group]  created_ms  updated_ms
//! 4  role  flags  id  name  created_ms  pairs  (key  value)*  [hash]
//! 5  conv  seq  ts_ms  user_id
//! ```
//!
//! Numbers, lengths and strings are as in `compact.rs`. `status` is one
//! byte (0 queued, 1 assigned, 2 closed); a conversation's `flags` has bit
//! 0 for an agent and bit 1 for a group; a user's `flags` has bit 0 for a
//! visitor key hash, its 32 raw bytes last; `pairs` is the number of (key,
//! value) pairs of strings that follow. No other flag bit is set, and the
//! value ends exactly where its last field does.
//!
//! Readers get a [`ConversationView`], a [`UserView`] or a [`ReadView`]
//! borrowing every string from redb's page, whichever format the value was
//! stored in: records stored as archives (format 1) read as before.

use kefu_proto::ids::{ConvStatus, Role};

use crate::compact::{Cursor, put_bytes, put_varint, role_byte, role_of_byte};
use crate::record::{
    AgentRef, ArchivedConversationRecord, ArchivedReadMark, ArchivedUserRecord, ConversationRecord, ReadMark,
    UserRecord,
};

/// The format byte of a conversation's state in this format.
pub(crate) const FORMAT_COMPACT_CONVERSATION: u8 = 3;

/// The format byte of a user's profile in this format.
pub(crate) const FORMAT_COMPACT_USER: u8 = 4;

/// The format byte of a read mark in this format.
pub(crate) const FORMAT_COMPACT_READ: u8 = 5;

const HAS_AGENT: u8 = 1;
const HAS_GROUP: u8 = 2;
const HAS_KEY_HASH: u8 = 1;

/// A stored conversation state, its strings borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationView<'a> {
    /// The conversation id.
    pub id: u64,
    /// The visitor who opened it.
    pub visitor_id: &'a str,
    /// Queued, assigned or closed.
    pub status: ConvStatus,
    /// The assigned agent (or the last one, once closed).
    pub agent: Option<AgentView<'a>>,
    /// The skill group.
    pub group: Option<&'a str>,
    /// When it was opened, ms since the epoch.
    pub created_ms: u64,
    /// When this state was set, ms since the epoch.
    pub updated_ms: u64,
}

/// An agent as a stored conversation names it, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentView<'a> {
    /// The agent's user id.
    pub id: &'a str,
    /// Display name at the time of assignment.
    pub name: &'a str,
}

impl<'a> ConversationView<'a> {
    /// The view of an owned record (its `last_seq` is not stored).
    pub(crate) fn of_record(c: &'a ConversationRecord) -> Self {
        ConversationView {
            id: c.id,
            visitor_id: &c.visitor_id,
            status: c.status,
            agent: c.agent.as_ref().map(|a| AgentView { id: &a.id, name: &a.name }),
            group: c.group.as_deref(),
            created_ms: c.created_ms,
            updated_ms: c.updated_ms,
        }
    }

    /// The view of a state stored as an rkyv archive (format 1).
    pub(crate) fn of_archived(c: &'a ArchivedConversationRecord) -> Self {
        ConversationView {
            id: c.id.to_native(),
            visitor_id: c.visitor_id.as_str(),
            status: c.status.get(),
            agent: c.agent.as_ref().map(|a| AgentView { id: a.id.as_str(), name: a.name.as_str() }),
            group: c.group.as_ref().map(|g| g.as_str()),
            created_ms: c.created_ms.to_native(),
            updated_ms: c.updated_ms.to_native(),
        }
    }

    /// An owned copy, with `last_seq` 0 (the index is its source).
    pub fn to_record(&self) -> ConversationRecord {
        ConversationRecord {
            id: self.id,
            visitor_id: self.visitor_id.to_owned(),
            status: self.status,
            agent: self.agent.map(|a| AgentRef { id: a.id.to_owned(), name: a.name.to_owned() }),
            group: self.group.map(str::to_owned),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            last_seq: 0,
        }
    }

    /// Writes the format byte and the state to `out` (cleared first).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT_COMPACT_CONVERSATION);
        put_varint(out, self.id);
        out.push(match self.status {
            ConvStatus::Queued => 0,
            ConvStatus::Assigned => 1,
            ConvStatus::Closed => 2,
        });
        let flags = if self.agent.is_some() { HAS_AGENT } else { 0 }
            | if self.group.is_some() { HAS_GROUP } else { 0 };
        out.push(flags);
        put_bytes(out, self.visitor_id.as_bytes());
        if let Some(a) = self.agent {
            put_bytes(out, a.id.as_bytes());
            put_bytes(out, a.name.as_bytes());
        }
        if let Some(group) = self.group {
            put_bytes(out, group.as_bytes());
        }
        put_varint(out, self.created_ms);
        put_varint(out, self.updated_ms);
    }

    /// Reads a state in this format (`bytes` without its format byte).
    /// The error is the reason, for [`StorageError::Corrupt`](crate::StorageError::Corrupt).
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, String> {
        let mut r = Cursor { bytes };
        let id = r.varint("id")?;
        let status = match r.byte("status")? {
            0 => ConvStatus::Queued,
            1 => ConvStatus::Assigned,
            2 => ConvStatus::Closed,
            b => return Err(format!("status byte {b} is none of 0, 1, 2")),
        };
        let flags = r.byte("flags")?;
        if flags & !(HAS_AGENT | HAS_GROUP) != 0 {
            return Err(format!("flags {flags:#04x} has unknown bits"));
        }
        let visitor_id = r.str("visitor id")?;
        let agent = if flags & HAS_AGENT != 0 {
            Some(AgentView { id: r.str("agent id")?, name: r.str("agent name")? })
        } else {
            None
        };
        let group = if flags & HAS_GROUP != 0 { Some(r.str("group")?) } else { None };
        let created_ms = r.varint("created_ms")?;
        let updated_ms = r.varint("updated_ms")?;
        r.end()?;
        Ok(ConversationView { id, visitor_id, status, agent, group, created_ms, updated_ms })
    }
}

/// A stored user profile, its strings borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserView<'a> {
    /// The user id.
    pub id: &'a str,
    /// Visitor, agent or bot.
    pub role: Role,
    /// Display name.
    pub name: &'a str,
    /// Profile fields, sorted by key, keys unique.
    pub meta: MetaView<'a>,
    /// SHA-256 of an anonymous visitor's key.
    pub visitor_key_hash: Option<&'a [u8; 32]>,
    /// When the user was first seen, ms since the epoch.
    pub created_ms: u64,
}

/// Writes the format byte and a profile to `out` (cleared first).
pub(crate) fn encode_user_record(u: &UserRecord, out: &mut Vec<u8>) {
    out.clear();
    out.push(FORMAT_COMPACT_USER);
    out.push(role_byte(u.role));
    out.push(if u.visitor_key_hash.is_some() { HAS_KEY_HASH } else { 0 });
    put_bytes(out, u.id.as_bytes());
    put_bytes(out, u.name.as_bytes());
    put_varint(out, u.created_ms);
    put_varint(out, u.meta.len() as u64);
    for (k, v) in &u.meta {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    if let Some(hash) = &u.visitor_key_hash {
        out.extend_from_slice(hash);
    }
}

/// A profile's meta as stored, read pair by pair. Two are equal when
/// their pairs are, whichever format each was read from.
#[derive(Clone, Copy)]
pub struct MetaView<'a>(Meta<'a>);

#[derive(Clone, Copy)]
enum Meta<'a> {
    /// From an archive: the archived pairs.
    Archived(&'a [rkyv::tuple::ArchivedTuple2<rkyv::string::ArchivedString, rkyv::string::ArchivedString>]),
    /// From this format: `pairs` pairs of strings, validated when read.
    Compact { pairs: usize, bytes: &'a [u8] },
}

impl PartialEq for MetaView<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for MetaView<'_> {}

impl std::fmt::Debug for MetaView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> MetaView<'a> {
    /// How many keys.
    pub fn len(&self) -> usize {
        match self.0 {
            Meta::Archived(pairs) => pairs.len(),
            Meta::Compact { pairs, .. } => pairs,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The (key, value) pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let (archived, compact) = match self.0 {
            Meta::Archived(pairs) => (Some(pairs), None),
            Meta::Compact { pairs, bytes } => (None, Some((pairs, Cursor { bytes }))),
        };
        let archived = archived.into_iter().flatten().map(|p| (p.0.as_str(), p.1.as_str()));
        // `decode` read every pair already, so these reads cannot fail;
        // if one did, the iteration would stop rather than panic.
        let compact = compact.into_iter().flat_map(|(pairs, mut r)| {
            (0..pairs).map_while(move |_| Some((r.str("meta key").ok()?, r.str("meta value").ok()?)))
        });
        archived.chain(compact)
    }
}

impl<'a> UserView<'a> {
    /// The view of a profile stored as an rkyv archive (format 1).
    pub(crate) fn of_archived(u: &'a ArchivedUserRecord) -> Self {
        UserView {
            id: u.id.as_str(),
            role: u.role.get(),
            name: u.name.as_str(),
            meta: MetaView(Meta::Archived(u.meta.as_slice())),
            visitor_key_hash: u.visitor_key_hash.as_ref(),
            created_ms: u.created_ms.to_native(),
        }
    }

    /// An owned copy.
    pub fn to_record(&self) -> UserRecord {
        UserRecord {
            id: self.id.to_owned(),
            role: self.role,
            name: self.name.to_owned(),
            meta: self.meta.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            visitor_key_hash: self.visitor_key_hash.copied(),
            created_ms: self.created_ms,
        }
    }

    /// Reads a profile in this format (`bytes` without its format byte).
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, String> {
        let mut r = Cursor { bytes };
        let role = role_of_byte(r.byte("role")?)?;
        let flags = r.byte("flags")?;
        if flags & !HAS_KEY_HASH != 0 {
            return Err(format!("flags {flags:#04x} has unknown bits"));
        }
        let id = r.str("id")?;
        let name = r.str("name")?;
        let created_ms = r.varint("created_ms")?;
        let pairs = r.varint("meta pairs")?;
        let meta_start = r.bytes;
        // Each pair is at least two bytes (two empty strings): a count the
        // value cannot hold is refused before it is iterated.
        if pairs > meta_start.len() as u64 / 2 {
            return Err(format!("its meta has {pairs} pairs, {} bytes are left", meta_start.len()));
        }
        for _ in 0..pairs {
            r.str("meta key")?;
            r.str("meta value")?;
        }
        let meta_len = meta_start.len() - r.bytes.len();
        let meta = MetaView(Meta::Compact { pairs: pairs as usize, bytes: &meta_start[..meta_len] });
        let visitor_key_hash = if flags & HAS_KEY_HASH != 0 {
            let Some((hash, rest)) = r.bytes.split_first_chunk::<32>() else {
                return Err("ends before its key hash".into());
            };
            r.bytes = rest;
            Some(hash)
        } else {
            None
        };
        r.end()?;
        Ok(UserView { id, role, name, meta, visitor_key_hash, created_ms })
    }
}

/// A logged read mark, its user id borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadView<'a> {
    /// The conversation.
    pub conv: u64,
    /// Who read.
    pub user_id: &'a str,
    /// Up to which message.
    pub seq: u64,
    /// When, ms since the epoch.
    pub ts_ms: u64,
}

impl<'a> ReadView<'a> {
    /// The view of a mark stored as an rkyv archive (format 1).
    pub(crate) fn of_archived(r: &'a ArchivedReadMark) -> Self {
        ReadView {
            conv: r.conv.to_native(),
            user_id: r.user_id.as_str(),
            seq: r.seq.to_native(),
            ts_ms: r.ts_ms.to_native(),
        }
    }

    /// An owned copy.
    pub fn to_record(&self) -> ReadMark {
        ReadMark { conv: self.conv, user_id: self.user_id.to_owned(), seq: self.seq, ts_ms: self.ts_ms }
    }

    /// Reads a mark in this format (`bytes` without its format byte).
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, String> {
        let mut r = Cursor { bytes };
        let conv = r.varint("conv")?;
        let seq = r.varint("seq")?;
        let ts_ms = r.varint("ts_ms")?;
        let user_id = r.str("user id")?;
        r.end()?;
        Ok(ReadView { conv, user_id, seq, ts_ms })
    }
}

/// Writes the format byte and a read mark to `out` (cleared first).
pub(crate) fn encode_read_record(m: &ReadMark, out: &mut Vec<u8>) {
    out.clear();
    out.push(FORMAT_COMPACT_READ);
    put_varint(out, m.conv);
    put_varint(out, m.seq);
    put_varint(out, m.ts_ms);
    put_bytes(out, m.user_id.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{LogRecord, encode};
    use crate::{decode_log_record, encode_log_record};

    fn assigned() -> ConversationRecord {
        ConversationRecord {
            id: 12_345,
            visitor_id: "anon-0123456789abcdef0123456789abcdef".into(),
            status: ConvStatus::Assigned,
            agent: Some(AgentRef { id: "agent-7".into(), name: "Li Wei 李伟".into() }),
            group: Some("default".into()),
            created_ms: 1_796_000_000_000,
            updated_ms: 1_796_000_000_123,
            last_seq: 0,
        }
    }

    fn visitor() -> UserRecord {
        UserRecord {
            id: "anon-0123456789abcdef0123456789abcdef".into(),
            role: Role::Visitor,
            name: "Visitor 0123".into(),
            meta: vec![("plan".into(), "pro".into()), ("vip_level".into(), "3".into())],
            visitor_key_hash: Some([0xab; 32]),
            created_ms: 1_796_000_000_000,
        }
    }

    fn conversation_table_value(c: &ConversationRecord) -> Vec<u8> {
        let mut out = Vec::new();
        ConversationView::of_record(c).encode_into(&mut out);
        out
    }

    fn user_table_value(u: &UserRecord) -> Vec<u8> {
        let mut out = Vec::new();
        encode_user_record(u, &mut out);
        out
    }

    fn read_conversation(bytes: &[u8]) -> Result<ConversationRecord, String> {
        crate::record::access_conversation(bytes, 1).map(|v| v.to_record()).map_err(|e| e.to_string())
    }

    fn mark() -> ReadMark {
        ReadMark {
            conv: 12_345,
            user_id: "anon-0123456789abcdef0123456789abcdef".into(),
            seq: 1_234,
            ts_ms: 1_796_000_000_000,
        }
    }

    fn read_user(bytes: &[u8]) -> Result<UserRecord, String> {
        crate::record::access_user(bytes, &"u").map(|v| v.to_record()).map_err(|e| e.to_string())
    }

    #[test]
    fn states_profiles_and_read_marks_round_trip_in_every_shape() {
        let full = assigned();
        let conversations = [
            full.clone(),
            ConversationRecord { status: ConvStatus::Queued, agent: None, ..full.clone() },
            ConversationRecord { status: ConvStatus::Closed, group: None, ..full.clone() },
            ConversationRecord { id: u64::MAX, visitor_id: String::new(), created_ms: 0, ..full },
        ];
        for c in conversations {
            assert_eq!(read_conversation(&conversation_table_value(&c)).unwrap(), c);
            let logged = LogRecord::Conversation(c.clone());
            let bytes = encode_log_record(&logged).unwrap();
            assert_eq!(bytes[0], FORMAT_COMPACT_CONVERSATION);
            assert_eq!(decode_log_record(&bytes).unwrap(), logged);
        }
        let full = visitor();
        let users = [
            full.clone(),
            UserRecord { visitor_key_hash: None, meta: Vec::new(), ..full.clone() },
            UserRecord { role: Role::Agent, visitor_key_hash: None, ..full.clone() },
            UserRecord { role: Role::Bot, name: "x".repeat(300), created_ms: u64::MAX, ..full.clone() },
            UserRecord { meta: vec![(String::new(), String::new())], ..full },
        ];
        for u in users {
            assert_eq!(read_user(&user_table_value(&u)).unwrap(), u);
            let logged = LogRecord::User(u.clone());
            let bytes = encode_log_record(&logged).unwrap();
            assert_eq!(bytes[0], FORMAT_COMPACT_USER);
            assert_eq!(decode_log_record(&bytes).unwrap(), logged);
        }
        let full = mark();
        for m in [full.clone(), ReadMark { conv: u64::MAX, seq: 0, ts_ms: u64::MAX, user_id: String::new() }]
        {
            let logged = LogRecord::Read(m);
            let bytes = encode_log_record(&logged).unwrap();
            assert_eq!(bytes[0], FORMAT_COMPACT_READ);
            assert_eq!(decode_log_record(&bytes).unwrap(), logged);
        }
    }

    /// Records stored before (rkyv archives) read into the same views.
    #[test]
    fn archives_read_into_the_same_views() {
        let c = assigned();
        let archive = encode(&c).unwrap();
        let compact = conversation_table_value(&c);
        assert_eq!(
            crate::record::access_conversation(&archive, 1).unwrap(),
            crate::record::access_conversation(&compact, 1).unwrap()
        );
        let u = visitor();
        let (archive, compact) = (encode(&u).unwrap(), user_table_value(&u));
        let (a, b) = (
            crate::record::access_user(&archive, &"u").unwrap(),
            crate::record::access_user(&compact, &"u").unwrap(),
        );
        assert_eq!(a, b, "meta compared pair by pair across the formats");
        assert_eq!(a.meta.iter().collect::<Vec<_>>(), [("plan", "pro"), ("vip_level", "3")]);
        for logged in [LogRecord::Conversation(c), LogRecord::User(u), LogRecord::Read(mark())] {
            let archive = encode(&logged).unwrap();
            assert_eq!(decode_log_record(&archive).unwrap(), logged);
        }
    }

    /// What the formats are for, with a new anonymous visitor's shapes:
    /// the fixed part of a state and of a profile, against the archive's.
    #[test]
    fn a_state_a_profile_and_a_read_mark_cost_a_few_bytes_beyond_their_strings() {
        let c = assigned();
        let strings = c.visitor_id.len() + 7 + "Li Wei 李伟".len() + "default".len();
        let compact = encode_log_record(&LogRecord::Conversation(c.clone())).unwrap();
        // format, id (2 bytes), status, flags, four lengths, two times (6 each)
        assert_eq!(compact.len() - strings, 1 + 2 + 1 + 1 + 4 + 6 + 6);
        let archive = encode(&LogRecord::Conversation(c.clone())).unwrap();
        assert!(archive.len() >= 1 + 76 + c.visitor_id.len(), "the archive: {} bytes", archive.len());
        let u = visitor();
        let strings = u.id.len() + u.name.len() + "plan".len() + "pro".len() + "vip_level".len() + 1;
        let compact = encode_log_record(&LogRecord::User(u.clone())).unwrap();
        // format, role, flags, six lengths, time, pair count, the hash
        assert_eq!(compact.len() - strings, 1 + 1 + 1 + 6 + 6 + 1 + 32);
        let archive = encode(&LogRecord::User(u)).unwrap();
        assert!(archive.len() > compact.len() + 30, "the archive: {} bytes", archive.len());
        // A read mark: format, conv (2 bytes), seq (2), ts (6), the id's length.
        let m = mark();
        let compact = encode_log_record(&LogRecord::Read(m.clone())).unwrap();
        assert_eq!(compact.len() - m.user_id.len(), 1 + 2 + 2 + 6 + 1);
        let archive = encode(&LogRecord::Read(m.clone())).unwrap();
        assert_eq!(archive.len() - m.user_id.len(), 1 + 76, "the archive's fixed part");
    }

    /// Hand-written from the layouts in this module's doc; also the
    /// fuzzer's seeds (`fuzz/corpus/log_record`).
    #[test]
    fn the_layouts_in_the_doc_are_the_layouts_read() {
        let state = include_bytes!("../../fuzz/corpus/log_record/seed-compact-conversation");
        let c = ConversationRecord {
            id: 300,
            visitor_id: "v1".into(),
            status: ConvStatus::Assigned,
            agent: Some(AgentRef { id: "a1".into(), name: "Ann".into() }),
            group: Some("sales".into()),
            created_ms: 5,
            updated_ms: 200,
            last_seq: 0,
        };
        assert_eq!(decode_log_record(state).unwrap(), LogRecord::Conversation(c.clone()));
        assert_eq!(encode_log_record(&LogRecord::Conversation(c)).unwrap(), state);
        let profile = include_bytes!("../../fuzz/corpus/log_record/seed-compact-user");
        let u = UserRecord {
            id: "v1".into(),
            role: Role::Visitor,
            name: "Bo".into(),
            meta: vec![("k".into(), "v".into())],
            visitor_key_hash: Some([7; 32]),
            created_ms: 1,
        };
        assert_eq!(decode_log_record(profile).unwrap(), LogRecord::User(u.clone()));
        assert_eq!(encode_log_record(&LogRecord::User(u)).unwrap(), profile);
        let read = include_bytes!("../../fuzz/corpus/log_record/seed-compact-read");
        let m = ReadMark { conv: 300, user_id: "a1".into(), seq: 7, ts_ms: 5 };
        assert_eq!(decode_log_record(read).unwrap(), LogRecord::Read(m.clone()));
        assert_eq!(encode_log_record(&LogRecord::Read(m)).unwrap(), read);
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        let read_mark = encode_log_record(&LogRecord::Read(mark())).unwrap();
        for bytes in [conversation_table_value(&assigned()), user_table_value(&visitor()), read_mark] {
            let read = |b: &[u8]| decode_log_record(b).map_err(|e| e.to_string());
            assert!(read(&bytes[..1]).is_err());
            for len in 1..bytes.len() {
                assert!(read(&bytes[..len]).is_err(), "a value cut at {len} read");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(read(&longer).unwrap_err().contains("after the last field"));
            for b in crate::testkit::bit_flips(&bytes, 5000) {
                let _ = read(&b);
            }
        }
        // A bad status, unknown flags, a meta count the value cannot hold.
        let mut b = conversation_table_value(&assigned());
        b[3] = 3;
        assert!(read_conversation(&b).unwrap_err().contains("status byte 3"));
        let mut b = conversation_table_value(&assigned());
        b[4] = 4;
        assert!(read_conversation(&b).unwrap_err().contains("unknown bits"));
        let mut b = user_table_value(&visitor());
        b[2] = 2;
        assert!(read_user(&b).unwrap_err().contains("unknown bits"));
        let u = UserRecord { meta: Vec::new(), visitor_key_hash: None, ..visitor() };
        let mut b = user_table_value(&u);
        let last = b.len() - 1;
        assert_eq!(b[last], 0, "the pair count ends a profile without meta or hash");
        b[last] = 0x7f;
        b.extend_from_slice(&[0; 10]);
        assert!(read_user(&b).unwrap_err().contains("127 pairs"));
    }
}
