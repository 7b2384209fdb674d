//! The conversation index in runs: one `conv_runs` row holds a run of a
//! conversation's index entries, those one group commit wrote together
//! (`tail.rs`).
//!
//! Until schema version 10 each message had a row of its own, (conversation,
//! seq) → (offset, dedupe slot): 32 bytes of key and value, and as much
//! again of a leaf left half empty, because the keys arrive spread over
//! every open conversation (BENCHMARKS.md, "Bytes on disk per message").
//! Since the tails write a conversation's entries `index_batch` at a time,
//! a run costs one key for all of them, and an entry is an offset step
//! and the slot's 2 bytes: about 4 bytes.
//!
//! A row is keyed by (conversation, the run's last seq), so a
//! conversation's last seq is the key of its last row, and the row that
//! holds seq `s`, if any, is the first at or after (conversation, `s`).
//! Its value is [`FORMAT_RUN`], then per entry in seq order: the offset's
//! step from the entry before (the first entry's: from 0; wrapping, so
//! any offset encodes) as a varint, and the slot, 2 bytes little-endian.
//! The seqs follow each other and end at the key's: a row of n entries
//! holds `last - n + 1 ..= last`. A run whose seqs do not follow each other
//! (a rebuild that left out a damaged record) is written as
//! [`FORMAT_RUN_STEPS`], each entry's seq step (from the entry before; the
//! first's from 0) as a varint before its offset step, as every row of
//! schema version 14 was. Rows of schema versions 11 to 13
//! ([`FORMAT_RUN_32`]) are those, with 4-byte slots, and read with them
//! cut to 16 bits (`dedupe.rs`: a slot is the low bits of one hash, so the
//! cut slot is the slot this build computes).
//!
//! Rows of one conversation never overlap: a run holds only the seqs past
//! the conversation's last row ([`fresh`]). A run is at most [`MAX_RUN`]
//! entries, so reading one seq decodes at most that many.

use redb::ReadableTable;

use crate::compact::{Cursor, put_varint};
use crate::error::{IoContext, StorageError};

/// The format byte of a run whose seqs follow each other, no seq steps
/// stored (see `record.rs` for the other format bytes): schema version 15
/// on.
pub(crate) const FORMAT_RUN: u8 = 8;

/// The format byte of a run with a seq step per entry and slots of 16
/// bits: one whose seqs do not follow each other, and every row of schema
/// version 14.
pub(crate) const FORMAT_RUN_STEPS: u8 = 7;

/// The format byte of a run of schema versions 11 to 13: slots of 32 bits.
pub(crate) const FORMAT_RUN_32: u8 = 6;

/// The most entries one row holds: a row of 64 is ~260 bytes, a
/// sixteenth of a page, and a read of one seq decodes no more.
pub(crate) const MAX_RUN: usize = 64;

/// An index entry: (seq, offset in the log, dedupe slot).
pub(crate) type Entry = (u64, u64, u64);

/// The table's name, for errors.
const TABLE: &str = "conv_runs";

/// Appends the row value of `run` (seqs growing) to `out`.
pub(crate) fn encode(run: &[Entry], out: &mut Vec<u8>) {
    let consecutive = run.windows(2).all(|w| w[0].0.checked_add(1) == Some(w[1].0));
    encode_as(if consecutive { FORMAT_RUN } else { FORMAT_RUN_STEPS }, run, out);
}

/// Appends the row value of `run` in `format`: [`FORMAT_RUN`] (seqs that
/// follow each other), [`FORMAT_RUN_STEPS`], or (for the round trip of an
/// older row) [`FORMAT_RUN_32`].
pub(crate) fn encode_as(format: u8, run: &[Entry], out: &mut Vec<u8>) {
    out.push(format);
    let (mut seq_before, mut offset_before) = (0u64, 0u64);
    for &(seq, offset, slot) in run {
        debug_assert!(seq > seq_before, "seqs grow, from 1");
        // Wrapping: a run that broke the rule reads as damaged, not a panic.
        if format != FORMAT_RUN {
            put_varint(out, seq.wrapping_sub(seq_before));
        }
        put_varint(out, offset.wrapping_sub(offset_before));
        if format != FORMAT_RUN_32 {
            // Slots are 16 bits (`DedupeKey::slot`); nothing above is lost.
            debug_assert!(slot <= u64::from(u16::MAX), "slot {slot:#x} has more than 16 bits");
            out.extend_from_slice(&(slot as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(slot as u32).to_le_bytes());
        }
        (seq_before, offset_before) = (seq, offset);
    }
}

/// Appends the entries of the row keyed (`conv`, `last`) to `out`, their
/// slots as this build computes them (16 bits).
pub(crate) fn decode(conv: u64, last: u64, value: &[u8], out: &mut Vec<Entry>) -> Result<(), StorageError> {
    decode_slots(conv, last, value, out, false)?;
    Ok(())
}

/// [`decode`]; with `whole`, a 32-bit slot of an older row is kept whole
/// (for its round trip). Returns the row's format.
fn decode_slots(
    conv: u64,
    last: u64,
    value: &[u8],
    out: &mut Vec<Entry>,
    whole: bool,
) -> Result<u8, StorageError> {
    let corrupt =
        |message: String| StorageError::Corrupt { table: TABLE, key: format!("({conv}, {last})"), message };
    let (format, mut c) = match value.split_first() {
        Some((&f, rest)) if [FORMAT_RUN, FORMAT_RUN_STEPS, FORMAT_RUN_32].contains(&f) => {
            (f, Cursor { bytes: rest })
        }
        Some((b, _)) => {
            let known = format!("{FORMAT_RUN}, {FORMAT_RUN_STEPS} or {FORMAT_RUN_32}");
            return Err(corrupt(format!("format byte {b}, not {known}")));
        }
        None => return Err(corrupt("empty".into())),
    };
    let start = out.len();
    let (mut seq, mut offset) = (0u64, 0u64);
    while !c.bytes.is_empty() {
        if format != FORMAT_RUN {
            let step = c.varint("seq step").map_err(corrupt)?;
            seq = match seq.checked_add(step) {
                Some(next) if step > 0 => next,
                _ => return Err(corrupt(format!("a seq step of {step} after seq {seq}"))),
            };
        }
        offset = offset.wrapping_add(c.varint("offset step").map_err(corrupt)?);
        let slot = match format {
            FORMAT_RUN_32 if whole => u64::from(c.u32_le("slot").map_err(corrupt)?),
            // The low 16 bits: the slot this build computes.
            FORMAT_RUN_32 => u64::from(c.u32_le("slot").map_err(corrupt)? as u16),
            _ => u64::from(c.u16_le("slot").map_err(corrupt)?),
        };
        out.push((seq, offset, slot));
    }
    if format == FORMAT_RUN {
        // The seqs end at the key's and follow each other.
        let n = (out.len() - start) as u64;
        if n > last {
            return Err(corrupt(format!("{n} entries of seqs from 1 cannot end at seq {last}")));
        }
        for (i, entry) in out[start..].iter_mut().enumerate() {
            entry.0 = last - n + 1 + i as u64;
        }
        seq = if n == 0 { 0 } else { last };
    }
    if out.len() == start || seq != last {
        return Err(corrupt(format!("its entries end at seq {seq}, not at its key's")));
    }
    Ok(format)
}

/// The entries of `entries` (seqs growing) that go in a row past the
/// conversation's last one, `last`: those the table lacks.
pub(crate) fn fresh(entries: &[Entry], last: u64) -> &[Entry] {
    &entries[entries.partition_point(|&(seq, _, _)| seq <= last)..]
}

/// How many of `entries` (seqs growing) the table lacks, of `conv`'s:
/// what [`fresh`] would leave out of the table for good. 0 whenever the
/// table holds a conversation's seqs from 1 on, as the tails keep it.
pub(crate) fn lacking(
    index: &impl ReadableTable<(u64, u64), &'static [u8]>,
    conv: u64,
    entries: &[Entry],
) -> Result<usize, StorageError> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else { return Ok(0) };
    let mut held = entries.iter().peekable();
    let mut found = 0;
    for entry in self::entries(index, conv, first.0, last.0)? {
        let (seq, _, _) = entry?;
        while held.next_if(|e| e.0 < seq).is_some() {}
        if held.next_if(|e| e.0 == seq).is_some() {
            found += 1;
        }
    }
    Ok(entries.len() - found)
}

/// Calls `put` with the key's last seq and the value of each row that
/// holds `entries` (seqs growing), [`MAX_RUN`] to a row.
pub(crate) fn rows(
    entries: &[Entry],
    buf: &mut Vec<u8>,
    mut put: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    for run in entries.chunks(MAX_RUN) {
        buf.clear();
        encode(run, buf);
        put(run[run.len() - 1].0, buf)?;
    }
    Ok(())
}

/// A conversation's last seq in the table (0: none).
pub(crate) fn last_seq(
    index: &impl ReadableTable<(u64, u64), &'static [u8]>,
    conv: u64,
) -> Result<u64, StorageError> {
    match index.range((conv, 0)..=(conv, u64::MAX)).ctx("read conv_runs")?.next_back() {
        Some(row) => Ok(row.ctx("read conv_runs")?.0.value().1),
        None => Ok(0),
    }
}

/// The table's entries of `conv` with seq in `lo..=hi`, in seq order;
/// double-ended, for newest-first reads.
pub(crate) fn entries<'a>(
    index: &'a impl ReadableTable<(u64, u64), &'static [u8]>,
    conv: u64,
    lo: u64,
    hi: u64,
) -> Result<impl DoubleEndedIterator<Item = Result<Entry, StorageError>> + 'a, StorageError> {
    // The rows whose last seq is in range, then the first row past it,
    // which may begin at or below `hi`.
    let (within, after) = match lo <= hi {
        true => {
            let within = index.range((conv, lo)..=(conv, hi)).ctx("read conv_runs")?;
            let after = match hi.checked_add(1) {
                Some(next) => index.range((conv, next)..=(conv, u64::MAX)).ctx("read conv_runs")?.next(),
                None => None,
            };
            (Some(within), after)
        }
        false => (None, None),
    };
    Ok(within.into_iter().flatten().chain(after).flat_map(move |row| {
        let mut run = Vec::new();
        let decoded = row.ctx("read conv_runs").and_then(|(key, value)| {
            let (_, last) = key.value();
            decode(conv, last, value.value(), &mut run)
        });
        let in_range = run.into_iter().filter(move |&(seq, _, _)| lo <= seq && seq <= hi).map(Ok);
        // A row that does not decode is one error where its entries were.
        in_range.chain(decoded.err().map(Err))
    }))
}

/// Decodes `value` as the row keyed (1, `last`) and encodes its entries
/// again: the fuzz target's view of what a read of the table takes apart
/// (an encoding is unique, so an accepted value comes back byte for byte).
#[doc(hidden)]
pub fn run_round_trip(last: u64, value: &[u8]) -> Result<Vec<u8>, String> {
    let mut run = Vec::new();
    let format = decode_slots(1, last, value, &mut run, true).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(value.len());
    encode_as(format, &run, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase, TableDefinition};

    use super::*;

    const T: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("t");

    fn value(run: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(run, &mut out);
        out
    }

    #[test]
    fn a_run_reads_back_and_costs_about_four_bytes_an_entry() {
        let run: Vec<Entry> = (0..32).map(|i| (1000 + i, 5_000_000 + 2_000 * i, 0xbeef ^ i)).collect();
        let bytes = value(&run);
        assert_eq!(bytes[0], FORMAT_RUN);
        let mut back = Vec::new();
        decode(9, 1031, &bytes, &mut back).unwrap();
        assert_eq!(back, run);
        // The first entry's offset is a whole number, the rest steps: 2
        // bytes of offset step, 2 of slot; the seqs are the key's.
        assert_eq!(bytes.len(), 1 + (4 + 2) + 31 * (2 + 2));
        // A run with a gap in its seqs keeps a seq step per entry.
        let gap = [(1, 10, 1), (2, 20, 2), (5, 30, 3)];
        let bytes = value(&gap);
        assert_eq!((bytes[0], bytes.len()), (FORMAT_RUN_STEPS, 1 + 3 * (1 + 1 + 2)));
        let mut back = Vec::new();
        decode(9, 5, &bytes, &mut back).unwrap();
        assert_eq!(back, gap);
        assert_eq!(run_round_trip(5, &bytes).unwrap(), bytes);
        let seed = include_bytes!("../../fuzz/corpus/index_run/seed-three-following");
        let (last, seed) = seed.split_at(8);
        let mut back = Vec::new();
        decode(1, u64::from_le_bytes(last.try_into().unwrap()), seed, &mut back).unwrap();
        assert_eq!(
            back,
            [(3, 100, 1), (4, 101, 2), (5, 105, 3)],
            "written by hand from the layout in this module's doc"
        );
        assert_eq!(value(&back), seed);
    }

    /// A row of schema versions 11 to 13 reads with its slots cut to the
    /// 16 bits this build computes, and its round trip (the fuzzer's)
    /// gives back its bytes, 32-bit slots and all.
    #[test]
    fn a_row_with_32_bit_slots_reads_its_slots_cut_to_16() {
        let run = [(1, 10, 0xdead_beef), (2, 20, 0x0001_0002)];
        let mut old = Vec::new();
        encode_as(FORMAT_RUN_32, &run, &mut old);
        assert_eq!(old[0], FORMAT_RUN_32);
        let mut back = Vec::new();
        decode(4, 2, &old, &mut back).unwrap();
        assert_eq!(back, [(1, 10, 0xbeef), (2, 20, 0x0002)]);
        assert_eq!(run_round_trip(2, &old).unwrap(), old);
        let seed = include_bytes!("../../fuzz/corpus/index_run/seed-two-entries");
        let (last, value) = seed.split_at(8);
        assert_eq!(value[0], FORMAT_RUN_32, "the first seed is a row of version 11");
        assert_eq!(run_round_trip(u64::from_le_bytes(last.try_into().unwrap()), value).unwrap(), value);
        let seed = include_bytes!("../../fuzz/corpus/index_run/seed-two-entries-16");
        let (last, value) = seed.split_at(8);
        let mut back = Vec::new();
        decode(1, u64::from_le_bytes(last.try_into().unwrap()), value, &mut back).unwrap();
        assert_eq!(back, [(1, 10, 5), (3, 12, 7)], "written by hand from the layout in this module's doc");
        assert_eq!(self::value(&back), value);
    }

    #[test]
    fn offsets_that_go_back_and_the_largest_numbers_still_read_back() {
        let run = [(1, u64::MAX, 1), (2, 0, 2), (u64::MAX, 7, u64::from(u16::MAX))];
        let mut back = Vec::new();
        decode(1, u64::MAX, &value(&run), &mut back).unwrap();
        assert_eq!(back, run);
    }

    #[test]
    fn a_damaged_run_is_an_error_never_a_panic() {
        let good = value(&[(1, 10, 1), (2, 20, 2)]);
        let mut steps = Vec::new();
        encode_as(FORMAT_RUN_STEPS, &[(1, 10, 1), (2, 20, 2)], &mut steps);
        let cases: Vec<(&str, Vec<u8>, u64)> = vec![
            ("empty", vec![], 2),
            ("another format", [&[1u8][..], &good[1..]].concat(), 2),
            ("no entries", vec![FORMAT_RUN], 0),
            ("no entries, a key", vec![FORMAT_RUN], 5),
            ("cut in its slot", good[..good.len() - 1].to_vec(), 2),
            ("more entries than seqs from 1 to its key", good.clone(), 1),
            ("with steps: cut in its slot", steps[..steps.len() - 1].to_vec(), 2),
            ("with steps: a key that is not its last seq", steps.clone(), 3),
            ("with steps: a seq that does not grow", steps.iter().copied().chain([0, 1, 0, 0]).collect(), 2),
        ];
        for (what, bytes, last) in cases {
            let mut out = Vec::new();
            let err = decode(4, last, &bytes, &mut out).expect_err(what);
            assert!(matches!(err, StorageError::Corrupt { table: "conv_runs", .. }), "{what}: {err}");
        }
    }

    #[test]
    fn rows_hold_only_what_the_table_lacks_and_split_at_max_run() {
        let entries: Vec<Entry> = (1..=150).map(|s| (s, s * 10, s)).collect();
        let fresh = fresh(&entries, 20);
        assert_eq!(fresh.first().map(|e| e.0), Some(21));
        let mut keys = Vec::new();
        rows(fresh, &mut Vec::new(), |last, _| {
            keys.push(last);
            Ok(())
        })
        .unwrap();
        assert_eq!(keys, [84, 148, 150]);
        assert!(self::fresh(&entries, 150).is_empty());
    }

    #[test]
    fn entries_find_the_rows_that_hold_a_range_from_either_end() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            // Conversation 7: seqs 1..=4, 5..=9, 10; conversation 8 beside it.
            for run in [1..=4u64, 5..=9, 10..=10] {
                let run: Vec<Entry> = run.map(|s| (s, s * 10, s)).collect();
                t.insert((7, run[run.len() - 1].0), value(&run).as_slice()).unwrap();
            }
            t.insert((8, 1), value(&[(1, 5, 5)]).as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        let seqs = |lo, hi| entries(&t, 7, lo, hi).unwrap().map(|e| e.unwrap().0).collect::<Vec<_>>();
        let newest = |lo, hi| entries(&t, 7, lo, hi).unwrap().rev().map(|e| e.unwrap().0).collect::<Vec<_>>();
        assert_eq!(seqs(0, u64::MAX), (1..=10).collect::<Vec<_>>());
        assert_eq!(seqs(3, 6), [3, 4, 5, 6]);
        assert_eq!(seqs(6, 7), [6, 7], "inside one row");
        assert_eq!(newest(2, 9), [9, 8, 7, 6, 5, 4, 3, 2]);
        assert_eq!(newest(0, 5), [5, 4, 3, 2, 1]);
        assert_eq!(seqs(11, 20), Vec::<u64>::new());
        assert_eq!(seqs(5, 4), Vec::<u64>::new());
        assert_eq!(last_seq(&t, 7).unwrap(), 10);
        let e = |seqs: &[u64]| seqs.iter().map(|&s| (s, s * 10, s)).collect::<Vec<_>>();
        assert_eq!(lacking(&t, 7, &e(&[3, 4, 5, 6])).unwrap(), 0);
        assert_eq!(lacking(&t, 7, &e(&[9, 11, 12])).unwrap(), 2, "past the table's last");
        assert_eq!(lacking(&t, 8, &e(&[1, 2])).unwrap(), 1);
        assert_eq!(lacking(&t, 7, &[]).unwrap(), 0);
        assert_eq!(last_seq(&t, 9).unwrap(), 0);
        let one: Vec<_> = entries(&t, 8, 0, u64::MAX).unwrap().map(Result::unwrap).collect();
        assert_eq!(one, [(1, 5, 5)]);
    }
}
