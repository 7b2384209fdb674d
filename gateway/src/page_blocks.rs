//! Exact-size blocks for the storage's cached pages.
//!
//! redb keeps each page it caches in an `Arc<[u8]>`: the page (4 KiB, or a
//! power-of-two multiple for a large value) and 16 bytes of reference
//! counts, so 4,112 bytes for the usual page. mimalloc serves 4,112 bytes
//! from its 5,120-byte size class, the next one up: a fifth of every byte
//! the page cache holds was slack (BENCHMARKS.md, "Issue 11: memory per
//! session under 4 KB on a fresh gateway"). The cache
//! is the largest thing in the process once it fills (`storage.cache_bytes`,
//! 256 MiB by default), and the pages of what new visitors write are a
//! quarter of a chat session's memory on a gateway whose cache is still
//! filling.
//!
//! [`Paged`] wraps an allocator and serves every allocation a little over
//! 4, 8 or 16 KiB (up to [`SLACK`] bytes over, alignment at most
//! [`ALIGN`]) from blocks of exactly that power of two plus [`SLACK`],
//! carved from 2 MiB chunks mapped from the kernel. A block is routed by
//! its layout alone, which `dealloc` and `realloc` are given again, so no
//! header or lookup is needed to tell a block from the inner allocator's.
//! The size is all it goes by: anything else of those sizes gets a block
//! too (an unpooled outbound frame of 4,097–4,160 bytes, say), which is
//! harmless, and rare beside the pages.
//!
//! Freed blocks go on their class's free list and are reused, last freed
//! first; chunks are never unmapped. What the classes hold is therefore
//! their high-water mark. redb keeps its pages, read cache and write
//! buffer together, within `storage.cache_bytes` (a write past half of it
//! flushes dirty pages to the file), so the mark stays near that bound
//! plus the pages readers and the open transaction hold at the moment;
//! unlike mimalloc, which would return a burst's pages to the kernel after
//! a while, the blocks keep them for the cache to fill again. The gauge
//! `kefu_page_block_bytes{state="mapped"}` shows the mark. A class's list is
//! behind a mutex, held for a few instructions: pages are taken per
//! commit or per cache miss, not per message, so the storage writer and
//! the shards seldom meet there.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// How far over its power of two an allocation may be and still get a
/// block: redb's `Arc` header is 16 bytes; 64 keeps every block 64-byte
/// aligned.
pub const SLACK: usize = 64;

/// The largest alignment a block offers (a block's size is a multiple of
/// it, and chunks are page-aligned).
pub const ALIGN: usize = 64;

/// The powers of two served: 4, 8 and 16 KiB pages.
const POWERS: [usize; 3] = [4096, 8192, 16384];

/// Chunks are mapped this large (blocks never straddle two).
const CHUNK_BYTES: usize = 2 << 20;

/// One size class: a free list threaded through the freed blocks, and the
/// unused end of the newest chunk.
struct Class {
    block: usize,
    free: Mutex<Free>,
    /// Blocks handed out and not yet freed.
    in_use: AtomicUsize,
    /// Chunks mapped so far.
    chunks: AtomicUsize,
}

struct Free {
    /// The last freed block; its first word points at the one freed before.
    head: *mut u8,
    /// The next never-used block of the newest chunk, and that chunk's end
    /// (both null before the first chunk).
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: the pointers are to memory this module owns (blocks on the free
// list, the unused end of a chunk), only touched under the class's mutex.
unsafe impl Send for Free {}

static CLASSES: [Class; 3] = [class(POWERS[0]), class(POWERS[1]), class(POWERS[2])];

const fn class(power: usize) -> Class {
    Class {
        block: power + SLACK,
        free: Mutex::new(Free { head: ptr::null_mut(), next: ptr::null_mut(), end: ptr::null_mut() }),
        in_use: AtomicUsize::new(0),
        chunks: AtomicUsize::new(0),
    }
}

/// The class that serves `layout`, if one does.
fn class_of(layout: Layout) -> Option<&'static Class> {
    if layout.align() > ALIGN {
        return None;
    }
    let size = layout.size();
    POWERS.iter().position(|&p| size > p && size <= p + SLACK).map(|i| &CLASSES[i])
}

impl Class {
    fn alloc(&self) -> *mut u8 {
        // A poisoned lock cannot happen (nothing here panics), and if it
        // did, the list itself is intact: carry on.
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let block = if !free.head.is_null() {
            let block = free.head;
            // SAFETY: a block on the list is ours, at least a word long and
            // 64-byte aligned, and its first word was written by `dealloc`.
            free.head = unsafe { block.cast::<*mut u8>().read() };
            block
        } else {
            // Room left in the newest chunk (none before the first).
            let room = free.end.addr() - free.next.addr();
            if room < self.block {
                let Some(chunk) = map_chunk() else { return ptr::null_mut() };
                self.chunks.fetch_add(1, Relaxed);
                free.next = chunk;
                free.end = chunk.wrapping_add(CHUNK_BYTES);
            }
            let block = free.next;
            // Stays within the chunk or one past its end (checked above).
            free.next = free.next.wrapping_add(self.block);
            block
        };
        self.in_use.fetch_add(1, Relaxed);
        block
    }

    /// # Safety
    /// `block` came from this class's `alloc` and is not used again.
    unsafe fn dealloc(&self, block: *mut u8) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller gave the block back; its first word is ours.
        unsafe { block.cast::<*mut u8>().write(free.head) };
        free.head = block;
        self.in_use.fetch_sub(1, Relaxed);
    }
}

/// A fresh chunk, or `None` if the kernel has no memory to map.
fn map_chunk() -> Option<*mut u8> {
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            CHUNK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

/// What the block classes hold, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageBlockStats {
    /// Bytes of blocks handed out and not yet freed.
    pub in_use_bytes: usize,
    /// Bytes of chunks mapped (in use, on free lists, or never used yet).
    pub mapped_bytes: usize,
}

/// The block classes' totals so far.
pub fn stats() -> PageBlockStats {
    CLASSES.iter().fold(PageBlockStats::default(), |s, c| PageBlockStats {
        in_use_bytes: s.in_use_bytes + c.in_use.load(Relaxed) * c.block,
        mapped_bytes: s.mapped_bytes + c.chunks.load(Relaxed) * CHUNK_BYTES,
    })
}

/// Wraps an allocator: page-sized allocations from exact-size blocks,
/// everything else from the inner allocator.
#[derive(Debug)]
pub struct Paged<A>(pub A);

// SAFETY: an allocation is routed by its layout alone (`class_of`), and the
// same layout comes back with `dealloc` and `realloc`, so each pointer is
// returned to the allocator that made it. Blocks are `block` bytes (at
// least the size asked for), 64-byte aligned (chunks are page-aligned, and
// block sizes are multiples of 64), and never handed out twice before they
// are freed (the free list and the chunk's unused end are disjoint, both
// under the class's mutex).
unsafe impl<A: GlobalAlloc> GlobalAlloc for Paged<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => class.alloc(),
            // SAFETY: forwarded as is; the caller upholds alloc's contract.
            None => unsafe { self.0.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => {
                let block = class.alloc();
                if !block.is_null() {
                    // SAFETY: the block is at least `layout.size()` bytes, ours.
                    unsafe { block.write_bytes(0, layout.size()) };
                }
                block
            }
            // SAFETY: forwarded as is.
            None => unsafe { self.0.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: this layout was served by this class (routing is by
            // layout only), and the caller gives the block up.
            Some(class) => unsafe { class.dealloc(ptr) },
            // SAFETY: forwarded as is; ptr came from the inner allocator.
            None => unsafe { self.0.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the
        // alignment, does not overflow isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (old, new) = (class_of(layout), class_of(new_layout));
        match (old, new) {
            // SAFETY: neither side is a block: forwarded as is.
            (None, None) => unsafe { self.0.realloc(ptr, layout, new_size) },
            // Still fits the block it has.
            (Some(a), Some(b)) if ptr::eq(a, b) => ptr,
            _ => {
                // SAFETY: `new_layout` is valid (above); `ptr` holds
                // `layout.size()` initialised bytes the caller gives up.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    static PAGED: Paged<System> = Paged(System);

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn only_sizes_just_over_a_page_and_small_alignments_get_blocks() {
        let served = |size, align| class_of(layout(size, align)).map(|c| c.block);
        assert_eq!(served(4096, 8), None, "a page alone fits the inner allocator's class");
        assert_eq!(served(4097, 8), Some(4160));
        assert_eq!(served(4112, 8), Some(4160), "redb's Arc of a 4 KiB page");
        assert_eq!(served(4160, 64), Some(4160));
        assert_eq!(served(4161, 8), None);
        assert_eq!(served(8208, 8), Some(8256));
        assert_eq!(served(16400, 16), Some(16448));
        assert_eq!(served(32784, 8), None);
        assert_eq!(served(4112, 128), None, "an alignment a block cannot promise");
    }

    #[test]
    fn blocks_are_aligned_and_zeroed_when_asked() {
        let l = layout(4112, 16);
        // SAFETY: valid layouts; each block is freed once with its layout.
        unsafe {
            let a = PAGED.alloc(l);
            assert!(!a.is_null());
            assert_eq!(a as usize % ALIGN, 0);
            a.write_bytes(0xAB, l.size());
            PAGED.dealloc(a, l);
            let b = PAGED.alloc_zeroed(l);
            // Other tests share the classes, so the freed block may have
            // gone to one of them; whichever block came back is zeroed.
            assert!(std::slice::from_raw_parts(b, l.size()).iter().all(|&x| x == 0));
            PAGED.dealloc(b, l);
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_the_blocks_and_the_inner_allocator() {
        // SAFETY: each pointer is used with the layout it was last given.
        unsafe {
            let mut size = 1000;
            let mut p = PAGED.alloc(layout(size, 8));
            for i in 0..size {
                *p.add(i) = i as u8;
            }
            // inner → block → same block → bigger block → inner → block
            for next in [4100, 4150, 8200, 40_000, 4110] {
                p = PAGED.realloc(p, layout(size, 8), next);
                assert!(!p.is_null());
                for i in 0..size.min(next).min(1000) {
                    assert_eq!(*p.add(i), i as u8, "byte {i} after realloc {size} -> {next}");
                }
                size = next;
            }
            PAGED.dealloc(p, layout(size, 8));
        }
    }

    #[test]
    fn threads_never_share_a_block() {
        // Every thread fills its live blocks with its own byte and checks
        // them before freeing: a block handed out twice would be overwritten.
        let threads: Vec<_> = (1u8..=4)
            .map(|me| {
                std::thread::spawn(move || {
                    let mut live: Vec<(*mut u8, Layout)> = Vec::new();
                    let mut seed = u64::from(me);
                    for _ in 0..20_000 {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        if live.len() > 64 || (seed >> 60) < 6 && !live.is_empty() {
                            let (p, l) = live.swap_remove((seed >> 33) as usize % live.len());
                            // SAFETY: allocated below with `l`, freed once.
                            unsafe {
                                assert!(std::slice::from_raw_parts(p, l.size()).iter().all(|&b| b == me));
                                PAGED.dealloc(p, l);
                            }
                        } else {
                            let size = POWERS[(seed >> 40) as usize % 3] + 1 + (seed >> 20) as usize % SLACK;
                            let l = layout(size, 16);
                            // SAFETY: a valid layout; the block is ours until freed.
                            unsafe {
                                let p = PAGED.alloc(l);
                                assert!(!p.is_null());
                                p.write_bytes(me, size);
                                live.push((p, l));
                            }
                        }
                    }
                    for (p, l) in live {
                        // SAFETY: as above.
                        unsafe { PAGED.dealloc(p, l) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_class_reuses_the_last_freed_block_and_counts_what_it_holds() {
        // A class of its own: the shared ones serve the other tests too.
        let c = class(4096);
        let a = c.alloc();
        let b = c.alloc();
        assert_eq!(b as usize - a as usize, 4160, "carved one after the other");
        assert_eq!((c.in_use.load(Relaxed), c.chunks.load(Relaxed)), (2, 1));
        // SAFETY: both came from `c.alloc` and are not used again.
        unsafe {
            c.dealloc(a);
            assert_eq!(c.alloc(), a, "the last freed block comes back first");
            c.dealloc(b);
            c.dealloc(a);
        }
        assert_eq!(c.in_use.load(Relaxed), 0);
        // A chunk holds 504 blocks; the 505th maps a second chunk.
        let blocks: Vec<*mut u8> = (0..505).map(|_| c.alloc()).collect();
        assert_eq!(c.chunks.load(Relaxed), 2);
        for b in blocks {
            // SAFETY: as above.
            unsafe { c.dealloc(b) };
        }
    }
}
