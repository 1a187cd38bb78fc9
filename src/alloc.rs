//! The process's memory allocator: the system allocator, with large blocks backed by transparent
//! huge pages on Linux.
//!
//! A generation allocates and frees tensors of tens to hundreds of MiB at every op. Large blocks
//! are fresh memory maps, and faulting them in 4 KiB at a time cost about a fifth of the CPU time
//! of a 512x512 generation (38 s of kernel time out of 192 s, `perf`: page clearing, fault
//! handling, LRU and cgroup accounting). `madvise(MADV_HUGEPAGE)` on every block of 4 MiB or more
//! lets the kernel fault them in 2 MiB at a time where transparent huge pages are in `madvise` or
//! `always` mode (with `never`, nothing changes). This is what glibc's own `glibc.malloc.hugetlb=1`
//! tunable does, without asking users to set `GLIBC_TUNABLES`.
//!
//! The binary installs it with `#[global_allocator]`; elsewhere than Linux it is the system
//! allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large get the huge-page advice.
#[cfg(target_os = "linux")]
const HUGE_MIN: usize = 4 << 20;
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// See the module documentation.
pub struct Allocator;

#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HUGE_MIN {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside the block just returned by the system allocator;
        // MADV_HUGEPAGE only changes how the kernel backs those pages, never their contents. A
        // failure (e.g. THP compiled out) leaves the pages as they were, so it is ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _size: usize) {}

// SAFETY: every call is forwarded to `System` with the same arguments; `advise` does not touch the
// memory or the allocator's bookkeeping.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}
