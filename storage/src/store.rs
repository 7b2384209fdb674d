//! Opening the store: the file, recovery, and the writer thread.
//!
//! [`Store::open`] opens (or creates) `dir/kefu.redb`, lets redb recover it
//! if the last process did not close it (a crash), checks the counters
//! against the log they count, reports what the gateway needs to resume
//! ([`Recovery`]), and starts the group-commit thread. Dropping the store
//! (or [`Store::close`]) completes every write already submitted, then
//! stops the thread.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, StorageBackend, WriteTransaction};

use crate::backend::{BackendObserver, FileKind, ProbeBackend, SyncCounter};
use crate::behind::{Behind, WriteBehind};
use crate::config::StoreConfig;
use crate::dedupe::{DedupeKey, SlotCache};
use crate::error::{IoContext, StorageError};
use crate::group_commit::{GroupCommit, Limits};
use crate::reader::Reader;
use crate::record::ConversationRecord;
use crate::redo::Tables;
use crate::reopen::{DbSlot, Reopen};
use crate::tables;
use crate::tail::{TailLimits, Tails};
use crate::upgrade;
use crate::wal::{self, Wal};
use crate::write::{Completions, Notify, OnCommit, OnLogEnd, Shared, Writer};

/// What the store found when it opened: where to resume.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The offset the next log record gets (= records logged).
    pub next_offset: u64,
    /// Where conversation ids continue (1 for a new store).
    pub next_conv_id: u64,
    /// Every conversation not closed, with its `last_seq`: the home shards'
    /// `next_seq` is `last_seq + 1`, and the router's queue is rebuilt from
    /// the queued ones.
    pub open_conversations: Vec<ConversationRecord>,
    /// The last process to open the store did not close it (it crashed or
    /// was killed); writes it never acknowledged may be missing, and that
    /// is all.
    pub unclean_shutdown: bool,
    /// redb had to rebuild its allocator state by walking the whole file
    /// (a crash without quick-repair's saved state): the slow path of open.
    pub repaired: bool,
    /// Write-ahead log records (group commits) replayed into redb at
    /// open: commits acknowledged after the last checkpoint before a crash.
    pub wal_replayed: u64,
    /// How long `open` took, repair and replay included.
    pub open_time: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group commits done.
    pub commits: u64,
    /// Commits durable in redb: every group commit without the
    /// write-ahead log; with it, the checkpoints (a commit of nothing but
    /// the checkpoint, or a group commit whose record the log had no room
    /// for).
    pub durable_commits: u64,
    /// Checkpoints that waited for the previous checkpoint's pages to
    /// reach the disk (written behind the writer, `behind.rs`) before the
    /// log could go on: 0 unless the disk falls behind.
    pub checkpoint_waits: u64,
    /// Group commits that failed (their writes got errors).
    pub failed_commits: u64,
    /// Writes stored.
    pub writes: u64,
    /// Appends answered as duplicates.
    pub duplicates: u64,
    /// Writes refused on their own (seq conflicts).
    pub rejected: u64,
    /// Submits refused because the source was full.
    pub submit_full: u64,
    /// fsyncs returned: the write-ahead log's (one per group commit through
    /// it) and redb's (one per durable commit, two with quick-repair).
    pub fsyncs: u64,
    /// The largest batch so far.
    pub batch_records_max: u64,
    /// Tries to write again after failed commits.
    pub recovery_attempts: u64,
    /// Times the store wrote again after failed commits.
    pub recoveries: u64,
    /// Writes answered `unavailable` while the store could not write.
    pub refused_recovering: u64,
    /// Dedupe slots the writer holds in memory (at most
    /// `conv_cache_entries`).
    pub writer_cache_entries: u64,
    /// Dedupe slots the readers' caches hold in memory, summed over the
    /// caches (each at most `conv_cache_entries`: the shared one, and one
    /// per shard).
    pub reader_cache_entries: u64,
    /// Index entries waiting in memory to go to the table together
    /// (at most about `index_lag`; `tail.rs`).
    pub index_tail_entries: u64,
}

/// Opens (or creates) the database file of `config`, or the given
/// backend, with the store's redb settings, over a [`WriteBehind`] whose
/// handle it returns. Also says whether redb had to repair it.
pub(crate) fn open_database(
    config: &StoreConfig,
    backend: Option<Box<dyn StorageBackend>>,
    syncs: Arc<SyncCounter>,
    observer: Option<Arc<dyn BackendObserver>>,
) -> Result<(Database, bool, Behind), StorageError> {
    let path = config.db_path();
    let open_err = |message: String| StorageError::Open { path: path.clone(), message };
    let inner: Box<dyn StorageBackend> = match backend {
        Some(b) => b,
        None => {
            let file = private_file(config, &path)?;
            Box::new(redb::backends::FileBackend::new(file).map_err(|e| open_err(e.to_string()))?)
        }
    };
    let probed = ProbeBackend::new(inner, FileKind::Database, syncs, observer);
    let (behind_file, behind) =
        WriteBehind::new(Box::new(probed)).map_err(|e| open_err(format!("spawn flush thread: {e}")))?;
    let repaired = Arc::new(AtomicBool::new(false));
    let db = {
        let repaired = repaired.clone();
        let mut builder = Database::builder();
        builder.set_cache_size(config.cache_bytes).set_repair_callback(move |session| {
            if !repaired.swap(true, Ordering::Relaxed) {
                tracing::warn!("storage was not closed cleanly; redb is repairing it");
            }
            tracing::debug!(progress = session.progress(), "storage repair");
        });
        builder.create_with_backend(behind_file).map_err(|e| open_err(e.to_string()))?
    };
    Ok((db, repaired.load(Ordering::Relaxed), behind))
}

/// The open store: owns the writer thread.
pub struct Store {
    shared: Arc<Shared>,
    db: Arc<DbSlot>,
    syncs: Arc<SyncCounter>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// The prototype of every reader handed out (they share its caches).
    reader: Reader,
}

/// Reads the store's counters; see [`Store::stats_source`].
#[derive(Clone)]
pub struct StatsSource {
    shared: Arc<Shared>,
    syncs: Arc<SyncCounter>,
}

impl std::fmt::Debug for StatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsSource").finish_non_exhaustive()
    }
}

/// Whether the store takes writes now, as a readiness check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterHealth {
    /// The writer runs and its last group commit (if any) succeeded.
    Accepting,
    /// The last group commit failed (a disk error, say); the next one may
    /// succeed, and then this clears.
    Failing,
    /// The store is closing or closed: submits are refused.
    Closed,
    /// The writer thread is gone without a close (it panicked).
    Stopped,
}

impl WriterHealth {
    /// Why writes are not accepted, for an operator; `None` when they are.
    pub fn problem(self) -> Option<&'static str> {
        match self {
            WriterHealth::Accepting => None,
            WriterHealth::Failing => Some("storage: cannot write (the last group commit failed); retrying"),
            WriterHealth::Closed => Some("storage: closed"),
            WriterHealth::Stopped => Some("storage: the writer thread stopped"),
        }
    }
}

impl StatsSource {
    /// Whether writes are accepted now.
    pub fn writer_health(&self) -> WriterHealth {
        let s = &self.shared;
        if s.closed.load(Ordering::SeqCst) {
            WriterHealth::Closed
        } else if s.stats.writer_stopped.load(Ordering::SeqCst) {
            WriterHealth::Stopped
        } else if s.stats.last_commit_failed.load(Ordering::Relaxed) {
            WriterHealth::Failing
        } else {
            WriterHealth::Accepting
        }
    }

    /// Why writes are not accepted now, with the last failure's words if
    /// a commit failed; `None` when they are.
    pub fn writer_problem(&self) -> Option<String> {
        let health = self.writer_health();
        let problem = health.problem()?;
        if health == WriterHealth::Failing
            && let Some(why) = self.shared.problem.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
        {
            return Some(format!("storage: cannot write ({why}); retrying"));
        }
        Some(problem.to_string())
    }

    /// The counters now.
    pub fn stats(&self) -> StoreStats {
        let s = &self.shared.stats;
        StoreStats {
            commits: s.commits.load(Ordering::Relaxed),
            failed_commits: s.failed_commits.load(Ordering::Relaxed),
            durable_commits: s.durable_commits.load(Ordering::Relaxed),
            checkpoint_waits: s.checkpoint_waits.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            duplicates: s.duplicates.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            submit_full: s.full.load(Ordering::Relaxed),
            fsyncs: self.syncs.returned(),
            batch_records_max: s.batch_records_max.load(Ordering::Relaxed),
            recovery_attempts: s.recovery_attempts.load(Ordering::Relaxed),
            recoveries: s.recoveries.load(Ordering::Relaxed),
            refused_recovering: s.refused_recovering.load(Ordering::Relaxed),
            writer_cache_entries: s.writer_cache_entries.load(Ordering::Relaxed) as u64,
            reader_cache_entries: s.reader_cache_entries.load(Ordering::Relaxed) as u64,
            index_tail_entries: s.index_tail_entries.load(Ordering::Relaxed) as u64,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// The state the writer shares, for tests that watch it work.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Opens or creates the store in `config.dir`, recovering it after a
    /// crash, and starts the writer thread. `notify(source)` is called
    /// from the writer thread after completions for `source` were pushed.
    pub fn open(config: StoreConfig, notify: Notify) -> Result<(Store, Recovery), StorageError> {
        Store::open_with(config, notify, None, None)
    }

    /// [`Store::open`] on given backends for the database and the
    /// write-ahead log (tests: simulated disks), and with an observer of
    /// both (tests: fsync ordering).
    pub(crate) fn open_with(
        config: StoreConfig,
        notify: Notify,
        backends: Option<Backends>,
        observer: Option<Arc<dyn BackendObserver>>,
    ) -> Result<(Store, Recovery), StorageError> {
        let started = Instant::now();
        config.validate()?;
        let path = config.db_path();
        let open_err = |message: String| StorageError::Open { path: path.clone(), message };
        let syncs = Arc::new(SyncCounter::default());
        // A test backend cannot be opened twice: such a store does not reopen.
        let reopen = backends.is_none().then(|| Reopen { config: config.clone(), syncs: syncs.clone() });
        let (db_backend, test_wal) = match backends {
            Some(b) => (Some(b.db), Some(b.wal)),
            None => (None, None),
        };
        let (db, repaired, behind) = open_database(&config, db_backend, syncs.clone(), observer.clone())?;
        // Only now: the database's lock keeps a second process from
        // touching the log of a store another one has open.
        let wal_files = match test_wal {
            Some(wal) => wal,
            None => open_wal_files(&config)?,
        };
        let mut wal = match wal_files {
            Some(files) => {
                let probed = files.map(|file| {
                    Box::new(ProbeBackend::new(file, FileKind::Wal, syncs.clone(), observer.clone()))
                        as Box<dyn StorageBackend>
                });
                Some(Wal::open(probed, config.wal_bytes, config.wal)?)
            }
            None => None,
        };
        let Counters { next_offset, next_conv_id, unclean_shutdown, dedupe_key, replayed } =
            init_tables(&db, &config, wal.as_mut())?;
        // Replayed whatever it held; the writer appends to it only if on.
        if !config.wal {
            wal = None;
        }
        let shared = Arc::new(Shared::new(
            config.sources,
            config.submit_queue_capacity,
            config.batch_max_records,
            notify,
            next_offset,
        ));
        let tails = Tails::new(
            dedupe_key,
            TailLimits { batch: config.index_batch, lag: config.index_lag },
            shared.stats.index_tail_entries.clone(),
        );
        tails.rebuild(&db)?;
        let index_tail = tails.len();
        let db = Arc::new(DbSlot::new(db, behind, tails));
        let gauge = shared.stats.reader_cache_entries.clone();
        let slots = Arc::new(Mutex::new(SlotCache::new(
            dedupe_key,
            config.conv_cache_entries,
            config.dedupe_window,
            gauge,
        )));
        let reader = Reader { db: db.clone(), slots };
        let open_conversations = reader.open_conversations()?;

        let limits = Limits {
            max_records: config.batch_max_records,
            max_bytes: config.batch_max_bytes,
            window: Duration::from_micros(config.batch_window_us),
            idle_park: Duration::from_millis(config.idle_park_ms),
            recovery_backoff_min: Duration::from_millis(config.recovery_backoff_ms_min),
            recovery_backoff_max: Duration::from_millis(config.recovery_backoff_ms_max),
            quick_repair: config.quick_repair,
            checkpoint: Duration::from_millis(config.checkpoint_ms),
            checkpoint_in_background: config.checkpoint_in_background,
            conv_cache_entries: config.conv_cache_entries,
            dedupe_window: config.dedupe_window,
            sender_refs: config.sender_refs,
            sender_ref_reach: config.sender_ref_reach,
            slow_commit: Duration::from_millis(config.slow_commit_log_ms),
        };
        let group_commit = GroupCommit::new(
            db.clone(),
            shared.clone(),
            limits,
            next_offset,
            next_conv_id,
            dedupe_key,
            syncs.clone(),
            reopen,
            wal,
        );
        let thread = std::thread::Builder::new()
            .name("kefu-storage".into())
            .spawn(move || group_commit.run())
            .map_err(|e| open_err(format!("spawn writer thread: {e}")))?;
        // Set before `open` returns, so every submit can wake the writer.
        let _ = shared.writer_thread.set(thread.thread().clone());

        let recovery = Recovery {
            next_offset,
            next_conv_id,
            open_conversations,
            unclean_shutdown,
            repaired,
            wal_replayed: replayed,
            open_time: started.elapsed(),
        };
        tracing::info!(
            path = %path.display(),
            records = next_offset,
            open_conversations = recovery.open_conversations.len(),
            unclean_shutdown = recovery.unclean_shutdown,
            repaired = recovery.repaired,
            wal_replayed = replayed,
            index_tail,
            wal = config.wal,
            open_ms = recovery.open_time.as_millis() as u64,
            "storage opened"
        );
        Ok((Store { shared, db, syncs, thread: Some(thread), path, reader }, recovery))
    }

    /// A handle to submit writes.
    pub fn writer(&self) -> Writer {
        Writer { shared: self.shared.clone() }
    }

    /// The log's end (the offset the next record gets) as of the last
    /// group commit that returned: every record below it is durable, and a
    /// reader of the log that stops there never shows a record a crash
    /// could take back.
    pub fn log_end(&self) -> u64 {
        self.shared.log_end.load(Ordering::Acquire)
    }

    /// Has `f` called with the log's new end after every group commit that
    /// logged something, on the writer thread, once the commit returned
    /// (see [`OnLogEnd`]): how a log follower learns of new records
    /// without polling. Set once; a second call hands `f` back. Set it
    /// before anything is submitted, or read [`Self::log_end`] after
    /// setting it, so no commit goes unseen.
    pub fn on_log_end(&self, f: OnLogEnd) -> Result<(), OnLogEnd> {
        self.shared.on_log_end.set(f)
    }

    /// Sets what the writer calls after each group commit that returned
    /// and each checkpoint (see [`OnCommit`]): batch sizes and commit
    /// times for `/metrics`.
    /// Set once; a second call hands `f` back.
    pub fn on_commit(&self, f: OnCommit) -> Result<(), OnCommit> {
        self.shared.on_commit.set(f)
    }

    /// A handle to read.
    pub fn reader(&self) -> Reader {
        self.reader.clone()
    }

    /// `source`'s completion queue.
    ///
    /// # Panics
    /// If `source >= sources`.
    pub fn completions(&self, source: usize) -> Completions {
        assert!(source < self.shared.sources.len(), "storage source {source} out of range");
        Completions { shared: self.shared.clone(), source }
    }

    /// The database file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> StoreStats {
        self.stats_source().stats()
    }

    /// A handle that reads [`Self::stats`] from another owner (the metrics
    /// endpoint), without holding the store open.
    pub fn stats_source(&self) -> StatsSource {
        StatsSource { shared: self.shared.clone(), syncs: self.syncs.clone() }
    }

    /// Stops taking writes, completes every write already submitted (their
    /// completions are pushed and notified as usual), and stops the writer
    /// thread. Dropping the store does the same.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.shared.closed.store(true, Ordering::SeqCst);
        thread.thread().unpark();
        if thread.join().is_err() {
            tracing::error!("storage writer thread panicked");
            return;
        }
        // The writer is gone, so this thread may write: record the clean
        // shutdown that the next open looks for.
        let flagged = self.db.get().and_then(|db| set_open_flag(&db, 0));
        if let Err(e) = flagged {
            tracing::warn!(error = %e, "storage could not record its clean shutdown");
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A write transaction whose commit is durable in redb (both fsyncs
/// returned), saving the allocator state if `quick_repair`.
pub(crate) fn begin_durable(db: &Database, quick_repair: bool) -> Result<WriteTransaction, StorageError> {
    let mut txn = db.begin_write().ctx("begin write")?;
    txn.set_durability(Durability::Immediate).ctx("set durability")?;
    txn.set_quick_repair(quick_repair);
    Ok(txn)
}

fn set_open_flag(db: &Database, value: u64) -> Result<(), StorageError> {
    let mut txn = db.begin_write().ctx("begin write")?;
    txn.set_durability(Durability::Immediate).ctx("set durability")?;
    txn.open_table(tables::META)
        .ctx("open table meta")?
        .insert(tables::META_OPEN, value)
        .ctx("write meta")?;
    txn.commit().ctx("commit")
}

struct Counters {
    next_offset: u64,
    next_conv_id: u64,
    unclean_shutdown: bool,
    dedupe_key: DedupeKey,
    /// Write-ahead log records replayed.
    replayed: u64,
}

/// Opens or creates `path` in the data directory, making the directory
/// if needed. Conversations are personal data: nobody but kefu's user
/// reads them. A directory kefu makes is 0700; the file is 0600, an
/// existing one tightened to it.
fn private_file(config: &StoreConfig, path: &std::path::Path) -> Result<std::fs::File, StorageError> {
    let open_err = |message: String| StorageError::Open { path: path.to_path_buf(), message };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.dir)
        .map_err(|e| open_err(format!("create directory: {e}")))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| open_err(e.to_string()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| open_err(format!("make it 0600: {e}")))?;
    Ok(file)
}

/// What a test opens a store on instead of files.
pub(crate) struct Backends {
    pub(crate) db: Box<dyn StorageBackend>,
    /// The write-ahead log's two files (even cycles, odd cycles); `None`:
    /// no log (and so none written).
    pub(crate) wal: Option<[Box<dyn StorageBackend>; 2]>,
}

/// The write-ahead log's two files, made if the log is on, opened if the
/// first exists (it may hold what an earlier run with the log on acked),
/// `None` if off and absent. 0600, like the database: they hold the same
/// messages.
fn open_wal_files(config: &StoreConfig) -> Result<Option<[Box<dyn StorageBackend>; 2]>, StorageError> {
    if !config.wal && !config.wal_path().exists() {
        return Ok(None);
    }
    let open = |path: PathBuf| -> Result<Box<dyn StorageBackend>, StorageError> {
        let file = private_file(config, &path)?;
        let backend = redb::backends::FileBackend::new(file)
            .map_err(|e| StorageError::Open { path: path.clone(), message: e.to_string() })?;
        Ok(Box::new(backend))
    };
    Ok(Some([open(config.wal_path())?, open(config.wal_odd_path())?]))
}

/// Creates the tables of a new store, or checks an existing one: schema
/// version (upgrading an older store first, see `upgrade.rs`), and the
/// counters in `meta` against the tables they count. Marks the store open
/// until [`Store::close`] marks it closed again.
fn init_tables(db: &Database, config: &StoreConfig, wal: Option<&mut Wal>) -> Result<Counters, StorageError> {
    let corrupt =
        |key: &str, message: String| StorageError::Corrupt { table: "meta", key: key.into(), message };
    let txn = begin_durable(db, config.quick_repair)?;
    // Before any table is opened as this version lays it out: an upgrade
    // may change a table's key type, which opening it first would refuse.
    let schema = txn
        .open_table(tables::META)
        .ctx("open table meta")?
        .get(tables::META_SCHEMA)
        .ctx("read meta")?
        .map(|g| g.value());
    match schema {
        None | Some(tables::SCHEMA_VERSION) => {}
        Some(v) if (1..tables::SCHEMA_VERSION).contains(&v) => upgrade::upgrade(&txn, v)?,
        Some(v) => {
            return Err(StorageError::Open {
                path: config.db_path(),
                message: format!("schema version {v}; this build reads {}", tables::SCHEMA_VERSION),
            });
        }
    }
    if schema.is_none() {
        // The log of a version 15 store or older is `log`: its name alone
        // says the store is not new.
        let old_log = {
            use redb::TableHandle as _;
            txn.list_tables().ctx("list tables")?.any(|t| t.name() == tables::LOG_V15.name())
        };
        if old_log || !txn.open_table(tables::LOG).ctx("open table log")?.is_empty().ctx("read log")? {
            return Err(corrupt(tables::META_SCHEMA, "missing, but the log is not empty".into()));
        }
        let mut meta = txn.open_table(tables::META).ctx("open table meta")?;
        meta.insert(tables::META_SCHEMA, tables::SCHEMA_VERSION).ctx("write meta")?;
        let key = DedupeKey::random();
        meta.insert(tables::META_DEDUPE_K0, key.k0).ctx("write meta")?;
        meta.insert(tables::META_DEDUPE_K1, key.k1).ctx("write meta")?;
    }
    // Before the counters are read: the log may hold the last acked writes.
    let replayed = match wal {
        Some(wal) => {
            let mut t = Tables::open(&txn, None)?;
            // A version 15 log holds messages in the packed format the
            // upgrade above rewrote in the table.
            t.log_v15 = schema.is_some_and(|v| v <= 15);
            wal::replay(&mut t, wal)?.records
        }
        None => 0,
    };
    // After the replay: a log of versions 7 to 10 writes the index as
    // those versions kept it.
    upgrade::index_in_runs(&txn)?;
    let counters;
    {
        let log = txn.open_table(tables::LOG).ctx("open table log")?;
        txn.open_table(tables::CONV_RUNS).ctx("open table conv_runs")?;
        let conversations = txn.open_table(tables::CONVERSATIONS).ctx("open table conversations")?;
        txn.open_table(tables::USERS).ctx("open table users")?;
        txn.open_table(tables::USER_CONVERSATIONS).ctx("open table user_conversations")?;
        txn.open_table(tables::CONSUMER_OFFSETS).ctx("open table consumer_offsets")?;
        txn.open_table(tables::CONV_CHANGES).ctx("open table conv_changes")?;
        txn.open_table(tables::USER_CONTROLS).ctx("open table user_controls")?;
        let mut meta = txn.open_table(tables::META).ctx("open table meta")?;

        let from_log = log.last().ctx("read log")?.map_or(0, |(k, _)| k.value() + 1);
        let from_meta = meta.get(tables::META_NEXT_OFFSET).ctx("read meta")?.map_or(0, |g| g.value());
        if from_log != from_meta {
            return Err(corrupt(
                tables::META_NEXT_OFFSET,
                format!("says {from_meta}, but the log's next offset is {from_log}"),
            ));
        }
        let max_conv = conversations.last().ctx("read conversations")?.map_or(0, |(k, _)| k.value());
        let next_conv_id = meta.get(tables::META_NEXT_CONV_ID).ctx("read meta")?.map_or(1, |g| g.value());
        if next_conv_id <= max_conv || next_conv_id == 0 {
            return Err(corrupt(
                tables::META_NEXT_CONV_ID,
                format!("says {next_conv_id}, but conversation {max_conv} exists"),
            ));
        }
        let k0 = meta.get(tables::META_DEDUPE_K0).ctx("read meta")?.map(|g| g.value());
        let k1 = meta.get(tables::META_DEDUPE_K1).ctx("read meta")?.map(|g| g.value());
        let (Some(k0), Some(k1)) = (k0, k1) else {
            return Err(corrupt(tables::META_DEDUPE_K0, "the dedupe key is missing".into()));
        };
        let unclean_shutdown = meta.get(tables::META_OPEN).ctx("read meta")?.is_some_and(|g| g.value() != 0);
        meta.insert(tables::META_OPEN, 1).ctx("write meta")?;
        counters = Counters {
            next_offset: from_log,
            next_conv_id,
            unclean_shutdown,
            dedupe_key: DedupeKey { k0, k1 },
            replayed,
        };
    }
    txn.commit().ctx("commit")?;
    Ok(counters)
}
