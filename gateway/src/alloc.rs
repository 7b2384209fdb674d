//! A counting wrapper around the global allocator, so benchmarks can say
//! how many heap allocations one relayed message costs (`/metrics`:
//! `kefu_allocations_total`).
//!
//! Each thread counts into its own cache line (a slot picked the first time
//! the thread allocates), so counting adds one uncontended atomic add per
//! allocation and no sharing between shards.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

const SLOTS: usize = 64;

#[repr(align(128))]
struct Slot(AtomicU64);

static COUNTS: [Slot; SLOTS] = [const { Slot(AtomicU64::new(0)) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn count() {
    // try_with: during thread teardown the slot may be gone; such late
    // allocations are not counted rather than aborting.
    let _ = MY_SLOT.try_with(|s| {
        let mut slot = s.get();
        if slot == usize::MAX {
            slot = NEXT_SLOT.fetch_add(1, Relaxed) % SLOTS;
            s.set(slot);
        }
        COUNTS[slot].0.fetch_add(1, Relaxed);
    });
}

/// Allocations (including reallocations) made by every thread so far.
pub fn allocations() -> u64 {
    COUNTS.iter().map(|s| s.0.load(Relaxed)).sum()
}

/// Wraps an allocator and counts `alloc` and `realloc` calls.
#[derive(Debug)]
pub struct Counting<A>(pub A);

// SAFETY: every method forwards to the wrapped allocator with the same
// arguments and returns its result unchanged; counting touches no memory the
// allocator hands out.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; the caller upholds alloc's contract.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; ptr came from this allocator.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded as is; ptr came from this allocator.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_thread() {
        // The test binary's allocator is the system one, so drive count() directly.
        let before = allocations();
        let handles: Vec<_> =
            (0..4).map(|_| std::thread::spawn(|| (0..1000).for_each(|_| count()))).collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(allocations() - before >= 4000);
    }
}
