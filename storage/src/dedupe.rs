//! The cid dedupe index: has (sender, conversation, cid) been appended?
//!
//! The sender is its role and its id: agent `42` and visitor `42` are two
//! people, and the same cid from each is two messages.
//!
//! Every entry of the conversation index carries, next to the message's
//! offset, its *dedupe slot*: a keyed hash (SipHash-2-4, with a secret
//! random key per database) of the sender's role and id and the cid
//! (schema version 3; version 2 hashed the id and cid only, and an upgrade
//! recomputes every slot, see `upgrade.rs`), cut to 32 bits in versions
//! 11 to 13 and to 16 since version 14 (`runs.rs`: 2 bytes of every
//! message's entry on disk; a cut slot is a filter, never an identity, and
//! the 2 bytes saved took 5.1 bytes a message off the 5-minute soak's
//! store with their share of the index's half-empty leaves, BENCHMARKS.md).
//! So the dedupe
//! index is the conversation's index itself, and an append writes no
//! third B-tree.
//! A separate `(conversation, slot) → offset` table cost a third of the
//! throughput (600k appends over 10k conversations: 106k msg/s with it,
//! 160k without; the raw ceiling 121k and 192k), because every commit
//! rewrites about one page per conversation touched in every tree keyed by
//! conversation, and that page traffic is what the disk limits.
//!
//! Lookups rarely scan a whole conversation. The writer keeps, per
//! conversation it has seen, its slots and their offsets (loaded by one range
//! scan of the conversation's index on first touch), so its check is in
//! memory. Readers share a [`SlotCache`] that they extend with only the
//! index entries appended since their last look, so `Reader::dedupe` costs
//! ~1 µs whatever the conversation's length. Both are [`SlotMaps`],
//! bounded by `conv_cache_entries` slots each: past it, the conversations
//! touched longest ago are dropped and read again if they come back. Both
//! hold, and read, only a conversation's last `dedupe_window` messages:
//! the cid window, past which a resent cid is a new message. Either way
//! the log record is the truth: a slot
//! match counts only if the record it points at has the same sender and
//! cid, so two different (sender, cid) with equal slots — a 2⁻¹⁶ chance
//! per message of the window (at the default window of 128, one lookup in
//! 512 reads another message's record for nothing), and not something a
//! client can aim at without the secret key — are told apart by looking
//! at every entry of the window (never further back: a match older than
//! the window would break the window's rule only when slots collide).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use redb::ReadableTable;

use kefu_proto::ids::Role;

use crate::error::{IoContext, StorageError};
use crate::record::{LogView, access_log_in};
use crate::tail::{self, TailView};

/// The secret SipHash key of one database (random, kept in `meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupeKey {
    pub(crate) k0: u64,
    pub(crate) k1: u64,
}

/// What the log says about the record a dedupe slot points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Original {
    pub(crate) offset: u64,
    pub(crate) seq: u64,
    pub(crate) ts_ms: u64,
}

impl DedupeKey {
    /// A fresh random key. `RandomState` is seeded from the OS's randomness.
    pub(crate) fn random() -> DedupeKey {
        use std::hash::{BuildHasher, Hasher};
        let draw = |salt: u64| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt);
            h.finish()
        };
        DedupeKey { k0: draw(0), k1: draw(1) }
    }

    /// The slot of (role, sender, cid): unambiguous (a fixed-size role tag,
    /// then the sender's length) and stable across versions (SipHash-2-4 is
    /// a fixed function, and [`role_tag`] never changes). Its low 16 bits,
    /// which is what the index stores (`runs.rs`).
    pub(crate) fn slot(&self, role: Role, sender: &str, cid: &str) -> u64 {
        #[cfg(test)]
        if self.k0 == 0 && self.k1 == 0 {
            // Tests force every (sender, cid) into one slot with this key.
            return 7;
        }
        let mut s = SipHash24::new(self.k0, self.k1);
        s.write(&[role_tag(role)]);
        s.write(&(sender.len() as u64).to_le_bytes());
        s.write(sender.as_bytes());
        s.write(cid.as_bytes());
        s.finish() & u64::from(u16::MAX)
    }

    /// Who wrote a message, for the writer's memory of where each sender
    /// was last stored in full (`senders.rs`): SipHash-2-4 of (role, id,
    /// name) under two keys derived from this one, 128 bits, so that no
    /// two senders the memory holds share one (2⁻⁹⁷ for 65,536 of them:
    /// a shared one would put a message under another sender's name).
    pub(crate) fn sender(&self, role: Role, id: &str, name: &str) -> (u64, u64) {
        let hash = |k0: u64, k1: u64| {
            let mut s = SipHash24::new(k0, k1);
            s.write(&[role_tag(role)]);
            s.write(&(id.len() as u64).to_le_bytes());
            s.write(id.as_bytes());
            s.write(name.as_bytes());
            s.finish()
        };
        // Salts keep these apart from the dedupe slots and from each other.
        (hash(self.k0 ^ 0x7365_6e64_6572_3030, self.k1), hash(self.k0, self.k1 ^ 0x7365_6e64_6572_3131))
    }

    /// The slot schema version 2 stored: without the role. Only tests build
    /// such a store, to check the upgrade.
    #[cfg(test)]
    pub(crate) fn slot_v2(&self, sender: &str, cid: &str) -> u64 {
        let mut s = SipHash24::new(self.k0, self.k1);
        s.write(&(sender.len() as u64).to_le_bytes());
        s.write(sender.as_bytes());
        s.write(cid.as_bytes());
        s.finish()
    }
}

/// The byte a role hashes as in a dedupe slot. Stored slots depend on it:
/// never renumber (a new role takes a new number).
fn role_tag(role: Role) -> u8 {
    match role {
        Role::Visitor => 1,
        Role::Agent => 2,
        Role::Bot => 3,
    }
}

/// Whether the log record at `offset` is the message (conv, role, sender, cid).
pub(crate) fn check(
    log: &impl ReadableTable<crate::tables::LogOffset, &'static [u8]>,
    offset: u64,
    conv: u64,
    (role, sender): (Role, &str),
    cid: &str,
) -> Result<Option<Original>, StorageError> {
    let guard = log.get(offset).ctx("read log")?.ok_or_else(|| StorageError::Corrupt {
        table: "conv_runs",
        key: format!("conversation {conv}"),
        message: format!("points at offset {offset}, which is not in the log"),
    })?;
    access_log_in(log, offset, guard.value(), |view| match view {
        LogView::Message(m) if m.conv == conv => Ok((m.role == role
            && m.sender_id == sender
            && m.cid.as_str() == cid)
            .then_some(Original { offset, seq: m.seq, ts_ms: m.ts_ms })),
        _ => Err(StorageError::Corrupt {
            table: "conv_runs",
            key: format!("conversation {conv}"),
            message: format!("points at offset {offset}, which is not a message of that conversation"),
        }),
    })?
}

/// Looks (sender, conv, cid) up by scanning the conversation's last
/// `window` index entries (the cid window: an older cid is a new message,
/// whatever the slots say): every entry whose slot matches is checked
/// against its log record.
#[allow(clippy::too_many_arguments)]
pub(crate) fn find_by_scan(
    key: &DedupeKey,
    index: &impl ReadableTable<(u64, u64), &'static [u8]>,
    tail: &TailView,
    log: &impl ReadableTable<crate::tables::LogOffset, &'static [u8]>,
    conv: u64,
    window: usize,
    sender: (Role, &str),
    cid: &str,
) -> Result<Option<Original>, StorageError> {
    let slot = key.slot(sender.0, sender.1, cid);
    for entry in tail::entries(index, tail, conv, 0, u64::MAX)?.rev().take(window) {
        let (_, offset, s) = entry?;
        if s == slot
            && let Some(original) = check(log, offset, conv, sender, cid)?
        {
            return Ok(Some(original));
        }
    }
    Ok(None)
}

/// Reads `conv`'s index entries from seq `from` on, but at most the last
/// `window` of them (the cid window), into `out` as `(seq, slot, offset)`
/// in seq order: what a dedupe cache loads, read from the end so that a
/// long history costs nothing.
pub(crate) fn read_window(
    index: &impl ReadableTable<(u64, u64), &'static [u8]>,
    tail: &TailView,
    conv: u64,
    from: u64,
    window: usize,
    out: &mut Vec<(u64, u64, u64)>,
) -> Result<(), StorageError> {
    out.clear();
    for entry in tail::entries(index, tail, conv, from, u64::MAX)?.rev().take(window) {
        let (seq, offset, slot) = entry?;
        out.push((seq, slot, offset));
    }
    out.reverse();
    Ok(())
}

/// A map keyed by numbers that are already well spread (conversation ids
/// through a multiply, dedupe slots as they are: SipHash output): hashing
/// them again with SipHash is the writer's single largest cost outside
/// redb.
pub(crate) type U64Map<V> = HashMap<u64, V, std::hash::BuildHasherDefault<U64Hasher>>;

#[derive(Default)]
pub(crate) struct U64Hasher(u64);

impl std::hash::Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: sequential ids spread over all the bits
        // hashbrown looks at (the top 7 and the low ones).
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(32) ^ n;
    }
}

/// Dedupe slots held in memory, per conversation, bounded: the writer's
/// and each reader cache's working set over the on-disk column.
///
/// A conversation holds the slots of its last `window` messages (the cid
/// window: an older cid is not looked for), and is loaded with those only,
/// by one read of the end of its index. What is held in all is bounded
/// too. Past
/// `max_entries` slots, the conversations touched longest ago are dropped
/// whole, down to three quarters of the bound (so a full cache does not
/// evict on every append), and one that comes back is loaded again with
/// one scan of its index. The writer also drops a conversation when it
/// is closed. Before, the bound was checked only when a conversation was
/// first loaded, so a fixed set of busy conversations grew the caches
/// with their whole history (issue 11).
pub(crate) struct SlotMaps {
    convs: U64Map<ConvSlots>,
    /// Slots held in `convs`.
    entries: usize,
    max_entries: usize,
    /// Counts touches, for "touched longest ago".
    clock: u64,
    /// The cid window: slots held per conversation, its newest messages'.
    window: usize,
    /// Where `entries` is published for `/metrics` (shared by every cache
    /// of one kind, so each adds its own).
    gauge: Arc<AtomicUsize>,
}

/// One conversation's slots as held in memory: two rings of at most
/// `window` entries, scanned whole on a lookup.
///
/// A ring, not a map: a map from slot to offset beside a queue of the
/// same pairs (what this was) cost 67.5 bytes a slot as measured (a hash
/// table at most 7/8 full, rounded up to a power of two, plus the queue,
/// plus the conversation's entry), so a full window of 128 held ~8.6 KB,
/// more than the whole budget of a chat session (issue 11: ≤ 4 KB). The
/// ring holds 10 bytes a slot (a 16-bit slot and its offset; 12 with
/// 32-bit slots, 16 with 64-bit ones, before schema versions 14 and 11);
/// a lookup scans the window's slots (256 bytes at 128, contiguous), and
/// `Reader::dedupe` and the
/// writer's throughput measured the same as with the map, within the
/// host's noise (BENCHMARKS.md).
#[derive(Default)]
pub(crate) struct ConvSlots {
    /// The first seq not yet read (the last seq + 1).
    pub(crate) next_seq: u64,
    /// The slots of the window's messages, one per message;
    /// `slots[oldest]` leaves first once the ring is full. 16 bits, as
    /// [`DedupeKey::slot`] makes them, so two messages of a window may
    /// share one (the log record tells them apart): each keeps its own
    /// place, or a resend of the second would be missed once the first
    /// left the window.
    slots: Vec<u16>,
    /// `offsets[i]` is the log offset of the message with `slots[i]`.
    offsets: Vec<u64>,
    oldest: usize,
    /// The clock at its last touch.
    touched: u64,
}

impl ConvSlots {
    /// The log offset of the window's message with `slot`, if any.
    pub(crate) fn offset(&self, slot: u64) -> Option<u64> {
        let slot = narrow(slot);
        self.slots.iter().position(|&s| s == slot).map(|i| self.offsets[i])
    }

    /// Whether a message of the window has `slot`.
    pub(crate) fn holds(&self, slot: u64) -> bool {
        self.slots.contains(&narrow(slot))
    }

    /// Slots held.
    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Notes the message at `seq` with `slot` at `offset`, and lets the
    /// oldest slot go past `window`. Returns the slots added and dropped.
    fn note(&mut self, seq: u64, slot: u64, offset: u64, window: usize) -> (usize, usize) {
        self.next_seq = self.next_seq.max(seq + 1);
        let slot = narrow(slot);
        if self.slots.len() < window {
            if self.slots.len() == self.slots.capacity() {
                // Grown by doubling but never past the window: a full
                // ring has no spare capacity.
                let more = self.slots.len().max(4).min(window - self.slots.len());
                self.slots.reserve_exact(more);
                self.offsets.reserve_exact(more);
            }
            self.slots.push(slot);
            self.offsets.push(offset);
            return (1, 0);
        }
        // Full: the newest takes the oldest's place.
        self.slots[self.oldest] = slot;
        self.offsets[self.oldest] = offset;
        self.oldest = (self.oldest + 1) % self.slots.len();
        (1, 1)
    }
}

/// A slot as held in memory: every slot is 16 bits ([`DedupeKey::slot`],
/// and the index stores 2 bytes of it).
fn narrow(slot: u64) -> u16 {
    debug_assert!(slot <= u64::from(u16::MAX), "slot {slot:#x} has more than 16 bits");
    slot as u16
}

impl SlotMaps {
    pub(crate) fn new(max_entries: usize, window: usize, gauge: Arc<AtomicUsize>) -> SlotMaps {
        assert!(max_entries > 0, "validated: conv_cache_entries >= 1");
        assert!(window > 0, "validated: dedupe_window >= 1");
        SlotMaps { convs: U64Map::default(), entries: 0, max_entries, clock: 0, window, gauge }
    }

    /// The cid window: how many of a conversation's newest messages to
    /// read when loading it.
    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// Slots held.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.entries
    }

    /// `conv`'s slots, if held, without counting a touch.
    pub(crate) fn peek(&self, conv: u64) -> Option<&ConvSlots> {
        self.convs.get(&conv)
    }

    /// `conv`'s slots, if held, counted as a touch.
    pub(crate) fn get(&mut self, conv: u64) -> Option<&ConvSlots> {
        self.clock += 1;
        let clock = self.clock;
        self.convs.get_mut(&conv).map(|c| {
            c.touched = clock;
            &*c
        })
    }

    /// Notes `(seq, slot, offset)` in `conv` if it is held; a conversation
    /// not held is loaded whole or not at all, never from one message.
    pub(crate) fn note(&mut self, conv: u64, seq: u64, slot: u64, offset: u64) {
        if self.convs.contains_key(&conv) {
            self.note_all(conv, std::iter::once((seq, slot, offset)));
        }
    }

    /// Holds `conv` (empty if it was not held) and notes these messages of
    /// it in seq order: all of them from its first seq, or from the
    /// `next_seq` it is held with. Then keeps the bound, which may drop
    /// `conv` itself if it alone is over it.
    pub(crate) fn note_all(&mut self, conv: u64, messages: impl IntoIterator<Item = (u64, u64, u64)>) {
        self.clock += 1;
        let c = self.convs.entry(conv).or_default();
        c.touched = self.clock;
        let (mut added, mut dropped) = (0, 0);
        for (seq, slot, offset) in messages {
            let (a, d) = c.note(seq, slot, offset, self.window);
            added += a;
            dropped += d;
        }
        self.entries = self.entries + added - dropped;
        if added >= dropped {
            self.gauge.fetch_add(added - dropped, Ordering::Relaxed);
        } else {
            self.gauge.fetch_sub(dropped - added, Ordering::Relaxed);
        }
        if self.entries > self.max_entries {
            self.evict(conv);
        }
    }

    /// Drops `conv`'s slots (the column still answers for it).
    pub(crate) fn forget(&mut self, conv: u64) {
        if let Some(c) = self.convs.remove(&conv) {
            self.entries -= c.len();
            self.gauge.fetch_sub(c.len(), Ordering::Relaxed);
        }
    }

    /// Drops everything.
    pub(crate) fn clear(&mut self) {
        self.gauge.fetch_sub(self.entries, Ordering::Relaxed);
        self.convs.clear();
        self.entries = 0;
    }

    /// Drops the conversations touched longest ago, `keep` last, until at
    /// most three quarters of the bound are held. Sorting every
    /// conversation is fine: this runs once per quarter of the bound
    /// filled, not per append.
    fn evict(&mut self, keep: u64) {
        let target = self.max_entries - self.max_entries / 4;
        let mut order: Vec<(u64, u64)> =
            self.convs.iter().map(|(&id, c)| (if id == keep { u64::MAX } else { c.touched }, id)).collect();
        order.sort_unstable();
        for (_, id) in order {
            if self.entries <= target {
                break;
            }
            self.forget(id);
        }
    }
}

impl Drop for SlotMaps {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.entries, Ordering::Relaxed);
    }
}

/// The readers' view of dedupe slots, shared by every [`Reader`] of a
/// store (or owned by one, see `Reader::with_own_dedupe_cache`): per
/// conversation, the slots of its messages up to some seq, extended by
/// reading only the index entries added since. Index entries never change
/// once committed, so extending is exact, and a lookup costs one short
/// range read instead of a scan of the whole conversation.
///
/// [`Reader`]: crate::Reader
pub(crate) struct SlotCache {
    key: DedupeKey,
    maps: SlotMaps,
    /// Reused for the entries read in one lookup: `(seq, slot, offset)`.
    scratch: Vec<(u64, u64, u64)>,
}

impl SlotCache {
    pub(crate) fn new(
        key: DedupeKey,
        max_entries: usize,
        window: usize,
        gauge: Arc<AtomicUsize>,
    ) -> SlotCache {
        SlotCache { key, maps: SlotMaps::new(max_entries, window, gauge), scratch: Vec::new() }
    }

    /// An empty cache with the same key, bounds and gauge.
    pub(crate) fn empty_like(&self) -> SlotCache {
        SlotCache::new(self.key, self.maps.max_entries, self.maps.window, self.maps.gauge.clone())
    }

    /// Slots held.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.maps.entries()
    }

    /// Whether this cache has read `conv`'s index below `before_seq` and
    /// holds no slot of (sender, cid): no append of it below `before_seq`.
    pub(crate) fn knows_absent(&self, conv: u64, sender: (Role, &str), cid: &str, before_seq: u64) -> bool {
        self.maps
            .peek(conv)
            .is_some_and(|c| c.next_seq >= before_seq && !c.holds(self.key.slot(sender.0, sender.1, cid)))
    }

    /// Like [`find_by_scan`] over the cid window, reading only what this
    /// cache has not seen.
    /// The caller holds the cache's lock across `index` and `log`'s read
    /// transaction, so transactions come in snapshot order and the cache
    /// never knows of an entry the current snapshot cannot see.
    pub(crate) fn find(
        &mut self,
        index: &impl ReadableTable<(u64, u64), &'static [u8]>,
        tail: &TailView,
        log: &impl ReadableTable<crate::tables::LogOffset, &'static [u8]>,
        conv: u64,
        sender: (Role, &str),
        cid: &str,
    ) -> Result<Option<Original>, StorageError> {
        let slot = self.key.slot(sender.0, sender.1, cid);
        let from = self.maps.get(conv).map_or(0, |c| c.next_seq);
        let mut new = std::mem::take(&mut self.scratch);
        // What was appended since, but no further back than the window.
        read_window(index, tail, conv, from, self.maps.window(), &mut new)?;
        // Where the slot is, before keeping the bound may drop `conv`.
        let mut at = new.iter().find(|&&(_, s, _)| s == slot).map(|&(_, _, offset)| offset);
        if let Some(c) = self.maps.peek(conv) {
            at = c.offset(slot).or(at);
        }
        self.maps.note_all(conv, new.drain(..));
        self.scratch = new;
        let Some(offset) = at else { return Ok(None) };
        match check(log, offset, conv, sender, cid)? {
            Some(o) => Ok(Some(o)),
            // Another (sender, cid) has the slot: look at every entry of
            // the window.
            None => find_by_scan(&self.key, index, tail, log, conv, self.maps.window(), sender, cid),
        }
    }
}

/// SipHash-2-4 (Aumasson and Bernstein), 64-bit output.
struct SipHash24 {
    v: [u64; 4],
    tail: u64,
    ntail: usize,
    len: usize,
}

impl SipHash24 {
    fn new(k0: u64, k1: u64) -> SipHash24 {
        SipHash24 {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            len: 0,
        }
    }

    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        Self::round(&mut self.v);
        Self::round(&mut self.v);
        self.v[0] ^= m;
    }

    fn write(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        for &b in bytes {
            self.tail |= (b as u64) << (8 * self.ntail);
            self.ntail += 1;
            if self.ntail == 8 {
                let m = std::mem::take(&mut self.tail);
                self.ntail = 0;
                self.compress(m);
            }
        }
    }

    fn finish(mut self) -> u64 {
        let b = ((self.len as u64 & 0xff) << 56) | self.tail;
        self.compress(b);
        self.v[2] ^= 0xff;
        for _ in 0..4 {
            Self::round(&mut self.v);
        }
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_holds_the_slots_of_its_window_only() {
        let gauge = Arc::new(AtomicUsize::new(0));
        let mut maps = SlotMaps::new(100, 3, gauge.clone());
        maps.note_all(1, (1..=5).map(|seq| (seq, 100 + seq, seq)));
        maps.note(1, 6, 106, 6);
        let held = |maps: &SlotMaps| -> Vec<Option<u64>> {
            (101..=107).map(|slot| maps.peek(1).unwrap().offset(slot)).collect()
        };
        assert_eq!(held(&maps), [None, None, None, Some(4), Some(5), Some(6), None], "the last three");
        assert_eq!(maps.peek(1).unwrap().next_seq, 7);
        assert_eq!((maps.entries(), gauge.load(Ordering::Relaxed)), (3, 3));
        // Full, the ring goes round: each new slot pushes out the oldest.
        for seq in 7..=12 {
            maps.note(1, seq, 100 + seq, seq);
        }
        let offsets: Vec<Option<u64>> = (104..=112).map(|slot| maps.peek(1).unwrap().offset(slot)).collect();
        assert_eq!(offsets, [None, None, None, None, None, None, Some(10), Some(11), Some(12)]);
        assert_eq!(maps.peek(1).unwrap().slots.capacity(), 3, "no spare capacity past the window");
        assert_eq!((maps.entries(), gauge.load(Ordering::Relaxed)), (3, 3));
        maps.forget(1);
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
    }

    /// Two messages of a window with one slot (16 bits: a 2⁻¹⁶ chance)
    /// each keep a place: once the first leaves the window, a resend of
    /// the second still finds it.
    #[test]
    fn messages_that_share_a_slot_each_keep_their_place() {
        let mut maps = SlotMaps::new(100, 3, Arc::new(AtomicUsize::new(0)));
        maps.note_all(1, [(1, 50, 10), (2, 50, 20), (3, 60, 30)]);
        assert_eq!(maps.entries(), 3);
        maps.note(1, 4, 70, 40);
        assert_eq!(maps.peek(1).unwrap().offset(50), Some(20), "the first left, the second stays");
        maps.note(1, 5, 80, 50);
        assert_eq!(maps.peek(1).unwrap().offset(50), None, "both left");
    }

    #[test]
    fn slot_maps_drop_the_conversations_touched_longest_ago_and_keep_the_bound() {
        let gauge = Arc::new(AtomicUsize::new(0));
        let mut maps = SlotMaps::new(8, 1024, gauge.clone());
        for conv in 1..=3 {
            maps.note_all(conv, (1..=2).map(|seq| (seq, conv * 100 + seq, seq)));
        }
        assert_eq!(maps.get(1).map(|c| c.next_seq), Some(3), "conversation 1 is touched again");
        // 6 held; 4 more make 10 > 8: down to 6 (three quarters), dropping
        // conversation 2 first, then 3; never 4 itself, nor 1 (touched).
        maps.note_all(4, (1..=4).map(|seq| (seq, 400 + seq, seq)));
        assert!(maps.peek(2).is_none() && maps.peek(3).is_none());
        assert!(maps.peek(1).is_some() && maps.peek(4).is_some());
        assert_eq!((maps.entries(), gauge.load(Ordering::Relaxed)), (6, 6));
        // A conversation not held is never started from one message.
        maps.note(2, 3, 999, 9);
        assert!(maps.peek(2).is_none());
        // One alone over the bound is not kept either.
        maps.note_all(5, (1..=9).map(|seq| (seq, 500 + seq, seq)));
        assert!(maps.peek(5).is_none());
        assert!(maps.entries() <= 8);
        drop(maps);
        assert_eq!(gauge.load(Ordering::Relaxed), 0, "a dropped cache leaves the gauge");
    }

    /// The bound is in slots, so what a slot costs is what the bound costs:
    /// 1,000 conversations with a full window of 128.
    #[test]
    fn a_full_window_costs_at_most_12_bytes_a_slot() {
        let (maps, held) = crate::heap::held_by(|| {
            let mut maps = SlotMaps::new(1 << 20, 128, Arc::new(AtomicUsize::new(0)));
            for conv in 0..1_000u64 {
                maps.note_all(conv, (1..=300).map(|seq| (seq, (conv * 7 + seq) & 0xffff, seq)));
            }
            maps
        });
        assert_eq!(maps.entries(), 128_000);
        let per_slot = held as f64 / maps.entries() as f64;
        // 11.3 measured (13.3 with 32-bit slots, before schema version 14).
        assert!(per_slot <= 12.0, "{per_slot:.1} bytes a slot");
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // From the SipHash paper: key 00 01 … 0f, message 00 01 … 0e.
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..15).collect();
        let mut s = SipHash24::new(k0, k1);
        s.write(&msg);
        assert_eq!(s.finish(), 0xa129_ca61_49be_45e5);
        let s = SipHash24::new(k0, k1);
        assert_eq!(s.finish(), 0x726f_db47_dd0e_0e31);
        // Split writes hash the same as one.
        let mut a = SipHash24::new(k0, k1);
        a.write(&msg[..3]);
        a.write(&msg[3..11]);
        a.write(&msg[11..]);
        assert_eq!(a.finish(), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn the_slot_separates_role_sender_and_cid_and_depends_on_the_key() {
        let k = DedupeKey { k0: 1, k1: 2 };
        assert_ne!(k.slot(Role::Visitor, "ab", "c"), k.slot(Role::Visitor, "a", "bc"));
        assert_eq!(k.slot(Role::Visitor, "v1", "cid"), k.slot(Role::Visitor, "v1", "cid"));
        assert_ne!(k.slot(Role::Visitor, "42", "cid"), k.slot(Role::Agent, "42", "cid"));
        assert_ne!(k.slot(Role::Agent, "42", "cid"), k.slot(Role::Bot, "42", "cid"));
        assert_ne!(
            k.slot(Role::Visitor, "v1", "cid"),
            DedupeKey { k0: 1, k1: 3 }.slot(Role::Visitor, "v1", "cid")
        );
        assert_ne!(DedupeKey::random(), DedupeKey::random());
    }
}
