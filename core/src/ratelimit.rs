//! A token bucket: how fast one connection may send commands, and (the
//! same bucket with other units) how many attachment bytes it may send a
//! minute, and how many connections or new anonymous visitors one address
//! may make ([`crate::per_ip`]).
//!
//! The bucket holds at most `burst` tokens and gains `messages_per_s` of
//! them every second; each command takes one. A person typing never
//! empties it (the defaults are 20/s with a burst of 40), a script flooding
//! the gateway does, and then gets `rate_limited` with the time after which
//! a retry will succeed. PROTOCOL.md makes `rate_limited` retryable: the
//! client sends the same command (same `cid`) again later.
//!
//! Arithmetic is in integers: one token is as many units as its period has
//! milliseconds ([`UNITS_PER_TOKEN`] for a rate per second, 60,000 for one
//! per minute), so a rate of `r` tokens per period is exactly `r` units per
//! millisecond and refilling is a multiplication with no rounding drift. Time is passed in
//! (`now_ms`); a clock that steps backwards refills nothing rather than
//! panicking or minting tokens.

use crate::config::RateLimitConfig;

/// Units in one token of a per-second bucket: with this scale, `r`
/// tokens/s is `r` units/ms.
pub const UNITS_PER_TOKEN: u64 = 1000;

/// Milliseconds in a minute: the units of one token of a per-minute bucket.
pub const MS_PER_MIN: u64 = 60_000;

/// How long to wait before the command would be allowed, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetryAfterMs(pub u64);

/// One bucket. 32 bytes; a connection's are allocated with its session.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens now, in units; at most `capacity`.
    units: u64,
    /// `burst` tokens, in units.
    capacity: u64,
    /// Units gained per millisecond (= tokens per period).
    per_ms: u64,
    /// Units in one token (= milliseconds in the period).
    token_units: u64,
    /// When `units` was last brought up to date.
    last_ms: u64,
}

impl TokenBucket {
    /// A connection's command bucket, full at time `now_ms`. Zero rates
    /// (refused by config validation) are treated as 1 so the bucket always
    /// refills.
    pub fn new(config: RateLimitConfig, now_ms: u64) -> TokenBucket {
        Self::per_period(u64::from(config.messages_per_s), u64::from(config.burst), UNITS_PER_TOKEN, now_ms)
    }

    /// A full bucket of `burst` tokens gaining `rate` tokens every
    /// `period_ms` (1000 for a rate per second, [`MS_PER_MIN`] per minute).
    /// Zeros are treated as 1. Callers keep `burst × period_ms` within
    /// `u64` (config validation bounds every rate); beyond it the capacity
    /// saturates rather than wrapping.
    pub fn per_period(rate: u64, burst: u64, period_ms: u64, now_ms: u64) -> TokenBucket {
        let token_units = period_ms.max(1);
        let capacity = burst.max(1).saturating_mul(token_units);
        TokenBucket { units: capacity, capacity, per_ms: rate.max(1), token_units, last_ms: now_ms }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.units = self.units.saturating_add(elapsed.saturating_mul(self.per_ms)).min(self.capacity);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes one token, or says how long until one is there.
    pub fn try_take(&mut self, now_ms: u64) -> Result<(), RetryAfterMs> {
        self.try_take_n(1, now_ms)
    }

    /// Takes `n` tokens at once (an attachment's bytes), or takes none and
    /// says how long until `n` are there. More than the burst never fits:
    /// the wait is then the time to fill the whole bucket, and callers
    /// bound `n` by the burst (config validation).
    pub fn try_take_n(&mut self, n: u64, now_ms: u64) -> Result<(), RetryAfterMs> {
        self.refill(now_ms);
        let needed = n.saturating_mul(self.token_units).min(self.capacity.max(1));
        if n.saturating_mul(self.token_units) <= self.units {
            self.units -= needed;
            Ok(())
        } else {
            let missing = needed.saturating_sub(self.units).max(1);
            Err(RetryAfterMs(missing.div_ceil(self.per_ms)))
        }
    }

    /// Whole tokens available at `now_ms` (for metrics and tests).
    pub fn available(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        self.units / self.token_units
    }

    /// Whether the bucket is full at `now_ms`: an entry in this state
    /// holds nothing a new bucket would not, so it may be forgotten.
    pub fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.units >= self.capacity
    }

    /// When the bucket was last brought up to date (its last use).
    pub fn last_ms(&self) -> u64 {
        self.last_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_s: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(RateLimitConfig { messages_per_s: per_s, burst, ..Default::default() }, 1_000)
    }

    #[test]
    fn a_full_bucket_allows_the_burst_then_refuses() {
        let mut b = bucket(20, 40);
        for i in 0..40 {
            assert!(b.try_take(1_000).is_ok(), "take {i}");
        }
        // 20/s: one token every 50 ms.
        assert_eq!(b.try_take(1_000), Err(RetryAfterMs(50)));
        assert_eq!(b.try_take(1_010), Err(RetryAfterMs(40)));
    }

    #[test]
    fn tokens_refill_at_the_rate_and_cap_at_burst() {
        let mut b = bucket(10, 5);
        for _ in 0..5 {
            b.try_take(1_000).unwrap();
        }
        assert!(b.try_take(1_099).is_err());
        assert!(b.try_take(1_100).is_ok(), "one token after 100 ms at 10/s");
        assert!(b.try_take(1_100).is_err());
        // A long quiet spell refills only up to the burst.
        assert_eq!(b.available(1_000_000), 5);
        for _ in 0..5 {
            b.try_take(1_000_000).unwrap();
        }
        assert!(b.try_take(1_000_000).is_err());
    }

    #[test]
    fn retry_after_is_exactly_when_a_token_appears() {
        let mut b = bucket(3, 1);
        b.try_take(1_000).unwrap();
        let RetryAfterMs(wait) = b.try_take(1_000).unwrap_err();
        assert_eq!(wait, 334, "1000 units at 3 units/ms, rounded up");
        assert!(b.try_take(1_000 + wait - 1).is_err());
        assert!(b.try_take(1_000 + wait).is_ok());
    }

    #[test]
    fn a_fast_typist_never_meets_the_defaults() {
        // Five messages a second, each with a typing and a read mark, for a minute.
        let mut b = TokenBucket::new(RateLimitConfig::default(), 0);
        for ms in (0..60_000).step_by(200) {
            for _ in 0..3 {
                assert!(b.try_take(ms).is_ok(), "at {ms} ms");
            }
        }
    }

    #[test]
    fn a_per_minute_bucket_takes_many_tokens_at_once() {
        // 600 bytes a minute = 10 per second, burst 600.
        let mut b = TokenBucket::per_period(600, 600, MS_PER_MIN, 0);
        assert!(b.try_take_n(500, 0).is_ok());
        assert_eq!(b.try_take_n(200, 0), Err(RetryAfterMs(10_000)), "100 missing at 10/s");
        assert_eq!(b.available(0), 100, "a refused take takes nothing");
        assert!(b.try_take_n(200, 9_999).is_err());
        assert!(b.try_take_n(200, 10_000).is_ok());
        // More than the burst never fits; the wait is a full refill.
        assert_eq!(b.try_take_n(601, 10_000), Err(RetryAfterMs(MS_PER_MIN)));
        assert!(b.is_full(10_000 + MS_PER_MIN));
    }

    #[test]
    fn a_clock_stepping_back_mints_nothing() {
        let mut b = bucket(1, 1);
        b.try_take(10_000).unwrap();
        assert!(b.try_take(5_000).is_err());
        assert!(b.try_take(10_999).is_err());
        assert!(b.try_take(11_000).is_ok());
    }
}
