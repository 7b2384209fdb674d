//! The bridge's own storage source: how a call on the bridge thread makes
//! a write durable and waits for it.
//!
//! The writer thread serves one *source* per submitting thread (storage's
//! `write.rs`): the shards are sources `0..shards`, and the bridge is the
//! one after them. A call submits with a token, parks on a oneshot, and a
//! task of the bridge's runtime pops the source's completions (woken by
//! the store's `notify`, through a [`tokio::sync::Notify`]) and hands each
//! to the call that waits for it. A full source is answered at once as
//! busy: the in-flight bound is storage's `submit_queue_capacity`, so
//! nothing here grows without bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kefu_storage::{Committed, Completions, StorageError, SubmitError, WriteOp, Writer};
use tokio::sync::oneshot;

/// Why a write did not become durable.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Storage's queue for the bridge is full, or the store is closing:
    /// nothing was written; retry later.
    #[error("storage is busy or closing; retry shortly")]
    Busy,
    /// The write was refused or its group commit failed: nothing of it is
    /// stored.
    #[error("storage write failed: {0}")]
    Failed(StorageError),
}

impl From<WriteError> for tonic::Status {
    fn from(e: WriteError) -> tonic::Status {
        tonic::Status::unavailable(e.to_string())
    }
}

type Waiting = HashMap<u64, oneshot::Sender<Result<Committed, StorageError>>>;

/// Submits writes as the bridge's source and waits for them. Shared by
/// every call on the bridge thread.
pub struct BridgeWrites {
    writer: Writer,
    completions: Completions,
    /// Raised by the store's `notify` for this source.
    wake: Arc<tokio::sync::Notify>,
    waiting: Mutex<Waiting>,
    next_token: AtomicU64,
}

impl std::fmt::Debug for BridgeWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeWrites").field("source", &self.completions.source()).finish_non_exhaustive()
    }
}

impl BridgeWrites {
    /// Writes through `writer` as the source whose completions are
    /// `completions`; `wake` must be notified whenever the store calls
    /// `notify` with that source.
    pub fn new(writer: Writer, completions: Completions, wake: Arc<tokio::sync::Notify>) -> BridgeWrites {
        BridgeWrites {
            writer,
            completions,
            wake,
            waiting: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Nothing panics while holding it; a poisoned map is still whole.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `op` durable: returns once its group commit has returned.
    pub async fn write(&self, op: WriteOp) -> Result<Committed, WriteError> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Registered before the submit, so the completion always finds it.
        self.waiting().insert(token, tx);
        if let Err(e) = self.writer.submit(self.completions.source(), token, op) {
            self.waiting().remove(&token);
            return match e {
                SubmitError::Full(_) | SubmitError::Closed(_) => Err(WriteError::Busy),
            };
        }
        match rx.await {
            Ok(result) => result.map_err(WriteError::Failed),
            // The popping task is gone: the bridge is stopping.
            Err(_) => Err(WriteError::Busy),
        }
    }

    /// Hands completions to their callers until the runtime stops. Spawn
    /// it once on the bridge's runtime.
    pub async fn run(self: Arc<Self>) {
        loop {
            while let Some(c) = self.completions.pop() {
                let waiter = self.waiting().remove(&c.token);
                // A caller that gave up (its client went away) is not
                // waiting any more; the write is durable all the same.
                if let Some(tx) = waiter {
                    let _ = tx.send(c.result);
                }
            }
            // A notify since the last pop left a permit: no wake-up is lost.
            self.wake.notified().await;
        }
    }
}
