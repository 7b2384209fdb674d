//! Per-address limits: how many WebSocket handshakes, or new anonymous
//! visitors, one client address may make in a while; and, over the same
//! table keyed by sender instead, how many attachment bytes one visitor (or
//! agent) may send in a while, whichever connections and shards they use.
//!
//! A [`PerIpLimiter`] is a table of [`TokenBucket`]s keyed by client
//! address. One table is shared by every shard, behind a lock split into
//! [`STRIPES`] by the address's hash, rather than one table per shard:
//! `SO_REUSEPORT` hashes each connection's 4-tuple, so one address's
//! connections land on every shard, and a per-shard table would have to
//! split the limit N ways, which refuses a busy office early whenever the
//! kernel's spread is uneven and changes the limit's meaning with the shard
//! count. The lock is taken once per handshake or new anonymous visitor,
//! never per message, and two shards meet on a stripe only for addresses
//! that hash alike, so it costs a few tens of nanoseconds uncontended.
//!
//! IPv6 addresses are keyed by their /64: one host is routinely given a
//! whole /64, so a limit per /128 would be a limit on nothing.
//!
//! Memory is bounded: the table holds at most `entries_max` addresses
//! (split evenly over the stripes). A stripe that is full first forgets the
//! addresses whose buckets have refilled (idle ones, which a new bucket
//! would treat the same), then, if none has, the one used least recently.
//! Forgetting an address hands it a full bucket again, so a flood of many
//! addresses can at worst wash out the state of the oldest: the bound on
//! memory wins over exactness.
//!
//! Sans-IO like the rest of `core`: the time is an argument; the lock is a
//! plain `std::sync::Mutex`, held for one bucket update.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ratelimit::{RetryAfterMs, TokenBucket};

/// Lock stripes of one table: enough that shards rarely meet on one.
pub const STRIPES: usize = 64;

/// How a [`PerIpLimiter`]'s buckets fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpRate {
    /// Tokens gained every `period_ms`.
    pub rate: u64,
    /// Tokens an address may spend at once after a quiet spell.
    pub burst: u64,
    /// The rate's period: 1000 for a rate per second, 60,000 per minute.
    pub period_ms: u64,
    /// Addresses remembered at most (over all stripes).
    pub entries_max: usize,
}

/// Token buckets by client address, shared by every shard.
#[derive(Debug)]
pub struct PerIpLimiter {
    rate: PerIpRate,
    per_stripe_max: usize,
    stripes: Box<[Mutex<HashMap<u128, TokenBucket>>]>,
    /// Addresses forgotten to stay within `entries_max`, idle or not.
    evicted: AtomicU64,
    /// Hashes other keys than addresses ([`PerIpLimiter::try_take_n_for`])
    /// to 128 bits, with a key random per table: a sender cannot pick ids
    /// that meet another's bucket.
    hasher: std::collections::hash_map::RandomState,
}

/// The table key of an address: IPv4 (and IPv4-mapped IPv6) as itself,
/// IPv6 as its /64.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            // The low bit marks IPv6 so no /64 collides with an IPv4 key
            // (whose upper 96 bits are zero).
            None => (u128::from(v6) & !u128::from(u64::MAX)) | 1,
        },
    }
}

impl PerIpLimiter {
    /// An empty table. `entries_max` below [`STRIPES`] is raised to one
    /// entry per stripe.
    pub fn new(rate: PerIpRate) -> PerIpLimiter {
        let per_stripe_max = rate.entries_max.div_ceil(STRIPES).max(1);
        let stripes = (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect();
        let hasher = std::collections::hash_map::RandomState::new();
        PerIpLimiter { rate, per_stripe_max, stripes, evicted: AtomicU64::new(0), hasher }
    }

    /// Takes one token for `ip` at `now_ms`, or says when one will be there.
    pub fn try_take(&self, ip: IpAddr, now_ms: u64) -> Result<(), RetryAfterMs> {
        self.take(key(ip), 1, now_ms)
    }

    /// Takes `n` tokens from the bucket of `key` (a sender's role and id,
    /// say) at `now_ms`, or says when there will be `n`. A table is keyed
    /// one way: by addresses or by such keys, never both.
    pub fn try_take_n_for<K: Hash + ?Sized>(&self, key: &K, n: u64, now_ms: u64) -> Result<(), RetryAfterMs> {
        let high = self.hasher.hash_one((0u8, key));
        let low = self.hasher.hash_one((1u8, key));
        self.take((u128::from(high) << 64) | u128::from(low), n, now_ms)
    }

    fn take(&self, key: u128, n: u64, now_ms: u64) -> Result<(), RetryAfterMs> {
        // Fibonacci hashing of the key's folded halves: cheap, and spreads
        // consecutive addresses over the stripes.
        let folded = (key as u64) ^ ((key >> 64) as u64);
        let stripe = (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % STRIPES;
        // A poisoned stripe only means another thread panicked mid-update
        // of a bucket; the table is still a table.
        let mut table = self.stripes[stripe].lock().unwrap_or_else(|e| e.into_inner());
        if !table.contains_key(&key) && table.len() >= self.per_stripe_max {
            self.make_room(&mut table, now_ms);
        }
        let r = self.rate;
        let bucket =
            table.entry(key).or_insert_with(|| TokenBucket::per_period(r.rate, r.burst, r.period_ms, now_ms));
        bucket.try_take_n(n, now_ms)
    }

    /// Forgets the idle addresses of a full stripe, or else its least
    /// recently used one.
    fn make_room(&self, table: &mut HashMap<u128, TokenBucket>, now_ms: u64) {
        let before = table.len();
        table.retain(|_, b| !b.is_full(now_ms));
        if table.len() == before {
            let oldest = table.iter().min_by_key(|(_, b)| b.last_ms()).map(|(k, _)| *k);
            if let Some(k) = oldest {
                table.remove(&k);
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Addresses remembered now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    /// Whether no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses forgotten while their buckets were still in use, to stay
    /// within `entries_max`.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn limiter(rate: u64, burst: u64, entries_max: usize) -> PerIpLimiter {
        PerIpLimiter::new(PerIpRate { rate, burst, period_ms: 1000, entries_max })
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn each_address_has_its_own_bucket() {
        let l = limiter(1, 3, 1024);
        for _ in 0..3 {
            assert!(l.try_take(v4(1), 0).is_ok());
        }
        assert_eq!(l.try_take(v4(1), 0), Err(RetryAfterMs(1000)));
        assert!(l.try_take(v4(2), 0).is_ok(), "another address is not limited");
        assert!(l.try_take(v4(1), 1000).is_ok(), "one token a second");
    }

    #[test]
    fn byte_budgets_are_kept_per_sender_key() {
        // 600 bytes a minute: 10 per second.
        let l = PerIpLimiter::new(PerIpRate { rate: 600, burst: 600, period_ms: 60_000, entries_max: 1024 });
        let ann = ("visitor", "ann");
        const T0: u64 = 1_000_000;
        assert!(l.try_take_n_for(&ann, 500, T0).is_ok());
        assert_eq!(l.try_take_n_for(&ann, 200, T0), Err(RetryAfterMs(10_000)), "100 bytes missing");
        assert!(l.try_take_n_for(&("visitor", "bob"), 600, T0).is_ok(), "another sender's bucket");
        assert!(l.try_take_n_for(&("agent", "ann"), 600, T0).is_ok(), "an agent ann is another sender");
        assert!(l.try_take_n_for(&ann, 100, T0).is_ok(), "what is left still fits");
        assert!(l.try_take_n_for(&ann, 200, T0 + 20_000).is_ok(), "refilled after the wait");
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let l = limiter(1, 1, 1024);
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.try_take(a.into(), 0).is_ok());
        assert!(l.try_take(b.into(), 0).is_err(), "same /64");
        assert!(l.try_take(c.into(), 0).is_ok(), "another /64");
        assert!(l.try_take(v4(7), 0).is_ok());
        let mapped = Ipv4Addr::new(127, 0, 0, 7).to_ipv6_mapped();
        assert!(l.try_take(mapped.into(), 0).is_err(), "::ffff:127.0.0.7 is 127.0.0.7");
        assert_ne!(key("::".parse().unwrap()), key(Ipv4Addr::UNSPECIFIED.into()));
    }

    #[test]
    fn the_table_stays_bounded_forgetting_idle_then_oldest() {
        let max = STRIPES * 2;
        let l = limiter(1, 2, max);
        // Many addresses, each spending a token (so none is idle).
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let _ = l.try_take(ip, u64::from(i));
        }
        assert!(l.len() <= max, "{} entries", l.len());
        assert!(l.evicted() > 0);
        // Later, every bucket has refilled: a new address in a full stripe
        // displaces the idle ones, without counting an eviction.
        let (evicted, len) = (l.evicted(), l.len());
        let _ = l.try_take(IpAddr::V4(Ipv4Addr::new(11, 0, 0, 1)), 1_000_000);
        assert_eq!(l.evicted(), evicted, "idle entries go first, uncounted");
        assert!(l.len() < len, "the stripe's idle entries are gone");
    }

    #[test]
    fn the_least_recently_used_address_is_forgotten_first() {
        // One entry per stripe; find two addresses on the same stripe.
        let l = limiter(1, 5, 1);
        let a = v4(1);
        let b = (2..=255).map(v4).find(|&ip| {
            let probe = limiter(1, 1, 1);
            probe.try_take(a, 0).unwrap();
            probe.try_take(ip, 0).unwrap();
            probe.len() == 1
        });
        let Some(b) = b else { return };
        l.try_take(a, 0).unwrap();
        l.try_take(b, 10).unwrap();
        assert_eq!(l.len(), 1, "a was forgotten for b");
        assert_eq!(l.evicted(), 1);
    }
}
