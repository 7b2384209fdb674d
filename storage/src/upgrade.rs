//! Upgrading an older store when it is opened.
//!
//! Each step rewrites what its schema version changed, in the one write
//! transaction of [`Store::open`](crate::Store::open)'s table check: a crash
//! in the middle leaves the store at its old version, and the next open
//! starts the upgrade over. An older build refuses the upgraded store (its
//! version is newer than it reads), so an operator who may roll back keeps
//! a copy of the data directory first (README, "Data directory versions").
//!
//! - 1 → 2: `user_conversations` (a visitor's conversations) did not exist;
//!   it is filled from `conversations`.
//! - 2 → 3: a user is (role, id). Dedupe slots hashed the sender's id and
//!   the cid, so agent `42` and visitor `42` sending the same cid in one
//!   conversation shared a slot and the second message was answered as a
//!   duplicate of the first; every slot is computed again from the log
//!   record it points at, now with the role. `users` was keyed by id
//!   alone; it is keyed by (role, id) from each record's own role.
//! - 3 → 4: `conv_changes` (what each logged conversation state changed)
//!   did not exist; it is filled by walking the log once in offset order,
//!   remembering each conversation's last status and agent (memory: one
//!   small entry per conversation ever stored, for the upgrade only).
//! - 4 → 5: `user_controls` (synced keys, blocks) did not exist; it starts
//!   empty (nothing was synced apart from the profile, nobody blocked), so
//!   opening the table is the whole step.
//! - 5 → 6: messages are written in the compact format (format byte 2,
//!   `compact.rs`). The messages already stored stay in format 1, which
//!   every reader still reads, so nothing is rewritten: the step is the
//!   version, which keeps a build that cannot read format 2 from opening
//!   the store.
//! - 6 → 7: the write-ahead log (`wal.rs`): the last acknowledged writes
//!   may be in `kefu.wal` and not yet in redb's durable state, which a
//!   build without the log would not read. Nothing is rewritten; the step
//!   is the version (and `wal_cycle`, which starts at 0, absent).
//! - 7 → 8: conversation states, profiles and read marks are written in
//!   their compact formats (format bytes 3 to 5, `compact_state.rs`), in
//!   their tables and in the log. Those already stored stay archives,
//!   which every reader still reads: the step is the version.
//! - 8 → 9: the write-ahead log in two files, its odd cycles in
//!   `kefu.1.wal` (`wal.rs`), where a build with one log file would not
//!   look after a crash. Nothing is rewritten (this build reads a log the
//!   one-file builds wrote): the step is the version.
//! - 9 → 10: a conversation's newest `conv_index` entries may be only in
//!   memory and in the log's message records, from `meta.index_from` on
//!   (`tail.rs`). A version 9 store has every entry in the table and no
//!   `index_from`: the step is the version.
//! - 10 → 11: the conversation index is `conv_runs`, a row per run of a
//!   conversation's entries (`runs.rs`), and a dedupe slot is 32 bits (16
//!   since version 14).
//!   [`index_in_runs`] moves `conv_index` into it, cutting each slot, and
//!   deletes it. It runs after the write-ahead log's replay (a version 7 to 10
//!   log writes `conv_index` entries), so `Store::open` calls it on its
//!   own, not from [`upgrade`].
//! - 11 → 12: a message may name its sender by pointing back at an earlier
//!   record (`compact.rs`). Nothing is rewritten: the step is the version.
//! - 12 → 13: messages are written in the packed format, their cid packed
//!   (`cid.rs`). Those already stored stay in format 2 (or 1), which every
//!   reader still reads: the step is the version.
//! - 13 → 14: a dedupe slot is 16 bits, an index row's entry 2 bytes
//!   shorter (`runs.rs`, format byte 7). Rows already stored keep their
//!   32-bit slots, which read cut to 16 bits (the low bits of the same
//!   hash: the slot this build computes): the step is the version.
//! - 14 → 15: an index row whose seqs follow each other is written
//!   without its seq steps (`runs.rs`, format byte 8). Rows already stored
//!   read as before: the step is the version.
//! - 15 → 16: the log is keyed by 5-byte offsets, in `log40`
//!   ([`tables::LogOffset`]; redb cannot change a table's key type in
//!   place), and a packed message's last string has no length
//!   (`compact.rs`). [`log_in_five_byte_keys`] copies `log` into `log40`
//!   in offset order, each packed message written again, and deletes
//!   `log`; it runs first, so the steps above read the log where this
//!   version keeps it. A version 15 write-ahead log's messages are
//!   rewritten as they are replayed (`redo::Tables::log_v15`). The one
//!   upgrade that rewrites every record: a one-time cost at open
//!   (BENCHMARKS.md, "5-byte log keys").

use std::collections::HashMap;

use kefu_proto::ids::ConvStatus;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use crate::dedupe::DedupeKey;
use crate::error::{IoContext, StorageError};
use crate::record::{ConvChange, LogView, access_conversation, access_log_in, access_user, decode_log};
use crate::redo::{Op, Tables};
use crate::runs;
use crate::tables;

/// `users` up to version 2: keyed by user id alone.
pub(crate) const USERS_V2: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// Where version 2's `users` waits while it is copied into the new `users`.
const USERS_V2_MOVED: TableDefinition<&str, &[u8]> = TableDefinition::new("users_v2");

/// Upgrades a store at version `from` (1 to 15) to
/// [`tables::SCHEMA_VERSION`] within `txn`, which the caller commits.
pub(crate) fn upgrade(txn: &WriteTransaction, from: u64) -> Result<(), StorageError> {
    if from <= 15 {
        log_in_five_byte_keys(txn)?;
    }
    if from <= 1 {
        v1_to_v2(txn)?;
    }
    if from <= 2 {
        v2_to_v3(txn)?;
    }
    if from <= 3 {
        v3_to_v4(txn)?;
    }
    if from <= 4 {
        txn.open_table(tables::USER_CONTROLS).ctx("open table user_controls")?;
    }
    txn.open_table(tables::META)
        .ctx("open table meta")?
        .insert(tables::META_SCHEMA, tables::SCHEMA_VERSION)
        .ctx("write meta")?;
    tracing::info!(from, to = tables::SCHEMA_VERSION, "storage upgraded");
    Ok(())
}

fn v1_to_v2(txn: &WriteTransaction) -> Result<(), StorageError> {
    let conversations = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
    let mut user_conversations =
        txn.open_table(tables::USER_CONVERSATIONS).ctx("open table user_conversations")?;
    for entry in conversations.iter().ctx("read conversations")? {
        let (key, value) = entry.ctx("read conversations")?;
        let id = key.value();
        let view = access_conversation(value.value(), id)?;
        user_conversations.insert((view.visitor_id, id), ()).ctx("write user_conversations")?;
    }
    Ok(())
}

fn v2_to_v3(txn: &WriteTransaction) -> Result<(), StorageError> {
    let key = dedupe_key(txn)?;
    reslot_conv_index(txn, &key)?;
    rekey_users(txn)
}

/// The database's dedupe key, which every version since 1 has.
fn dedupe_key(txn: &WriteTransaction) -> Result<DedupeKey, StorageError> {
    let meta = txn.open_table(tables::META).ctx("open table meta")?;
    let k0 = meta.get(tables::META_DEDUPE_K0).ctx("read meta")?.map(|g| g.value());
    let k1 = meta.get(tables::META_DEDUPE_K1).ctx("read meta")?.map(|g| g.value());
    match (k0, k1) {
        (Some(k0), Some(k1)) => Ok(DedupeKey { k0, k1 }),
        _ => Err(StorageError::Corrupt {
            table: "meta",
            key: tables::META_DEDUPE_K0.into(),
            message: "the dedupe key is missing".into(),
        }),
    }
}

/// Moves every entry of `conv_index` (schema version 10 and before, and
/// what a write-ahead log of versions 7 to 10 replayed into it) into
/// `conv_runs`, each conversation's entries in runs of [`runs::MAX_RUN`]
/// (so memory holds one run, however long a conversation), and deletes
/// it. A store without it (created at version 11, or moved already) is
/// left as it is. Only the seqs past a conversation's last row in
/// `conv_runs` move: rows never overlap.
pub(crate) fn index_in_runs(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut moved = 0u64;
    {
        let old = txn.open_table(tables::CONV_INDEX_V10).ctx("open table conv_index")?;
        if old.is_empty().ctx("read conv_index")? {
            drop(old);
            txn.delete_table(tables::CONV_INDEX_V10).ctx("delete table conv_index")?;
            return Ok(());
        }
        let mut new = txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let (mut conv, mut run, mut buf) = (None, Vec::new(), Vec::new());
        let mut flush = |conv: u64, run: &mut Vec<runs::Entry>| -> Result<(), StorageError> {
            let fresh = runs::fresh(run, runs::last_seq(&new, conv)?);
            moved += fresh.len() as u64;
            runs::rows(fresh, &mut buf, |last, value| {
                new.insert((conv, last), value).ctx("write conv_runs")?;
                Ok(())
            })?;
            run.clear();
            Ok(())
        };
        for entry in old.iter().ctx("read conv_index")? {
            let (k, v) = entry.ctx("read conv_index")?;
            let ((c, seq), (offset, slot)) = (k.value(), v.value());
            if seq == 0 {
                // Seqs start at 1; a run could not hold this one.
                return Err(StorageError::Corrupt {
                    table: "conv_index",
                    key: format!("({c}, 0)"),
                    message: "seq 0".into(),
                });
            }
            if let Some(before) = conv.filter(|&before| before != c || run.len() == runs::MAX_RUN) {
                flush(before, &mut run)?;
            }
            conv = Some(c);
            run.push((seq, offset, slot & u64::from(u16::MAX)));
        }
        if let Some(c) = conv {
            flush(c, &mut run)?;
        }
    }
    txn.delete_table(tables::CONV_INDEX_V10).ctx("delete table conv_index")?;
    tracing::info!(entries = moved, "storage moved the conversation index into runs");
    Ok(())
}

/// Copies the log of versions 1 to 15 (`u64` keys) into `log40`, each
/// packed message written again with its last string bare, and deletes
/// it. Appending in key order fills each page once.
fn log_in_five_byte_keys(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut moved = 0u64;
    {
        let old = txn.open_table(tables::LOG_V15).ctx("open table log")?;
        // The replay's path: it repacks each packed message as it writes.
        let mut new = Tables::open(txn, None)?;
        new.log_v15 = true;
        for entry in old.iter().ctx("read log")? {
            let (k, v) = entry.ctx("read log")?;
            let offset = k.value();
            if offset >= tables::LOG_OFFSET_END {
                return Err(StorageError::Corrupt {
                    table: "log",
                    key: offset.to_string(),
                    message: "an offset of 2^40 - 1 or more, which no writer makes".into(),
                });
            }
            new.put(Op::Log { offset, value: v.value() })?;
            moved += 1;
        }
    }
    txn.delete_table(tables::LOG_V15).ctx("delete table log")?;
    if moved > 0 {
        tracing::info!(records = moved, "storage moved the log to 5-byte keys");
    }
    Ok(())
}

/// Sets every `conv_index` slot from the message it points at, walking the
/// log once (in offset order, so the index pages are touched as they come).
/// Each message must already be indexed at its offset, and nothing else.
fn reslot_conv_index(txn: &WriteTransaction, key: &DedupeKey) -> Result<(), StorageError> {
    let log = txn.open_table(tables::LOG).ctx("open table log")?;
    let mut index = txn.open_table(tables::CONV_INDEX_V10).ctx("open table conv_index")?;
    let mut messages = 0u64;
    for entry in log.iter().ctx("read log")? {
        let (k, v) = entry.ctx("read log")?;
        let offset = k.value();
        // Stores this old never name a sender by reference; reading
        // through `access_log_in` anyway keeps that an error if one does.
        let message = access_log_in(&log, offset, v.value(), |view| match view {
            LogView::Message(m) => Some((m.conv, m.seq, key.slot(m.role, m.sender_id, m.cid.as_str()))),
            _ => None,
        })?;
        let Some((conv, seq, slot)) = message else { continue };
        let was = index.insert((conv, seq), (offset, slot)).ctx("write conv_index")?.map(|g| g.value().0);
        if was != Some(offset) {
            return Err(StorageError::Corrupt {
                table: "conv_index",
                key: format!("conversation {conv} seq {seq}"),
                message: format!("points at offset {was:?}, but the log has that message at {offset}"),
            });
        }
        messages += 1;
    }
    let indexed = index.len().ctx("read conv_index")?;
    if indexed != messages {
        return Err(StorageError::Corrupt {
            table: "conv_index",
            key: "*".into(),
            message: format!("{indexed} entries, but the log holds {messages} messages"),
        });
    }
    Ok(())
}

/// Moves `users` from id keys to (role, id) keys. The old table is renamed
/// out of the way first, so the new one keeps the name `users`.
fn rekey_users(txn: &WriteTransaction) -> Result<(), StorageError> {
    // A store without users still gets the empty table to rename.
    drop(txn.open_table(USERS_V2).ctx("open table users")?);
    txn.rename_table(USERS_V2, USERS_V2_MOVED).ctx("rename table users")?;
    {
        let old = txn.open_table(USERS_V2_MOVED).ctx("open table users_v2")?;
        let mut new = txn.open_table(tables::USERS).ctx("open table users")?;
        for entry in old.iter().ctx("read users")? {
            let (k, v) = entry.ctx("read users")?;
            let id = k.value();
            let user = access_user(v.value(), &id)?;
            if user.id != id {
                return Err(StorageError::Corrupt {
                    table: "users",
                    key: id.into(),
                    message: format!("holds the profile of {:?}", user.id),
                });
            }
            new.insert((user.role.as_str(), id), v.value()).ctx("write users")?;
        }
    }
    txn.delete_table(USERS_V2_MOVED).ctx("delete table users_v2")?;
    Ok(())
}

/// Fills `conv_changes` from the log: each conversation record's change is
/// decided against the state logged before it, as the writer does.
fn v3_to_v4(txn: &WriteTransaction) -> Result<(), StorageError> {
    let log = txn.open_table(tables::LOG).ctx("open table log")?;
    let mut changes = txn.open_table(tables::CONV_CHANGES).ctx("open table conv_changes")?;
    let mut last: HashMap<u64, (ConvStatus, Option<String>)> = HashMap::new();
    for entry in log.iter().ctx("read log")? {
        let (k, v) = entry.ctx("read log")?;
        let offset = k.value();
        let LogView::Conversation(c) = decode_log(v.value(), &offset)? else {
            continue;
        };
        let (status, agent) = (c.status, c.agent.map(|a| a.id));
        let before = last.get(&c.id).map(|(s, a)| (*s, a.as_deref()));
        let change = ConvChange::between(before, status, agent);
        changes.insert(offset, change.to_byte()).ctx("write conv_changes")?;
        last.insert(c.id, (status, agent.map(str::to_string)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase};

    use super::*;
    use crate::redo::replay_record;

    /// A version 10 write-ahead log's index entries, replayed at open into
    /// version 10's table, move into runs after the rows already there.
    #[test]
    fn a_version_10_logs_index_entries_move_into_runs_after_its_replay() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut row = Vec::new();
            runs::encode(&[(1, 10, 1), (2, 11, 2)], &mut row);
            txn.open_table(tables::CONV_RUNS).unwrap().insert((5, 2), row.as_slice()).unwrap();
            let mut record = Vec::new();
            for (seq, offset) in [(2, 11), (3, 12), (4, 13)] {
                Op::ConvIndex { conv: 5, seq, offset, slot: 0xffff_0000_0000_0000 | seq }.encode(&mut record);
            }
            Op::ConvIndex { conv: 6, seq: 1, offset: 14, slot: 9 }.encode(&mut record);
            assert_eq!(replay_record(&mut Tables::open(&txn, None).unwrap(), &record).unwrap(), 4);
            index_in_runs(&txn).unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(tables::CONV_INDEX_V10).is_err(), "deleted once moved");
        let index = txn.open_table(tables::CONV_RUNS).unwrap();
        let five: Vec<_> = runs::entries(&index, 5, 0, u64::MAX).unwrap().map(Result::unwrap).collect();
        assert_eq!(five, [(1, 10, 1), (2, 11, 2), (3, 12, 3), (4, 13, 4)], "seq 2 once, slots cut");
        let six: Vec<_> = runs::entries(&index, 6, 0, u64::MAX).unwrap().map(Result::unwrap).collect();
        assert_eq!(six, [(1, 14, 9)]);
    }

    #[test]
    fn a_store_without_version_10s_table_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        index_in_runs(&txn).unwrap();
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(tables::CONV_INDEX_V10).is_err());
    }
}
