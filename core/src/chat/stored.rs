//! What the edge and the home read from storage, as a trait the shard loop
//! implements over the store (and tests over a map).
//!
//! DESIGN.md has reads go out as outputs and come back as inputs, like
//! writes. They are calls instead, on purpose: every read here is a redb
//! read transaction on the shard's own thread that the page cache answers
//! in microseconds (a conversation loaded on demand, a dedupe lookup below
//! the cid window, a page of history or replay), and the command that asks
//! cannot go on without the answer. As outputs, each would need the
//! command parked in a continuation and resumed, per read, on the message
//! path, for no gain in what can be tested: a test store answers from
//! memory, and can fail any read it is told to.

use kefu_proto::client::{ConvSummary, Msg};
use kefu_proto::{ConvId, ErrorCode, Role};

use crate::conversation::RestoredConversation;

/// A read that failed, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    /// The protocol error code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A stored user, as the chat core needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUser {
    /// The user id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Profile fields.
    pub meta: Vec<(String, String)>,
    /// SHA-256 of an anonymous visitor's key.
    pub visitor_key_hash: Option<[u8; 32]>,
}

/// What the business system set for a user apart from the profile: the
/// name and meta keys `SyncUser` set, laid over the credentials' at each
/// `connect`, and a block (`BlockVisitor`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserControl {
    /// The display name `SyncUser` set.
    pub name: Option<String>,
    /// The meta keys `SyncUser` set.
    pub meta: Vec<(String, String)>,
    /// Refused at `connect` while it holds.
    pub block: Option<Block>,
}

/// A block on a user's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Until when, ms since the epoch; 0: until unblocked.
    pub until_ms: u64,
    /// Why, as the refused client is told.
    pub reason: String,
    /// When it was decided, ms since the epoch.
    pub at_ms: u64,
}

impl Block {
    /// Whether it still refuses at `now_ms`.
    pub fn holds_at(&self, now_ms: u64) -> bool {
        self.until_ms == 0 || now_ms < self.until_ms
    }
}

/// An earlier append with the same (sender, conversation, cid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Earlier {
    /// Its seq.
    pub seq: u64,
    /// Its time.
    pub ts_ms: u64,
}

/// The reads of the chat core.
pub trait Stored {
    /// A conversation as its home rebuilds it (the visitor's profile, the
    /// last message's time), or `None` if it was never stored.
    fn conversation(&self, conv: ConvId) -> Result<Option<RestoredConversation>, ReadError>;

    /// A user's stored profile.
    fn user(&self, role: Role, id: &str) -> Result<Option<StoredUser>, ReadError>;

    /// What the business system set for a user apart from its profile.
    fn control(&self, role: Role, id: &str) -> Result<Option<UserControl>, ReadError>;

    /// An append by `(role, id)` of `cid` to `conv` with a seq below
    /// `below` (the home's cid window knows every one from `below` on).
    fn earlier(
        &self,
        role: Role,
        id: &str,
        conv: ConvId,
        cid: &str,
        below: u64,
    ) -> Result<Option<Earlier>, ReadError>;

    /// Up to `limit` messages of `conv` after `seq`, ascending.
    fn after(&self, conv: ConvId, seq: u64, limit: usize) -> Result<Vec<Msg>, ReadError>;

    /// Up to `limit` messages of `conv` before `seq`, ascending (the
    /// newest of them).
    fn before(&self, conv: ConvId, seq: u64, limit: usize) -> Result<Vec<Msg>, ReadError>;

    /// Visits the messages of `conv` with seq in `seqs`, newest first, with
    /// their text's length and attachment's size, until `visit` says stop.
    fn sizes(
        &self,
        conv: ConvId,
        seqs: std::ops::RangeInclusive<u64>,
        visit: &mut dyn FnMut(u64, usize, Option<usize>) -> bool,
    ) -> Result<(), ReadError>;

    /// The last seq of `conv` (0: none).
    fn last_seq(&self, conv: ConvId) -> Result<u64, ReadError>;

    /// A visitor's conversations, newest first, at most `limit`.
    fn conversations_of(&self, visitor: &str, limit: usize) -> Result<Vec<ConvSummary>, ReadError>;
}
