//! Spare `String` buffers that decoding copies into instead of allocating.
//!
//! A decoded `send` owns its `cid` and `text`. The gateway hands them from
//! the connection's shard to the conversation's home shard and, once the
//! message is delivered, back again; a decoder given the returned buffers
//! ([`Codec::decode_client_reusing`](super::Codec::decode_client_reusing))
//! fills them, so relaying a message allocates no string in steady state.

/// Spare buffers a pool keeps at most; past it they are freed. A pool must
/// cover the strings in flight (decoded and not yet handed back: at 10k
/// messages/s and a few milliseconds each, a few hundred).
pub const SPARE_STRINGS_MAX: usize = 1024;
/// Larger buffers are freed rather than kept, so a rare long text does not
/// pin its size in the pool.
pub const SPARE_STRING_BYTES_MAX: usize = 4096;
/// A new buffer's capacity at least: enough for typical ids, cids and chat
/// lines, so that any spare buffer fits the next string.
const SPARE_STRING_BYTES_MIN: usize = 128;
/// Buffers looked at (from the newest) for one that fits.
const PROBES: usize = 8;

/// A bounded pool of empty `String` buffers.
#[derive(Debug, Default)]
pub struct SpareStrings(Vec<String>);

impl SpareStrings {
    /// An empty pool (it allocates nothing until given a buffer).
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffers in the pool.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the pool has no buffer.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `s` in a spare buffer big enough for it, or in a new one.
    pub fn copy(&mut self, s: &str) -> String {
        let newest = self.0.len().saturating_sub(PROBES);
        match self.0[newest..].iter().rposition(|b| b.capacity() >= s.len()) {
            Some(i) => {
                let mut b = self.0.swap_remove(newest + i);
                b.clear();
                b.push_str(s);
                b
            }
            None => {
                let mut b = String::with_capacity(s.len().max(SPARE_STRING_BYTES_MIN));
                b.push_str(s);
                b
            }
        }
    }

    /// Keeps `s`'s buffer for a later [`Self::copy`], if the pool has room
    /// and the buffer is not too large; frees it otherwise.
    pub fn give(&mut self, s: String) {
        if self.0.len() < SPARE_STRINGS_MAX && (1..=SPARE_STRING_BYTES_MAX).contains(&s.capacity()) {
            self.0.push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_reuse_a_buffer_that_fits() {
        let mut spare = SpareStrings::new();
        assert_eq!(spare.copy("fresh"), "fresh");
        let small = String::with_capacity(4);
        assert!(spare.copy("x").capacity() >= SPARE_STRING_BYTES_MIN);
        let big = String::with_capacity(64);
        let big_ptr = big.as_ptr();
        spare.give(small);
        spare.give(big);
        let s = spare.copy("longer than four bytes");
        assert_eq!(s, "longer than four bytes");
        assert!(s.capacity() >= 64);
        assert_eq!(s.as_ptr(), big_ptr);
        assert_eq!(spare.len(), 1);
    }

    #[test]
    fn the_pool_is_bounded() {
        let mut spare = SpareStrings::new();
        for _ in 0..SPARE_STRINGS_MAX + 5 {
            spare.give(String::with_capacity(8));
        }
        spare.give(String::with_capacity(SPARE_STRING_BYTES_MAX + 1));
        spare.give(String::new());
        assert_eq!(spare.len(), SPARE_STRINGS_MAX);
        let mut spare = SpareStrings::new();
        spare.give(String::with_capacity(SPARE_STRING_BYTES_MAX + 1));
        spare.give(String::new());
        assert!(spare.is_empty(), "oversized and empty buffers are not kept");
    }
}
