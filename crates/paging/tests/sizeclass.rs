//! The far heap's allocator over plain local memory, against a model:
//! random operation sequences (proptest) and a many-threaded stress test in
//! which blocks are freed and reallocated by other threads than the ones
//! that allocated them.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use remora_paging::sizeclass::{SizeClassHeap, MAX_SMALL, PAGE};

/// A heap over `len` bytes of fresh anonymous memory. Heaps are `'static`
/// (thread caches may point at them), so the heap and its range are leaked.
fn heap(len: usize) -> &'static SizeClassHeap {
    // SAFETY: an anonymous private mapping; the result is checked.
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
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping is ours and never unmapped.
    let h = unsafe { SizeClassHeap::new(p.cast(), len) }.expect("heap");
    Box::leak(Box::new(h))
}

/// A live block: address, requested size, alignment, fill byte.
#[derive(Clone, Copy, Debug)]
struct Block {
    p: usize,
    size: usize,
    align: usize,
    fill: u8,
}

// SAFETY (for the helpers below): every `Block` is a live allocation of at
// least `size` bytes made by the heap under test and owned by the caller.

fn fill(b: &Block) {
    // SAFETY: see above.
    unsafe { std::ptr::write_bytes(b.p as *mut u8, b.fill, b.size) };
}

fn check(b: &Block) {
    // SAFETY: see above.
    let s = unsafe { std::slice::from_raw_parts(b.p as *const u8, b.size) };
    if let Some(i) = s.iter().position(|&x| x != b.fill) {
        panic!("block {b:?} corrupted at byte {i}: {}", s[i]);
    }
}

fn alloc(h: &'static SizeClassHeap, size: usize, align: usize, fill_byte: u8) -> Block {
    let l = Layout::from_size_align(size, align).unwrap();
    let p = h.alloc(l).expect("out of memory").as_ptr() as usize;
    assert_eq!(p % align, 0, "misaligned: {size} bytes, align {align}");
    // SAFETY: p is live.
    let usable = unsafe { h.usable_size(NonNull::new(p as *mut u8).unwrap()) };
    assert!(usable >= size, "usable {usable} < {size}");
    let b = Block {
        p,
        size,
        align,
        fill: fill_byte,
    };
    fill(&b);
    b
}

fn free(h: &'static SizeClassHeap, b: Block) {
    check(&b);
    // SAFETY: b is live and ours.
    unsafe { h.free(NonNull::new(b.p as *mut u8).unwrap()) };
}

/// realloc as the preload library and `FarAlloc` do it: in place, or move.
fn realloc(h: &'static SizeClassHeap, b: Block, new_size: usize, fill_byte: u8) -> Block {
    check(&b);
    let p = NonNull::new(b.p as *mut u8).unwrap();
    // SAFETY: b is live and ours.
    let nb = if let Some(q) = unsafe { h.resize_in_place(p, new_size) } {
        assert_eq!(q, p);
        Block {
            size: new_size,
            ..b
        }
    } else {
        let q = h
            .alloc(Layout::from_size_align(new_size, b.align).unwrap())
            .expect("out of memory");
        // SAFETY: both blocks are live, distinct, and hold min(old, new) bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(p.as_ptr(), q.as_ptr(), b.size.min(new_size));
            h.free(p);
        }
        Block {
            p: q.as_ptr() as usize,
            size: new_size,
            ..b
        }
    };
    assert_eq!(nb.p % nb.align, 0);
    // SAFETY: nb is live.
    assert!(unsafe { h.usable_size(NonNull::new(nb.p as *mut u8).unwrap()) } >= new_size);
    // The kept prefix survived.
    let kept = Block {
        size: b.size.min(new_size),
        ..nb
    };
    check(&kept);
    let nb = Block {
        fill: fill_byte,
        ..nb
    };
    fill(&nb);
    nb
}

/// Live blocks must not overlap.
fn check_disjoint(live: &BTreeMap<usize, Block>) {
    let mut end = 0;
    for b in live.values() {
        assert!(b.p >= end, "blocks overlap at {:#x}", b.p);
        end = b.p + b.size.max(1);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align_log: u32 },
    Free(usize),
    Realloc(usize, usize),
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=256,
        3 => 0usize..=MAX_SMALL,
        1 => MAX_SMALL..=4 * MAX_SMALL,
        1 => 0usize..=(1 << 20),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (size_strategy(), prop_oneof![8 => Just(4u32), 1 => 5u32..=14])
            .prop_map(|(size, align_log)| Op::Alloc { size, align_log }),
        3 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), size_strategy()).prop_map(|(i, s)| Op::Realloc(i, s)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of operations keeps every live block's bytes, its
    /// alignment, and blocks apart, like a map of separate buffers would.
    #[test]
    fn behaves_like_separate_buffers(ops in proptest::collection::vec(op_strategy(), 1..300)) {
        let h = heap(256 << 20);
        let mut live: BTreeMap<usize, Block> = BTreeMap::new();
        let mut n = 0u8;
        for op in ops {
            n = n.wrapping_add(1);
            match op {
                Op::Alloc { size, align_log } => {
                    let b = alloc(h, size, 1 << align_log, n);
                    prop_assert!(live.insert(b.p, b).is_none(), "address handed out twice");
                }
                Op::Free(i) if !live.is_empty() => {
                    let k = *live.keys().nth(i % live.len()).unwrap();
                    free(h, live.remove(&k).unwrap());
                }
                Op::Realloc(i, size) if !live.is_empty() => {
                    let k = *live.keys().nth(i % live.len()).unwrap();
                    let b = realloc(h, live.remove(&k).unwrap(), size, n);
                    prop_assert!(live.insert(b.p, b).is_none(), "address handed out twice");
                }
                _ => {}
            }
            check_disjoint(&live);
        }
        for b in live.values() {
            check(b);
        }
        for (_, b) in live {
            free(h, b);
        }
    }
}

/// Freed memory is reused: allocating and freeing the same sizes over and
/// over does not run a small heap out of memory.
#[test]
fn freed_blocks_are_reused() {
    let h = heap(8 << 20);
    for round in 0..200u32 {
        let blocks: Vec<Block> = (0..200)
            .map(|i| alloc(h, 1 + (i * 37) % 3000, 16, round as u8))
            .collect();
        let big = alloc(h, 1 << 20, PAGE, 7);
        for b in blocks {
            free(h, b);
        }
        free(h, big);
    }
}

/// Growing a block step by step, then shrinking it, keeps its bytes (the
/// path of a `Vec` that is pushed to and then shrunk).
#[test]
fn realloc_growth_and_shrink() {
    let h = heap(64 << 20);
    for align in [16usize, 64, 4096] {
        let mut b = alloc(h, 1, align, 1);
        let mut size = 1;
        while size < 4 << 20 {
            size = size * 3 / 2 + 1;
            b = realloc(h, b, size, (size % 251) as u8);
        }
        while size > 1 {
            size /= 3;
            b = realloc(h, b, size, (size % 251) as u8);
        }
        free(h, b);
    }
}

/// Large blocks grow in place when the memory after them is free.
#[test]
fn large_blocks_grow_in_place() {
    let h = heap(64 << 20);
    let b = alloc(h, 1 << 20, 16, 3);
    let p = NonNull::new(b.p as *mut u8).unwrap();
    // SAFETY: b is live.
    let q = unsafe { h.resize_in_place(p, 2 << 20) };
    assert_eq!(q, Some(p));
    // SAFETY: b is live, now 2 MiB.
    assert_eq!(unsafe { h.usable_size(p) }, 2 << 20);
    free(h, Block { size: 1 << 20, ..b });
}

/// Many threads allocate, fill, hand blocks to each other, reallocate and
/// free them; threads come and go (their caches are given back). Every
/// block's bytes are checked before it is freed, so two blocks sharing
/// memory would be caught.
#[test]
fn many_threads_share_blocks() {
    let h = heap(1 << 30);
    let exchange: Arc<Mutex<Vec<Block>>> = Arc::default();
    for generation in 0..3u64 {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let exchange = exchange.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(generation * 100 + t);
                    let mut mine: Vec<Block> = Vec::new();
                    for i in 0..20_000u32 {
                        let fill_byte = (t as u8).wrapping_mul(31).wrapping_add(i as u8);
                        match rng.gen_range(0..10) {
                            0..=3 => {
                                let size = match rng.gen_range(0..20) {
                                    0 => rng.gen_range(MAX_SMALL..4 * MAX_SMALL),
                                    1..=5 => rng.gen_range(0..=MAX_SMALL),
                                    _ => rng.gen_range(0..=128),
                                };
                                let align = if rng.gen_range(0..8) == 0 {
                                    1 << rng.gen_range(5..=12)
                                } else {
                                    16
                                };
                                mine.push(alloc(h, size, align, fill_byte));
                            }
                            4..=5 if !mine.is_empty() => {
                                let k = rng.gen_range(0..mine.len());
                                free(h, mine.swap_remove(k));
                            }
                            6 if !mine.is_empty() => {
                                let k = rng.gen_range(0..mine.len());
                                let size = rng.gen_range(0..3 * MAX_SMALL / 2);
                                mine[k] = realloc(h, mine[k], size, fill_byte);
                            }
                            7 if !mine.is_empty() => {
                                let k = rng.gen_range(0..mine.len());
                                exchange.lock().unwrap().push(mine.swap_remove(k));
                            }
                            _ => {
                                let got = exchange.lock().unwrap().pop();
                                if let Some(b) = got {
                                    // Someone else's block: realloc or free it here.
                                    if rng.gen_bool(0.5) {
                                        mine.push(realloc(h, b, b.size / 2 + 1, fill_byte));
                                    } else {
                                        free(h, b);
                                    }
                                }
                            }
                        }
                    }
                    // Leave some blocks for the next generation of threads.
                    let keep = mine.len() / 2;
                    exchange.lock().unwrap().extend(mine.drain(keep..));
                    for b in mine {
                        free(h, b);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    for b in exchange.lock().unwrap().drain(..) {
        free(h, b);
    }
}

/// A thread's cache goes back to the heap when the thread ends: 200
/// short-lived threads, each of which would leave up to 128 KiB cached, fit
/// in a 4 MiB heap.
#[test]
fn ending_threads_give_their_caches_back() {
    let h = heap(4 << 20);
    for t in 0..200u32 {
        std::thread::spawn(move || {
            let blocks: Vec<Block> = (0..1000)
                .map(|i| alloc(h, 1000, 16, (t + i) as u8))
                .collect();
            for b in blocks {
                free(h, b);
            }
        })
        .join()
        .unwrap();
    }
}
