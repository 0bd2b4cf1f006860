//! `libremora_preload.so`: an LD_PRELOAD library that gives an unmodified,
//! dynamically linked program a far-memory heap.
//!
//! It exports `malloc`, `free`, `calloc`, `realloc`, `posix_memalign`,
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc` and `malloc_usable_size`.
//! Allocations of the program's threads go to the far heap once it is up;
//! allocations made before (by the dynamic loader and libc), by the runtime's
//! own threads, or when the far range is full go to glibc's allocator (its
//! `__libc_*` entry points, so nothing recurses). `free` hands a pointer to
//! whichever allocator owns its address.
//!
//! The far heap starts in a constructor when `REMORA_CONTROLLER` is set
//! (`remora run` sets it and the rest of the `REMORA_*` variables). At exit,
//! if `REMORA_STATS_FILE` is set, a line of counters is appended to it.
//!
//! `fork`: the child inherits a complete copy (every far page is brought in
//! before the fork) and then uses the range as ordinary local memory.
//!
//! Far blocks carry no header: the far heap finds a block's size class or
//! size from its address (see `remora_paging::sizeclass`), so `free`,
//! `realloc` and `malloc_usable_size` need nothing else.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::io::Write;
use std::ptr::NonNull;

use remora_paging::heap::{self, FarHeap};

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// The runtime's own Rust allocations: straight to glibc, never far.
struct LibcAlloc;

// SAFETY: glibc's allocator returns blocks aligned to 16 bytes from malloc
// and to `align` from memalign, of at least the requested size; blocks are
// returned to the same allocator.
unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls into glibc's allocator.
        unsafe {
            if layout.align() <= 16 {
                __libc_malloc(layout.size()).cast()
            } else {
                __libc_memalign(layout.align(), layout.size()).cast()
            }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: ptr came from glibc's allocator (alloc above).
        unsafe { __libc_free(ptr.cast()) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: ptr came from __libc_malloc.
            return unsafe { __libc_realloc(ptr.cast(), new_size).cast() };
        }
        // SAFETY: as in alloc/dealloc; the copy stays within both blocks.
        unsafe {
            let q = __libc_memalign(layout.align(), new_size).cast::<u8>();
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                __libc_free(ptr.cast());
            }
            q
        }
    }
}

#[global_allocator]
static RUNTIME_ALLOC: LibcAlloc = LibcAlloc;

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Allocates `size` bytes aligned to `align` (a power of two ≥ 16) in the
/// far heap.
#[inline]
fn far_alloc(h: &'static FarHeap, size: usize, align: usize) -> Option<*mut c_void> {
    let layout = Layout::from_size_align(size, align).ok()?;
    h.alloc(layout).map(|p| p.as_ptr().cast())
}

fn alloc_aligned(align: usize, size: usize) -> *mut c_void {
    if let Some(h) = heap::use_far() {
        if let Some(p) = far_alloc(h, size, align) {
            return p;
        }
    }
    // SAFETY: plain calls into glibc's allocator.
    let p = unsafe {
        if align <= 16 {
            __libc_malloc(size)
        } else {
            __libc_memalign(align, size)
        }
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// `malloc(3)`.
///
/// # Safety
/// C allocator contract.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    alloc_aligned(16, size)
}

/// `free(3)`.
///
/// # Safety
/// `p` must be null or a live pointer from this allocator.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    match heap::owner(p.cast()) {
        // SAFETY: p is in the far range, so far_alloc returned it.
        Some(h) => unsafe { h.free(NonNull::new_unchecked(p.cast())) },
        // SAFETY: p is not far, so glibc allocated it.
        None => unsafe { __libc_free(p) },
    }
}

/// `calloc(3)`.
///
/// # Safety
/// C allocator contract.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    if let Some(h) = heap::use_far() {
        if let Some(p) = far_alloc(h, total, 16) {
            // SAFETY: p has `total` bytes; recycled far memory is not zeroed.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, total) };
            return p;
        }
    }
    // SAFETY: plain call into glibc.
    unsafe { __libc_calloc(n, size) }
}

/// `realloc(3)`.
///
/// # Safety
/// `p` must be null or a live pointer from this allocator.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return alloc_aligned(16, size);
    }
    if size == 0 {
        // SAFETY: p is live; glibc's realloc(p, 0) frees and returns null.
        unsafe { free(p) };
        return std::ptr::null_mut();
    }
    let Some(h) = heap::owner(p.cast()) else {
        if heap::use_far().is_none() {
            // SAFETY: p is glibc's and this thread allocates locally.
            return unsafe { __libc_realloc(p, size) };
        }
        // A local block reallocated by a program thread moves far.
        // SAFETY: p is a live glibc block.
        let old = unsafe { malloc_usable_size(p) };
        if old == 0 {
            // Its size is unknown (no glibc malloc_usable_size found): keep it local.
            // SAFETY: p is glibc's.
            return unsafe { __libc_realloc(p, size) };
        }
        let q = alloc_aligned(16, size);
        if !q.is_null() {
            // SAFETY: both blocks hold at least min(old, size) bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size));
                __libc_free(p);
            }
        }
        return q;
    };
    // SAFETY: p is far and live.
    let base = unsafe { NonNull::new_unchecked(p.cast::<u8>()) };
    // SAFETY: as above.
    if unsafe { h.resize_in_place(base, size) }.is_some() {
        return p;
    }
    // SAFETY: as above.
    let old = unsafe { h.usable_size(base) };
    let q = alloc_aligned(16, size);
    if !q.is_null() {
        // SAFETY: both blocks hold at least min(old, size) bytes; p is far.
        unsafe {
            std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size));
            h.free(base);
        }
    }
    q
}

fn valid_align(align: usize) -> bool {
    align.is_power_of_two() && align <= 1 << 30
}

/// `memalign(3)`.
///
/// # Safety
/// C allocator contract.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if !valid_align(align) {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    alloc_aligned(align.max(16), size)
}

/// `aligned_alloc(3)`.
///
/// # Safety
/// C allocator contract.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { memalign(align, size) }
}

/// `posix_memalign(3)`.
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !valid_align(align) || !align.is_multiple_of(std::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = alloc_aligned(align.max(16), size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a writable pointer.
    unsafe { *out = p };
    0
}

/// `valloc(3)`.
///
/// # Safety
/// C allocator contract.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    alloc_aligned(4096, size)
}

/// `pvalloc(3)`.
///
/// # Safety
/// C allocator contract.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(rounded) = size.max(1).checked_next_multiple_of(4096) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    alloc_aligned(4096, rounded)
}

/// `malloc_usable_size(3)`.
///
/// # Safety
/// `p` must be null or a live pointer from this allocator.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if let Some(h) = heap::owner(p.cast()) {
        // SAFETY: p is far and live.
        return unsafe { h.usable_size(NonNull::new_unchecked(p.cast())) };
    }
    type Usable = unsafe extern "C" fn(*mut c_void) -> usize;
    static REAL: std::sync::OnceLock<Option<Usable>> = std::sync::OnceLock::new();
    let real = REAL.get_or_init(|| {
        // SAFETY: looking up the next definition of a libc symbol by a
        // NUL-terminated name; the result, if any, has that C signature.
        unsafe {
            let f = libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr());
            (!f.is_null()).then(|| std::mem::transmute::<*mut c_void, Usable>(f))
        }
    });
    match real {
        // SAFETY: p is a glibc block.
        Some(f) => unsafe { f(p) },
        None => 0,
    }
}

/// Starts the far heap when the program is loaded.
extern "C" fn start_far_heap() {
    match remora_paging::FarAlloc::start_from_env() {
        Ok(_) => {}
        Err(e) => {
            remora_paging::warn(format_args!(
                "far heap not started: {e}; the program runs with local memory only"
            ));
        }
    }
}

/// Appends the counters to `REMORA_STATS_FILE` at exit.
extern "C" fn write_stats() {
    if heap::is_forked_child() {
        return;
    }
    let Some(h) = heap::far_heap() else { return };
    let Some(path) = std::env::var_os("REMORA_STATS_FILE") else {
        return;
    };
    let s = h.stats();
    let line = format!(
        "pid={} faults={} zero_fills={} second_chance={} write_faults={} fetched={} prefetched={} \
         prefetch_hits={} prefetch_wasted={} evictions={} written={} resident={} budget={}\n",
        std::process::id(),
        s.faults,
        s.zero_fills,
        s.second_chance,
        s.write_faults,
        s.pages_fetched,
        s.prefetched,
        s.prefetch_hits,
        s.prefetch_wasted,
        s.evictions,
        s.pages_written,
        s.resident,
        s.budget_pages,
    );
    heap::as_internal(|| {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    });
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = start_far_heap;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = write_stats;
