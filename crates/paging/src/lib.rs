//! Transparent far memory: a far region mapped into the address space and
//! served by userfaultfd ([`PagedRegion`]), the far heap over it, and
//! [`FarAlloc`], a `#[global_allocator]` that puts a Rust program's heap there.
//!
//! The same far heap backs the LD_PRELOAD `malloc` that `remora run` uses
//! for unmodified programs (crate `remora-preload`).
//!
//! ```no_run
//! use remora_paging::{FarAlloc, HeapOptions, PagerConfig, Budget};
//!
//! #[global_allocator]
//! static HEAP: FarAlloc = FarAlloc;
//!
//! fn main() {
//!     // Until the far heap starts, allocations are local.
//!     FarAlloc::start(&HeapOptions {
//!         controller: "127.0.0.1:7400".into(),
//!         token: "secret".into(),
//!         size: 1 << 30,
//!         region_name: None,
//!         pager: PagerConfig { budget: Budget::Fraction(0.25), ..PagerConfig::default() },
//!     })
//!     .expect("far heap");
//!     let big = vec![7u64; 10_000_000]; // lives in far memory, 25% of it local
//!     assert_eq!(big.iter().sum::<u64>(), 70_000_000);
//! }
//! ```

pub mod config;
pub mod heap;
pub mod pager;
pub mod prefetch;
pub mod sizeclass;
pub mod uffd;

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;

pub use config::{Budget, PagerConfig};
pub use heap::{
    as_internal, far_heap, is_internal_thread, mark_internal_thread, FarHeap, HeapOptions,
};
pub use pager::{PagedRegion, PagerStats};

/// Prints a warning on standard error with a direct `write(2)`. The runtime's
/// threads must not go through `std`'s stderr machinery, whose buffers (or a
/// test harness's capture buffer) may live in far memory: touching them from
/// a fault handler could wait on the handler itself.
pub fn warn(args: std::fmt::Arguments<'_>) {
    let msg = as_internal(|| format!("remora: {args}\n"));
    let mut b = msg.as_bytes();
    while !b.is_empty() {
        // SAFETY: writing bytes of a live buffer to fd 2.
        let n = unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            break;
        }
        b = &b[n as usize..];
    }
}

/// Errors from setting up far memory.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// userfaultfd could not be opened or used.
    #[error("userfaultfd: {0}")]
    Userfaultfd(std::io::Error),
    /// Mapping memory failed.
    #[error("mmap: {0}")]
    Map(std::io::Error),
    /// A thread could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// The cluster refused or failed.
    #[error("far memory: {0}")]
    Far(#[from] remora_client::ClientError),
}

/// A global allocator that places the program's heap in far memory once
/// [`FarAlloc::start`] (or [`FarAlloc::start_from_env`]) has run; before
/// that, and for the runtime's own threads, it uses the system allocator.
/// If the far range is exhausted, allocations fall back to local memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct FarAlloc;

impl FarAlloc {
    /// Starts the far heap.
    pub fn start(opts: &HeapOptions) -> Result<&'static FarHeap, PagingError> {
        heap::start(opts)
    }

    /// Starts the far heap from `REMORA_*` variables (see
    /// [`HeapOptions::from_env`]); `Ok(None)` if `REMORA_CONTROLLER` is unset.
    pub fn start_from_env() -> Result<Option<&'static FarHeap>, PagingError> {
        let opts = as_internal(HeapOptions::from_env).map_err(PagingError::Config)?;
        match opts {
            Some(o) => heap::start(&o).map(Some),
            None => Ok(None),
        }
    }
}

// SAFETY: every pointer is returned to the allocator that owns its address
// (far range → far heap, anything else → System), with the layout it was
// allocated with; the far heap and System both satisfy the layout they are
// given.
unsafe impl GlobalAlloc for FarAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(h) = heap::use_far() {
            if let Some(p) = h.alloc(layout) {
                return p.as_ptr();
            }
        }
        // SAFETY: forwarding the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(h) = heap::use_far() {
            if let Some(p) = h.alloc(layout) {
                // SAFETY: p is a fresh block of layout.size() bytes.
                unsafe { std::ptr::write_bytes(p.as_ptr(), 0, layout.size()) };
                return p.as_ptr();
            }
        }
        // SAFETY: forwarding the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match (heap::owner(ptr), NonNull::new(ptr)) {
            // SAFETY: ptr is in the far range, so the far heap allocated it.
            (Some(h), Some(p)) => unsafe { h.free(p) },
            // SAFETY: ptr is not far, so System allocated it with layout.
            _ => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let (Some(h), Some(p)) = (heap::owner(ptr), NonNull::new(ptr)) {
            // SAFETY: ptr is far and live.
            if let Some(q) = unsafe { h.resize_in_place(p, new_size) } {
                return q.as_ptr();
            }
        } else if heap::use_far().is_none() {
            // SAFETY: ptr is local and stays local.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Move: allocate where this thread allocates, copy, free the old block.
        // SAFETY: the caller guarantees new_size forms a valid layout with layout.align().
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarding a valid layout.
        let q = unsafe { self.alloc(new_layout) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least min(old, new) bytes and are distinct.
            unsafe { std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size)) };
            // SAFETY: ptr was allocated by this allocator with layout.
            unsafe { self.dealloc(ptr, layout) };
        }
        q
    }
}
