//! The index's tail: a conversation's newest index entries, held in
//! memory until enough of them can go to the table (`conv_runs`) together.
//!
//! The index is keyed by conversation, so at 15,000 open conversations
//! each message written at once dirties a leaf no other message of its
//! commit shares, and every checkpoint writes each of those pages again:
//! the index was most of a checkpoint's ~870 pages, and its inserts a
//! quarter of the writer's CPU (BENCHMARKS.md, issue 11, "the index's
//! tail"). So an append writes its message to the log only, and its entry
//! waits here; a conversation's entries go to the table together, in the
//! group commit that brings its tail to `index_batch` entries, or that
//! finds its oldest entry `index_lag` records behind the log's end, or
//! that closes it. One leaf write, and one row (`runs.rs`), then serves
//! many messages.
//!
//! Nothing acknowledged depends on this memory. The log records are the
//! truth (each message record holds its conversation, seq, sender and
//! cid, so its entry can be computed again), and `meta.index_from` — the
//! offset of the oldest entry not in the table, written by each group
//! commit that moves it, in the same transaction as the entries — says
//! where the entries the table lacks begin: open (and a reopen after a
//! failed commit) reads the log from there and rebuilds
//! the tail, at most `index_lag` records plus a batch.
//!
//! Readers see the table and the tail as one index: the table's entries
//! outside the tail's seqs, and the tail's (`entries`). A reader holds the
//! tails while it begins its read transaction and copies the tails it
//! needs (for a read over many conversations, the last seq of every tail),
//! and the writer changes the tails only after the commit that stored
//! their records returned: so the transaction holds every record a copy
//! points at, and is at least as new as the copy. If it is newer (a commit
//! returned and its tails are not changed yet), a conversation that commit
//! wrote to the table reads as the commit left it, and one whose new
//! entries still wait reads as it was before the commit: either way a run
//! of seqs from 1, never a gap.
//!
//! A log record past `index_from` that open cannot read is left out of
//! the index (logged; the store still opens): if its entry was in the
//! table it still reads as damaged, but if it was only in the tail, its
//! message is gone from its conversation's index, and that seq may be
//! given again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::dedupe::{DedupeKey, U64Map};
use crate::error::{IoContext, StorageError};
use crate::record::{LogView, SenderMemo, access_log_with};
use crate::runs::{self, Entry};
use crate::tables;

/// One conversation's entries not in the table, in seq order. Seqs
/// follow each other, except where open found a log record it could not
/// read (`Tails::rebuild`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TailView {
    /// (seq, offset in the log, dedupe slot).
    entries: Vec<(u64, u64, u64)>,
}

impl TailView {
    /// This view with the entries `staged` holds for `conv` after its own:
    /// what the writer's open transaction sees.
    pub(crate) fn with_staged(mut self, staged: &[Staged], conv: u64) -> TailView {
        for s in staged.iter().filter(|s| s.conv == conv) {
            self.push(s.seq, s.offset, s.slot);
        }
        self
    }

    /// The last seq in the tail, if it holds any.
    pub(crate) fn last_seq(&self) -> Option<u64> {
        self.entries.last().map(|&(seq, _, _)| seq)
    }

    fn first_seq(&self) -> Option<u64> {
        self.entries.first().map(|&(seq, _, _)| seq)
    }

    /// Adds the entry of a seq past the last.
    fn push(&mut self, seq: u64, offset: u64, slot: u64) {
        debug_assert!(self.last_seq().is_none_or(|last| seq > last), "seqs grow");
        self.entries.push((seq, offset, slot));
    }

    fn first_offset(&self) -> Option<u64> {
        self.entries.first().map(|&(_, offset, _)| offset)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// `(seq, offset, slot)` of each entry, in seq order.
    fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64, u64)> + '_ {
        self.entries.iter().copied()
    }
}

/// `(seq, offset, slot)` of a conversation's index entries, in seq order.
pub(crate) type Entries<'a> = Box<dyn DoubleEndedIterator<Item = Result<(u64, u64, u64), StorageError>> + 'a>;

/// A conversation's index entries with seq in `lo..=hi`, as `(seq, offset,
/// slot)` in seq order: the tail's, and the table's at every
/// other seq. Double-ended, for newest-first reads.
pub(crate) fn entries<'a>(
    index: &'a impl ReadableTable<(u64, u64), &'static [u8]>,
    tail: &'a TailView,
    conv: u64,
    lo: u64,
    hi: u64,
) -> Result<Entries<'a>, StorageError> {
    let range = |from: u64, to: u64| runs::entries(index, conv, from, to);
    let in_range = move |&(seq, _, _): &(u64, u64, u64)| lo <= seq && seq <= hi;
    let (Some(first), Some(last)) = (tail.first_seq(), tail.last_seq()) else {
        return Ok(Box::new(range(lo, hi)?));
    };
    if last - first + 1 == tail.len() as u64 {
        // The table below the tail and above it (a tail rebuilt past a log
        // record open could not read may end below the table's last
        // entry), the tail in between.
        let below = range(lo, hi.min(first.saturating_sub(1)))?;
        let above = range(lo.max(last.saturating_add(1)), hi)?;
        return Ok(Box::new(below.chain(tail.iter().filter(in_range).map(Ok)).chain(above)));
    }
    // A tail with a hole (open left a damaged record out): the table fills
    // it. Rare enough to merge in memory.
    let mut merged = std::collections::BTreeMap::new();
    for entry in range(lo, hi)? {
        let (seq, offset, slot) = entry?;
        merged.insert(seq, (offset, slot));
    }
    for (seq, offset, slot) in tail.iter().filter(in_range) {
        merged.insert(seq, (offset, slot));
    }
    Ok(Box::new(merged.into_iter().map(|(seq, (offset, slot))| Ok((seq, offset, slot)))))
}

/// A conversation's last seq (0: no messages): the table's or its tail's
/// (`tail_last`), whichever is higher.
pub(crate) fn last_seq(
    index: &impl ReadableTable<(u64, u64), &'static [u8]>,
    conv: u64,
    tail_last: Option<u64>,
) -> Result<u64, StorageError> {
    Ok(runs::last_seq(index, conv)?.max(tail_last.unwrap_or(0)))
}

/// An entry this group commit made, in the order it made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Staged {
    pub(crate) conv: u64,
    pub(crate) seq: u64,
    pub(crate) offset: u64,
    pub(crate) slot: u64,
}

/// What a group commit does to the tails once it returned.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Conversations whose every entry (tail and staged) the commit wrote
    /// to the table.
    flushed: Vec<u64>,
    /// `meta.index_from` as the commit wrote it.
    pub(crate) index_from: u64,
}

/// The bounds of the tails (`StoreConfig::index_batch`, `index_lag`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TailLimits {
    pub(crate) batch: usize,
    pub(crate) lag: u64,
}

/// The tails held still while a reader begins its read transaction.
pub(crate) struct TailsRead<'a>(std::sync::MutexGuard<'a, Inner>);

impl TailsRead<'_> {
    /// A copy of `conv`'s tail.
    pub(crate) fn view(&self, conv: u64) -> TailView {
        self.0.convs.get(&conv).cloned().unwrap_or_default()
    }

    /// The last seq in `conv`'s tail, if it has one.
    pub(crate) fn last_seq(&self, conv: u64) -> Option<u64> {
        self.0.convs.get(&conv).and_then(TailView::last_seq)
    }

    /// The last seq in every conversation's tail.
    pub(crate) fn last_seqs(&self) -> U64Map<u64> {
        self.0.convs.iter().filter_map(|(&conv, tail)| Some((conv, tail.last_seq()?))).collect()
    }
}

/// Every conversation's tail, shared by the writer (the only one to change
/// it) and the readers.
pub(crate) struct Tails {
    inner: Mutex<Inner>,
    key: DedupeKey,
    limits: TailLimits,
    /// The entries held, for `StoreStats::index_tail_entries`.
    gauge: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Inner {
    convs: U64Map<TailView>,
    /// (first offset, conversation) of each tail when it began, in log
    /// order; an element whose conversation's tail no longer begins there
    /// is stale and skipped.
    order: VecDeque<(u64, u64)>,
    entries: usize,
}

impl Inner {
    fn starts_at(&self, conv: u64, offset: u64) -> bool {
        self.convs.get(&conv).and_then(TailView::first_offset) == Some(offset)
    }

    fn drop_stale_front(&mut self) {
        while let Some(&(offset, conv)) = self.order.front() {
            if self.starts_at(conv, offset) {
                break;
            }
            self.order.pop_front();
        }
    }

    fn push(&mut self, conv: u64, seq: u64, offset: u64, slot: u64) {
        let tail = self.convs.entry(conv).or_default();
        if tail.entries.is_empty() {
            self.order.push_back((offset, conv));
        }
        tail.push(seq, offset, slot);
        self.entries += 1;
    }

    fn remove(&mut self, conv: u64) {
        if let Some(tail) = self.convs.remove(&conv) {
            self.entries -= tail.len();
        }
    }
}

impl Tails {
    pub(crate) fn new(key: DedupeKey, limits: TailLimits, gauge: Arc<AtomicUsize>) -> Tails {
        Tails { inner: Mutex::new(Inner::default()), key, limits, gauge }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tails for a reader: it begins its read transaction while it
    /// holds them (see the module docs), and copies the tails it needs.
    pub(crate) fn read(&self) -> TailsRead<'_> {
        TailsRead(self.lock())
    }

    /// A copy of `conv`'s tail: the writer's (nothing else changes them).
    pub(crate) fn view(&self, conv: u64) -> TailView {
        self.read().view(conv)
    }

    /// Entries held, over every conversation.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries
    }

    /// Every conversation with a tail.
    pub(crate) fn convs(&self) -> Vec<u64> {
        self.lock().convs.keys().copied().collect()
    }

    /// Decides which conversations this group commit writes to
    /// the table — those whose tail and `staged` entries reach
    /// `index_batch`, those in `closing`, and those whose oldest entry is
    /// `index_lag` records behind `next_offset` — and calls `put` once for
    /// each, with its entries in seq order. Changes no tail:
    /// [`Self::apply`] does, once the commit returned.
    pub(crate) fn plan(
        &self,
        staged: &[Staged],
        closing: &[u64],
        next_offset: u64,
        mut put: impl FnMut(u64, &[Entry]) -> Result<(), StorageError>,
    ) -> Result<Plan, StorageError> {
        // The tails' own entries are copied out under the lock and written
        // after it is let go: readers do not wait for redb's inserts.
        let mut writes: Vec<Staged> = Vec::new();
        let (flushed, index_from) = {
            let inner = self.lock();
            let behind = next_offset.saturating_sub(self.limits.lag);
            let mut counts: U64Map<(usize, u64)> = U64Map::default();
            for s in staged {
                counts.entry(s.conv).or_insert((0, s.offset)).0 += 1;
            }
            let mut flushed: Vec<u64> = Vec::new();
            for (&conv, &(count, first_offset)) in &counts {
                let held = inner.convs.get(&conv).map_or(0, TailView::len);
                let oldest = inner.convs.get(&conv).and_then(TailView::first_offset).unwrap_or(first_offset);
                if held + count >= self.limits.batch || oldest < behind {
                    flushed.push(conv);
                }
            }
            for &conv in closing {
                if counts.contains_key(&conv) || inner.convs.contains_key(&conv) {
                    flushed.push(conv);
                }
            }
            for &(offset, conv) in &inner.order {
                if offset >= behind {
                    break;
                }
                if inner.starts_at(conv, offset) {
                    flushed.push(conv);
                }
            }
            flushed.sort_unstable();
            flushed.dedup();
            for &conv in &flushed {
                if let Some(tail) = inner.convs.get(&conv) {
                    writes.extend(tail.iter().map(|(seq, offset, slot)| Staged { conv, seq, offset, slot }));
                }
            }
            // The oldest entry left out of the table: the first live tail
            // in log order that stays, else this commit's first staged
            // entry that stays (staged entries come after every tail's),
            // else none.
            let stays = |conv: &u64| flushed.binary_search(conv).is_err();
            let index_from = inner
                .order
                .iter()
                .find(|&&(offset, conv)| inner.starts_at(conv, offset) && stays(&conv))
                .map(|&(offset, _)| offset)
                .or_else(|| staged.iter().find(|s| stays(&s.conv)).map(|s| s.offset))
                .unwrap_or(next_offset);
            (flushed, index_from)
        };
        writes.extend(staged.iter().filter(|s| flushed.binary_search(&s.conv).is_ok()));
        // A tail's entries come before its conversation's staged ones.
        writes.sort_by_key(|w| (w.conv, w.seq));
        let mut run: Vec<Entry> = Vec::new();
        for one in writes.chunk_by(|a, b| a.conv == b.conv) {
            run.clear();
            run.extend(one.iter().map(|w| (w.seq, w.offset, w.slot)));
            put(one[0].conv, &run)?;
        }
        Ok(Plan { flushed, index_from })
    }

    /// Makes the tails what the returned commit of `staged` under `plan`
    /// left: flushed conversations lose their tail, the other staged
    /// entries join theirs.
    pub(crate) fn apply(&self, staged: &[Staged], plan: &Plan) {
        let mut inner = self.lock();
        for &conv in &plan.flushed {
            inner.remove(conv);
        }
        for s in staged {
            if plan.flushed.binary_search(&s.conv).is_err() {
                inner.push(s.conv, s.seq, s.offset, s.slot);
            }
        }
        inner.drop_stale_front();
        self.gauge.store(inner.entries, Ordering::Relaxed);
    }

    /// Rebuilds every tail from the log: the message records from
    /// `meta.index_from` on (the table may hold some of them too). Runs
    /// at open and after a reopen, before the writer or a reader uses the
    /// database.
    pub(crate) fn rebuild(&self, db: &Database) -> Result<(), StorageError> {
        let mut fresh = Inner::default();
        let txn = db.begin_read().ctx("begin read")?;
        let meta = txn.open_table(tables::META).ctx("open table meta")?;
        if let Some(from) = meta.get(tables::META_INDEX_FROM).ctx("read meta")?.map(|g| g.value()) {
            let log = txn.open_table(tables::LOG).ctx("open table log")?;
            let mut unreadable = 0u64;
            // Every sender of the records it reads, at the default lag.
            let mut senders = SenderMemo::holding(SenderMemo::REBUILD);
            for entry in log.range(from..).ctx("read log")? {
                let (key, value) = entry.ctx("read log")?;
                let offset = key.value();
                let read = access_log_with(&log, &mut senders, offset, value.value(), |view| match view {
                    LogView::Message(m) => {
                        Some((m.conv, m.seq, self.key.slot(m.role, m.sender_id, m.cid.as_str())))
                    }
                    _ => None,
                });
                let (conv, seq, slot) = match read {
                    Ok(Some(message)) => message,
                    Ok(None) => continue,
                    Err(e) => {
                        // Not the whole store's failure: the message is
                        // missing from its conversation's index, where a
                        // read would have reported it damaged.
                        tracing::error!(offset, error = %e, "a log record past index_from cannot be read; its message is left out of the index");
                        unreadable += 1;
                        continue;
                    }
                };
                // Every message from `index_from` on joins its tail, those
                // whose entries the table already holds too (a tail may go
                // to the table after a younger one stays): a reader cuts the
                // table below the tail's first seq, so the two agree, and
                // writing the tail adds only the entries past the table's
                // last row (`runs::fresh`). Looking
                // each conversation up in the table instead cost a random
                // read per conversation on a cold start.
                let Some(last) = fresh.convs.get(&conv).and_then(TailView::last_seq) else {
                    fresh.push(conv, seq, offset, slot);
                    continue;
                };
                let expected = last + 1;
                if seq < expected {
                    // A seq the log already had: a damaged store, not a
                    // reason to refuse to open it (the first one stays).
                    tracing::error!(
                        offset,
                        conv,
                        seq,
                        expected,
                        "a message past index_from repeats a seq; it is left out of the index"
                    );
                    continue;
                }
                if seq > expected && unreadable == 0 {
                    tracing::warn!(
                        conv,
                        seq,
                        expected,
                        "a conversation's seqs skip in the log past index_from"
                    );
                }
                fresh.push(conv, seq, offset, slot);
            }
        }
        self.gauge.store(fresh.entries, Ordering::Relaxed);
        *self.lock() = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tails(batch: usize, lag: u64) -> Tails {
        Tails::new(DedupeKey { k0: 1, k1: 2 }, TailLimits { batch, lag }, Arc::default())
    }

    /// Writes `run` as one row of `conv`'s.
    fn put_run(index: &mut redb::Table<'_, (u64, u64), &'static [u8]>, conv: u64, run: &[Entry]) {
        let mut value = Vec::new();
        runs::encode(run, &mut value);
        index.insert((conv, run[run.len() - 1].0), value.as_slice()).unwrap();
    }

    fn staged(conv: u64, seq: u64, offset: u64) -> Staged {
        Staged { conv, seq, offset, slot: conv * 1000 + seq }
    }

    /// Plans and applies one commit; returns what it wrote and `index_from`.
    fn commit(t: &Tails, batch: &[Staged], closing: &[u64], next_offset: u64) -> (Vec<Staged>, u64) {
        let mut written = Vec::new();
        let plan = t
            .plan(batch, closing, next_offset, |conv, run| {
                written.extend(run.iter().map(|&(seq, offset, slot)| Staged { conv, seq, offset, slot }));
                Ok(())
            })
            .unwrap();
        t.apply(batch, &plan);
        (written, plan.index_from)
    }

    #[test]
    fn a_tail_goes_to_the_table_whole_when_it_reaches_the_batch() {
        let t = tails(3, 1000);
        let (w, from) = commit(&t, &[staged(1, 1, 0), staged(2, 1, 1)], &[], 2);
        assert!(w.is_empty());
        assert_eq!(from, 0);
        let (w, from) = commit(&t, &[staged(1, 2, 2)], &[], 3);
        assert!(w.is_empty());
        assert_eq!(from, 0);
        let (w, from) = commit(&t, &[staged(1, 3, 3), staged(2, 2, 4)], &[], 5);
        assert_eq!(w, [staged(1, 1, 0), staged(1, 2, 2), staged(1, 3, 3)], "conversation 1, in seq order");
        assert_eq!(from, 1, "conversation 2's first entry is the oldest left");
        assert_eq!(t.view(1), TailView::default());
        assert_eq!(t.view(2).iter().collect::<Vec<_>>(), [(1, 1, 2001), (2, 4, 2002)]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_tail_that_falls_behind_the_lag_or_is_closed_goes_to_the_table() {
        let t = tails(100, 10);
        commit(&t, &[staged(1, 1, 0), staged(2, 1, 1)], &[], 2);
        let (w, from) = commit(&t, &[staged(3, 1, 9)], &[], 10);
        assert!(w.is_empty());
        assert_eq!(from, 0);
        let (w, from) = commit(&t, &[staged(3, 2, 10)], &[], 11);
        assert_eq!(w, [staged(1, 1, 0)], "offset 0 is 11 behind");
        assert_eq!(from, 1);
        let (w, from) = commit(&t, &[], &[3], 11);
        assert_eq!(w, [staged(3, 1, 9), staged(3, 2, 10)]);
        assert_eq!(from, 1);
        let (w, from) = commit(&t, &[], &[], 30);
        assert_eq!(w, [staged(2, 1, 1)]);
        assert_eq!(from, 30, "nothing left out of the table");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_staged_entry_already_behind_the_lag_is_written_at_once() {
        let t = tails(100, 2);
        let (w, from) = commit(&t, &[staged(1, 1, 0), staged(1, 2, 1), staged(2, 1, 2)], &[], 3);
        assert_eq!(w, [staged(1, 1, 0), staged(1, 2, 1)]);
        assert_eq!(from, 2);
    }

    #[test]
    fn entries_read_the_table_below_the_tail_and_the_tail_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut index = txn.open_table(tables::CONV_RUNS).unwrap();
            put_run(&mut index, 7, &(1..=4).map(|seq| (seq, seq * 10, seq)).collect::<Vec<_>>());
            // A flushed entry the tail copy still holds: the copy wins.
            put_run(&mut index, 7, &[(5, 999, 999)]);
        }
        txn.commit().unwrap();
        let mut tail = TailView::default();
        tail.push(5, 50, 5);
        tail.push(6, 60, 6);
        let txn = db.begin_write().unwrap();
        {
            // Past the tail too: a tail rebuilt without a damaged record.
            let mut index = txn.open_table(tables::CONV_RUNS).unwrap();
            put_run(&mut index, 7, &[(7, 70, 7)]);
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let index = txn.open_table(tables::CONV_RUNS).unwrap();
        let all: Vec<_> = entries(&index, &tail, 7, 0, u64::MAX).unwrap().map(Result::unwrap).collect();
        assert_eq!(all, (1..=7).map(|s| (s, s * 10, s)).collect::<Vec<_>>());
        let newest: Vec<_> = entries(&index, &tail, 7, 3, 5).unwrap().rev().map(|e| e.unwrap().0).collect();
        assert_eq!(newest, [5, 4, 3]);
        let newest: Vec<_> = entries(&index, &tail, 7, 6, 9).unwrap().rev().map(|e| e.unwrap().0).collect();
        assert_eq!(newest, [7, 6]);
        assert_eq!(last_seq(&index, 7, tail.last_seq()).unwrap(), 7);
        assert_eq!(last_seq(&index, 7, None).unwrap(), 7);
        assert_eq!(entries(&index, &TailView::default(), 8, 0, u64::MAX).unwrap().count(), 0);
    }

    /// Open rebuilds past a damaged log record and a repeated seq (each
    /// left out, logged) instead of refusing the store; what the table
    /// holds of them still reads.
    #[test]
    fn a_rebuild_leaves_out_what_it_cannot_read_and_still_opens() {
        use crate::record::{LogRecord, MessageRecord, encode};
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let key = DedupeKey { k0: 1, k1: 2 };
        let record = |conv: u64, seq: u64| {
            let m = crate::testkit::message(conv, "v", &format!("c{conv}-{seq}"), "hi");
            encode(&LogRecord::Message(MessageRecord::from_msg(m, seq))).unwrap()
        };
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(tables::LOG).unwrap();
            log.insert(0, record(1, 1).as_slice()).unwrap();
            let garbage: Vec<u8> = std::iter::once(1u8).chain(std::iter::repeat_n(0xff, 60)).collect();
            log.insert(1, garbage.as_slice()).unwrap(); // was (1, 2)
            log.insert(2, record(1, 3).as_slice()).unwrap();
            log.insert(3, record(1, 3).as_slice()).unwrap(); // a repeat
            log.insert(4, record(2, 1).as_slice()).unwrap();
            // (1, 2) had gone to the table before the crash.
            put_run(&mut txn.open_table(tables::CONV_RUNS).unwrap(), 1, &[(2, 1, 9)]);
            txn.open_table(tables::META).unwrap().insert(tables::META_INDEX_FROM, 0).unwrap();
        }
        txn.commit().unwrap();
        let tails = Tails::new(key, TailLimits { batch: 32, lag: 1000 }, Arc::default());
        tails.rebuild(&db).unwrap();
        let one = tails.view(1);
        assert_eq!(one.iter().map(|(seq, offset, _)| (seq, offset)).collect::<Vec<_>>(), [(1, 0), (3, 2)]);
        assert_eq!(tails.view(2).last_seq(), Some(1));
        let txn = db.begin_read().unwrap();
        let index = txn.open_table(tables::CONV_RUNS).unwrap();
        let read: Vec<_> = entries(&index, &one, 1, 0, u64::MAX).unwrap().map(|e| e.unwrap().1).collect();
        assert_eq!(read, [0, 1, 2], "seq 2 from the table, where it still reads as damaged");
        assert_eq!(last_seq(&index, 1, one.last_seq()).unwrap(), 3);
    }
}
