//! `FarAlloc` as this test binary's global allocator: a Rust program's heap
//! in far memory, with a budget of a quarter of what it touches.
//!
//! A plain `main` (no test harness): the process's heap lives in the
//! cluster, so the cluster must outlive every allocation, and the process
//! ends with `_exit` right after the cluster is stopped.

mod common;

use common::{Opts, TestCluster};
use remora_paging::{Budget, FarAlloc, HeapOptions, PagerConfig};

#[global_allocator]
static HEAP: FarAlloc = FarAlloc;

fn main() {
    let tc = TestCluster::start(Opts {
        servers: 2,
        capacity: "512MiB",
        ..Opts::default()
    });
    let heap = FarAlloc::start(&HeapOptions {
        controller: tc.controller_addr.clone(),
        token: common::TOKEN.into(),
        size: 256 << 20,
        region_name: None,
        pager: PagerConfig {
            budget: Budget::Fraction(0.25),
            min_pages: 64,
            ..PagerConfig::default()
        },
    })
    .expect("far heap");
    // A second start is refused.
    assert!(FarAlloc::start_from_env()
        .map(|h| h.is_none())
        .unwrap_or(true));

    // Several threads build and check their own data structures.
    let hs: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let v: Vec<u64> = (0..1_000_000).map(|i| i * 3 + t).collect();
                let strings: Vec<String> = (0..20_000).map(|i| format!("{t}-{i}")).collect();
                let mut map = std::collections::HashMap::new();
                for (i, s) in strings.iter().enumerate() {
                    map.insert(s.clone(), i);
                }
                let sum: u64 = v.iter().sum();
                assert_eq!(sum, (0..1_000_000u64).map(|i| i * 3 + t).sum::<u64>());
                for (i, s) in strings.iter().enumerate() {
                    assert_eq!(map[s], i);
                }
                // Grow and shrink through realloc.
                let mut w = vec![t; 10];
                for k in 0..200_000u64 {
                    w.push(k);
                }
                w.truncate(5);
                w.shrink_to_fit();
                assert_eq!(w, vec![t; 5]);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let s = heap.stats();
    eprintln!("{s:?}");
    assert!(s.faults > 1000, "the heap was not far: {s:?}");
    assert!(
        s.evictions > 100 && s.pages_written > 100,
        "nothing was evicted: {s:?}"
    );
    assert!(s.resident <= s.budget_pages + 64, "over budget: {s:?}");
    use std::io::Write;
    println!("FarAlloc heap: ok");
    let _ = std::io::stdout().flush();
    drop(tc);
    // SAFETY: ends the process without running destructors or flushing
    // buffers that live in the (now stopped) far heap.
    unsafe { libc::_exit(0) };
}
