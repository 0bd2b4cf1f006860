//! Local memory for cached objects: size-classed slabs.
//!
//! Objects of one data structure all have one size (a vector's chunk, a hash
//! table's bucket, a list's node), so a size class per distinct size gives
//! almost no internal waste, and a slot freed by an eviction is reused at
//! once by the next fetch of the same structure: no compaction pass is
//! needed. A log-structured store would compact by copying live objects,
//! which would have to move objects under concurrent dereferences; the
//! slabs never move an object while it is resident.
//!
//! Classes step by 16 bytes up to 256 and by an eighth of a doubling beyond
//! (at most 12.5% rounding). A chunk is 256 KiB aligned to its size, so a
//! slot finds its chunk by masking the address; a chunk whose slots are all
//! free goes back to the system allocator (except the last one of a class),
//! so memory stranded in half-empty chunks stays small. Objects larger than
//! a quarter of a chunk are allocated one by one.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Chunk size and alignment.
const CHUNK: usize = 256 << 10;
/// Alignment of every object.
pub const ALIGN: usize = 16;
/// Largest object served from chunks.
const MAX_SMALL: usize = CHUNK / 4;
/// Bytes at the start of a chunk reserved for its header.
const HEADER: usize = 64;

/// The size class of an object of `len` bytes: the bytes it occupies.
pub fn class_size(len: usize) -> usize {
    let len = len.max(1);
    if len <= 256 {
        return len.div_ceil(16) * 16;
    }
    if len > MAX_SMALL {
        return len.div_ceil(4096) * 4096;
    }
    // An eighth of the power of two below `len`, rounded to 16.
    let step = ((1usize << (usize::BITS - 1 - (len - 1).leading_zeros())) / 8).max(16);
    len.div_ceil(step) * step
}

struct ChunkHeader {
    /// Intrusive list of free slots (each free slot holds the next pointer).
    free: *mut u8,
    /// Slots handed out.
    used: usize,
    /// End of the carved part: slots below it were handed out at least once.
    carved: usize,
    /// Whether the chunk is in its class's partial list.
    partial: bool,
}

struct Class {
    size: usize,
    /// Chunks with at least one free (or uncarved) slot.
    partial: Vec<NonNull<ChunkHeader>>,
    chunks: usize,
}

// SAFETY: the raw chunk pointers are only dereferenced under the class's
// mutex; the memory they point to is owned by the arena.
unsafe impl Send for Class {}

/// Size-classed slab allocator for resident objects.
pub struct Arena {
    classes: Mutex<Vec<Class>>,
    /// Bytes obtained from the system (chunks and large objects).
    system: AtomicU64,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("system_bytes", &self.system_bytes())
            .finish()
    }
}

fn chunk_layout() -> Layout {
    Layout::from_size_align(CHUNK, CHUNK).expect("chunk layout")
}

impl Default for Arena {
    fn default() -> Self {
        Arena::new()
    }
}

impl Arena {
    /// An empty arena.
    pub fn new() -> Arena {
        Arena {
            classes: Mutex::new(Vec::new()),
            system: AtomicU64::new(0),
        }
    }

    /// Bytes held from the system allocator.
    pub fn system_bytes(&self) -> u64 {
        self.system.load(Ordering::Relaxed)
    }

    /// Allocates room for an object of `len` bytes (uninitialized,
    /// [`ALIGN`]-aligned). Returns `None` if the system is out of memory.
    pub fn alloc(&self, len: usize) -> Option<NonNull<u8>> {
        let size = class_size(len);
        if size > MAX_SMALL {
            let layout = Layout::from_size_align(size, 4096).ok()?;
            // SAFETY: the layout has a non-zero size.
            let p = NonNull::new(unsafe { alloc(layout) })?;
            self.system.fetch_add(size as u64, Ordering::Relaxed);
            return Some(p);
        }
        let mut classes = self.classes.lock();
        let idx = match classes.iter().position(|c| c.size == size) {
            Some(i) => i,
            None => {
                classes.push(Class {
                    size,
                    partial: Vec::new(),
                    chunks: 0,
                });
                classes.len() - 1
            }
        };
        let class = &mut classes[idx];
        if class.partial.is_empty() {
            let layout = chunk_layout();
            // SAFETY: non-zero size.
            let base = NonNull::new(unsafe { alloc(layout) })?;
            let h = base.cast::<ChunkHeader>();
            // SAFETY: the chunk is fresh, CHUNK-aligned and larger than the
            // header.
            unsafe {
                h.as_ptr().write(ChunkHeader {
                    free: std::ptr::null_mut(),
                    used: 0,
                    carved: HEADER,
                    partial: true,
                })
            };
            class.partial.push(h);
            class.chunks += 1;
            self.system.fetch_add(CHUNK as u64, Ordering::Relaxed);
        }
        let hp = *class.partial.last().expect("a partial chunk");
        // SAFETY: chunk headers in `partial` are live chunks of this class,
        // accessed only under the class lock.
        let h = unsafe { &mut *hp.as_ptr() };
        let base = hp.as_ptr() as *mut u8;
        let slot = if !h.free.is_null() {
            let s = h.free;
            // SAFETY: a free slot's first 8 bytes hold the next free slot.
            h.free = unsafe { (s as *mut *mut u8).read() };
            s
        } else {
            // SAFETY: `carved + size <= CHUNK` holds for a partial chunk
            // without free slots (checked when it was left partial).
            let s = unsafe { base.add(h.carved) };
            h.carved += size;
            s
        };
        h.used += 1;
        if h.free.is_null() && h.carved + size > CHUNK {
            h.partial = false;
            class.partial.pop();
        }
        NonNull::new(slot)
    }

    /// Frees an object allocated with `alloc(len)`.
    ///
    /// # Safety
    /// `p` came from this arena's `alloc` with the same `len` and is not
    /// used afterwards.
    pub unsafe fn free(&self, p: NonNull<u8>, len: usize) {
        let size = class_size(len);
        if size > MAX_SMALL {
            let layout = Layout::from_size_align(size, 4096).expect("large layout");
            // SAFETY: allocated above with this layout (caller's contract).
            unsafe { dealloc(p.as_ptr(), layout) };
            self.system.fetch_sub(size as u64, Ordering::Relaxed);
            return;
        }
        let base = (p.as_ptr() as usize & !(CHUNK - 1)) as *mut ChunkHeader;
        let mut classes = self.classes.lock();
        let Some(class) = classes.iter_mut().find(|c| c.size == size) else {
            debug_assert!(false, "free of an unknown class");
            return;
        };
        // SAFETY: the slot lies in a live chunk of this class (caller's
        // contract), whose header sits at the chunk's aligned base.
        let h = unsafe { &mut *base };
        // SAFETY: the slot is at least 16 bytes and ours again.
        unsafe { (p.as_ptr() as *mut *mut u8).write(h.free) };
        h.free = p.as_ptr();
        h.used -= 1;
        let hp = NonNull::new(base).expect("chunk base");
        if !h.partial {
            h.partial = true;
            class.partial.push(hp);
        }
        if h.used == 0 && class.partial.len() > 1 {
            class.partial.retain(|c| *c != hp);
            class.chunks -= 1;
            // SAFETY: no slot of the chunk is in use and it is unlinked.
            unsafe { dealloc(base as *mut u8, chunk_layout()) };
            self.system.fetch_sub(CHUNK as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Objects still resident at drop were freed by the cache first; only
        // the kept-back empty chunks remain here.
        for c in self.classes.get_mut().drain(..) {
            for h in c.partial {
                // SAFETY: every chunk still listed is owned by the arena and
                // no longer referenced.
                unsafe { dealloc(h.as_ptr() as *mut u8, chunk_layout()) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        for len in 1..200_000usize {
            let c = class_size(len);
            assert!(c >= len && c.is_multiple_of(16), "{len} -> {c}");
            if len > 256 && len <= MAX_SMALL {
                assert!(c - len <= len / 8 + 16, "{len} -> {c}");
            }
        }
    }

    #[test]
    fn slots_are_reused_and_empty_chunks_returned() {
        let a = Arena::new();
        let mut ps = Vec::new();
        for i in 0..10_000usize {
            let p = a.alloc(100).unwrap();
            // SAFETY: 100 fresh bytes.
            unsafe { std::ptr::write_bytes(p.as_ptr(), i as u8, 100) };
            ps.push(p);
        }
        let peak = a.system_bytes();
        assert!(peak >= 10_000 * 112);
        for (i, p) in ps.iter().enumerate() {
            // SAFETY: still allocated; checks no two slots overlap.
            assert_eq!(unsafe { *p.as_ptr().add(99) }, i as u8);
        }
        for p in ps.drain(..) {
            // SAFETY: allocated with len 100 above.
            unsafe { a.free(p, 100) };
        }
        assert_eq!(a.system_bytes(), CHUNK as u64, "one chunk kept back");
        let big = a.alloc(100_000).unwrap();
        assert_eq!(a.system_bytes(), CHUNK as u64 + 102_400);
        // SAFETY: allocated with this len.
        unsafe { a.free(big, 100_000) };
        assert_eq!(a.system_bytes(), CHUNK as u64);
    }
}
