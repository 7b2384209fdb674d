//! The durable log on redb: append with group commit, the per-conversation
//! index, conversations, users, the cid dedupe index, consumer offsets, and
//! crash recovery.
//!
//! # What survives what
//!
//! A write is acknowledged — its [`Completion`] pushed — only after its
//! group commit is durable: its record in the write-ahead log
//! (`wal.rs`, on by default) written and the log fsynced, or the redb
//! commit holding it returned with `Durability::Immediate`, that is after
//! every fsync of that commit returned (without the log, or when the log
//! is full); and after redb committed it, so that every reader sees
//! what was acked (tests `durability::no_completion_before_its_fsync_returns`
//! and `durability::a_held_fsync_holds_back_every_completion`, which watch
//! both files from below redb, with the log on and off). An acknowledged write survives the process being
//! killed at any instant, `kill -9` included (`tests/crash.rs`,
//! `acknowledged_writes_survive_kill_9`), and survives a power loss of the
//! host as long as the disk honours fsync
//! (`durability::power_loss_keeps_every_acknowledged_write`, on a simulated
//! disk that loses a random part of everything not fsynced). A commit cut
//! short, by a crash or by a power loss that leaves only some of its
//! sectors on disk (a torn write), is rolled back whole on the next open:
//! none of its writes was acknowledged and none is half-visible; the log
//! stays gap-free per conversation
//! (`durability::torn_writes_roll_back_whole_commits`; both power-cut
//! tests cut the database's and the log's disk at one instant, with the
//! log off, on with checkpoints every few milliseconds, and on with a
//! whole run to replay). A checkpoint written behind the writer acks
//! nothing, and the log keeps the cycle it closed until its fsyncs
//! returned: a power cut before they did loses nothing
//! (`durability::a_power_cut_before_a_background_checkpoint_lands_replays_two_cycles`).
//! What the log holds past the last checkpoint is
//! replayed into redb when the store opens, in one durable commit, before
//! anything is read (`tests/crash.rs` checks that its kills left records
//! to replay). A conversation's newest index entries wait in
//! memory and reach the table a batch at a time (`tail.rs`); readers see
//! them as if they were there, and a crash loses none: every message
//! record holds what its entry says, and open rebuilds the entries from
//! the log from `meta.index_from` on
//! (`store_tests::index_entries_wait_in_their_tail_and_a_crash_rebuilds_them`;
//! the power-cut rounds run with entries written at once, by batch and by
//! lag). A resent append
//! (same sender, conversation and cid) gets the original result, across
//! restarts and crashes, and is never stored twice
//! (`store_tests::resent_cid_returns_the_original_ack`, `tests/crash.rs`);
//! the sender is its role and id, so agent `42` and visitor `42` sending the
//! same cid are two messages
//! (`store_tests::the_same_cid_from_an_agent_and_a_visitor_with_the_same_id_is_two_messages`).
//! A message names its sender in full when the writer does not remember
//! a recent record that does (after an open, a failure, a new name, or
//! too far back), and otherwise points back at that record
//! (`senders.rs`); every read follows the pointer, and a commit that
//! fails makes the writer forget where senders were named, so no message
//! ever points at a record that is not there (`durability::a_sender_named_only_in_a_failed_commit_is_named_again`).
//! A store an older build wrote is upgraded when opened, in one transaction
//! (`store_tests::a_version_2_store_gets_dedupe_slots_and_users_keyed_by_role_at_open`).
//! Bytes damaged on disk later are caught when read, since every record is
//! validated before use, and reported as [`StorageError::Corrupt`], never
//! trusted (`store_tests::corrupt_record_is_reported_not_trusted`). A
//! commit that fails (a full disk) fails its writes with an error the
//! client may retry (`unavailable`), and so does every write until the
//! writer has committed again, reopening the database when redb requires
//! it (`reopen.rs`); nothing acknowledged is lost and the log stays
//! gap-free (the gateway's `tests/faults.rs`, on a tmpfs it fills). Not
//! covered: a disk that acknowledges an fsync it did not do, and the loss
//! of the disk itself.
//!
//! # Shape
//!
//! - [`Store::open`] opens or creates `dir/kefu.redb`, recovers it, and
//!   returns the [`Recovery`] the gateway resumes from.
//! - [`Writer::submit`] (any thread; `source` = the caller's shard) queues a
//!   [`WriteOp`]. One writer thread (`group_commit.rs`) drains all
//!   sources, applies a batch in one write transaction, commits, then
//!   pushes each [`Completion`] to its source's queue and calls
//!   `notify(source)`.
//! - [`Reader`] (any thread) reads history, resume replay, conversations,
//!   users, dedupe hits and the log, zero-copy where asked.
//! - [`Store::log_end`] is the log's durable end, published by the writer
//!   after each group commit returned (and handed to [`Store::on_log_end`]'s
//!   hook): a follower of the log reads [`Reader::events`] up to it and so
//!   never shows a record a crash could take back
//!   (`store_tests::the_log_end_is_published_after_each_commit_that_logged`).
//!   Each logged conversation state comes with what it changed
//!   ([`ConvChange`]), decided by the writer against the state it replaced.
//!
//! # Recovery: quick-repair is on
//!
//! (With the write-ahead log, all this applies to the checkpoints: one
//! durable redb commit every `checkpoint_ms`, 100 ms by default, its pages
//! and fsyncs written behind the writer (`behind.rs`). The commits between
//! them cost one fsync of the log, and none of quick-repair's allocator
//! saves.)
//!
//! redb marks its file "needs recovery" while a writer has it open. After
//! a crash, without quick-repair, open rebuilds redb's allocator state by
//! walking every page of the file: measured here at 0.46–0.63 s with 1M
//! messages logged (~540 MiB file) and the page cache warm, 1.5–2.1 s cold,
//! and it grows with the file. With quick-repair ([`StoreConfig::quick_repair`],
//! the default) every commit also saves the allocator state, with a
//! two-phase commit (a second fsync), and open after `kill -9` just loads
//! it: 10–38 ms warm (median 17 ms), ~130 ms cold, for the same 1M
//! messages, and it does not grow with the file. The price is the second
//! fsync: at 5k msg/s the storage part of an ack goes from p50 0.54–0.66 ms
//! to 0.81 ms (p99 1.1–1.2 → 1.4–1.7 ms); at saturation it disappears in
//! the batch (commits of ~16k writes). A restart well inside the gateway's
//! 1 s budget at any size is worth 0.2 ms, so it is on. Numbers and
//! commands: BENCHMARKS.md, "Storage".

mod backend;
mod behind;
#[doc(hidden)]
pub mod ceiling;
mod cid;
mod compact;
mod compact_state;
mod config;
mod dedupe;
mod error;
mod group_commit;
mod reader;
mod record;
mod redo;
mod reopen;
mod runs;
mod senders;
mod store;
mod tables;
mod tail;
mod upgrade;
mod wal;
mod write;

#[cfg(test)]
mod durability;
#[cfg(test)]
mod heap;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod testkit;

pub use cid::{Cid, stored_bytes as stored_cid_bytes};
#[doc(hidden)]
pub use compact::message_round_trip;
#[doc(hidden)]
pub use compact::repack_v15;
pub use compact::{AttachmentView, MessageView};
pub use compact_state::{AgentView, ConversationView, MetaView, ReadView, UserView};
pub use config::StoreConfig;
pub use error::{StorageError, SubmitError};
pub use reader::{ConversationFilter, ConversationPage, DedupeHit, LogEvent, Logged, Reader};
#[doc(hidden)]
pub use record::view_log_record;
pub use record::{
    AgentRef, ArchivedAgentRef, ArchivedAttachment, ArchivedConvStatus, ArchivedConversationRecord,
    ArchivedLogRecord, ArchivedMessageRecord, ArchivedReadMark, ArchivedRole, ArchivedSender,
    ArchivedUserControlRecord, ArchivedUserRecord, Attachment, BlockRecord, ConvChange, ConvStatusDef,
    ConversationRecord, LogRecord, LogView, MessageRecord, PresenceRecord, ReadMark, RoleDef, Sender,
    UserControlRecord, UserRecord, decode_log_record, encode_log_record,
};
#[doc(hidden)]
pub use redo::redo_round_trip;
#[doc(hidden)]
pub use runs::run_round_trip;
pub use store::{Recovery, StatsSource, Store, StoreStats, WriterHealth};
/// The log table's key type, for tools that read a store's file with redb.
pub use tables::LogOffset;
pub use write::{
    CommitTimes, Committed, Completion, Completions, Notify, OnCommit, OnLogEnd, WriteOp, Writer,
};
