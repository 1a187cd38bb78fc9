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
//!
//! An allocation the system refuses (out of memory, or a `ulimit -v`) would otherwise abort the
//! process with Rust's bare "memory allocation of N bytes failed" and a core dump. Here it prints one
//! line saying what to try instead and exits with code 1 (a failure during the work): images already
//! written stay, and an image in progress never reaches its final name (it is written to a
//! temporary file only once complete).

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

/// Writes `digits` of `n` into `buf` from `at`, returning the new position.
fn push_number(buf: &mut [u8], mut at: usize, n: usize) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in (0..len).rev() {
        if at < buf.len() {
            buf[at] = digits[i];
            at += 1;
        }
    }
    at
}

/// Copies `s` into `buf` from `at`, returning the new position.
fn push_str(buf: &mut [u8], mut at: usize, s: &str) -> usize {
    for &b in s.as_bytes() {
        if at < buf.len() {
            buf[at] = b;
            at += 1;
        }
    }
    at
}

/// The one-line message for a refused allocation of `size` bytes, without allocating.
fn oom_message(buf: &mut [u8], size: usize) -> usize {
    let mut at = push_str(buf, 0, "error: out of memory (could not allocate ");
    at = push_number(buf, at, size.div_ceil(1 << 20));
    at = push_str(buf, at, " MiB): ");
    at = push_str(buf, at, crate::error::OOM_ADVICE);
    push_str(buf, at, "\n")
}

/// Reports a refused allocation and exits with code 1 (see the module documentation).
#[cold]
fn out_of_memory(size: usize) -> ! {
    let mut buf = [0u8; 512];
    let len = oom_message(&mut buf, size);
    #[cfg(unix)]
    // SAFETY: write(2) and _exit(2) neither allocate nor unwind; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(1);
    }
    #[cfg(not(unix))]
    {
        let _ = len;
        std::alloc::handle_alloc_error(
            Layout::from_size_align(size, 1).unwrap_or(Layout::new::<u8>()),
        );
    }
}

/// `p`, or the out-of-memory exit when the system refused a non-empty block.
fn checked(p: *mut u8, size: usize) -> *mut u8 {
    if p.is_null() && size > 0 {
        out_of_memory(size);
    }
    p
}

// SAFETY: every call is forwarded to `System` with the same arguments; `advise` does not touch the
// memory or the allocator's bookkeeping; a refused block ends the process instead of returning.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = checked(unsafe { System.alloc(layout) }, layout.size());
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = checked(unsafe { System.alloc_zeroed(layout) }, layout.size());
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = checked(unsafe { System.realloc(ptr, layout, new_size) }, new_size);
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_message_is_one_line_with_the_size_and_advice() {
        let mut buf = [0u8; 512];
        let len = oom_message(&mut buf, 3 << 30);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(
            text.starts_with(
                "error: out of memory (could not allocate 3072 MiB): try a smaller --height"
            ),
            "{text}"
        );
        assert!(text.ends_with('\n') && text.lines().count() == 1, "{text}");
        // A tiny buffer truncates instead of overflowing.
        let mut small = [0u8; 10];
        assert_eq!(oom_message(&mut small, 5), 10);
    }
}
