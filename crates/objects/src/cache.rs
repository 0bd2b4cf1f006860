//! The object cache: a table of object slots, local copies in the arena, a
//! background CLOCK evictor and a prefetcher.
//!
//! Each object has a slot whose state word packs the local address of its
//! copy (16-byte aligned) with a 4-bit state:
//!
//! | state | meaning |
//! |---|---|
//! | `ABSENT` | only the far copy exists (and it is current) |
//! | `PRESENT` + addr | resident; a dereference is one load of this word |
//! | `EVICTING` + addr | chosen as a victim, waiting for open scopes to end; a dereference takes it back (`PRESENT`) |
//! | `WRITEBACK` + addr | being written back; dereferences wait |
//! | `FETCHING` | a fetch is in flight; dereferences wait |
//! | `FREE` | no object |
//!
//! Dirty and hot are separate flags beside the word, so that setting them
//! never makes the evictor's compare-and-swap fail.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use remora_client::ReadFuture;

use crate::arena::{class_size, Arena};
use crate::epoch::{in_scope, synchronize};
use crate::heap::{FarAddr, FarHeap};
use crate::{ObjError, Result};

const ABSENT: u64 = 0;
const PRESENT: u64 = 1;
const EVICTING: u64 = 2;
const WRITEBACK: u64 = 3;
const FETCHING: u64 = 4;
const FREE: u64 = 5;
const TAG: u64 = 0xF;

/// Slots per segment of the slot table.
const SEG_BITS: u32 = 16;
const SEG: usize = 1 << SEG_BITS;
/// Segments: up to 2^30 objects per cache.
const MAX_SEGS: usize = 1 << 14;

/// Where an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Residency {
    /// A local copy exists.
    Local,
    /// A fetch is in flight.
    InFlight,
    /// Only far.
    Far,
}

/// An object's handle: an index into its cache's slot table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjId(pub(crate) u32);

#[derive(Debug)]
struct Slot {
    state: AtomicU64,
    far: AtomicU64,
    len: AtomicU32,
    align: AtomicU32,
    hot: AtomicBool,
    dirty: AtomicBool,
    nocache: AtomicBool,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: AtomicU64::new(FREE),
            far: AtomicU64::new(0),
            len: AtomicU32::new(0),
            align: AtomicU32::new(0),
            hot: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            nocache: AtomicBool::new(false),
        }
    }
}

#[derive(Debug)]
struct SlotTable {
    segs: Box<[AtomicPtr<Slot>]>,
    /// Free ids and the next never-used id.
    free: Mutex<(Vec<u32>, u32)>,
}

impl SlotTable {
    fn new() -> SlotTable {
        SlotTable {
            segs: (0..MAX_SEGS)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            free: Mutex::new((Vec::new(), 0)),
        }
    }

    #[inline]
    fn get(&self, id: ObjId) -> &Slot {
        let seg = self.segs[(id.0 >> SEG_BITS) as usize].load(Ordering::Acquire);
        // Ids are also decoded from far bytes (list links in offloaded
        // traversals): one whose segment was never installed is refused.
        assert!(!seg.is_null(), "unknown object id {}", id.0);
        // SAFETY: `seg` is non-null, so it was installed by `take` (Release,
        // under the table lock) as a boxed slice of SEG slots, and segments
        // live as long as the table; the index is below SEG.
        unsafe { &*seg.add(id.0 as usize & (SEG - 1)) }
    }

    /// True if `id` names a slot of the table (in any state).
    fn known(&self, id: ObjId) -> bool {
        self.segs
            .get((id.0 >> SEG_BITS) as usize)
            .is_some_and(|s| !s.load(Ordering::Acquire).is_null())
    }

    fn take(&self) -> Result<ObjId> {
        let mut f = self.free.lock();
        if let Some(id) = f.0.pop() {
            return Ok(ObjId(id));
        }
        let id = f.1;
        let seg = id as usize >> SEG_BITS;
        if seg >= MAX_SEGS {
            return Err(ObjError::InvalidArgument(format!(
                "the cache holds the most objects it can ({})",
                MAX_SEGS * SEG
            )));
        }
        if id as usize & (SEG - 1) == 0 {
            let slots: Box<[Slot]> = (0..SEG).map(|_| Slot::new()).collect();
            self.segs[seg].store(Box::into_raw(slots) as *mut Slot, Ordering::Release);
        }
        f.1 += 1;
        Ok(ObjId(id))
    }

    fn give_back(&self, id: ObjId) {
        self.free.lock().0.push(id.0);
    }
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        for s in self.segs.iter() {
            let p = s.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: installed by `take` from a boxed slice of SEG slots.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, SEG)) });
            }
        }
    }
}

/// Settings of an object cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Local memory for object copies, in bytes (counted in size-class
    /// bytes). Default 64 MiB.
    pub budget: u64,
    /// Size of the far regions the cache takes from the cluster. Default
    /// 64 MiB.
    pub region_size: u64,
    /// Run the background evictor (default). Without it the cache only
    /// evicts when asked ([`ObjectCache::evict_to`]).
    pub background_eviction: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            budget: 64 << 20,
            region_size: 64 << 20,
            background_eviction: true,
        }
    }
}

/// Counters of one cache.
#[derive(Debug, Default)]
struct Counters {
    misses: AtomicU64,
    fetched_bytes: AtomicU64,
    written_bytes: AtomicU64,
    evictions: AtomicU64,
    rescues: AtomicU64,
    prefetches: AtomicU64,
    offloads: AtomicU64,
    offload_bytes: AtomicU64,
    uncached_bytes: AtomicU64,
}

/// A snapshot of a cache's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Objects fetched on demand (misses).
    pub misses: u64,
    /// Bytes fetched into the cache (demand and prefetch).
    pub fetched_bytes: u64,
    /// Bytes written back.
    pub written_bytes: u64,
    /// Objects evicted.
    pub evictions: u64,
    /// Victims taken back by a dereference before they were written back.
    pub rescues: u64,
    /// Objects fetched ahead of use.
    pub prefetches: u64,
    /// Offloaded requests sent to memory servers.
    pub offloads: u64,
    /// Reply bytes of offloaded requests.
    pub offload_bytes: u64,
    /// Bytes read around the cache (uncached scans).
    pub uncached_bytes: u64,
    /// Size-class bytes of resident objects.
    pub resident_bytes: u64,
    /// Bytes the arena holds from the system (resident plus free slots).
    pub arena_bytes: u64,
    /// Far bytes of live objects.
    pub far_bytes: u64,
}

/// A write-back: region index, offset, bytes, and what the caller tracks.
type Write<'a, X> = (usize, u64, &'a [u8], X);

/// One prefetch request: objects lying back to back in far memory, read
/// with one request.
struct Fetch {
    /// Each object, its local copy and its length, in far order.
    parts: Vec<(ObjId, NonNull<u8>, usize)>,
    fut: ReadFuture,
}

// SAFETY: each `NonNull` is the local copy of an object in FETCHING state,
// which only the prefetcher thread writes until it publishes the object.
unsafe impl Send for Fetch {}

pub(crate) struct Inner {
    pub(crate) heap: FarHeap,
    arena: Arena,
    slots: SlotTable,
    budget: AtomicU64,
    resident: AtomicU64,
    /// Resident object ids in CLOCK order, and the hand.
    ring: Mutex<(Vec<u32>, usize)>,
    /// Wakes the evictor.
    kick: Condvar,
    kick_lock: Mutex<bool>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    prefetch_tx: Mutex<Option<mpsc::Sender<Fetch>>>,
    /// Bumped after every write to far memory lands (before the written
    /// objects can become absent): a reader of far bytes that saw no bump
    /// since it read knows they were current.
    far_writes: AtomicU64,
    counters: Counters,
    /// Serialises eviction rounds (background and explicit).
    evicting: Mutex<()>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCache")
            .field("budget", &self.budget())
            .field("resident", &self.resident.load(Ordering::Relaxed))
            .finish()
    }
}

/// A local cache of far objects with its own budget; cheap to clone.
///
/// Data structures ([`crate::FarBox`], [`crate::FarVec`], ...) are created
/// in a cache and keep a clone of it.
#[derive(Debug, Clone)]
pub struct ObjectCache {
    pub(crate) inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

/// Stops the cache's threads when the last handle goes (the far regions are
/// freed when the state itself goes, right after).
#[derive(Debug)]
struct Owner(Arc<Inner>);

impl ObjectCache {
    /// A cache on `cluster` with the given settings.
    pub fn new(cluster: remora_client::Cluster, cfg: CacheConfig) -> Result<ObjectCache> {
        if cfg.budget == 0 {
            return Err(ObjError::InvalidArgument(
                "the cache budget must be positive".into(),
            ));
        }
        if cfg.region_size == 0 {
            return Err(ObjError::InvalidArgument(
                "the far region size must be positive".into(),
            ));
        }
        let (tx, rx) = mpsc::channel::<Fetch>();
        let inner = Arc::new(Inner {
            heap: FarHeap::new(cluster, cfg.region_size),
            arena: Arena::new(),
            slots: SlotTable::new(),
            budget: AtomicU64::new(cfg.budget),
            resident: AtomicU64::new(0),
            ring: Mutex::new((Vec::new(), 0)),
            kick: Condvar::new(),
            kick_lock: Mutex::new(false),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            prefetch_tx: Mutex::new(Some(tx)),
            far_writes: AtomicU64::new(0),
            counters: Counters::default(),
            evicting: Mutex::new(()),
        });
        let weak = Arc::downgrade(&inner);
        let pf = std::thread::Builder::new()
            .name("remora-obj-prefetch".into())
            .spawn(move || prefetcher(weak, rx))
            .map_err(|e| ObjError::InvalidArgument(format!("spawning the prefetcher: {e}")))?;
        inner.threads.lock().push(pf);
        if cfg.background_eviction {
            let weak = Arc::downgrade(&inner);
            let ev = std::thread::Builder::new()
                .name("remora-obj-evict".into())
                .spawn(move || evictor(weak))
                .map_err(|e| ObjError::InvalidArgument(format!("spawning the evictor: {e}")))?;
            inner.threads.lock().push(ev);
        }
        Ok(ObjectCache {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    /// The cache's budget in bytes.
    pub fn budget(&self) -> u64 {
        self.inner.budget()
    }

    /// Changes the budget. A smaller budget is reached by the background
    /// evictor (or [`ObjectCache::evict_to`]); zero is refused.
    pub fn set_budget(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Err(ObjError::InvalidArgument(
                "the cache budget must be positive".into(),
            ));
        }
        self.inner.budget.store(bytes, Ordering::Relaxed);
        self.inner.wake_evictor();
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            misses: l(&c.misses),
            fetched_bytes: l(&c.fetched_bytes),
            written_bytes: l(&c.written_bytes),
            evictions: l(&c.evictions),
            rescues: l(&c.rescues),
            prefetches: l(&c.prefetches),
            offloads: l(&c.offloads),
            offload_bytes: l(&c.offload_bytes),
            uncached_bytes: l(&c.uncached_bytes),
            resident_bytes: l(&self.inner.resident),
            arena_bytes: self.inner.arena.system_bytes(),
            far_bytes: self.inner.heap.used(),
        }
    }

    /// Evicts (writing back dirty objects) until at most `target` bytes are
    /// resident or nothing more can be evicted. Must not be called with a
    /// scope open on this thread.
    pub fn evict_to(&self, target: u64) -> Result<()> {
        if in_scope() {
            return Err(ObjError::ScopeOpen);
        }
        self.inner.evict_round(target).map(|_| ())
    }

    /// Writes every dirty resident object back, keeping it resident.
    /// Writers on other threads are held off each object while its bytes
    /// are taken, as for an eviction, so this waits for open scopes and
    /// must not be called with a scope open on this thread.
    pub fn flush(&self) -> Result<()> {
        if in_scope() {
            return Err(ObjError::ScopeOpen);
        }
        self.inner.flush_all()
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let inner = &self.0;
        inner.stop.store(true, Ordering::Relaxed);
        inner.wake_evictor();
        // The prefetcher finishes the fetches in flight, then sees the
        // channel close.
        inner.prefetch_tx.lock().take();
        let threads = std::mem::take(&mut *inner.threads.lock());
        if in_scope() {
            // An eviction round in progress waits for this thread's scope:
            // joining would wait for it in turn. The threads stop by
            // themselves once they see `stop`.
            return;
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Objects still alive here belong to structures being dropped with
        // the cache; free their local copies.
        let ids = std::mem::take(&mut self.ring.get_mut().0);
        for id in ids {
            let slot = self.slots.get(ObjId(id));
            let s = slot.state.swap(FREE, Ordering::AcqRel);
            if matches!(s & TAG, PRESENT | EVICTING | WRITEBACK) {
                if let Some(p) = NonNull::new((s & !TAG) as *mut u8) {
                    // SAFETY: the copy was allocated with this length and no
                    // handle to the cache (hence no guard) is left.
                    unsafe {
                        self.arena
                            .free(p, slot.len.load(Ordering::Relaxed) as usize)
                    };
                }
            }
        }
        self.heap.release();
    }
}

impl Inner {
    #[inline]
    fn slot(&self, id: ObjId) -> &Slot {
        self.slots.get(id)
    }

    /// Creates an object of `bytes.len()` bytes with the given contents,
    /// resident and dirty (it reaches far memory when evicted or flushed).
    pub(crate) fn create(&self, bytes: &[u8], align: u64) -> Result<ObjId> {
        let far = self.heap.alloc(bytes.len() as u64, align)?;
        self.create_at(bytes, far, align)
    }

    /// As [`Inner::create`], at far memory the caller allocated from the
    /// heap (`bytes.len()` bytes, `align`); the object owns it from now on,
    /// even on error.
    pub(crate) fn create_at(&self, bytes: &[u8], far: FarAddr, align: u64) -> Result<ObjId> {
        let len = bytes.len();
        if u32::try_from(len).is_err() {
            // A slot keeps the length in 32 bits.
            self.heap.free(far, len as u64, align);
            return Err(ObjError::InvalidArgument(format!(
                "an object of {len} bytes (at most 4 GiB)"
            )));
        }
        let id = match self.slots.take() {
            Ok(id) => id,
            Err(e) => {
                self.heap.free(far, len as u64, align);
                return Err(e);
            }
        };
        let Some(p) = self.arena.alloc(len) else {
            self.heap.free(far, len as u64, align);
            self.slots.give_back(id);
            return Err(ObjError::OutOfLocalMemory);
        };
        // SAFETY: `p` has room for `len` bytes and nothing else uses it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.as_ptr(), len) };
        let slot = self.slot(id);
        slot.far.store(far.0, Ordering::Relaxed);
        slot.len.store(len as u32, Ordering::Relaxed);
        slot.align.store(align as u32, Ordering::Relaxed);
        slot.nocache.store(false, Ordering::Relaxed);
        self.publish(id, p, len, true, true);
        Ok(id)
    }

    /// Publishes a filled local copy as the resident object `id`: referenced
    /// (as CLOCK inserts), clean or dirty, counted, and entered in the ring
    /// (see [`Inner::admitted`] for `may_evict`).
    fn publish(&self, id: ObjId, p: NonNull<u8>, len: usize, dirty: bool, may_evict: bool) {
        let slot = self.slot(id);
        slot.hot.store(true, Ordering::Relaxed);
        slot.dirty.store(dirty, Ordering::Relaxed);
        let r = self.charge(len);
        slot.state
            .store(p.as_ptr() as u64 | PRESENT, Ordering::Release);
        self.admitted(id, r, may_evict);
    }

    /// Counts an object about to be published as resident; returns the
    /// resident bytes with it. Called before the object is published, so
    /// that whoever frees it (an owner, the evictor) takes off what is
    /// already counted.
    fn charge(&self, len: usize) -> u64 {
        let size = class_size(len) as u64;
        self.resident.fetch_add(size, Ordering::Relaxed) + size
    }

    /// Enters a newly published object (counted by [`Inner::charge`], which
    /// returned `r`) in the CLOCK ring. Past the high watermark the evictor
    /// is woken; far past the budget a thread outside any scope evicts
    /// itself (back-pressure for bulk loads), unless `may_evict` is false.
    fn admitted(&self, id: ObjId, r: u64, may_evict: bool) {
        self.ring.lock().0.push(id.0);
        if r > self.high_mark() {
            self.wake_evictor();
            let budget = self.budget();
            if may_evict && r > budget + budget / 8 && !in_scope() {
                if let Err(e) = self.evict_round(self.low_mark()) {
                    tracing::warn!("object write-back failed (kept resident): {e}");
                }
            }
        }
    }

    fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// Eviction starts above the budget itself, so that a working set that
    /// fits the budget stays whole ...
    fn high_mark(&self) -> u64 {
        self.budget()
    }

    /// ... and frees a thirty-second of it, so that the next misses find
    /// room without waiting.
    fn low_mark(&self) -> u64 {
        let b = self.budget();
        b - b / 32
    }

    fn wake_evictor(&self) {
        let mut k = self.kick_lock.lock();
        if !*k {
            *k = true;
            self.kick.notify_one();
        }
    }

    /// The object's far address and length.
    pub(crate) fn far_of(&self, id: ObjId) -> (FarAddr, usize) {
        let s = self.slot(id);
        (
            FarAddr(s.far.load(Ordering::Relaxed)),
            s.len.load(Ordering::Relaxed) as usize,
        )
    }

    /// The local copy if the object is resident: the hit path.
    #[inline]
    pub(crate) fn local(&self, id: ObjId) -> Option<NonNull<u8>> {
        let slot = self.slot(id);
        let s = slot.state.load(Ordering::Acquire);
        if s & TAG == PRESENT {
            if !slot.hot.load(Ordering::Relaxed) {
                slot.hot.store(true, Ordering::Relaxed);
            }
            // SAFETY (of the pointer's use by callers): PRESENT carries a
            // non-null arena address.
            return NonNull::new((s & !TAG) as *mut u8);
        }
        None
    }

    /// Makes the object resident and returns its local copy. Must be called
    /// inside a scope; the copy stays valid until the scope ends.
    #[inline]
    pub(crate) fn deref(&self, id: ObjId) -> Result<NonNull<u8>> {
        match self.local(id) {
            Some(p) => Ok(p),
            None => self.deref_slow(id),
        }
    }

    /// Marks a resident object dirty (its copy is about to be written
    /// through a mutable guard).
    #[inline]
    pub(crate) fn mark_dirty(&self, id: ObjId) {
        let d = &self.slot(id).dirty;
        if !d.load(Ordering::Relaxed) {
            d.store(true, Ordering::Relaxed);
        }
    }

    /// True if `id` names a slot of this cache; for ids read from far bytes
    /// that are not known to be current.
    pub(crate) fn is_known(&self, id: ObjId) -> bool {
        self.slots.known(id)
    }

    /// True if the object has changes that far memory does not have yet.
    pub(crate) fn is_dirty(&self, id: ObjId) -> bool {
        self.slot(id).dirty.load(Ordering::Acquire)
    }

    /// True if the object has a local copy in any state.
    pub(crate) fn is_local(&self, id: ObjId) -> bool {
        !matches!(
            self.slot(id).state.load(Ordering::Acquire) & TAG,
            ABSENT | FREE
        )
    }

    /// Where the object is now.
    pub(crate) fn residency(&self, id: ObjId) -> Residency {
        match self.slot(id).state.load(Ordering::Acquire) & TAG {
            PRESENT | EVICTING | WRITEBACK => Residency::Local,
            FETCHING => Residency::InFlight,
            _ => Residency::Far,
        }
    }

    /// Objects of `len` bytes that fit in a quarter of the budget (the most
    /// an iterator keeps in flight).
    pub(crate) fn quarter_budget_objects(&self, len: usize) -> usize {
        ((self.budget() / 4) / class_size(len) as u64).max(1) as usize
    }

    /// Excludes an object from second chances: it is evicted first.
    pub(crate) fn set_nocache(&self, id: ObjId, on: bool) {
        self.slot(id).nocache.store(on, Ordering::Relaxed);
    }

    #[cold]
    fn deref_slow(&self, id: ObjId) -> Result<NonNull<u8>> {
        let slot = self.slot(id);
        let mut spins = 0u32;
        loop {
            let s = slot.state.load(Ordering::Acquire);
            match s & TAG {
                PRESENT => return Ok(NonNull::new((s & !TAG) as *mut u8).expect("present")),
                EVICTING => {
                    // The victim's copy is still intact: take it back.
                    let back = (s & !TAG) | PRESENT;
                    if slot
                        .state
                        .compare_exchange(s, back, Ordering::SeqCst, Ordering::Acquire)
                        .is_ok()
                    {
                        slot.hot.store(true, Ordering::Relaxed);
                        self.counters.rescues.fetch_add(1, Ordering::Relaxed);
                        return Ok(NonNull::new((s & !TAG) as *mut u8).expect("evicting"));
                    }
                }
                ABSENT => {
                    if slot
                        .state
                        .compare_exchange(ABSENT, FETCHING, Ordering::SeqCst, Ordering::Acquire)
                        .is_ok()
                    {
                        return self.fetch(id);
                    }
                }
                FREE => {
                    return Err(ObjError::InvalidArgument(format!(
                        "object {} does not exist",
                        id.0
                    )))
                }
                // FETCHING or WRITEBACK: another thread is moving it.
                _ => backoff(&mut spins),
            }
        }
    }

    /// Fetches an object this thread moved to FETCHING.
    fn fetch(&self, id: ObjId) -> Result<NonNull<u8>> {
        let slot = self.slot(id);
        let (far, len) = self.far_of(id);
        let Some(p) = self.arena.alloc(len) else {
            slot.state.store(ABSENT, Ordering::Release);
            return Err(ObjError::OutOfLocalMemory);
        };
        // SAFETY: `p` has room for `len` bytes that only this thread uses
        // until the object is published below.
        let buf = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), len) };
        let region = self.heap.region(far.region());
        if let Err(e) = region.read(far.offset(), buf) {
            // SAFETY: allocated above with `len`, never published.
            unsafe { self.arena.free(p, len) };
            slot.state.store(ABSENT, Ordering::Release);
            return Err(e.into());
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.publish(id, p, len, false, true);
        Ok(p)
    }

    /// Starts fetching the absent objects among `ids` without waiting; a
    /// dereference of one of them waits for its fetch only.
    pub(crate) fn prefetch(&self, ids: impl IntoIterator<Item = ObjId>) {
        /// Most bytes one prefetch request reads.
        const MAX_RUN: usize = 256 << 10;
        let tx = self.prefetch_tx.lock().clone();
        let Some(tx) = tx else { return };
        let mut run: Vec<(ObjId, NonNull<u8>, usize)> = Vec::new();
        let mut run_start = FarAddr(0);
        let mut run_len = 0usize;
        let send = |run: &mut Vec<(ObjId, NonNull<u8>, usize)>, start: FarAddr, len: usize| {
            if run.is_empty() {
                return;
            }
            let fut = self
                .heap
                .region(start.region())
                .read_async(start.offset(), len);
            let parts = std::mem::take(run);
            if let Err(mpsc::SendError(f)) = tx.send(Fetch { parts, fut }) {
                for (id, dst, len) in f.parts {
                    // SAFETY: allocated for this fetch, never published.
                    unsafe { self.arena.free(dst, len) };
                    self.slot(id).state.store(ABSENT, Ordering::Release);
                }
            }
        };
        for id in ids {
            let slot = self.slot(id);
            if slot
                .state
                .compare_exchange(ABSENT, FETCHING, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let (far, len) = self.far_of(id);
            let Some(dst) = self.arena.alloc(len) else {
                slot.state.store(ABSENT, Ordering::Release);
                continue;
            };
            let follows = !run.is_empty()
                && far.region() == run_start.region()
                && far.0 == run_start.0 + run_len as u64
                && run_len + len <= MAX_RUN;
            if !follows {
                send(&mut run, run_start, run_len);
                run_start = far;
                run_len = 0;
            }
            run.push((id, dst, len));
            run_len += len;
        }
        send(&mut run, run_start, run_len);
    }

    /// The far-write version: read it before reading far bytes outside
    /// the cache; if it is unchanged afterwards, no write-back landed in
    /// between.
    pub(crate) fn far_version(&self) -> u64 {
        self.far_writes.load(Ordering::SeqCst)
    }

    /// Installs bytes read from far memory (by an offloaded traversal that
    /// started at far version `since`) as the clean local copy of an absent
    /// object. Returns false, leaving the object alone, if it is not absent
    /// (a local copy wins: it may be newer than the bytes) or if a
    /// write-back landed since the bytes were read (they may be stale).
    pub(crate) fn install(&self, id: ObjId, bytes: &[u8], since: u64) -> bool {
        let slot = self.slot(id);
        if slot.len.load(Ordering::Relaxed) as usize != bytes.len()
            || slot
                .state
                .compare_exchange(ABSENT, FETCHING, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        // The object became absent after its last write-back bumped the
        // version, so an unchanged version means the bytes are current.
        if self.far_version() != since {
            slot.state.store(ABSENT, Ordering::Release);
            return false;
        }
        let Some(p) = self.arena.alloc(bytes.len()) else {
            slot.state.store(ABSENT, Ordering::Release);
            return false;
        };
        // SAFETY: fresh room for `bytes.len()` bytes, unpublished.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.as_ptr(), bytes.len()) };
        self.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        // No eviction from here: the caller installs a chain in order.
        self.publish(id, p, bytes.len(), false, false);
        true
    }

    fn complete_prefetch(&self, f: Fetch) {
        let total: usize = f.parts.iter().map(|p| p.2).sum();
        match f.fut.wait() {
            Ok(data) if data.len() == total => {
                let mut at = 0;
                for (id, dst, len) in f.parts {
                    // SAFETY: `dst` has room for `len` bytes, unpublished.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data[at..].as_ptr(), dst.as_ptr(), len)
                    };
                    at += len;
                    self.counters.prefetches.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .fetched_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    // Never evict from here: a dereference may be waiting
                    // for a later fetch of this thread while holding a scope.
                    self.publish(id, dst, len, false, false);
                }
            }
            other => {
                if let Err(e) = other {
                    tracing::debug!("prefetch failed (a later use fetches again): {e}");
                }
                for (id, dst, len) in f.parts {
                    // SAFETY: allocated for this fetch, never published.
                    unsafe { self.arena.free(dst, len) };
                    self.slot(id).state.store(ABSENT, Ordering::Release);
                }
            }
        }
    }

    /// Frees an object. The caller owns it exclusively: no guard on it can
    /// exist.
    pub(crate) fn destroy(&self, id: ObjId) {
        let slot = self.slot(id);
        let mut spins = 0u32;
        loop {
            let s = slot.state.load(Ordering::Acquire);
            match s & TAG {
                PRESENT | EVICTING | ABSENT => {
                    if slot
                        .state
                        .compare_exchange(s, FREE, Ordering::SeqCst, Ordering::Acquire)
                        .is_ok()
                    {
                        let len = slot.len.load(Ordering::Relaxed) as usize;
                        if s & TAG != ABSENT {
                            let p = NonNull::new((s & !TAG) as *mut u8).expect("local copy");
                            // SAFETY: the copy is unreachable now (FREE) and
                            // no guard exists (exclusive owner).
                            unsafe { self.arena.free(p, len) };
                            self.resident
                                .fetch_sub(class_size(len) as u64, Ordering::Relaxed);
                        }
                        slot.dirty.store(false, Ordering::Relaxed);
                        let far = FarAddr(slot.far.load(Ordering::Relaxed));
                        let align = slot.align.load(Ordering::Relaxed) as u64;
                        self.heap.free(far, len as u64, align);
                        self.slots.give_back(id);
                        return;
                    }
                }
                FREE => return,
                _ => backoff(&mut spins),
            }
        }
    }

    /// Writes the dirty ones among `ids` back (they stay resident). The
    /// caller guarantees no one writes them meanwhile (it holds `&` of the
    /// structure, and writers need `&mut`).
    ///
    /// Takes no lock and waits for no eviction, so it may be called with a
    /// scope open. The scope opened here stays open until the bytes have
    /// landed, so an eviction round that picks one of these objects
    /// meanwhile waits for it rather than freeing the object as clean while
    /// far memory is older; and a dirty flag is cleared only after the
    /// write landed (and bumped the far-write version), so a reader of far
    /// bytes that finds an object clean finds its far bytes current.
    pub(crate) fn flush_ids(&self, ids: &[ObjId]) -> Result<()> {
        if !ids.iter().any(|&id| self.is_dirty(id)) {
            return Ok(());
        }
        let scope = crate::Scope::new();
        let mut writes: Vec<Write<'_, ObjId>> = Vec::new();
        for &id in ids {
            let slot = self.slot(id);
            if !slot.dirty.load(Ordering::Acquire) {
                continue;
            }
            // Dereference (rescuing a victim, waiting out a write-back). On
            // error no flag was cleared: nothing is lost.
            let p = self.deref(id)?;
            if !slot.dirty.load(Ordering::Acquire) {
                // Written back and fetched again meanwhile.
                continue;
            }
            let (far, len) = self.far_of(id);
            // SAFETY: resident while `scope` lives, which is until after the
            // write below; `len` bytes; no one writes them (caller's
            // guarantee).
            let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), len) };
            writes.push((far.region(), far.offset(), bytes, id));
        }
        self.write_back(&writes)?;
        for w in &writes {
            self.slot(w.3).dirty.store(false, Ordering::Release);
        }
        drop(scope);
        Ok(())
    }

    /// Writes every dirty resident object back, keeping it resident, while
    /// writers may be at work: each object is unpublished and taken into
    /// WRITEBACK as by an eviction round (so no guard on it is alive and
    /// none can be made until it is published again), written from there,
    /// then published again. Must not be called with a scope open on this
    /// thread.
    fn flush_all(&self) -> Result<()> {
        // No eviction round meanwhile: its victims and these are told apart
        // by their state words only.
        let _one = self.evicting.lock();
        let ids: Vec<u32> = self.ring.lock().0.clone();
        let mut held: Vec<(ObjId, u64)> = Vec::new();
        for id in ids {
            let id = ObjId(id);
            let slot = self.slot(id);
            let s = slot.state.load(Ordering::Acquire);
            if s & TAG != PRESENT || !slot.dirty.load(Ordering::Acquire) {
                continue;
            }
            let evicting = (s & !TAG) | EVICTING;
            if slot
                .state
                .compare_exchange(s, evicting, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                held.push((id, evicting));
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        // No guard on a held object outlives this.
        synchronize();
        let mut writes: Vec<Write<'_, (ObjId, u64)>> = Vec::new();
        for (id, evicting) in held {
            let wb = (evicting & !TAG) | WRITEBACK;
            if self
                .slot(id)
                .state
                .compare_exchange(evicting, wb, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                // Taken back by a dereference (it stays dirty and in the
                // ring), or freed by its owner.
                continue;
            }
            let (far, len) = self.far_of(id);
            // SAFETY: in WRITEBACK no one writes the copy or frees it (a
            // dereference or a destroy waits) until it is published below.
            let bytes = unsafe { std::slice::from_raw_parts((wb & !TAG) as *const u8, len) };
            writes.push((far.region(), far.offset(), bytes, (id, wb)));
        }
        let r = self.write_back(&writes);
        for w in &writes {
            let (id, wb) = w.3;
            let slot = self.slot(id);
            if r.is_ok() {
                slot.dirty.store(false, Ordering::Release);
            }
            slot.state.store((wb & !TAG) | PRESENT, Ordering::Release);
        }
        r
    }

    /// Writes `(region, offset, bytes)` triples, one vectored call per
    /// region.
    fn write_back<B: AsRef<[u8]>, X>(&self, writes: &[(usize, u64, B, X)]) -> Result<()> {
        let mut regions: Vec<usize> = writes.iter().map(|w| w.0).collect();
        regions.sort_unstable();
        regions.dedup();
        for r in regions {
            let reqs: Vec<(u64, &[u8])> = writes
                .iter()
                .filter(|w| w.0 == r)
                .map(|w| (w.1, w.2.as_ref()))
                .collect();
            self.heap.region(r).write_vectored(&reqs)?;
            self.far_writes.fetch_add(1, Ordering::SeqCst);
            let n: usize = reqs.iter().map(|q| q.1.len()).sum();
            self.counters
                .written_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `len` far bytes at `far` without caching them (one-touch
    /// scans); the caller checked that the objects there are not local.
    pub(crate) fn read_uncached_async(&self, far: FarAddr, len: usize) -> ReadFuture {
        self.counters
            .uncached_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.heap.region(far.region()).read_async(far.offset(), len)
    }

    pub(crate) fn count_offload(&self, reply_bytes: usize) {
        self.counters.offloads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .offload_bytes
            .fetch_add(reply_bytes as u64, Ordering::Relaxed);
    }

    /// One eviction round: picks victims by CLOCK until resident bytes would
    /// drop to `target`, waits for scopes, writes dirty victims back and
    /// frees them.
    /// Returns the number of objects freed.
    fn evict_round(&self, target: u64) -> Result<usize> {
        let _one = self.evicting.lock();
        let resident = self.resident.load(Ordering::Relaxed);
        if resident <= target {
            return Ok(0);
        }
        let mut need = resident - target;
        let mut victims: Vec<(ObjId, u64)> = Vec::new();
        {
            let mut ring = self.ring.lock();
            let (ids, hand) = &mut *ring;
            // Two sweeps at most: the first may only clear hot bits.
            let mut budget = ids.len() * 2;
            while need > 0 && !ids.is_empty() && budget > 0 {
                budget -= 1;
                if *hand >= ids.len() {
                    *hand = 0;
                }
                let id = ObjId(ids[*hand]);
                let slot = self.slot(id);
                let s = slot.state.load(Ordering::Acquire);
                if s & TAG != PRESENT {
                    // Evicted, freed or reused: drop the stale entry (a
                    // resident object is pushed again when it comes back).
                    if s & TAG != EVICTING {
                        ids.swap_remove(*hand);
                    } else {
                        *hand += 1;
                    }
                    continue;
                }
                if slot.hot.load(Ordering::Relaxed) && !slot.nocache.load(Ordering::Relaxed) {
                    slot.hot.store(false, Ordering::Relaxed);
                    *hand += 1;
                    continue;
                }
                let evicting = (s & !TAG) | EVICTING;
                if slot
                    .state
                    .compare_exchange(s, evicting, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    ids.swap_remove(*hand);
                    let sz = class_size(slot.len.load(Ordering::Relaxed) as usize) as u64;
                    need = need.saturating_sub(sz);
                    victims.push((id, evicting));
                } else {
                    *hand += 1;
                }
            }
        }
        if victims.is_empty() {
            return Ok(0);
        }
        // No guard on a victim outlives this.
        synchronize();
        let mut writes: Vec<Write<'_, (ObjId, u64)>> = Vec::new();
        let mut clean: Vec<(ObjId, u64)> = Vec::new();
        for &(id, evicting) in &victims {
            let slot = self.slot(id);
            let wb = (evicting & !TAG) | WRITEBACK;
            if slot
                .state
                .compare_exchange(evicting, wb, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                // Taken back by a dereference, or freed by its owner; a
                // taken-back object must be in the ring again.
                if slot.state.load(Ordering::Acquire) & TAG == PRESENT {
                    self.ring.lock().0.push(id.0);
                }
                continue;
            }
            if slot.dirty.load(Ordering::Acquire) {
                let (far, len) = self.far_of(id);
                // SAFETY: in WRITEBACK no one writes the copy and it is not
                // freed until this round finishes.
                let bytes = unsafe { std::slice::from_raw_parts((wb & !TAG) as *const u8, len) };
                writes.push((far.region(), far.offset(), bytes, (id, wb)));
            } else {
                clean.push((id, wb));
            }
        }
        let result = self.write_back(&writes);
        let written: Vec<(ObjId, u64)> = writes.iter().map(|w| w.3).collect();
        if result.is_err() {
            // Keep dirty data local: the objects become resident again.
            for &(id, wb) in &written {
                self.slot(id)
                    .state
                    .store((wb & !TAG) | PRESENT, Ordering::Release);
                self.ring.lock().0.push(id.0);
            }
        }
        let mut freed = written;
        if result.is_err() {
            freed.clear();
        }
        freed.extend(clean);
        let n = freed.len();
        for (id, wb) in freed {
            let slot = self.slot(id);
            let len = slot.len.load(Ordering::Relaxed) as usize;
            slot.dirty.store(false, Ordering::Release);
            slot.state.store(ABSENT, Ordering::Release);
            let p = NonNull::new((wb & !TAG) as *mut u8).expect("victim copy");
            // SAFETY: the copy is unreachable (ABSENT) and no guard exists
            // (synchronized above).
            unsafe { self.arena.free(p, len) };
            self.resident
                .fetch_sub(class_size(len) as u64, Ordering::Relaxed);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        result.map(|()| n)
    }
}

/// Waits a little for another thread that is moving an object: spins
/// first, then yields.
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 100 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Background evictor: keeps resident bytes between the watermarks.
fn evictor(weak: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::Relaxed) {
            return;
        }
        if inner.resident.load(Ordering::Relaxed) > inner.high_mark() {
            let target = inner.low_mark();
            match inner.evict_round(target) {
                Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("object write-back failed (kept resident, retrying): {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            continue;
        }
        {
            let mut k = inner.kick_lock.lock();
            if !*k {
                inner.kick.wait_for(&mut k, Duration::from_millis(50));
            }
            *k = false;
        }
    }
}

fn prefetcher(weak: std::sync::Weak<Inner>, rx: mpsc::Receiver<Fetch>) {
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(f) => {
                let Some(inner) = weak.upgrade() else { return };
                inner.complete_prefetch(f);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if weak.strong_count() == 0 {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
