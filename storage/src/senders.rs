//! Where the writer last stored each sender in full.
//!
//! A message names its sender (id and display name, ~49 bytes in the
//! soak) in full only when the writer does not remember a recent message
//! of theirs that does; otherwise it points back at that message
//! (`compact.rs`, flag bit 2), one to three bytes. A sender is remembered by
//! a 128-bit keyed hash of (role, id, name), so a new name is a new sender
//! and is written in full once.
//!
//! The memory holds only records that are in the log or in the batch
//! being committed with the message that points at them: the writer
//! forgets everything when a commit fails and when it goes on from what
//! the file holds after a failure (`group_commit.rs`: an offset given to
//! a record that was lost may be given again, to another sender's
//! message), and starts empty at open. It is bounded by
//! `storage.sender_refs` senders (24 bytes each, about 50 with the map's
//! own); when full it forgets those named beyond the reach, or all if
//! that frees less than a quarter, and a pointer reaches back at most
//! `storage.sender_ref_reach` records, so a message and its sender's
//! record stay near each other in the log and a damaged record takes out
//! the senders of that many records at most.

use crate::dedupe::U64Map;

/// The writer's memory of senders stored in full: a sender's hash, its
/// first half the key → (the second half, the offset of the record).
pub(crate) struct Senders {
    at: U64Map<(u64, u64)>,
    max: usize,
    reach: u64,
}

impl Senders {
    /// A memory of at most `max` senders (0: every message names its
    /// sender in full), pointing at most `reach` records back.
    pub(crate) fn new(max: usize, reach: u64) -> Senders {
        Senders { at: U64Map::default(), max, reach }
    }

    /// Whether senders are remembered at all (`storage.sender_refs` > 0).
    pub(crate) fn on(&self) -> bool {
        self.max > 0
    }

    /// How far back from `offset` the last record naming `sender` in full
    /// is, if the memory holds one within reach.
    pub(crate) fn back(&self, sender: (u64, u64), offset: u64) -> Option<u64> {
        let &(rest, at) = self.at.get(&sender.0)?;
        let back = offset.checked_sub(at)?;
        (rest == sender.1 && back >= 1 && back <= self.reach).then_some(back)
    }

    /// `sender` is named in full at `offset`.
    pub(crate) fn stored(&mut self, sender: (u64, u64), offset: u64) {
        if !self.on() {
            return;
        }
        if self.at.len() >= self.max && !self.at.contains_key(&sender.0) {
            // Senders named more than `reach` records back can no longer
            // be pointed at: they go first, at no cost. If that frees less
            // than a quarter, all go (each sender then costs one record in
            // full): an order to evict by would cost memory on every
            // entry, and a sweep that frees little would run again soon.
            let oldest = offset.saturating_sub(self.reach);
            self.at.retain(|_, &mut (_, at)| at >= oldest);
            if self.at.len() >= self.max - self.max / 4 {
                self.at.clear();
            }
        }
        self.at.insert(sender.0, (sender.1, offset));
    }

    /// Forgets every sender: a commit failed, and the records they were
    /// stored in may not be in the log.
    pub(crate) fn clear(&mut self) {
        self.at.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_is_pointed_at_within_reach_only() {
        let mut s = Senders::new(4, 10);
        let alice = (1, 2);
        assert_eq!(s.back(alice, 5), None);
        s.stored(alice, 5);
        assert_eq!(s.back(alice, 6), Some(1));
        assert_eq!(s.back(alice, 15), Some(10));
        assert_eq!(s.back(alice, 16), None, "past the reach");
        assert_eq!(s.back(alice, 5), None, "a record never points at itself");
        assert_eq!(s.back((1, 3), 6), None, "the same first half is not the same sender");
    }

    #[test]
    fn a_full_memory_forgets_and_a_zero_one_holds_nothing() {
        let mut s = Senders::new(2, 100);
        s.stored((1, 1), 1);
        s.stored((2, 2), 2);
        s.stored((1, 1), 3);
        assert_eq!(s.len(), 2, "a sender it holds moves, it is not added");
        s.stored((3, 3), 4);
        assert_eq!(s.len(), 1, "all within reach: all forgotten");
        assert_eq!(s.back((1, 1), 5), None);
        assert_eq!(s.back((3, 3), 5), Some(1));
        let mut off = Senders::new(0, 100);
        assert!(!off.on());
        off.stored((1, 1), 1);
        assert_eq!(off.back((1, 1), 2), None);
    }

    #[test]
    fn a_full_memory_forgets_the_senders_past_reach_first() {
        let mut s = Senders::new(8, 10);
        for n in 1..=8 {
            s.stored((n, n), n);
        }
        // At 14, the senders named at 1..=3 are past the reach: they go,
        // the five within it stay (fewer than 6, three quarters of 8).
        s.stored((9, 9), 14);
        assert_eq!(s.len(), 6);
        assert_eq!(s.back((3, 3), 14), None);
        for n in 4..=8 {
            assert_eq!(s.back((n, n), 14), Some(14 - n), "sender {n} is still pointed at");
        }
        // Full again at 16: only the senders named at 4 and 5 are past
        // the reach, less than a quarter, so all go.
        s.stored((10, 10), 15);
        s.stored((11, 11), 15);
        s.stored((12, 12), 16);
        assert_eq!(s.len(), 1);
        assert_eq!(s.back((12, 12), 17), Some(1));
    }
}
