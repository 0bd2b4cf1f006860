//! The far heap's allocator without the pager: glibc's `malloc`, `talc`
//! under one yielding spin lock (the far heap's allocator until the size
//! classes), and `SizeClassHeap`, each over plain local memory, on the
//! allocation patterns of the programs `remora run` is measured with.
//! Prints ns per operation and the ratio to glibc, measured in this run.
//!
//! ```sh
//! cargo run --release -p remora-paging --example heap_bench
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::time::Instant;

use remora_paging::sizeclass::SizeClassHeap;
use talc::{ErrOnOom, Span, Talc};

trait Heap: Sync {
    fn alloc(&'static self, size: usize) -> *mut u8;
    /// # Safety
    /// `p` came from `alloc(size)` on this heap.
    unsafe fn free(&'static self, p: *mut u8, size: usize);
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size.max(1), 16).unwrap()
}

struct Glibc;
impl Heap for Glibc {
    fn alloc(&'static self, size: usize) -> *mut u8 {
        // SAFETY: a valid nonzero layout.
        unsafe { System.alloc(layout(size)) }
    }
    unsafe fn free(&'static self, p: *mut u8, size: usize) {
        // SAFETY: by the contract.
        unsafe { System.dealloc(p, layout(size)) }
    }
}

struct Locked(spin::mutex::SpinMutex<Talc<ErrOnOom>, spin::relax::Yield>);
impl Heap for Locked {
    fn alloc(&'static self, size: usize) -> *mut u8 {
        // SAFETY: a valid nonzero layout.
        unsafe { self.0.lock().malloc(layout(size)) }
            .unwrap()
            .as_ptr()
    }
    unsafe fn free(&'static self, p: *mut u8, size: usize) {
        // SAFETY: by the contract.
        unsafe { self.0.lock().free(NonNull::new_unchecked(p), layout(size)) }
    }
}

struct Classes(SizeClassHeap);
impl Heap for Classes {
    fn alloc(&'static self, size: usize) -> *mut u8 {
        self.0.alloc(layout(size)).unwrap().as_ptr()
    }
    unsafe fn free(&'static self, p: *mut u8, _size: usize) {
        // SAFETY: by the contract.
        unsafe { self.0.free(NonNull::new_unchecked(p)) }
    }
}

const RANGE: usize = 4 << 30;

fn range() -> *mut u8 {
    // SAFETY: an anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RANGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

/// A cheap deterministic generator.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// A hash of 1.5M small entries built, then torn down (perl's and python's
/// pattern): returns ns per malloc+free pair.
fn build_hash(h: &'static dyn Heap) -> f64 {
    const N: usize = 1_500_000;
    let sizes = [24usize, 32, 48, 56, 64, 100];
    let mut v: Vec<(*mut u8, usize)> = Vec::with_capacity(N);
    let mut s = 1u64;
    let t = Instant::now();
    for _ in 0..N {
        let size = sizes[next(&mut s) as usize % sizes.len()];
        let p = h.alloc(size);
        // SAFETY: p has size bytes.
        unsafe { p.write(1) };
        v.push((p, size));
    }
    for (p, size) in v {
        // SAFETY: p came from alloc(size).
        unsafe { h.free(p, size) };
    }
    t.elapsed().as_nanos() as f64 / N as f64
}

/// Two threads, each keeping a window of 2000 live blocks of 16..1024
/// bytes, one in eight handed to the other thread to free (a server's
/// pattern): returns ns per malloc+free pair.
fn churn(h: &'static dyn Heap) -> f64 {
    const OPS: usize = 2_000_000;
    let (tx0, rx0) = std::sync::mpsc::sync_channel::<Vec<(usize, usize)>>(64);
    let (tx1, rx1) = std::sync::mpsc::sync_channel::<Vec<(usize, usize)>>(64);
    let t = Instant::now();
    let run = move |seed: u64,
                    tx: std::sync::mpsc::SyncSender<Vec<(usize, usize)>>,
                    rx: std::sync::mpsc::Receiver<Vec<(usize, usize)>>| {
        let mut s = seed;
        let mut window = std::collections::VecDeque::new();
        let mut out = Vec::new();
        for i in 0..OPS {
            let size = 16 + next(&mut s) as usize % 1008;
            let p = h.alloc(size);
            // SAFETY: p has size bytes.
            unsafe { p.write(1) };
            window.push_back((p as usize, size));
            if window.len() > 2000 {
                let (p, size) = window.pop_front().unwrap();
                if i % 8 == 0 {
                    out.push((p, size));
                    if out.len() == 256 {
                        if let Err(
                            std::sync::mpsc::TrySendError::Full(batch)
                            | std::sync::mpsc::TrySendError::Disconnected(batch),
                        ) = tx.try_send(std::mem::take(&mut out))
                        {
                            for (p, size) in batch {
                                // SAFETY: p came from alloc(size).
                                unsafe { h.free(p as *mut u8, size) };
                            }
                        }
                    }
                } else {
                    // SAFETY: p came from alloc(size).
                    unsafe { h.free(p as *mut u8, size) };
                }
            }
            while let Ok(batch) = rx.try_recv() {
                for (p, size) in batch {
                    // SAFETY: p came from alloc(size) in the other thread.
                    unsafe { h.free(p as *mut u8, size) };
                }
            }
        }
        for (p, size) in window.into_iter().chain(out) {
            // SAFETY: p came from alloc(size).
            unsafe { h.free(p as *mut u8, size) };
        }
        drop(tx);
        for batch in rx {
            for (p, size) in batch {
                // SAFETY: p came from alloc(size) in the other thread.
                unsafe { h.free(p as *mut u8, size) };
            }
        }
    };
    let a = std::thread::spawn(move || run(1, tx0, rx1));
    let b = std::thread::spawn(move || run(2, tx1, rx0));
    a.join().unwrap();
    b.join().unwrap();
    t.elapsed().as_nanos() as f64 / (2 * OPS) as f64
}

fn main() {
    let talc: &'static Locked = Box::leak(Box::new({
        let mut t = Talc::new(ErrOnOom);
        let p = range();
        // SAFETY: the mapping is ours and never unmapped.
        unsafe { t.claim(Span::new(p, p.add(RANGE))) }.unwrap();
        Locked(spin::mutex::SpinMutex::new(t))
    }));
    // SAFETY: the mapping is ours and never unmapped.
    let classes: &'static Classes = Box::leak(Box::new(Classes(
        unsafe { SizeClassHeap::new(range(), RANGE) }.unwrap(),
    )));
    let heaps: [(&str, &'static dyn Heap); 3] = [
        ("glibc malloc", &Glibc),
        ("talc + spin lock", talc),
        ("size classes", classes),
    ];
    println!(
        "{:<18} {:>22} {:>22}",
        "allocator", "hash 1.5M (ns/pair)", "2-thread churn"
    );
    let (mut g0, mut g1) = (0.0, 0.0);
    for (name, h) in heaps {
        // Best of 3 (the first run also touches the memory).
        let a = (0..3).map(|_| build_hash(h)).fold(f64::MAX, f64::min);
        let b = (0..3).map(|_| churn(h)).fold(f64::MAX, f64::min);
        if g0 == 0.0 {
            (g0, g1) = (a, b);
        }
        println!(
            "{name:<18} {a:>12.1} ({:>5.2}x) {b:>12.1} ({:>5.2}x)",
            a / g0,
            b / g1
        );
    }
}
