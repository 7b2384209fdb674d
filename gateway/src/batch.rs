//! Several queued frames of one connection written by one `writev`.
//!
//! A connection whose queue holds more than one frame (an agent behind a
//! busy queue, a resume replay, a pipelining echo client) would otherwise
//! pay one submission and one completion per frame. A [`WriteBatch`] takes
//! up to [`WRITEV_FRAMES_MAX`] of them off the queue and hands the kernel
//! their bytes as one vector; after a short write it drops what went out
//! and points the vector at what is left. Batches are pooled per shard
//! ([`BatchPool`]), so a flush allocates nothing once the pool is warm.

use std::cell::RefCell;

use monoio::buf::IoBuf;

use crate::conn::Out;

/// Frames one `writev` carries at most: enough to take a busy agent's
/// queue in a few calls, far below `IOV_MAX` (1024).
pub const WRITEV_FRAMES_MAX: usize = 64;

/// Batches a shard keeps for reuse: one per connection flushing at the same
/// time; more are made when needed and dropped when they come back.
const POOLED_BATCHES_MAX: usize = 64;

/// Frames taken off a connection's queue, and the `iovec`s that point at
/// their unwritten bytes.
pub struct WriteBatch {
    outs: Vec<Out>,
    /// Index of the first frame not wholly written.
    head: usize,
    iovecs: Vec<libc::iovec>,
}

impl WriteBatch {
    fn new() -> Self {
        Self {
            outs: Vec::with_capacity(WRITEV_FRAMES_MAX),
            head: 0,
            iovecs: Vec::with_capacity(WRITEV_FRAMES_MAX),
        }
    }

    /// Adds a frame after the others, or gives it back when the batch is
    /// full. An empty frame is dropped: it has nothing to write, and a
    /// vector of nothing would read as a closed socket.
    pub fn push(&mut self, out: Out) -> Result<(), Out> {
        if self.outs.len() >= WRITEV_FRAMES_MAX {
            return Err(out);
        }
        if out.bytes_init() > 0 {
            self.outs.push(out);
        }
        Ok(())
    }

    /// Frames added.
    pub fn frames(&self) -> usize {
        self.outs.len()
    }

    /// Whether every byte has been written.
    pub fn is_done(&self) -> bool {
        self.head == self.outs.len()
    }

    /// Points the vector at the unwritten bytes; call after adding frames
    /// and after each [`WriteBatch::advance`].
    pub fn prepare(&mut self) {
        self.iovecs.clear();
        for out in &self.outs[self.head..] {
            // The kernel only reads through iov_base; the cast is what the
            // C struct asks for.
            self.iovecs.push(libc::iovec {
                iov_base: out.read_ptr() as *mut libc::c_void,
                iov_len: out.bytes_init(),
            });
        }
    }

    /// Drops the first `n` unwritten bytes: the frames wholly written go
    /// (returning their buffers), the one cut in two keeps its rest.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.head < self.outs.len() {
            let out = &mut self.outs[self.head];
            let len = out.bytes_init();
            if n < len {
                out.advance(n);
                break;
            }
            n -= len;
            // The frame is written: release its buffer now, not when the
            // batch is recycled.
            self.outs[self.head] = Out::Static(&[]);
            self.head += 1;
        }
        self.prepare();
    }

    fn clear(&mut self) {
        self.outs.clear();
        self.iovecs.clear();
        self.head = 0;
    }
}

// SAFETY: every iovec points into a frame the batch holds (see the IoBuf
// impl of `Out`: that memory stays valid and unchanged while the frame
// lives), the vector is rebuilt only through `&mut self` (never while the
// runtime owns the batch), and its heap pointer does not move meanwhile.
unsafe impl monoio::buf::IoVecBuf for WriteBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iovecs.len()
    }
}

/// A shard's spare write batches.
#[derive(Default)]
pub struct BatchPool(RefCell<Vec<WriteBatch>>);

impl BatchPool {
    /// An empty batch, from the pool if it has one.
    pub fn take(&self) -> WriteBatch {
        self.0.borrow_mut().pop().unwrap_or_else(WriteBatch::new)
    }

    /// Empties a batch (dropping its frames) and keeps it for the next flush.
    pub fn give_back(&self, mut batch: WriteBatch) {
        batch.clear();
        let mut pool = self.0.borrow_mut();
        if pool.len() < POOLED_BATCHES_MAX {
            pool.push(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(batch: &WriteBatch) -> Vec<u8> {
        batch
            .iovecs
            .iter()
            .flat_map(|v| {
                // SAFETY: the test's frames are 'static slices, alive throughout.
                unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }.to_vec()
            })
            .collect()
    }

    #[test]
    fn short_writes_drop_what_went_out_and_keep_the_rest_in_order() {
        let mut batch = WriteBatch::new();
        for s in [&b"abc"[..], b"", b"defg", b"h"] {
            assert!(batch.push(Out::Static(s)).is_ok());
        }
        batch.prepare();
        assert_eq!(bytes_of(&batch), b"abcdefgh");
        batch.advance(2);
        assert_eq!(bytes_of(&batch), b"cdefgh");
        batch.advance(1);
        assert_eq!(bytes_of(&batch), b"defgh");
        assert_eq!(batch.frames(), 3, "the empty frame was never taken");
        batch.advance(4);
        assert_eq!(bytes_of(&batch), b"h");
        assert!(!batch.is_done());
        batch.advance(1);
        assert!(batch.is_done() && batch.iovecs.is_empty());
    }

    #[test]
    fn a_full_batch_refuses_the_next_frame_and_the_pool_recycles_batches() {
        let pool = BatchPool::default();
        let mut batch = pool.take();
        for _ in 0..WRITEV_FRAMES_MAX {
            assert!(batch.push(Out::Static(b"x")).is_ok());
        }
        assert!(batch.push(Out::Static(b"y")).is_err());
        assert_eq!(batch.frames(), WRITEV_FRAMES_MAX);
        pool.give_back(batch);
        let again = pool.take();
        assert_eq!(again.frames(), 0, "a recycled batch is empty");
        assert!(again.outs.capacity() >= WRITEV_FRAMES_MAX, "and keeps its room");
    }
}
