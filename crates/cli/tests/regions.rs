//! Region API against real controller and server processes.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{Opts, Rng, TestCluster};
use remora_client::BatchResult;
use remora_proto::ErrorCode;

#[test]
fn region_larger_than_a_server_matches_a_shadow_copy() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    // 3 servers x 8 MiB; the region needs more than one server.
    let size = 12u64 << 20;
    let r = c.alloc_region(size).unwrap();
    let servers: HashSet<_> = r.map().slabs.iter().map(|s| s.server_id).collect();
    assert_eq!(servers.len(), 3, "slabs should spread over every server");
    let mut shadow = vec![0u8; size as usize];
    let mut rng = Rng(0x1234_5678);
    for i in 0..300 {
        let len = 1 + rng.below(if i % 10 == 0 { 600_000 } else { 5_000 }) as usize;
        let off = rng.below(size - len as u64);
        if rng.below(2) == 0 {
            let data = rng.bytes(len);
            r.write(off, &data).unwrap();
            shadow[off as usize..off as usize + len].copy_from_slice(&data);
        } else {
            let mut buf = vec![0u8; len];
            r.read(off, &mut buf).unwrap();
            assert!(
                buf == shadow[off as usize..off as usize + len],
                "read {len} at {off} differs"
            );
        }
    }
    // Vectored and batched forms agree with the shadow copy too.
    let ranges: Vec<(u64, usize)> = (0..40)
        .map(|_| {
            let len = 1 + rng.below(200_000) as usize;
            (rng.below(size - len as u64), len)
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = ranges.iter().map(|(_, l)| vec![0u8; *l]).collect();
    {
        let mut reqs: Vec<(u64, &mut [u8])> = ranges
            .iter()
            .zip(bufs.iter_mut())
            .map(|((o, _), b)| (*o, b.as_mut_slice()))
            .collect();
        r.read_vectored(&mut reqs).unwrap();
    }
    for ((o, l), b) in ranges.iter().zip(&bufs) {
        assert!(b[..] == shadow[*o as usize..*o as usize + l]);
    }
    let writes: Vec<(u64, Vec<u8>)> = (0..30)
        .map(|_| {
            let len = 1 + rng.below(100_000) as usize;
            (rng.below(size - len as u64), rng.bytes(len))
        })
        .collect();
    let reqs: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    r.write_vectored(&reqs).unwrap();
    for (o, d) in &writes {
        shadow[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    let mut all = vec![0u8; size as usize];
    r.read(0, &mut all).unwrap();
    assert!(all == shadow, "full read differs from the shadow copy");

    let mut b = r.batch();
    b.write(8, &7u64.to_le_bytes())
        .fetch_add(8, 5)
        .compare_and_swap(8, 12, 100)
        .compare_and_swap(8, 12, 200)
        .read(8, 8)
        .read(size - 10, 10);
    let res = b.execute().unwrap();
    assert_eq!(res[0], BatchResult::Done);
    assert_eq!(res[1], BatchResult::Value(7));
    assert_eq!(res[2], BatchResult::Value(12));
    assert_eq!(res[3], BatchResult::Value(100));
    assert_eq!(res[4], BatchResult::Data(100u64.to_le_bytes().to_vec()));
    assert_eq!(
        res[5],
        BatchResult::Data(shadow[size as usize - 10..].to_vec())
    );
}

#[test]
fn out_of_range_and_unaligned_are_typed_errors() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        ..Opts::default()
    });
    let c = tc.client();
    let r = c.alloc_region(100_000).unwrap();
    let mut buf = [0u8; 10];
    let e = r.read(99_995, &mut buf).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfRange), "{e}");
    assert!(e.to_string().contains("outside"), "{e}");
    let e = r.write(u64::MAX - 2, &buf).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfRange));
    let e = r.fetch_add(4, 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unaligned));
    let e = r.compare_and_swap(99_996, 0, 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfRange));
    // The last aligned word works.
    assert_eq!(r.fetch_add(99_992, 3).unwrap(), 0);
    let e = c.alloc_region(0).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));
}

#[test]
fn concurrent_atomics_from_many_threads_add_up() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = Arc::new(c.alloc_region(1 << 20).unwrap());
    let threads = 8;
    let per = 300;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    // Counters in different slabs.
                    r.fetch_add((i % 4) * 65536, 1).unwrap();
                    // CAS increment loop on a shared word.
                    let mut cur = r.fetch_add(8, 0).unwrap();
                    loop {
                        let prev = r.compare_and_swap(8, cur, cur + 1).unwrap();
                        if prev == cur {
                            break;
                        }
                        cur = prev;
                    }
                    let _ = t;
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let total: u64 = (0..4).map(|i| r.fetch_add(i * 65536, 0).unwrap()).sum();
    assert_eq!(total, threads * per);
    assert_eq!(r.fetch_add(8, 0).unwrap(), threads * per);
}

#[test]
fn named_region_shared_by_two_clients_with_mutex_and_barrier() {
    let tc = TestCluster::start(Opts::default());
    let a = tc.client();
    let b = tc.client();
    let _region = a.alloc_named("shared/counter", 4096).unwrap();
    let threads_per_client = 3;
    let iters = 40;
    let mut hs = Vec::new();
    for client in [a.clone(), b.clone()] {
        for _ in 0..threads_per_client {
            let client = client.clone();
            hs.push(std::thread::spawn(move || {
                let r = client.open_region("shared/counter").unwrap();
                let m = r.mutex(0);
                for _ in 0..iters {
                    let g = m.lock().unwrap();
                    // A non-atomic read-modify-write, safe only under the lock.
                    let mut buf = [0u8; 8];
                    r.read(64, &mut buf).unwrap();
                    let v = u64::from_le_bytes(buf) + 1;
                    r.write(64, &v.to_le_bytes()).unwrap();
                    g.unlock().unwrap();
                }
                // Barrier rounds: everyone sees everyone's increments per round.
                let bar = r.barrier(128, 2 * threads_per_client);
                let mut leaders = 0;
                for round in 0..5u64 {
                    r.fetch_add(256, 1).unwrap();
                    if bar.wait().unwrap() {
                        leaders += 1;
                    }
                    let seen = r.fetch_add(256, 0).unwrap();
                    assert!(
                        seen >= (round + 1) * 2 * threads_per_client,
                        "round {round}: {seen}"
                    );
                    bar.wait().unwrap();
                }
                leaders
            }));
        }
    }
    let leaders: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(leaders, 5, "exactly one leader per barrier round");
    let r = b.open_region("shared/counter").unwrap();
    let mut buf = [0u8; 8];
    r.read(64, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 2 * threads_per_client * iters);
    // Another tenant cannot open it.
    let other = tc
        .client_with(common::OTHER_TOKEN, Default::default())
        .unwrap();
    let e = other.open_region("shared/counter").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RegionNotFound));
    let e = a.alloc_named("shared/counter", 10).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NameTaken));
}

#[test]
fn async_forms_keep_many_requests_in_flight() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = c.alloc_region(4 << 20).unwrap();
    let mut rng = Rng(99);
    let data = rng.bytes(4 << 20);
    // 256 writes in flight at once, driven by an executor.
    let writes: Vec<_> = (0..256)
        .map(|i| {
            r.write_async(
                i * 16384,
                &data[i as usize * 16384..(i as usize + 1) * 16384],
            )
        })
        .collect();
    for res in futures::executor::block_on(futures::future::join_all(writes)) {
        res.unwrap();
    }
    // The servers count what they served.
    let stats: Vec<_> = tc
        .servers
        .iter()
        .map(|p| c.server_stats(&p.addr).unwrap())
        .collect();
    let written: u64 = stats.iter().map(|s| s.bytes_written).sum();
    let ops: u64 = stats.iter().map(|s| s.ops).sum();
    assert!(written >= 4 << 20 && ops >= 256, "{stats:?}");
    assert!(stats
        .iter()
        .all(|s| s.connections >= 1 && s.slab_size == 64 << 10));
    let reads: Vec<_> = (0..256).map(|i| r.read_async(i * 16384, 16384)).collect();
    let got = futures::executor::block_on(futures::future::join_all(reads));
    for (i, g) in got.into_iter().enumerate() {
        assert!(g.unwrap()[..] == data[i * 16384..(i + 1) * 16384]);
    }
    r.write(0, &0u64.to_le_bytes()).unwrap();
    let adds: Vec<_> = (0..100).map(|_| r.fetch_add_async(0, 1)).collect();
    let prev: HashSet<u64> = futures::executor::block_on(futures::future::join_all(adds))
        .into_iter()
        .map(|v| v.unwrap())
        .collect();
    assert_eq!(
        prev.len(),
        100,
        "every fetch-and-add saw a distinct previous value"
    );
    // A dropped future does not disturb later ones.
    drop(r.read_async(0, 1 << 20));
    assert_eq!(r.read_async(16, 8).wait().unwrap(), data[16..24].to_vec());
    assert_eq!(r.compare_and_swap_async(0, 100, 5).wait().unwrap(), 100);
}

#[test]
fn quotas_capacity_and_free() {
    let tc = TestCluster::start(Opts {
        servers: 2,
        capacity: "2MiB",
        ..Opts::default()
    });
    let c = tc.client();
    let other = tc
        .client_with(common::OTHER_TOKEN, Default::default())
        .unwrap();
    // "other" has a 1 MiB quota.
    let r1 = other.alloc_region(512 << 10).unwrap();
    let e = other.alloc_region(600 << 10).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    assert!(e.to_string().contains("quota"), "{e}");
    other.free_region(r1.id()).unwrap();
    let r2 = other.alloc_region(1 << 20).unwrap();
    // The cluster has 4 MiB; 1 MiB is used.
    let e = c.alloc_region(3 << 20 | 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientCapacity), "{e}");
    let big = c.alloc_region(3 << 20).unwrap();
    big.write(0, &[1; 100]).unwrap();
    // A tenant cannot free or map another tenant's region.
    let e = c.free_region(r2.id()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RegionNotFound));
    let st = other.status().unwrap();
    assert_eq!(st.tenants.len(), 1, "a non-admin tenant sees only itself");
    assert_eq!(st.regions.len(), 1);
    let st = c.status().unwrap();
    assert_eq!(st.tenants.len(), 2, "the admin tenant sees all");
    let used: u64 = st.servers.iter().map(|s| s.slabs_used).sum();
    assert_eq!(used * st.slab_size, 4 << 20);
    // A freed region's handle reports the region gone, never stale data.
    c.free_region(big.id()).unwrap();
    let mut buf = [0u8; 100];
    let e = big.read(0, &mut buf).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RegionNotFound), "{e}");
    // Bad tokens are refused.
    let e = tc.client_with("nope", Default::default()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated));
}

#[test]
fn controller_restart_keeps_regions_and_tenants() {
    let mut tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = c.alloc_named("persistent", 1 << 20).unwrap();
    let data = Rng(5).bytes(1 << 20);
    r.write(0, &data).unwrap();
    tc.kill_controller();
    // The data path does not need the controller.
    let mut buf = vec![0u8; 1 << 20];
    r.read(0, &mut buf).unwrap();
    assert!(buf == data);
    tc.start_controller();
    tc.wait_alive(3);
    let c2 = tc.client();
    let r2 = c2.open_region("persistent").unwrap();
    assert_eq!(r2.id(), r.id());
    r2.read(0, &mut buf).unwrap();
    assert!(buf == data);
    // The tenant's accounting survived, and new allocations get fresh ids.
    let st = c2.status().unwrap();
    let t = st.tenants.iter().find(|t| t.name == "default").unwrap();
    assert_eq!(t.used, 1 << 20);
    let r3 = c2.alloc_region(1 << 20).unwrap();
    assert!(r3.id() > r.id());
    let slabs: HashSet<u64> = r.map().slabs.iter().map(|s| s.slab).collect();
    assert!(r3.map().slabs.iter().all(|s| !slabs.contains(&s.slab)));
    // The old client reconnects to the new controller by itself.
    assert_eq!(c.list_regions().unwrap().len(), 2);
}

#[test]
fn latency_injection_delays_every_reply() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        server_args: vec!["--inject-latency".into(), "3ms".into()],
        ..Opts::default()
    });
    let c = tc.client();
    let r = c.alloc_region(4096).unwrap();
    r.write(0, b"x").unwrap();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        r.fetch_add(8, 1).unwrap();
    }
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(15),
        "{:?}",
        t.elapsed()
    );
    // Pipelined requests still complete.
    let fs: Vec<_> = (0..50).map(|_| r.fetch_add_async(16, 1)).collect();
    for f in fs {
        f.wait().unwrap();
    }
    assert_eq!(r.fetch_add(16, 0).unwrap(), 50);
}

#[test]
fn orphan_slabs_are_reclaimed_after_the_controller_loses_its_metadata() {
    let mut tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let keep = c.alloc_region(1 << 20).unwrap();
    keep.write(0, b"kept").unwrap();
    tc.wait_slabs_used(16);
    // The controller comes back without its store: the servers still hold
    // 16 slabs that no region map knows.
    tc.kill_controller();
    std::fs::remove_dir_all(tc.data_dir()).unwrap();
    tc.start_controller();
    tc.wait_alive(3);
    tc.wait_slabs_used(0);
    // New allocations work and are not reclaimed while they live.
    let c2 = tc.client();
    let r = c2.alloc_region(2 << 20).unwrap();
    r.write(0, b"new").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let mut buf = [0u8; 3];
    r.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"new");
    tc.wait_slabs_used(32);
}
