//! The client message id: what makes a resent `send` harmless.
//!
//! A client names each message it sends with a `cid` of its choosing and,
//! when it is unsure whether a `send` arrived (a dropped connection, a
//! `rate_limited`), sends it again with the same `cid`. The conversation
//! remembers recent `(sender, cid)` pairs and answers a repeat with the
//! first `ack` instead of storing a second message (PROTOCOL.md,
//! "Guarantees").
//!
//! A [`Cid`] is stored inline, [`CID_BYTES_MAX`] bytes and a length, so
//! carrying one costs no allocation; the window itself keeps only a key of
//! each `(sender, cid)` ([`window_key`]).

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::OnceLock;

use kefu_proto::ids::Role;

use crate::config::CID_BYTES_MAX;

/// A client message id, at most [`CID_BYTES_MAX`] bytes of UTF-8, never empty.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    len: u8,
    bytes: [u8; CID_BYTES_MAX],
}

/// Why a string is not a [`Cid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    /// `""`.
    #[error("cid is empty")]
    Empty,
    /// Longer than the ceiling.
    #[error("cid is {0} bytes, more than {CID_BYTES_MAX}")]
    TooLong(usize),
}

impl Cid {
    /// Copies `s` into a cid.
    pub fn new(s: &str) -> Result<Cid, CidError> {
        if s.is_empty() {
            return Err(CidError::Empty);
        }
        if s.len() > CID_BYTES_MAX {
            return Err(CidError::TooLong(s.len()));
        }
        let mut bytes = [0u8; CID_BYTES_MAX];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        // CID_BYTES_MAX fits a u8 (checked at compile time below).
        Ok(Cid { len: s.len() as u8, bytes })
    }

    /// The cid as the client sent it.
    pub fn as_str(&self) -> &str {
        // The bytes were copied from a `&str` whole, so they are UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

const _: () = assert!(CID_BYTES_MAX <= u8::MAX as usize);

/// What a conversation's cid window keeps of a `(sender, cid)`: two
/// SipHash-1-3 hashes under keys drawn at random once per process, 128
/// bits. Two different senders or cids get the same key with probability
/// 2⁻¹²⁸, which no one can steer without the keys; and the key is 16
/// bytes where the pair took 82 (an inline cid of up to 64 bytes, a
/// length, the sender's `Arc<str>` and role), so a conversation's full
/// window of 128 costs 4 KB instead of 13 (issue 11, memory per session).
pub(crate) fn window_key(role: Role, sender: &str, cid: &Cid) -> u128 {
    static KEYS: OnceLock<[RandomState; 2]> = OnceLock::new();
    let keys = KEYS.get_or_init(|| [RandomState::new(), RandomState::new()]);
    let half = |k: &RandomState| {
        let mut h = k.build_hasher();
        // `str` hashes its bytes and then 0xff, which UTF-8 never holds: the
        // sender's end is unambiguous, and ("ab", "c") is not ("a", "bc").
        (role as u8).hash(&mut h);
        sender.hash(&mut h);
        cid.as_str().hash(&mut h);
        h.finish()
    };
    (u128::from(half(&keys[0])) << 64) | u128::from(half(&keys[1]))
}

impl std::fmt::Debug for Cid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cid({:?})", self.as_str())
    }
}

impl std::fmt::Display for Cid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_key_tells_role_sender_and_cid_apart() {
        let c = |s: &str| Cid::new(s).unwrap();
        let key = window_key(Role::Visitor, "v1", &c("m1"));
        assert_eq!(key, window_key(Role::Visitor, "v1", &c("m1")), "stable within the process");
        assert_ne!(key, window_key(Role::Agent, "v1", &c("m1")));
        assert_ne!(key, window_key(Role::Visitor, "v2", &c("m1")));
        assert_ne!(key, window_key(Role::Visitor, "v1", &c("m2")));
        // Where the sender ends and the cid begins is part of the key.
        assert_ne!(window_key(Role::Visitor, "ab", &c("c")), window_key(Role::Visitor, "a", &c("bc")));
        // Both halves carry the input, under different keys.
        assert_ne!(key >> 64, key & u128::from(u64::MAX));
    }

    #[test]
    fn cids_round_trip_and_are_bounded() {
        let c = Cid::new("m-1 ✓").unwrap();
        assert_eq!(c.as_str(), "m-1 ✓");
        assert_eq!(c, Cid::new("m-1 ✓").unwrap());
        assert_ne!(c, Cid::new("m-1").unwrap());
        assert_eq!(Cid::new(""), Err(CidError::Empty));
        assert!(Cid::new(&"x".repeat(CID_BYTES_MAX)).is_ok());
        assert_eq!(Cid::new(&"x".repeat(CID_BYTES_MAX + 1)), Err(CidError::TooLong(CID_BYTES_MAX + 1)));
    }
}
