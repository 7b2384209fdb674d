//! The redb tables and what their keys and values mean.
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `log40` (`log` until schema version 15) | global offset, from 0, no gaps, in 5 bytes ([`LogOffset`]) | a message, a conversation's state, a profile or a read mark in its compact format (`compact.rs`, `compact_state.rs`), a presence change as its [`LogRecord`](crate::LogRecord) archive |
//! | `conv_runs` | (conversation, last seq of the run) | a run of the conversation's index entries (`runs.rs`): each message's seq, offset in `log`, and dedupe slot of its sender role, sender id and cid; a conversation's newest entries wait in memory and go in together (`tail.rs`). Until schema version 10: `conv_index`, (conversation, seq) → (offset, slot) |
//! | `conversations` | conversation id | [`ConversationRecord`](crate::ConversationRecord) in its compact format (`compact_state.rs`; archives before schema version 8) |
//! | `users` | (role, user id) | [`UserRecord`](crate::UserRecord) in its compact format (likewise) |
//! | `user_conversations` | (visitor id, conversation id) | nothing: the key is the index |
//! | `consumer_offsets` | consumer name | committed offset (the next log offset it reads) |
//! | `conv_changes` | offset in `log` of a conversation record | what it changed ([`ConvChange`](crate::ConvChange) byte) |
//! | `user_controls` | (role, user id) | [`UserControlRecord`](crate::UserControlRecord) archive: what `SyncUser` set, a block |
//! | `meta` | counter name | counter |
//!
//! Every value is prefixed with a format byte (see `record.rs`).
//!
//! A user is (role, id): an agent and a visitor may share an id and are
//! still two people, so `users` is keyed by the role's wire name (`visitor`,
//! `agent`) and the id, and a dedupe slot hashes the role too. Only
//! visitors open conversations, so `user_conversations` holds visitor ids
//! alone.
//!
//! An append inserts into two B-trees: `log`, whose keys only grow (cheap:
//! it fills pages in order), and the conversation index, whose keys are
//! spread over every active conversation, so each write to it rewrites
//! about one page per conversation it touched. Those rewrites are what
//! limits throughput (see BENCHMARKS.md), which is why the cid dedupe
//! index is not a third tree but a column of the conversation index (see
//! `dedupe.rs`), why a conversation's entries wait in memory and go in
//! `index_batch` at a time (`tail.rs`), and why those go in as one row
//! (`runs.rs`).

use std::cmp::Ordering;

use redb::{Key, TableDefinition, TypeName, Value};

/// The log, keyed by offset in 5 bytes (schema version 16 on).
pub(crate) const LOG: TableDefinition<LogOffset, &[u8]> = TableDefinition::new("log40");
/// The log until schema version 15, keyed by `u64`: 8 bytes a record.
/// Only the upgrade to 16 (and tests that make an old store) open it.
pub(crate) const LOG_V15: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// One past the last offset the log can hold: 2⁴⁰ − 1, about 1.1 × 10¹²
/// records. A record is at least a few dozen bytes and records are never
/// removed, so a store reaches tens of terabytes long before it runs out
/// of offsets; past it, an append fails as an encoding error. The key of
/// this offset itself, all five bytes 0xff, is never stored: every
/// larger offset encodes as it (see [`LogOffset`]).
pub(crate) const LOG_OFFSET_END: u64 = (1 << 40) - 1;

/// A log offset as a redb key: 5 bytes big-endian, so byte order is
/// number order. A `u64` key spends 8 bytes on every record, 3 of them
/// always zero; at ~150 bytes a message that was 2% of the store
/// (BENCHMARKS.md, "5-byte log keys"). Reads and writes take and give a
/// `u64`. `redo::Tables::put`, the path every store write takes, refuses
/// an offset from [`LOG_OFFSET_END`] on; a larger offset asked of a read
/// (a caller's `from`, an offset in a damaged index) encodes as
/// `LOG_OFFSET_END`, a key never stored, so it finds nothing rather than
/// the record its low 40 bits would name.
#[derive(Debug)]
pub struct LogOffset;

const LOG_OFFSET_WIDTH: usize = 5;

impl Value for LogOffset {
    type SelfType<'a> = u64;
    type AsBytes<'a> = [u8; LOG_OFFSET_WIDTH];

    fn fixed_width() -> Option<usize> {
        Some(LOG_OFFSET_WIDTH)
    }

    fn from_bytes<'a>(data: &'a [u8]) -> u64
    where
        Self: 'a,
    {
        // redb hands back exactly what `as_bytes` made; the fold reads any
        // length without panicking all the same.
        data.iter().fold(0, |n, &b| (n << 8) | u64::from(b))
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a u64) -> [u8; LOG_OFFSET_WIDTH]
    where
        Self: 'b,
    {
        let be = (*value).min(LOG_OFFSET_END).to_be_bytes();
        [be[3], be[4], be[5], be[6], be[7]]
    }

    fn type_name() -> TypeName {
        TypeName::new("kefu::LogOffset40")
    }
}

impl Key for LogOffset {
    fn compare(data1: &[u8], data2: &[u8]) -> Ordering {
        // Same width, big-endian: byte order is number order.
        data1.cmp(data2)
    }
}

/// The conversation index, in runs (`runs.rs`).
pub(crate) const CONV_RUNS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("conv_runs");
/// The conversation index until schema version 10, an entry per row:
/// (conversation, seq) → (offset, slot). Only upgrades, and the replay of
/// a write-ahead log of versions 7 to 10, still write it; open moves what it holds
/// into `conv_runs` (`upgrade::index_in_runs`).
pub(crate) const CONV_INDEX_V10: TableDefinition<(u64, u64), (u64, u64)> = TableDefinition::new("conv_index");
pub(crate) const CONVERSATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("conversations");
pub(crate) const USERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("users");
pub(crate) const USER_CONVERSATIONS: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("user_conversations");
pub(crate) const CONSUMER_OFFSETS: TableDefinition<&str, u64> = TableDefinition::new("consumer_offsets");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The log offset of every conversation record → what it changed
/// ([`ConvChange`](crate::ConvChange), as its byte), written with the record.
pub(crate) const CONV_CHANGES: TableDefinition<u64, u8> = TableDefinition::new("conv_changes");
/// (role, user id) → what the business system set apart from the profile:
/// synced name and meta keys, a block.
pub(crate) const USER_CONTROLS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("user_controls");

/// `meta` key: the layout version of the tables ([`SCHEMA_VERSION`]).
pub(crate) const META_SCHEMA: &str = "schema_version";
/// `meta` key: the next offset of `log` (equals the last key + 1; kept as a
/// pair assertion against the log itself).
pub(crate) const META_NEXT_OFFSET: &str = "next_offset";
/// `meta` key: one more than the highest conversation id ever stored.
pub(crate) const META_NEXT_CONV_ID: &str = "next_conv_id";

/// `meta` keys: the secret SipHash key of the dedupe slots, made at
/// creation.
pub(crate) const META_DEDUPE_K0: &str = "dedupe_k0";
pub(crate) const META_DEDUPE_K1: &str = "dedupe_k1";
/// `meta` key: 1 while a process has the store open, 0 after a clean close.
pub(crate) const META_OPEN: &str = "open";

/// `meta` key: the offset of the oldest message whose index entry
/// is not in the table but in memory (`tail.rs`); open rebuilds those from
/// the log from here. Absent: every entry is in the table.
pub(crate) const META_INDEX_FROM: &str = "index_from";

/// `meta` key: the last write-ahead log cycle that redb's durable state
/// holds whole (`wal.rs`); absent: 0.
pub(crate) const META_WAL_CYCLE: &str = "wal_cycle";

/// 2 added `user_conversations`; 3 put the sender's role into the dedupe
/// slots and keyed `users` by (role, id); 4 added `conv_changes`; 5 added
/// `user_controls`; 6 writes messages in the compact format (format byte
/// 2), which a build reading 5 could not read; 7 may hold its last
/// acknowledged writes in the write-ahead log, which a build reading 6
/// would not replay; 8 writes conversation states, profiles and read marks
/// in their compact formats (bytes 3 to 5), which a build reading 7 could
/// not read; 9 keeps the log's odd cycles in a second file; 10 may hold
/// `conv_index` entries only in the log's messages (`meta.index_from`),
/// which a build reading 9 would not look for; 11 keeps the conversation
/// index in runs, `conv_runs`, which a build reading 10 would not find;
/// 12 may name a message's sender by pointing back at an earlier record
/// (`compact.rs`, flag bit 2), which a build reading 11 would call damaged;
/// 13 writes messages in the packed format (a first byte with bit 7 set,
/// the cid packed, `cid.rs`), which a build reading 12 could not read;
/// 14 writes index rows with 16-bit dedupe slots (`runs.rs`, format byte
/// 7), which a build reading 13 could not read; 15 writes index rows
/// whose seqs follow each other without their seq steps (format byte 8),
/// which a build reading 14 could not read; 16 keys the log by 5-byte
/// offsets in `log40`, which a build reading 15 would not find, and
/// writes a packed message's last string without its length
/// (`compact.rs`), which it would misread.
/// An older store is upgraded at open (`upgrade.rs`).
pub(crate) const SCHEMA_VERSION: u64 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_offset_is_five_bytes_whose_order_is_the_numbers() {
        let offsets = [0, 1, 255, 256, 65_535, 1 << 32, (1 << 32) + 1, LOG_OFFSET_END - 1, LOG_OFFSET_END];
        for &n in &offsets {
            let bytes = LogOffset::as_bytes(&n);
            assert_eq!(bytes.len(), 5);
            assert_eq!(LogOffset::from_bytes(&bytes), n, "{n} round trips");
        }
        // Past the end: the one key never stored, not the low 40 bits.
        for n in [LOG_OFFSET_END + 1, 1 << 40, (1 << 40) + 3, u64::MAX] {
            assert_eq!(LogOffset::as_bytes(&n), [0xff; 5], "{n}");
        }
        for pair in offsets.windows(2) {
            let (a, b) = (LogOffset::as_bytes(&pair[0]), LogOffset::as_bytes(&pair[1]));
            assert_eq!(LogOffset::compare(&a, &b), Ordering::Less, "{} < {}", pair[0], pair[1]);
            assert_eq!(LogOffset::compare(&b, &a), Ordering::Greater);
            assert_eq!(LogOffset::compare(&a, &a), Ordering::Equal);
        }
    }

    /// Ranges and `last` are what the readers and open use: a table keyed
    /// this way must answer them in number order across byte boundaries.
    #[test]
    fn a_log_table_ranges_in_offset_order() {
        use redb::{ReadableDatabase as _, ReadableTable as _};
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let offsets = [0u64, 3, 5, 255, 256, 257, 70_000, 1 << 33, LOG_OFFSET_END - 1];
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(LOG).unwrap();
            for &n in offsets.iter().rev() {
                log.insert(n, n.to_le_bytes().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let log = txn.open_table(LOG).unwrap();
        let all: Vec<u64> = log.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
        assert_eq!(all, offsets);
        let mid: Vec<u64> = log.range(255..70_000).unwrap().map(|e| e.unwrap().0.value()).collect();
        assert_eq!(mid, [255, 256, 257]);
        assert_eq!(log.last().unwrap().unwrap().0.value(), LOG_OFFSET_END - 1);
        assert_eq!(log.get(256).unwrap().unwrap().value(), 256u64.to_le_bytes());
        // Offsets past the end find nothing, not offset 3 (2⁴⁰ + 3's low
        // 40 bits).
        assert!(log.get((1 << 40) + 3).unwrap().is_none());
        assert_eq!(log.range((1 << 40) + 3..).unwrap().count(), 0);
        assert_eq!(log.range(LOG_OFFSET_END..).unwrap().count(), 0);
    }
}
