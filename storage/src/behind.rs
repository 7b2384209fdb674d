//! The database file with its checkpoints written behind the writer.
//!
//! # Why
//!
//! With the write-ahead log, a checkpoint is a durable redb commit of
//! nothing new: redb writes every page the commits since the last one
//! changed (at 15,000 conversations about one index leaf per
//! message, ~870 pages per 100 ms), then fsyncs twice. That took the
//! writer ~8 ms at steady state, and every write that came meanwhile
//! waited for it: the 15,000-session p99 climbed from ~5 to ~10 ms over a
//! run as the checkpoints grew (BENCHMARKS.md, issue 11). Nothing waits
//! for a checkpoint's durability but the log's reuse, so this layer lets
//! the writer go on while its pages and fsyncs reach the file.
//!
//! # How
//!
//! [`WriteBehind`] sits between redb and the file ([`ProbeBackend`](crate::backend::ProbeBackend)
//! over it). While the writer has it *deferring* ([`Behind::defer`],
//! around a checkpoint's commit and nothing else), `write` copies the data
//! into a batch and `sync_data` closes the batch with an fsync and returns
//! at once; a thread of its own (`kefu-storage-flush`) performs the
//! batches in order, every write and fsync as redb asked for them, so the
//! file goes through the same states as if redb had made the calls itself,
//! only later. A write made while not deferring, with batches still
//! queued, is queued behind them; an fsync or a shrink made while not
//! deferring waits until the queue is on the file and then runs as
//! before: a durable commit that acks writes (the log off, a record the
//! log cannot take, a probe after a failure, the close) is on disk when
//! its commit returns, exactly as without this layer. With nothing queued
//! every call goes straight to the file.
//!
//! A read sees what is queued: it reads the file, then lays every queued
//! write over the range, oldest first. A batch leaves the queue only
//! after its writes are on the file, so a read never sees a page older
//! than the queue's.
//!
//! # What the writer must keep
//!
//! redb believes a deferred checkpoint durable when its commit returns;
//! it is durable when [`Behind::synced`] reaches the ticket the commit
//! left ([`Behind::ticket`]). Until then the log's records of the cycle
//! that checkpoint closed are the only durable copy of what they hold, so
//! the writer does not write over them: the log alternates between two
//! files by cycle (`wal.rs`), and a new cycle starts in the file of the
//! cycle before last only once the checkpoint that closed that cycle is
//! durable ([`Behind::wait_synced`]).
//!
//! An I/O error of the flush thread is kept and returned by every later
//! write, fsync and wait: the writer's next commit fails, and its recovery
//! opens the database again, which finds the file much as a crash at that
//! moment would have left it (the queued calls after the failed one never
//! ran); the log still holds the cycles whose checkpoints did not land.
//! Not quite: after an fsync that failed, its pages may still sit in the
//! page cache and be read back as if they had landed. That is as true of
//! a checkpoint written inline; quick-repair's two fsyncs (the default)
//! keep the header that names `wal_cycle` behind the pages' fsync.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::ops::{Bound, Range};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use redb::{BackendError, StorageBackend};

/// One call redb made, in a batch.
#[derive(Debug, Clone)]
enum Call {
    /// `data[range]` of the batch, at `offset` of the file.
    Write {
        offset: u64,
        range: Range<usize>,
    },
    Sync,
}

/// A batch's buffer kept for the next one only up to this capacity: a
/// checkpoint's pages at 15,000 sessions are ~3.5 MB, which would
/// otherwise stay resident between checkpoints.
const SPARE_BYTES_MAX: usize = 1 << 20;

/// Batches kept for reuse: a checkpoint makes two (pages, then header).
const SPARES_MAX: usize = 2;

/// The smallest mapping a batch's bytes get, and the unit they grow by.
const MAP_MIN: usize = 64 << 10;

/// A batch's bytes, in memory mapped for them alone and unmapped when the
/// batch is done with. From the heap, a checkpoint's few megabytes (and
/// the smaller buffers its growth left behind) stayed with the allocator
/// after each flush: 150–400 B more resident memory per session at 15,000
/// (BENCHMARKS.md, issue 11), where the kernel takes a mapping back at
/// once. Not a heap allocation either, so the allocations per message
/// stay as they were.
struct Bytes {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

// SAFETY: `Bytes` owns its mapping outright, like a `Vec<u8>`: it is
// written only through `&mut self` (a batch being filled, under the state's
// lock) and read through `&self` once the batch is shared, never both.
unsafe impl Send for Bytes {}
// SAFETY: as above; `&Bytes` gives only reads.
unsafe impl Sync for Bytes {}

impl Default for Bytes {
    fn default() -> Bytes {
        Bytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 }
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bytes").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

impl Bytes {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.cap
    }

    fn as_slice(&self) -> &[u8] {
        if self.cap == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `cap` bytes, of which the first `len` were
        // written by `extend`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `data`, growing the mapping (moved by the kernel if need be).
    fn extend(&mut self, data: &[u8]) -> io::Result<()> {
        let need = self.len + data.len();
        if need > self.cap {
            let cap = need.next_power_of_two().max(MAP_MIN);
            let ptr = if self.cap == 0 {
                // SAFETY: a fresh private anonymous mapping; no memory of
                // ours is touched.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        cap,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                }
            } else {
                // SAFETY: `ptr` is our own mapping of `cap` bytes, with no
                // reference into it alive (`&mut self`); the kernel moves it
                // whole, contents included.
                unsafe { libc::mremap(self.ptr.cast(), self.cap, cap, libc::MREMAP_MAYMOVE) }
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            self.ptr = ptr.cast();
            self.cap = cap;
        }
        // SAFETY: `len + data.len() <= cap` bytes are mapped at `ptr`, and
        // `data` is not in our mapping (it is redb's page).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(self.len), data.len()) };
        self.len = need;
        Ok(())
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: our own mapping, unmapped once, with no reference into
            // it alive (`&mut self`).
            unsafe { libc::munmap(self.ptr.cast(), self.cap) };
        }
    }
}

/// Calls queued in order, with the bytes of their writes.
#[derive(Debug, Default)]
struct Batch {
    calls: Vec<Call>,
    data: Bytes,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    fn clear(&mut self) {
        self.calls.clear();
        self.data.clear();
    }

    fn syncs(&self) -> u64 {
        self.calls.iter().filter(|c| matches!(c, Call::Sync)).count() as u64
    }

    /// Lays this batch's writes that overlap `[offset, offset + out.len())`
    /// over `out`, in order; marks the bytes they cover in `covered`.
    fn lay_over(&self, offset: u64, out: &mut [u8], covered: &mut [bool]) {
        let end = offset + out.len() as u64;
        for call in &self.calls {
            let Call::Write { offset: at, range } = call else { continue };
            let (from, to) = ((*at).max(offset), (at + range.len() as u64).min(end));
            if from >= to {
                continue;
            }
            let src = range.start + (from - at) as usize;
            let dst = (from - offset) as usize;
            let n = (to - from) as usize;
            out[dst..dst + n].copy_from_slice(&self.data.as_slice()[src..src + n]);
            covered[dst..dst + n].fill(true);
        }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.calls.iter().any(|c| match c {
            Call::Write { offset: at, range } => *at < offset + len && offset < at + range.len() as u64,
            Call::Sync => false,
        })
    }
}

/// What the writer, redb's calls and the flush thread share.
#[derive(Debug, Default)]
struct State {
    /// Calls since the last fsync queued while deferring.
    open: Batch,
    /// Closed batches, oldest first; the front is being flushed.
    queued: VecDeque<Arc<Batch>>,
    /// Batches done with, for reuse (their buffers keep their capacity).
    spare: Vec<Batch>,
    deferring: bool,
    /// fsyncs queued, and of those done, since open.
    syncs_queued: u64,
    syncs_done: u64,
    /// The first error of the flush thread, for every call after it.
    failed: Option<(io::ErrorKind, String)>,
    /// The end of the furthest queued write: the file's length once the
    /// queue is flushed, if that is past its length now.
    queued_end: u64,
    /// A write made while not deferring is queued: a durable commit's, so
    /// the next fsync not deferred must wait for the queue.
    undeferred_queued: bool,
    stop: bool,
}

impl State {
    fn idle(&self) -> bool {
        self.open.is_empty() && self.queued.is_empty()
    }

    fn error(&self) -> Option<io::Error> {
        self.failed.as_ref().map(|(kind, message)| io::Error::new(*kind, format!("flush behind: {message}")))
    }

    /// Closes the open batch, if it holds anything, and queues it.
    fn close_open(&mut self) -> bool {
        if self.open.is_empty() {
            return false;
        }
        let fresh = self.spare.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.open, fresh);
        self.syncs_queued += batch.syncs();
        self.queued.push_back(Arc::new(batch));
        true
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a batch is queued, done, or the flush failed.
    changed: Condvar,
    /// Something is queued or open: a read must look at the queue. Set
    /// under the lock before a call is queued and cleared under it once
    /// nothing is, so a read that follows redb's own hand-off of a page
    /// (its write buffer emptied after the page was written here) sees it
    /// set.
    busy: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `busy` in step with the state, under its lock.
    fn mark(&self, s: &State) {
        self.busy.store(!s.idle(), Ordering::Release);
    }

    /// Waits until nothing is queued; the flush thread's error if it failed.
    fn drain(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.close_open() {
            self.changed.notify_all();
        }
        loop {
            if let Some(e) = s.error() {
                return Err(e);
            }
            if s.idle() {
                return Ok(());
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The writer's handle on a [`WriteBehind`]: deferral and tickets.
#[derive(Clone)]
pub(crate) struct Behind {
    shared: Arc<Shared>,
}

impl fmt::Debug for Behind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("Behind")
            .field("deferring", &s.deferring)
            .field("queued", &s.queued.len())
            .field("syncs_queued", &s.syncs_queued)
            .field("syncs_done", &s.syncs_done)
            .finish()
    }
}

impl Behind {
    /// Starts (true) or ends deferring writes and fsyncs. At the end,
    /// whatever was written since the last fsync is queued too.
    pub(crate) fn defer(&self, on: bool) {
        let mut s = self.shared.lock();
        s.deferring = on;
        if !on && s.close_open() {
            self.shared.changed.notify_all();
        }
    }

    /// The number of fsyncs queued so far: durable once [`Self::synced`]
    /// reaches it.
    pub(crate) fn ticket(&self) -> u64 {
        self.shared.lock().syncs_queued
    }

    /// Whether everything up to `ticket` is on the disk.
    pub(crate) fn synced(&self, ticket: u64) -> bool {
        self.shared.lock().syncs_done >= ticket
    }

    /// Waits until every fsync up to `ticket` returned; the flush thread's
    /// error if it failed first.
    pub(crate) fn wait_synced(&self, ticket: u64) -> io::Result<()> {
        let mut s = self.shared.lock();
        loop {
            if s.syncs_done >= ticket {
                return Ok(());
            }
            if let Some(e) = s.error() {
                return Err(e);
            }
            s = self.shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A [`StorageBackend`] whose writes and fsyncs can be deferred to a
/// thread of its own; see the module's documentation.
pub(crate) struct WriteBehind {
    inner: Arc<dyn StorageBackend>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehind").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl WriteBehind {
    /// Wraps `inner` and starts its flush thread.
    pub(crate) fn new(inner: Box<dyn StorageBackend>) -> io::Result<(WriteBehind, Behind)> {
        let inner: Arc<dyn StorageBackend> = Arc::from(inner);
        let shared = Arc::new(Shared::default());
        let thread = {
            let (inner, shared) = (inner.clone(), shared.clone());
            std::thread::Builder::new()
                .name("kefu-storage-flush".into())
                .spawn(move || flush(&*inner, &shared))?
        };
        let handle = Behind { shared: shared.clone() };
        Ok((WriteBehind { inner, shared, thread: Mutex::new(Some(thread)) }, handle))
    }

    /// Stops the flush thread once the queue is flushed (or failed).
    fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The flush thread: performs queued batches in order until stopped with
/// nothing queued, or until a call fails.
fn flush(inner: &dyn StorageBackend, shared: &Shared) {
    loop {
        let batch = {
            let mut s = shared.lock();
            loop {
                if s.failed.is_some() {
                    return;
                }
                if let Some(b) = s.queued.front() {
                    break b.clone();
                }
                if s.stop {
                    return;
                }
                s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut synced = 0;
        let mut result = Ok(());
        for call in &batch.calls {
            result = match call {
                Call::Write { offset, range } => inner.write(*offset, &batch.data.as_slice()[range.clone()]),
                Call::Sync => inner.sync_data().map(|()| synced += 1),
            };
            if result.is_err() {
                break;
            }
        }
        let mut s = shared.lock();
        match result {
            Ok(()) => {
                s.queued.pop_front();
                s.syncs_done += synced;
                if s.idle() {
                    s.queued_end = 0;
                    s.undeferred_queued = false;
                }
                shared.mark(&s);
                if let Ok(mut done) = Arc::try_unwrap(batch)
                    && done.data.capacity() <= SPARE_BYTES_MAX
                    && s.spare.len() < SPARES_MAX
                {
                    done.clear();
                    s.spare.push(done);
                }
            }
            Err(e) => {
                // The batch stays queued: reads keep seeing what redb wrote.
                s.syncs_done += synced;
                s.failed = Some((e.kind(), e.to_string()));
            }
        }
        shared.changed.notify_all();
    }
}

impl StorageBackend for WriteBehind {
    fn len(&self) -> Result<u64, io::Error> {
        let end = self.shared.lock().queued_end;
        Ok(self.inner.len()?.max(end))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        if !self.shared.busy.load(Ordering::Acquire) {
            return self.inner.read(offset, out);
        }
        // What is queued over the range, taken before the file is read: a
        // batch leaves the queue only once on the file, so the file holds
        // it or the overlay does.
        let (batches, open) = {
            let s = self.shared.lock();
            if s.idle() {
                drop(s);
                return self.inner.read(offset, out);
            }
            let len = out.len() as u64;
            let batches: Vec<Arc<Batch>> =
                s.queued.iter().filter(|b| b.overlaps(offset, len)).cloned().collect();
            let mut open = None;
            if s.open.overlaps(offset, len) {
                let mut bytes = vec![0u8; out.len()];
                let mut covered = vec![false; out.len()];
                s.open.lay_over(offset, &mut bytes, &mut covered);
                open = Some((bytes, covered));
            }
            (batches, open)
        };
        if batches.is_empty() && open.is_none() {
            return self.inner.read(offset, out);
        }
        let mut covered = vec![false; out.len()];
        let from_file = match self.inner.read(offset, out) {
            // Past the file's end (a write queued there): what the file has
            // of the range, the queue the rest.
            Err(e) => {
                let len = self.inner.len()?;
                let n = len.saturating_sub(offset).min(out.len() as u64) as usize;
                if n > 0 {
                    self.inner.read(offset, &mut out[..n])?;
                }
                covered[..n].fill(true);
                Err(e)
            }
            Ok(()) => Ok(()),
        };
        for b in &batches {
            b.lay_over(offset, out, &mut covered);
        }
        if let Some((bytes, open_covered)) = open {
            for (i, c) in open_covered.iter().enumerate() {
                if *c {
                    out[i] = bytes[i];
                    covered[i] = true;
                }
            }
        }
        // Past the file's end: fine if the file and the queue cover every
        // byte between them.
        match from_file {
            Err(_) if covered.iter().all(|c| *c) => Ok(()),
            other => other,
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        // Growth goes ahead of the queue: the writes queued land below the
        // new end either way, and redb fsyncs the new length (a `sync_data`,
        // queued after it when deferring) before a header can name it.
        // Without that fsync between them the order of unsynced calls is
        // the kernel's anyway. A shrink waits for the queue: a queued write
        // past the new end would grow the file again.
        let grows = {
            let s = self.shared.lock();
            if let Some(e) = s.error() {
                return Err(e);
            }
            len >= s.queued_end
        };
        if !(grows && len >= self.inner.len()?) {
            self.shared.drain()?;
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        // redb fsyncs outside a durable commit too: after growing the file,
        // to make its length durable before a header names it. With only a
        // checkpoint's calls queued (none of this commit's own writes),
        // that fsync goes ahead of them: an fsync never undoes an order,
        // it only makes durable sooner what the kernel may write back any
        // time, and the queue keeps its own fsyncs. Otherwise (a durable
        // commit's pages queued behind the checkpoint) it waits for all.
        let wait = {
            let mut s = self.shared.lock();
            if let Some(e) = s.error() {
                return Err(e);
            }
            if s.deferring {
                s.open.calls.push(Call::Sync);
                s.close_open();
                self.shared.mark(&s);
                self.shared.changed.notify_all();
                return Ok(());
            }
            s.undeferred_queued
        };
        if wait {
            self.shared.drain()?;
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.shared.lock();
        if let Some(e) = s.error() {
            return Err(e);
        }
        if !s.deferring && s.idle() {
            drop(s);
            return self.inner.write(offset, data);
        }
        // Behind what is queued, never around it: a page the queue still
        // writes may have been freed and taken again since. Not deferring
        // (redb writing pages out of its full cache while a checkpoint is
        // flushed), the write is queued on its own at once, so that no
        // later fsync of a durable commit has to wait for it to be closed.
        let start = s.open.data.len();
        s.open.data.extend(data)?;
        let range = start..s.open.data.len();
        s.open.calls.push(Call::Write { offset, range });
        s.queued_end = s.queued_end.max(offset + data.len() as u64);
        if !s.deferring {
            s.undeferred_queued = true;
            s.close_open();
            self.shared.changed.notify_all();
        }
        self.shared.mark(&s);
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        let drained = self.shared.drain();
        self.stop();
        let closed = self.inner.close();
        drained.and(closed)
    }

    crate::backend::forward_range_locks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Far longer than a call that does not wait should ever take.
    const PATIENCE_SHORT: Duration = Duration::from_secs(5);

    /// A file in memory whose writes can be held (and made to fail).
    #[derive(Debug, Default)]
    struct Memory {
        state: Mutex<MemoryState>,
        changed: Condvar,
    }

    #[derive(Debug, Default)]
    struct MemoryState {
        bytes: Vec<u8>,
        hold: bool,
        /// `hold` holds writes only.
        syncs_free: bool,
        fail: bool,
        syncs: u64,
    }

    #[derive(Debug)]
    struct File(Arc<Memory>);

    impl File {
        fn wait_unheld(&self) -> io::Result<MutexGuard<'_, MemoryState>> {
            let mut s = self.0.state.lock().unwrap();
            while s.hold {
                s = self.0.changed.wait(s).unwrap();
            }
            if s.fail {
                return Err(io::Error::other("disk gone"));
            }
            Ok(s)
        }
    }

    impl StorageBackend for File {
        fn len(&self) -> Result<u64, io::Error> {
            Ok(self.0.state.lock().unwrap().bytes.len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
            let s = self.0.state.lock().unwrap();
            let (from, to) = (offset as usize, offset as usize + out.len());
            if to > s.bytes.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            out.copy_from_slice(&s.bytes[from..to]);
            Ok(())
        }

        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.0.state.lock().unwrap().bytes.resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self) -> Result<(), io::Error> {
            if self.0.state.lock().unwrap().syncs_free {
                self.0.state.lock().unwrap().syncs += 1;
                return Ok(());
            }
            self.wait_unheld()?.syncs += 1;
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            let mut s = self.wait_unheld()?;
            let end = offset as usize + data.len();
            if s.bytes.len() < end {
                s.bytes.resize(end, 0);
            }
            s.bytes[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
    }

    fn setup() -> (Arc<Memory>, WriteBehind, Behind) {
        let memory = Arc::new(Memory::default());
        let (file, behind) = WriteBehind::new(Box::new(File(memory.clone()))).unwrap();
        (memory, file, behind)
    }

    fn hold(memory: &Memory, on: bool) {
        memory.state.lock().unwrap().hold = on;
        memory.changed.notify_all();
    }

    /// A checkpoint as redb makes it while deferred: `bytes` at offset 0,
    /// then an fsync.
    fn queue_checkpoint(file: &WriteBehind, behind: &Behind, bytes: &[u8]) {
        behind.defer(true);
        file.write(0, bytes).unwrap();
        file.sync_data().unwrap();
        behind.defer(false);
    }

    fn read(file: &WriteBehind, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        file.read(offset, &mut out).unwrap();
        out
    }

    #[test]
    fn deferred_calls_return_at_once_and_reads_see_them_before_the_file_does() {
        let (memory, file, behind) = setup();
        file.write(0, &[1; 8]).unwrap();
        hold(&memory, true);
        behind.defer(true);
        file.write(4, &[2; 8]).unwrap();
        file.sync_data().unwrap();
        file.write(6, &[3; 2]).unwrap();
        file.sync_data().unwrap();
        behind.defer(false);
        let ticket = behind.ticket();
        assert_eq!(ticket, 2);
        assert!(!behind.synced(ticket), "held at the file");
        // The file has the first write only; a read sees all three, in order,
        // and past the file's end.
        assert_eq!(memory.state.lock().unwrap().bytes, [1; 8]);
        assert_eq!(read(&file, 0, 12), [1, 1, 1, 1, 2, 2, 3, 3, 2, 2, 2, 2]);
        assert_eq!(file.len().unwrap(), 12);
        hold(&memory, false);
        behind.wait_synced(ticket).unwrap();
        assert_eq!(memory.state.lock().unwrap().bytes, [1, 1, 1, 1, 2, 2, 3, 3, 2, 2, 2, 2]);
        assert_eq!(memory.state.lock().unwrap().syncs, 2);
    }

    #[test]
    fn a_write_not_deferred_goes_behind_the_queue_and_an_fsync_waits_for_it() {
        let (memory, file, behind) = setup();
        hold(&memory, true);
        queue_checkpoint(&file, &behind, &[1; 4]);
        // Not deferring, with the queue held: queued behind it, not around.
        file.write(0, &[9; 2]).unwrap();
        assert_eq!(read(&file, 0, 4), [9, 9, 1, 1]);
        let returned = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                file.sync_data().unwrap();
                returned.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!returned.load(Ordering::SeqCst), "the fsync waits for the queue");
            hold(&memory, false);
        });
        assert!(returned.load(Ordering::SeqCst));
        assert_eq!(memory.state.lock().unwrap().bytes, [9, 9, 1, 1]);
        assert_eq!(memory.state.lock().unwrap().syncs, 2);
    }

    #[test]
    fn growth_and_its_fsync_go_ahead_of_a_queued_checkpoint() {
        let (memory, file, behind) = setup();
        {
            let mut s = memory.state.lock().unwrap();
            s.hold = true;
            s.syncs_free = true;
        }
        queue_checkpoint(&file, &behind, &[1; 4]);
        // redb growing the file in a commit that is not durable: its length
        // and its fsync do not wait for the held checkpoint.
        let started = Instant::now();
        file.set_len(4096).unwrap();
        file.sync_data().unwrap();
        assert!(started.elapsed() < PATIENCE_SHORT, "went ahead of the held write");
        assert_eq!(memory.state.lock().unwrap().bytes.len(), 4096);
        assert!(!behind.synced(behind.ticket()), "the checkpoint is still held");
        assert_eq!(read(&file, 0, 4), [1; 4]);
        hold(&memory, false);
        behind.wait_synced(behind.ticket()).unwrap();
        assert_eq!(&memory.state.lock().unwrap().bytes[..4], [1; 4]);
    }

    #[test]
    fn a_failed_flush_fails_every_later_call_but_reads() {
        let (memory, file, behind) = setup();
        hold(&memory, true);
        queue_checkpoint(&file, &behind, &[5; 4]);
        let ticket = behind.ticket();
        memory.state.lock().unwrap().fail = true;
        hold(&memory, false);
        assert!(behind.wait_synced(ticket).is_err());
        assert!(file.write(8, &[1]).is_err());
        assert!(file.sync_data().is_err());
        assert!(file.set_len(0).is_err());
        // What redb wrote stays readable: the failed batch stays queued.
        assert_eq!(read(&file, 0, 4), [5; 4]);
        assert!(file.close().is_err());
    }
}
