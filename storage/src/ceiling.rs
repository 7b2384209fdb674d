//! The raw redb batch-write ceiling that group commit is measured against
//! (`benches/storage.rs`); not part of the API.
//!
//! It writes what the store writes for an append with `index_batch = 1` —
//! the encoded log record, its index entry with its dedupe slot as a row
//! of one (`runs.rs`), the `meta` counter — in
//! one write transaction per batch with the same durability and
//! quick-repair setting, from the calling thread, with none of the store's
//! machinery: no queues, no writer thread, no completions, no seq or cid
//! checks.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, Durability};

use crate::compact::MessageView;
use crate::dedupe::DedupeKey;
use crate::error::{IoContext, StorageError};
use crate::runs;
use crate::tables;
use kefu_proto::client::Msg;

/// A raw database and the counters the store would keep.
#[derive(Debug)]
pub struct Raw {
    db: Database,
    quick_repair: bool,
    next_offset: u64,
    seqs: HashMap<u64, u64>,
    key: DedupeKey,
    buf: Vec<u8>,
    row: Vec<u8>,
}

impl Raw {
    /// Creates `dir/kefu.redb` with the store's redb settings.
    pub fn create(dir: &Path, quick_repair: bool, cache_bytes: usize) -> Result<Raw, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Config(e.to_string()))?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(dir.join("kefu.redb"))
            .map_err(|e| StorageError::Config(e.to_string()))?;
        Ok(Raw {
            db,
            quick_repair,
            next_offset: 0,
            seqs: HashMap::new(),
            key: DedupeKey::random(),
            buf: Vec::with_capacity(1024),
            row: Vec::with_capacity(32),
        })
    }

    /// Appends `batch` in one durable transaction.
    pub fn append_batch(&mut self, batch: &[Msg]) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write().ctx("begin write")?;
        txn.set_durability(Durability::Immediate).ctx("set durability")?;
        txn.set_quick_repair(self.quick_repair);
        {
            let mut log = txn.open_table(tables::LOG).ctx("open table")?;
            let mut index = txn.open_table(tables::CONV_RUNS).ctx("open table")?;
            let mut meta = txn.open_table(tables::META).ctx("open table")?;
            for m in batch {
                let seq = self.seqs.entry(m.conv.0).or_default();
                *seq += 1;
                let (seq, conv, offset) = (*seq, m.conv.0, self.next_offset);
                let slot = self.key.slot(m.from.role, &m.from.id, &m.cid);
                MessageView::of_msg(m, seq).encode_into(&mut self.buf);
                log.insert(offset, self.buf.as_slice()).ctx("insert")?;
                self.row.clear();
                runs::encode(&[(seq, offset, slot)], &mut self.row);
                index.insert((conv, seq), self.row.as_slice()).ctx("insert")?;
                self.next_offset += 1;
            }
            meta.insert(tables::META_NEXT_OFFSET, self.next_offset).ctx("insert")?;
        }
        txn.commit().ctx("commit")
    }
}
