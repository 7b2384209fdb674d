//! The write-ahead log in front of redb (`dir/kefu.wal` and
//! `dir/kefu.1.wal`).
//!
//! # Why
//!
//! A durable redb commit costs two fsyncs with quick-repair, and
//! quick-repair's save of the allocator state: ~1,600 heap allocations and
//! half of the writer's CPU per commit at 5,000 msg/s, and an ack latency
//! that grows with the file (BENCHMARKS.md, issue 11). With the log, a
//! group commit appends what it changed ([`redo`](crate::redo)) to this
//! file and fsyncs it once, then commits to redb with `Durability::None`
//! (in memory: readers see it, a crash takes it back), and only then acks.
//! This departs from DESIGN.md, whose writer commits every group with
//! `Durability::Immediate`: an ack still waits for an fsync (the log's),
//! and `storage.wal = false` is the design's path exactly.
//! Every `checkpoint_ms`, after the group commit whose acks just went
//! out, the writer commits nothing but the checkpoint durably in redb,
//! quick-repair and all (written behind the writer by default,
//! `behind.rs`), and the log starts its next cycle; when a record does not
//! fit in what is left of the file, its own commit is the durable one.
//!
//! # Layout
//!
//! Two files of `wal_bytes` each, filled with zeros once when made (so
//! that an append overwrites allocated blocks, and its fsync has no file
//! size or extent to journal), then reused: `kefu.wal` holds the even
//! cycles (below), `kefu.1.wal` the odd ones. A cycle's records follow each
//! other from its file's offset 0:
//!
//! | bytes | what |
//! | --- | --- |
//! | 4 | payload length, little-endian |
//! | 4 | CRC-32 of the store's number, the cycle number and the payload (8, 8 and n bytes) |
//! | 8 | cycle number, little-endian |
//! | n | payload: the commit's [`Op`](crate::redo::Op)s |
//!
//! # Cycles
//!
//! Each run of the log between two checkpoints is a cycle, numbered from
//! 1; a number is used again only for a cycle none of whose records was
//! ever fsynced (below). redb's `meta` holds `wal_cycle`: every cycle up to it
//! is in redb's durable state. The writer appends records of cycle
//! `wal_cycle + 1` and up; a checkpoint commit sets `wal_cycle` to the
//! current cycle, and the next cycle starts at offset 0 of the other file,
//! over the records of the cycle before the last, whose number now says
//! they are stale.
//!
//! Why two files: a checkpoint written behind the writer (`behind.rs`) is
//! not durable when its commit returns, and until it is, the records of
//! the cycle it closed are the only durable copy of what they hold. The
//! writer goes on with the next cycle in the other file meanwhile, and
//! starts the cycle after that (back in the first file, over the closed
//! one) only once that checkpoint is on the disk, waiting for it if it is
//! not (`kefu_storage_checkpoint_waits_total`). So at most two cycles are
//! past redb's durable `wal_cycle`, one in each file.
//!
//! Open (and the writer after a failure) reads the records of cycle
//! `wal_cycle + 1` from its file's offset 0 and stops at the first that is
//! not one: a torn or unwritten record fails its checksum, an old one has
//! an older number. If there were any, it reads the next cycle from the
//! other file the same way, and so on. It replays them all into one
//! durable commit that also sets `wal_cycle` to the last cycle that had
//! records, so the next cycle is one past it whatever the files still
//! hold. A cycle with no records had none fsynced (each record is fsynced
//! before the next is written), so the writer appends that same cycle from
//! its file's offset 0, and if it was the first, no commit is needed: a
//! reopen on a full disk gives readers their database back at once. A
//! replay may repeat what redb already has: the writer's recovery replays
//! onto the live database, which holds every record but a failed one;
//! replay may repeat (see `redo`).
//!
//! A store written by a build with one log file kept every cycle in
//! `kefu.wal`: an odd cycle with no records in `kefu.1.wal` is looked for
//! there too (this build never writes an odd cycle to it).
//!
//! # What an ack means
//!
//! A write is acked after its record's fsync returned and its redb commit
//! (non-durable) returned, or after its durable redb commit returned (a
//! record the log had no room for). Either way a crash or a power cut keeps it
//! (`durability.rs` runs every proof with the log on and off). A commit
//! whose append or fsync failed, or whose redb commit failed after the
//! append, is answered with the error; the writer then replays the log
//! into a durable commit before it takes writes again, so a record that
//! did reach the disk is stored, as a failed redb commit that reached the
//! disk always was (`reopen.rs`).

use redb::StorageBackend;

use crate::error::{IoContext, StorageError};
use crate::redo::{Tables, replay_record};
use crate::tables;

/// Bytes before a record's payload.
pub(crate) const HEADER: usize = 16;

/// The log file and where the next record goes.
pub(crate) struct Wal {
    /// Even cycles go to the first file, odd ones to the second.
    files: [Box<dyn StorageBackend>; 2],
    /// Bytes the writer uses of each file (a file may be longer, made by
    /// a larger `wal_bytes`; a replay reads all of it).
    capacity: u64,
    /// Where the next record starts.
    position: u64,
    /// The cycle being appended.
    cycle: u64,
    /// This store's own number (its dedupe key's first half, random at
    /// creation), in every checksum: a log left over from another store
    /// in the same directory reads as no records.
    store: u64,
    /// Reused for reading records back.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("capacity", &self.capacity)
            .field("position", &self.position)
            .field("cycle", &self.cycle)
            .finish_non_exhaustive()
    }
}

fn checksum(store: u64, cycle: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&store.to_le_bytes());
    h.update(&cycle.to_le_bytes());
    h.update(payload);
    h.finalize()
}

impl Wal {
    /// Takes the log's two files, growing each with zeros to `capacity`
    /// (and fsyncing that) if it is shorter and `grow`. The store's number
    /// and the cycle are set by [`replay`].
    pub(crate) fn open(
        files: [Box<dyn StorageBackend>; 2],
        capacity: u64,
        grow: bool,
    ) -> Result<Wal, StorageError> {
        for file in &files {
            let len = file.len().ctx("wal length")?;
            if grow && len < capacity {
                let zeros = vec![0u8; 1 << 20];
                let mut at = len;
                while at < capacity {
                    let n = (capacity - at).min(zeros.len() as u64);
                    file.write(at, &zeros[..n as usize]).ctx("wal fill")?;
                    at += n;
                }
                file.sync_data().ctx("wal fsync")?;
            }
        }
        Ok(Wal { files, capacity, position: 0, cycle: 0, store: 0, scratch: Vec::new() })
    }

    /// The file of `cycle`'s records.
    fn file(&self, cycle: u64) -> &dyn StorageBackend {
        &*self.files[(cycle % 2) as usize]
    }

    /// The cycle being appended.
    pub(crate) fn cycle(&self) -> u64 {
        self.cycle
    }

    /// Starts cycle `cycle` at the beginning of its file, over the
    /// records of the cycle before the last: the caller has made sure
    /// the checkpoint that closed that one is on the disk.
    pub(crate) fn restart(&mut self, cycle: u64) {
        self.cycle = cycle;
        self.position = 0;
    }

    /// Makes `buf` an empty record: room for the header, no ops.
    pub(crate) fn begin(buf: &mut Vec<u8>) {
        buf.clear();
        buf.resize(HEADER, 0);
    }

    /// Whether a record of `len` bytes (header included) fits after the
    /// ones already in this cycle.
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.position + len as u64 <= self.capacity
    }

    /// Fills in `record`'s header, writes it at the end of the cycle and
    /// fsyncs the file. On an error the end of the cycle is unknown: the
    /// writer replays and starts a new cycle before it appends again.
    pub(crate) fn append(&mut self, record: &mut [u8]) -> Result<(), StorageError> {
        debug_assert!(record.len() >= HEADER && self.fits(record.len()));
        let (header, payload) = record.split_at_mut(HEADER);
        let len = u32::try_from(payload.len())
            .map_err(|_| StorageError::Io { context: "wal append", message: "record over 4 GiB".into() })?;
        header[0..4].copy_from_slice(&len.to_le_bytes());
        header[4..8].copy_from_slice(&checksum(self.store, self.cycle, payload).to_le_bytes());
        header[8..16].copy_from_slice(&self.cycle.to_le_bytes());
        let file = self.file(self.cycle);
        file.write(self.position, record).ctx("wal write")?;
        file.sync_data().ctx("wal fsync")?;
        self.position += record.len() as u64;
        Ok(())
    }

    /// Calls `each` with the payload of every record of `cycle`, in order,
    /// from its file's beginning to the first record that is not one of
    /// them. Returns how many. An odd cycle with none in the second file
    /// is looked for in the first: a store a build with one log file
    /// wrote kept every cycle there (and this build never writes an odd
    /// one there).
    pub(crate) fn read(
        &mut self,
        cycle: u64,
        mut each: impl FnMut(&[u8]) -> Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        let records = self.read_file((cycle % 2) as usize, cycle, &mut each)?;
        if records == 0 && cycle % 2 == 1 {
            return self.read_file(0, cycle, &mut each);
        }
        Ok(records)
    }

    fn read_file(
        &mut self,
        index: usize,
        cycle: u64,
        each: &mut impl FnMut(&[u8]) -> Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        let file = &*self.files[index];
        let len = file.len().ctx("wal length")?;
        let mut at = 0u64;
        let mut records = 0;
        let mut header = [0u8; HEADER];
        while at + HEADER as u64 <= len {
            file.read(at, &mut header).ctx("wal read")?;
            let size = u64::from(u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")));
            let sum = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let number = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            if number != cycle || at + HEADER as u64 + size > len {
                break;
            }
            self.scratch.resize(size as usize, 0);
            file.read(at + HEADER as u64, &mut self.scratch).ctx("wal read")?;
            if checksum(self.store, number, &self.scratch) != sum {
                break;
            }
            each(&self.scratch)?;
            records += 1;
            at += HEADER as u64 + size;
        }
        Ok(records)
    }
}

/// What [`replay`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replayed {
    /// Records (group commits) replayed.
    pub(crate) records: u64,
    /// The cycle the writer appends next.
    pub(crate) next_cycle: u64,
}

/// Replays the log's records past redb's last checkpoint into `t` (a
/// transaction the caller commits durably if any were replayed), marks
/// their cycles checkpointed, and starts the log's next cycle (the same
/// one, from its start, if it held none).
///
/// Past the last durable checkpoint there may be two cycles: the one a
/// checkpoint written behind the writer closed before it reached the disk,
/// and the one after it (`behind.rs`). They are replayed in order, each
/// from its own file, up to the first cycle with no records.
pub(crate) fn replay(t: &mut Tables<'_>, wal: &mut Wal) -> Result<Replayed, StorageError> {
    wal.store = t.meta(tables::META_DEDUPE_K0)?.ok_or_else(|| StorageError::Corrupt {
        table: "meta",
        key: tables::META_DEDUPE_K0.into(),
        message: "the dedupe key is missing".into(),
    })?;
    let done = t.meta(tables::META_WAL_CYCLE)?.unwrap_or(0);
    let mut cycle = done + 1;
    let mut records = 0;
    loop {
        let n = wal.read(cycle, |payload| {
            replay_record(t, payload).map(|_| ()).map_err(|message| StorageError::Corrupt {
                table: "wal",
                key: format!("cycle {cycle}"),
                message,
            })
        })?;
        if n == 0 {
            break;
        }
        records += n;
        cycle += 1;
    }
    // `cycle` held no records: none of it was ever fsynced (each record
    // is fsynced before the next is written), so it starts over.
    wal.restart(cycle);
    if records > 0 {
        t.put_meta_unrecorded(tables::META_WAL_CYCLE, cycle - 1)?;
        tracing::info!(
            records,
            cycles = cycle - done - 1,
            last_cycle = cycle - 1,
            "storage replayed its write-ahead log"
        );
    }
    Ok(Replayed { records, next_cycle: cycle })
}
