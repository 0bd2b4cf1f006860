//! The far heap's allocator: size classes with per-thread caches over a
//! caller-given address range.
//!
//! # Design
//!
//! The range is handed to `talc`, which serves only *coarse* requests:
//!
//! * **spans** of 64 KiB, aligned to 64 KiB, each cut into blocks of one
//!   size class (16 B to 16 KiB: 16-byte steps up to 128 B, then four
//!   classes per doubling, 36 classes in all, so a block wastes at most 25%);
//! * **large blocks** (above 16 KiB, or aligned beyond what a class gives),
//!   rounded up to whole 4 KiB pages and page-aligned.
//!
//! Both go through talc under one spin lock, but a span is asked for once
//! per 4 to 4096 small blocks and a large block is worth a lock.
//!
//! A small allocation is served from the calling thread's **cache**: one
//! singly linked free list per class (the link is the block's first word),
//! so `malloc` and `free` are a pop and a push with no lock, no atomic and
//! no search. A cache that runs dry takes a *batch* of blocks (2 to 64,
//! about 64 KiB worth) from its class's **central list**, under that class's
//! spin lock; if the central list is empty too, the batch is cut from the
//! class's current span, and a new span is taken from talc when that one is
//! used up. A cache that holds more than two batches gives one back.
//! Batches keep their length in the top bits of the pointer that links
//! them (the first block's second word), so moving one is O(1) under the
//! lock. Blocks of a span never return to talc: memory freed in one size
//! class is reused by that class only.
//!
//! Which allocation a pointer belongs to is read from a **page table** in
//! local memory, one word per 4 KiB page of the range: a span's pages hold
//! its class; a large block's first page holds its size and alignment.
//! Blocks therefore carry no header, a span starts with its first block (so
//! the power-of-two classes are naturally aligned), and `free` needs no
//! layout.
//!
//! # Threads
//!
//! A block may be freed by any thread: it goes to the freeing thread's
//! cache. When a thread ends, its cache goes back to the central lists;
//! allocations during thread teardown after that use the central lists
//! directly. A cache serves one heap at a time (a process has one far heap;
//! tests make several): a thread that meets another heap gives its cache
//! back to the old one first, which is why heaps are `'static`.
//!
//! # Locks and `fork`
//!
//! Lock order: a class's central lock, then the talc lock. Neither is held
//! while calling anything that could allocate. [`SizeClassHeap::lock_all`]
//! takes every lock in that order (the `fork` prepare handler), and
//! [`SizeClassHeap::unlock_all`] releases them in the parent and the child.
//! Thread caches need no lock: after `fork` the child's only thread keeps
//! its own, and the other threads' caches are simply never used again.
//!
//! # Limits
//!
//! Nothing here ever returns memory to the system (no `madvise`): the range
//! belongs to the pager, which decides what is resident.

use std::alloc::Layout;
use std::cell::UnsafeCell;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};

use talc::{ErrOnOom, Span, Talc};

/// Page size of the page table.
pub const PAGE: usize = 4096;
/// Size and alignment of a span.
pub const SPAN: usize = 64 << 10;
/// Largest size served by a size class.
pub const MAX_SMALL: usize = 16 << 10;
/// Number of size classes.
pub const CLASSES: usize = 36;

const SPAN_PAGES: usize = SPAN / PAGE;

/// The class serving `size` bytes (`1..=MAX_SMALL`) with 16-byte alignment.
#[inline]
pub fn class_of(size: usize) -> usize {
    debug_assert!(size <= MAX_SMALL);
    if size <= 128 {
        return size.max(1).div_ceil(16) - 1;
    }
    let s = size - 1;
    let lg = (usize::BITS - 1 - s.leading_zeros()) as usize; // ≥ 7
    let idx = s >> (lg - 2); // 4..=7
    8 + (lg - 7) * 4 + (idx - 4)
}

/// The block size of class `c`.
#[inline]
pub const fn class_size(c: usize) -> usize {
    if c < 8 {
        return (c + 1) * 16;
    }
    let k = c - 8;
    let lg = 7 + k / 4;
    let idx = 4 + k % 4;
    (idx + 1) << (lg - 2)
}

/// How many blocks move between a thread cache and a central list at once.
#[inline]
const fn batch_len(c: usize) -> usize {
    let n = SPAN / class_size(c);
    if n < 2 {
        2
    } else if n > 64 {
        64
    } else {
        n
    }
}

/// The class for `layout`, or `None` if it is a large allocation.
#[inline]
fn class_for(layout: Layout) -> Option<usize> {
    let size = layout.size().max(1);
    let align = layout.align();
    if align <= 16 {
        return (size <= MAX_SMALL).then(|| class_of(size));
    }
    // Blocks of a class sit at multiples of its size from a 64 KiB-aligned
    // span start, so a class whose size is a multiple of `align` gives it.
    let size = size.checked_next_multiple_of(align)?;
    if size > MAX_SMALL {
        return None;
    }
    (class_of(size)..CLASSES).find(|&c| class_size(c).is_multiple_of(align))
}

// Page-table entries: 0 = nothing starts here; bit 0 set = a span page,
// class in bits 1..; bit 0 clear = the first page of a large block, whose
// size (a page multiple) is the entry with its low 12 bits cleared, and
// log2(alignment) in bits 1..7.
const SMALL_TAG: u64 = 1;

#[inline]
const fn small_entry(c: usize) -> u64 {
    ((c as u64) << 1) | SMALL_TAG
}

#[inline]
fn large_entry(size: usize, align: usize) -> u64 {
    debug_assert!(size.is_multiple_of(PAGE) && align.is_power_of_two());
    size as u64 | ((align.trailing_zeros() as u64) << 1)
}

#[inline]
fn large_layout(e: u64) -> (usize, usize) {
    (
        (e & !(PAGE as u64 - 1)) as usize,
        1usize << ((e >> 1) & 0x3F),
    )
}

/// Lengths ride in the top 16 bits of a batch link (user-space addresses
/// fit in 48 bits; batches are at most 128 blocks).
const LEN_SHIFT: u32 = 48;

/// The free blocks of one class not held by any thread.
struct Central {
    /// Batches linked through their first block's second word (the link
    /// carries the next batch's length in its top bits).
    batches: *mut u8,
    batches_len: usize,
    /// Never-used part of the current span.
    bump: usize,
    bump_end: usize,
}

// SAFETY: the raw pointers are addresses inside the heap's range; Central is
// only touched under its spin lock.
unsafe impl Send for Central {}

type Lock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;

/// A size-class allocator over one address range. See the module docs.
pub struct SizeClassHeap {
    start: usize,
    end: usize,
    /// One entry per page of the range (local memory, zero until written).
    table: NonNull<AtomicU64>,
    table_bytes: usize,
    central: [Lock<Central>; CLASSES],
    large: Lock<Talc<ErrOnOom>>,
}

// SAFETY: all shared state is behind spin locks or atomics; the table is a
// private mapping of atomics that lives as long as the heap.
unsafe impl Sync for SizeClassHeap {}
// SAFETY: as above; nothing is tied to the creating thread.
unsafe impl Send for SizeClassHeap {}

impl std::fmt::Debug for SizeClassHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SizeClassHeap")
            .field("start", &(self.start as *const u8))
            .field("len", &(self.end - self.start))
            .finish()
    }
}

impl Drop for SizeClassHeap {
    fn drop(&mut self) {
        // SAFETY: the table was mapped in `new` with this length and nothing
        // refers to it once the heap is gone.
        unsafe { libc::munmap(self.table.as_ptr().cast(), self.table_bytes) };
    }
}

impl SizeClassHeap {
    /// A heap over `[start, start + len)`.
    ///
    /// # Safety
    /// The range must be readable and writable memory used for nothing else
    /// for as long as the heap exists.
    pub unsafe fn new(start: *mut u8, len: usize) -> Option<SizeClassHeap> {
        let start_u = start as usize;
        let end = start_u.checked_add(len)?;
        let pages = len.div_ceil(PAGE);
        let table_bytes = (pages * 8).max(1).next_multiple_of(PAGE);
        // SAFETY: an anonymous private mapping; the result is checked.
        let table = unsafe {
            libc::mmap(
                ptr::null_mut(),
                table_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if table == libc::MAP_FAILED {
            return None;
        }
        let table = NonNull::new(table.cast::<AtomicU64>())?;
        let mut talc = Talc::new(ErrOnOom);
        // SAFETY: by the caller's contract the range is ours; talc keeps its
        // metadata inside it.
        let claimed = unsafe { talc.claim(Span::new(start, end as *mut u8)) };
        let heap = SizeClassHeap {
            start: start_u,
            end,
            table,
            table_bytes,
            central: std::array::from_fn(|_| {
                Lock::new(Central {
                    batches: ptr::null_mut(),
                    batches_len: 0,
                    bump: 0,
                    bump_end: 0,
                })
            }),
            large: Lock::new(talc),
        };
        claimed.ok().map(|_| heap)
    }

    /// Whether `p` lies in the heap's range.
    #[inline]
    pub fn contains(&self, p: *const u8) -> bool {
        (p as usize) >= self.start && (p as usize) < self.end
    }

    #[inline]
    fn entry(&self, p: usize) -> &AtomicU64 {
        let i = (p - self.start) / PAGE;
        // SAFETY: p is inside the range, so i is inside the table, which
        // holds one initialised (zero-mapped) atomic per page.
        unsafe { &*self.table.as_ptr().add(i) }
    }

    /// Allocates a block for `layout`, or `None` when the range is full.
    #[inline]
    pub fn alloc(&'static self, layout: Layout) -> Option<NonNull<u8>> {
        match class_for(layout) {
            Some(c) => self.alloc_small(c),
            None => self.alloc_large(layout),
        }
    }

    /// Frees a block.
    ///
    /// # Safety
    /// `p` must have come from this heap's [`alloc`](Self::alloc) (or a
    /// resize) and not have been freed since.
    #[inline]
    pub unsafe fn free(&'static self, p: NonNull<u8>) {
        let e = self.entry(p.as_ptr() as usize).load(Ordering::Relaxed);
        if e & SMALL_TAG != 0 {
            // SAFETY: by the caller's contract, p is a live block of class e >> 1.
            unsafe { self.free_small((e >> 1) as usize, p) }
        } else {
            // SAFETY: by the caller's contract, p is a live large block.
            unsafe { self.free_large(p, e) }
        }
    }

    /// How many bytes the block at `p` can hold.
    ///
    /// # Safety
    /// As for [`free`](Self::free).
    #[inline]
    pub unsafe fn usable_size(&self, p: NonNull<u8>) -> usize {
        let e = self.entry(p.as_ptr() as usize).load(Ordering::Relaxed);
        if e & SMALL_TAG != 0 {
            class_size((e >> 1) as usize)
        } else {
            large_layout(e).0
        }
    }

    /// Lets the block at `p` hold `new_size` bytes without moving it, if it
    /// can; else `None` (the caller moves it). The block keeps its alignment.
    ///
    /// # Safety
    /// As for [`free`](Self::free).
    pub unsafe fn resize_in_place(&self, p: NonNull<u8>, new_size: usize) -> Option<NonNull<u8>> {
        let slot = self.entry(p.as_ptr() as usize);
        let e = slot.load(Ordering::Relaxed);
        if e & SMALL_TAG != 0 {
            let have = class_size((e >> 1) as usize);
            let c = (e >> 1) as usize;
            // Stay unless the block would be less than half used (or this
            // is the size's own class anyway).
            let stay = new_size <= have
                && (new_size > have / 2 || (new_size > 0 && class_of(new_size) == c));
            return stay.then_some(p);
        }
        let (size, align) = large_layout(e);
        let new = new_size.max(1).checked_next_multiple_of(PAGE)?;
        if new == size {
            return Some(p);
        }
        if Layout::from_size_align(new, align).is_err() {
            return None;
        }
        // SAFETY: p is a live large block, allocated from talc with
        // (size, align) as the entry records.
        let old = unsafe { Layout::from_size_align_unchecked(size, align) };
        let mut talc = self.large.lock();
        if new < size {
            // SAFETY: as above; 0 < new < size.
            unsafe { talc.shrink(p, old, new) };
        } else {
            // SAFETY: as above; new > size.
            unsafe { talc.grow_in_place(p, old, new) }.ok()?;
        }
        slot.store(large_entry(new, align), Ordering::Relaxed);
        Some(p)
    }

    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        let size = layout.size().max(1).checked_next_multiple_of(PAGE)?;
        let align = layout.align().max(PAGE);
        let l = Layout::from_size_align(size, align).ok()?;
        // SAFETY: l has a nonzero size.
        let p = unsafe { self.large.lock().malloc(l) }.ok()?;
        self.entry(p.as_ptr() as usize)
            .store(large_entry(size, align), Ordering::Relaxed);
        Some(p)
    }

    /// # Safety
    /// `p` must be a live large block whose page entry is `e`.
    unsafe fn free_large(&self, p: NonNull<u8>, e: u64) {
        let (size, align) = large_layout(e);
        self.entry(p.as_ptr() as usize).store(0, Ordering::Relaxed);
        // SAFETY: by the contract, talc allocated p with (size, align).
        unsafe {
            self.large
                .lock()
                .free(p, Layout::from_size_align_unchecked(size, align))
        };
    }

    #[inline]
    fn alloc_small(&'static self, c: usize) -> Option<NonNull<u8>> {
        with_cache(self, |cache| {
            let Some(cache) = cache else {
                return self.central_take(c, 1).map(|(head, _)| head);
            };
            let bin = &mut cache.bins[c];
            if bin.head.is_null() {
                let (head, n) = self.central_take(c, batch_len(c))?;
                bin.head = head.as_ptr();
                bin.len = n;
            }
            let p = bin.head;
            // SAFETY: p is a free block of this class held by this cache;
            // its first word links the next one.
            bin.head = unsafe { p.cast::<*mut u8>().read() };
            bin.len -= 1;
            // SAFETY: p is not null (the list was not empty).
            Some(unsafe { NonNull::new_unchecked(p) })
        })
    }

    /// # Safety
    /// `p` must be a live block of class `c`.
    #[inline]
    unsafe fn free_small(&'static self, c: usize, p: NonNull<u8>) {
        with_cache(self, |cache| {
            let Some(cache) = cache else {
                // SAFETY: p is a block of class c, now free: a batch of one.
                unsafe { p.as_ptr().cast::<*mut u8>().write(ptr::null_mut()) };
                // SAFETY: as above.
                unsafe { self.central_give(c, p.as_ptr(), 1) };
                return;
            };
            let bin = &mut cache.bins[c];
            // SAFETY: p is a block of class c, now free and owned by this cache.
            unsafe { p.as_ptr().cast::<*mut u8>().write(bin.head) };
            bin.head = p.as_ptr();
            bin.len += 1;
            let b = batch_len(c);
            if bin.len > 2 * b {
                // Give the first b blocks back.
                let head = bin.head;
                let mut tail = head;
                for _ in 1..b {
                    // SAFETY: the list holds more than b blocks.
                    tail = unsafe { tail.cast::<*mut u8>().read() };
                }
                // SAFETY: tail is the b-th block of the list.
                bin.head = unsafe { tail.cast::<*mut u8>().read() };
                bin.len -= b;
                // SAFETY: cut the batch off the rest of the list.
                unsafe { tail.cast::<*mut u8>().write(ptr::null_mut()) };
                // SAFETY: head..tail is a null-terminated list of b free blocks of class c.
                unsafe { self.central_give(c, head, b) };
            }
        })
    }

    /// Takes up to `want` free blocks of class `c` as a null-terminated list.
    fn central_take(&self, c: usize, want: usize) -> Option<(NonNull<u8>, usize)> {
        let mut central = self.central[c].lock();
        if let Some(head) = NonNull::new(central.batches) {
            // SAFETY: head is the first block of a batch: its second word
            // links the next batch (with that batch's length on top).
            let link = unsafe { head.as_ptr().cast::<usize>().add(1).read() };
            let len = central.batches_len;
            central.batches = (link & ((1 << LEN_SHIFT) - 1)) as *mut u8;
            central.batches_len = link >> LEN_SHIFT;
            if want >= len {
                return Some((head, len));
            }
            // Keep the rest of the batch here.
            let mut tail = head.as_ptr();
            for _ in 1..want {
                // SAFETY: the batch holds len > want blocks.
                tail = unsafe { tail.cast::<*mut u8>().read() };
            }
            // SAFETY: tail is the want-th block; more follow it.
            let rest = unsafe { tail.cast::<*mut u8>().read() };
            // SAFETY: tail ends the taken list; rest heads the remainder.
            unsafe {
                tail.cast::<*mut u8>().write(ptr::null_mut());
                push_batch(&mut central, rest, len - want);
            }
            return Some((head, want));
        }
        let size = class_size(c);
        if central.bump + size > central.bump_end {
            let span = self.new_span(c)?;
            central.bump = span;
            central.bump_end = span + SPAN;
        }
        let n = want.min((central.bump_end - central.bump) / size);
        let head = central.bump;
        for i in 0..n {
            let b = head + i * size;
            let next = if i + 1 < n { b + size } else { 0 };
            // SAFETY: b is a never-used block of this class in our span.
            unsafe { (b as *mut usize).write(next) };
        }
        central.bump += n * size;
        // SAFETY: head is inside the range, not null.
        Some((unsafe { NonNull::new_unchecked(head as *mut u8) }, n))
    }

    /// Gives a null-terminated list of `n` free blocks of class `c` back.
    ///
    /// # Safety
    /// `head` must head such a list of blocks no one else holds.
    unsafe fn central_give(&self, c: usize, head: *mut u8, n: usize) {
        let mut central = self.central[c].lock();
        // SAFETY: by the contract.
        unsafe { push_batch(&mut central, head, n) };
    }

    /// Takes a span from talc for class `c` and marks its pages.
    fn new_span(&self, c: usize) -> Option<usize> {
        // SAFETY: the layout is valid (power-of-two alignment, nonzero size).
        let l = unsafe { Layout::from_size_align_unchecked(SPAN, SPAN) };
        // SAFETY: l has a nonzero size.
        let p = unsafe { self.large.lock().malloc(l) }.ok()?.as_ptr() as usize;
        for i in 0..SPAN_PAGES {
            self.entry(p + i * PAGE)
                .store(small_entry(c), Ordering::Relaxed);
        }
        Some(p)
    }

    /// Takes every lock (class locks first, then talc's): the `fork`
    /// prepare handler. Nothing can allocate outside a thread cache until
    /// [`unlock_all`](Self::unlock_all).
    pub fn lock_all(&self) {
        for c in &self.central {
            std::mem::forget(c.lock());
        }
        std::mem::forget(self.large.lock());
    }

    /// Releases the locks [`lock_all`](Self::lock_all) took.
    ///
    /// # Safety
    /// Must follow `lock_all` by the same thread (or its forked child), once.
    pub unsafe fn unlock_all(&self) {
        // SAFETY: by the contract, lock_all holds these locks and forgot
        // the guards.
        unsafe {
            self.large.force_unlock();
            for c in &self.central {
                c.force_unlock();
            }
        }
    }
}

/// Pushes a batch onto a central list.
///
/// # Safety
/// `head` must head a null-terminated list of `n` (1..65536) free blocks of
/// the central list's class.
unsafe fn push_batch(central: &mut Central, head: *mut u8, n: usize) {
    debug_assert!(n > 0 && n < 1 << 16);
    let link = central.batches as usize | (central.batches_len << LEN_SHIFT);
    // SAFETY: blocks are at least 16 bytes; the second word is free.
    unsafe { head.cast::<usize>().add(1).write(link) };
    central.batches = head;
    central.batches_len = n;
}

#[derive(Clone, Copy)]
struct Bin {
    head: *mut u8,
    len: usize,
}

struct ThreadCache {
    /// The heap whose blocks the bins hold (null: none yet).
    owner: *const SizeClassHeap,
    /// The thread is ending: its cache has been given back.
    dead: bool,
    bins: [Bin; CLASSES],
}

impl ThreadCache {
    /// Empties the bins into the owner's central lists.
    fn give_back(&mut self) {
        // SAFETY: owners are 'static heaps (see `with_cache`).
        let Some(owner) = (unsafe { self.owner.as_ref() }) else {
            return;
        };
        for (c, bin) in self.bins.iter_mut().enumerate() {
            if !bin.head.is_null() {
                // SAFETY: the bin holds a null-terminated list of bin.len
                // free blocks of class c of `owner` (at most 2 batches + 1).
                unsafe { owner.central_give(c, bin.head, bin.len) };
            }
            *bin = Bin {
                head: ptr::null_mut(),
                len: 0,
            };
        }
    }
}

thread_local! {
    static CACHE: UnsafeCell<ThreadCache> = const {
        UnsafeCell::new(ThreadCache {
            owner: ptr::null(),
            dead: false,
            bins: [Bin { head: ptr::null_mut(), len: 0 }; CLASSES],
        })
    };
    static FLUSHER: Flusher = const { Flusher };
}

/// Gives the thread's cache back when the thread ends.
struct Flusher;

impl Drop for Flusher {
    fn drop(&mut self) {
        let _ = CACHE.try_with(|c| {
            // SAFETY: no other borrow of this thread's cache is live: the
            // allocator never runs thread-exit destructors while it holds one.
            let cache = unsafe { &mut *c.get() };
            cache.give_back();
            // No owner: every later call takes the slow path and sees `dead`.
            cache.owner = ptr::null();
            cache.dead = true;
        });
    }
}

/// Runs `f` with this thread's cache for `heap` (`None` when the thread is
/// ending and its cache is gone).
#[inline]
fn with_cache<R>(heap: &'static SizeClassHeap, f: impl FnOnce(Option<&mut ThreadCache>) -> R) -> R {
    let cell = CACHE.with(|c| c.get());
    // SAFETY: the cache belongs to this thread, and no borrow of it is live:
    // `f` (our alloc and free paths) never re-enters the allocator, and the
    // one call that can (registering the flusher) is made below with no
    // borrow held.
    let cache = unsafe { &mut *cell };
    if ptr::eq(cache.owner, heap) {
        return f(Some(cache));
    }
    if cache.dead {
        return f(None);
    }
    let first = cache.owner.is_null();
    cache.give_back();
    cache.owner = heap;
    if first {
        // Registering a thread-exit destructor may allocate (glibc's
        // __cxa_thread_atexit_impl calls calloc), which may come back here:
        // the cache is consistent and owned by `heap` by now.
        let _ = FLUSHER.try_with(|_| {});
    }
    // SAFETY: as above; the borrow taken before registering is not used again.
    f(Some(unsafe { &mut *cell }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_sizes() {
        let mut prev = 0;
        for c in 0..CLASSES {
            let s = class_size(c);
            assert!(s > prev && s.is_multiple_of(16), "class {c}: {s}");
            assert_eq!(class_of(s), c);
            assert_eq!(class_of(prev + 1), c);
            // At most 25% waste past 128 bytes.
            if s > 128 {
                assert!((s - prev - 1) * 4 <= s, "class {c}");
            }
            prev = s;
        }
        assert_eq!(prev, MAX_SMALL);
        for size in 1..=MAX_SMALL {
            let c = class_of(size);
            assert!(class_size(c) >= size && (c == 0 || class_size(c - 1) < size));
        }
    }

    #[test]
    fn aligned_classes() {
        for align in [32usize, 64, 128, 256, 1024, 4096, 16384] {
            for size in [1usize, 17, 100, 4000, 9000, 16384] {
                let l = Layout::from_size_align(size, align).unwrap();
                if let Some(c) = class_for(l) {
                    assert!(class_size(c) >= size);
                    assert!(class_size(c).is_multiple_of(align));
                } else {
                    assert!(size.next_multiple_of(align) > MAX_SMALL);
                }
            }
        }
    }
}
