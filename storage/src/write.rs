//! The write path as its users see it: [`WriteOp`]s go in through a
//! [`Writer`], [`Completion`]s come out of each source's [`Completions`].
//!
//! A *source* is one submitting thread (a shard, the bridge). Each has a
//! bounded submit queue and a bounded completion queue, both lock-free
//! `ArrayQueue`s; the writer thread drains the first and fills the second,
//! then calls `notify(source)` so the source's owner wakes up and pops.
//! Nothing else is shared, so shards never contend with each other here.
//!
//! Both queues are bounded by one number, `submit_queue_capacity`: a source
//! may have that many writes *in flight* (submitted and not yet popped as a
//! completion). Beyond it `submit` hands the write back as
//! [`SubmitError::Full`]; the completion queue can therefore never
//! overflow, and the writer never waits on a slow shard.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::error::{StorageError, SubmitError};
use kefu_proto::client::Msg;

use kefu_proto::ids::Role;

use crate::record::{ConversationRecord, PresenceRecord, ReadMark, UserControlRecord, UserRecord};

/// Called by the writer thread with a source index after it pushed
/// completions for that source. Must be cheap and must not block (write an
/// eventfd, unpark a thread).
pub type Notify = Arc<dyn Fn(usize) + Send + Sync>;

/// Called by the writer thread with the log's new end (the offset the next
/// record gets) after a group commit that logged something returned: every
/// offset below it is durable. Must be cheap and must not block.
pub type OnLogEnd = Box<dyn Fn(u64) + Send + Sync>;

/// Called by the writer thread after each group commit that returned, and
/// after each checkpoint of the write-ahead log, with its size and timings,
/// for `/metrics`. Must be cheap and must not block.
pub type OnCommit = Box<dyn Fn(CommitTimes) + Send + Sync>;

/// One group commit, or one checkpoint, as [`OnCommit`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitTimes {
    /// A checkpoint of the write-ahead log, due after `checkpoint_ms` (a
    /// durable redb commit of the pages the commits since the last one
    /// changed, and no write), not a group commit. Writes that come
    /// meanwhile wait for it. A group commit that is durable because the
    /// log had no room is reported as a group commit.
    pub checkpoint: bool,
    /// Writes in the batch (0 for a checkpoint).
    pub records: usize,
    /// From the batch's first write taken off a queue to the commit
    /// returned: the gathering window, applying, and the commit itself.
    /// For a checkpoint, the durable commit alone.
    pub batch: Duration,
    /// Time spent in fsync during the commit (one fsync, two with
    /// `quick_repair`).
    pub fsync: Duration,
}

/// One durable write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Append a message to the log and the conversation's index: the wire
    /// message itself, as the gateway decoded and stamped it (no copy of
    /// its strings), and it comes back in the [`Completion`].
    ///
    /// `msg.seq` non-zero: the home shard assigned it, and it must be the
    /// conversation's next one (else [`StorageError::SeqConflict`], nothing
    /// written). `msg.seq` 0 (seqs start at 1): the writer assigns the next
    /// one and reports it in [`Committed::seq`]. Idempotent on (sender role
    /// and id, conversation, cid): if that key was ever appended (this batch,
    /// or years ago), nothing is written and the completion carries the
    /// original seq, offset and ts with `duplicate: true`. A duplicate
    /// consumes no seq, so a shard that assigns seqs must not pipeline a
    /// second append to the conversation behind one that may turn out a
    /// duplicate; seq 0 has no such caveat.
    AppendMessage(Msg),
    /// Store a conversation's state and log the change. Its `last_seq` is
    /// ignored (it is derived from the index).
    PutConversation(ConversationRecord),
    /// Store a user's profile and log the change. A user already stored
    /// keeps its `created_ms`, whatever this one carries; a stored profile
    /// that cannot be read is [`StorageError::Corrupt`] and is not
    /// overwritten (as for conversations).
    PutUser(UserRecord),
    /// Log a read mark.
    MarkRead(ReadMark),
    /// Log an agent's presence change.
    LogPresence(PresenceRecord),
    /// Store what the business system set for a user apart from the
    /// profile (synced keys, a block). Not logged.
    PutControl {
        /// The user's role.
        role: Role,
        /// The user id.
        id: String,
        /// The whole record, replacing the stored one.
        control: UserControlRecord,
    },
    /// Remember how far a named consumer of the log has got. Not logged.
    CommitOffset {
        /// The consumer's name.
        consumer: String,
        /// Its committed offset (by convention: the next one it will read).
        offset: u64,
    },
}

impl WriteOp {
    /// About how many bytes this adds to a batch (its strings and blobs
    /// plus a fixed overhead); what `batch_max_bytes` counts.
    pub fn size_hint(&self) -> usize {
        const OVERHEAD: usize = 64;
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        OVERHEAD
            + match self {
                WriteOp::AppendMessage(m) => {
                    m.cid.len()
                        + m.from.id.len() * 2
                        + m.from.name.len()
                        + opt(&m.text)
                        + m.attachment.as_ref().map_or(0, |a| a.mime.len() + a.data.len())
                }
                WriteOp::PutConversation(c) => {
                    2 * (c.visitor_id.len()
                        + c.agent.as_ref().map_or(0, |a| a.id.len() + a.name.len())
                        + opt(&c.group))
                }
                WriteOp::PutUser(u) => {
                    2 * (u.id.len()
                        + u.name.len()
                        + u.meta.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>())
                }
                WriteOp::MarkRead(r) => r.user_id.len(),
                WriteOp::LogPresence(p) => p.agent_id.len() + p.status.len(),
                WriteOp::PutControl { id, control, .. } => {
                    id.len()
                        + control.synced_name.as_ref().map_or(0, String::len)
                        + control.synced_meta.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                        + control.block.as_ref().map_or(0, |b| b.reason.len())
                }
                WriteOp::CommitOffset { consumer, .. } => consumer.len(),
            }
    }
}

/// A write that is durable: its commit's fsync has returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The log offset of the record (for a duplicate: of the original; for
    /// `CommitOffset`: the offset committed).
    pub offset: u64,
    /// For messages, the seq (for a duplicate: the original's); else 0.
    pub seq: u64,
    /// For messages, the ts_ms stored (for a duplicate: the original's);
    /// else 0.
    pub ts_ms: u64,
    /// The append matched an earlier one by (sender, conversation, cid) and
    /// wrote nothing.
    pub duplicate: bool,
    /// The number of the group commit that made it durable (1, 2, … since
    /// this store was opened); writes with equal numbers shared an fsync.
    pub commit: u64,
}

/// The outcome of one submitted write, in the source's completion queue.
#[derive(Debug)]
pub struct Completion {
    /// The caller's token from `submit`.
    pub token: u64,
    /// Durable, or why not. An `Err` means nothing of this write is stored.
    pub result: Result<Committed, StorageError>,
    /// The write itself, handed back so the caller can fan a message out
    /// or reuse its buffers without having kept a copy. (`PutUser` comes
    /// back with its meta sorted; a message keeps the `seq` it was
    /// submitted with, see `result` for the assigned one.)
    pub op: WriteOp,
}

pub(crate) struct Submission {
    pub(crate) token: u64,
    pub(crate) op: WriteOp,
}

/// One source's queues and counters, padded so that two shards' counters
/// never share a cache line.
#[repr(align(128))]
pub(crate) struct SourceQueues {
    pub(crate) submit: ArrayQueue<Submission>,
    pub(crate) done: ArrayQueue<Completion>,
    /// Submitted and not yet popped as a completion. At most `capacity`.
    pub(crate) in_flight: AtomicUsize,
    /// Submitters between their check of `closed` and their push; the
    /// writer does not exit while this is non-zero.
    pub(crate) entering: AtomicUsize,
}

/// Counters of the write path (see [`StoreStats`](crate::StoreStats)).
#[derive(Debug, Default)]
pub(crate) struct WriteStats {
    pub(crate) commits: AtomicU64,
    pub(crate) durable_commits: AtomicU64,
    /// Checkpoints that had to wait for the previous one's flush.
    pub(crate) checkpoint_waits: AtomicU64,
    pub(crate) failed_commits: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) full: AtomicU64,
    pub(crate) batch_records_max: AtomicU64,
    /// The last group commit failed (cleared by the next one that works).
    pub(crate) last_commit_failed: AtomicBool,
    /// The writer thread has returned (or unwound): nothing will commit.
    pub(crate) writer_stopped: AtomicBool,
    /// Tries to write again after a failed commit.
    pub(crate) recovery_attempts: AtomicU64,
    /// Times the store wrote again after failed commits.
    pub(crate) recoveries: AtomicU64,
    /// Writes answered `Recovering` while the store could not write.
    pub(crate) refused_recovering: AtomicU64,
    /// Times the writer woke while gathering a batch (from a submit, a
    /// close or a timeout; not while refusing writes during recovery): what
    /// `windowing` keeps down. Read by tests.
    pub(crate) writer_wakeups: AtomicU64,
    /// Dedupe slots the writer holds in memory.
    pub(crate) writer_cache_entries: Arc<AtomicUsize>,
    /// Dedupe slots the readers' caches hold in memory, all of them.
    pub(crate) reader_cache_entries: Arc<AtomicUsize>,
    /// Index entries waiting in memory (`tail.rs`).
    pub(crate) index_tail_entries: Arc<AtomicUsize>,
}

/// Everything the submitters, the writer thread and the completion poppers
/// share.
pub(crate) struct Shared {
    pub(crate) sources: Box<[SourceQueues]>,
    pub(crate) capacity: usize,
    pub(crate) closed: AtomicBool,
    pub(crate) writer_thread: OnceLock<Thread>,
    /// The writer is waiting out a batch window (`batch_window_us`) and
    /// wants no wake-up: it takes what came when the window ends. Without
    /// this every submit during the window woke it to take one write and
    /// sleep again, a futex wake and two context switches per write.
    pub(crate) windowing: AtomicBool,
    /// A source queue this long wakes a windowing writer anyway: its batch
    /// is full (`batch_max_records`).
    pub(crate) full_batch: usize,
    pub(crate) notify: Notify,
    pub(crate) stats: WriteStats,
    /// The log's end as of the last commit that returned: what a reader of
    /// the log may stream up to.
    pub(crate) log_end: AtomicU64,
    pub(crate) on_log_end: OnceLock<OnLogEnd>,
    pub(crate) on_commit: OnceLock<OnCommit>,
    /// Why the store cannot write now (the last failure), for `/readyz`.
    pub(crate) problem: std::sync::Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn new(
        sources: usize,
        capacity: usize,
        full_batch: usize,
        notify: Notify,
        log_end: u64,
    ) -> Shared {
        assert!(sources > 0 && capacity > 0);
        let sources = (0..sources)
            .map(|_| SourceQueues {
                submit: ArrayQueue::new(capacity),
                done: ArrayQueue::new(capacity),
                in_flight: AtomicUsize::new(0),
                entering: AtomicUsize::new(0),
            })
            .collect();
        Shared {
            sources,
            capacity,
            closed: AtomicBool::new(false),
            writer_thread: OnceLock::new(),
            windowing: AtomicBool::new(false),
            full_batch: full_batch.max(1),
            notify,
            stats: WriteStats::default(),
            log_end: AtomicU64::new(log_end),
            on_log_end: OnceLock::new(),
            on_commit: OnceLock::new(),
            problem: std::sync::Mutex::new(None),
        }
    }

    /// Called by the writer once a commit that logged records up to
    /// `log_end` has returned (is durable).
    pub(crate) fn publish_log_end(&self, log_end: u64) {
        let before = self.log_end.swap(log_end, Ordering::Release);
        assert!(log_end > before, "the log's end went from {before} to {log_end}");
        if let Some(f) = self.on_log_end.get() {
            f(log_end);
        }
    }

    fn source(&self, source: usize) -> &SourceQueues {
        match self.sources.get(source) {
            Some(s) => s,
            None => panic!("storage source {source} out of range (sources = {})", self.sources.len()),
        }
    }

    /// No submitter is mid-submit and every submit queue is empty: after
    /// `closed` is set, nothing more can arrive.
    pub(crate) fn quiescent(&self) -> bool {
        self.sources.iter().all(|s| s.entering.load(Ordering::SeqCst) == 0 && s.submit.is_empty())
    }
}

/// Submits writes to the group commit. Cheap to clone; `Send` and `Sync`,
/// so every shard can hold one.
#[derive(Clone)]
pub struct Writer {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("sources", &self.shared.sources.len()).finish()
    }
}

impl Writer {
    /// Queues `op` for the next group commit. Its [`Completion`], carrying
    /// `token`, will appear in `source`'s completion queue once the commit
    /// holding it is durable (or failed), and then `notify(source)` is
    /// called. Never blocks.
    ///
    /// # Panics
    /// If `source >= sources`: that is a wiring bug, not a runtime condition.
    // The refused op comes back by value: no allocation and no clone on the
    // back-pressure path, which is the point of returning it.
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, source: usize, token: u64, op: WriteOp) -> Result<(), SubmitError> {
        let shared = &*self.shared;
        let q = shared.source(source);
        q.entering.fetch_add(1, Ordering::SeqCst);
        let result = if shared.closed.load(Ordering::SeqCst) {
            Err(SubmitError::Closed(op))
        } else if q.in_flight.fetch_add(1, Ordering::AcqRel) >= shared.capacity {
            q.in_flight.fetch_sub(1, Ordering::AcqRel);
            shared.stats.full.fetch_add(1, Ordering::Relaxed);
            Err(SubmitError::Full(op))
        } else {
            match q.submit.push(Submission { token, op }) {
                Ok(()) => Ok(()),
                Err(s) => {
                    // Unreachable while in_flight bounds the queue; refuse
                    // rather than trust it.
                    q.in_flight.fetch_sub(1, Ordering::AcqRel);
                    Err(SubmitError::Full(s.op))
                }
            }
        };
        q.entering.fetch_sub(1, Ordering::SeqCst);
        // Pairs with the writer's fence after it stops windowing: either it
        // sees this write when it next takes, or this sees it not windowing.
        std::sync::atomic::fence(Ordering::SeqCst);
        if result.is_ok()
            && (!shared.windowing.load(Ordering::SeqCst) || q.submit.len() >= shared.full_batch)
            && let Some(t) = shared.writer_thread.get()
        {
            // An atomic swap when the writer is awake; a futex wake when it
            // is parked.
            t.unpark();
        }
        result
    }

    /// The number of sources.
    pub fn sources(&self) -> usize {
        self.shared.sources.len()
    }

    /// Writes of `source` in flight: submitted, completion not yet popped.
    pub fn in_flight(&self, source: usize) -> usize {
        self.shared.source(source).in_flight.load(Ordering::Acquire)
    }

    /// The per-source in-flight limit (`submit_queue_capacity`).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

/// One source's completion queue. Cheap to clone and `Send`, so the shard
/// that owns the source can keep it.
#[derive(Clone)]
pub struct Completions {
    pub(crate) shared: Arc<Shared>,
    pub(crate) source: usize,
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completions").field("source", &self.source).field("len", &self.len()).finish()
    }
}

impl Completions {
    /// The next completion, if any. Popping frees one in-flight slot.
    pub fn pop(&self) -> Option<Completion> {
        let q = self.shared.source(self.source);
        let c = q.done.pop()?;
        let before = q.in_flight.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "in_flight underflow on source {}", self.source);
        Some(c)
    }

    /// Completions waiting to be popped.
    pub fn len(&self) -> usize {
        self.shared.source(self.source).done.len()
    }

    /// Whether none are waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which source this is.
    pub fn source(&self) -> usize {
        self.source
    }
}
