//! Many threads on one client runtime, against a shadow copy per thread.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Opts, Rng, TestCluster};
use remora_client::{ClientOptions, Cluster};
use remora_proto::ErrorCode;

#[test]
fn many_threads_mixing_sync_async_and_batches_on_shared_connections() {
    let tc = TestCluster::start(Opts {
        servers: 2,
        capacity: "16MiB",
        slab: "64KiB",
        ..Opts::default()
    });
    // Small pieces so that most operations split across slabs and servers.
    let opts = ClientOptions {
        max_io: 8 << 10,
        ..ClientOptions::default()
    };
    let c = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts).unwrap();
    let threads = 16u64;
    let per_thread = 256u64 << 10;
    let r = Arc::new(c.alloc_region(threads * per_thread + 4096).unwrap());
    let counters = threads * per_thread; // shared atomic words after the thread ranges
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                let base = t * per_thread;
                let mut shadow = vec![0u8; per_thread as usize];
                let mut rng = Rng(t + 1);
                let mut adds = 0u64;
                for i in 0..150 {
                    let len = 1 + rng.below(40_000) as usize;
                    let off = rng.below(per_thread - len as u64);
                    match rng.below(6) {
                        0 | 1 => {
                            let d = rng.bytes(len);
                            r.write(base + off, &d).unwrap();
                            shadow[off as usize..off as usize + len].copy_from_slice(&d);
                        }
                        2 => {
                            let d = rng.bytes(len);
                            r.write_async(base + off, &d).wait().unwrap();
                            shadow[off as usize..off as usize + len].copy_from_slice(&d);
                        }
                        3 => {
                            let got =
                                futures::executor::block_on(r.read_async(base + off, len)).unwrap();
                            assert!(
                                got[..] == shadow[off as usize..off as usize + len],
                                "thread {t} op {i}"
                            );
                        }
                        4 => {
                            let d = rng.bytes(len / 2 + 1);
                            let mut b = r.batch();
                            b.write(base + off, &d)
                                .read(base + off, len)
                                .fetch_add(counters + 8 * (t % 4), 1);
                            let res = b.execute().unwrap();
                            adds += 1;
                            shadow[off as usize..off as usize + d.len()].copy_from_slice(&d);
                            match &res[1] {
                                remora_client::BatchResult::Data(got) => {
                                    assert!(
                                        got[..] == shadow[off as usize..off as usize + len],
                                        "thread {t} op {i}"
                                    )
                                }
                                other => panic!("{other:?}"),
                            }
                        }
                        _ => {
                            let mut buf = vec![0u8; len];
                            r.read(base + off, &mut buf).unwrap();
                            assert!(
                                buf[..] == shadow[off as usize..off as usize + len],
                                "thread {t} op {i}"
                            );
                            r.fetch_add(counters + 8 * (t % 4), 1).unwrap();
                            adds += 1;
                        }
                    }
                }
                let mut all = vec![0u8; per_thread as usize];
                r.read(base, &mut all).unwrap();
                assert!(all == shadow, "thread {t}: final contents differ");
                adds
            })
        })
        .collect();
    let adds: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    // Every increment landed exactly once.
    let total: u64 = (0..4)
        .map(|k| r.fetch_add(counters + 8 * k, 0).unwrap())
        .sum();
    assert_eq!(total, adds);
}

#[test]
fn a_timed_out_request_fails_with_timeout_and_late_replies_are_ignored() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        server_args: vec!["--inject-latency".into(), "150ms".into()],
        ..Opts::default()
    });
    let patient = tc.client();
    let r = patient.alloc_named("slow", 1 << 20).unwrap();
    r.write(0, &[1; 64]).unwrap();
    let impatient = Cluster::connect_with(
        &tc.controller_addr,
        common::TOKEN,
        ClientOptions {
            request_timeout: Duration::from_millis(30),
            retries: 1,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let r2 = impatient.open_region("slow").unwrap();
    let mut buf = [0u8; 64];
    let e = r2.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(e, remora_client::ClientError::Timeout { .. }),
        "{e}"
    );
    assert_eq!(e.code(), Some(ErrorCode::ServerUnavailable));
    // The patient client on its own connection is unaffected, and sees the data.
    r.read(0, &mut buf).unwrap();
    assert_eq!(buf, [1; 64]);
    // After the late replies arrive, the impatient connection still matches
    // replies to the right requests.
    std::thread::sleep(Duration::from_millis(400));
    let f1 = r2.fetch_add_async(64, 5);
    let f2 = r2.read_async(0, 8);
    let v = futures::executor::block_on(async { (f1.await, f2.await) });
    // Either both time out or both are right; never a crossed reply.
    match v {
        (Ok(prev), Ok(bytes)) => {
            assert_eq!(prev, 0);
            assert_eq!(bytes, vec![1; 8]);
        }
        (a, b) => {
            for e in [a.err(), b.err()].into_iter().flatten() {
                assert!(
                    matches!(e, remora_client::ClientError::Timeout { .. }),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn slabs_move_between_servers_under_load_without_losing_a_write() {
    let tc = TestCluster::start(Opts {
        servers: 3,
        capacity: "8MiB",
        slab: "64KiB",
        ..Opts::default()
    });
    let c = tc.client();
    let slabs = 8u64;
    let slab = 64u64 << 10;
    let r = Arc::new(c.alloc_named("moving", slabs * slab).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writers own disjoint stripes and check every read against their shadow;
    // all of them also count on shared words.
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t + 100);
                let mut shadow = vec![0u8; (slabs * slab) as usize];
                let mut adds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Stripe t of every 4 KiB block; a write may span slabs.
                    let block = rng.below(slabs * slab / 4096 - 2);
                    let off = block * 4096 + t * 1024;
                    let d = rng.bytes(1024);
                    r.write(off, &d).unwrap();
                    shadow[off as usize..off as usize + 1024].copy_from_slice(&d);
                    let mut back = vec![0u8; 1024];
                    r.read(off, &mut back).unwrap();
                    assert_eq!(back, d);
                    r.fetch_add(slabs * slab - 8 * (t + 1), 1).unwrap();
                    adds += 1;
                }
                (t, shadow, adds)
            })
        })
        .collect();
    let mut moves = 0;
    let mut rng = Rng(9);
    let mut version = r.version();
    for _ in 0..12 {
        let idx = rng.below(slabs);
        let m = c.move_slab(r.id(), idx, None).unwrap();
        assert!(m.version > version);
        version = m.version;
        moves += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Every writer finishes its last operation before the final read.
    let results: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let mut all = vec![0u8; (slabs * slab) as usize];
    let fresh = tc.client().open_region("moving").unwrap();
    assert_eq!(fresh.version(), version);
    fresh.read(0, &mut all).unwrap();
    for (t, shadow, adds) in results {
        for block in 0..slabs * slab / 4096 - 1 {
            let o = (block * 4096 + t * 1024) as usize;
            assert!(
                all[o..o + 1024] == shadow[o..o + 1024],
                "writer {t} block {block}"
            );
        }
        let w = fresh.fetch_add(slabs * slab - 8 * (t + 1), 0).unwrap();
        assert_eq!(w, adds, "writer {t}: every increment applied exactly once");
    }
    assert_eq!(moves, 12);
    // Errors: same server, bad index, unknown server, other tenant.
    let m = fresh.map();
    let e = c
        .move_slab(fresh.id(), 0, Some(&m.slabs[0].addr))
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientCapacity), "{e}");
    let e = c.move_slab(fresh.id(), 99, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    let e = c.move_slab(fresh.id(), 0, Some("127.0.0.1:1")).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientCapacity), "{e}");
    let other = tc
        .client_with(common::OTHER_TOKEN, Default::default())
        .unwrap();
    let e = other.move_slab(fresh.id(), 0, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RegionNotFound), "{e}");
    // Accounting followed the slabs (servers report drops with their next heartbeat).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = c.status().unwrap();
        let used: u64 = st.servers.iter().map(|s| s.slabs_used).sum();
        if used == slabs {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "servers still report {used} slabs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_thread_sending_large_reads_then_large_writes_does_not_deadlock() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        capacity: "80MiB",
        slab: "1MiB",
        ..Opts::default()
    });
    let c = tc.client();
    let r = c.alloc_region(64 << 20).unwrap();
    let half = 32usize << 20;
    let data = Rng(21).bytes(half);
    r.write(0, &data).unwrap();
    // Both halves on the one server: the server's 32 MiB of read replies
    // fill the socket while this thread is still sending 32 MiB of writes.
    let res = r
        .batch()
        .read(0, half)
        .write(half as u64, &data)
        .execute()
        .unwrap();
    assert!(matches!(&res[0], remora_client::BatchResult::Data(d) if *d == data));
    // The same with a future that nobody polls while the writes go out.
    let pending = r.read_async(half as u64, half);
    r.write(0, &data[..half / 2]).unwrap();
    assert!(pending.wait().unwrap() == data);
}
