//! What a group commit changed, as the write-ahead log holds it, and the
//! tables a commit writes through.
//!
//! Every insert the writer makes goes through [`Tables`], which also
//! appends it to a redo record as an [`Op`]: which table, which key, which
//! value, after the writer decided them (seqs assigned, duplicates
//! answered, a conversation's creation time kept). Replaying the ops of a
//! record repeats those inserts, and nothing is decided again, so a replay
//! gives the state the commit gave whatever code runs it. The log only ever
//! inserts (nothing is removed or overwritten by anything but a later
//! insert of the same key), so replaying every record of a cycle in order
//! onto a state that already holds some of them ends in the same state:
//! replay may repeat.
//!
//! An op is a tag byte and its fields: numbers as LEB128 varints (a dedupe
//! slot of schema versions up to 10, a 64-bit hash, as 8 bytes
//! little-endian),
//! strings and values with a varint length. Decoding checks every length
//! and every string, so a damaged record is an error, never a panic (the
//! record's checksum makes one unlikely to get this far).

use redb::{Table, WriteTransaction};

use crate::compact::{Cursor, put_bytes, put_varint};
use crate::error::{IoContext, StorageError};
use crate::tables;

/// One insert into one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Log {
        offset: u64,
        value: &'a [u8],
    },
    /// One entry of the index as schema versions up to 10 kept it
    /// (`tables::CONV_INDEX_V10`): only logs of versions 7 to 10 hold
    /// these.
    ConvIndex {
        conv: u64,
        seq: u64,
        offset: u64,
        slot: u64,
    },
    /// One row of the conversation index (`runs.rs`).
    ConvRun {
        conv: u64,
        last_seq: u64,
        value: &'a [u8],
    },
    Meta {
        key: &'a str,
        value: u64,
    },
    Conversation {
        id: u64,
        value: &'a [u8],
    },
    User {
        role: &'a str,
        id: &'a str,
        value: &'a [u8],
    },
    UserConversation {
        visitor: &'a str,
        conv: u64,
    },
    ConsumerOffset {
        consumer: &'a str,
        offset: u64,
    },
    ConvChange {
        offset: u64,
        change: u8,
    },
    UserControl {
        role: &'a str,
        id: &'a str,
        value: &'a [u8],
    },
}

impl<'a> Op<'a> {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Log { offset, value } => {
                out.push(1);
                put_varint(out, offset);
                put_bytes(out, value);
            }
            Op::ConvIndex { conv, seq, offset, slot } => {
                out.push(2);
                put_varint(out, conv);
                put_varint(out, seq);
                put_varint(out, offset);
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Op::Meta { key, value } => {
                out.push(3);
                put_bytes(out, key.as_bytes());
                put_varint(out, value);
            }
            Op::Conversation { id, value } => {
                out.push(4);
                put_varint(out, id);
                put_bytes(out, value);
            }
            Op::User { role, id, value } => {
                out.push(5);
                put_bytes(out, role.as_bytes());
                put_bytes(out, id.as_bytes());
                put_bytes(out, value);
            }
            Op::UserConversation { visitor, conv } => {
                out.push(6);
                put_bytes(out, visitor.as_bytes());
                put_varint(out, conv);
            }
            Op::ConsumerOffset { consumer, offset } => {
                out.push(7);
                put_bytes(out, consumer.as_bytes());
                put_varint(out, offset);
            }
            Op::ConvChange { offset, change } => {
                out.push(8);
                put_varint(out, offset);
                out.push(change);
            }
            Op::UserControl { role, id, value } => {
                out.push(9);
                put_bytes(out, role.as_bytes());
                put_bytes(out, id.as_bytes());
                put_bytes(out, value);
            }
            Op::ConvRun { conv, last_seq, value } => {
                out.push(10);
                put_varint(out, conv);
                put_varint(out, last_seq);
                put_bytes(out, value);
            }
        }
    }

    /// The next op of a record; `None` at its end.
    pub(crate) fn decode(c: &mut Cursor<'a>) -> Result<Option<Op<'a>>, String> {
        if c.bytes.is_empty() {
            return Ok(None);
        }
        let op = match c.byte("tag")? {
            1 => Op::Log { offset: c.varint("offset")?, value: c.bytes("value")? },
            2 => Op::ConvIndex {
                conv: c.varint("conversation")?,
                seq: c.varint("seq")?,
                offset: c.varint("offset")?,
                slot: c.u64_le("slot")?,
            },
            3 => Op::Meta { key: c.str("key")?, value: c.varint("value")? },
            4 => Op::Conversation { id: c.varint("id")?, value: c.bytes("value")? },
            5 => Op::User { role: c.str("role")?, id: c.str("id")?, value: c.bytes("value")? },
            6 => Op::UserConversation { visitor: c.str("visitor")?, conv: c.varint("conversation")? },
            7 => Op::ConsumerOffset { consumer: c.str("consumer")?, offset: c.varint("offset")? },
            8 => Op::ConvChange { offset: c.varint("offset")?, change: c.byte("change")? },
            9 => Op::UserControl { role: c.str("role")?, id: c.str("id")?, value: c.bytes("value")? },
            10 => Op::ConvRun {
                conv: c.varint("conversation")?,
                last_seq: c.varint("seq")?,
                value: c.bytes("value")?,
            },
            t => return Err(format!("unknown op tag {t}")),
        };
        Ok(Some(op))
    }
}

/// The tables a batch writes to, opened once per transaction, each insert
/// also appended to the redo record. Those only some writes touch are
/// opened on first use: opening a table costs redb about nine allocations,
/// and most batches hold only messages.
pub(crate) struct Tables<'t> {
    txn: &'t WriteTransaction,
    pub(crate) log: Table<'t, tables::LogOffset, &'static [u8]>,
    pub(crate) conv_runs: Table<'t, (u64, u64), &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    conversations: Option<Table<'t, u64, &'static [u8]>>,
    users: Option<Table<'t, (&'static str, &'static str), &'static [u8]>>,
    user_conversations: Option<Table<'t, (&'static str, u64), ()>>,
    consumer_offsets: Option<Table<'t, &'static str, u64>>,
    conv_changes: Option<Table<'t, u64, u8>>,
    user_controls: Option<Table<'t, (&'static str, &'static str), &'static [u8]>>,
    conv_index_v10: Option<Table<'t, (u64, u64), (u64, u64)>>,
    /// The redo record being built (`None`: a replay, which records
    /// nothing).
    redo: Option<Vec<u8>>,
    /// Writing log records of schema version 15 or older (the upgrade's
    /// copy of the log, the replay of a version 15 write-ahead log): their
    /// packed messages are written again as version 16 stores them
    /// ([`compact::repack_v15`](crate::compact::repack_v15)).
    pub(crate) log_v15: bool,
}

impl<'t> Tables<'t> {
    /// Opens the tables of `txn`; every insert is appended to `redo` if
    /// given.
    pub(crate) fn open(txn: &'t WriteTransaction, redo: Option<Vec<u8>>) -> Result<Tables<'t>, StorageError> {
        Ok(Tables {
            txn,
            log: txn.open_table(tables::LOG).ctx("open table log")?,
            conv_runs: txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?,
            meta: txn.open_table(tables::META).ctx("open table meta")?,
            conversations: None,
            users: None,
            user_conversations: None,
            consumer_offsets: None,
            conv_changes: None,
            user_controls: None,
            conv_index_v10: None,
            redo,
            log_v15: false,
        })
    }

    /// Gives back the redo record, closing the tables.
    pub(crate) fn into_redo(self) -> Option<Vec<u8>> {
        self.redo
    }

    /// The redo record's length so far.
    pub(crate) fn redo_len(&self) -> usize {
        self.redo.as_ref().map_or(0, Vec::len)
    }

    fn record(&mut self, op: Op<'_>) {
        if let Some(redo) = &mut self.redo {
            op.encode(redo);
        }
    }

    pub(crate) fn conversations(&mut self) -> Result<&mut Table<'t, u64, &'static [u8]>, StorageError> {
        lazily(&mut self.conversations, self.txn, tables::CONVERSATIONS, "open table conversations")
    }

    pub(crate) fn users(
        &mut self,
    ) -> Result<&mut Table<'t, (&'static str, &'static str), &'static [u8]>, StorageError> {
        lazily(&mut self.users, self.txn, tables::USERS, "open table users")
    }

    fn user_conversations(&mut self) -> Result<&mut Table<'t, (&'static str, u64), ()>, StorageError> {
        lazily(
            &mut self.user_conversations,
            self.txn,
            tables::USER_CONVERSATIONS,
            "open table user_conversations",
        )
    }

    fn user_controls(
        &mut self,
    ) -> Result<&mut Table<'t, (&'static str, &'static str), &'static [u8]>, StorageError> {
        lazily(&mut self.user_controls, self.txn, tables::USER_CONTROLS, "open table user_controls")
    }

    fn conv_changes(&mut self) -> Result<&mut Table<'t, u64, u8>, StorageError> {
        lazily(&mut self.conv_changes, self.txn, tables::CONV_CHANGES, "open table conv_changes")
    }

    fn consumer_offsets(&mut self) -> Result<&mut Table<'t, &'static str, u64>, StorageError> {
        lazily(&mut self.consumer_offsets, self.txn, tables::CONSUMER_OFFSETS, "open table consumer_offsets")
    }

    /// Does what `op` says, and records it.
    pub(crate) fn put(&mut self, op: Op<'_>) -> Result<(), StorageError> {
        match op {
            Op::Log { offset, value } => {
                if offset >= tables::LOG_OFFSET_END {
                    return Err(StorageError::Encode(format!(
                        "log offset {offset}: the log holds at most 2^40 - 1 records"
                    )));
                }
                let repacked =
                    match self.log_v15 {
                        false => None,
                        true => crate::compact::repack_v15(value).map_err(|message| {
                            StorageError::Corrupt { table: "log", key: offset.to_string(), message }
                        })?,
                    };
                self.log.insert(offset, repacked.as_deref().unwrap_or(value)).ctx("insert log")?;
            }
            Op::ConvIndex { conv, seq, offset, slot } => {
                lazily(&mut self.conv_index_v10, self.txn, tables::CONV_INDEX_V10, "open table conv_index")?
                    .insert((conv, seq), (offset, slot))
                    .ctx("insert conv_index")?;
            }
            Op::ConvRun { conv, last_seq, value } => {
                self.conv_runs.insert((conv, last_seq), value).ctx("insert conv_runs")?;
            }
            Op::Meta { key, value } => {
                self.meta.insert(key, value).ctx("write meta")?;
            }
            Op::Conversation { id, value } => {
                self.conversations()?.insert(id, value).ctx("insert conversation")?;
            }
            Op::User { role, id, value } => {
                self.users()?.insert((role, id), value).ctx("insert user")?;
            }
            Op::UserConversation { visitor, conv } => {
                self.user_conversations()?.insert((visitor, conv), ()).ctx("insert user_conversations")?;
            }
            Op::ConsumerOffset { consumer, offset } => {
                self.consumer_offsets()?.insert(consumer, offset).ctx("insert consumer offset")?;
            }
            Op::ConvChange { offset, change } => {
                self.conv_changes()?.insert(offset, change).ctx("insert conv_changes")?;
            }
            Op::UserControl { role, id, value } => {
                self.user_controls()?.insert((role, id), value).ctx("insert user control")?;
            }
        }
        self.record(op);
        Ok(())
    }

    /// Writes a `meta` counter without recording it: for what only a
    /// durable commit may say (the checkpointed cycle).
    pub(crate) fn put_meta_unrecorded(&mut self, key: &'static str, value: u64) -> Result<(), StorageError> {
        self.meta.insert(key, value).ctx("write meta")?;
        Ok(())
    }

    /// Reads a `meta` counter in this transaction.
    pub(crate) fn meta(&self, key: &str) -> Result<Option<u64>, StorageError> {
        use redb::ReadableTable;
        Ok(self.meta.get(key).ctx("read meta")?.map(|g| g.value()))
    }
}

fn lazily<'s, 't, K: redb::Key + 'static, V: redb::Value + 'static>(
    slot: &'s mut Option<Table<'t, K, V>>,
    txn: &'t WriteTransaction,
    definition: redb::TableDefinition<'_, K, V>,
    context: &'static str,
) -> Result<&'s mut Table<'t, K, V>, StorageError> {
    match slot {
        Some(table) => Ok(table),
        None => Ok(slot.insert(txn.open_table(definition).ctx(context)?)),
    }
}

/// Decodes every op of a redo record's payload and encodes them again: the
/// fuzz target's view of what replay reads (an encoding is unique, so an
/// accepted payload comes back byte for byte).
#[doc(hidden)]
pub fn redo_round_trip(payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut c = Cursor { bytes: payload };
    let mut out = Vec::with_capacity(payload.len());
    while let Some(op) = Op::decode(&mut c)? {
        op.encode(&mut out);
    }
    Ok(out)
}

/// Applies every op of one record to `t`.
pub(crate) fn replay_record(t: &mut Tables<'_>, record: &[u8]) -> Result<usize, String> {
    let mut c = Cursor { bytes: record };
    let mut n = 0;
    while let Some(op) = Op::decode(&mut c)? {
        t.put(op).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Op<'static>> {
        vec![
            Op::Log { offset: 7, value: b"\x02message" },
            Op::ConvIndex { conv: 3, seq: 9, offset: 7, slot: u64::MAX - 5 },
            Op::Meta { key: tables::META_NEXT_OFFSET, value: 8 },
            Op::Conversation { id: 3, value: b"conv" },
            Op::User { role: "visitor", id: "v-1", value: b"user" },
            Op::UserConversation { visitor: "v-1", conv: 3 },
            Op::ConsumerOffset { consumer: "events", offset: 1 << 40 },
            Op::ConvChange { offset: 6, change: 2 },
            Op::UserControl { role: "agent", id: "a-1", value: b"" },
            Op::ConvRun { conv: 3, last_seq: 9, value: b"\x06\x09\x07\x05\0\0\0" },
        ]
    }

    /// An offset the log's 5-byte key cannot hold is refused, not cut to
    /// 40 bits (which would overwrite offset 0).
    #[test]
    fn the_log_refuses_an_offset_past_40_bits() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = Tables::open(&txn, None).unwrap();
            t.put(Op::Log { offset: tables::LOG_OFFSET_END - 1, value: b"last" }).unwrap();
            let past = t.put(Op::Log { offset: tables::LOG_OFFSET_END, value: b"past" });
            assert!(matches!(past, Err(StorageError::Encode(_))), "{past:?}");
        }
        use redb::ReadableTableMetadata as _;
        assert_eq!(txn.open_table(tables::LOG).unwrap().len().unwrap(), 1);
    }

    /// A version 15 write-ahead log's messages go into the table as
    /// version 16 stores them; with `log_v15` unset, values go in as they
    /// are.
    #[test]
    fn a_version_15_logs_messages_are_repacked_as_they_are_replayed() {
        use redb::ReadableTable as _;
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let record = crate::testkit::message_record();
        let mut now = Vec::new();
        crate::compact::MessageView::of_record(&record).encode_into(&mut now);
        let v15 = crate::compact::as_v15(&now);
        assert_ne!(v15, now);
        let txn = db.begin_write().unwrap();
        {
            let mut record = Vec::new();
            Op::Log { offset: 0, value: &v15 }.encode(&mut record);
            Op::Log { offset: 1, value: b"\x03not a message" }.encode(&mut record);
            let mut t = Tables::open(&txn, None).unwrap();
            t.log_v15 = true;
            assert_eq!(replay_record(&mut t, &record).unwrap(), 2);
            drop(t);
            let mut as_is = Vec::new();
            Op::Log { offset: 2, value: &v15 }.encode(&mut as_is);
            assert_eq!(replay_record(&mut Tables::open(&txn, None).unwrap(), &as_is).unwrap(), 1);
        }
        let log = txn.open_table(tables::LOG).unwrap();
        assert_eq!(log.get(0).unwrap().unwrap().value(), now.as_slice(), "repacked");
        assert_eq!(log.get(1).unwrap().unwrap().value(), b"\x03not a message", "not a message: as it was");
        assert_eq!(log.get(2).unwrap().unwrap().value(), v15.as_slice(), "no repacking past version 15");
    }

    #[test]
    fn every_op_reads_back_as_written() {
        let ops = every_kind();
        let mut buf = Vec::new();
        for op in &ops {
            op.encode(&mut buf);
        }
        let mut c = Cursor { bytes: &buf };
        let mut back = Vec::new();
        while let Some(op) = Op::decode(&mut c).unwrap() {
            back.push(op);
        }
        assert_eq!(back, ops);
    }

    /// The fuzz target's seeds are records replay accepts, ops of every
    /// kind among them.
    #[test]
    fn the_fuzz_seeds_are_records_replay_reads() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/wal_record");
        let mut tags = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(redo_round_trip(&bytes).unwrap(), bytes, "{}", path.display());
            let mut c = Cursor { bytes: &bytes };
            while let Some(op) = Op::decode(&mut c).unwrap() {
                let mut one = Vec::new();
                op.encode(&mut one);
                tags.insert(one[0]);
            }
        }
        assert_eq!(tags.into_iter().collect::<Vec<_>>(), (1..=10).collect::<Vec<u8>>());
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        for op in every_kind() {
            op.encode(&mut buf);
        }
        let decode_all = |bytes: &[u8]| -> Result<usize, String> {
            let mut c = Cursor { bytes };
            let mut n = 0;
            while Op::decode(&mut c)?.is_some() {
                n += 1;
            }
            Ok(n)
        };
        // Every truncation that cuts an op reads as an error; one that cuts
        // between ops reads as fewer ops. None panics.
        for len in 0..buf.len() {
            let _ = decode_all(&buf[..len]);
        }
        assert!(decode_all(&[42]).unwrap_err().contains("unknown op tag"));
        assert!(decode_all(&[5, 2, 0xff, 0xfe]).unwrap_err().contains("UTF-8"));
        assert!(decode_all(&[2, 1, 1, 1, 0, 0]).unwrap_err().contains("slot"));
        // Every single-bit flip: an error or other ops, never a panic.
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                let _ = decode_all(&b);
            }
        }
    }
}
