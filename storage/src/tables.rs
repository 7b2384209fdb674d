//! The redb tables and what their keys and values mean.
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `log` | global offset, from 0, no gaps | a message, a conversation's state, a profile or a read mark in its compact format (`compact.rs`, `compact_state.rs`), a presence change as its [`LogRecord`](crate::LogRecord) archive |
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

use redb::TableDefinition;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
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
/// which a build reading 14 could not read.
/// An older store is upgraded at open (`upgrade.rs`).
pub(crate) const SCHEMA_VERSION: u64 = 15;
