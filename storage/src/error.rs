//! What can go wrong, with enough context to act on it.
//!
//! [`StorageError`] is `Clone` because one failed commit fails every write in
//! its batch, and each of their completions carries the error.

use std::path::PathBuf;

use kefu_proto::ids::ErrorCode;

use crate::write::WriteOp;

/// A storage failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The database could not be opened (missing directory rights, held by
    /// another process, not a redb file, repair failed).
    #[error("cannot open the store at {path}: {message}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb or the OS said.
        message: String,
    },
    /// A read, write or commit failed in redb or below it (the disk). After
    /// a failed commit redb refuses further writes until reopened: the
    /// writer reopens it by itself (`reopen.rs`), so this is retryable.
    #[error("storage {context} failed: {message}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// What redb or the OS said.
        message: String,
    },
    /// Stored bytes failed validation (bit rot, a bug, a foreign file).
    #[error("corrupt value in table {table} at {key}: {message}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key, printed.
        key: String,
        /// What the validator said.
        message: String,
    },
    /// A record could not be encoded (it is over rkyv's limits).
    #[error("cannot encode record: {0}")]
    Encode(String),
    /// An append named a `seq` that is not its conversation's next one; it
    /// was not written. The home shard's counter and the log disagree.
    #[error("conversation {conv}: seq {got} is not the next one (expected {expected})")]
    SeqConflict {
        /// The conversation.
        conv: u64,
        /// The seq the log expects (last logged + 1).
        expected: u64,
        /// The seq the write carried.
        got: u64,
    },
    /// The store was closed before this write could be committed.
    #[error("the store is closed")]
    Closed,
    /// A group commit failed and the writer is getting the store to write
    /// again (reopening it, waiting for disk space): retry later.
    #[error("storage cannot write for now; retry")]
    Recovering,
    /// The configuration cannot work.
    #[error("invalid [storage] config: {0}")]
    Config(String),
}

impl StorageError {
    /// The client-facing error code for a command that failed on this.
    pub fn code(&self) -> ErrorCode {
        match self {
            // Nothing was written, and the home gives the seq back when a
            // write fails, so the same send (same cid) can succeed: a
            // retryable code, not `conflict`, which tells a client that
            // retrying is pointless (a closed conversation).
            StorageError::SeqConflict { .. } => ErrorCode::Unavailable,
            // A full disk, a failed fsync: the writer recovers by itself,
            // and nothing of the failed write was stored.
            StorageError::Closed | StorageError::Recovering | StorageError::Io { .. } => {
                ErrorCode::Unavailable
            }
            StorageError::Open { .. }
            | StorageError::Corrupt { .. }
            | StorageError::Encode(_)
            | StorageError::Config(_) => ErrorCode::Internal,
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(redb::Error) -> StorageError {
        move |e| StorageError::Io { context, message: e.to_string() }
    }
}

/// Maps any redb error type (they all convert into [`redb::Error`]) to
/// [`StorageError::Io`].
pub(crate) trait IoContext<T> {
    fn ctx(self, context: &'static str) -> Result<T, StorageError>;
}

impl<T, E: Into<redb::Error>> IoContext<T> for Result<T, E> {
    fn ctx(self, context: &'static str) -> Result<T, StorageError> {
        self.map_err(|e| StorageError::io(context)(e.into()))
    }
}

/// Why [`Writer::submit`](crate::Writer::submit) refused a write. The write
/// is handed back so the caller can retry it without a copy.
#[derive(Debug)]
pub enum SubmitError {
    /// The source already has `submit_queue_capacity` writes in flight
    /// (submitted, completion not yet popped). Back off: pop completions,
    /// then retry; tell the client `unavailable` if it persists.
    Full(WriteOp),
    /// The store is shut down.
    Closed(WriteOp),
}

impl SubmitError {
    /// The write that was not submitted.
    pub fn into_op(self) -> WriteOp {
        match self {
            SubmitError::Full(op) | SubmitError::Closed(op) => op,
        }
    }
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Full(_) => f.write_str("storage submit queue full"),
            SubmitError::Closed(_) => f.write_str("storage closed"),
        }
    }
}

impl std::error::Error for SubmitError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_is_retryable_and_a_damaged_record_is_not() {
        let io = StorageError::Io { context: "commit", message: "No space left on device".into() };
        assert_eq!(io.code(), ErrorCode::Unavailable);
        assert_eq!(StorageError::Recovering.code(), ErrorCode::Unavailable);
        assert_eq!(StorageError::Closed.code(), ErrorCode::Unavailable);
        let race = StorageError::SeqConflict { conv: 1, expected: 2, got: 3 };
        assert_eq!(
            race.code(),
            ErrorCode::Unavailable,
            "a seq race is retried, unlike a closed conversation"
        );
        let corrupt = StorageError::Corrupt { table: "log", key: "1".into(), message: "bad".into() };
        assert_eq!(corrupt.code(), ErrorCode::Internal);
    }
}
