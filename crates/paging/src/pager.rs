//! The paged far region: a range of the address space whose pages live in a
//! far region and are brought in by userfaultfd.
//!
//! # Page states
//!
//! Every page has a state, changed only under its stripe lock:
//!
//! * `ABSENT`: not mapped. Its bytes are in the far region if `FAR_VALID`
//!   is set, else they are zeros (never written back).
//! * `FETCHING`: a handler or the prefetcher is bringing it in. Faults on it
//!   need nothing: the `UFFDIO_COPY` that installs it wakes every waiter.
//! * `CLEAN`: mapped write-protected; equal to what a fetch would give.
//! * `DIRTY`: mapped writable (a write fault unprotected it).
//! * `INACTIVE`: unmapped, but its bytes are kept in a local slot (the
//!   second-chance list). A fault on it reinstalls it from the slot, with no
//!   network round trip, and counts as an access.
//!
//! # Eviction
//!
//! The evictor thread keeps resident pages (mapped, being fetched, or in a
//! slot) between a low and a high watermark under the budget. It
//! *deactivates* the oldest active pages: write-protect (if dirty), copy the
//! page into a slot, `MADV_DONTNEED`, mark `INACTIVE`. Pages that stay
//! untouched until they reach the head of the inactive list are *evicted*:
//! clean ones are dropped, dirty ones are written back in batches (one batch
//! frame per server) and then dropped. A page touched while inactive goes back
//! to the active list; that fault is the access signal user space otherwise
//! lacks (there are no accessed bits to read), so the policy is second chance
//! rather than FIFO. With `inactive_fraction = 0` the list is only as long as
//! a write-back batch and eviction is FIFO, for comparison.
//!
//! Because a dirty page is write-protected before it is copied, and is
//! unmapped before it leaves the inactive list, no write can be lost or torn:
//! a writer racing the copy faults, waits for the page lock, and finds the page
//! inactive; it is woken, faults again as missing, and gets the slot's bytes.
//!
//! # Prefetching
//!
//! Demand faults feed Leap prefetchers, one per stream of faults
//! ([`crate::prefetch`]). The faulting
//! page is installed first; proposals go to a prefetch thread, which fetches
//! them (as one vectored read) and installs them write-protected. One page in
//! the middle of each prefetched run is kept in a slot instead of mapped: when
//! the program reaches it, the cheap fault tells the prefetcher that the run is
//! being consumed (the trigger for the next window, like the kernel's
//! readahead marker) and confirms its pages as used.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use remora_client::Region;

use crate::config::{Budget, PagerConfig};
use crate::prefetch::{Proposal, Streams};
use crate::uffd::{Event, Uffd, PAGE};
use crate::PagingError;

const ABSENT: u8 = 0;
const FETCHING: u8 = 1;
const CLEAN: u8 = 2;
const DIRTY: u8 = 3;
const INACTIVE: u8 = 4;
/// The page could not be fetched; touching it raises SIGBUS. Never claimed again.
const POISONED: u8 = 5;

/// The far region holds this page's bytes.
const FAR_VALID: u8 = 1;
/// Brought in by the prefetcher and not yet known to be used.
const PREFETCHED: u8 = 2;
/// The slot copy is newer than the far copy.
const SLOT_DIRTY: u8 = 4;
/// The page has been resident at least once (for fractional budgets).
const TOUCHED: u8 = 8;

const STRIPES: usize = 4096;

/// Counters of a paged region.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PagerStats {
    /// Missing-page faults handled (demand faults).
    pub faults: u64,
    /// Of those, pages served as zeros (never written back).
    pub zero_fills: u64,
    /// Of those, pages reinstalled from the second-chance list.
    pub second_chance: u64,
    /// Write-protect faults (first write to a clean page).
    pub write_faults: u64,
    /// Pages fetched from far memory (demand and prefetch).
    pub pages_fetched: u64,
    /// Pages prefetched.
    pub prefetched: u64,
    /// Prefetched pages known to be used.
    pub prefetch_hits: u64,
    /// Prefetched pages evicted without a known use.
    pub prefetch_wasted: u64,
    /// Pages moved to the inactive list.
    pub deactivations: u64,
    /// Pages evicted (dropped from local memory).
    pub evictions: u64,
    /// Pages written back.
    pub pages_written: u64,
    /// Times a fault waited for the evictor to free room.
    pub budget_waits: u64,
    /// Pages resident now (mapped, in flight, or in the inactive list).
    pub resident: u64,
    /// The budget now, in pages.
    pub budget_pages: u64,
}

impl PagerStats {
    /// Bytes fetched from far memory.
    pub fn bytes_fetched(&self) -> u64 {
        self.pages_fetched * PAGE as u64
    }
    /// Bytes written back.
    pub fn bytes_written(&self) -> u64 {
        self.pages_written * PAGE as u64
    }
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    zero_fills: AtomicU64,
    second_chance: AtomicU64,
    write_faults: AtomicU64,
    pages_fetched: AtomicU64,
    prefetched: AtomicU64,
    prefetch_hits: AtomicU64,
    prefetch_wasted: AtomicU64,
    deactivations: AtomicU64,
    evictions: AtomicU64,
    pages_written: AtomicU64,
    budget_waits: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Local page-sized buffers holding inactive pages.
struct Slots {
    base: NonNull<u8>,
    cap: usize,
    free: Mutex<Vec<u32>>,
    /// A write-back is reading the slot; it frees it when done.
    writing: Vec<AtomicBool>,
}

// SAFETY: the slot memory is only reached through `ptr`, and each slot is
// owned by one page at a time (allocation is under the `free` lock); the
// pointer itself is never changed after creation.
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

impl Slots {
    fn new(cap: usize) -> Result<Slots, PagingError> {
        let base = map_anon(cap.max(1) * PAGE)?;
        Ok(Slots {
            base,
            cap,
            free: Mutex::new((0..cap as u32).rev().collect()),
            writing: (0..cap).map(|_| AtomicBool::new(false)).collect(),
        })
    }
    fn take(&self) -> Option<u32> {
        self.free.lock().pop()
    }
    fn give(&self, s: u32) {
        self.free.lock().push(s);
    }
    fn ptr(&self, s: u32) -> *mut u8 {
        debug_assert!((s as usize) < self.cap);
        // SAFETY: s < cap, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(s as usize * PAGE) }
    }
    fn bytes(&self, s: u32) -> &[u8] {
        // SAFETY: the slot is a page inside the mapping; it is only written
        // while its page's lock is held and before it is published as INACTIVE.
        unsafe { std::slice::from_raw_parts(self.ptr(s), PAGE) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by map_anon with this length.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.cap.max(1) * PAGE) };
    }
}

fn map_anon(len: usize) -> Result<NonNull<u8>, PagingError> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(PagingError::Map(std::io::Error::last_os_error()));
    }
    NonNull::new(p.cast())
        .ok_or_else(|| PagingError::Map(std::io::Error::other("mmap returned null")))
}

#[derive(Debug, Default)]
struct Lists {
    /// Mapped pages, oldest first, with the generation they were queued at.
    active: VecDeque<(u32, u32)>,
    /// Pages in slots, oldest first.
    inactive: VecDeque<(u32, u32)>,
}

/// Per stream of faults: the last proposal, and the pages of it that were
/// actually fetched.
type PrefetchState = Streams<(Proposal, Vec<u32>)>;

pub(crate) struct Inner {
    uffd: Uffd,
    base: usize,
    pages: u64,
    region: Region,
    cfg: PagerConfig,
    state: Vec<AtomicU8>,
    flags: Vec<AtomicU8>,
    slot_of: Vec<AtomicU32>,
    gen: Vec<AtomicU32>,
    stripes: Vec<Mutex<()>>,
    slots: Slots,
    lists: Mutex<Lists>,
    resident: AtomicU64,
    /// A budget in pages set at run time ([`PagedRegion::set_budget`]), 0: none.
    budget_override: AtomicU64,
    /// The largest budget the page lists were sized for, in pages.
    max_budget: u64,
    touched: AtomicU64,
    /// Evictor wake-up, and waiters for room.
    room: Mutex<()>,
    evict_cv: Condvar,
    room_cv: Condvar,
    prefetch: Mutex<PrefetchState>,
    prefetch_q: Mutex<VecDeque<Vec<u32>>>,
    prefetch_cv: Condvar,
    /// While set the evictor and prefetcher stay idle (fork, flush).
    paused: AtomicBool,
    /// Evictor activity counter (for waiting until it is idle).
    evicting: Mutex<()>,
    shutdown: AtomicBool,
    stats: Counters,
}

/// A paged far region mapped into this process.
///
/// Reads and writes of `[base, base + len)` behave like ordinary memory;
/// behind them pages move between local memory (bounded by the budget) and
/// the far region. Dropping it stops the threads and unmaps the range.
pub struct PagedRegion {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PagedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedRegion")
            .field("base", &(self.inner.base as *const u8))
            .field("len", &self.len())
            .field("budget", &self.inner.cfg.budget)
            .finish()
    }
}

impl PagedRegion {
    /// Maps `region` into this process under `cfg`.
    pub fn new(region: Region, cfg: PagerConfig) -> Result<PagedRegion, PagingError> {
        cfg.validate().map_err(PagingError::Config)?;
        let len = region.size() as usize / PAGE * PAGE;
        if len == 0 {
            return Err(PagingError::Config(
                "the region is smaller than one page".into(),
            ));
        }
        let pages = (len / PAGE) as u64;
        if pages > u32::MAX as u64 {
            return Err(PagingError::Config(
                "the region is too large (over 16 TiB)".into(),
            ));
        }
        let uffd = Uffd::open().map_err(PagingError::Userfaultfd)?;
        let base = map_anon(len)?;
        let base_addr = base.as_ptr() as usize;
        // SAFETY: the range was just mapped by us; advice affects only it.
        unsafe { libc::madvise(base.as_ptr().cast(), len, libc::MADV_NOHUGEPAGE) };
        if let Err(e) = uffd.register(base_addr, len) {
            // SAFETY: unmapping the range mapped above.
            unsafe { libc::munmap(base.as_ptr().cast(), len) };
            return Err(PagingError::Userfaultfd(e));
        }
        if let Budget::Bytes(b) = cfg.budget {
            if b / (PAGE as u64) < 4 * cfg.fetch_unit as u64 {
                return Err(PagingError::Config(format!(
                    "a budget of {b} bytes is too small for a fetch unit of {} pages",
                    cfg.fetch_unit
                )));
            }
        }
        let max_budget = match cfg.budget {
            Budget::Bytes(b) => (b / PAGE as u64).min(pages),
            Budget::Fraction(f) => ((pages as f64 * f).ceil() as u64)
                .max(cfg.min_pages)
                .min(pages),
        };
        let slot_cap =
            ((max_budget as f64 * cfg.inactive_fraction) as usize + 2 * cfg.writeback_batch + 8)
                .min(pages as usize + 1);
        let slots = match Slots::new(slot_cap) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: unmapping the range mapped above.
                unsafe { libc::munmap(base.as_ptr().cast(), len) };
                return Err(e);
            }
        };
        let n = pages as usize;
        let inner = Arc::new(Inner {
            uffd,
            base: base_addr,
            pages,
            region,
            state: (0..n).map(|_| AtomicU8::new(ABSENT)).collect(),
            flags: (0..n).map(|_| AtomicU8::new(0)).collect(),
            slot_of: (0..n).map(|_| AtomicU32::new(0)).collect(),
            gen: (0..n).map(|_| AtomicU32::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            slots,
            lists: Mutex::new(Lists::default()),
            resident: AtomicU64::new(0),
            budget_override: AtomicU64::new(0),
            max_budget,
            touched: AtomicU64::new(0),
            room: Mutex::new(()),
            evict_cv: Condvar::new(),
            room_cv: Condvar::new(),
            prefetch: Mutex::new(Streams::new(cfg.prefetch_window, 2 * cfg.fetch_unit as u64)),
            prefetch_q: Mutex::new(VecDeque::new()),
            prefetch_cv: Condvar::new(),
            paused: AtomicBool::new(false),
            evicting: Mutex::new(()),
            shutdown: AtomicBool::new(false),
            stats: Counters::default(),
            cfg,
        });
        let mut threads = Vec::new();
        let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| -> Result<(), PagingError> {
            let h = crate::heap::spawn_internal(name, f).map_err(PagingError::Thread)?;
            threads.push(h);
            Ok(())
        };
        let mut started = Ok(());
        for i in 0..inner.cfg.handlers {
            let me = inner.clone();
            started = started
                .and_then(|_| spawn(format!("remora-fault-{i}"), Box::new(move || me.handler())));
        }
        let me = inner.clone();
        started =
            started.and_then(|_| spawn("remora-evict".into(), Box::new(move || me.evictor())));
        let me = inner.clone();
        started = started
            .and_then(|_| spawn("remora-prefetch".into(), Box::new(move || me.prefetcher())));
        let pr = PagedRegion { inner, threads };
        started.map(|_| pr)
    }

    /// The first byte of the mapped range.
    pub fn base(&self) -> *mut u8 {
        self.inner.base as *mut u8
    }

    /// Length of the mapped range in bytes.
    pub fn len(&self) -> usize {
        self.inner.pages as usize * PAGE
    }

    /// Whether the range is empty (never: regions have at least one page).
    pub fn is_empty(&self) -> bool {
        self.inner.pages == 0
    }

    /// The far region behind the mapping.
    pub fn region(&self) -> &Region {
        &self.inner.region
    }

    /// Counters so far.
    pub fn stats(&self) -> PagerStats {
        self.inner.stats()
    }

    /// Writes every dirty page back to the far region (they stay resident,
    /// write-protected again). After it returns, the far region holds what the
    /// mapping holds, for pages not written since.
    pub fn flush(&self) -> Result<(), PagingError> {
        self.inner.flush()
    }

    /// Makes every page resident (ignoring the budget) and stops eviction and
    /// prefetching until [`PagedRegion::resume`]: called before `fork`, so the
    /// child, whose copy of the range is not served by userfaultfd, inherits
    /// every byte.
    pub fn pause_and_fill(&self) -> Result<(), PagingError> {
        self.inner.pause_and_fill()
    }

    /// Changes the budget to `bytes` while the program runs (at most the
    /// budget the region was created with, at least a few pages). A lower
    /// budget is reached by the evictor in the background; see
    /// [`PagedRegion::wait_within_budget`].
    pub fn set_budget(&self, bytes: u64) {
        let pages = (bytes / PAGE as u64).clamp(
            crate::config::MIN_PAGES,
            self.inner.max_budget.max(crate::config::MIN_PAGES),
        );
        self.inner.budget_override.store(pages, Ordering::Relaxed);
        let _g = self.inner.room.lock();
        self.inner.evict_cv.notify_all();
    }

    /// Waits up to `timeout` until the resident pages leave the evictor
    /// nothing to do (at least its low watermark of free pages below the
    /// budget) and it is idle; returns whether they do.
    pub fn wait_within_budget(&self, timeout: Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        loop {
            let b = self.inner.budget();
            let (low, _) = self.inner.watermarks(b);
            if b >= self.inner.pages || self.inner.resident.load(Ordering::Acquire) + low <= b {
                // Let an eviction round in progress finish.
                drop(self.inner.evicting.lock());
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            {
                let _g = self.inner.room.lock();
                self.inner.evict_cv.notify_all();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Undoes [`PagedRegion::pause_and_fill`] in the parent.
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::Release);
        self.inner.evict_cv.notify_all();
    }
}

impl Drop for PagedRegion {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        self.inner.evict_cv.notify_all();
        self.inner.room_cv.notify_all();
        self.inner.prefetch_cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // SAFETY: the range was mapped in `new` with this length, and no
        // thread of ours touches it any more.
        unsafe { libc::munmap(self.inner.base as *mut libc::c_void, self.len()) };
    }
}

impl Inner {
    fn addr(&self, p: u32) -> usize {
        self.base + p as usize * PAGE
    }

    fn lock(&self, p: u32) -> MutexGuard<'_, ()> {
        self.stripes[p as usize % STRIPES].lock()
    }

    fn st(&self, p: u32) -> u8 {
        self.state[p as usize].load(Ordering::Acquire)
    }

    fn set(&self, p: u32, s: u8) {
        self.state[p as usize].store(s, Ordering::Release);
    }

    fn flag(&self, p: u32, f: u8) -> bool {
        self.flags[p as usize].load(Ordering::Acquire) & f != 0
    }

    fn set_flag(&self, p: u32, f: u8) {
        self.flags[p as usize].fetch_or(f, Ordering::AcqRel);
    }

    /// Clears `f`; returns whether it was set.
    fn clear_flag(&self, p: u32, f: u8) -> bool {
        self.flags[p as usize].fetch_and(!f, Ordering::AcqRel) & f != 0
    }

    fn budget(&self) -> u64 {
        let o = self.budget_override.load(Ordering::Relaxed);
        let b = match self.cfg.budget {
            _ if o > 0 => o,
            Budget::Bytes(b) => b / PAGE as u64,
            Budget::Fraction(f) => {
                let t = self.touched.load(Ordering::Relaxed) as f64;
                ((t * f).ceil() as u64).max(self.cfg.min_pages)
            }
        };
        b.clamp(
            crate::config::MIN_PAGES,
            self.pages.max(crate::config::MIN_PAGES),
        )
    }

    /// Free pages the evictor keeps below the budget: (low, high).
    fn watermarks(&self, budget: u64) -> (u64, u64) {
        // A demand fault reserves up to a fetch unit at once: the evictor must
        // start before a unit no longer fits, or the fault would wait forever.
        let unit = self.cfg.fetch_unit as u64;
        let low = (budget / 32).clamp(1, 1024).max(unit);
        let high = (budget / 16).clamp(2, 2048).min(budget / 2).max(low + unit);
        (low, high)
    }

    fn stats(&self) -> PagerStats {
        let c = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PagerStats {
            faults: g(&c.faults),
            zero_fills: g(&c.zero_fills),
            second_chance: g(&c.second_chance),
            write_faults: g(&c.write_faults),
            pages_fetched: g(&c.pages_fetched),
            prefetched: g(&c.prefetched),
            prefetch_hits: g(&c.prefetch_hits),
            prefetch_wasted: g(&c.prefetch_wasted),
            deactivations: g(&c.deactivations),
            evictions: g(&c.evictions),
            pages_written: g(&c.pages_written),
            budget_waits: g(&c.budget_waits),
            resident: self.resident.load(Ordering::Relaxed),
            budget_pages: self.budget(),
        }
    }

    /// Counts `n` more resident pages, first waiting (unless `force`) until
    /// the budget has room. Returns false only at shutdown.
    fn reserve(&self, n: u64, force: bool) -> bool {
        let mut waited = false;
        loop {
            let r = self.resident.load(Ordering::Acquire);
            let b = self.budget();
            if force || r + n <= b || self.paused.load(Ordering::Acquire) {
                if self
                    .resident
                    .compare_exchange(r, r + n, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    if r + n + self.watermarks(b).0 > b {
                        let _g = self.room.lock();
                        self.evict_cv.notify_one();
                    }
                    return true;
                }
                continue;
            }
            if self.shutdown.load(Ordering::Acquire) {
                return false;
            }
            if !waited {
                bump(&self.stats.budget_waits, 1);
                waited = true;
            }
            // Check again under the lock the evictor notifies under, so a
            // wake-up between the check and the wait is not lost.
            let mut g = self.room.lock();
            if self.resident.load(Ordering::Acquire) + n > self.budget() {
                self.evict_cv.notify_one();
                self.room_cv.wait_for(&mut g, Duration::from_millis(20));
            }
        }
    }

    /// Room for `n` more pages without waiting and without crossing the low
    /// watermark (prefetches never push out what the program uses).
    fn try_reserve(&self, n: u64) -> u64 {
        loop {
            let r = self.resident.load(Ordering::Acquire);
            let b = self.budget();
            let (low, _) = self.watermarks(b);
            let room = b.saturating_sub(low).saturating_sub(r).min(n);
            if room == 0 {
                return 0;
            }
            if self
                .resident
                .compare_exchange(r, r + room, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return room;
            }
        }
    }

    fn unreserve(&self, n: u64) {
        self.resident.fetch_sub(n, Ordering::AcqRel);
        let _g = self.room.lock();
        self.room_cv.notify_all();
    }

    fn touch(&self, p: u32) {
        if self.flags[p as usize].fetch_or(TOUCHED, Ordering::AcqRel) & TOUCHED == 0 {
            self.touched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Maps one page from `src` at page `p` (whose lock is held and which
    /// this thread owns as FETCHING or INACTIVE), waking the threads waiting
    /// on it. A failed copy does not wake, so waiters are woken explicitly
    /// (they retry, and fault again if the page is still missing).
    ///
    /// # Safety
    /// `src` must be readable for one page.
    /// Returns false if the page is not mapped afterwards.
    unsafe fn install(&self, p: u32, src: *const u8, protect: bool) -> bool {
        let addr = self.addr(p);
        // SAFETY: by the caller's contract for src; addr is a page of our
        // registered range.
        match unsafe { self.uffd.copy(addr, src, PAGE, protect) } {
            Ok(()) => true,
            Err(e) => {
                let _ = self.uffd.wake(addr, PAGE);
                if e.raw_os_error() == Some(libc::EEXIST) {
                    return true;
                }
                crate::warn(format_args!("installing far page {p}: {e}"));
                false
            }
        }
    }

    /// Publishes a newly mapped page: new generation, onto the active list.
    fn activate(&self, p: u32) {
        let g = self.gen[p as usize]
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        self.lists.lock().active.push_back((p, g));
    }

    // ----- fault handling -------------------------------------------------

    fn handler(self: Arc<Self>) {
        let mut buf = vec![0u8; PAGE * self.cfg.fetch_unit as usize];
        let waiter = match self.uffd.waiter() {
            Ok(w) => w,
            Err(e) => {
                crate::warn(format_args!(
                    "cannot wait on userfaultfd: {e}; this fault handler stops"
                ));
                return;
            }
        };
        while !self.shutdown.load(Ordering::Acquire) {
            match waiter.wait(100) {
                Ok(true) => {}
                Ok(false) => {
                    // Idle for a while: wake every waiter in the range. A
                    // spurious wake-up only makes a thread retry its access
                    // (and fault again if the page is still missing), so this
                    // is a harmless backstop that bounds any stall a missed
                    // wake-up would cause to one poll interval.
                    let _ = self.uffd.wake(self.base, self.pages as usize * PAGE);
                    continue;
                }
                Err(e) => {
                    tracing::error!("userfaultfd poll failed: {e}");
                    return;
                }
            }
            // Several handlers share the descriptor: another may have taken
            // the message, in which case the read finds nothing.
            let ev = match self.uffd.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("userfaultfd read failed: {e}");
                    return;
                }
            };
            match ev {
                Event::Fault { addr, write, wp } => {
                    if addr < self.base || addr >= self.base + self.pages as usize * PAGE {
                        continue;
                    }
                    let p = ((addr - self.base) / PAGE) as u32;
                    if wp {
                        self.on_write_fault(p);
                    } else {
                        self.on_missing(p, write, &mut buf);
                    }
                }
                Event::Remove { .. } | Event::Unmap { .. } | Event::Other(_) => {
                    // Not requested (see crate docs): a foreign madvise or
                    // munmap of the range is the program's own business.
                }
            }
        }
    }

    fn on_write_fault(&self, p: u32) {
        let _g = self.lock(p);
        bump(&self.stats.write_faults, 1);
        let addr = self.addr(p);
        match self.st(p) {
            CLEAN => {
                if self.clear_flag(p, PREFETCHED) {
                    bump(&self.stats.prefetch_hits, 1);
                }
                self.set(p, DIRTY);
                if let Err(e) = self.uffd.write_protect(addr, PAGE, false) {
                    crate::warn(format_args!("unprotecting far page {p}: {e}"));
                    let _ = self.uffd.wake(addr, PAGE);
                }
            }
            DIRTY => {
                if self.uffd.write_protect(addr, PAGE, false).is_err() {
                    let _ = self.uffd.wake(addr, PAGE);
                }
            }
            _ => {
                // The page left while the fault was queued: the writer retries
                // and faults as missing.
                let _ = self.uffd.wake(addr, PAGE);
            }
        }
    }

    fn on_missing(&self, p: u32, write: bool, buf: &mut Vec<u8>) {
        let g = self.lock(p);
        match self.st(p) {
            ABSENT => {}
            FETCHING => {
                // Whoever fetches installs it, which wakes us. A prefetched
                // page reached while in flight was a (late) hit.
                if self.clear_flag(p, PREFETCHED) {
                    bump(&self.stats.prefetch_hits, 1);
                }
                return;
            }
            CLEAN | DIRTY if self.mapped(p) => {
                // Installed while the message waited: the install woke it.
                drop(g);
                let _ = self.uffd.wake(self.addr(p), PAGE);
                return;
            }
            CLEAN | DIRTY => {
                // Dropped from outside (the program's own MADV_DONTNEED): its
                // bytes are gone, as with any private mapping, and it reads
                // as zeros from now on.
                self.clear_flag(p, FAR_VALID | PREFETCHED);
                self.set(p, ABSENT);
                self.unreserve(1);
            }
            INACTIVE => {
                let was_prefetched = self.reactivate(p, write);
                drop(g);
                if was_prefetched {
                    // The program reached a prefetch marker: keep going.
                    self.advise_prefetch(p);
                }
                return;
            }
            _ => {
                // POISONED: the retry raises SIGBUS.
                drop(g);
                let _ = self.uffd.wake(self.addr(p), PAGE);
                return;
            }
        }
        // ABSENT: claim it, and the rest of its fetch unit that is absent too.
        self.set(p, FETCHING);
        drop(g);
        bump(&self.stats.faults, 1);
        let unit = self.cfg.fetch_unit as u64;
        let first = (p as u64 / unit * unit) as u32;
        let last = ((first as u64 + unit).min(self.pages) - 1) as u32;
        let mut mine = vec![p];
        for q in first..=last {
            if q == p {
                continue;
            }
            let _g = self.lock(q);
            if self.st(q) == ABSENT {
                self.set(q, FETCHING);
                mine.push(q);
            }
        }
        mine.sort_unstable();
        if !self.reserve(mine.len() as u64, false) {
            // Shutting down: release the claims and let the threads retry.
            for &q in &mine {
                let _g = self.lock(q);
                self.set(q, ABSENT);
                let _ = self.uffd.wake(self.addr(q), PAGE);
            }
            return;
        }
        self.fetch_and_install(&mine, Some((p, write)), buf);
        self.advise_prefetch(p);
    }

    /// Whether page `p` is mapped (asks the kernel).
    fn mapped(&self, p: u32) -> bool {
        let mut v = 0u8;
        // SAFETY: one page-aligned page of our mapping; mincore writes one byte.
        let r = unsafe { libc::mincore(self.addr(p) as *mut libc::c_void, PAGE, &mut v) };
        r != 0 || v & 1 != 0
    }

    /// Reinstalls an inactive page from its slot (page lock held). Returns
    /// whether it had been prefetched (and so is now a hit).
    fn reactivate(&self, p: u32, write: bool) -> bool {
        let s = self.slot_of[p as usize].load(Ordering::Acquire);
        let was_dirty = self.flag(p, SLOT_DIRTY);
        let dirty = was_dirty || write;
        // SAFETY: the slot holds this page's bytes (it is INACTIVE and owns slot `s`).
        if !unsafe { self.install(p, self.slots.ptr(s), !dirty) } {
            // Stays inactive; the woken thread faults again.
            return false;
        }
        self.clear_flag(p, SLOT_DIRTY);
        self.set(p, if dirty { DIRTY } else { CLEAN });
        if !self.slots.writing[s as usize].load(Ordering::Acquire) {
            self.slots.give(s);
        }
        bump(&self.stats.second_chance, 1);
        self.activate(p);
        let hit = self.clear_flag(p, PREFETCHED);
        if hit {
            bump(&self.stats.prefetch_hits, 1);
        }
        hit
    }

    /// Fetches the FETCHING pages `pages` (sorted) and installs them. The
    /// demand page, if any, is installed writable when the fault was a write.
    fn fetch_and_install(&self, pages: &[u32], demand: Option<(u32, bool)>, buf: &mut Vec<u8>) {
        // Pages never written back need no fetch.
        // `pages` is sorted: one read covers the first to the last that has far data.
        let (mut base_page, mut hi, mut n) = (0u32, 0u32, 0u64);
        for &q in pages.iter().filter(|&&q| self.flag(q, FAR_VALID)) {
            if n == 0 {
                base_page = q;
            }
            hi = q;
            n += 1;
        }
        let mut result = Ok(());
        if n > 0 {
            let span = (hi - base_page + 1) as usize * PAGE;
            if buf.len() < span {
                buf.resize(span, 0);
            }
            result = self
                .region
                .read(base_page as u64 * PAGE as u64, &mut buf[..span]);
            if result.is_ok() {
                bump(&self.stats.pages_fetched, n);
            }
        }
        for &q in pages {
            let demanded = demand.map(|(d, _)| d) == Some(q);
            let writable = demand.map(|(d, w)| d == q && w).unwrap_or(false);
            let zero = !self.flag(q, FAR_VALID);
            if let Err(e) = &result {
                if !zero {
                    self.fail_page(q, demanded, e);
                    continue;
                }
            }
            let src = if zero {
                bump(&self.stats.zero_fills, 1);
                zero_page().as_ptr()
            } else {
                buf[(q - base_page) as usize * PAGE..].as_ptr()
            };
            let _g = self.lock(q);
            // SAFETY: src points at one page (the zero page or a fetched page inside `buf`).
            if !unsafe { self.install(q, src, !writable) } {
                self.set(q, ABSENT);
                self.unreserve(1);
                continue;
            }
            self.set(q, if writable { DIRTY } else { CLEAN });
            self.touch(q);
            self.activate(q);
        }
    }

    /// A page could not be fetched: give up on it. Waiters are woken; a
    /// demand fault's thread gets SIGBUS (the page is poisoned) rather than
    /// spinning forever; a prefetch is just dropped.
    fn fail_page(&self, p: u32, demanded: bool, e: &remora_client::ClientError) {
        let _g = self.lock(p);
        self.set(p, if demanded { POISONED } else { ABSENT });
        self.clear_flag(p, PREFETCHED);
        self.unreserve(1);
        let addr = self.addr(p);
        if demanded {
            crate::warn(format_args!(
                "far page {p} (address {addr:#x}) could not be fetched: {e}; \
                 the access fails with SIGBUS"
            ));
            match self.uffd.poison(addr, PAGE) {
                Ok(true) => {}
                _ => {
                    crate::warn(format_args!("cannot poison the page; aborting"));
                    std::process::abort();
                }
            }
        } else {
            let _ = self.uffd.wake(addr, PAGE);
        }
    }

    // ----- prefetching ----------------------------------------------------

    /// Feeds a demand fault (or a reached marker) to the prefetcher and
    /// queues what it proposes.
    fn advise_prefetch(&self, p: u32) {
        if self.cfg.prefetch_window == 0 || self.paused.load(Ordering::Acquire) {
            return;
        }
        let mut streams = self.prefetch.lock();
        let st = streams.stream(p as u64);
        // Did the program follow the last proposal? Then the pages it has
        // reached along the stride were used.
        if let Some((prop, issued)) = st.last.take() {
            let d = p as i64 - prop.start as i64;
            if d % prop.stride == 0 && d / prop.stride >= 0 {
                let idx = d / prop.stride;
                let mut hits = 0;
                for &q in &issued {
                    let qi = (q as i64 - prop.start as i64) / prop.stride;
                    if qi <= idx && self.clear_flag(q, PREFETCHED) {
                        hits += 1;
                    }
                }
                bump(&self.stats.prefetch_hits, hits);
                st.leap.used((idx + 1).min(prop.count as i64) as u32);
            }
        }
        let Some(prop) = st.leap.on_fault(p as u64) else {
            return;
        };
        let want: Vec<u32> = prop
            .pages(self.pages)
            .map(|q| q as u32)
            .filter(|&q| self.st(q) == ABSENT && self.flag(q, FAR_VALID))
            .collect();
        st.last = Some((prop, want.clone()));
        drop(streams);
        if want.is_empty() {
            return;
        }
        let mut q = self.prefetch_q.lock();
        // Keep only fresh work: a slow prefetcher should skip stale windows.
        while q.len() >= 4 {
            q.pop_front();
        }
        q.push_back(want);
        drop(q);
        self.prefetch_cv.notify_one();
    }

    fn prefetcher(self: Arc<Self>) {
        while !self.shutdown.load(Ordering::Acquire) {
            let job = {
                let mut q = self.prefetch_q.lock();
                if q.is_empty() {
                    self.prefetch_cv
                        .wait_for(&mut q, Duration::from_millis(100));
                }
                q.pop_front()
            };
            let Some(want) = job else { continue };
            if self.paused.load(Ordering::Acquire) {
                continue;
            }
            let room = self.try_reserve(want.len() as u64);
            let mut mine = Vec::with_capacity(room as usize);
            for &q in &want {
                if mine.len() as u64 >= room {
                    break;
                }
                let _g = self.lock(q);
                if self.st(q) == ABSENT && self.flag(q, FAR_VALID) {
                    self.set(q, FETCHING);
                    self.set_flag(q, PREFETCHED);
                    mine.push(q);
                }
            }
            if (mine.len() as u64) < room {
                self.unreserve(room - mine.len() as u64);
            }
            if mine.is_empty() {
                continue;
            }
            self.prefetch_fetch(&mine);
        }
    }

    /// Fetches the claimed pages: one read per contiguous run, installed with
    /// one copy per run (the marker page apart).
    fn prefetch_fetch(&self, mine: &[u32]) {
        let mut pages = mine.to_vec();
        pages.sort_unstable();
        // The marker: the middle page goes to a slot, not the page table.
        let marker = (pages.len() >= 4).then(|| pages[pages.len() / 2]);
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            let run = &pages[i..j];
            let mut buf = vec![0u8; run.len() * PAGE];
            match self.region.read(run[0] as u64 * PAGE as u64, &mut buf) {
                Err(e) => {
                    for &q in run {
                        self.fail_page(q, false, &e);
                    }
                }
                Ok(()) => {
                    bump(&self.stats.pages_fetched, run.len() as u64);
                    bump(&self.stats.prefetched, run.len() as u64);
                    self.install_run(run, &buf, marker);
                }
            }
            i = j;
        }
    }

    /// Installs a contiguous run of prefetched pages from `buf`.
    fn install_run(&self, run: &[u32], buf: &[u8], marker: Option<u32>) {
        let mut k = 0;
        while k < run.len() {
            if Some(run[k]) == marker && self.park_marker(run[k], &buf[k * PAGE..(k + 1) * PAGE]) {
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < run.len() && Some(run[e]) != marker {
                e += 1;
            }
            // The pages are ours (FETCHING, claimed by this thread): none is
            // mapped, so one copy installs them all.
            // SAFETY: buf holds (e - k) pages from index k; the destination
            // pages are a contiguous part of our range.
            let whole = unsafe {
                self.uffd.copy(
                    self.addr(run[k]),
                    buf[k * PAGE..].as_ptr(),
                    (e - k) * PAGE,
                    true,
                )
            };
            for (n, &q) in run[k..e].iter().enumerate() {
                let _g = self.lock(q);
                if whole.is_err() {
                    // SAFETY: one page of buf.
                    if !unsafe { self.install(q, buf[(k + n) * PAGE..].as_ptr(), true) } {
                        self.set(q, ABSENT);
                        self.clear_flag(q, PREFETCHED);
                        self.unreserve(1);
                        continue;
                    }
                }
                self.set(q, CLEAN);
                self.touch(q);
                self.activate(q);
            }
            k = e;
        }
    }

    /// Parks a prefetched page in a slot as the marker. False if no slot is free.
    fn park_marker(&self, q: u32, page: &[u8]) -> bool {
        let _g = self.lock(q);
        let Some(s) = self.slots.take() else {
            return false;
        };
        // SAFETY: the slot was just taken, so nothing else uses it; page is one page.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), self.slots.ptr(s), PAGE) };
        self.slot_of[q as usize].store(s, Ordering::Release);
        self.set(q, INACTIVE);
        self.touch(q);
        let g = self.gen[q as usize]
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        self.lists.lock().inactive.push_back((q, g));
        // A fault may be waiting on it already.
        let _ = self.uffd.wake(self.addr(q), PAGE);
        true
    }

    // ----- eviction -------------------------------------------------------

    fn evictor(self: Arc<Self>) {
        while !self.shutdown.load(Ordering::Acquire) {
            {
                let mut g = self.room.lock();
                let b = self.budget();
                let (low, _) = self.watermarks(b);
                // A budget as large as the range never needs eviction.
                if self.paused.load(Ordering::Acquire)
                    || b >= self.pages
                    || self.resident.load(Ordering::Acquire) + low <= b
                {
                    self.evict_cv.wait_for(&mut g, Duration::from_millis(20));
                    continue;
                }
            }
            let _busy = self.evicting.lock();
            if self.paused.load(Ordering::Acquire) {
                continue;
            }
            let b = self.budget();
            let (_, high) = self.watermarks(b);
            let mut stuck = 0;
            while self.resident.load(Ordering::Acquire) + high > b
                && !self.shutdown.load(Ordering::Acquire)
                && !self.paused.load(Ordering::Acquire)
            {
                let before = self.resident.load(Ordering::Acquire);
                self.evict_round(b);
                drop(self.room.lock());
                self.room_cv.notify_all();
                if self.resident.load(Ordering::Acquire) >= before {
                    stuck += 1;
                    if stuck > 3 {
                        // Nothing evictable now (all in flight): let faults finish.
                        std::thread::sleep(Duration::from_millis(1));
                        stuck = 0;
                    }
                }
            }
        }
    }

    /// One round: refill the inactive list from the active one, then evict a
    /// batch from the head of the inactive list.
    fn evict_round(&self, budget: u64) {
        let batch = self.cfg.writeback_batch;
        let target = (budget as f64 * self.cfg.inactive_fraction) as usize + batch;
        let mut need = {
            let l = self.lists.lock();
            target.saturating_sub(l.inactive.len())
        };
        let mut unmap = Vec::new();
        while need > 0 {
            let next = self.lists.lock().active.pop_front();
            let Some((p, g)) = next else { break };
            if self.deactivate(p, g) {
                unmap.push(p);
                need -= 1;
            }
        }
        // Unmap the deactivated pages, one madvise per contiguous run. This
        // happens before any of them can leave INACTIVE: only a missing
        // fault (impossible while mapped) or a fork fill (which waits for
        // this round) reinstalls an inactive page, and eviction below runs
        // after this. A writer meanwhile finds its page write-protected and
        // INACTIVE, and retries until it is gone.
        unmap.sort_unstable();
        let mut i = 0;
        while i < unmap.len() {
            let mut j = i + 1;
            while j < unmap.len() && unmap[j] == unmap[j - 1] + 1 {
                j += 1;
            }
            let addr = self.addr(unmap[i]) as *mut libc::c_void;
            // SAFETY: pages of our own range whose bytes are in slots.
            if unsafe { libc::madvise(addr, (j - i) * PAGE, libc::MADV_DONTNEED) } != 0 {
                crate::warn(format_args!(
                    "dropping far pages {}..{}: {}",
                    unmap[i],
                    unmap[j - 1],
                    std::io::Error::last_os_error()
                ));
            }
            i = j;
        }
        let mut dirty = Vec::new();
        let mut taken = 0;
        while taken < batch {
            let next = self.lists.lock().inactive.pop_front();
            let Some((p, g)) = next else { break };
            taken += 1;
            let _l = self.lock(p);
            if self.st(p) != INACTIVE || self.gen[p as usize].load(Ordering::Acquire) != g {
                continue;
            }
            let s = self.slot_of[p as usize].load(Ordering::Acquire);
            if self.flag(p, SLOT_DIRTY) {
                self.slots.writing[s as usize].store(true, Ordering::Release);
                dirty.push((p, s));
            } else {
                self.drop_inactive(p, s);
            }
        }
        if !dirty.is_empty() {
            self.write_back(&dirty);
        }
    }

    /// Moves a mapped page to a slot. Returns false if the entry was stale or
    /// no slot was free.
    fn deactivate(&self, p: u32, g: u32) -> bool {
        let _l = self.lock(p);
        let st = self.st(p);
        if (st != CLEAN && st != DIRTY) || self.gen[p as usize].load(Ordering::Acquire) != g {
            return false;
        }
        let Some(s) = self.slots.take() else {
            // Put it back; the inactive list drains first.
            self.lists.lock().active.push_front((p, g));
            return false;
        };
        let addr = self.addr(p);
        if st == DIRTY {
            if let Err(e) = self.uffd.write_protect(addr, PAGE, true) {
                crate::warn(format_args!("protecting far page {p}: {e}"));
                self.slots.give(s);
                self.lists.lock().active.push_back((p, g));
                return false;
            }
            self.set_flag(p, SLOT_DIRTY);
        }
        // SAFETY: the page is mapped and write-protected (clean pages are
        // installed protected; dirty ones were just protected), so its bytes
        // cannot change while they are copied; the slot was just taken.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, self.slots.ptr(s), PAGE) };
        // The caller unmaps it (batched with its neighbours) before anything
        // can move it on from INACTIVE.
        self.slot_of[p as usize].store(s, Ordering::Release);
        self.set(p, INACTIVE);
        let g = self.gen[p as usize]
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        self.lists.lock().inactive.push_back((p, g));
        bump(&self.stats.deactivations, 1);
        true
    }

    /// Drops an inactive page whose far copy is current (page lock held).
    fn drop_inactive(&self, p: u32, s: u32) {
        self.set(p, ABSENT);
        self.slots.give(s);
        if self.clear_flag(p, PREFETCHED) {
            bump(&self.stats.prefetch_wasted, 1);
        }
        bump(&self.stats.evictions, 1);
        self.unreserve(1);
    }

    /// Writes dirty inactive pages back in one batch, then drops those that
    /// are still inactive. On failure they stay inactive and dirty and are
    /// retried later: nothing is dropped before the far copy is current.
    fn write_back(&self, dirty: &[(u32, u32)]) {
        let reqs: Vec<(u64, &[u8])> = dirty
            .iter()
            .map(|&(p, s)| (p as u64 * PAGE as u64, self.slots.bytes(s)))
            .collect();
        let ok = match self.region.write_vectored(&reqs) {
            Ok(()) => true,
            Err(e) => {
                crate::warn(format_args!(
                    "writing back {} pages: {e}; will retry",
                    dirty.len()
                ));
                false
            }
        };
        if ok {
            bump(&self.stats.pages_written, dirty.len() as u64);
        }
        let mut retry = Vec::new();
        for &(p, s) in dirty {
            let _l = self.lock(p);
            self.slots.writing[s as usize].store(false, Ordering::Release);
            let still =
                self.st(p) == INACTIVE && self.slot_of[p as usize].load(Ordering::Acquire) == s;
            if ok {
                self.set_flag(p, FAR_VALID);
                if still {
                    self.clear_flag(p, SLOT_DIRTY);
                    self.drop_inactive(p, s);
                } else {
                    // Reinstalled meanwhile (and kept dirty): the slot is ours to free.
                    self.slots.give(s);
                }
            } else if still {
                retry.push((p, self.gen[p as usize].load(Ordering::Acquire)));
            } else {
                self.slots.give(s);
            }
        }
        if !retry.is_empty() {
            let mut l = self.lists.lock();
            for e in retry {
                l.inactive.push_back(e);
            }
            drop(l);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // ----- flush and fork -------------------------------------------------

    fn flush(&self) -> Result<(), PagingError> {
        let _busy = self.evicting.lock();
        let mut batch: Vec<(u32, Vec<u8>)> = Vec::new();
        let send = |batch: &mut Vec<(u32, Vec<u8>)>| -> Result<(), PagingError> {
            let reqs: Vec<(u64, &[u8])> = batch
                .iter()
                .map(|(p, b)| (*p as u64 * PAGE as u64, b.as_slice()))
                .collect();
            if let Err(e) = self.region.write_vectored(&reqs) {
                // Nothing was marked written: make the pages dirty again.
                for (p, _) in batch.drain(..) {
                    let _l = self.lock(p);
                    match self.st(p) {
                        CLEAN => self.set(p, DIRTY),
                        INACTIVE => self.set_flag(p, SLOT_DIRTY),
                        _ => {}
                    }
                }
                return Err(PagingError::Far(e));
            }
            bump(&self.stats.pages_written, batch.len() as u64);
            for (p, _) in batch.drain(..) {
                self.set_flag(p, FAR_VALID);
            }
            Ok(())
        };
        for p in 0..self.pages as u32 {
            let _l = self.lock(p);
            match self.st(p) {
                DIRTY => {
                    let addr = self.addr(p);
                    self.uffd
                        .write_protect(addr, PAGE, true)
                        .map_err(PagingError::Userfaultfd)?;
                    let mut b = vec![0u8; PAGE];
                    // SAFETY: the page is mapped and now write-protected.
                    unsafe {
                        std::ptr::copy_nonoverlapping(addr as *const u8, b.as_mut_ptr(), PAGE)
                    };
                    self.set(p, CLEAN);
                    batch.push((p, b));
                }
                INACTIVE if self.flag(p, SLOT_DIRTY) => {
                    let s = self.slot_of[p as usize].load(Ordering::Acquire);
                    batch.push((p, self.slots.bytes(s).to_vec()));
                    self.clear_flag(p, SLOT_DIRTY);
                }
                _ => {}
            }
            drop(_l);
            if batch.len() >= self.cfg.writeback_batch {
                send(&mut batch)?;
            }
        }
        if !batch.is_empty() {
            send(&mut batch)?;
        }
        Ok(())
    }

    fn pause_and_fill(&self) -> Result<(), PagingError> {
        self.paused.store(true, Ordering::Release);
        // Wait for an eviction round in progress to finish.
        drop(self.evicting.lock());
        self.fill_pass();
        // Wait for prefetches in flight (they may park a marker page in a
        // slot after the first pass went by), then fill again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while (0..self.pages as u32).any(|q| self.st(q) == FETCHING) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.fill_pass();
        Ok(())
    }

    /// Makes every page with far data, or in a slot, mapped.
    fn fill_pass(&self) {
        let mut buf = vec![0u8; PAGE * 64];
        let mut run: Vec<u32> = Vec::new();
        for p in 0..self.pages as u32 {
            let l = self.lock(p);
            let claimed = match self.st(p) {
                ABSENT if self.flag(p, FAR_VALID) => {
                    self.set(p, FETCHING);
                    true
                }
                INACTIVE => {
                    self.reactivate(p, false);
                    false
                }
                _ => false,
            };
            drop(l);
            let contiguous = run.last().is_none_or(|&q| q + 1 == p);
            if !run.is_empty() && (!claimed || !contiguous || run.len() == 64) {
                self.reserve(run.len() as u64, true);
                self.fetch_and_install(&run, None, &mut buf);
                run.clear();
            }
            if claimed {
                run.push(p);
            }
        }
        if !run.is_empty() {
            self.reserve(run.len() as u64, true);
            self.fetch_and_install(&run, None, &mut buf);
        }
    }
}

/// A page of zeros to install never-written pages from.
fn zero_page() -> &'static [u8; PAGE] {
    static ZERO: [u8; PAGE] = [0; PAGE];
    &ZERO
}
