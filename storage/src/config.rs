//! `[storage]`: where the log lives and how group commit batches.
//!
//! Every field has a default (below, and in [`StoreConfig::default`]), so an
//! empty `[storage]` table is a working configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;

/// The storage configuration, embeddable as the gateway's `[storage]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the database file `kefu.redb`; created if missing.
    /// Default `data`.
    pub dir: PathBuf,
    /// Most writes in one group commit. Default 16384 (see BENCHMARKS.md:
    /// bigger batches amortize the index pages each commit rewrites).
    pub batch_max_records: usize,
    /// Most bytes (records' approximate encoded size) in one group commit;
    /// a single larger write still commits, alone. Default 16 MiB.
    pub batch_max_bytes: usize,
    /// How long a batch stays open for more writes after its first one, in
    /// microseconds, unless a limit above closes it first. 0 commits as soon
    /// as the submit queues are empty: under load batches still grow by
    /// themselves, because writes queue up while the previous commit's fsync
    /// runs. With the write-ahead log that fsync is short, and at 5,000
    /// msg/s batches stay at about one write: each commit then costs redb's
    /// ~150 allocations and its CPU for one message. 500 µs gathers ~4
    /// writes per commit at that rate: 43 allocations per relayed message
    /// instead of 146, and 28% less server CPU per message at 15,000
    /// sessions, for about 0.5 ms more at p50 (BENCHMARKS.md, issue 11).
    /// Writes do not wake the writer while a window is open (unless one
    /// source's queue fills a batch): a batch that reaches the byte limit
    /// closes when the window ends. After a commit the writer waits one
    /// window for more before it sleeps until the next write. Default 500.
    pub batch_window_us: u64,
    /// Writes a source may have in flight (submitted, completion not yet
    /// popped); `submit` says `Full` beyond it. This bounds both the submit
    /// queue and the completion queue of each source. Default 8192.
    pub submit_queue_capacity: usize,
    /// Number of sources: one per shard, plus one per other submitting
    /// thread (the gRPC bridge). Each has its own submit and completion
    /// queue. Default 1.
    pub sources: usize,
    /// redb's page cache, in bytes of pages. It takes every page a commit
    /// writes as well as the pages read, so it fills as the log grows and
    /// then evicts. The heap it costs is larger by the allocator's
    /// rounding: redb holds a 4 KiB page with a 16-byte header, which the
    /// gateway's mimalloc serves from a 5 KiB size class (1.25×; see
    /// BENCHMARKS.md, issue 11). Default 256 MiB.
    pub cache_bytes: usize,
    /// redb quick-repair: every commit also saves the allocator state (with
    /// a two-phase commit), so that opening after a crash needs no walk of
    /// the whole file (1M messages: ~17 ms instead of ~0.5 s, and the walk
    /// grows with the file). Costs a second fsync per commit: ~0.2 ms of
    /// ack latency at low rates, about half the delivery p50 at 15,000
    /// sessions and 5,000 msg/s (1.6–2.5 ms against 0.9–1.0 ms off); see
    /// the crate docs and BENCHMARKS.md. Default true.
    pub quick_repair: bool,
    /// Write-ahead log (`dir/kefu.wal`) in front of redb. A group commit
    /// then appends its changes to this file and fsyncs it once, commits
    /// to redb without a fsync (`Durability::None`: readers see it, a
    /// crash takes it back), and acks; every `checkpoint_ms` a commit of
    /// nothing else makes it all durable in redb (with quick-repair) and
    /// the log starts over. After
    /// a crash, open replays what the log holds past the last checkpoint.
    /// One fsync per commit instead of two, and none of quick-repair's
    /// allocator saves between checkpoints (see `wal.rs` and
    /// BENCHMARKS.md). false: every commit is durable in redb, as before.
    /// Default true.
    pub wal: bool,
    /// Size of the write-ahead log file, made once and reused: a
    /// checkpoint comes early when the next commit would not fit, and a
    /// commit larger than the whole file is written straight to redb.
    /// Open replays at most this much: after a kill -9 of a writer at
    /// full speed, a full 16 MiB log took 595 ms to replay, 4 MiB keeps a
    /// restart well inside its second. Default 4 MiB (over two seconds of
    /// 5,000 msg/s; a checkpoint comes every 100 ms).
    pub wal_bytes: u64,
    /// Longest time between two durable redb commits while the
    /// write-ahead log is on, in milliseconds: what open may have to
    /// replay after a crash, and how often a commit pays redb's fsyncs and
    /// quick-repair's allocator save. A checkpoint writes every page the
    /// commits since the last one changed (about one index page per
    /// conversation that got a message); written inline it held the acks
    /// queued behind it, so a long interval made rare long stalls: at
    /// 15,000 sessions and 5,000 msg/s the delivery p99 was 9.7 ms at 100,
    /// 14 ms at 250, 19–22 ms at 1000 and 49 ms at 5000 (BENCHMARKS.md,
    /// issue 11; see `checkpoint_in_background`). Default 100.
    pub checkpoint_ms: u64,
    /// Write a checkpoint's pages and fsyncs behind the writer, on a
    /// thread of their own (`behind.rs`): the writer goes on committing
    /// (through the log) while they reach the disk, where it used to stop
    /// for them (~8 ms every 100 ms at 15,000 sessions once the file has
    /// grown). The log alternates between two files (`kefu.wal`,
    /// `kefu.1.wal`) so that a cycle's records stay until the checkpoint
    /// that closed it is on the disk. false: the writer waits for each
    /// checkpoint, as before. Default true.
    pub checkpoint_in_background: bool,
    /// Dedupe slots (one per message) each dedupe cache holds in memory:
    /// the writer's, and each reader's (the gateway has one per shard, for
    /// the conversations homed there). A cache keeps, per conversation it
    /// has seen, the slot and offset of each message and its last seq, so
    /// checking a cid and a seq reads no index. Past this bound the
    /// conversations touched longest ago are dropped, down to three
    /// quarters of it, and one scan of its index loads a conversation again
    /// if it comes back; the writer also drops a conversation when it is
    /// closed. A cache holds at most the last `dedupe_window` slots of a
    /// conversation, and loads no more than those, so a conversation that
    /// comes back costs one short read however long its history.
    /// About 11 bytes each (a 16-bit slot and an offset in the
    /// conversation's ring, and the conversation's own entry shared by its
    /// slots; `dedupe::tests::a_full_window_costs_at_most_12_bytes_a_slot`).
    /// Default 2097152 (at most ~24 MiB per cache). The writer's one cache
    /// holds every shard's conversations: 15,000 open conversations with
    /// full 128-slot windows are 1.92M slots, and below that the writer
    /// reloaded a window from the index for most messages (a ten-minute run
    /// at 15,000 sessions: the writer's CPU +75%, p99 11–12 ms in its last
    /// minutes against 10–10.5 with room for all; BENCHMARKS.md, issue 11,
    /// "memory per session under 4 KB").
    pub conv_cache_entries: usize,
    /// The cid window: a `send` that repeats the cid of one of its
    /// conversation's last this-many messages (by the same sender) is
    /// answered with the first `ack` and stored once; an older one is a new
    /// message. Without a window every append had to know a conversation's
    /// whole history, and once the caches could not hold it all, each
    /// append reloaded its conversation's whole index (a 30-minute soak at
    /// 2,000 msg/s over 2,000 conversations slowed to seconds per message;
    /// BENCHMARKS.md, issue 11). A client resends only what it has not had
    /// an `ack` for, and that is among its conversation's newest messages.
    /// Default 128 (the home's in-memory window, `messages.recent_cids`,
    /// is 128 too).
    pub dedupe_window: usize,
    /// A conversation's newest index entries wait in memory
    /// (`tail.rs`) and go to the table together once this many have
    /// gathered, so one index page write serves them all: the table is
    /// keyed by conversation, and at 15,000 open conversations a message
    /// written at once dirtied an index page no other message of its
    /// commit shared, which every checkpoint wrote again (BENCHMARKS.md,
    /// issue 11, "the index's tail"), and they go in as one row
    /// (`runs.rs`: ~4 bytes an entry on disk, where an entry of its own
    /// costs ~30). 1: every entry goes in with its message, a row of its
    /// own. Default 32.
    pub index_batch: usize,
    /// The longest a waiting entry stays out of the index table, in log
    /// records: a conversation's tail whose oldest entry is this far
    /// behind the log's end goes to the table at the next commit. Bounds
    /// the tails' memory (24 bytes an entry, and ~100 per conversation
    /// that has one) and what open reads of the log to rebuild them after
    /// a crash. Default 100000 (20 s of 5,000 msg/s).
    pub index_lag: u64,
    /// How many senders the writer remembers the last full record of, so
    /// that their next messages point back at it instead of naming them
    /// again (`senders.rs`: ~49 of a soak's ~225 bytes per message were
    /// the sender's id and name). About 50 bytes each; when full it
    /// forgets those named beyond `sender_ref_reach`, or all if that frees
    /// less than a quarter (each is then named in full once more). 0: every
    /// message names its sender. Default 65536.
    pub sender_refs: usize,
    /// How far back in the log, in records, a message may point for its
    /// sender: further, it names them in full again, so that a message
    /// and the record holding its sender stay near each other, and a
    /// damaged record takes out the senders of this many records at most.
    /// At least 1. Default 100000 (20 s at 5,000 msg/s; an active sender
    /// costs a full record that often).
    pub sender_ref_reach: u64,
    /// How long the idle writer sleeps before looking at the queues again,
    /// in milliseconds. A submit wakes it at once; this is only a safety
    /// net. Default 100.
    pub idle_park_ms: u64,
    /// After a failed group commit (a full disk, a failed fsync) the writer
    /// answers its writes `unavailable` and tries to write again, reopening
    /// the database if it must: first after this many milliseconds, then
    /// twice as long each time. Default 50.
    pub recovery_backoff_ms_min: u64,
    /// The longest wait between two such tries, in milliseconds: the
    /// writer retries for as long as it takes, at least this often, so it
    /// serves again this long at most after the disk has room. Default
    /// 2000.
    pub recovery_backoff_ms_max: u64,
    /// A group commit (or a checkpoint's part in the writer) that takes
    /// this long or longer is logged as a warning, with how much of it
    /// was fsync: every message in it, and every one queued behind it,
    /// waited that long for its ack and its delivery, and a slow disk is
    /// the usual cause (one fsync of 250–500 ms was the longest delivery
    /// of a 30-minute soak, BENCHMARKS.md). One line per 10 s at most,
    /// with a count of the ones not logged. 0: never. Default 100.
    pub slow_commit_log_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: PathBuf::from("data"),
            batch_max_records: 16384,
            batch_max_bytes: 16 << 20,
            batch_window_us: 500,
            submit_queue_capacity: 8192,
            sources: 1,
            cache_bytes: 256 << 20,
            quick_repair: true,
            wal: true,
            wal_bytes: 4 << 20,
            checkpoint_ms: 100,
            checkpoint_in_background: true,
            conv_cache_entries: 1 << 21,
            dedupe_window: 128,
            index_batch: 32,
            index_lag: 100_000,
            sender_refs: 1 << 16,
            sender_ref_reach: 100_000,
            idle_park_ms: 100,
            recovery_backoff_ms_min: 50,
            recovery_backoff_ms_max: 2_000,
            slow_commit_log_ms: 100,
        }
    }
}

impl StoreConfig {
    /// The database file inside `dir`.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("kefu.redb")
    }

    /// The write-ahead log's first file inside `dir`, of its even cycles.
    pub fn wal_path(&self) -> PathBuf {
        self.dir.join("kefu.wal")
    }

    /// The write-ahead log's second file, of its odd cycles (`wal.rs`).
    pub fn wal_odd_path(&self) -> PathBuf {
        self.dir.join("kefu.1.wal")
    }

    /// Checks the limits are usable.
    pub fn validate(&self) -> Result<(), StorageError> {
        let positive = [
            ("batch_max_records", self.batch_max_records),
            ("batch_max_bytes", self.batch_max_bytes),
            ("submit_queue_capacity", self.submit_queue_capacity),
            ("sources", self.sources),
            ("conv_cache_entries", self.conv_cache_entries),
            ("dedupe_window", self.dedupe_window),
            ("index_batch", self.index_batch),
            ("index_lag", self.index_lag as usize),
            ("sender_ref_reach", self.sender_ref_reach.min(usize::MAX as u64) as usize),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(StorageError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.sources > 1024 {
            return Err(StorageError::Config(format!("sources = {} (at most 1024)", self.sources)));
        }
        if self.batch_window_us > 1_000_000 {
            return Err(StorageError::Config(format!(
                "batch_window_us = {} (at most 1 s: it is added to every ack's latency)",
                self.batch_window_us
            )));
        }
        if self.recovery_backoff_ms_min == 0 || self.recovery_backoff_ms_min > self.recovery_backoff_ms_max {
            return Err(StorageError::Config(
                "recovery_backoff_ms_min must be between 1 and recovery_backoff_ms_max".into(),
            ));
        }
        if self.slow_commit_log_ms > 600_000 {
            return Err(StorageError::Config(format!(
                "slow_commit_log_ms = {} (0 for never, or at most 600000)",
                self.slow_commit_log_ms
            )));
        }
        if self.recovery_backoff_ms_max > 60_000 {
            return Err(StorageError::Config("recovery_backoff_ms_max must be at most 60000".into()));
        }
        if self.dedupe_window > 1 << 20 {
            return Err(StorageError::Config(format!(
                "dedupe_window = {} (at most 1048576 messages per conversation)",
                self.dedupe_window
            )));
        }
        if self.index_batch > 1 << 16 {
            return Err(StorageError::Config(format!(
                "index_batch = {} (at most 65536 entries per conversation)",
                self.index_batch
            )));
        }
        if self.sender_refs > 1 << 24 {
            return Err(StorageError::Config(format!(
                "sender_refs = {} (at most 16777216 senders, ~840 MB)",
                self.sender_refs
            )));
        }
        if self.index_lag > 100_000_000 {
            return Err(StorageError::Config(format!(
                "index_lag = {} (at most 100000000 records: open reads that many after a crash)",
                self.index_lag
            )));
        }
        if self.wal_bytes < 1 << 16 || self.wal_bytes > 1 << 34 {
            return Err(StorageError::Config(format!(
                "wal_bytes = {} (between 64 KiB and 16 GiB)",
                self.wal_bytes
            )));
        }
        if self.checkpoint_ms == 0 || self.checkpoint_ms > 600_000 {
            return Err(StorageError::Config(format!(
                "checkpoint_ms = {} (between 1 and 600000)",
                self.checkpoint_ms
            )));
        }
        if self.idle_park_ms == 0 {
            return Err(StorageError::Config("idle_park_ms must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_is_the_default_and_fields_override() {
        let empty: StoreConfig = toml::from_str("").unwrap();
        assert_eq!(empty, StoreConfig::default());
        let c: StoreConfig =
            toml::from_str("dir = \"/var/lib/kefu\"\nbatch_window_us = 200\nsources = 4").unwrap();
        assert_eq!(c.dir, PathBuf::from("/var/lib/kefu"));
        assert_eq!(c.batch_window_us, 200);
        assert_eq!(c.sources, 4);
        assert_eq!(c.batch_max_records, 16384);
        assert!(toml::from_str::<StoreConfig>("batch_windw_us = 1").is_err(), "typos are refused");
    }

    #[test]
    fn unusable_limits_are_refused() {
        assert!(StoreConfig::default().validate().is_ok());
        for bad in [
            StoreConfig { sources: 0, ..Default::default() },
            StoreConfig { batch_max_records: 0, ..Default::default() },
            StoreConfig { submit_queue_capacity: 0, ..Default::default() },
            StoreConfig { batch_window_us: 5_000_000, ..Default::default() },
            StoreConfig { dedupe_window: 0, ..Default::default() },
            StoreConfig { dedupe_window: (1 << 20) + 1, ..Default::default() },
            StoreConfig { recovery_backoff_ms_min: 0, ..Default::default() },
            StoreConfig { wal_bytes: 4096, ..Default::default() },
            StoreConfig { checkpoint_ms: 0, ..Default::default() },
            StoreConfig { slow_commit_log_ms: 600_001, ..Default::default() },
            StoreConfig {
                recovery_backoff_ms_min: 5_000,
                recovery_backoff_ms_max: 100,
                ..Default::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(StorageError::Config(_))), "{bad:?}");
        }
    }
}
