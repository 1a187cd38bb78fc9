//! The process's memory allocator: the system allocator, with large blocks backed by transparent
//! huge pages on Linux.
//!
//! A generation allocates and frees tensors of tens to hundreds of MiB at every op. Large blocks
//! are fresh memory maps, and faulting them in 4 KiB at a time cost about a fifth of the CPU time
//! of a 512x512 generation (38 s of kernel time out of 192 s, `perf`: page clearing, fault
//! handling, LRU and cgroup accounting). `madvise(MADV_HUGEPAGE)` on every block of 32 MiB or
//! more (each one a memory map of its own) lets the kernel fault them in 2 MiB at a time where
//! transparent huge pages are in `madvise` or `always` mode (with `never`, nothing changes), as
//! glibc's own `glibc.malloc.hugetlb=1` tunable does, without asking users to set
//! `GLIBC_TUNABLES`; smaller blocks that come back are reused from the pool below.
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

/// Blocks at least this large get the huge-page advice. It was chosen when glibc still served the
/// blocks below 32 MiB from its heaps: advised from 4 MiB, the heaps' freed huge pages stayed
/// resident (55-85 MiB more peak RSS in an m18 fp32 run, no measurable speed gain; paired runs,
/// Zen 4, 2026-12-06). Blocks of [`reuse::MIN`] bytes or more are now [`reuse`]'s own maps, which
/// leave nothing resident when unmapped, so a lower threshold is worth measuring again.
#[cfg(target_os = "linux")]
const HUGE_MIN: usize = 32 << 20;
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

/// Buffers that are private (copy-on-write) maps of a weight file, handed out as `Vec`s that this
/// allocator frees with `munmap`.
///
/// Loading a model used to copy every tensor out of the file's pages into fresh memory. On the
/// machines measured, most of the load went to the kernel clearing those fresh pages (67 % of a
/// 6.8 s m18 load in `perf`, far more on a VM whose memory the host must first back). A private
/// map of the file's own pages (already in the page cache) needs no new memory: its page tables
/// are filled at once (`MADV_POPULATE_READ`), reads see the file, and a write (the f32 linear
/// layers' block transposition at load) copies only the pages it touches, never the file.
///
/// Only with this allocator installed as the global one (else the system allocator would be asked
/// to free a map): [`mapped::map_vec`] returns `None` until it has served an allocation. Like every mmap
/// loader, this assumes the weight files are not truncated while altdiff runs (the hub cache's
/// files never change).
#[cfg(target_os = "linux")]
pub mod mapped {
    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Smallest buffer worth a map of its own (smaller ones are copied as before).
    pub const MIN_BYTES: usize = 1 << 16;

    pub(super) static INSTALLED: AtomicBool = AtomicBool::new(false);
    /// Maps alive (so that frees skip the lookup when there are none).
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    /// Buffer address -> (map address, map length).
    static REGIONS: Mutex<BTreeMap<usize, (usize, usize)>> = Mutex::new(BTreeMap::new());

    /// False when `ALTDIFF_MAP_WEIGHTS=0` (read once): every tensor is then copied, as before (for
    /// measuring, or for weight files on a file system that may change under a running process).
    fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("ALTDIFF_MAP_WEIGHTS").map_or(true, |v| v.trim() != "0"))
    }

    /// `len` values of `T` read from `file` at byte `offset`, in a private map of the file; `None`
    /// when that is not possible here (the allocator not installed, a misaligned offset, a tiny
    /// buffer, the map refused): the caller copies instead.
    pub fn map_vec<T: Copy>(file: &std::fs::File, offset: u64, len: usize) -> Option<Vec<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        if !enabled()
            || !INSTALLED.load(Ordering::Relaxed)
            || bytes < MIN_BYTES
            || !offset.is_multiple_of(std::mem::align_of::<T>() as u64)
        {
            return None;
        }
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let start = offset / page * page;
        let delta = usize::try_from(offset - start).ok()?;
        let map_len = delta + bytes;
        // SAFETY: a new private map of the file; nothing else refers to its address range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                libc::off_t::try_from(start).ok()?,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: [base, base + map_len) is the map just made. MADV_POPULATE_READ (Linux 5.14)
        // only fills page tables from the page cache; on older kernels it fails and the pages
        // are mapped at first use instead.
        unsafe {
            const MADV_POPULATE_READ: libc::c_int = 22;
            libc::madvise(base, map_len, MADV_POPULATE_READ);
        }
        let ptr = base as usize + delta;
        if let Ok(mut regions) = REGIONS.lock() {
            regions.insert(ptr, (base as usize, map_len));
        } else {
            // SAFETY: the map made above, not handed out.
            unsafe { libc::munmap(base, map_len) };
            return None;
        }
        LIVE.fetch_add(1, Ordering::SeqCst);
        // SAFETY: `ptr` is aligned for T (offset is, and the map is page-aligned), points at
        // `bytes` readable and writable bytes that hold the file's values (any bit pattern is a
        // valid `T: Copy` number type here), and is freed by this allocator's `dealloc` or
        // `realloc`, which find it in REGIONS: for the global allocator it is an allocation of
        // its own.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, len, len) })
    }

    /// Whether `ptr` (a block of `size` bytes being freed) is one of the maps.
    #[inline]
    fn lookup(ptr: *mut u8, size: usize, remove: bool) -> Option<(usize, usize)> {
        if size < MIN_BYTES || LIVE.load(Ordering::Relaxed) == 0 {
            return None;
        }
        // Removing a small B-tree node frees it through the allocator again, below MIN_BYTES,
        // so this lock is never taken twice by one thread.
        let mut regions = REGIONS.lock().ok()?;
        if remove {
            regions.remove(&(ptr as usize))
        } else {
            regions.get(&(ptr as usize)).copied()
        }
    }

    /// Frees `ptr` if it is a map (true), else leaves it to the system allocator (false).
    pub(super) fn release(ptr: *mut u8, size: usize) -> bool {
        let Some((base, len)) = lookup(ptr, size, true) else {
            return false;
        };
        LIVE.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: the map registered for this buffer, which is being freed.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
        true
    }

    /// Whether the buffer that starts at `ptr` is one of these maps (for a caller about to write
    /// all of it, who had better copy it first).
    pub fn is_mapped(ptr: *const u8) -> bool {
        lookup(ptr.cast_mut(), MIN_BYTES, false).is_some()
    }

    /// Whether `ptr` (a block of `size` bytes) is a map.
    pub(super) fn is_map(ptr: *mut u8, size: usize) -> bool {
        lookup(ptr, size, false).is_some()
    }
}

/// Elsewhere than Linux no buffer is a map.
#[cfg(not(target_os = "linux"))]
pub mod mapped {
    /// Always false here.
    pub fn is_mapped(_: *const u8) -> bool {
        false
    }
}

/// Freed large blocks kept for the next allocation of the same size, instead of being unmapped.
///
/// glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh maps and unmaps them on
/// free, so every large activation of every UNet evaluation is memory the kernel must clear again
/// (`clear_page_erms` was 11 % of a whole m18 fp32 512x512 run on the Zen 4 machine, `perf`; the
/// same buffers recur at every step). Blocks of [`MIN`] bytes or more (aligned to at most a page)
/// are therefore rounded up to whole 2 MiB (huge-page) classes, and a freed one waits here, up to
/// [`cap`] bytes in all, for an allocation of the same class; when the pool is full the least
/// recently freed blocks are unmapped. `ALTDIFF_REUSE_MIB=0` turns it off (every block is unmapped
/// when freed).
///
/// Measured on that machine (m18 fp32 512x512, 3 DDIM steps, 2 threads, one run each): UNet step
/// 9.40 s without the pool, 8.66 / 8.77 / 8.49 s with 128 / 256 / 512 MiB, for a peak RSS of
/// 3.58 / 3.65 / 3.80 / 3.94 GiB: 128 MiB keeps most of the gain for 2 % more memory.
///
/// The pool never raises the peak: it holds at most the room between the large blocks in use
/// (`live`) and the most they have been since the stage began (`high`), so that in-use plus pooled
/// never exceeds what the stage's peak would be without a pool. A fresh block that would break this
/// unmaps the oldest pooled blocks first, and [`new_stage`] (a model unloaded) empties the pool and
/// starts a new peak. Every block is a memory map of its own ([`map`]), so an unmapped one leaves
/// the process at once: glibc, which served the blocks below 32 MiB from its heaps, kept freed ones
/// resident. Measured (m18 fp32 512x512, 2 PNDM steps, 2 threads, Zen 4, paired runs): peak RSS
/// 3.61-3.62 GiB with a plain 128 MiB pool, 3.56-3.57 GiB bounded by the peak with glibc's blocks,
/// 3.48-3.49 GiB with maps of its own, at the same UNet step time.
///
/// A reused block holds what its last user left (`alloc_zeroed` clears it); a block may serve
/// any alignment up to a page. No allocation happens under the lock (the slots are a fixed array).
#[cfg(target_os = "linux")]
pub(crate) mod reuse {
    use std::sync::Mutex;

    /// Blocks at least this large are pooled.
    pub const MIN: usize = 4 << 20;
    /// The alignment every block has (a memory map's).
    const PAGE: usize = 4096;
    /// Their sizes are rounded up to multiples of this.
    const CLASS: usize = 2 << 20;
    const SLOTS: usize = 48;

    #[derive(Clone, Copy)]
    struct Slot {
        ptr: usize,
        class: usize,
        /// When it was freed (a counter), for evicting the oldest.
        at: u64,
    }

    struct Pool {
        slots: [Slot; SLOTS],
        bytes: usize,
        clock: u64,
        /// Bytes of large blocks in use (handed out and not yet freed).
        live: usize,
        /// The most `live` has been since the stage began.
        high: usize,
    }

    impl Pool {
        /// Sends the oldest blocks back to the system until at most `room` bytes are pooled.
        fn shrink_to(&mut self, room: usize) {
            while self.bytes > room {
                let Some(oldest) = (0..SLOTS)
                    .filter(|&i| self.slots[i].ptr != 0)
                    .min_by_key(|&i| self.slots[i].at)
                else {
                    return;
                };
                let s = self.slots[oldest];
                self.slots[oldest] = EMPTY;
                self.bytes -= s.class;
                free(s.ptr, s.class);
            }
        }

        /// Pooled bytes allowed now: within the cap and the room below the stage's peak.
        fn room(&self) -> usize {
            cap().min(self.high.saturating_sub(self.live))
        }
    }

    /// Gives a block of `class` bytes back to the system.
    fn free(ptr: usize, class: usize) {
        // SAFETY: a block of `class` bytes from `map`, no longer used by anyone (the callers'
        // promise). A failure would leave the pages mapped, nothing worse.
        unsafe {
            libc::munmap(ptr as *mut libc::c_void, class);
        }
    }

    /// A fresh, zeroed block of `class(size)` bytes, page-aligned: a memory map of its own, so
    /// that it leaves the process's memory as soon as it is freed (glibc would keep blocks below
    /// 32 MiB in its heaps after a free, resident: 60-85 MiB more peak RSS, m18 fp32). Null
    /// when the system refuses.
    pub fn map(size: usize) -> *mut u8 {
        // SAFETY: a new anonymous private map; nothing else refers to its address range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                class(size),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        }
    }

    /// Whether an allocation of `size` bytes aligned to `align` is a block of this pool (made by
    /// [`map`]); larger alignments than a page go to the system allocator.
    pub fn handles(size: usize, align: usize) -> bool {
        size >= MIN && align <= PAGE
    }

    const EMPTY: Slot = Slot {
        ptr: 0,
        class: 0,
        at: 0,
    };
    static POOL: Mutex<Pool> = Mutex::new(Pool {
        slots: [EMPTY; SLOTS],
        bytes: 0,
        clock: 0,
        live: 0,
        high: 0,
    });

    /// The size a pooled block of `size` bytes really has.
    pub fn class(size: usize) -> usize {
        size.next_multiple_of(CLASS)
    }

    /// Bytes the pool may hold: `ALTDIFF_REUSE_MIB` (read once), default 128 MiB.
    pub fn cap() -> usize {
        static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        // The variable's String is small: its allocation never reaches this module.
        *CAP.get_or_init(|| {
            std::env::var("ALTDIFF_REUSE_MIB")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(128)
                .saturating_mul(1 << 20)
        })
    }

    /// A pooled block of `class(size)` bytes aligned for `align`, if one is waiting.
    pub fn take(size: usize, align: usize) -> Option<*mut u8> {
        if cap() == 0 {
            return None;
        }
        let class = class(size);
        let mut pool = POOL.lock().ok()?;
        let i = (0..SLOTS).find(|&i| {
            let s = pool.slots[i];
            s.ptr != 0 && s.class == class && s.ptr % align == 0
        })?;
        let ptr = pool.slots[i].ptr;
        pool.slots[i] = EMPTY;
        pool.bytes -= class;
        pool.live += class;
        Some(ptr as *mut u8)
    }

    /// A fresh block of `class(size)` bytes is about to be made (none was pooled): counted in use,
    /// and the pool shrunk so that in-use plus pooled stays within the stage's peak.
    pub fn fresh(size: usize) {
        if cap() == 0 {
            return;
        }
        let Ok(mut pool) = POOL.lock() else {
            return;
        };
        pool.live += class(size);
        pool.high = pool.high.max(pool.live);
        let room = pool.room();
        pool.shrink_to(room);
    }

    /// A model was unloaded: the pooled blocks (sized for its stage) go back to the system, and the
    /// next stage's peak starts from what is in use now.
    pub fn new_stage() {
        let Ok(mut pool) = POOL.lock() else {
            return;
        };
        pool.shrink_to(0);
        pool.high = pool.live;
    }

    /// Keeps the freed block `ptr` of `class(size)` bytes, or gives it (or older blocks, to make
    /// room) back to the system.
    ///
    /// # Safety
    /// `ptr` is a live block of `class(size)` bytes from `System`, no longer used by anyone.
    pub unsafe fn give(ptr: *mut u8, size: usize) {
        let class = class(size);
        let Ok(mut pool) = POOL.lock() else {
            free(ptr as usize, class);
            return;
        };
        if cap() == 0 {
            drop(pool);
            free(ptr as usize, class);
            return;
        }
        pool.live = pool.live.saturating_sub(class);
        let room = pool.room();
        if class > room {
            drop(pool);
            free(ptr as usize, class);
            return;
        }
        // Room first: the oldest blocks go back until this one fits in a free slot.
        pool.shrink_to(room - class);
        let slot = loop {
            if let Some(i) = (0..SLOTS).find(|&i| pool.slots[i].ptr == 0) {
                break i;
            }
            let n = pool.bytes;
            pool.shrink_to(n.saturating_sub(1));
        };
        pool.clock += 1;
        pool.slots[slot] = Slot {
            ptr: ptr as usize,
            class,
            at: pool.clock,
        };
        pool.bytes += class;
    }

    /// Bytes waiting in the pool now (for tests).
    #[cfg(test)]
    pub fn pooled_bytes() -> usize {
        POOL.lock().map(|p| p.bytes).unwrap_or(0)
    }

    /// (in use, the stage's peak of it) now (for tests).
    #[cfg(test)]
    pub fn live_and_high() -> (usize, usize) {
        POOL.lock().map(|p| (p.live, p.high)).unwrap_or((0, 0))
    }
}

/// A model was unloaded: the freed large blocks kept for reuse go back to the system, and the next
/// stage's memory peak is counted afresh (see the `reuse` pool). Nothing elsewhere than Linux.
pub fn new_stage() {
    #[cfg(target_os = "linux")]
    reuse::new_stage();
}

/// A block of `reuse::class(layout.size())` bytes for an allocation of `layout`: a pooled one
/// (cleared when `zeroed`) or a fresh one from the system (already zero when `zeroed`).
#[cfg(target_os = "linux")]
fn pooled(layout: Layout, zeroed: bool) -> *mut u8 {
    if let Some(p) = reuse::take(layout.size(), layout.align()) {
        if zeroed {
            // SAFETY: a pooled block of at least layout.size() bytes, now this caller's.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
        }
        return p;
    }
    reuse::fresh(layout.size());
    let size = reuse::class(layout.size());
    // A fresh map is already zero.
    let p = checked(reuse::map(layout.size()), size);
    advise(p, size);
    p
}

// SAFETY: every call is forwarded to `System` with the same arguments, except for the blocks that
// are file maps (`mapped`), which are unmapped or copied out instead, and blocks of `reuse::MIN`
// bytes or more aligned to at most a page, which are memory maps of `reuse::class(size)` bytes (or
// such a block reused) and go back to the pool or are unmapped with that size; `advise` does not touch the
// memory or the allocator's bookkeeping; a refused block ends the process instead of returning.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if !mapped::INSTALLED.load(std::sync::atomic::Ordering::Relaxed) {
            mapped::INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        #[cfg(target_os = "linux")]
        if reuse::handles(layout.size(), layout.align()) {
            return pooled(layout, false);
        }
        let p = checked(unsafe { System.alloc(layout) }, layout.size());
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if reuse::handles(layout.size(), layout.align()) {
            return pooled(layout, true);
        }
        let p = checked(unsafe { System.alloc_zeroed(layout) }, layout.size());
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if mapped::release(ptr, layout.size()) {
            return;
        }
        #[cfg(target_os = "linux")]
        if reuse::handles(layout.size(), layout.align()) {
            // SAFETY: a block `alloc` made of reuse::class(size) bytes, freed by its owner.
            unsafe { reuse::give(ptr, layout.size()) };
            return;
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(target_os = "linux")]
        {
            let map = mapped::is_map(ptr, layout.size());
            let align = layout.align();
            let (old_pooled, new_pooled) = (
                reuse::handles(layout.size(), align),
                reuse::handles(new_size, align),
            );
            if old_pooled
                && new_pooled
                && !map
                && reuse::class(new_size) == reuse::class(layout.size())
            {
                // The block's class already holds the new size.
                return ptr;
            }
            if map || old_pooled || new_pooled {
                // A map, or a pooled block on either side: a fresh block, the bytes, the old
                // one freed as `dealloc` would.
                // SAFETY: a fresh block of the new size (non-zero: realloc's contract), the
                // smaller of the two sizes copied, then the old block freed.
                unsafe {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let p = self.alloc(new_layout);
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                    return p;
                }
            }
        }
        let p = checked(unsafe { System.realloc(ptr, layout, new_size) }, new_size);
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large blocks come back from the pool: the same block for the same size class, cleared for
    /// `alloc_zeroed`, kept in place by a `realloc` inside its class, copied by one beyond it, and
    /// the pool never holds more than its cap. (Only this test uses `Allocator` directly: the lib's
    /// tests run on the system allocator.)
    #[cfg(target_os = "linux")]
    #[test]
    fn large_blocks_are_reused_within_the_cap() {
        let a = Allocator;
        let layout = Layout::from_size_align(5 << 20, 64).unwrap();
        // SAFETY: every block is used within its layout and freed once with it.
        unsafe {
            let p = a.alloc(layout);
            std::ptr::write_bytes(p, 0xab, layout.size());
            a.dealloc(p, layout);
            if reuse::cap() >= reuse::class(layout.size()) {
                assert!(reuse::pooled_bytes() >= reuse::class(layout.size()));
                // 5.5 MiB is the same 6 MiB class.
                let other = Layout::from_size_align(11 << 19, 64).unwrap();
                let q = a.alloc_zeroed(other);
                assert_eq!(q, p, "the freed block of the same class is reused");
                let bytes = std::slice::from_raw_parts(q, other.size());
                assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed cleared it");
                std::ptr::write_bytes(q, 7, other.size());
                let r = a.realloc(q, other, 6 << 20);
                assert_eq!(r, q, "a realloc inside the class keeps the block");
                let grown = Layout::from_size_align(6 << 20, 64).unwrap();
                let s = a.realloc(r, grown, 9 << 20);
                let bytes = std::slice::from_raw_parts(s, other.size());
                assert!(bytes.iter().all(|&b| b == 7), "a realloc beyond it copies");
                a.dealloc(s, Layout::from_size_align(9 << 20, 64).unwrap());
            }
            // Many sizes freed: the oldest go back to the system, the pool stays within its cap.
            let blocks: Vec<(*mut u8, Layout)> = (0..64)
                .map(|i| {
                    let l = Layout::from_size_align((4 << 20) + i * (3 << 20), 4096).unwrap();
                    let p = a.alloc(l);
                    assert_eq!(p as usize % 4096, 0);
                    *p = 1;
                    (p, l)
                })
                .collect();
            for (p, l) in blocks {
                a.dealloc(p, l);
                assert!(reuse::pooled_bytes() <= reuse::cap());
            }
            // The pool never raises the stage's peak: in use plus pooled stays within it.
            reuse::new_stage();
            assert_eq!(reuse::pooled_bytes(), 0);
            let within = || {
                let (live, high) = reuse::live_and_high();
                assert!(
                    live + reuse::pooled_bytes() <= high,
                    "{live} + pooled > {high}"
                );
            };
            let l8 = Layout::from_size_align(8 << 20, 64).unwrap();
            let l12 = Layout::from_size_align(12 << 20, 64).unwrap();
            let (x, y) = (a.alloc(l8), a.alloc(l8));
            a.dealloc(x, l8);
            within();
            if reuse::cap() >= reuse::class(l8.size()) {
                // Freed below the peak: kept.
                assert_eq!(reuse::pooled_bytes(), reuse::class(l8.size()));
            }
            // A fresh block of another class at the peak: the pooled one goes back first.
            let z = a.alloc(l12);
            within();
            assert_eq!(reuse::pooled_bytes(), 0);
            a.dealloc(y, l8);
            a.dealloc(z, l12);
            within();
        }
    }

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
