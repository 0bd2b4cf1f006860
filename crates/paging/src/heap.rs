//! The far heap: an allocator over a paged far region, shared by
//! [`crate::FarAlloc`] (Rust programs) and the LD_PRELOAD `malloc`.
//!
//! Allocation inside the far range is done by [`SizeClassHeap`]
//! (`sizeclass.rs`): size classes with per-thread caches for blocks up to
//! 16 KiB, `talc` for spans and large blocks. Its locks are spin locks that
//! yield, which are safe inside an allocator, unlike a parking lock that
//! allocates its wait queue.
//!
//! Two kinds of memory coexist in one process:
//!
//! * far memory, for the program's allocations;
//! * local memory (the system allocator), for the runtime's own: the fault
//!   handlers, evictor and prefetcher, and client connection threads, are
//!   marked *internal*, and their allocations never go far. Otherwise a
//!   handler could fault on its own buffer and wait on itself.
//!
//! A pointer is freed by whichever allocator owns its address, so memory may
//! cross between threads of either kind. Before the far heap starts (and in
//! a child after `fork`), everything is local.

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use remora_client::{ClientOptions, Cluster};

use crate::config::{Budget, PagerConfig};
use crate::pager::{PagedRegion, PagerStats};
use crate::sizeclass::SizeClassHeap;
use crate::PagingError;

thread_local! {
    static INTERNAL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as part of the runtime: its allocations stay local.
pub fn mark_internal_thread() {
    INTERNAL.with(|c| c.set(true));
}

/// Runs `f` with the calling thread marked internal.
pub fn as_internal<T>(f: impl FnOnce() -> T) -> T {
    let was = INTERNAL.with(|c| c.replace(true));
    let r = f();
    INTERNAL.with(|c| c.set(was));
    r
}

/// Runtime threads being started (see [`spawn_internal`]).
static SPAWNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether the calling thread is part of the runtime. While a runtime
/// thread is being started, every thread counts as one: the new thread
/// allocates (thread-local destructors, registered with `calloc`) before
/// it can mark itself, and such an allocation in far memory could leave a
/// fault handler or the evictor waiting on a fault only it can serve.
/// Memory allocated locally meanwhile is freed by address, so a program
/// thread that allocates in that window only gets local memory.
pub fn is_internal_thread() -> bool {
    if SPAWNING.load(Ordering::Acquire) > 0 {
        return true;
    }
    // try_with: during thread teardown the slot may be gone; treat as app.
    INTERNAL.try_with(|c| c.get()).unwrap_or(false)
}

/// Starts a runtime thread named `name`, marked internal from its very
/// first allocation (see [`is_internal_thread`]); returns once it is.
pub fn spawn_internal<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    struct Spawning;
    impl Drop for Spawning {
        fn drop(&mut self) {
            SPAWNING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    SPAWNING.fetch_add(1, Ordering::AcqRel);
    let _spawning = Spawning;
    let marked = std::sync::Arc::new(AtomicBool::new(false));
    let h = {
        let marked = marked.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            mark_internal_thread();
            marked.store(true, Ordering::Release);
            f()
        })?
    };
    while !marked.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    Ok(h)
}

/// A running far heap.
pub struct FarHeap {
    arena: SizeClassHeap,
    start: usize,
    end: usize,
    pager: PagedRegion,
    cluster: Cluster,
}

impl std::fmt::Debug for FarHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarHeap")
            .field("start", &(self.start as *const u8))
            .field("len", &(self.end - self.start))
            .finish()
    }
}

static HEAP: AtomicPtr<FarHeap> = AtomicPtr::new(std::ptr::null_mut());
static FORKED: AtomicBool = AtomicBool::new(false);

/// The far heap, if one has been started in this process (and this process
/// is not a forked child, whose copy is plain local memory).
pub fn far_heap() -> Option<&'static FarHeap> {
    let p = HEAP.load(Ordering::Acquire);
    // SAFETY: HEAP only ever holds null or a leaked Box<FarHeap>, never freed.
    unsafe { p.as_ref() }
}

/// How to start the far heap.
#[derive(Debug, Clone)]
pub struct HeapOptions {
    /// Controller address.
    pub controller: String,
    /// Tenant token.
    pub token: String,
    /// Size of the far region (the most the program can allocate far).
    pub size: u64,
    /// Name of the far region (so a launcher can free it after the program).
    pub region_name: Option<String>,
    /// Pager settings (budget, prefetching, …).
    pub pager: PagerConfig,
}

/// Default far heap size: 8 GiB of address space, reserved on the servers
/// but touched only as the program uses it.
pub const DEFAULT_HEAP_SIZE: u64 = 8 << 30;

impl HeapOptions {
    /// Reads `REMORA_CONTROLLER`, `REMORA_TOKEN`, `REMORA_LOCAL_MEM`,
    /// `REMORA_HEAP_SIZE`, `REMORA_HEAP_REGION`, `REMORA_PREFETCH` (largest
    /// window in pages, 0 = off), `REMORA_FETCH_UNIT` and
    /// `REMORA_EVICTION` (`clock` or `fifo`). Returns `Ok(None)` when no
    /// controller is set.
    pub fn from_env() -> Result<Option<HeapOptions>, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(controller) = var("REMORA_CONTROLLER") else {
            return Ok(None);
        };
        // Under `remora run`, only the program itself (and what it execs in
        // place) gets a far heap; processes it starts run with local memory.
        if let Some(run_pid) = var("REMORA_RUN_PID") {
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() };
            if run_pid.parse::<i32>().ok() != Some(parent) {
                return Ok(None);
            }
        }
        let token =
            var("REMORA_TOKEN").ok_or("REMORA_CONTROLLER is set but REMORA_TOKEN is not")?;
        let mut pager = PagerConfig::default();
        if let Some(b) = var("REMORA_LOCAL_MEM") {
            pager.budget = b.parse::<Budget>()?;
        }
        let size = match var("REMORA_HEAP_SIZE") {
            Some(s) => {
                remora_proto::size::parse_size(&s).map_err(|e| format!("REMORA_HEAP_SIZE: {e}"))?
            }
            None => DEFAULT_HEAP_SIZE,
        };
        if let Some(w) = var("REMORA_PREFETCH") {
            pager.prefetch_window = w
                .parse()
                .map_err(|_| format!("REMORA_PREFETCH: bad window {w:?}"))?;
        }
        if let Some(u) = var("REMORA_FETCH_UNIT") {
            pager.fetch_unit = u
                .parse()
                .map_err(|_| format!("REMORA_FETCH_UNIT: bad unit {u:?}"))?;
        }
        if let Some(e) = var("REMORA_EVICTION") {
            pager.inactive_fraction = match e.as_str() {
                "clock" => PagerConfig::default().inactive_fraction,
                "fifo" => 0.0,
                _ => return Err(format!("REMORA_EVICTION: {e:?} is not clock or fifo")),
            };
        }
        pager.validate()?;
        let region_name = var("REMORA_HEAP_REGION").map(|n| format!("{n}-{}", std::process::id()));
        Ok(Some(HeapOptions {
            controller,
            token,
            size,
            region_name,
            pager,
        }))
    }
}

/// Starts the far heap for this process. After it returns, allocations of
/// threads that are not internal go to far memory. The calling thread is
/// treated as internal for the duration (the runtime's own start-up
/// allocations stay local). Fails if a far heap is already running.
pub fn start(opts: &HeapOptions) -> Result<&'static FarHeap, PagingError> {
    as_internal(|| {
        if far_heap().is_some() {
            return Err(PagingError::Config(
                "the far heap is already running".into(),
            ));
        }
        remora_client::set_thread_start_hook(mark_internal_thread);
        let cluster =
            Cluster::connect_with(&opts.controller, &opts.token, ClientOptions::default())
                .map_err(PagingError::Far)?;
        let region = match &opts.region_name {
            // A process that exec'd finds the region of its previous image
            // under its name; nothing uses it any more, so it is reused.
            Some(n) => match cluster.alloc_named(n, opts.size) {
                Err(e) if e.code() == Some(remora_proto::ErrorCode::NameTaken) => cluster
                    .open_region(n)
                    .and_then(|r| if r.size() >= opts.size { Ok(r) } else { Err(e) }),
                other => other,
            },
            None => cluster.alloc_region(opts.size),
        }
        .map_err(PagingError::Far)?;
        let pager = PagedRegion::new(region, opts.pager.clone())?;
        let start = pager.base() as usize;
        let end = start + pager.len();
        // SAFETY: [start, end) is our own mapping, used for nothing else
        // while the process lives; the allocator writes its free lists there
        // (which faults pages in, served by the handlers already running).
        let Some(arena) = (unsafe { SizeClassHeap::new(start as *mut u8, end - start) }) else {
            return Err(PagingError::Config(
                "the far heap is too small to hold anything".into(),
            ));
        };
        let heap = Box::new(FarHeap {
            arena,
            start,
            end,
            pager,
            cluster,
        });
        let p = Box::into_raw(heap);
        if HEAP
            .compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // SAFETY: p came from Box::into_raw above and was not published.
            drop(unsafe { Box::from_raw(p) });
            return Err(PagingError::Config(
                "the far heap is already running".into(),
            ));
        }
        register_fork_handlers();
        // SAFETY: p was published above and is never freed.
        Ok(unsafe { &*p })
    })
}

impl FarHeap {
    /// Whether `ptr` is inside the far range.
    pub fn contains(&self, ptr: *const u8) -> bool {
        (ptr as usize) >= self.start && (ptr as usize) < self.end
    }

    /// Allocates far memory, or `None` when the far range is exhausted.
    #[inline]
    pub fn alloc(&'static self, layout: Layout) -> Option<NonNull<u8>> {
        self.arena.alloc(layout)
    }

    /// Frees far memory (any thread may free any block).
    ///
    /// # Safety
    /// `ptr` must have come from [`FarHeap::alloc`] (or a resize) and not
    /// have been freed since.
    #[inline]
    pub unsafe fn free(&'static self, ptr: NonNull<u8>) {
        // SAFETY: by the caller's contract.
        unsafe { self.arena.free(ptr) }
    }

    /// How many bytes the block at `ptr` can hold (at least what was asked).
    ///
    /// # Safety
    /// As for [`FarHeap::free`].
    #[inline]
    pub unsafe fn usable_size(&self, ptr: NonNull<u8>) -> usize {
        // SAFETY: by the caller's contract.
        unsafe { self.arena.usable_size(ptr) }
    }

    /// Lets the block hold `new_size` bytes without moving it, if it can;
    /// else `None` (the caller moves it). The block keeps its alignment.
    ///
    /// # Safety
    /// As for [`FarHeap::free`].
    pub unsafe fn resize_in_place(&self, ptr: NonNull<u8>, new_size: usize) -> Option<NonNull<u8>> {
        // SAFETY: by the caller's contract.
        unsafe { self.arena.resize_in_place(ptr, new_size) }
    }

    /// The pager behind the heap.
    pub fn pager(&self) -> &PagedRegion {
        &self.pager
    }

    /// The cluster the heap lives on.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Pager counters.
    pub fn stats(&self) -> PagerStats {
        self.pager.stats()
    }
}

/// Whether allocations of the calling thread should go far now.
pub fn use_far() -> Option<&'static FarHeap> {
    if FORKED.load(Ordering::Relaxed) || is_internal_thread() {
        return None;
    }
    far_heap()
}

/// Whether `ptr` belongs to the far heap (forked children included: their
/// copy of the range is still managed by the same arena).
pub fn owner(ptr: *const u8) -> Option<&'static FarHeap> {
    far_heap().filter(|h| h.contains(ptr))
}

fn register_fork_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the three handlers are plain extern "C" functions that live
        // for the whole process.
        unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_parent),
                Some(after_fork_child),
            )
        };
    });
}

/// Before `fork`: bring every far page in and stop eviction, so the child
/// (whose copy of the range userfaultfd does not serve) inherits all bytes;
/// then hold the allocator's locks so the child gets a consistent allocator.
extern "C" fn before_fork() {
    let Some(h) = far_heap() else { return };
    if !FORKED.load(Ordering::Relaxed) {
        as_internal(|| {
            if let Err(e) = h.pager.pause_and_fill() {
                crate::warn(format_args!(
                    "preparing far memory for fork failed: {e}; the child may see stale data"
                ));
            }
        });
    }
    h.arena.lock_all();
}

extern "C" fn after_fork_parent() {
    let Some(h) = far_heap() else { return };
    // SAFETY: before_fork took these locks in this thread.
    unsafe { h.arena.unlock_all() };
    if !FORKED.load(Ordering::Relaxed) {
        h.pager.resume();
    }
}

extern "C" fn after_fork_child() {
    let Some(h) = far_heap() else { return };
    FORKED.store(true, Ordering::Relaxed);
    // SAFETY: the locks were taken by before_fork in the thread that forked,
    // which is the only thread of this child.
    unsafe { h.arena.unlock_all() };
}

/// Whether this process is a forked child of a far-heap process.
pub fn is_forked_child() -> bool {
    FORKED.load(Ordering::Relaxed)
}
