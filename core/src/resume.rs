//! How much of a backlog one `resume` replays.
//!
//! A client that comes back after a long absence may have missed more than
//! it is useful, or safe, to send at once: the replay is written to one
//! connection, whose outbound queue is bounded (`limits.outbound_queue_*`),
//! and a replay past that bound would get the client cut as a slow
//! consumer at every reconnect. So a replay takes the newest messages that
//! fit two budgets, at most `messages.max_resume_messages` of them and at
//! most a byte budget (the gateway gives half the connection's outbound
//! bound), and `resumed.from` tells the client where they start. The
//! newest message always goes, whatever it weighs.
//!
//! [`ReplayWindow`] is fed the missed messages newest first (as storage
//! walks them backwards) and says when to stop and where the replay starts.

/// A replayed frame's weight besides its text and attachment (ids, names,
/// JSON or FlatBuffers framing), for the byte budget.
pub const FRAME_OVERHEAD_BYTES: usize = 512;

/// About what a replayed message weighs on the wire: its text, its
/// attachment as base64 (a third larger, in JSON), and the framing.
pub fn frame_weight(text_bytes: usize, attachment_bytes: Option<usize>) -> usize {
    let attachment = attachment_bytes.map_or(0, |n| n / 3 * 4 + 4);
    text_bytes + attachment + FRAME_OVERHEAD_BYTES
}

/// Where a replay of `(last_seen, to]` starts, found by walking the missed
/// messages newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The replay starts after this seq.
    start: u64,
    bytes: usize,
    bytes_max: usize,
}

impl ReplayWindow {
    /// The window for a client that saw up to `last_seen` of a conversation
    /// whose last durable seq is `to`, at most `messages_max` messages and
    /// `bytes_max` bytes of them.
    pub fn new(last_seen: u64, to: u64, messages_max: u64, bytes_max: usize) -> ReplayWindow {
        ReplayWindow { start: to.saturating_sub(messages_max).max(last_seen), bytes: 0, bytes_max }
    }

    /// The seqs left to weigh, newest last: `None` if none (nothing missed,
    /// or the count alone decides).
    pub fn to_weigh(&self, to: u64) -> Option<std::ops::RangeInclusive<u64>> {
        (self.start < to).then(|| self.start + 1..=to)
    }

    /// Offers message `seq` of weight `weight`, newest first. True if it
    /// fits (walk on), false if the budget is spent (stop: it and every
    /// older one stay out).
    pub fn admit(&mut self, seq: u64, weight: usize) -> bool {
        if self.bytes > 0 && self.bytes + weight > self.bytes_max {
            return false;
        }
        self.bytes += weight;
        self.start = seq - 1;
        true
    }

    /// The replay starts after this seq.
    pub fn start(&self) -> u64 {
        self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks `(last_seen, to]` newest first with every message weighing
    /// `weight(seq)`, as the home does over storage.
    fn walk(mut w: ReplayWindow, to: u64, weight: impl Fn(u64) -> usize) -> u64 {
        if let Some(range) = w.to_weigh(to) {
            for seq in range.rev() {
                if !w.admit(seq, weight(seq)) {
                    break;
                }
            }
        }
        w.start()
    }

    #[test]
    fn everything_missed_is_replayed_when_it_fits() {
        let w = ReplayWindow::new(3, 10, 10_000, 1 << 20);
        assert_eq!(walk(w, 10, |_| 600), 3);
        assert_eq!(ReplayWindow::new(10, 10, 10_000, 1 << 20).to_weigh(10), None, "nothing missed");
    }

    #[test]
    fn at_most_the_newest_messages_max() {
        let w = ReplayWindow::new(0, 50_000, 10_000, usize::MAX);
        assert_eq!(walk(w, 50_000, |_| 600), 40_000, "the newest 10,000");
    }

    #[test]
    fn the_byte_budget_keeps_the_newest_that_fit() {
        // 30 attachments of 64 KiB against a 1 MiB budget: the newest that fit.
        let weight = frame_weight(0, Some(64 << 10));
        let fit = (1 << 20) / weight;
        let w = ReplayWindow::new(0, 30, 10_000, 1 << 20);
        assert_eq!(walk(w, 30, |_| weight), 30 - fit as u64);
    }

    #[test]
    fn the_newest_message_goes_whatever_it_weighs() {
        let w = ReplayWindow::new(0, 5, 10_000, 1000);
        assert_eq!(walk(w, 5, |_| 1 << 20), 4);
    }

    #[test]
    fn base64_and_framing_count() {
        assert_eq!(frame_weight(100, None), 100 + FRAME_OVERHEAD_BYTES);
        assert_eq!(frame_weight(0, Some(300)), 404 + FRAME_OVERHEAD_BYTES);
    }
}
