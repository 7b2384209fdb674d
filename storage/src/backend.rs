//! The file under redb, wrapped so that fsyncs can be counted and watched.
//!
//! [`ProbeBackend`] forwards every call to redb's own `FileBackend` (or, in
//! tests, to any backend) and counts the `sync_data` calls that have
//! *returned*. That count is how the store reports fsyncs in its stats, and
//! the hook ([`BackendObserver`]) is how the tests prove, from below redb,
//! that no completion is released before the fsync of its commit returned.

use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{BackendError, StorageBackend};

/// The error type of `StorageBackend`'s I/O methods (without redb's
/// `experimental-api-5` feature).
type BackendIoError = std::io::Error;

/// Which file a backend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FileKind {
    /// redb's `kefu.redb`.
    Database,
    /// The write-ahead log, `kefu.wal`.
    Wal,
}

/// Sees every write and sync that reaches the storage backends. Test-only
/// instrumentation; production stores have none.
pub(crate) trait BackendObserver: Send + Sync + 'static {
    /// `data` is about to be written at `offset` of `file`.
    fn write(&self, _file: FileKind, _offset: u64, _data: &[u8]) {}
    /// An fsync of `file` is about to start. May block (tests hold commits
    /// here).
    fn sync_start(&self, _file: FileKind) {}
    /// An fsync of `file` has returned; `n` counts every returned fsync of
    /// the store (1-based).
    fn sync_returned(&self, _file: FileKind, _n: u64) {}
}

/// Counters shared between the backend and the store's stats.
#[derive(Debug, Default)]
pub(crate) struct SyncCounter {
    returned: AtomicU64,
    /// Nanoseconds spent in `sync_data`, summed, of the database and of
    /// the write-ahead log: the writer takes the difference across a
    /// commit, of the files it waited for.
    nanos: [AtomicU64; 2],
}

impl SyncCounter {
    pub(crate) fn returned(&self) -> u64 {
        self.returned.load(Ordering::Acquire)
    }

    /// Time spent in fsyncs of `file` since open.
    pub(crate) fn spent(&self, file: FileKind) -> Duration {
        Duration::from_nanos(self.nanos[file as usize].load(Ordering::Relaxed))
    }
}

/// The file-range lock methods of [`StorageBackend`], forwarded to
/// `self.inner`: a wrapper around a file locks what the file locks.
macro_rules! forward_range_locks {
    () => {
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(start, end)
        }

        fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }

        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(start, end)
        }

        fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_shared_range(start, end)
        }

        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(start, end)
        }

        fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.query_lock_range(start, end)
        }
    };
}
pub(crate) use forward_range_locks;

pub(crate) struct ProbeBackend {
    inner: Box<dyn StorageBackend>,
    kind: FileKind,
    syncs: Arc<SyncCounter>,
    observer: Option<Arc<dyn BackendObserver>>,
}

impl ProbeBackend {
    pub(crate) fn new(
        inner: Box<dyn StorageBackend>,
        kind: FileKind,
        syncs: Arc<SyncCounter>,
        observer: Option<Arc<dyn BackendObserver>>,
    ) -> Self {
        ProbeBackend { inner, kind, syncs, observer }
    }
}

impl fmt::Debug for ProbeBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeBackend")
            .field("inner", &self.inner)
            .field("kind", &self.kind)
            .field("syncs", &self.syncs)
            .finish()
    }
}

impl StorageBackend for ProbeBackend {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        if let Some(o) = &self.observer {
            o.sync_start(self.kind);
        }
        let started = Instant::now();
        self.inner.sync_data()?;
        let took = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.syncs.nanos[self.kind as usize].fetch_add(took, Ordering::Relaxed);
        let n = self.syncs.returned.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(o) = &self.observer {
            o.sync_returned(self.kind, n);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        if let Some(o) = &self.observer {
            o.write(self.kind, offset, data);
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), BackendIoError> {
        self.inner.close()
    }

    forward_range_locks!();
}
