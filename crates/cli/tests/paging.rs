//! The paged far region against a shadow copy, with real servers.

mod common;

use std::sync::Arc;

use common::{Opts, Rng, TestCluster};
use remora_client::Cluster;
use remora_paging::{Budget, PagedRegion, PagerConfig};

const PAGE: usize = 4096;

fn cluster() -> TestCluster {
    TestCluster::start(Opts {
        servers: 2,
        capacity: "64MiB",
        slab: "256KiB",
        ..Opts::default()
    })
}

fn paged(tc: &TestCluster, size: u64, cfg: PagerConfig) -> PagedRegion {
    let c = Cluster::connect(&tc.controller_addr, common::TOKEN).unwrap();
    let r = c.alloc_region(size).unwrap();
    PagedRegion::new(r, cfg).unwrap()
}

/// A shared view of the mapping for threads (the test checks disjoint use).
#[derive(Clone, Copy)]
struct Mem(usize, usize);

impl Mem {
    fn bytes(&self) -> &'static mut [u8] {
        // SAFETY: base/len describe a live mapping for the test's duration;
        // threads use disjoint pages.
        unsafe { std::slice::from_raw_parts_mut(self.0 as *mut u8, self.1) }
    }
}

#[test]
fn single_thread_round_trip_through_eviction() {
    let tc = cluster();
    let pr = paged(
        &tc,
        64 * PAGE as u64,
        PagerConfig {
            budget: Budget::Bytes(8 * PAGE as u64),
            ..PagerConfig::default()
        },
    );
    let mem = Mem(pr.base() as usize, pr.len()).bytes();
    for p in 0..64 {
        mem[p * PAGE] = p as u8 + 1;
        mem[p * PAGE + 100] = 0xAB;
    }
    for p in 0..64 {
        assert_eq!(mem[p * PAGE], p as u8 + 1, "page {p}");
        assert_eq!(mem[p * PAGE + 100], 0xAB, "page {p}");
    }
    let s = pr.stats();
    eprintln!("{s:?}");
    assert!(
        s.evictions > 0 && s.pages_written > 0 && s.pages_fetched > 0,
        "{s:?}"
    );
    assert!(s.resident <= 8, "{s:?}");
}

/// Many threads read and write random words of their own pages (and read
/// everyone's) under a budget of a few pages, checked against shadows.
#[test]
fn many_threads_against_shadows_with_a_tiny_budget() {
    let tc = cluster();
    let threads = 8usize;
    let pages_per = 24usize;
    for (name, cfg) in [
        (
            "clock",
            PagerConfig {
                budget: Budget::Bytes(16 * PAGE as u64),
                writeback_batch: 4,
                ..PagerConfig::default()
            },
        ),
        (
            "fifo, unit 4",
            PagerConfig {
                budget: Budget::Bytes(16 * PAGE as u64),
                writeback_batch: 4,
                inactive_fraction: 0.0,
                fetch_unit: 4,
                ..PagerConfig::default()
            },
        ),
    ] {
        let pr = Arc::new(paged(&tc, (threads * pages_per * PAGE) as u64, cfg));
        let mem = Mem(pr.base() as usize, pr.len());
        let t0 = std::time::Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::spawn(move || {
                    let m = mem.bytes();
                    let words = pages_per * PAGE / 8;
                    let base = t * pages_per * PAGE;
                    let mut shadow = vec![0u64; words];
                    let mut rng = Rng(t as u64 * 7919 + 1);
                    for i in 0..3000u64 {
                        let w = rng.below(words as u64) as usize;
                        let at = base + w * 8;
                        let cell = &mut m[at..at + 8];
                        if rng.below(2) == 0 {
                            let v = (t as u64) << 56 | i << 8 | 1;
                            cell.copy_from_slice(&v.to_ne_bytes());
                            shadow[w] = v;
                        } else {
                            let got = u64::from_ne_bytes(cell.try_into().unwrap());
                            assert_eq!(got, shadow[w], "thread {t} word {w} at step {i}");
                        }
                    }
                    for (w, &v) in shadow.iter().enumerate() {
                        let at = base + w * 8;
                        let got = u64::from_ne_bytes(m[at..at + 8].try_into().unwrap());
                        assert_eq!(got, v, "thread {t} word {w} at the end");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let s = pr.stats();
        eprintln!("{name}: {:?} {s:?}", t0.elapsed());
        assert!(s.evictions > 0 && s.pages_written > 0, "{name}: {s:?}");
        assert!(s.resident <= 16 + 4, "{name}: {s:?}");
        // Everything written is in far memory after a flush.
        pr.flush().unwrap();
        let mut far = vec![0u8; pr.len()];
        pr.region().read(0, &mut far).unwrap();
        assert!(
            far == mem.bytes()[..],
            "{name}: far copy differs after flush"
        );
    }
}

/// The program's own MADV_DONTNEED on a mapped page empties it (reads zeros)
/// rather than confusing the pager.
#[test]
fn a_foreign_madvise_reads_back_as_zeros() {
    let tc = cluster();
    let pr = paged(
        &tc,
        16 * PAGE as u64,
        PagerConfig {
            budget: Budget::Bytes(16 * PAGE as u64),
            ..PagerConfig::default()
        },
    );
    let mem = Mem(pr.base() as usize, pr.len()).bytes();
    mem[3 * PAGE + 5] = 42;
    mem[4 * PAGE] = 7;
    let _ = mem[5 * PAGE]; // clean page
                           // SAFETY: pages of the live mapping; the test reads them only afterwards.
    let r = unsafe {
        libc::madvise(
            pr.base().add(3 * PAGE).cast(),
            3 * PAGE,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(mem[3 * PAGE + 5], 0);
    assert_eq!(mem[4 * PAGE], 0);
    assert_eq!(mem[5 * PAGE], 0);
    mem[3 * PAGE] = 9;
    assert_eq!(mem[3 * PAGE], 9);
}

/// Threads write their own words of the *same* few pages while the evictor
/// deactivates and evicts those pages under a budget of a handful: a write
/// that races the page's write-protection, its copy into a slot or its
/// write-back is never lost.
#[test]
fn writes_racing_eviction_of_their_page_are_never_lost() {
    let tc = cluster();
    let threads = 6usize;
    let pages = 12usize;
    let pr = Arc::new(paged(
        &tc,
        (pages * PAGE) as u64,
        PagerConfig {
            budget: Budget::Bytes(4 * PAGE as u64),
            writeback_batch: 1,
            ..PagerConfig::default()
        },
    ));
    let mem = Mem(pr.base() as usize, pr.len());
    let words = pages * PAGE / 8;
    // Word w belongs to thread w % threads: every page is written by every
    // thread.
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let m = mem.bytes().as_mut_ptr() as *mut u64;
                let mut rng = Rng(t as u64 + 99);
                let mut last = vec![0u64; words];
                for i in 1..=4000u64 {
                    let w = (rng.below((words / threads) as u64) as usize) * threads + t;
                    let v = (t as u64) << 48 | i;
                    // SAFETY: w < words, inside the live mapping; each word
                    // has one writer (this thread). Volatile, so every store
                    // happens as written.
                    unsafe { std::ptr::write_volatile(m.add(w), v) };
                    last[w] = v;
                    if i % 7 == 0 {
                        let r = rng.below((words / threads) as u64) as usize * threads + t;
                        // SAFETY: as above.
                        let got = unsafe { std::ptr::read_volatile(m.add(r)) };
                        assert_eq!(got, last[r], "thread {t} word {r} step {i}");
                    }
                }
                last
            })
        })
        .collect();
    let lasts: Vec<Vec<u64>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let m = mem.bytes();
    for (t, last) in lasts.iter().enumerate() {
        for w in (t..words).step_by(threads) {
            let got = u64::from_ne_bytes(m[w * 8..w * 8 + 8].try_into().unwrap());
            assert_eq!(got, last[w], "thread {t} word {w} at the end");
        }
    }
    let s = pr.stats();
    eprintln!("{s:?}");
    assert!(s.evictions > 0 && s.pages_written > 0, "{s:?}");
    pr.flush().unwrap();
    let mut far = vec![0u8; pr.len()];
    pr.region().read(0, &mut far).unwrap();
    assert!(far == m[..], "far copy differs after flush");
}
