//! Bad input, dropped connections and dead servers, against real processes.

mod common;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Got, Opts, Raw, Rng, TestCluster};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::frame::HEADER_LEN;
use remora_proto::ErrorCode;

#[test]
fn bad_input_gets_errors_and_other_clients_are_unaffected() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        ..Opts::default()
    });
    let c = tc.client();
    let r = Arc::new(c.alloc_region(1 << 20).unwrap());
    let data = Rng(7).bytes(1 << 20);
    r.write(0, &data).unwrap();
    // A well-behaved client keeps reading and checking while we attack.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (r, stop, data) = (r.clone(), stop.clone(), data.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            let mut buf = vec![0u8; 8192];
            while !stop.load(Ordering::Relaxed) {
                let off = (n * 8192) % (1 << 20);
                r.read(off as u64, &mut buf).unwrap();
                assert!(buf[..] == data[off..off + 8192]);
                n += 1;
            }
            n
        })
    };
    let server = &tc.servers[0].addr;
    let loc = r.map().slabs[0].clone();
    let at = |key: u64, offset: u64| Target {
        slab: loc.slab,
        key,
        offset,
    };

    // 1. Garbage bytes: an error reply and/or a closed connection.
    let mut g = Raw::connect(server);
    g.send(&[
        0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
    ]);
    g.expect_closed_eventually();

    // 2. Data before the handshake.
    let mut g = Raw::connect(server);
    g.request(
        5,
        &Request::Read {
            at: at(loc.key, 0),
            len: 8,
        },
    );
    g.expect_error(ErrorCode::HandshakeRequired);
    g.expect_closed_eventually();

    // 3. Wrong version.
    let mut g = Raw::connect(server);
    g.request(
        1,
        &Request::Hello {
            version: 999,
            admin_key: 0,
            session: 0,
            cap: (0, 0),
        },
    );
    g.expect_error(ErrorCode::UnsupportedVersion);

    // 4. After a handshake: wrong key, unknown slab, out of range, unaligned
    //    atomic, unknown opcode, truncated payload, control ops without the
    //    admin key, an oversized read. The connection stays usable.
    let mut g = Raw::connect(server);
    g.hello(0, (loc.slab, loc.key));
    g.request(
        2,
        &Request::Read {
            at: at(loc.key ^ 1, 0),
            len: 8,
        },
    );
    g.expect_error(ErrorCode::BadCapability);
    g.request(
        3,
        &Request::Write {
            at: Target {
                slab: 999_999,
                key: 1,
                offset: 0,
            },
            data: b"x",
        },
    );
    g.expect_error(ErrorCode::UnknownSlab);
    g.request(
        4,
        &Request::Read {
            at: at(loc.key, 65_530),
            len: 100,
        },
    );
    g.expect_error(ErrorCode::OutOfRange);
    g.request(
        5,
        &Request::Faa {
            at: at(loc.key, 3),
            delta: 1,
            rid: 0,
        },
    );
    g.expect_error(ErrorCode::Unaligned);
    let mut b = Vec::new();
    remora_proto::frame::put_header(&mut b, 6, 0x7777, 3);
    b.extend_from_slice(b"abc");
    g.send(&b);
    g.expect_error(ErrorCode::Malformed);
    let mut b = Vec::new();
    remora_proto::frame::put_header(&mut b, 7, data::op::CAS, 5);
    b.extend_from_slice(b"short");
    g.send(&b);
    g.expect_error(ErrorCode::Malformed);
    g.request(
        8,
        &Request::CreateSlab {
            slab: 424_242,
            key: 1,
            owner: 1,
        },
    );
    g.expect_error(ErrorCode::NotAuthorized);
    g.request(9, &Request::DropSlab { slab: loc.slab });
    g.expect_error(ErrorCode::NotAuthorized);
    g.request(
        10,
        &Request::Read {
            at: at(loc.key, 0),
            len: u32::MAX,
        },
    );
    g.expect_error(ErrorCode::FrameTooLarge);
    // A batch with a bad sub-operation still answers the good ones.
    let mut bb = data::BatchBuilder::new();
    bb.push(&data::SubOp::Read {
        at: at(loc.key, 0),
        len: 4,
    });
    bb.push(&data::SubOp::Read {
        at: at(0, 0),
        len: 4,
    });
    g.request(11, &bb.as_request());
    match g.recv() {
        Got::Reply(11, kind, p) => match data::decode_reply(kind, &p).unwrap() {
            Reply::Batch(res) => {
                let v: Vec<_> = res.iter().map(|x| x.unwrap()).collect();
                assert_eq!(v[0], data::SubResult::Data(&data[..4]));
                assert_eq!(v[1], data::SubResult::Error(ErrorCode::BadCapability));
            }
            other => panic!("{other:?}"),
        },
        _ => panic!("no batch reply"),
    }
    g.request(
        12,
        &Request::Read {
            at: at(loc.key, 16),
            len: 4,
        },
    );
    match g.recv() {
        Got::Reply(12, kind, p) => assert_eq!(
            data::decode_reply(kind, &p).unwrap(),
            Reply::Data(&data[16..20])
        ),
        _ => panic!("connection unusable after errors"),
    }

    // 5. An oversized frame: error reply, then the connection is closed.
    let mut g = Raw::connect(server);
    g.hello(0, (loc.slab, loc.key));
    let mut b = Vec::new();
    b.extend_from_slice(&(1u32 << 30).to_le_bytes());
    b.extend_from_slice(&[0u8; HEADER_LEN - 4]);
    g.send(&b);
    g.expect_error(ErrorCode::FrameTooLarge);
    g.expect_closed_eventually();

    // 6. A frame length shorter than the header.
    let mut g = Raw::connect(server);
    g.send(&2u32.to_le_bytes());
    g.expect_error(ErrorCode::Malformed);

    // 7. The controller survives garbage and bad tokens too.
    let mut g = Raw::connect(&tc.controller_addr);
    g.send(&[0xff; 64]);
    g.expect_closed_eventually();
    let mut g = Raw::connect(&tc.controller_addr);
    let mut b = Vec::new();
    remora_proto::ctl::encode(
        &mut b,
        1,
        remora_proto::ctl::CTL_REQUEST,
        &remora_proto::ctl::CtlRequest::List,
    );
    g.send(&b);
    match g.recv() {
        Got::Reply(1, _, p) => assert!(matches!(
            remora_proto::ctl::decode_reply(&p).unwrap(),
            remora_proto::ctl::CtlReply::Error {
                code: ErrorCode::Unauthenticated,
                ..
            }
        )),
        _ => panic!("controller closed instead of answering"),
    }
    let mut b = Vec::new();
    remora_proto::frame::put_header(&mut b, 2, remora_proto::ctl::CTL_REQUEST, 3);
    b.extend_from_slice(&[0xff, 0xff, 0xff]);
    g.send(&b);
    match g.recv() {
        Got::Reply(2, _, p) => assert!(matches!(
            remora_proto::ctl::decode_reply(&p).unwrap(),
            remora_proto::ctl::CtlReply::Error {
                code: ErrorCode::Malformed,
                ..
            }
        )),
        _ => panic!("controller closed instead of answering"),
    }

    stop.store(true, Ordering::Relaxed);
    let n = good.join().unwrap();
    assert!(n > 0);
    // Nothing was touched: the whole region still holds what was written.
    let mut all = vec![0u8; 1 << 20];
    r.read(0, &mut all).unwrap();
    assert!(all == data);
    // Both daemons are still up and serving new clients.
    let r2 = tc.client().alloc_region(4096).unwrap();
    r2.write(0, b"still alive").unwrap();
}

/// A TCP proxy whose connections can be cut.
struct Proxy {
    addr: String,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let cs = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let _ = up.set_nodelay(true);
                cs.lock().unwrap().push(s.try_clone().unwrap());
                cs.lock().unwrap().push(up.try_clone().unwrap());
                for (mut a, mut b) in [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, conns }
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn client_reconnects_after_a_dropped_connection() {
    let mut tc = TestCluster::start(Opts {
        servers: 0,
        ..Opts::default()
    });
    // Start a server on a known port, advertised through a proxy.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let real = format!("127.0.0.1:{port}");
    let proxy = Proxy::start(real.clone());
    let ctl = tc.controller_addr.clone();
    tc.servers.push(common::Proc::spawn(&[
        "server",
        "--listen",
        &real,
        "--advertise",
        &proxy.addr,
        "--controller",
        &ctl,
        "--capacity",
        "4MiB",
    ]));
    tc.wait_alive(1);
    let c = tc.client();
    let r = c.alloc_region(1 << 20).unwrap();
    let mut data = Rng(11).bytes(1 << 20);
    r.write(0, &data).unwrap();
    for round in 0..3 {
        proxy.cut();
        let mut buf = vec![0u8; 1 << 20];
        r.read(0, &mut buf)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(buf == data);
        r.write(round * 8, &[round as u8; 8]).unwrap();
        data[round as usize * 8..round as usize * 8 + 8].fill(round as u8);
    }
}

#[test]
fn dead_server_is_detected_and_avoided() {
    let mut tc = TestCluster::start(Opts {
        servers: 3,
        ..Opts::default()
    });
    let c = tc.client();
    let r = c.alloc_region(3 << 20).unwrap();
    r.write(0, &[9; 4096]).unwrap();
    let victim_addr = tc.servers[1].addr.clone();
    tc.servers.remove(1); // killed on drop
    tc.wait_alive(2);
    let st = c.status().unwrap();
    let dead = st.servers.iter().find(|s| s.addr == victim_addr).unwrap();
    assert!(!dead.alive);
    // New regions avoid the dead server.
    let r2 = c.alloc_region(4 << 20).unwrap();
    assert!(r2.map().slabs.iter().all(|s| s.addr != victim_addr));
    // Reading or writing a slab that lived on the dead server fails clearly
    // (the region has no redundancy): DataLost, never wrong data.
    let on_dead = r
        .map()
        .slabs
        .iter()
        .position(|s| s.addr == victim_addr)
        .unwrap() as u64;
    let mut buf = [0u8; 16];
    let e = r.read(on_dead * r.slab_size(), &mut buf).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DataLost), "{e}");
    assert!(e.to_string().contains(&victim_addr), "{e}");
    let e = r.write(on_dead * r.slab_size() + 8, &[1; 8]).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DataLost), "{e}");
    let e = r.fetch_add(on_dead * r.slab_size(), 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DataLost), "{e}");
    // The rest of the region is intact.
    let other = r
        .map()
        .slabs
        .iter()
        .position(|s| s.addr != victim_addr)
        .unwrap() as u64;
    r.read(other * r.slab_size(), &mut buf).unwrap();
    let st = c.status().unwrap();
    let info = st.regions.iter().find(|i| i.id == r.id()).unwrap();
    assert!(info.lost > 0, "{info:?}");
}

#[test]
fn only_servers_with_the_cluster_secret_join_and_ids_cannot_be_hijacked() {
    let mut tc = TestCluster::start(Opts {
        servers: 2,
        secret: Some("s3cret"),
        ..Opts::default()
    });
    // A server with the wrong secret (or none) never joins.
    tc.add_server(&["--cluster-secret", "wrong"]);
    std::thread::sleep(Duration::from_millis(500));
    let st = tc.client().status().unwrap();
    assert_eq!(st.servers.len(), 2, "{:?}", st.servers);
    // A raw Register without the secret is refused.
    let mut g = Raw::connect(&tc.controller_addr);
    let mut b = Vec::new();
    let reg = remora_proto::ctl::CtlRequest::Register {
        version: remora_proto::VERSION,
        server_id: st.servers[0].id,
        addr: "127.0.0.1:9".into(),
        admin_key: 1,
        capacity: u64::MAX,
        secret: None,
        slabs_used: 0,
    };
    remora_proto::ctl::encode(&mut b, 1, remora_proto::ctl::CTL_REQUEST, &reg);
    g.send(&b);
    match g.recv() {
        Got::Reply(1, _, p) => assert!(matches!(
            remora_proto::ctl::decode_reply(&p).unwrap(),
            remora_proto::ctl::CtlReply::Error {
                code: ErrorCode::Unauthenticated,
                ..
            }
        )),
        _ => panic!("no reply"),
    }
    // Even with the secret, a live server's id cannot move to another address.
    let reg = remora_proto::ctl::CtlRequest::Register {
        version: remora_proto::VERSION,
        server_id: st.servers[0].id,
        addr: "127.0.0.1:9".into(),
        admin_key: 1,
        capacity: u64::MAX,
        secret: Some("s3cret".into()),
        slabs_used: 0,
    };
    let mut b = Vec::new();
    remora_proto::ctl::encode(&mut b, 2, remora_proto::ctl::CTL_REQUEST, &reg);
    g.send(&b);
    match g.recv() {
        Got::Reply(2, _, p) => assert!(matches!(
            remora_proto::ctl::decode_reply(&p).unwrap(),
            remora_proto::ctl::CtlReply::Error {
                code: ErrorCode::InvalidArgument,
                ..
            }
        )),
        _ => panic!("no reply"),
    }
    let after = tc.client().status().unwrap();
    let ids = |v: &[remora_proto::ctl::ServerInfo]| {
        v.iter().map(|s| (s.id, s.addr.clone())).collect::<Vec<_>>()
    };
    assert_eq!(ids(&after.servers), ids(&st.servers));
    // The cluster still works.
    let r = tc.client().alloc_region(1 << 20).unwrap();
    r.write(0, b"ok").unwrap();
}

#[test]
fn a_frame_header_alone_cannot_make_a_daemon_allocate() {
    let tc = TestCluster::start(Opts {
        servers: 1,
        ..Opts::default()
    });
    // Before the handshake only small frames are accepted.
    let mut g = Raw::connect(&tc.servers[0].addr);
    g.send(&[0xf0, 0xff, 0xff, 0x00]);
    g.expect_error(ErrorCode::FrameTooLarge);
    g.expect_closed_eventually();
    // After it, a claimed 15 MiB frame is buffered only as bytes arrive:
    // many connections each claiming one cost the server nothing.
    let owned = tc.client().alloc_region(4096).unwrap();
    let loc = owned.map().slabs[0].clone();
    let mut conns = Vec::new();
    for _ in 0..200 {
        let mut g = Raw::connect(&tc.servers[0].addr);
        g.hello(0, (loc.slab, loc.key));
        g.send(&[0xf0, 0xff, 0xef, 0x00]);
        conns.push(g);
    }
    let r = tc.client().alloc_region(4096).unwrap();
    r.write(0, b"fine").unwrap();
    let kb = common::rss(tc.servers[0].pid()) / 1024;
    assert!(
        kb < 200 * 1024,
        "server RSS {kb} KiB after 200 claimed frames"
    );
}
