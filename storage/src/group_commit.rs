//! Group commit: the one thread that writes.
//!
//! It loops: gather a batch from every source's submit queue (round robin,
//! so no shard starves another), apply the whole batch in one redb write
//! transaction, make it durable, and only then push one completion per
//! write and notify each source that got some. Durable is: with the
//! write-ahead log (`wal.rs`), its redo record appended and the log
//! fsynced, then the transaction committed to redb with `Durability::None`
//! (visible to readers); without the log, or when the log has no room
//! for the record, the transaction committed with `Durability::Immediate`
//! (its fsyncs returned). With the log, every `checkpoint_ms` the writer
//! also commits nothing but the checkpoint durably, after a batch's acks
//! went out rather than with them: it writes every page changed since the
//! last one and would hold those acks as long.
//!
//! A batch closes at whichever comes first:
//! - `batch_max_records` writes,
//! - `batch_max_bytes` (approximate, [`WriteOp::size_hint`]),
//! - `batch_window_us` after its first write was taken, or at once when the
//!   queues are empty and the window is 0.
//!
//! Submits do not wake the writer while it waits out a window, unless a
//! source's queue alone fills a batch (`batch_max_records`); the byte
//! limit is seen when the window ends. After a commit, the writer first
//! waits one window unwoken, and what came meanwhile is the next batch at
//! once. Under load a batch then costs the writer one wake-up, where a
//! wake per write cost a futex call and two context switches each
//! (BENCHMARKS.md, issue 11, "Fewer wake-ups"); a lone write at a low
//! rate pays one more (the window that found nothing), which measured
//! cheaper than telling the two apart.
//!
//! Under load batches grow by themselves: while one commit's fsync runs,
//! the next batch queues up. A write that fails on its own (a seq conflict)
//! is answered with its error and does not disturb the rest of the batch;
//! a failed transaction or commit fails every write in the batch, and none
//! of them is stored. The writer then answers every write that comes
//! `unavailable` (`StorageError::Recovering`) until a probe commit
//! succeeds, reopening the database when redb refuses to go on with it
//! (see `reopen.rs`), with a back-off from `recovery_backoff_ms_min` to
//! `recovery_backoff_ms_max`.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable};

use crate::backend::{FileKind, SyncCounter};
use crate::compact::MessageView;
use crate::compact_state::{ConversationView, encode_read_record, encode_user_record};
use crate::dedupe::{self, DedupeKey, SlotMaps, U64Map};
use crate::error::{IoContext, StorageError};
use crate::record::{ConvChange, LogRecord, PresenceRecord, access_conversation, access_user, encode_into};
use crate::redo::{Op, Tables};
use crate::reopen::{DbSlot, Reopen};
use crate::runs;
use crate::senders::Senders;
use crate::store::begin_durable;
use crate::tables;
use crate::tail::{Plan, Staged, TailView};
use crate::wal::{self, Wal};
use crate::write::{CommitTimes, Committed, Completion, Shared, Submission, WriteOp};
use kefu_proto::client::Msg;

/// The knobs of group commit, from [`StoreConfig`](crate::StoreConfig).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_records: usize,
    pub(crate) max_bytes: usize,
    pub(crate) window: Duration,
    pub(crate) idle_park: Duration,
    pub(crate) quick_repair: bool,
    /// Longest time between durable redb commits with the write-ahead log.
    pub(crate) checkpoint: Duration,
    /// Checkpoints written behind the writer (`behind.rs`).
    pub(crate) checkpoint_in_background: bool,
    pub(crate) conv_cache_entries: usize,
    pub(crate) dedupe_window: usize,
    pub(crate) sender_refs: usize,
    pub(crate) sender_ref_reach: u64,
    pub(crate) recovery_backoff_min: Duration,
    pub(crate) recovery_backoff_max: Duration,
    /// A commit this long or longer is logged (`slow_commit_log_ms`); zero:
    /// never.
    pub(crate) slow_commit: Duration,
}

/// How often a slow commit is logged at most: a disk that stalls often
/// would otherwise write a line per commit.
const SLOW_COMMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Which slow commits get a log line: the first, then one per
/// [`SLOW_COMMIT_LOG_EVERY`] at most, each saying how many were not logged
/// since the last. The writer thread alone uses it.
#[derive(Debug, Default)]
struct SlowCommits {
    next_line: Option<Instant>,
    unlogged: u64,
}

impl SlowCommits {
    /// Whether a commit of `took` is slow: at least `limit`, which is not
    /// zero (zero: none is).
    fn is_slow(took: Duration, limit: Duration) -> bool {
        !limit.is_zero() && took >= limit
    }

    /// A commit of `took` ended at `now`: `Some(unlogged)` if it is slow
    /// and gets a line, with the slow commits since the last line that did
    /// not.
    fn observe(&mut self, took: Duration, limit: Duration, now: Instant) -> Option<u64> {
        if !Self::is_slow(took, limit) {
            return None;
        }
        if self.next_line.is_some_and(|next| now < next) {
            self.unlogged += 1;
            return None;
        }
        self.next_line = Some(now + SLOW_COMMIT_LOG_EVERY);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// The writer thread's state.
pub(crate) struct GroupCommit {
    db: Arc<DbSlot>,
    /// How to reopen the database after a failed commit (`None`: a test
    /// backend, which only retries).
    reopen: Option<Reopen>,
    shared: Arc<Shared>,
    limits: Limits,
    /// The batch being gathered: (source, submission).
    batch: Vec<(usize, Submission)>,
    batch_bytes: usize,
    results: Vec<Result<Committed, StorageError>>,
    /// Sources that got completions from the current batch.
    touched: Vec<bool>,
    /// Where the next round robin starts.
    next_source: usize,
    /// The next log offset (committed state plus the open batch).
    next_offset: u64,
    /// One more than the highest conversation id stored.
    next_conv_id: u64,
    /// What the writer knows of the conversations it has seen: their last
    /// seq and dedupe slots, as of the committed state plus the open batch
    /// (cleared when a commit fails), bounded by `conv_cache_entries`.
    convs: SlotMaps,
    /// Where senders were last stored in full (`senders.rs`), as of the
    /// committed state plus the open batch; cleared when a commit fails.
    senders: Senders,
    /// Reused for the index entries of a conversation being loaded.
    scratch: Vec<(u64, u64, u64)>,
    /// Reused for the value of an index row (`runs.rs`).
    row: Vec<u8>,
    /// The index entries of the open batch's appends, which wait in the
    /// tails (`tail.rs`) unless the commit writes their conversation's.
    staged: Vec<Staged>,
    /// The conversations `staged` holds entries of: a conversation the
    /// writer's cache dropped in the middle of a batch is loaded with them.
    staged_convs: U64Map<()>,
    /// Conversations the open batch closes: their tails go to the table.
    closing: Vec<u64>,
    /// What the last commit wrote to `meta.index_from` (`None`: not known,
    /// written again by the next).
    index_from: Option<u64>,
    /// Commits done since open.
    commits: u64,
    dedupe_key: DedupeKey,
    /// The reused encoding buffer: a record's bytes for its table and the
    /// log alike.
    buf: Vec<u8>,
    /// fsync time, for [`CommitTimes`].
    syncs: Arc<SyncCounter>,
    /// When the batch being gathered got its first write.
    batch_started: Instant,
    /// The write-ahead log, if on (`wal.rs`).
    wal: Option<Wal>,
    /// The redo record of the batch being committed, reused.
    redo: Vec<u8>,
    /// When redb last committed durably.
    last_checkpoint: Instant,
    /// Commits since then that only the log holds durably.
    unchecked: bool,
    /// The ticket of the last checkpoint written behind the writer
    /// (`behind.rs`), until it is known to be on the disk: the cycle after
    /// next may not start in its file before.
    behind_ticket: Option<u64>,
    /// The store closed while recovering from a failed commit, before a
    /// commit succeeded again: nothing more may be written.
    closed_failing: bool,
    /// A batch was just gathered: the next gather first waits a window for
    /// more without being woken (see `gather`).
    linger: bool,
    /// Which slow commits are logged (`report`).
    slow: RefCell<SlowCommits>,
}

/// A write's own outcome (`Ok(Err)`: refused, nothing written), or a
/// failure of the transaction (`Err`) that fails the whole batch.
type Applied = Result<Result<Committed, StorageError>, StorageError>;

impl GroupCommit {
    #[allow(clippy::too_many_arguments)] // each is one piece of what open found
    pub(crate) fn new(
        db: Arc<DbSlot>,
        shared: Arc<Shared>,
        limits: Limits,
        next_offset: u64,
        next_conv_id: u64,
        dedupe_key: DedupeKey,
        syncs: Arc<SyncCounter>,
        reopen: Option<Reopen>,
        wal: Option<Wal>,
    ) -> GroupCommit {
        let sources = shared.sources.len();
        let convs = SlotMaps::new(
            limits.conv_cache_entries,
            limits.dedupe_window,
            shared.stats.writer_cache_entries.clone(),
        );
        GroupCommit {
            db,
            reopen,
            shared,
            batch: Vec::with_capacity(limits.max_records),
            batch_bytes: 0,
            results: Vec::with_capacity(limits.max_records),
            touched: vec![false; sources],
            next_source: 0,
            next_offset,
            next_conv_id,
            convs,
            senders: Senders::new(limits.sender_refs, limits.sender_ref_reach),
            scratch: Vec::new(),
            row: Vec::new(),
            staged: Vec::new(),
            staged_convs: U64Map::default(),
            closing: Vec::new(),
            index_from: None,
            commits: 0,
            dedupe_key,
            buf: Vec::with_capacity(1024),
            limits,
            syncs,
            batch_started: Instant::now(),
            wal,
            redo: Vec::new(),
            last_checkpoint: Instant::now(),
            unchecked: false,
            behind_ticket: None,
            closed_failing: false,
            linger: false,
            slow: RefCell::new(SlowCommits::default()),
        }
    }

    /// The thread's body: returns once the store is closed and every write
    /// submitted before that has been completed.
    pub(crate) fn run(mut self) {
        // Said on every way out, a panic included, so that readiness checks
        // see a writer that is gone.
        struct Stopped<'a>(&'a AtomicBool);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let shared = self.shared.clone();
        let _stopped = Stopped(&shared.stats.writer_stopped);
        while self.gather() {
            if let Err(e) = self.commit_batch() {
                self.recover(&e);
            } else if self.unchecked && self.checkpoint_due() {
                // After the batch's acks went out, not with them: a
                // checkpoint writes every page changed since the last one
                // and would hold the batch's acks for as long.
                self.checkpoint_or_recover();
            }
            if self.closed_failing {
                break;
            }
        }
        if self.closed_failing {
            // Closed before it could write again: its counters and the log
            // may not match what is stored, so nothing more is written,
            // not even a checkpoint; the next open replays the log.
            self.refuse_until_quiescent();
            tracing::warn!("storage closed while it could not write; the next open replays the log");
            return;
        }
        // A clean close leaves nothing for the next open to rebuild...
        if let Err(e) = self.flush_every_tail() {
            tracing::warn!(error = %e, "storage could not write the index's tails at close; the next open rebuilds them");
        }
        // ... or to replay.
        if self.unchecked
            && let Err(e) = self.checkpoint(false)
        {
            tracing::warn!(error = %e, "storage could not checkpoint at close; the next open replays the log");
        }
        tracing::debug!(commits = self.commits, "storage writer stopped");
    }

    fn full(&self) -> bool {
        self.batch.len() >= self.limits.max_records || self.batch_bytes >= self.limits.max_bytes
    }

    /// Moves submissions into the batch, round robin over the sources,
    /// until the queues are empty or the batch is full. Returns how many.
    fn take(&mut self) -> usize {
        const PER_SOURCE_TURN: usize = 64;
        let n = self.shared.sources.len();
        let mut taken = 0;
        loop {
            let mut progress = false;
            for i in 0..n {
                let s = (self.next_source + i) % n;
                for _ in 0..PER_SOURCE_TURN {
                    if self.full() {
                        self.next_source = (s + 1) % n;
                        return taken;
                    }
                    let Some(sub) = self.shared.sources[s].submit.pop() else { break };
                    self.batch_bytes += sub.op.size_hint();
                    self.batch.push((s, sub));
                    taken += 1;
                    progress = true;
                }
            }
            self.next_source = (self.next_source + 1) % n;
            if !progress {
                return taken;
            }
        }
    }

    /// Gathers the next batch. Returns false when the store is closed and
    /// nothing is left to do.
    fn gather(&mut self) -> bool {
        debug_assert!(self.batch.is_empty());
        self.batch_bytes = 0;
        let window = self.limits.window;
        if std::mem::take(&mut self.linger) && !window.is_zero() {
            // Under load the next writes come within a window of the last
            // commit: wait one out without being woken by each, so that a
            // batch costs one wake-up (this timer), not two (its first
            // write, then the window's end). What came has waited up to a
            // window already and is committed at once. Lingering only
            // after batches of more than one write cost 3-6% more server
            // CPU per message at 15,000 sessions (BENCHMARKS.md).
            self.window_until(Instant::now() + window);
            if !self.batch.is_empty() {
                self.linger = true;
                return true;
            }
        }
        loop {
            if self.take() > 0 {
                break;
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                if self.shared.quiescent() {
                    return false;
                }
                // A submitter is mid-push; it will be done in a moment.
                thread::yield_now();
                continue;
            }
            if self.unchecked && self.checkpoint_due() {
                self.checkpoint_or_recover();
                if self.closed_failing {
                    // `run` refuses what is left.
                    return false;
                }
                continue;
            }
            let park = if self.unchecked {
                self.limits
                    .idle_park
                    .min(self.limits.checkpoint.saturating_sub(self.last_checkpoint.elapsed()))
            } else {
                self.limits.idle_park
            };
            // A submit wakes us.
            thread::park_timeout(park);
            self.shared.stats.writer_wakeups.fetch_add(1, Ordering::Relaxed);
        }
        self.batch_started = Instant::now();
        if window.is_zero() {
            while !self.full() && self.take() > 0 {}
        } else {
            self.window_until(self.batch_started + window);
        }
        self.linger = true;
        true
    }

    /// Takes writes into the batch until `deadline` or until a take finds
    /// it full, asleep in between and not woken by submits (`windowing`):
    /// a close, or a source queue that fills a batch, still wakes it.
    fn window_until(&mut self, deadline: Instant) {
        self.shared.windowing.store(true, Ordering::SeqCst);
        while !self.full() {
            let empty = self.batch.is_empty();
            if self.take() > 0 {
                if empty {
                    // What the commit's time is measured from.
                    self.batch_started = Instant::now();
                }
                continue;
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            thread::park_timeout(deadline - now);
            self.shared.stats.writer_wakeups.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.windowing.store(false, Ordering::SeqCst);
        // Pairs with the fence in `Writer::submit`: a write pushed while we
        // were windowing is taken before we next sleep.
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Applies, commits and completes the gathered batch; the error if the
    /// commit failed (its writes have been answered with it).
    fn commit_batch(&mut self) -> Result<(), StorageError> {
        let n = self.batch.len();
        debug_assert!(n > 0);
        let start_offset = self.next_offset;
        let start_conv_id = self.next_conv_id;
        let synced_before = self.synced();
        let outcome = self.apply_and_commit();
        match &outcome {
            Ok((durable, plan)) => {
                // Before any completion: a sender that reads its
                // conversation next must find the entries.
                self.db.tails.apply(&self.staged, plan);
                self.index_from = Some(plan.index_from);
                let durable = *durable;
                self.commits += 1;
                self.report(false, n, self.batch_started, synced_before, durable);
                if self.next_offset != start_offset {
                    self.shared.publish_log_end(self.next_offset);
                }
                let stats = &self.shared.stats;
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.last_commit_failed.store(false, Ordering::Relaxed);
                stats.batch_records_max.fetch_max(n as u64, Ordering::Relaxed);
                for r in &self.results {
                    match r {
                        Ok(c) if c.duplicate => stats.duplicates.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => stats.writes.fetch_add(1, Ordering::Relaxed),
                        Err(_) => stats.rejected.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = n, "storage group commit failed; failing its writes");
                self.count_failure();
                // Nothing of the batch is stored: forget what it assumed.
                self.next_offset = start_offset;
                self.next_conv_id = start_conv_id;
                self.convs.clear();
                self.senders.clear();
                self.index_from = None;
                self.results.clear();
                self.results.resize(n, Err(e.clone()));
                *self.shared.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
        self.staged.clear();
        self.staged_convs.clear();
        self.closing.clear();
        self.publish();
        outcome.map(|_| ())
    }

    /// After a failed commit: answers every write that comes with
    /// `Recovering` until a probe commit succeeds, trying at once and then
    /// after a back-off that doubles up to its bound. Returns when the
    /// store writes again, or when it is closed.
    fn recover(&mut self, first: &StorageError) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let mut backoff = self.limits.recovery_backoff_min;
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            stats.recovery_attempts.fetch_add(1, Ordering::Relaxed);
            match self.try_to_write() {
                Ok(()) => {
                    self.closed_failing = false;
                    tracing::info!(attempts, "storage writes again");
                    stats.recoveries.fetch_add(1, Ordering::Relaxed);
                    *self.shared.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    stats.last_commit_failed.store(false, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    // One line per try: the back-off bounds them to one every
                    // recovery_backoff_ms_max at most.
                    tracing::warn!(error = %e, first = %first, attempts, retry_ms = backoff.as_millis() as u64, "storage cannot write yet");
                    *self.shared.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
            }
            if !self.refuse_until(Instant::now() + backoff) {
                self.closed_failing = true;
                return;
            }
            backoff = (backoff * 2).min(self.limits.recovery_backoff_max);
        }
    }

    /// Answers every write queued now with `Recovering`.
    fn refuse_queued(&mut self) {
        self.batch_bytes = 0;
        while self.take() > 0 {
            let n = self.batch.len();
            self.shared.stats.refused_recovering.fetch_add(n as u64, Ordering::Relaxed);
            self.results.clear();
            self.results.resize(n, Err(StorageError::Recovering));
            self.publish();
            self.batch_bytes = 0;
        }
    }

    /// After a close that came while the store could not write: answers
    /// every write still coming with `Recovering` until no submitter is
    /// left.
    fn refuse_until_quiescent(&mut self) {
        loop {
            self.refuse_queued();
            if self.shared.quiescent() {
                return;
            }
            thread::yield_now();
        }
    }

    /// Answers every write submitted until `deadline` with `Recovering`: a
    /// client retries, where a held write would keep its ack waiting for
    /// as long as the disk is full. False if the store closed meanwhile.
    fn refuse_until(&mut self, deadline: Instant) -> bool {
        loop {
            self.refuse_queued();
            if self.shared.closed.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            // A submit unparks us early, to be answered at once.
            thread::park_timeout(deadline - now);
        }
    }

    /// One try at writing: a probe commit on the database as it is, and if
    /// that fails, on the database opened again.
    fn try_to_write(&mut self) -> Result<(), StorageError> {
        if self.probe().is_ok() {
            return Ok(());
        }
        let Some(how) = &self.reopen else {
            return self.probe();
        };
        let reopened = crate::reopen::reopen(&self.db, how, self.wal.as_mut())?;
        self.go_on_from(reopened);
        self.probe()
    }

    /// Takes the counters from what the file holds: a commit reported
    /// failed may have reached the disk (its fsync failed after the data
    /// landed), or the write-ahead log (and then its replay stored it).
    fn go_on_from(&mut self, stored: crate::reopen::Reopened) {
        if stored.next_offset > self.next_offset {
            tracing::warn!(
                from = self.next_offset,
                to = stored.next_offset,
                "a commit reported failed is stored"
            );
            self.shared.publish_log_end(stored.next_offset);
        }
        self.next_offset = stored.next_offset;
        self.next_conv_id = self.next_conv_id.max(stored.next_conv_id);
        self.convs.clear();
        self.senders.clear();
    }

    /// A commit that needs the disk to take a page. With the write-ahead
    /// log it replays the log's cycle into a durable commit and starts a
    /// new one, since a failed append leaves the cycle's end unknown and a
    /// record that reached the disk must be in redb before the cycle's
    /// next record is.
    fn probe(&mut self) -> Result<(), StorageError> {
        let db = self.db.get()?;
        let txn = begin_durable(&db, self.limits.quick_repair)?;
        let logged = match &mut self.wal {
            None => {
                txn.open_table(tables::META)
                    .ctx("open table meta")?
                    .insert(tables::META_NEXT_OFFSET, self.next_offset)
                    .ctx("write meta")?;
                txn.commit().ctx("commit")?;
                false
            }
            Some(wal) => {
                {
                    let mut t = Tables::open(&txn, None)?;
                    // A page to take even when the log holds nothing; a
                    // replay writes its own counters over it.
                    t.put_meta_unrecorded(tables::META_NEXT_OFFSET, self.next_offset)?;
                    wal::replay(&mut t, wal)?;
                }
                txn.commit().ctx("commit")?;
                self.shared.stats.durable_commits.fetch_add(1, Ordering::Relaxed);
                true
            }
        };
        // A commit reported failed may have reached the file (or the
        // replay stored it): its index entries before its log end is
        // published, and its offsets are not to be given again (a message
        // pointing back for its sender would point at another's).
        self.db.tails.rebuild(&db)?;
        self.go_on_from(crate::reopen::counters(&db)?);
        if logged {
            self.last_checkpoint = Instant::now();
            self.unchecked = false;
            // A durable commit waits for everything queued before it.
            self.behind_ticket = None;
        }
        Ok(())
    }

    /// Pushes the completions and wakes the sources. Runs only after the
    /// commit returned.
    fn publish(&mut self) {
        debug_assert_eq!(self.batch.len(), self.results.len());
        for ((source, sub), result) in self.batch.drain(..).zip(self.results.drain(..)) {
            let mut completion = Completion { token: sub.token, result, op: sub.op };
            // Cannot be full: a source has at most `capacity` writes in
            // flight and the queue holds `capacity`. Spin rather than drop
            // a completion if that ever breaks.
            loop {
                match self.shared.sources[source].done.push(completion) {
                    Ok(()) => break,
                    Err(back) => {
                        debug_assert!(false, "completion queue {source} overflowed");
                        completion = back;
                        thread::yield_now();
                    }
                }
            }
            self.touched[source] = true;
        }
        for (source, touched) in self.touched.iter_mut().enumerate() {
            if std::mem::take(touched) {
                (self.shared.notify)(source);
            }
        }
    }

    /// Applies the batch in one transaction and commits it: durably in
    /// redb without the write-ahead log, or when its record would not fit
    /// in the log; otherwise appended to the log (one fsync) and committed
    /// to redb in memory. Says whether the commit was durable in redb, and
    /// what it did to the index's tails (applied by the caller).
    fn apply_and_commit(&mut self) -> Result<(bool, Plan), StorageError> {
        let db = self.db.get()?;
        let mut txn = db.begin_write().ctx("begin write")?;
        let mut redo = std::mem::take(&mut self.redo);
        Wal::begin(&mut redo);
        let mut t = Tables::open(&txn, self.wal.is_some().then_some(redo))?;
        let conv_id_before = self.next_conv_id;
        let mut batch = std::mem::take(&mut self.batch);
        self.results.clear();
        let mut failed = None;
        for (_, sub) in batch.iter_mut() {
            match self.apply(&mut t, &mut sub.op) {
                Ok(r) => self.results.push(r),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.batch = batch;
        if let Some(e) = failed {
            // Dropping `txn` uncommitted aborts it.
            return Err(e);
        }
        let mut row = std::mem::take(&mut self.row);
        let plan = self.db.tails.plan(&self.staged, &self.closing, self.next_offset, |conv, entries| {
            // A tail rebuilt at open may hold entries the table has too.
            let fresh = runs::fresh(entries, runs::last_seq(&t.conv_runs, conv)?);
            let below = &entries[..entries.len() - fresh.len()];
            if !below.is_empty() {
                // Only after a crash; the table should hold all of them.
                let lacking = runs::lacking(&t.conv_runs, conv, below)?;
                if lacking > 0 {
                    tracing::error!(
                        conv,
                        lacking,
                        "index entries below the table's last row are not in the table; they are left out of the index"
                    );
                }
            }
            runs::rows(fresh, &mut row, |last_seq, value| t.put(Op::ConvRun { conv, last_seq, value }))
        });
        self.row = row;
        let plan = plan?;
        if self.index_from != Some(plan.index_from) {
            t.put(Op::Meta { key: tables::META_INDEX_FROM, value: plan.index_from })?;
        }
        t.put(Op::Meta { key: tables::META_NEXT_OFFSET, value: self.next_offset })?;
        if self.next_conv_id != conv_id_before {
            t.put(Op::Meta { key: tables::META_NEXT_CONV_ID, value: self.next_conv_id })?;
        }
        // A record the log cannot take (it is full, or the record is
        // larger than all of it) makes this commit the checkpoint.
        let logged = self.wal.as_ref().is_some_and(|wal| wal.fits(t.redo_len()));
        if !logged && let Some(wal) = &self.wal {
            t.put_meta_unrecorded(tables::META_WAL_CYCLE, wal.cycle())?;
        }
        if let Some(redo) = t.into_redo() {
            self.redo = redo;
        }
        if logged {
            txn.set_durability(Durability::None).ctx("set durability")?;
            let wal = self.wal.as_mut().expect("logged only with a log");
            // The record first: if its fsync fails, nothing was committed.
            wal.append(&mut self.redo)?;
            self.unchecked = true;
            txn.commit().ctx("commit")?;
        } else {
            txn.set_durability(Durability::Immediate).ctx("set durability")?;
            txn.set_quick_repair(self.limits.quick_repair);
            txn.commit().ctx("commit")?;
            self.checkpointed(None)?;
        }
        Ok((!logged, plan))
    }

    /// One commit of nothing but every conversation's tail, written to
    /// the table (at a clean close).
    fn flush_every_tail(&mut self) -> Result<(), StorageError> {
        debug_assert!(self.batch.is_empty() && self.staged.is_empty());
        self.closing = self.db.tails.convs();
        if self.closing.is_empty() {
            return Ok(());
        }
        let outcome = self.apply_and_commit();
        let closing = std::mem::take(&mut self.closing);
        let (_, plan) = outcome?;
        self.db.tails.apply(&[], &plan);
        self.index_from = Some(plan.index_from);
        tracing::debug!(conversations = closing.len(), "index tails written at close");
        Ok(())
    }

    /// fsync time so far, of the database and of the log.
    fn synced(&self) -> [Duration; 2] {
        [self.syncs.spent(FileKind::Database), self.syncs.spent(FileKind::Wal)]
    }

    /// Tells [`OnCommit`](crate::OnCommit) of a commit (or checkpoint) of
    /// `records` writes, timed from `since`, with the fsync time since
    /// `before` that it waited for: the log's, and the database's if
    /// `durable` (otherwise the database's fsyncs are a checkpoint's,
    /// written behind).
    ///
    /// A commit of `slow_commit_log_ms` or longer is also logged.
    fn report(&self, checkpoint: bool, records: usize, since: Instant, before: [Duration; 2], durable: bool) {
        let took = since.elapsed();
        let on_commit = self.shared.on_commit.get();
        let slow = SlowCommits::is_slow(took, self.limits.slow_commit);
        if on_commit.is_none() && !slow {
            return;
        }
        let now = self.synced();
        let mut fsync = now[1].saturating_sub(before[1]);
        if durable {
            fsync += now[0].saturating_sub(before[0]);
        }
        if slow
            && let Some(unlogged) =
                self.slow.borrow_mut().observe(took, self.limits.slow_commit, Instant::now())
        {
            tracing::warn!(
                what = if checkpoint { "checkpoint" } else { "group commit" },
                records,
                took_ms = took.as_millis() as u64,
                fsync_ms = fsync.as_millis() as u64,
                unlogged,
                "storage: a slow commit; every write in it and queued behind it waited as long for its ack and delivery (with fsync_ms near took_ms, the disk was slow)"
            );
        }
        if let Some(f) = on_commit {
            f(CommitTimes { checkpoint, records, batch: took, fsync });
        }
    }

    /// Counts a failed group commit or checkpoint for the stats.
    fn count_failure(&self) {
        self.shared.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.last_commit_failed.store(true, Ordering::Relaxed);
    }

    /// Whether a checkpoint is due: `checkpoint_ms` passed since the last
    /// durable commit.
    fn checkpoint_due(&self) -> bool {
        self.last_checkpoint.elapsed() >= self.limits.checkpoint
    }

    /// After a commit that set `wal_cycle` to the log's cycle, durable in
    /// redb now or, with `behind` (its ticket), once its flush is done:
    /// the log starts its next cycle. That one is written over the cycle
    /// before the last, so the checkpoint that closed that one must be on
    /// the disk first: it is the previous checkpoint, flushed long since
    /// unless the disk is slow, and if it is not, this waits.
    fn checkpointed(&mut self, behind: Option<u64>) -> Result<(), StorageError> {
        if let Some(previous) = self.behind_ticket.take() {
            let flush = self.db.behind();
            if !flush.synced(previous) {
                self.shared.stats.checkpoint_waits.fetch_add(1, Ordering::Relaxed);
                flush.wait_synced(previous).ctx("checkpoint flush")?;
            }
        }
        self.behind_ticket = behind;
        self.shared.stats.durable_commits.fetch_add(1, Ordering::Relaxed);
        self.last_checkpoint = Instant::now();
        self.unchecked = false;
        if let Some(wal) = &mut self.wal {
            let next = wal.cycle() + 1;
            wal.restart(next);
        }
        Ok(())
    }

    /// [`Self::checkpoint`], and if it fails, the recovery a failed group
    /// commit gets (the log is replayed before writes are taken again).
    fn checkpoint_or_recover(&mut self) {
        if let Err(e) = self.checkpoint(self.limits.checkpoint_in_background) {
            tracing::error!(error = %e, "storage checkpoint failed");
            self.count_failure();
            self.recover(&e);
        }
    }

    /// A durable commit of nothing but the checkpoint: after a group
    /// commit once `checkpoint_ms` passed, or when the writer is idle with
    /// commits only the log holds. In `background`, its pages and fsyncs
    /// are written behind the writer (`behind.rs`): it acks nothing, and
    /// the log keeps what it covers until they are on the disk.
    fn checkpoint(&mut self, background: bool) -> Result<(), StorageError> {
        let Some(wal) = &self.wal else { return Ok(()) };
        let cycle = wal.cycle();
        let started = Instant::now();
        let synced_before = self.synced();
        let db = self.db.get()?;
        let txn = begin_durable(&db, self.limits.quick_repair)?;
        txn.open_table(tables::META)
            .ctx("open table meta")?
            .insert(tables::META_WAL_CYCLE, cycle)
            .ctx("write meta")?;
        let ticket = if background {
            let flush = self.db.behind();
            flush.defer(true);
            let committed = txn.commit();
            flush.defer(false);
            committed.ctx("commit")?;
            Some(flush.ticket())
        } else {
            txn.commit().ctx("commit")?;
            None
        };
        self.checkpointed(ticket)?;
        self.report(true, 0, started, synced_before, !background);
        Ok(())
    }

    fn apply(&mut self, t: &mut Tables<'_>, op: &mut WriteOp) -> Applied {
        let commit = self.commits + 1;
        let done = |offset| Ok(Ok(Committed { offset, seq: 0, ts_ms: 0, duplicate: false, commit }));
        // Everything is encoded before anything is inserted, so a write that
        // cannot be encoded leaves no trace.
        match op {
            WriteOp::AppendMessage(m) => self.append(t, m, commit),
            WriteOp::PutConversation(c) => {
                c.last_seq = 0;
                let id = c.id;
                // A conversation was created when it was first stored; later
                // changes keep that time, whatever they carry. What changed
                // is decided here, against the state this one replaces.
                let mut change = ConvChange::Opened;
                if let Some(old) = t.conversations()?.get(id).ctx("read conversations")? {
                    match access_conversation(old.value(), id) {
                        Ok(was) => {
                            c.created_ms = was.created_ms;
                            let was = (was.status, was.agent.map(|a| a.id));
                            let agent = c.agent.as_ref().map(|a| a.id.as_str());
                            change = ConvChange::between(Some(was), c.status, agent);
                        }
                        Err(e) => return Ok(Err(e)),
                    }
                }
                // The table's value and the log's record are the same bytes:
                // one compact format serves both (`compact_state.rs`).
                ConversationView::of_record(c).encode_into(&mut self.buf);
                t.put(Op::Conversation { id, value: &self.buf })?;
                t.put(Op::UserConversation { visitor: &c.visitor_id, conv: id })?;
                let offset = insert_log(t, &mut self.next_offset, &self.buf)?;
                t.put(Op::ConvChange { offset, change: change.to_byte() })?;
                if c.status == kefu_proto::ids::ConvStatus::Closed {
                    // No message follows a close: its slots and its tail
                    // would only sit in memory. A resend still finds them
                    // in the index.
                    self.convs.forget(id);
                    self.closing.push(id);
                }
                self.next_conv_id = self.next_conv_id.max(id.saturating_add(1));
                done(offset)
            }
            WriteOp::PutUser(u) => {
                sort_meta(&mut u.meta);
                // A user was first seen when first stored; a later profile
                // keeps that time, whatever it carries (as conversations do).
                let key = (u.role.as_str(), u.id.as_str());
                if let Some(old) = t.users()?.get(key).ctx("read users")? {
                    match access_user(old.value(), &format_args!("{} {}", key.0, key.1)) {
                        Ok(was) => u.created_ms = was.created_ms,
                        Err(e) => return Ok(Err(e)),
                    }
                }
                // One encoding for the table and the log, as for conversations.
                encode_user_record(u, &mut self.buf);
                t.put(Op::User { role: u.role.as_str(), id: &u.id, value: &self.buf })?;
                done(insert_log(t, &mut self.next_offset, &self.buf)?)
            }
            WriteOp::MarkRead(r) => {
                encode_read_record(r, &mut self.buf);
                done(insert_log(t, &mut self.next_offset, &self.buf)?)
            }
            WriteOp::LogPresence(p) => {
                // The archive wants the record inside its enum: moved in
                // and back, no copy.
                let record = LogRecord::Presence(std::mem::replace(
                    p,
                    PresenceRecord { agent_id: String::new(), status: String::new(), ts_ms: 0 },
                ));
                let encoded = encode_into(&record, &mut self.buf);
                let LogRecord::Presence(back) = record else { unreachable!("built as a presence record") };
                *p = back;
                if let Err(e) = encoded {
                    return Ok(Err(e));
                }
                done(insert_log(t, &mut self.next_offset, &self.buf)?)
            }
            WriteOp::PutControl { role, id, control } => {
                sort_meta(&mut control.synced_meta);
                if let Err(e) = encode_into(&*control, &mut self.buf) {
                    return Ok(Err(e));
                }
                t.put(Op::UserControl { role: role.as_str(), id, value: &self.buf })?;
                Ok(Ok(Committed { offset: 0, seq: 0, ts_ms: 0, duplicate: false, commit }))
            }
            WriteOp::CommitOffset { consumer, offset } => {
                t.put(Op::ConsumerOffset { consumer, offset: *offset })?;
                Ok(Ok(Committed { offset: *offset, seq: 0, ts_ms: 0, duplicate: false, commit }))
            }
        }
    }

    /// `conv`'s index entries not in the table as this transaction
    /// has them: its tail and the open batch's.
    fn tail(&self, conv: u64) -> TailView {
        let tail = self.db.tails.view(conv);
        match self.staged_convs.contains_key(&conv) {
            true => tail.with_staged(&self.staged, conv),
            false => tail,
        }
    }

    /// The last seq of `conv` and the offset its dedupe `slot` points at
    /// in the cid window, if any: from memory, or loaded with one read of
    /// the end of the conversation's index, its last `dedupe_window`
    /// entries (in this transaction, so the open batch's appends are seen).
    fn lookup(&mut self, t: &Tables<'_>, conv: u64, slot: u64) -> Result<(u64, Option<u64>), StorageError> {
        if let Some(c) = self.convs.get(conv) {
            return Ok((c.next_seq.saturating_sub(1), c.offset(slot)));
        }
        let mut entries = std::mem::take(&mut self.scratch);
        let tail = self.tail(conv);
        dedupe::read_window(&t.conv_runs, &tail, conv, 0, self.convs.window(), &mut entries)?;
        let last = entries.last().map_or(0, |&(seq, _, _)| seq);
        let found = entries.iter().find(|&&(_, s, _)| s == slot).map(|&(_, _, offset)| offset);
        self.convs.note_all(conv, entries.drain(..));
        self.scratch = entries;
        Ok((last, found))
    }

    fn append(&mut self, t: &mut Tables<'_>, m: &mut Msg, commit: u64) -> Applied {
        let conv = m.conv.0;
        let ts_ms = m.ts;
        let sender = (m.from.role, m.from.id.as_str());
        let slot = self.dedupe_key.slot(sender.0, sender.1, &m.cid);
        let (last, prior) = self.lookup(t, conv, slot)?;
        if let Some(prior) = prior {
            // The log record decides; if another (sender, cid) owns the
            // slot, look at every entry of the window (2⁻³² rare).
            let original = match dedupe::check(&t.log, prior, conv, sender, &m.cid)? {
                Some(o) => Some(o),
                None => {
                    let tail = self.tail(conv);
                    let window = self.convs.window();
                    let (index, log) = (&t.conv_runs, &t.log);
                    dedupe::find_by_scan(&self.dedupe_key, index, &tail, log, conv, window, sender, &m.cid)?
                }
            };
            if let Some(o) = original {
                return Ok(Ok(Committed {
                    offset: o.offset,
                    seq: o.seq,
                    ts_ms: o.ts_ms,
                    duplicate: true,
                    commit,
                }));
            }
        }
        // Seq 0 asks the writer to assign the next one.
        let seq = if m.seq == 0 { last + 1 } else { m.seq };
        if seq != last + 1 {
            return Ok(Err(StorageError::SeqConflict { conv, expected: last + 1, got: seq }));
        }
        // The sender in full, or a pointer back at the last record that
        // names them (`senders.rs`); no hash when the memory is off.
        let who = self.senders.on().then(|| self.dedupe_key.sender(m.from.role, &m.from.id, &m.from.name));
        let sender_back = who.and_then(|who| self.senders.back(who, self.next_offset));
        MessageView { sender_back, ..MessageView::of_msg(m, seq) }.encode_into(&mut self.buf);
        let offset = insert_log(t, &mut self.next_offset, &self.buf)?;
        if let (Some(who), None) = (who, sender_back) {
            self.senders.stored(who, offset);
        }
        // The index entry waits in the tails (`tail.rs`); the commit
        // decides whether it goes to the table now.
        self.staged.push(Staged { conv, seq, offset, slot });
        self.staged_convs.insert(conv, ());
        self.convs.note(conv, seq, slot, offset);
        Ok(Ok(Committed { offset, seq, ts_ms, duplicate: false, commit }))
    }
}

/// Inserts `value` into the log at the next offset, and moves it on (a
/// batch that fails puts `next_offset` back where it started).
fn insert_log(t: &mut Tables<'_>, next_offset: &mut u64, value: &[u8]) -> Result<u64, StorageError> {
    let offset = *next_offset;
    t.put(Op::Log { offset, value })?;
    *next_offset += 1;
    Ok(offset)
}

/// Sorts profile fields by key; of a repeated key the last value wins.
pub(crate) fn sort_meta(meta: &mut Vec<(String, String)>) {
    meta.reverse();
    // Stable: of equal keys, the originally last now comes first and is
    // the one `dedup_by` keeps.
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    meta.dedup_by(|later, kept| later.0 == kept.0);
}

#[cfg(test)]
mod tests {
    use super::{SLOW_COMMIT_LOG_EVERY, SlowCommits, sort_meta};
    use std::time::{Duration, Instant};

    #[test]
    fn meta_is_sorted_and_the_last_value_of_a_key_wins() {
        let mut meta = vec![
            ("vip_level".to_string(), "1".to_string()),
            ("plan".to_string(), "free".to_string()),
            ("vip_level".to_string(), "3".to_string()),
        ];
        sort_meta(&mut meta);
        assert_eq!(meta, vec![("plan".into(), "free".into()), ("vip_level".into(), "3".into())]);
    }

    /// The first slow commit is logged, the next ones within 10 s are
    /// counted, and the next line says how many were not logged; a quick
    /// commit is never logged, and a limit of zero logs none.
    #[test]
    fn slow_commits_are_logged_once_per_interval_with_a_count_of_the_rest() {
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut slow = SlowCommits::default();
        assert_eq!(slow.observe(Duration::from_millis(99), limit, t0), None);
        assert_eq!(slow.observe(Duration::from_millis(100), limit, t0), Some(0));
        assert_eq!(slow.observe(Duration::from_millis(300), limit, t0 + Duration::from_secs(1)), None);
        assert_eq!(slow.observe(Duration::from_millis(5), limit, t0 + Duration::from_secs(2)), None);
        assert_eq!(slow.observe(Duration::from_millis(150), limit, t0 + Duration::from_secs(9)), None);
        assert_eq!(slow.observe(Duration::from_millis(120), limit, t0 + SLOW_COMMIT_LOG_EVERY), Some(2));
        assert_eq!(slow.observe(Duration::from_millis(120), limit, t0 + 3 * SLOW_COMMIT_LOG_EVERY), Some(0));
        let mut off = SlowCommits::default();
        assert_eq!(off.observe(Duration::from_secs(5), Duration::ZERO, t0), None);
    }
}
