//! A counting wrapper around the global allocator, so benchmarks can say
//! how many heap allocations one relayed message costs, and on which thread
//! (`/metrics`: `kefu_allocations_total` and
//! `kefu_thread_allocations_total{thread="…"}`).
//!
//! Each thread counts into its own cache line (a slot picked the first time
//! the thread allocates), so counting adds one uncontended atomic add per
//! allocation and no sharing between shards. When a thread takes its slot
//! it also copies its OS thread name there (`kefu-shard-0`,
//! `kefu-storage`, …), read with `prctl` into a stack buffer because the
//! allocator must not allocate. Threads beyond the dedicated slots share
//! one last slot, reported as `other`.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

const SLOTS: usize = 64;
/// The slot shared by every thread that finds the others taken.
const OVERFLOW_SLOT: usize = SLOTS - 1;
/// Linux thread names are at most 15 bytes and a NUL.
const NAME_BYTES: usize = 16;

#[repr(align(128))]
struct Slot {
    count: AtomicU64,
    /// The owning thread's name, NUL-padded; valid once `named` is set.
    name: [AtomicU8; NAME_BYTES],
    named: AtomicBool,
}

static SLOT_TABLE: [Slot; SLOTS] = [const {
    Slot {
        count: AtomicU64::new(0),
        name: [const { AtomicU8::new(0) }; NAME_BYTES],
        named: AtomicBool::new(false),
    }
}; SLOTS];
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
            slot = take_slot();
            s.set(slot);
        }
        SLOT_TABLE[slot].count.fetch_add(1, Relaxed);
    });
}

/// Gives the calling thread a slot and labels it with the thread's name.
/// Runs inside the allocator, so it must not allocate.
#[cold]
fn take_slot() -> usize {
    let slot = NEXT_SLOT.fetch_add(1, Relaxed).min(OVERFLOW_SLOT);
    if slot < OVERFLOW_SLOT {
        let name = current_thread_name();
        let s = &SLOT_TABLE[slot];
        for (dst, src) in s.name.iter().zip(name) {
            dst.store(src, Relaxed);
        }
        s.named.store(true, Release);
    }
    slot
}

/// The calling thread's OS name, without allocating. The main thread's OS
/// name is the program's, so it is called `main` as std calls it.
fn current_thread_name() -> [u8; NAME_BYTES] {
    let mut name = [0u8; NAME_BYTES];
    // SAFETY: gettid and getpid have no memory effects.
    if unsafe { libc::gettid() == libc::getpid() } {
        name[..4].copy_from_slice(b"main");
        return name;
    }
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) to the
    // pointer, and `name` is 16 bytes that outlive the call.
    unsafe {
        libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr() as libc::c_ulong, 0, 0, 0);
    }
    name
}

/// Allocations (including reallocations) made by every thread so far.
pub fn allocations() -> u64 {
    SLOT_TABLE.iter().map(|s| s.count.load(Relaxed)).sum()
}

/// Allocations so far per thread name, sorted by name. Threads with the same
/// name are summed; names are reduced to `[A-Za-z0-9_.-]` so they can be
/// used as metric labels. Allocates: meant for `/metrics`, not hot paths.
pub fn allocations_by_thread() -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for (i, s) in SLOT_TABLE.iter().enumerate() {
        let count = s.count.load(Relaxed);
        if count == 0 {
            continue;
        }
        let label = if i == OVERFLOW_SLOT || !s.named.load(Acquire) {
            "other".to_string()
        } else {
            let bytes: Vec<u8> = s.name.iter().map(|b| b.load(Relaxed)).take_while(|&b| b != 0).collect();
            let label: String = bytes
                .iter()
                .map(|&b| if b.is_ascii_alphanumeric() || b"_.-".contains(&b) { b as char } else { '_' })
                .collect();
            if label.is_empty() { "unnamed".to_string() } else { label }
        };
        match out.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += count,
            None => out.push((label, count)),
        }
    }
    out.sort();
    out
}

/// Wraps an allocator and counts `alloc` and `realloc` calls.
#[derive(Debug)]
pub struct Counting<A>(pub A);

// SAFETY: every method forwards to the wrapped allocator with the same
// arguments and returns its result unchanged; counting touches no memory the
// allocator hands out, and never allocates itself.
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

    #[test]
    fn attributes_counts_to_thread_names() {
        let of =
            |name: &str| allocations_by_thread().into_iter().find(|(n, _)| n == name).map_or(0, |(_, c)| c);
        let spawn = |name: &str, n: u64| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || (0..n).for_each(|_| count()))
                .unwrap()
                .join()
                .unwrap();
        };
        spawn("alloc-test-a", 300);
        spawn("alloc-test-b", 200);
        // Two threads of one name are one label.
        spawn("alloc-test-b", 100);
        assert_eq!(of("alloc-test-a"), 300);
        assert_eq!(of("alloc-test-b"), 300);
        // Names that do not fit a label are spelled safely.
        spawn("a\"b\\c", 1);
        assert_eq!(of("a_b_c"), 1);
    }
}
