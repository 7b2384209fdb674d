//! Getting the store to write again after a group commit failed.
//!
//! redb refuses every operation on a `Database` after an I/O error
//! (`PreviousIo`: a full disk, a failed fsync) until it is closed and
//! opened again. So the database lives in a [`DbSlot`] that the writer and
//! every [`Reader`](crate::Reader) go through: after a failed commit the
//! writer takes it out, waits (bounded) for readers to let go of the old
//! handle, whose file locks go with it, opens the file again (redb
//! recovers it to its last commit, as after a crash) and puts the new one
//! in. Readers see [`StorageError::Recovering`] (`unavailable`) in that
//! moment, and then read as before.
//!
//! Nothing acknowledged is lost by this: a write is acknowledged only
//! after its commit returned, and a reopened database holds every commit
//! that returned: the durable ones in the file, the others (with the
//! write-ahead log on) in the log, which is replayed into the file before
//! the database goes back in the slot. A commit that failed may still have reached the disk
//! (an fsync that failed after the data landed); the writer then takes
//! its counters from the file, and the writers it answered `unavailable`
//! find their resent `cid`s already stored.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::backend::SyncCounter;
use crate::behind::Behind;
use crate::config::StoreConfig;
use crate::error::{IoContext, StorageError};
use crate::redo::Tables;
use crate::tables;
use crate::tail::Tails;
use crate::wal::Wal;

/// How long a reopen waits for readers to drop the old database.
const READERS_WAIT: Duration = Duration::from_millis(500);

/// The database, swappable while the store is open, the handle on its
/// file's write-behind layer (the writer's alone), and the index entries
/// not yet in its index table (`tail.rs`), which go with it.
pub(crate) struct DbSlot {
    db: RwLock<Option<Arc<Database>>>,
    behind: Mutex<Behind>,
    pub(crate) tails: Tails,
}

impl DbSlot {
    pub(crate) fn new(db: Database, behind: Behind, tails: Tails) -> DbSlot {
        DbSlot { db: RwLock::new(Some(Arc::new(db))), behind: Mutex::new(behind), tails }
    }

    /// The write-behind handle of the database now in the slot (or of the
    /// last one, while it is being reopened).
    pub(crate) fn behind(&self) -> Behind {
        self.behind.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The database now, or `Recovering` while it is being reopened.
    pub(crate) fn get(&self) -> Result<Arc<Database>, StorageError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        db.clone().ok_or(StorageError::Recovering)
    }

    fn take(&self) -> Option<Arc<Database>> {
        self.db.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn put(&self, db: Arc<Database>) {
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(db);
    }
}

/// What reopening the file needs (a store on a file, not a test backend).
pub(crate) struct Reopen {
    pub(crate) config: StoreConfig,
    pub(crate) syncs: Arc<SyncCounter>,
}

/// The counters a reopened database continues from.
pub(crate) struct Reopened {
    pub(crate) next_offset: u64,
    pub(crate) next_conv_id: u64,
}

/// Closes the database in `slot` and opens its file again, replaying the
/// write-ahead log into it (if there is one) before any reader sees it:
/// the file alone is the last checkpoint, and a reader would miss what was
/// acked since. On failure the slot holds the old one (if readers kept
/// it) or none.
pub(crate) fn reopen(slot: &DbSlot, how: &Reopen, wal: Option<&mut Wal>) -> Result<Reopened, StorageError> {
    if let Some(mut old) = slot.take() {
        let deadline = Instant::now() + READERS_WAIT;
        loop {
            match Arc::try_unwrap(old) {
                Ok(db) => {
                    drop(db);
                    break;
                }
                Err(shared) if Instant::now() >= deadline => {
                    slot.put(shared);
                    return Err(StorageError::Io {
                        context: "reopen",
                        message: "readers still hold the database".into(),
                    });
                }
                Err(shared) => {
                    old = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    let (db, _repaired, behind) = crate::store::open_database(&how.config, None, how.syncs.clone(), None)?;
    if let Some(wal) = wal {
        let txn = crate::store::begin_durable(&db, how.config.quick_repair)?;
        let replayed = crate::wal::replay(&mut Tables::open(&txn, None)?, wal)?;
        // Nothing to replay, nothing to commit (dropping `txn` aborts it):
        // on a full disk the readers get the database back at once.
        if replayed.records > 0 {
            txn.commit().ctx("commit")?;
        }
    }
    let reopened = counters(&db)?;
    // The tails as the file has them: a commit that failed may be stored,
    // and one that looked stored may not be.
    slot.tails.rebuild(&db)?;
    *slot.behind.lock().unwrap_or_else(|p| p.into_inner()) = behind;
    slot.put(Arc::new(db));
    Ok(reopened)
}

/// Where the log and the conversation ids continue, read from the file.
pub(crate) fn counters(db: &Database) -> Result<Reopened, StorageError> {
    let txn = db.begin_read().ctx("begin read")?;
    let log = txn.open_table(tables::LOG).ctx("open table log")?;
    let next_offset = log.last().ctx("read log")?.map_or(0, |(k, _)| k.value() + 1);
    let meta = txn.open_table(tables::META).ctx("open table meta")?;
    let next_conv_id = meta.get(tables::META_NEXT_CONV_ID).ctx("read meta")?.map_or(1, |g| g.value());
    Ok(Reopened { next_offset, next_conv_id })
}
