//! Far objects against their std counterparts, with real servers, a cache
//! budget of a few objects (nearly every access misses) and explicit
//! evictions in the operation sequences; threads sharing structures while
//! the evictor runs; offloaded operations against local computation.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use common::{Opts, TestCluster};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use remora_client::Cluster;
use remora_objects::{
    CacheConfig, Cmp, FarBox, FarHashMap, FarList, FarQueue, FarVec, ObjError, ObjectCache, Scope,
};

fn cluster() -> TestCluster {
    TestCluster::start(Opts {
        servers: 2,
        capacity: "64MiB",
        slab: "64KiB",
        ..Opts::default()
    })
}

fn cache(tc: &TestCluster, budget: u64) -> ObjectCache {
    let c = Cluster::connect(&tc.controller_addr, common::TOKEN).unwrap();
    ObjectCache::new(
        c,
        CacheConfig {
            budget,
            region_size: 1 << 20,
            ..CacheConfig::default()
        },
    )
    .unwrap()
}

/// Runs a property on one cluster started for the whole test.
fn check<S: Strategy>(
    strategy: S,
    test: impl Fn(&TestCluster, S::Value) -> Result<(), TestCaseError>,
) {
    let tc = cluster();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    if let Err(e) = runner.run(&strategy, |v| test(&tc, v)) {
        panic!("{e}");
    }
}

#[derive(Debug, Clone)]
enum VecOp {
    Push(u64),
    Extend(Vec<u64>),
    Pop,
    Set(usize, u64),
    Get(usize),
    Truncate(usize),
    Iter,
    IterUncached,
    Gather(Vec<usize>),
    Aggregate(usize, usize),
    Filter(usize, u64),
    CopyWithin(usize, usize, usize),
    Evict,
}

fn vec_op() -> impl Strategy<Value = VecOp> {
    prop_oneof![
        4 => any::<u64>().prop_map(VecOp::Push),
        1 => prop::collection::vec(0..1000u64, 0..40).prop_map(VecOp::Extend),
        1 => Just(VecOp::Pop),
        3 => (any::<usize>(), any::<u64>()).prop_map(|(i, v)| VecOp::Set(i, v)),
        3 => any::<usize>().prop_map(VecOp::Get),
        1 => any::<usize>().prop_map(VecOp::Truncate),
        1 => Just(VecOp::Iter),
        1 => Just(VecOp::IterUncached),
        1 => prop::collection::vec(any::<usize>(), 0..20).prop_map(VecOp::Gather),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| VecOp::Aggregate(a, b)),
        1 => (any::<usize>(), 0..1000u64).prop_map(|(a, v)| VecOp::Filter(a, v)),
        1 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(a, b, c)| VecOp::CopyWithin(a, b, c)),
        1 => Just(VecOp::Evict),
    ]
}

#[test]
fn far_vec_matches_vec() {
    check(prop::collection::vec(vec_op(), 1..80), |tc, ops| {
        // Chunks of 4 u64 (32 bytes); the budget holds about 4 of them.
        let c = cache(tc, 128);
        let mut far = FarVec::<u64>::with_chunk(&c, 4).unwrap();
        let mut std: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                VecOp::Push(v) => {
                    far.push(v).unwrap();
                    std.push(v);
                }
                VecOp::Extend(vs) => {
                    far.extend_from_slice(&vs).unwrap();
                    std.extend_from_slice(&vs);
                }
                VecOp::Pop => prop_assert_eq!(far.pop().unwrap(), std.pop()),
                VecOp::Set(i, v) => {
                    if std.is_empty() {
                        let bad = matches!(far.set(i, v), Err(ObjError::OutOfBounds { .. }));
                        prop_assert!(bad, "set on an empty vector");
                    } else {
                        let i = i % std.len();
                        far.set(i, v).unwrap();
                        std[i] = v;
                    }
                }
                VecOp::Get(i) => {
                    let s = Scope::new();
                    match std.get(i % (std.len() + 1)) {
                        Some(v) => prop_assert_eq!(*far.get(i % (std.len() + 1), &s).unwrap(), *v),
                        None => prop_assert!(far.get(std.len(), &s).is_err()),
                    }
                }
                VecOp::Truncate(n) => {
                    let n = n % (std.len() + 2);
                    far.truncate(n);
                    std.truncate(n);
                }
                VecOp::Iter => {
                    let got: Vec<u64> = far.iter().collect::<Result<_, _>>().unwrap();
                    prop_assert_eq!(&got, &std);
                }
                VecOp::IterUncached => {
                    far.set_nocache(true);
                    let got: Vec<u64> = far.iter().collect::<Result<_, _>>().unwrap();
                    far.set_nocache(false);
                    prop_assert_eq!(&got, &std);
                }
                VecOp::Gather(idx) => {
                    if !std.is_empty() {
                        let idx: Vec<usize> = idx.iter().map(|i| i % std.len()).collect();
                        let want: Vec<u64> = idx.iter().map(|&i| std[i]).collect();
                        prop_assert_eq!(far.gather(&idx).unwrap(), want);
                    }
                }
                VecOp::Aggregate(a, b) => {
                    let (a, b) = (a % (std.len() + 1), b % (std.len() + 1));
                    let r = a.min(b)..a.max(b);
                    let local = far.aggregate_local(r.clone()).unwrap();
                    let off = far.aggregate_offloaded(r.clone()).unwrap();
                    prop_assert_eq!(local, off);
                    let s = &std[r];
                    prop_assert_eq!(off.sum_bits, s.iter().fold(0u64, |x, v| x.wrapping_add(*v)));
                    prop_assert_eq!(off.min, s.iter().min().copied());
                    prop_assert_eq!(off.max, s.iter().max().copied());
                    prop_assert_eq!(off.count, s.len() as u64);
                }
                VecOp::Filter(a, v) => {
                    let a = a % (std.len() + 1);
                    let want: Vec<usize> = (a..std.len()).filter(|&i| std[i] < v).collect();
                    prop_assert_eq!(
                        &far.filter_offloaded(a..std.len(), Cmp::Lt, v).unwrap(),
                        &want
                    );
                    prop_assert_eq!(&far.filter_local(a..std.len(), Cmp::Lt, v).unwrap(), &want);
                }
                VecOp::CopyWithin(a, b, d) => {
                    if !std.is_empty() {
                        let (a, b) = (a % std.len(), b % std.len());
                        let r = a.min(b)..a.max(b);
                        let d = d % (std.len() - r.len() + 1);
                        far.copy_within(r.clone(), d).unwrap();
                        std.copy_within(r, d);
                    }
                }
                VecOp::Evict => c.evict_to(0).unwrap(),
            }
            prop_assert_eq!(far.len(), std.len());
        }
        let got: Vec<u64> = far.iter().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(got, std);
        Ok(())
    });
}

#[derive(Debug, Clone)]
enum MapOp {
    Insert(u64, u64),
    Remove(u64),
    Get(u64),
    GetOffloaded(u64),
    Flush,
    Evict,
    Entries,
}

fn map_op() -> impl Strategy<Value = MapOp> {
    let k = 0..200u64;
    prop_oneof![
        5 => (k.clone(), any::<u64>()).prop_map(|(k, v)| MapOp::Insert(k, v)),
        2 => k.clone().prop_map(MapOp::Remove),
        3 => k.clone().prop_map(MapOp::Get),
        3 => k.prop_map(MapOp::GetOffloaded),
        1 => Just(MapOp::Flush),
        1 => Just(MapOp::Evict),
        1 => Just(MapOp::Entries),
    ]
}

#[test]
fn far_hash_map_matches_hash_map() {
    check(prop::collection::vec(map_op(), 1..150), |tc, ops| {
        // A bucket is 136 bytes (144 in its size class); the budget holds 4.
        let c = cache(tc, 4 * 144);
        let mut far = FarHashMap::<u64, u64>::with_capacity(&c, 8).unwrap();
        let mut std: HashMap<u64, u64> = HashMap::new();
        for op in ops {
            match op {
                MapOp::Insert(k, v) => prop_assert_eq!(far.insert(k, v).unwrap(), std.insert(k, v)),
                MapOp::Remove(k) => prop_assert_eq!(far.remove(&k).unwrap(), std.remove(&k)),
                MapOp::Get(k) => prop_assert_eq!(far.get(&k).unwrap(), std.get(&k).copied()),
                MapOp::GetOffloaded(k) => {
                    prop_assert_eq!(far.get_offloaded(&k).unwrap(), std.get(&k).copied())
                }
                MapOp::Flush => far.flush().unwrap(),
                MapOp::Evict => c.evict_to(0).unwrap(),
                MapOp::Entries => {
                    let mut got = far.entries().unwrap();
                    got.sort_unstable();
                    let mut want: Vec<(u64, u64)> = std.iter().map(|(k, v)| (*k, *v)).collect();
                    want.sort_unstable();
                    prop_assert_eq!(got, want);
                }
            }
            prop_assert_eq!(far.len(), std.len());
        }
        // Everything far, then every key through the server.
        c.evict_to(0).unwrap();
        for k in 0..200u64 {
            prop_assert_eq!(far.get_offloaded(&k).unwrap(), std.get(&k).copied());
        }
        Ok(())
    });
}

#[derive(Debug, Clone)]
enum ListOp {
    PushFront(u64),
    PushBack(u64),
    PopFront,
    Front,
    SetFront(u64),
    Iter,
    Offloaded,
    Evict,
}

fn list_op() -> impl Strategy<Value = ListOp> {
    prop_oneof![
        3 => any::<u64>().prop_map(ListOp::PushFront),
        3 => any::<u64>().prop_map(ListOp::PushBack),
        2 => Just(ListOp::PopFront),
        1 => Just(ListOp::Front),
        1 => any::<u64>().prop_map(ListOp::SetFront),
        1 => Just(ListOp::Iter),
        1 => Just(ListOp::Offloaded),
        1 => Just(ListOp::Evict),
    ]
}

#[test]
fn far_list_matches_deque() {
    check(prop::collection::vec(list_op(), 1..100), |tc, ops| {
        // A node is 24 bytes (32 in its size class); the budget holds 4.
        let c = cache(tc, 128);
        let mut far = FarList::<u64>::new(&c).unwrap();
        let mut std: VecDeque<u64> = VecDeque::new();
        for op in ops {
            match op {
                ListOp::PushFront(v) => {
                    far.push_front(v).unwrap();
                    std.push_front(v);
                }
                ListOp::PushBack(v) => {
                    far.push_back(v).unwrap();
                    std.push_back(v);
                }
                ListOp::PopFront => prop_assert_eq!(far.pop_front().unwrap(), std.pop_front()),
                ListOp::Front => {
                    let s = Scope::new();
                    prop_assert_eq!(far.front(&s).unwrap().map(|r| *r), std.front().copied());
                }
                ListOp::SetFront(v) => {
                    let mut s = Scope::new();
                    if let Some(mut r) = far.front_mut(&mut s).unwrap() {
                        *r = v;
                        std[0] = v;
                    }
                }
                ListOp::Iter => prop_assert_eq!(far.to_vec().unwrap(), Vec::from(std.clone())),
                ListOp::Offloaded => {
                    prop_assert_eq!(far.to_vec_offloaded().unwrap(), Vec::from(std.clone()))
                }
                ListOp::Evict => c.evict_to(0).unwrap(),
            }
            prop_assert_eq!(far.len(), std.len());
        }
        c.evict_to(0).unwrap();
        prop_assert_eq!(far.to_vec().unwrap(), Vec::from(std.clone()));
        prop_assert_eq!(far.to_vec_offloaded().unwrap(), Vec::from(std));
        Ok(())
    });
}

/// A far box and the std box it must match.
type BoxPair = (FarBox<[u64; 3]>, Box<[u64; 3]>);

#[derive(Debug, Clone)]
enum QueueOp {
    Push(u32),
    Pop,
    Front,
    Iter,
    Evict,
}

fn queue_op() -> impl Strategy<Value = QueueOp> {
    prop_oneof![
        4 => any::<u32>().prop_map(QueueOp::Push),
        3 => Just(QueueOp::Pop),
        1 => Just(QueueOp::Front),
        1 => Just(QueueOp::Iter),
        1 => Just(QueueOp::Evict),
    ]
}

#[test]
fn far_queue_matches_deque() {
    check(prop::collection::vec(queue_op(), 1..150), |tc, ops| {
        // Chunks of 3 u32 (16 bytes in their size class); the budget holds 4.
        let c = cache(tc, 64);
        let mut far = FarQueue::<u32>::with_chunk(&c, 3).unwrap();
        let mut std: VecDeque<u32> = VecDeque::new();
        for op in ops {
            match op {
                QueueOp::Push(v) => {
                    far.push_back(v).unwrap();
                    std.push_back(v);
                }
                QueueOp::Pop => prop_assert_eq!(far.pop_front().unwrap(), std.pop_front()),
                QueueOp::Front => {
                    let s = Scope::new();
                    prop_assert_eq!(far.front(&s).unwrap().map(|r| *r), std.front().copied());
                }
                QueueOp::Iter => {
                    let got: Vec<u32> = far.iter().collect::<Result<_, _>>().unwrap();
                    prop_assert_eq!(got, Vec::from(std.clone()));
                }
                QueueOp::Evict => c.evict_to(0).unwrap(),
            }
            prop_assert_eq!(far.len(), std.len());
        }
        Ok(())
    });
}

#[test]
fn far_box_matches_box() {
    check(
        prop::collection::vec((any::<[u64; 3]>(), any::<bool>()), 1..40),
        |tc, vals| {
            let c = cache(tc, 64);
            let mut boxes: Vec<BoxPair> = Vec::new();
            for (v, evict) in vals {
                boxes.push((FarBox::new(&c, v).unwrap(), Box::new(v)));
                let n = boxes.len();
                let (f, b) = &mut boxes[v[0] as usize % n];
                prop_assert_eq!(f.read().unwrap(), **b);
                {
                    let mut s = Scope::new();
                    f.get_mut(&mut s).unwrap()[1] = v[2];
                }
                b[1] = v[2];
                if evict {
                    c.evict_to(0).unwrap();
                    prop_assert!(!boxes[0].0.is_local());
                }
            }
            for (f, b) in &boxes {
                prop_assert_eq!(f.read().unwrap(), **b);
            }
            Ok(())
        },
    );
}

#[test]
fn evictions_write_back_and_stay_near_the_budget() {
    let tc = &cluster();
    let c = cache(tc, 64 << 10);
    let mut v = FarVec::<u64>::new(&c).unwrap();
    let n = 200_000usize; // 1.6 MB: 25x the budget
    for i in 0..n {
        v.push(i as u64 * 3).unwrap();
    }
    let st = c.stats();
    assert!(st.evictions > 0 && st.written_bytes > 0, "{st:?}");
    // Bulk loading is throttled: within 1/8 of the budget plus one chunk.
    assert!(st.resident_bytes <= (64 << 10) + (8 << 10) + 4096, "{st:?}");
    for (i, x) in v.iter().enumerate() {
        assert_eq!(x.unwrap(), i as u64 * 3);
    }
    let st = c.stats();
    assert!(st.prefetches > 0, "iteration fetched ahead: {st:?}");
    assert_eq!(st.far_bytes, (n as u64 * 8).next_multiple_of(4096));
    drop(v);
    assert_eq!(c.stats().far_bytes, 0);
    assert_eq!(c.stats().resident_bytes, 0);
}

#[test]
fn uncached_scans_leave_the_cache_alone() {
    let tc = &cluster();
    let c = cache(tc, 32 << 10);
    let mut v = FarVec::<u32>::new(&c).unwrap();
    v.extend_from_slice(&(0..100_000u32).collect::<Vec<_>>())
        .unwrap();
    c.evict_to(0).unwrap();
    v.set_nocache(true);
    let before = c.stats();
    let sum: u64 = v.iter().map(|x| x.unwrap() as u64).sum();
    assert_eq!(sum, (0..100_000u64).sum::<u64>());
    let after = c.stats();
    assert_eq!(after.misses, before.misses, "no chunk entered the cache");
    assert!(after.uncached_bytes - before.uncached_bytes >= 400_000);
}

#[test]
fn bad_arguments_are_errors() {
    let tc = &cluster();
    let c = cache(tc, 1 << 20);
    assert!(matches!(
        FarVec::<u64>::with_chunk(&c, 3),
        Err(ObjError::InvalidArgument(_))
    ));
    assert!(FarQueue::<u64>::with_chunk(&c, 0).is_err());
    let v = FarVec::<u64>::new(&c).unwrap();
    assert!(matches!(
        v.read(0),
        Err(ObjError::OutOfBounds { index: 0, len: 0 })
    ));
    assert!(v.gather(&[1]).is_err());
    assert!(v.aggregate_offloaded(0..1).is_err());
    let s = Scope::new();
    assert!(matches!(c.evict_to(0), Err(ObjError::ScopeOpen)));
    drop(s);
    assert!(ObjectCache::new(
        Cluster::connect(&tc.controller_addr, common::TOKEN).unwrap(),
        CacheConfig {
            budget: 0,
            ..CacheConfig::default()
        }
    )
    .is_err());
}

#[test]
fn threads_share_structures_while_the_evictor_runs() {
    let tc = &cluster();
    // 16 KiB of cache for a 64K-key map and a 64K-element vector.
    let c = cache(tc, 16 << 10);
    const KEYS: u64 = 20_000;
    let map = Arc::new(RwLock::new(
        FarHashMap::<u64, u64>::with_capacity(&c, KEYS as usize).unwrap(),
    ));
    let vec = Arc::new(RwLock::new(FarVec::<u64>::with_chunk(&c, 16).unwrap()));
    {
        let mut m = map.write().unwrap();
        let mut v = vec.write().unwrap();
        for k in 0..KEYS {
            m.insert(k, k << 32).unwrap();
            v.push(k).unwrap();
        }
    }
    let mut threads = Vec::new();
    // A writer bumps versions in both structures.
    {
        let (map, vec) = (map.clone(), vec.clone());
        threads.push(std::thread::spawn(move || {
            for round in 1..=3u64 {
                for k in (0..KEYS).step_by(7) {
                    map.write().unwrap().insert(k, (k << 32) | round).unwrap();
                    vec.write()
                        .unwrap()
                        .set(k as usize, k + round * KEYS)
                        .unwrap();
                }
            }
        }));
    }
    // Readers check that every value belongs to its key.
    for t in 0..3u64 {
        let (map, vec) = (map.clone(), vec.clone());
        threads.push(std::thread::spawn(move || {
            let mut x = t + 1;
            for i in 0..6000u64 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = (x >> 33) % KEYS;
                let m = map.read().unwrap();
                let got = if i % 2 == 0 {
                    m.get(&k).unwrap()
                } else {
                    m.get_offloaded(&k).unwrap()
                };
                assert_eq!(got.map(|v| v >> 32), Some(k), "key {k}");
                drop(m);
                let v = vec.read().unwrap();
                let s = Scope::new();
                assert_eq!(*v.get(k as usize, &s).unwrap() % KEYS, k);
            }
        }));
    }
    // Threads with their own vectors in the same cache.
    for t in 0..2u64 {
        let c = c.clone();
        threads.push(std::thread::spawn(move || {
            let mut v = FarVec::<u64>::with_chunk(&c, 8).unwrap();
            for i in 0..20_000 {
                v.push(i * t).unwrap();
            }
            for (i, x) in v.iter().enumerate() {
                assert_eq!(x.unwrap(), i as u64 * t);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let m = map.read().unwrap();
    for k in 0..KEYS {
        let want = if k % 7 == 0 { (k << 32) | 3 } else { k << 32 };
        assert_eq!(m.get(&k).unwrap(), Some(want));
        let v = vec.read().unwrap();
        let want = if k % 7 == 0 { k + 3 * KEYS } else { k };
        assert_eq!(v.read(k as usize).unwrap(), want);
    }
    let st = c.stats();
    assert!(st.evictions > 1000 && st.misses > 1000, "{st:?}");
}

#[test]
fn shared_readers_miss_on_the_same_chunks() {
    let tc = &cluster();
    // Many threads read one vector through `&`: concurrent misses on one
    // chunk wait for a single fetch; victims are taken back while scopes
    // are open elsewhere.
    let c = cache(tc, 8 << 10);
    let mut v = FarVec::<u64>::with_chunk(&c, 32).unwrap();
    v.extend_from_slice(&(0..50_000u64).map(|i| i * i).collect::<Vec<_>>())
        .unwrap();
    let v = Arc::new(v);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                let mut x = t;
                for _ in 0..20_000 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let i = ((x >> 33) % 50_000) as usize;
                    let s = Scope::new();
                    let a = *v.get(i, &s).unwrap();
                    let b = *v.get((i + 1) % 50_000, &s).unwrap();
                    assert_eq!(a, (i * i) as u64);
                    assert_eq!(b, (((i + 1) % 50_000) * ((i + 1) % 50_000)) as u64);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(c.stats().evictions > 1000);
}

#[test]
fn the_worked_example_runs() {
    // Built by `cargo test --workspace` (examples of the `remora` crate).
    let exe = std::env::current_exe().unwrap();
    let ex = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("examples").join("far_kv"))
        .unwrap();
    if !ex.exists() {
        panic!(
            "{} is missing: run the tests with `cargo test --workspace`, which builds the examples",
            ex.display()
        );
    }
    let tc = cluster();
    let out = std::process::Command::new(&ex)
        .args([
            "--accounts",
            "3000",
            "--transfers",
            "3000",
            "--local-mem",
            "64KiB",
        ])
        .env("REMORA_CONTROLLER", &tc.controller_addr)
        .env("REMORA_TOKEN", common::TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("(same results)"), "{stdout}");
    assert!(stdout.contains("evictions"), "{stdout}");
    // Without a cluster it says what to set.
    let out = std::process::Command::new(&ex)
        .env_remove("REMORA_CONTROLLER")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("REMORA_CONTROLLER"));
}

/// Runs `f` on its own thread; fails if it does not finish in `secs`.
fn within<F: FnOnce() + Send + 'static>(secs: u64, what: &str, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(()) => t.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // Panicked: report its message.
            t.join().unwrap();
        }
        Err(_) => panic!("{what}: still running after {secs} s (deadlock)"),
    }
}

#[test]
fn offloaded_operations_inside_a_scope_do_not_wait_for_the_evictor() {
    let tc = cluster();
    let c = cache(&tc, 16 << 10);
    let mut v = FarVec::<u64>::new(&c).unwrap();
    v.extend_from_slice(&(0..4096u64).collect::<Vec<_>>())
        .unwrap();
    let v = Arc::new(v);
    // Another thread keeps the evictor busy.
    let c2 = c.clone();
    let loader = std::thread::spawn(move || {
        let mut w = FarVec::<u64>::new(&c2).unwrap();
        for i in 0..60_000u64 {
            w.push(i).unwrap();
        }
    });
    within(60, "offloaded aggregates inside a scope", move || {
        let s = Scope::new();
        for _ in 0..200 {
            let a = v.aggregate_offloaded(0..4096).unwrap();
            assert_eq!(a.count, 4096);
        }
        drop(s);
    });
    loader.join().unwrap();
}

#[test]
fn dropping_the_last_handle_inside_a_scope_does_not_deadlock() {
    let tc = cluster();
    let addr = tc.controller_addr.clone();
    within(60, "dropping the cache inside a scope", move || {
        let s = Scope::new();
        let c = ObjectCache::new(
            Cluster::connect(&addr, common::TOKEN).unwrap(),
            CacheConfig {
                budget: 8 << 10,
                region_size: 1 << 20,
                ..CacheConfig::default()
            },
        )
        .unwrap();
        let mut v = FarVec::<u64>::new(&c).unwrap();
        // Far over the budget: the evictor starts a round and waits for
        // this thread's scope.
        for i in 0..20_000u64 {
            v.push(i).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(v);
        drop(c);
        drop(s);
    });
}

#[test]
fn cache_flush_does_not_lose_concurrent_writes() {
    let tc = cluster();
    let c = cache(&tc, 1 << 20);
    let mut b = FarBox::new(&c, [0u64; 4096]).unwrap();
    for round in 1..=300u64 {
        // A flusher runs while the whole object is rewritten.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flusher = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.flush().unwrap();
                }
            })
        };
        std::thread::sleep(std::time::Duration::from_micros(200));
        {
            let mut s = Scope::new();
            let mut r = b.get_mut(&mut s).unwrap();
            for x in r.iter_mut() {
                *x = round;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flusher.join().unwrap();
        // A clean copy is dropped, a dirty one written back.
        c.evict_to(0).unwrap();
        let got = b.read().unwrap();
        assert!(got.iter().all(|&x| x == round), "round {round}: lost write");
    }
    // Flushing inside a scope would wait for itself.
    let s = Scope::new();
    assert!(matches!(c.flush(), Err(ObjError::ScopeOpen)));
    drop(s);
}

#[test]
fn concurrent_offloaded_list_walks_see_the_newest_links() {
    let tc = cluster();
    let c = cache(&tc, 1 << 20);
    let mut list = FarList::<u64>::new(&c).unwrap();
    let mut want = Vec::new();
    for i in 0..4u64 {
        list.push_back(i).unwrap();
        want.push(i);
    }
    let list = Arc::new(RwLock::new(list));
    for round in 0..300u64 {
        c.evict_to(0).unwrap();
        // The old tail is dirty now (its link changed), far memory has the
        // old link.
        list.write().unwrap().push_back(100 + round).unwrap();
        want.push(100 + round);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let walkers: Vec<_> = (0..2)
            .map(|_| {
                let (list, barrier, want) = (list.clone(), barrier.clone(), want.clone());
                std::thread::spawn(move || {
                    let l = list.read().unwrap();
                    barrier.wait();
                    assert_eq!(l.to_vec_offloaded().unwrap(), want);
                })
            })
            .collect();
        for w in walkers {
            w.join().unwrap();
        }
    }
}

#[test]
fn offloaded_vector_operations_with_chunks_larger_than_a_slab() {
    let tc = TestCluster::start(Opts {
        servers: 2,
        capacity: "64MiB",
        slab: "4KiB",
        ..Opts::default()
    });
    let c = cache(&tc, 1 << 20);
    // Chunks of 16 KiB over slabs of 4 KiB.
    let mut v = FarVec::<u64>::with_chunk(&c, 2048).unwrap();
    let n = 10_000u64;
    v.extend_from_slice(&(0..n).collect::<Vec<_>>()).unwrap();
    c.evict_to(0).unwrap();
    let a = v.aggregate_offloaded(3..n as usize).unwrap();
    assert_eq!(a.count, n - 3);
    assert_eq!(a.sum_bits, (3..n).sum::<u64>());
    let f = v.filter_offloaded(0..n as usize, Cmp::Lt, 5000).unwrap();
    assert_eq!(f, (0..5000usize).collect::<Vec<_>>());
}

#[test]
fn huge_map_capacities_are_errors() {
    let tc = cluster();
    let c = cache(&tc, 1 << 20);
    for cap in [usize::MAX, usize::MAX / 8, 1 << 40] {
        assert!(matches!(
            FarHashMap::<u64, u64>::with_capacity(&c, cap),
            Err(ObjError::InvalidArgument(_))
        ));
    }
}

#[test]
fn offloaded_map_probes_with_small_slabs() {
    let tc = TestCluster::start(Opts {
        servers: 2,
        capacity: "64MiB",
        slab: "4KiB",
        ..Opts::default()
    });
    let c = cache(&tc, 1 << 20);
    let mut m = FarHashMap::<u64, u64>::with_capacity(&c, 4000).unwrap();
    for k in 0..4000u64 {
        m.insert(k, k * 7).unwrap();
    }
    c.evict_to(0).unwrap();
    for k in 0..4000u64 {
        assert_eq!(m.get_offloaded(&k).unwrap(), Some(k * 7), "key {k}");
    }
    // Buckets and nodes larger than a slab.
    let mut big = FarHashMap::<u64, [u64; 64]>::with_capacity(&c, 100).unwrap();
    for k in 0..100u64 {
        big.insert(k, [k; 64]).unwrap();
    }
    let mut l = FarList::<[u64; 512]>::new(&c).unwrap();
    for k in 0..10u64 {
        l.push_back([k; 512]).unwrap();
    }
    c.evict_to(0).unwrap();
    for k in 0..100u64 {
        assert_eq!(big.get_offloaded(&k).unwrap(), Some([k; 64]), "key {k}");
    }
    let got = l.to_vec_offloaded().unwrap();
    assert!(got.iter().enumerate().all(|(k, v)| *v == [k as u64; 512]));
}

#[test]
fn map_entries_fetch_ahead_within_the_budget() {
    let tc = cluster();
    // A bucket is 136 bytes (144 in its size class); the budget holds 16.
    let c = cache(&tc, 16 * 144);
    let mut m = FarHashMap::<u64, u64>::with_capacity(&c, 2000).unwrap();
    for k in 0..2000u64 {
        m.insert(k, k).unwrap();
    }
    c.evict_to(0).unwrap();
    let before = c.stats();
    let mut got = m.entries().unwrap();
    got.sort_unstable();
    assert_eq!(got, (0..2000u64).map(|k| (k, k)).collect::<Vec<_>>());
    let after = c.stats();
    // Buckets fetched ahead are used before they are evicted: few demand
    // misses.
    let misses = after.misses - before.misses;
    assert!(
        misses < m.buckets() as u64 / 10,
        "{misses} misses for {} buckets",
        m.buckets()
    );
}
