//! The per-shard slab: every message buffer a shard uses, reserved at start.
//!
//! A shard reads from sockets and reassembles WebSocket messages into
//! buffers taken from here, and queues outbound frames that point into them.
//! Nothing on the message path calls the allocator: buffers come in a few
//! size classes (config `[slab] classes`), each class one anonymous mapping
//! reserved when the shard starts. Pages become resident only when a buffer
//! is first written, so a large reservation costs address space, not RSS.
//!
//! When a class runs dry the caller waits ([`Slab::acquire`]) until some
//! buffer comes back: a connection that cannot get a buffer stops reading,
//! which pushes back on its peer through TCP instead of growing memory.
//!
//! Two handle types:
//! - [`SlabBuf`] owns a buffer exclusively and may write it.
//! - [`Frame`] is a read-only, reference-counted view of a frozen buffer, so
//!   one encoded frame can be queued on many connections without a copy.
//!   The count lives in the slab's own table, so cloning allocates nothing.
//!
//! A slab belongs to one shard thread (`Rc`, no atomics on the hot path).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::ptr::NonNull;
use std::rc::Rc;
use std::task::{Poll, Waker};

use crate::config::SlabClass;

/// Why a slab could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot reserve {bytes} bytes for slab class {class_bytes}: {source}")]
pub struct SlabError {
    bytes: usize,
    class_bytes: usize,
    source: std::io::Error,
}

struct Class {
    bytes: usize,
    count: usize,
    base: NonNull<u8>,
    free: RefCell<Vec<u32>>,
    /// Reference counts of frozen buffers; 0 for free or exclusively owned ones.
    refs: Box<[Cell<u32>]>,
    exhausted: Cell<u64>,
}

impl Class {
    fn new(spec: SlabClass) -> Result<Self, SlabError> {
        let total = spec.bytes.checked_mul(spec.count).ok_or_else(|| SlabError {
            bytes: usize::MAX,
            class_bytes: spec.bytes,
            source: std::io::Error::other("size overflows"),
        })?;
        // SAFETY: an anonymous private mapping with no address hint has no
        // preconditions; the result is checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SlabError {
                bytes: total,
                class_bytes: spec.bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| SlabError {
            bytes: total,
            class_bytes: spec.bytes,
            source: std::io::Error::other("mmap returned null"),
        })?;
        // Hand out low indexes first so the pages that become resident stay few.
        let free = (0..spec.count as u32).rev().collect();
        let refs = (0..spec.count).map(|_| Cell::new(0)).collect();
        Ok(Self {
            bytes: spec.bytes,
            count: spec.count,
            base,
            free: RefCell::new(free),
            refs,
            exhausted: Cell::new(0),
        })
    }

    fn ptr(&self, index: u32) -> *mut u8 {
        debug_assert!((index as usize) < self.count);
        // SAFETY: index < count, so the offset stays inside the mapping of
        // count * bytes bytes made in `new`.
        unsafe { self.base.as_ptr().add(index as usize * self.bytes) }
    }
}

impl Drop for Class {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping made in `new`; every handle
        // holds an `Rc<Inner>`, so no buffer outlives this.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes * self.count);
        }
    }
}

struct Inner {
    classes: Box<[Class]>,
    /// Tasks waiting for any buffer to come back.
    waiters: RefCell<Vec<Waker>>,
}

impl Inner {
    fn release(&self, class: u8, index: u32) {
        let c = &self.classes[class as usize];
        debug_assert_eq!(c.refs[index as usize].get(), 0);
        c.free.borrow_mut().push(index);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }
}

/// A shard's pool of message buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct Slab(Rc<Inner>);

/// Occupancy of one size class, for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct ClassStats {
    /// Size of each buffer.
    pub bytes: usize,
    /// Buffers in the class.
    pub count: usize,
    /// Buffers handed out now.
    pub in_use: usize,
    /// Times a caller found this class (and all larger ones) empty.
    pub exhausted: u64,
}

impl Slab {
    /// Reserves every class. Fails if the address space cannot be had.
    pub fn new(classes: &[SlabClass]) -> Result<Self, SlabError> {
        let classes = classes.iter().map(|c| Class::new(*c)).collect::<Result<Vec<_>, _>>()?;
        let waiters = RefCell::new(Vec::with_capacity(64));
        Ok(Self(Rc::new(Inner { classes: classes.into_boxed_slice(), waiters })))
    }

    /// The largest buffer this slab can hand out.
    pub fn max_bytes(&self) -> usize {
        self.0.classes.last().map_or(0, |c| c.bytes)
    }

    /// A buffer of at least `min_bytes`, from the smallest class that has one
    /// free, or `None` if every fitting class is empty (or none fits).
    pub fn try_acquire(&self, min_bytes: usize) -> Option<SlabBuf> {
        let mut fitting = false;
        for (i, class) in self.0.classes.iter().enumerate() {
            if class.bytes < min_bytes {
                continue;
            }
            fitting = true;
            if let Some(index) = class.free.borrow_mut().pop() {
                return Some(SlabBuf { slab: self.0.clone(), class: i as u8, index, len: 0, shared_end: 0 });
            }
        }
        if fitting && let Some(c) = self.0.classes.iter().rev().find(|c| c.bytes >= min_bytes) {
            c.exhausted.set(c.exhausted.get() + 1);
        }
        None
    }

    /// A buffer of at least `preferred_bytes` if one is free, else the
    /// largest free one of at least `min_bytes`: for a socket read, which
    /// makes progress in any buffer, and should not wait while the large
    /// classes are taken by messages being assembled.
    pub fn try_acquire_or_smaller(&self, preferred_bytes: usize, min_bytes: usize) -> Option<SlabBuf> {
        if let Some(buf) = self.try_acquire(preferred_bytes) {
            return Some(buf);
        }
        for (i, class) in self.0.classes.iter().enumerate().rev() {
            if class.bytes >= preferred_bytes || class.bytes < min_bytes {
                continue;
            }
            if let Some(index) = class.free.borrow_mut().pop() {
                return Some(SlabBuf { slab: self.0.clone(), class: i as u8, index, len: 0, shared_end: 0 });
            }
        }
        None
    }

    /// Waits until a buffer of at least `min_bytes` is free and takes it.
    /// Returns `None` at once if no class is that large.
    pub async fn acquire(&self, min_bytes: usize) -> Option<SlabBuf> {
        if min_bytes > self.max_bytes() {
            return None;
        }
        poll_fn(|cx| match self.try_acquire(min_bytes) {
            Some(buf) => Poll::Ready(Some(buf)),
            None => {
                self.0.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Occupancy per class.
    pub fn stats(&self) -> Vec<ClassStats> {
        self.0
            .classes
            .iter()
            .map(|c| ClassStats {
                bytes: c.bytes,
                count: c.count,
                in_use: c.count - c.free.borrow().len(),
                exhausted: c.exhausted.get(),
            })
            .collect()
    }
}

/// An exclusively owned slab buffer. `len` bytes from the start are filled.
pub struct SlabBuf {
    slab: Rc<Inner>,
    class: u8,
    index: u32,
    /// Below 4 GiB: the classes are message buffers (u32 keeps the handle
    /// at 24 bytes, and it sits in every connection's task).
    len: u32,
    /// End of the ranges handed out by [`SlabBuf::share`]: the bytes before
    /// it may be read by frames, so they are never written again.
    shared_end: u32,
}

impl SlabBuf {
    /// Size of the whole buffer.
    pub fn capacity(&self) -> usize {
        self.slab.classes[self.class as usize].bytes
    }

    /// Bytes filled so far.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether nothing is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks the first `len` bytes as filled.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "slab buffer overrun: {len} > {}", self.capacity());
        assert!(len >= self.shared_end as usize, "slab buffer cut below its shared bytes");
        self.len = len as u32;
    }

    /// The filled bytes.
    pub fn filled(&self) -> &[u8] {
        &self.as_full()[..self.len()]
    }

    /// The whole buffer, filled or not (a new buffer holds stale bytes, never
    /// uninitialised memory: the mapping starts zeroed).
    pub fn as_full(&self) -> &[u8] {
        // SAFETY: this handle owns the buffer exclusively (refs == 0 and the
        // index is off the free list); the mapping is readable and initialised.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.capacity()) }
    }

    /// The whole buffer, writable. Panics once part of it is shared
    /// (use [`SlabBuf::filled_mut_from`] then).
    pub fn as_full_mut(&mut self) -> &mut [u8] {
        assert_eq!(self.shared_end, 0, "a shared slab buffer is written only past its shared bytes");
        // SAFETY: as in `as_full`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.capacity()) }
    }

    /// The filled bytes from `from` on, writable; `from` must not be below
    /// the bytes already shared.
    pub fn filled_mut_from(&mut self, from: usize) -> &mut [u8] {
        assert!(from >= self.shared_end as usize, "slab buffer written inside its shared bytes");
        assert!(from <= self.len(), "slab buffer range past its filled bytes");
        // SAFETY: this handle is the only writer, and `from..len` lies past
        // every range a frame may read (`shared_end`), inside the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr().add(from), self.len() - from) }
    }

    /// A frame of `range` of the filled bytes, shared with this handle,
    /// which may go on writing past it: how an echo goes out of the buffer
    /// it was read into while the rest of that buffer is still decoded.
    /// Ranges are handed out in order, never overlapping one before.
    pub fn share(&mut self, range: std::ops::Range<usize>) -> Frame {
        assert!(
            self.shared_end as usize <= range.start && range.start <= range.end && range.end <= self.len(),
            "shared range out of order or out of the filled bytes"
        );
        let refs = &self.slab.classes[self.class as usize].refs[self.index as usize];
        // The handle counts as one holder from its first share on; the
        // buffer goes back when the last of it and its frames is dropped.
        refs.set(if refs.get() == 0 { 2 } else { refs.get() + 1 });
        self.shared_end = range.end as u32;
        Frame {
            slab: self.slab.clone(),
            class: self.class,
            index: self.index,
            start: range.start as u32,
            end: range.end as u32,
        }
    }

    /// Appends `bytes` after the filled part; false (and nothing written) if
    /// they do not fit.
    pub fn extend(&mut self, bytes: &[u8]) -> bool {
        let len = self.len();
        let end = len + bytes.len();
        if end > self.capacity() {
            return false;
        }
        // SAFETY: len..end is inside the buffer and past every shared range
        // (`shared_end <= len`), and `&mut self` makes the write unique.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr().add(len), bytes.len()) };
        self.len = end as u32;
        true
    }

    /// Turns the buffer into a shared, read-only frame of `range`.
    pub fn freeze(self, range: std::ops::Range<usize>) -> Frame {
        assert!(range.start <= range.end && range.end <= self.capacity(), "frame range out of buffer");
        let this = std::mem::ManuallyDrop::new(self);
        let class = &this.slab.classes[this.class as usize];
        let refs = &class.refs[this.index as usize];
        // Unshared, the handle held no count; shared, its count passes to
        // the frame.
        if refs.get() == 0 {
            refs.set(1);
        }
        // SAFETY: `this` is never dropped, so moving the Rc out of it leaves
        // exactly one owner of the count it held.
        let slab = unsafe { std::ptr::read(&this.slab) };
        Frame { slab, class: this.class, index: this.index, start: range.start as u32, end: range.end as u32 }
    }

    fn ptr(&self) -> *mut u8 {
        self.slab.classes[self.class as usize].ptr(self.index)
    }
}

impl Drop for SlabBuf {
    fn drop(&mut self) {
        let refs = &self.slab.classes[self.class as usize].refs[self.index as usize];
        match refs.get() {
            0 | 1 => {
                refs.set(0);
                self.slab.release(self.class, self.index);
            }
            n => refs.set(n - 1),
        }
    }
}

// SAFETY: the pointer stays valid while the handle lives (the handle keeps
// the mapping alive through its Rc) and the handle is never moved between
// buffers; bytes_init never exceeds the buffer.
unsafe impl monoio::buf::IoBuf for SlabBuf {
    fn read_ptr(&self) -> *const u8 {
        self.ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: as for IoBuf; bytes_total is the buffer size, and the kernel writes
// only within it.
unsafe impl monoio::buf::IoBufMut for SlabBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        assert_eq!(self.shared_end, 0, "a read into a shared slab buffer");
        self.ptr()
    }
    fn bytes_total(&mut self) -> usize {
        self.capacity()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        self.set_len(pos);
    }
}

/// A shared, read-only view of part of a frozen slab buffer.
pub struct Frame {
    slab: Rc<Inner>,
    class: u8,
    index: u32,
    start: u32,
    end: u32,
}

impl Frame {
    /// The bytes of the frame.
    pub fn as_slice(&self) -> &[u8] {
        let ptr = self.slab.classes[self.class as usize].ptr(self.index);
        // SAFETY: the buffer is frozen (only shared readers exist) and
        // start..end was checked against its size in `freeze`.
        unsafe { std::slice::from_raw_parts(ptr.add(self.start as usize), (self.end - self.start) as usize) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Drops the first `n` bytes from this view (not from other clones).
    pub fn advance(&mut self, n: usize) {
        self.start = (self.start as usize + n).min(self.end as usize) as u32;
    }
}

impl Clone for Frame {
    fn clone(&self) -> Self {
        let r = &self.slab.classes[self.class as usize].refs[self.index as usize];
        r.set(r.get() + 1);
        Self {
            slab: self.slab.clone(),
            class: self.class,
            index: self.index,
            start: self.start,
            end: self.end,
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        let r = &self.slab.classes[self.class as usize].refs[self.index as usize];
        let n = r.get();
        debug_assert!(n > 0, "frame refcount underflow");
        r.set(n - 1);
        if n == 1 {
            self.slab.release(self.class, self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slab() -> Slab {
        Slab::new(&[SlabClass { bytes: 256, count: 2 }, SlabClass { bytes: 4096, count: 1 }]).unwrap()
    }

    #[test]
    fn smallest_fitting_class_then_larger_then_none() {
        let s = slab();
        let a = s.try_acquire(10).unwrap();
        let b = s.try_acquire(10).unwrap();
        assert_eq!((a.capacity(), b.capacity()), (256, 256));
        let c = s.try_acquire(10).unwrap();
        assert_eq!(c.capacity(), 4096, "falls through to a larger class");
        assert!(s.try_acquire(10).is_none());
        assert!(s.try_acquire(5000).is_none(), "nothing that large");
        assert_eq!(s.stats()[1].exhausted, 1);
        drop(a);
        assert_eq!(s.try_acquire(1).unwrap().capacity(), 256);
    }

    #[test]
    fn frozen_frames_return_the_buffer_when_the_last_clone_drops() {
        let s = slab();
        let mut b = s.try_acquire(100).unwrap();
        assert!(b.extend(b"hello world"));
        assert!(!b.extend(&[0; 300]), "does not overrun");
        let f = b.freeze(6..11);
        let g = f.clone();
        assert_eq!(g.as_slice(), b"world");
        assert_eq!(s.stats()[0].in_use, 1);
        drop(f);
        assert_eq!(s.stats()[0].in_use, 1);
        drop(g);
        assert_eq!(s.stats()[0].in_use, 0);
    }

    #[test]
    fn a_read_takes_a_smaller_buffer_rather_than_wait() {
        let s = slab();
        let big = s.try_acquire(4000).unwrap();
        let small = s.try_acquire_or_smaller(4000, 100).unwrap();
        assert_eq!(small.capacity(), 256);
        assert!(s.try_acquire_or_smaller(4000, 300).is_none(), "none at least that large");
        drop(big);
        assert_eq!(s.try_acquire_or_smaller(4000, 100).unwrap().capacity(), 4096);
    }

    #[test]
    fn acquire_waits_for_a_release() {
        let s = slab();
        let held: Vec<_> = (0..3).map(|_| s.try_acquire(1).unwrap()).collect();
        let s2 = s.clone();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async move {
            let waiter = monoio::spawn(async move { s2.acquire(4000).await.map(|b| b.capacity()) });
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            drop(held);
            assert_eq!(waiter.await, Some(4096));
        });
        assert!(
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .build()
                .unwrap()
                .block_on(async { s.acquire(1 << 20).await.is_none() })
        );
    }

    #[test]
    fn a_shared_buffer_goes_back_after_its_handle_and_every_frame() {
        let s = Slab::new(&[SlabClass { bytes: 256, count: 1 }]).unwrap();
        for frame_last in [true, false] {
            let mut buf = s.try_acquire(1).unwrap();
            assert!(buf.extend(b"hello, world"));
            let hello = buf.share(0..5);
            buf.filled_mut_from(5)[0] = b';';
            let world = buf.share(7..12);
            assert_eq!((hello.as_slice(), world.as_slice()), (&b"hello"[..], &b"world"[..]));
            if frame_last {
                drop(buf);
                drop(hello);
                assert!(s.try_acquire(1).is_none(), "a frame still reads it");
                drop(world);
            } else {
                drop(hello);
                drop(world);
                assert!(s.try_acquire(1).is_none(), "its handle still holds it");
                drop(buf);
            }
            let again = s.try_acquire(1).expect("returned once all are gone");
            drop(again);
        }
    }

    #[test]
    #[should_panic(expected = "inside its shared bytes")]
    fn shared_bytes_are_never_written_again() {
        let s = slab();
        let mut buf = s.try_acquire(1).unwrap();
        assert!(buf.extend(b"0123456789"));
        let _frame = buf.share(2..6);
        buf.filled_mut_from(5)[0] = 0;
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn shared_ranges_go_forward() {
        let s = slab();
        let mut buf = s.try_acquire(1).unwrap();
        assert!(buf.extend(b"0123456789"));
        let _a = buf.share(4..6);
        let _b = buf.share(0..2);
    }
}
