//! A tenant without special rights, behaving as badly as it can against a
//! live cluster, never stalls, starves or bloats a memory server that
//! holds other tenants' data. Real controller and server processes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Got, Opts, Raw, Rng, TestCluster, OTHER_TOKEN};
use remora_client::{ClientOptions, Cluster, Region};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::frame::put_header;
use remora_proto::ErrorCode;

/// A reader of `region` (holding `data`) that checks every read until
/// stopped; returns how many reads it made and its slowest one.
struct Watcher {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<u64>,
}

impl Watcher {
    fn start(region: Arc<Region>, data: Arc<Vec<u8>>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, worst_us) = (stop.clone(), worst_us.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let off = (n as usize * 4096) % data.len();
                    let t = Instant::now();
                    region.read(off as u64, &mut buf).expect("read");
                    worst_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    assert!(buf[..] == data[off..off + 4096], "wrong bytes at {off}");
                    n += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                n
            })
        };
        Watcher {
            stop,
            worst_us,
            handle,
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.handle.join().expect("watcher");
        (n, self.worst_us.load(Ordering::Relaxed))
    }
}

/// True while every server is alive and no region has lost a slab.
fn all_healthy(c: &Cluster) -> bool {
    let s = c.status().expect("status");
    s.servers.iter().all(|s| s.alive) && s.regions.iter().all(|r| r.lost == 0)
}

#[test]
fn a_reader_that_stops_reading_stalls_no_one_else() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        capacity: "512MiB",
        slab: "1MiB",
        ..Opts::default()
    });
    let admin = tc.client();
    // A third tenant's data, read and checked throughout.
    let watched = Arc::new(admin.alloc_region(4 << 20).unwrap());
    let wdata = Arc::new(Rng(3).bytes(4 << 20));
    watched.write(0, &wdata).unwrap();
    let watcher = Watcher::start(watched.clone(), wdata.clone());

    // The attacker: tenant "other", on its own slab, asks for 32 MiB and
    // reads none of it.
    let other = tc
        .client_with(OTHER_TOKEN, ClientOptions::default())
        .unwrap();
    let own = other.alloc_region(1 << 20).unwrap();
    own.write(0, &Rng(5).bytes(1 << 20)).unwrap();
    let loc = own.map().slabs[0].clone();
    let mut attacker = Raw::connect(&loc.addr);
    attacker.hello(0, (loc.slab, loc.key));
    let mut burst = Vec::new();
    for i in 0..32 {
        data::encode_request(
            &mut burst,
            10 + i,
            &Request::Read {
                at: Target {
                    slab: loc.slab,
                    key: loc.key,
                    offset: 0,
                },
                len: 1 << 20,
            },
        );
    }
    attacker.send(&burst);
    std::thread::sleep(Duration::from_millis(300));

    // A stock `remora region read` of a 128 MiB region, stopped right
    // after it starts.
    let big = admin.alloc_named("big", 128 << 20).unwrap();
    big.write(0, &vec![7u8; 128 << 20]).unwrap();
    let reader = common::Proc {
        child: tc
            .remora(&["region", "read", "big"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        addr: String::new(),
    };
    std::thread::sleep(Duration::from_millis(150));
    reader.signal("-STOP");
    std::thread::sleep(Duration::from_millis(150));

    // Meanwhile another tenant creates and drops regions (slab creation
    // and drops on that server), over three times `dead_after`.
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(3) || rounds < 5 {
        let r = admin.alloc_region(2 << 20).expect("create under attack");
        r.write(0, b"fine").expect("write under attack");
        admin.free_region(r.id()).expect("rm under attack");
        assert!(all_healthy(&admin), "the server was declared dead");
        let st = admin
            .server_stats(&loc.addr)
            .expect("statistics under attack");
        assert!(st.slabs_used >= 2);
        rounds += 1;
    }
    let out = tc
        .remora(&["region", "create", "after", "--size", "1MiB"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all_healthy(&admin));
    let (reads, worst) = watcher.finish();
    eprintln!(
        "{rounds} create/write/rm rounds in {:?} while a reader stalled; \
         the third tenant made {reads} reads, slowest {worst} µs",
        started.elapsed()
    );
    assert!(reads > 0);
    // The attacker's own connection still works once it reads.
    reader.signal("-CONT");
    let mut got = 0;
    while got < 32 {
        match attacker.recv() {
            Got::Reply(id, kind, p) => {
                assert!((10..42).contains(&id));
                assert!(
                    matches!(data::decode_reply(kind, &p), Ok(Reply::Data(d)) if d.len() == 1 << 20)
                );
                got += 1;
            }
            Got::Closed => break,
        }
    }
    // Either all its replies arrived, or it was dropped for taking none
    // within the send timeout: both leave everyone else alone.
    eprintln!("the stalled reader got {got} of its 32 replies");
}

/// A TCP connection that sends the bytes of a handshake one at a time.
fn trickle(addr: String, every: Duration) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let t = Instant::now();
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut hello = Vec::new();
        data::hello(&mut hello, 1, 0, 1, (0, 0));
        for b in hello.iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(every);
            if t.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        // Closed by the server: wait for the end of the stream.
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut sink = [0u8; 256];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        t.elapsed()
    })
}

#[test]
fn idle_and_half_open_connections_never_keep_a_client_out() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        capacity: "64MiB",
        slab: "1MiB",
        server_args: [
            "--max-connections",
            "64",
            "--max-unauthenticated",
            "32",
            "--handshake-timeout",
            "2s",
        ]
        .map(String::from)
        .to_vec(),
        ..Opts::default()
    });
    let addr = tc.servers[0].addr.clone();
    // Handshakes one byte every 300 ms: still unfinished at the deadline.
    let tricklers: Vec<_> = (0..4)
        .map(|_| trickle(addr.clone(), Duration::from_millis(300)))
        .collect();
    // 100 connections that send nothing, and 100 that shake hands
    // without a credential and then idle: far over every limit.
    let mut strangers = Vec::new();
    for i in 0..200 {
        let mut r = Raw::connect(&addr);
        if i % 2 == 1 {
            let mut b = Vec::new();
            data::hello(&mut b, 1, 0, i, (0, 0));
            r.send(&b);
        }
        strangers.push(r);
    }
    // 63 connections of tenant "other" that send only the handshake (the
    // finding was that these locked everyone out): a quarter of the
    // server's 64 client connections is all one tenant may hold.
    let other = tc
        .client_with(OTHER_TOKEN, ClientOptions::default())
        .unwrap();
    let own = other.alloc_region(64 << 10).unwrap();
    let loc = own.map().slabs[0].clone();
    let mut idle = Vec::new();
    let mut refused = 0;
    for i in 0..63 {
        let mut r = Raw::connect(&addr);
        let mut b = Vec::new();
        data::hello(&mut b, 1, 0, i, (loc.slab, loc.key));
        r.send(&b);
        match r.recv() {
            Got::Reply(_, kind, p) => match data::decode_reply(kind, &p).unwrap() {
                Reply::HelloOk { .. } => idle.push(r),
                Reply::Error {
                    code: ErrorCode::Overloaded,
                    ..
                } => refused += 1,
                other => panic!("{other:?}"),
            },
            Got::Closed => panic!("closed in the handshake"),
        }
    }
    assert_eq!(idle.len(), 16, "{refused} refused");
    // A client of another tenant still gets in, and keeps working while
    // more strangers arrive.
    let c = tc.client();
    let r = c.alloc_named("shared", 1 << 20).unwrap();
    let d = Rng(9).bytes(1 << 20);
    r.write(0, &d).unwrap();
    for i in 0..100 {
        strangers.push(Raw::connect(&addr));
        // A fresh client each time: each needs a new connection.
        if i % 20 == 0 {
            let fresh = tc.client();
            let mine = fresh.open_region("shared").unwrap();
            let mut back = vec![0u8; 1 << 20];
            mine.read(0, &mut back).unwrap();
            assert!(back == d);
        }
    }
    // The handshake deadline is for the whole handshake, not per byte.
    for t in tricklers {
        let lasted = t.join().unwrap();
        assert!(
            lasted < Duration::from_secs(10),
            "a byte-per-300ms handshake lasted {lasted:?} (deadline 2 s)"
        );
    }
    // Strangers were closed; their slots hold nothing.
    let st = c.server_stats(&addr).unwrap();
    assert!(st.connections < 200, "{} connections open", st.connections);
    drop(strangers);
    drop(idle);
}

#[test]
fn partial_large_frames_leave_the_server_within_its_buffer_budget() {
    const BUDGET: u64 = 64 << 20;
    let tc = TestCluster::start(Opts {
        servers: 1,
        capacity: "64MiB",
        slab: "1MiB",
        server_args: ["--buffer-budget", "64MiB"].map(String::from).to_vec(),
        ..Opts::default()
    });
    let c = tc.client();
    let r = c.alloc_region(1 << 20).unwrap();
    let d = Rng(4).bytes(1 << 20);
    r.write(0, &d).unwrap();
    let loc = r.map().slabs[0].clone();
    let pid = tc.servers[0].pid();
    let base = common::rss(pid);
    let mut peak = 0;
    for round in 0..3 {
        // 24 connections each send 8 MiB of a 16 MiB frame and stop.
        let senders: Vec<_> = (0..24)
            .map(|_| {
                let addr = loc.addr.clone();
                let cap = (loc.slab, loc.key);
                std::thread::spawn(move || {
                    let mut raw = Raw::connect(&addr);
                    let mut b = Vec::new();
                    data::hello(&mut b, 1, 0, 1, cap);
                    raw.send(&b);
                    match raw.recv() {
                        Got::Reply(_, kind, p) => match data::decode_reply(kind, &p) {
                            Ok(Reply::HelloOk { .. }) => {}
                            // The budget cannot hold another connection.
                            Ok(Reply::Error {
                                code: ErrorCode::Overloaded,
                                ..
                            }) => return raw,
                            other => panic!("handshake: {other:?}"),
                        },
                        Got::Closed => panic!("closed in the handshake"),
                    }
                    let mut b = Vec::new();
                    put_header(&mut b, 2, data::op::WRITE, (16 << 20) - 64);
                    b.resize(b.len() + (8 << 20), 0xab);
                    let _ = raw.s.set_write_timeout(Some(Duration::from_secs(3)));
                    let _ = raw.s.write_all(&b);
                    raw
                })
            })
            .collect();
        let held: Vec<Raw> = senders.into_iter().map(|h| h.join().unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let now = common::rss(pid);
        peak = peak.max(now);
        assert!(
            now <= base + BUDGET + (16 << 20),
            "round {round}: server RSS {} MiB, {} MiB before, budget 64 MiB",
            now >> 20,
            base >> 20
        );
        // Everyone else is served meanwhile.
        let mut back = vec![0u8; 1 << 20];
        r.read(0, &mut back).unwrap();
        assert!(back == d);
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
    }
    let after = common::rss(pid);
    eprintln!(
        "server RSS: {} MiB before, peak {} MiB, {} MiB after (budget 64 MiB)",
        base >> 20,
        peak >> 20,
        after >> 20
    );
    assert!(
        after <= base + (16 << 20),
        "memory kept after the frames: {} MiB, {} MiB before",
        after >> 20,
        base >> 20
    );
}

#[test]
fn one_tenant_cannot_take_every_connection() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        capacity: "16MiB",
        slab: "1MiB",
        server_args: ["--max-connections-per-tenant", "4"]
            .map(String::from)
            .to_vec(),
        ..Opts::default()
    });
    let other = tc
        .client_with(OTHER_TOKEN, ClientOptions::default())
        .unwrap();
    let own = other.alloc_region(64 << 10).unwrap();
    let loc = own.map().slabs[0].clone();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut r = Raw::connect(&loc.addr);
        r.hello(0, (loc.slab, loc.key));
        held.push(r);
    }
    let mut fifth = Raw::connect(&loc.addr);
    let mut b = Vec::new();
    data::hello(&mut b, 1, 0, 1, (loc.slab, loc.key));
    fifth.send(&b);
    fifth.expect_error(ErrorCode::Overloaded);
    fifth.expect_closed_eventually();
    // Another tenant is not affected.
    let c = tc.client();
    let r = c.alloc_region(64 << 10).unwrap();
    r.write(0, b"mine").unwrap();
    // The tenant's own client waits for a slot and gets one when another
    // closes.
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        own.read(0, &mut b).map(|_| b)
    });
    std::thread::sleep(Duration::from_millis(100));
    held.pop();
    assert!(reader.join().unwrap().is_ok());
}
