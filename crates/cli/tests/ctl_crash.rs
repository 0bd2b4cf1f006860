//! The controller killed in the middle of its multi-step changes (a
//! rebuild, a slab move) and restarted with the same data directory and
//! flags, with real processes: afterwards every slab of replicated and
//! erasure-coded regions takes writes and reads (checked against a shadow
//! copy; writer threads keep writing through the crash and restart), and a
//! second server failure is rebuilt. Also what `remora status`
//! and `remora region show` say about a server that died while the
//! controller was down.
//!
//! The controller's test hook `REMORA_TEST_PAUSE_AT` stops it at a named
//! step; `REMORA_TEST_PAUSE_MARK` names a file it writes when there.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Opts, Rng, TestCluster};
use remora_client::{ClientOptions, Cluster, Redundancy};

const SLAB: u64 = 64 << 10;
/// Region size: 8 slabs.
const SIZE: u64 = 8 * SLAB;
const SERVERS: usize = 5;

fn client(tc: &TestCluster) -> Cluster {
    Cluster::connect_with(
        &tc.controller_addr,
        common::TOKEN,
        ClientOptions {
            failover_timeout: Duration::from_secs(15),
            ..ClientOptions::default()
        },
    )
    .expect("connect")
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A region and what it must hold.
struct Shadowed {
    name: &'static str,
    shadow: Vec<u8>,
}

/// Allocates a region and fills it with random bytes.
fn create(c: &Cluster, name: &'static str, redundancy: Redundancy, rng: &mut Rng) -> Shadowed {
    let r = c
        .alloc_with(SIZE, Some(name), redundancy)
        .expect("allocate");
    let shadow = rng.bytes(SIZE as usize);
    r.write(0, &shadow).expect("fill");
    Shadowed { name, shadow }
}

/// Writes 4 KiB into every data slab of each region (so every copy or
/// parity piece is written too) and reads each region back whole.
fn exercise(c: &Cluster, regions: &mut [Shadowed], rng: &mut Rng) {
    for s in regions.iter_mut() {
        let r = c.open_region(s.name).expect("open");
        for i in 0..SIZE / SLAB {
            let off = i * SLAB + rng.below(SLAB - 4096) / 64 * 64;
            let d = rng.bytes(4096);
            if let Err(e) = r.write(off, &d) {
                panic!("writing slab {i} of {}: {e}", s.name);
            }
            s.shadow[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        let mut got = vec![0u8; SIZE as usize];
        r.read(0, &mut got)
            .unwrap_or_else(|e| panic!("reading {}: {e}", s.name));
        let bad = got.iter().zip(&s.shadow).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{} differs from its shadow in {bad} bytes", s.name);
    }
}

/// A client thread writing 4 KiB at random offsets of a region, one write
/// after another, through the faults and restarts; every write must
/// succeed (within the failover timeout).
struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<WriteLog, String>>,
}

/// Acknowledged writes, in order: offset and bytes.
type WriteLog = Vec<(u64, Vec<u8>)>;

impl Writer {
    fn start(tc: &TestCluster, name: &'static str, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let c = client(tc);
        let r = c.open_region(name).expect("open");
        let halt = stop.clone();
        let handle = std::thread::spawn(move || {
            let _c = c;
            let mut rng = Rng(seed);
            let mut log = Vec::new();
            while !halt.load(Ordering::Relaxed) {
                let off = rng.below(SIZE - 4096) / 64 * 64;
                let d = rng.bytes(4096);
                r.write(off, &d)
                    .map_err(|e| format!("writing {name} at {off}: {e}"))?;
                log.push((off, d));
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(log)
        });
        Writer { stop, handle }
    }

    /// Stops the thread and applies what it wrote to the shadow.
    fn finish(self, s: &mut Shadowed) {
        self.stop.store(true, Ordering::Relaxed);
        let log = match self.handle.join() {
            Ok(Ok(log)) => log,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the writer of {} panicked", s.name),
        };
        assert!(!log.is_empty(), "the writer of {} wrote nothing", s.name);
        for (off, d) in log {
            s.shadow[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
    }
}

fn writers(tc: &TestCluster, rs: &[Shadowed], seed: u64) -> Vec<Writer> {
    rs.iter()
        .enumerate()
        .map(|(i, s)| Writer::start(tc, s.name, seed * 100 + i as u64))
        .collect()
}

fn finish(ws: Vec<Writer>, rs: &mut [Shadowed]) {
    for (w, s) in ws.into_iter().zip(rs.iter_mut()) {
        w.finish(s);
    }
}

/// `alive` servers serve, none is waited for, no region has a slab lost
/// or at risk.
fn healthy(c: &Cluster, alive: usize) -> bool {
    c.status().is_ok_and(|s| {
        s.servers.iter().filter(|s| s.alive).count() == alive
            && !s.servers.iter().any(|s| s.waiting)
            && s.regions.iter().all(|r| r.lost == 0 && r.at_risk == 0)
    })
}

/// Index of a live server holding pieces of every named region (or of the
/// first, if none holds pieces of all).
fn victim(tc: &TestCluster, c: &Cluster, names: &[&str], dead: &[usize]) -> usize {
    let maps: Vec<_> = names
        .iter()
        .map(|n| c.open_region(n).expect("open").map())
        .collect();
    let holds = |i: usize, m: &remora_proto::ctl::RegionMap| {
        m.pieces().any(|l| !l.lost && l.addr == tc.servers[i].addr)
    };
    let live = || (0..tc.servers.len()).filter(|i| !dead.contains(i));
    live()
        .find(|&i| maps.iter().all(|m| holds(i, m)))
        .or_else(|| live().find(|&i| holds(i, &maps[0])))
        .expect("a server with pieces")
}

fn mark_path(tc: &TestCluster) -> PathBuf {
    tc.dir.path().join("paused-at")
}

/// Restarts the controller with the test hook set to `step`.
fn restart_with_hook(tc: &mut TestCluster, step: &str) {
    let mark = mark_path(tc);
    tc.kill_controller();
    tc.start_controller_env(&[
        ("REMORA_TEST_PAUSE_AT", step),
        ("REMORA_TEST_PAUSE_MARK", common::path_str(&mark)),
    ]);
    tc.wait_alive(tc.servers.len());
}

/// Waits for the controller to stop at `step`, then kills it and starts it
/// again without the hook.
fn kill_at(tc: &mut TestCluster, step: &str) {
    let mark: &Path = &mark_path(tc);
    wait(&format!("the controller to reach {step}"), 30, || {
        std::fs::read_to_string(mark).is_ok_and(|s| s == step)
    });
    tc.kill_controller();
    tc.start_controller();
}

/// Regions for the crash tests: a replicate:3 and an erasure:2+1 region,
/// in the order given (rebuilds run in region order, so the first is the
/// one caught at the step).
fn regions(c: &Cluster, ec_first: bool, rng: &mut Rng) -> Vec<Shadowed> {
    let ec = ("ec", Redundancy::Erasure { data: 2, parity: 1 });
    let rep = ("rep", Redundancy::Replicate(3));
    let order = if ec_first { [ec, rep] } else { [rep, ec] };
    order
        .into_iter()
        .map(|(n, red)| create(c, n, red, rng))
        .collect()
}

/// Kills a server, stops the controller at `step` of the rebuild that
/// follows, restarts it; checks every slab, then survives a second loss.
fn rebuild_crash(step: &str, ec_first: bool, seed: u64) {
    let mut tc = TestCluster::start(Opts {
        servers: SERVERS,
        // The restarted controller's join alone must put things right.
        reconcile_interval: "3600s",
        ..Opts::default()
    });
    let mut rng = Rng(seed);
    let mut rs = regions(&client(&tc), ec_first, &mut rng);
    restart_with_hook(&mut tc, step);
    let c = client(&tc);
    let names: Vec<&str> = rs.iter().map(|s| s.name).collect();
    let first = victim(&tc, &c, &names, &[]);
    let ws = writers(&tc, &rs, seed);
    tc.servers[first].signal("-KILL");
    kill_at(&mut tc, step);
    let c = client(&tc);
    wait("the rebuild after the restart", 30, || {
        healthy(&c, SERVERS - 1)
    });
    finish(ws, &mut rs);
    exercise(&c, &mut rs, &mut rng);
    // A second failure is rebuilt too.
    let second = victim(&tc, &c, &names, &[first]);
    tc.servers[second].signal("-KILL");
    wait("the second rebuild", 30, || healthy(&c, SERVERS - 2));
    exercise(&c, &mut rs, &mut rng);
}

#[test]
fn controller_killed_after_creating_the_rebuilt_slab() {
    rebuild_crash("rebuild:after_create", false, 1);
}

#[test]
fn controller_killed_after_freezing_the_survivors() {
    rebuild_crash("rebuild:after_freeze", true, 2);
}

#[test]
fn controller_killed_after_copying_the_lost_slab() {
    rebuild_crash("rebuild:after_copy", false, 3);
}

#[test]
fn controller_killed_after_switching_a_replicated_map() {
    rebuild_crash("rebuild:after_switch", false, 4);
}

#[test]
fn controller_killed_after_switching_an_erasure_coded_map() {
    rebuild_crash("rebuild:after_switch", true, 5);
}

#[test]
fn controller_killed_after_rekeying_one_survivor() {
    rebuild_crash("rebuild:after_first_thaw", false, 6);
}

/// Stops the controller at `step` of moving a slab of the replicated
/// region, restarts it; checks every slab, then survives a server loss.
fn move_crash(step: &'static str, seed: u64) {
    let mut tc = TestCluster::start(Opts {
        servers: SERVERS,
        reconcile_interval: "3600s",
        ..Opts::default()
    });
    let mut rng = Rng(seed);
    let mut rs = regions(&client(&tc), false, &mut rng);
    restart_with_hook(&mut tc, step);
    let ws = writers(&tc, &rs, seed);
    let addr = tc.controller_addr.clone();
    // The move's caller loses its controller mid-call; its outcome does
    // not matter.
    std::thread::spawn(move || {
        if let Ok(c) = Cluster::connect(&addr, common::TOKEN) {
            if let Ok(r) = c.open_region("rep") {
                let _ = c.move_slab(r.id(), 1, None);
            }
        }
    });
    kill_at(&mut tc, step);
    let c = client(&tc);
    wait("the servers to rejoin", 30, || healthy(&c, SERVERS));
    finish(ws, &mut rs);
    exercise(&c, &mut rs, &mut rng);
    let names: Vec<&str> = rs.iter().map(|s| s.name).collect();
    let v = victim(&tc, &c, &names, &[]);
    tc.servers[v].signal("-KILL");
    wait("the rebuild", 30, || healthy(&c, SERVERS - 1));
    exercise(&c, &mut rs, &mut rng);
}

#[test]
fn controller_killed_after_creating_a_moved_slab() {
    move_crash("move:after_create", 11);
}

#[test]
fn controller_killed_after_copying_a_moved_slab() {
    move_crash("move:after_copy", 12);
}

#[test]
fn controller_killed_after_switching_a_moved_slab() {
    move_crash("move:after_switch", 13);
}

/// A rekey lost without a controller crash (every thaw of a rebuild's
/// survivors dropped): reconciliation finds the survivors frozen with keys
/// unlike their maps' and thaws them with the maps' keys.
#[test]
fn reconciliation_repairs_survivors_a_rebuild_left_frozen_with_old_keys() {
    let mut tc = TestCluster::start(Opts {
        servers: SERVERS,
        ..Opts::default()
    });
    let mut rng = Rng(21);
    let mut rs = regions(&client(&tc), false, &mut rng);
    restart_with_hook(&mut tc, "rebuild:drop_thaw");
    let c = client(&tc);
    let names: Vec<&str> = rs.iter().map(|s| s.name).collect();
    let v = victim(&tc, &c, &names, &[]);
    tc.servers[v].signal("-KILL");
    wait("the rebuild", 30, || healthy(&c, SERVERS - 1));
    exercise(&c, &mut rs, &mut rng);
}

/// Lines of `out` that mention `addr`.
fn lines_of<'a>(out: &'a str, addr: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.contains(addr)).collect()
}

#[test]
fn a_server_lost_while_the_controller_is_down_is_shown_waiting_and_at_risk() {
    let mut tc = TestCluster::start(Opts {
        servers: 4,
        // Long enough to look at the waiting state.
        dead_after: "5s",
        ..Opts::default()
    });
    let mut rng = Rng(31);
    let c = client(&tc);
    let mut rs = vec![create(&c, "w", Redundancy::Replicate(2), &mut rng)];
    let v = victim(&tc, &c, &["w"], &[]);
    let vaddr = tc.servers[v].addr.clone();
    tc.kill_controller();
    tc.servers[v].signal("-KILL");
    tc.start_controller();

    // Not yet declared dead: waited for, its pieces at risk, not lost.
    let c = client(&tc);
    let s = c.status().expect("status");
    let sv = s
        .servers
        .iter()
        .find(|s| s.addr == vaddr)
        .expect("the lost server is listed");
    assert!(sv.waiting && !sv.alive, "{sv:?}");
    let r = &s.regions[0];
    assert!(r.at_risk > 0 && r.lost == 0, "{r:?}");
    let out = tc.remora(&["status"]).output().expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = lines_of(&text, &vaddr);
    assert!(
        line.len() == 1 && line[0].contains("waiting (") && !line[0].contains("dead"),
        "{text}"
    );
    assert!(
        text.contains("at risk") && text.contains("AT RISK"),
        "{text}"
    );
    let out = tc.remora(&["region", "show", "w"]).output().expect("show");
    let text = String::from_utf8_lossy(&out.stdout);
    let pieces = lines_of(&text, &vaddr);
    assert!(
        !pieces.is_empty() && pieces.iter().all(|l| l.contains("at risk: server waiting")),
        "{text}"
    );
    assert!(text.contains("NOT HEALTHY"), "{text}");

    // Then declared dead, its slabs lost and rebuilt elsewhere.
    wait("the server to be declared dead", 30, || {
        c.status().is_ok_and(|s| {
            s.servers
                .iter()
                .any(|s| s.addr == vaddr && !s.alive && !s.waiting)
        })
    });
    let out = tc.remora(&["status"]).output().expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = lines_of(&text, &vaddr);
    assert!(line.len() == 1 && line[0].contains("dead"), "{text}");
    wait("the rebuild", 30, || healthy(&c, 3));
    let out = tc.remora(&["region", "show", "w"]).output().expect("show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("at risk") && !text.contains("NOT HEALTHY") && !text.contains(&vaddr),
        "{text}"
    );
    exercise(&c, &mut rs, &mut rng);
}

/// A controller killed mid-rebuild at a random moment, with no test hook:
/// a replicate:3 region of 48 slabs on 7 servers, rebuilt at 16 MiB/s; the
/// controller is killed within 0.8 s of the server being declared dead,
/// restarted, and every slab written. Timing decides which step each trial
/// hits (the tests above hit each one for sure), so this is a smoke test
/// of the whole path. Slow (six trials, about 30 s); run with `--ignored`.
#[test]
#[ignore]
fn controller_killed_at_random_moments_of_a_paced_rebuild() {
    for trial in 0..6u64 {
        let mut tc = TestCluster::start(Opts {
            servers: 7,
            capacity: "64MiB",
            slab: "1MiB",
            controller_config: "rebuild_rate = \"16MiB\"".into(),
            // Only the restarted controller's join puts keys right.
            reconcile_interval: "3600s",
            ..Opts::default()
        });
        let mut rng = Rng(100 + trial);
        let c = client(&tc);
        let size = 48u64 << 20;
        let r = c
            .alloc_with(size, Some("big"), Redundancy::Replicate(3))
            .expect("allocate");
        let mut shadow = rng.bytes(size as usize);
        r.write(0, &shadow).expect("fill");
        let v = victim(&tc, &c, &["big"], &[]);
        let vaddr = tc.servers[v].addr.clone();
        tc.servers[v].signal("-KILL");
        wait("the server to be declared dead", 30, || {
            c.status()
                .is_ok_and(|s| s.servers.iter().all(|s| s.addr != vaddr || !s.alive))
        });
        std::thread::sleep(Duration::from_millis(rng.below(800)));
        tc.kill_controller();
        tc.start_controller();
        let c = client(&tc);
        wait("the rebuild after the restart", 60, || healthy(&c, 6));
        let r = c.open_region("big").expect("open");
        for i in 0..size >> 20 {
            let off = (i << 20) + rng.below((1 << 20) - 4096);
            let d = rng.bytes(4096);
            if let Err(e) = r.write(off, &d) {
                panic!("trial {trial}: writing slab {i}: {e}");
            }
            shadow[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        let mut got = vec![0u8; size as usize];
        r.read(0, &mut got).expect("read");
        assert!(
            got == shadow,
            "trial {trial}: region differs from its shadow"
        );
    }
}
