//! Fault injection with real processes: servers killed, stopped past their
//! deadline, cut off the network, and the controller restarted, while
//! client threads write and read; every acknowledged write must read back.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Opts, Rng, TestCluster};
use remora_client::{ClientOptions, Cluster, Redundancy, Region};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::ErrorCode;

const REGION: u64 = 2 << 20;
const THREADS: usize = 4;

fn opts() -> ClientOptions {
    ClientOptions {
        failover_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

/// Client threads writing random ranges of their own part of the region
/// (some across slab boundaries) and reading back; each keeps a shadow of
/// what it has had acknowledged. With `counters`, one more thread adds to a
/// word with fetch-and-add (replicated regions).
struct Workload {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
    shadow: Arc<Mutex<Vec<u8>>>,
    errors: Arc<Mutex<Vec<String>>>,
    ops: Arc<AtomicU64>,
    added: Arc<AtomicU64>,
    unsure: Arc<AtomicU64>,
}

/// The word the counter thread adds to (past the threads' parts).
const COUNTER: u64 = REGION - 8;

impl Workload {
    fn start(region: Arc<Region>, counters: bool) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let shadow = Arc::new(Mutex::new(vec![0u8; REGION as usize]));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let ops = Arc::new(AtomicU64::new(0));
        let added = Arc::new(AtomicU64::new(0));
        let unsure = Arc::new(AtomicU64::new(0));
        let part = (REGION - 4096) / THREADS as u64;
        let mut handles = Vec::new();
        for t in 0..THREADS {
            let (r, stop, shadow, errors, ops) = (
                region.clone(),
                stop.clone(),
                shadow.clone(),
                errors.clone(),
                ops.clone(),
            );
            handles.push(std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + t as u64 * 7919);
                let base = t as u64 * part;
                let mut mine = vec![0u8; part as usize];
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + rng.below(12 << 10);
                    let off = rng.below(part - len);
                    if rng.below(3) < 2 {
                        let bytes = rng.bytes(len as usize);
                        match r.write(base + off, &bytes) {
                            Ok(()) => {
                                mine[off as usize..(off + len) as usize].copy_from_slice(&bytes);
                            }
                            Err(e) => {
                                errors.lock().unwrap().push(format!("write: {e}"));
                                return;
                            }
                        }
                    } else {
                        let mut buf = vec![0u8; len as usize];
                        match r.read(base + off, &mut buf) {
                            Ok(()) => {
                                if buf[..] != mine[off as usize..(off + len) as usize] {
                                    errors.lock().unwrap().push(format!(
                                        "thread {t}: wrong data at {} (+{len})",
                                        base + off
                                    ));
                                    return;
                                }
                            }
                            Err(e) => {
                                errors.lock().unwrap().push(format!("read: {e}"));
                                return;
                            }
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                shadow.lock().unwrap()[base as usize..(base + part) as usize]
                    .copy_from_slice(&mine);
            }));
        }
        if counters {
            let (r, stop, errors, added, unsure_adds) = (
                region.clone(),
                stop.clone(),
                errors.clone(),
                added.clone(),
                unsure.clone(),
            );
            handles.push(std::thread::spawn(move || {
                // Adds whose reply was lost with their copy may or may not
                // have happened (OutcomeUnknown): the next answer tells.
                let (mut expect, mut unsure) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match r.fetch_add(COUNTER, 3) {
                        Ok(old) if old >= expect && old - expect <= 3 * unsure && (old - expect) % 3 == 0 => {
                            expect = old + 3;
                            unsure = 0;
                        }
                        Ok(old) => {
                            errors.lock().unwrap().push(format!(
                                "counter was {old}, expected {expect} (+ up to {unsure} unsure adds)"
                            ));
                            return;
                        }
                        Err(remora_client::ClientError::OutcomeUnknown { .. }) => unsure += 1,
                        Err(e) => {
                            errors.lock().unwrap().push(format!("fetch_add: {e}"));
                            return;
                        }
                    }
                }
                added.store(expect, Ordering::Relaxed);
                unsure_adds.store(unsure, Ordering::Relaxed);
            }));
        }
        Workload {
            stop,
            handles,
            shadow,
            errors,
            ops,
            added,
            unsure,
        }
    }

    fn check_errors(&self) {
        let e = self.errors.lock().unwrap();
        assert!(e.is_empty(), "client errors: {e:?}");
    }

    /// Stops the threads; returns the shadow of the region and the counter
    /// (at least that much, and up to 3 more per unsure add after it).
    fn finish(self) -> (Vec<u8>, (u64, u64)) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join().unwrap();
        }
        let e = self.errors.lock().unwrap();
        assert!(e.is_empty(), "client errors: {e:?}");
        assert!(
            self.ops.load(Ordering::Relaxed) > 50,
            "the workload barely ran"
        );
        let shadow = self.shadow.lock().unwrap().clone();
        let lo = self.added.load(Ordering::Relaxed);
        (shadow, (lo, lo + 3 * self.unsure.load(Ordering::Relaxed)))
    }
}

/// Lost slabs of a region, per the controller.
fn lost(c: &Cluster, region: u64) -> u64 {
    c.list_regions()
        .ok()
        .and_then(|l| l.into_iter().find(|r| r.id == region))
        .map_or(u64::MAX, |r| r.lost)
}

fn alive(c: &Cluster) -> usize {
    c.status()
        .map(|s| s.servers.iter().filter(|s| s.alive).count())
        .unwrap_or(0)
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a server is declared dead and the region is whole again.
fn wait_rebuilt(tc: &TestCluster, region: u64, alive_now: usize) {
    let c = tc.client();
    wait("the server to be declared dead", 20, || {
        alive(&c) == alive_now
    });
    wait("the rebuild", 30, || lost(&c, region) == 0);
}

/// Index of a live server holding at least one slab of the region.
fn victim(tc: &TestCluster, r: &Region, not: &[usize]) -> usize {
    r.refresh().unwrap();
    let m = r.map();
    (0..tc.servers.len())
        .find(|i| !not.contains(i) && m.pieces().any(|l| !l.lost && l.addr == tc.servers[*i].addr))
        .expect("a server with slabs")
}

fn verify(c: &Cluster, id: u64, shadow: &[u8], counter: Option<(u64, u64)>) {
    let r = c
        .list_regions()
        .unwrap()
        .into_iter()
        .find(|i| i.id == id)
        .unwrap();
    let region = open_by_id(c, &r.name.unwrap());
    let mut got = vec![0u8; REGION as usize - 4096];
    region.read(0, &mut got).unwrap();
    let bad: Vec<usize> = got
        .iter()
        .zip(shadow)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(
        bad.is_empty(),
        "region differs in {} bytes, from offset {:?} to {:?}",
        bad.len(),
        bad.first(),
        bad.last()
    );
    if let Some((lo, hi)) = counter {
        let mut w = [0u8; 8];
        region.read(COUNTER, &mut w).unwrap();
        let v = u64::from_le_bytes(w);
        assert!(
            (lo..=hi).contains(&v) && (v - lo) % 3 == 0,
            "counter {v}, expected {lo}..={hi}"
        );
    }
}

fn open_by_id(c: &Cluster, name: &str) -> Region {
    c.open_region(name).unwrap()
}

/// Kill one server, stop another past its deadline, restart the
/// controller; all under load, checking everything after each.
fn survive_faults(redundancy: Redundancy, servers: usize, name: &str) {
    let mut tc = TestCluster::start(Opts {
        servers,
        ..Opts::default()
    });
    let c = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts()).unwrap();
    let r = Arc::new(c.alloc_with(REGION, Some(name), redundancy).unwrap());
    let counters = matches!(redundancy, Redundancy::Replicate(_));
    let w = Workload::start(r.clone(), counters);
    std::thread::sleep(Duration::from_millis(300));

    // 1. SIGKILL a server.
    let a = victim(&tc, &r, &[]);
    tc.servers[a].signal("-KILL");
    wait_rebuilt(&tc, r.id(), servers - 1);
    w.check_errors();

    // 2. SIGSTOP another past the deadline, then SIGCONT: it was declared
    //    dead and its slabs rebuilt, so it must drop them and rejoin empty.
    let b = victim(&tc, &r, &[a]);
    tc.servers[b].signal("-STOP");
    wait_rebuilt(&tc, r.id(), servers - 2);
    tc.servers[b].signal("-CONT");
    let probe = tc.client();
    wait("the stopped server to rejoin", 20, || {
        alive(&probe) == servers - 1
    });
    w.check_errors();

    // 3. Restart the controller.
    tc.kill_controller();
    std::thread::sleep(Duration::from_millis(200));
    tc.start_controller();
    std::thread::sleep(Duration::from_millis(1000));
    w.check_errors();

    let (shadow, added) = w.finish();
    let fresh = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts()).unwrap();
    verify(
        &fresh,
        r.id(),
        &shadow[..REGION as usize - 4096],
        counters.then_some(added),
    );
    if counters {
        assert!(added.0 > 0);
    }
    // The stopped server holds no slab it was declared dead with.
    let st = fresh.status().unwrap();
    let back = st
        .servers
        .iter()
        .find(|s| s.addr == tc.servers[b].addr)
        .expect("rejoined");
    assert!(back.alive);
}

#[test]
fn replicate_2_survives_kill_stop_and_controller_restart() {
    survive_faults(Redundancy::Replicate(2), 5, "r2");
}

#[test]
fn replicate_3_survives_kill_stop_and_controller_restart() {
    survive_faults(Redundancy::Replicate(3), 5, "r3");
}

#[test]
fn erasure_4_2_survives_kill_stop_and_controller_restart() {
    survive_faults(Redundancy::Erasure { data: 4, parity: 2 }, 8, "ec42");
}

#[test]
fn erasure_4_2_survives_two_servers_lost_at_once() {
    let tc = TestCluster::start(Opts {
        servers: 8,
        ..Opts::default()
    });
    let c = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts()).unwrap();
    let r = Arc::new(
        c.alloc_with(
            REGION,
            Some("two"),
            Redundancy::Erasure { data: 4, parity: 2 },
        )
        .unwrap(),
    );
    let w = Workload::start(r.clone(), false);
    std::thread::sleep(Duration::from_millis(300));
    let a = victim(&tc, &r, &[]);
    let b = victim(&tc, &r, &[a]);
    tc.servers[a].signal("-KILL");
    tc.servers[b].signal("-KILL");
    // Degraded reads and writes go on while the two are lost and rebuilt.
    wait_rebuilt(&tc, r.id(), 6);
    let (shadow, _) = w.finish();
    verify(&c, r.id(), &shadow[..REGION as usize - 4096], None);
    // Reads are also right with both losses and no rebuild possible: kill
    // two more, on a cluster with no spare server outside the stripes.
    let probe = tc.client();
    let c2 = victim(&tc, &r, &[a, b]);
    let d = victim(&tc, &r, &[a, b, c2]);
    tc.servers[c2].signal("-KILL");
    tc.servers[d].signal("-KILL");
    wait("two more servers declared dead", 20, || alive(&probe) == 4);
    verify(&c, r.id(), &shadow[..REGION as usize - 4096], None);
}

#[test]
fn erasure_regions_refuse_atomics_and_too_few_servers() {
    let tc = TestCluster::start(Opts {
        servers: 5,
        ..Opts::default()
    });
    let c = tc.client();
    let e = c
        .alloc_with(1 << 20, None, Redundancy::Erasure { data: 4, parity: 2 })
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientCapacity), "{e}");
    let e = c
        .alloc_with(1 << 20, None, Redundancy::Replicate(6))
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientCapacity), "{e}");
    let e = c
        .alloc_with(1 << 20, None, Redundancy::Replicate(1))
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    let r = c
        .alloc_with(100_000, None, Redundancy::Erasure { data: 3, parity: 2 })
        .unwrap();
    let e = r.fetch_add(0, 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unsupported), "{e}");
    let e = r.read_async(0, 8).wait().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unsupported), "{e}");
    // A short last stripe (2 data slabs of 3) reads and writes like any other.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    r.write(0, &data).unwrap();
    let mut got = vec![0u8; data.len()];
    r.read(0, &mut got).unwrap();
    assert!(got == data);
    // Quota counts the redundancy: 2 data + 2 parity slabs of 64 KiB.
    let st = c.status().unwrap();
    let info = st.regions.iter().find(|i| i.id == r.id()).unwrap();
    assert_eq!(info.pieces, 4);
}

#[test]
fn a_retried_atomic_is_applied_once() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = c.alloc_region(64 << 10).unwrap();
    let loc = r.map().slabs[0].clone();
    let at = Target {
        slab: loc.slab,
        key: loc.key,
        offset: 0,
    };
    let faa = |session: u64, rid: u64| -> u64 {
        // A fresh connection each time, as after a reconnect.
        let mut s = TcpStream::connect(&loc.addr).unwrap();
        let mut b = Vec::new();
        data::hello(&mut b, 1, 0, session, (loc.slab, loc.key));
        data::encode_request(&mut b, 2, &Request::Faa { at, delta: 5, rid });
        s.write_all(&b).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
            // HELLO_OK (40 bytes) then VALUE (22 bytes).
            if got.len() >= 40 + 22 {
                break;
            }
        }
        let v = &got[40..];
        match data::decode_reply(u16::from_le_bytes([v[12], v[13]]), &v[14..22]).unwrap() {
            Reply::Value(x) => x,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(faa(42, 7), 0);
    // The same request again (its reply was "lost"): same answer, not applied twice.
    assert_eq!(faa(42, 7), 0);
    // Another request id, or another session, is another atomic.
    assert_eq!(faa(42, 8), 5);
    assert_eq!(faa(43, 7), 10);
    assert_eq!(faa(43, 0), 15);
    assert_eq!(faa(43, 0), 20);
    let mut w = [0u8; 8];
    r.read(0, &mut w).unwrap();
    assert_eq!(u64::from_le_bytes(w), 25);
}

/// Runs `ip` with arguments; true on success.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn create(tag: u32) -> Option<Netns> {
        let name = format!("remora-t{tag}");
        let host_if = format!("rmh{tag}");
        let ns_if = format!("rmn{tag}");
        let _ = ip(&["netns", "del", &name]);
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let n = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]) && ip(&["link", "set", &ns_if, "netns", &name])
            && ip(&["addr", "add", "10.213.0.1/24", "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "netns",
                "exec",
                &name,
                "ip",
                "addr",
                "add",
                "10.213.0.2/24",
                "dev",
                &ns_if,
            ])
            && ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])
            && ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ok.then_some(n)
    }

    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn a_server_cut_off_the_network_is_replaced_and_wiped_on_return() {
    let Some(ns) = Netns::create(std::process::id() % 10_000) else {
        assert!(
            std::env::var_os("REMORA_REQUIRE_NETNS").is_none(),
            "REMORA_REQUIRE_NETNS is set but network namespaces cannot be created"
        );
        eprintln!(
            "SKIPPED: network namespaces are not available here (needs root and iproute2); \
             CI runs this test as root"
        );
        return;
    };
    // The controller listens on every address, so the server in the
    // namespace reaches it over the veth pair.
    let mut tc = TestCluster::start(Opts {
        servers: 0,
        ..Opts::default()
    });
    tc.kill_controller();
    tc.controller_addr = "0.0.0.0:0".into();
    tc.start_controller();
    let port = tc.controller_addr.rsplit(':').next().unwrap().to_string();
    tc.controller_addr = format!("127.0.0.1:{port}");
    for _ in 0..3 {
        tc.add_server(&[]);
    }
    // The fourth server runs in the namespace.
    let ns_server = common::Proc::spawn_cmd(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        common::exe(),
        "server",
        "--listen",
        "10.213.0.2:0",
        "--controller",
        &format!("10.213.0.1:{port}"),
        "--capacity",
        "8MiB",
    ]));
    tc.wait_alive(4);
    let c = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts()).unwrap();
    let r = Arc::new(
        c.alloc_with(REGION, Some("cut"), Redundancy::Replicate(2))
            .unwrap(),
    );
    assert!(
        r.map().pieces().any(|l| l.addr == ns_server.addr),
        "the namespaced server holds no slab"
    );
    let w = Workload::start(r.clone(), true);
    std::thread::sleep(Duration::from_millis(300));
    ns.link(false);
    wait_rebuilt(&tc, r.id(), 3);
    w.check_errors();
    ns.link(true);
    wait("the cut-off server to rejoin", 20, || alive(&c) == 4);
    std::thread::sleep(Duration::from_millis(300));
    let (shadow, added) = w.finish();
    verify(&c, r.id(), &shadow[..REGION as usize - 4096], Some(added));
    // It came back empty: none of the region's slabs are on it any more.
    r.refresh().unwrap();
    assert!(!r.map().pieces().any(|l| l.addr == ns_server.addr));
    let st = c.server_stats(&ns_server.addr).unwrap();
    assert_eq!(st.slabs_used, 0, "the returning server kept its slabs");
}

#[test]
fn a_server_that_dies_while_the_controller_is_down_is_declared_dead_and_rebuilt() {
    let mut tc = TestCluster::start(Opts {
        servers: 4,
        ..Opts::default()
    });
    let c = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts()).unwrap();
    let r = c
        .alloc_with(REGION, Some("gone"), Redundancy::Replicate(2))
        .unwrap();
    let data = Rng(77).bytes(REGION as usize);
    r.write(0, &data).unwrap();
    let victim = victim(&tc, &r, &[]);
    tc.kill_controller();
    tc.servers[victim].signal("-KILL");
    tc.start_controller();
    // It never registers with the new controller; the maps still name it.
    let probe = tc.client();
    wait(
        "the silent server to be declared dead and rebuilt",
        30,
        || {
            probe
                .status()
                .is_ok_and(|s| s.rebuilt_slabs > 0 && s.regions.iter().all(|r| r.lost == 0))
        },
    );
    let mut got = vec![0u8; REGION as usize];
    r.read(0, &mut got).unwrap();
    assert!(got == data, "read back differs");
    let out = tc.remora(&["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("REBUILD: 0 slabs lost") && status.contains("replicate:2"),
        "{status}"
    );
    r.refresh().unwrap();
    assert!(!r.map().pieces().any(|l| l.addr == tc.servers[victim].addr));
}

#[test]
fn contended_atomics_on_a_replicated_region_stay_linearizable_through_a_kill() {
    let tc = TestCluster::start(Opts {
        servers: 6,
        ..Opts::default()
    });
    let c = Cluster::connect_with(&tc.controller_addr, common::TOKEN, opts()).unwrap();
    let r = Arc::new(
        c.alloc_with(64 << 10, Some("hot"), Redundancy::Replicate(3))
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // Eight threads add to one word; every previous value handed out must
    // be distinct (each add is ordered once), and the final value their sum
    // (plus any adds whose outcome was reported unknown and did happen).
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut seen, mut unsure) = (Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match r.fetch_add(0, 1) {
                        Ok(v) => seen.push(v),
                        Err(remora_client::ClientError::OutcomeUnknown { .. }) => unsure += 1,
                        Err(e) => panic!("fetch_add: {e}"),
                    }
                }
                (seen, unsure)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let primary = r.map().slabs[0].addr.clone();
    let i = tc.servers.iter().position(|s| s.addr == primary).unwrap();
    tc.servers[i].signal("-KILL");
    wait_rebuilt(&tc, r.id(), 5);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut unsure = 0;
    for t in threads {
        let (seen, u) = t.join().unwrap();
        all.extend(seen);
        unsure += u;
    }
    all.sort_unstable();
    let n = all.len() as u64;
    assert!(n > 100, "only {n} adds");
    let before = all.len();
    all.dedup();
    assert_eq!(all.len(), before, "an add was ordered twice");
    let mut w = [0u8; 8];
    r.read(0, &mut w).unwrap();
    let v = u64::from_le_bytes(w);
    assert!(
        (n..=n + unsure).contains(&v),
        "counter {v} after {n} adds and {unsure} unsure ones"
    );
    assert!(all.iter().all(|&x| x < v));
    let n = v;
    // Every copy agrees: lose the new primary too, then the last copy.
    for _ in 0..2 {
        r.refresh().unwrap();
        let primary = r.map().slabs[0].addr.clone();
        let i = tc.servers.iter().position(|s| s.addr == primary).unwrap();
        let alive = alive(&tc.client());
        tc.servers[i].signal("-KILL");
        wait_rebuilt(&tc, r.id(), alive - 1);
        r.read(0, &mut w).unwrap();
        assert_eq!(u64::from_le_bytes(w), n, "a copy disagrees");
    }
}

#[test]
fn replicated_regions_take_async_and_batched_reads_and_writes() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = c
        .alloc_with(300_000, None, Redundancy::Replicate(3))
        .unwrap();
    let data = Rng(9).bytes(200_000);
    r.write_async(50_000, &data).wait().unwrap();
    assert!(r.read_async(50_000, data.len()).wait().unwrap() == data);
    let res = r
        .batch()
        .write(10, b"hello")
        .read(50_000, 16)
        .execute()
        .unwrap();
    assert_eq!(res.len(), 2);
    let mut a = [0u8; 5];
    let mut b = vec![0u8; 1000];
    r.read_vectored(&mut [(10, &mut a[..]), (60_000, &mut b[..])])
        .unwrap();
    assert_eq!(&a, b"hello");
    assert!(b[..] == data[10_000..11_000]);
    let e = r.batch().fetch_add(0, 1).execute().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unsupported), "{e}");
    let e = r.fetch_add_async(0, 1).wait().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unsupported), "{e}");
    let probe = tc.client();
    // Every copy got the writes: lose two of the three copies one after
    // the other and read through the last.
    for victim in [0, 1] {
        tc.servers[victim].signal("-KILL");
        // No spare server to rebuild on: the survivors serve.
        wait("the server to be declared dead", 20, || {
            alive(&probe) == 2 - victim
        });
        let mut got = vec![0u8; data.len()];
        r.read(50_000, &mut got).unwrap();
        assert!(got == data, "a copy missed a write");
    }
}
