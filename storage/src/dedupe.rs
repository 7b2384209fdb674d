//! The cid dedupe index: has (sender, conversation, cid) been appended?
//!
//! The sender is its role and its id: agent `42` and visitor `42` are two
//! people, and the same cid from each is two messages.
//!
//! Every `conv_index` entry carries, next to the message's offset, its
//! *dedupe slot*: a keyed 64-bit hash (SipHash-2-4, with a secret random
//! key per database) of the sender's role and id and the cid (schema
//! version 3; version 2 hashed the id and cid only, and an upgrade
//! recomputes every slot, see `upgrade.rs`). So the dedupe index is
//! the conversation's index itself, and an append writes no third B-tree.
//! A separate `(conversation, slot) → offset` table cost a third of the
//! throughput (600k appends over 10k conversations: 106k msg/s with it,
//! 160k without; the raw ceiling 121k and 192k), because every commit
//! rewrites about one page per conversation touched in every tree keyed by
//! conversation, and that page traffic is what the disk limits.
//!
//! Lookups never scan a whole conversation twice. The writer keeps, per
//! conversation it has seen, a map from slot to offset (loaded by one range
//! scan of the conversation's index on first touch, bounded by
//! `conv_cache_entries`), so its check is in memory. Readers share a
//! [`SlotCache`] that they extend with only the index entries appended
//! since their last look, so `Reader::dedupe` costs ~1 µs whatever the
//! conversation's length. Either way the log record is the truth: a slot
//! match counts only if the record it points at has the same sender and
//! cid, so two different (sender, cid) with equal slots — a 2⁻⁶⁴ accident,
//! and not something a client can provoke without the secret key — are
//! told apart by looking at every entry of the conversation.

use std::collections::HashMap;

use redb::ReadableTable;

use kefu_proto::ids::Role;

use crate::error::{IoContext, StorageError};
use crate::record::{ArchivedLogRecord, access};

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
    /// a fixed function, and [`role_tag`] never changes).
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
        s.finish()
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
    log: &impl ReadableTable<u64, &'static [u8]>,
    offset: u64,
    conv: u64,
    (role, sender): (Role, &str),
    cid: &str,
) -> Result<Option<Original>, StorageError> {
    let guard = log.get(offset).ctx("read log")?.ok_or_else(|| StorageError::Corrupt {
        table: "conv_index",
        key: format!("conversation {conv}"),
        message: format!("points at offset {offset}, which is not in the log"),
    })?;
    let archived: &ArchivedLogRecord = access(guard.value(), "log", &offset)?;
    match archived {
        ArchivedLogRecord::Message(m) if m.conv.to_native() == conv => {
            Ok((m.from.role.get() == role && m.from.id.as_str() == sender && m.cid.as_str() == cid)
                .then(|| Original { offset, seq: m.seq.to_native(), ts_ms: m.ts_ms.to_native() }))
        }
        _ => Err(StorageError::Corrupt {
            table: "conv_index",
            key: format!("conversation {conv}"),
            message: format!("points at offset {offset}, which is not a message of that conversation"),
        }),
    }
}

/// Looks (sender, conv, cid) up by scanning the conversation's index: every
/// entry whose slot matches is checked against its log record.
pub(crate) fn find_by_scan(
    key: &DedupeKey,
    index: &impl ReadableTable<(u64, u64), (u64, u64)>,
    log: &impl ReadableTable<u64, &'static [u8]>,
    conv: u64,
    sender: (Role, &str),
    cid: &str,
) -> Result<Option<Original>, StorageError> {
    let slot = key.slot(sender.0, sender.1, cid);
    for entry in index.range((conv, 0)..=(conv, u64::MAX)).ctx("read conv_index")? {
        let (offset, s) = entry.ctx("read conv_index")?.1.value();
        if s == slot
            && let Some(original) = check(log, offset, conv, sender, cid)?
        {
            return Ok(Some(original));
        }
    }
    Ok(None)
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

/// The readers' view of dedupe slots, shared by every [`Reader`] of a
/// store: per conversation, the slots of its messages up to some seq,
/// extended by reading only the index entries added since. Index entries
/// never change once committed, so extending is exact, and a lookup costs
/// one short range read instead of a scan of the whole conversation.
///
/// [`Reader`]: crate::Reader
pub(crate) struct SlotCache {
    key: DedupeKey,
    /// Bound on the slots held; past it the cache starts over.
    max_entries: usize,
    convs: U64Map<ConvSlots>,
    entries: usize,
}

#[derive(Default)]
struct ConvSlots {
    /// The first seq not yet read.
    next_seq: u64,
    /// Slot → offset of the first message with it.
    slots: U64Map<u64>,
}

impl SlotCache {
    pub(crate) fn new(key: DedupeKey, max_entries: usize) -> SlotCache {
        SlotCache { key, max_entries, convs: U64Map::default(), entries: 0 }
    }

    /// An empty cache with the same key and bound.
    pub(crate) fn empty_like(&self) -> SlotCache {
        SlotCache::new(self.key, self.max_entries)
    }

    /// Whether this cache has read `conv`'s index below `before_seq` and
    /// holds no slot of (sender, cid): no append of it below `before_seq`.
    pub(crate) fn knows_absent(&self, conv: u64, sender: (Role, &str), cid: &str, before_seq: u64) -> bool {
        self.convs.get(&conv).is_some_and(|c| {
            c.next_seq >= before_seq && !c.slots.contains_key(&self.key.slot(sender.0, sender.1, cid))
        })
    }

    /// Like [`find_by_scan`], reading only what this cache has not seen.
    /// The caller holds the cache's lock across `index` and `log`'s read
    /// transaction, so transactions come in snapshot order and the cache
    /// never knows of an entry the current snapshot cannot see.
    pub(crate) fn find(
        &mut self,
        index: &impl ReadableTable<(u64, u64), (u64, u64)>,
        log: &impl ReadableTable<u64, &'static [u8]>,
        conv: u64,
        sender: (Role, &str),
        cid: &str,
    ) -> Result<Option<Original>, StorageError> {
        if self.entries >= self.max_entries && !self.convs.contains_key(&conv) {
            self.convs.clear();
            self.entries = 0;
        }
        let c = self.convs.entry(conv).or_default();
        for entry in index.range((conv, c.next_seq)..=(conv, u64::MAX)).ctx("read conv_index")? {
            let (k, v) = entry.ctx("read conv_index")?;
            let (offset, slot) = v.value();
            if let std::collections::hash_map::Entry::Vacant(e) = c.slots.entry(slot) {
                e.insert(offset);
                self.entries += 1;
            }
            c.next_seq = k.value().1 + 1;
        }
        let Some(&offset) = c.slots.get(&self.key.slot(sender.0, sender.1, cid)) else { return Ok(None) };
        match check(log, offset, conv, sender, cid)? {
            Some(o) => Ok(Some(o)),
            // Another (sender, cid) has the slot: look at every entry.
            None => find_by_scan(&self.key, index, log, conv, sender, cid),
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
