//! The peers of `remora bench`: Redis and memcached run the key-value
//! workload to the same digest as the all-local run; zram swap under a
//! cgroup memory limit runs a command that does not fit the limit.
//!
//! Without `redis-server` or `memcached` installed (Debian packages
//! redis-server, memcached) the key-value tests print "skipped" and pass,
//! unless `REMORA_REQUIRE_PEERS=1`. Without root, the zram module or the
//! cgroup v1 memory controller the zram test checks that the error says
//! what is missing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use remora_bench::suite::peers::{kv_peer, Unavailable, ZramSwap};
use remora_bench::suite::wl::kv::{run_store, KvParams, PlainStore, LAT_SAMPLE};
use remora_bench::suite::Interface;

/// One server at a time, so that each test can check that its server is
/// gone afterwards.
static SERIAL: Mutex<()> = Mutex::new(());

fn require_peers() -> bool {
    std::env::var("REMORA_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Children of this process running `name`.
fn children_named(name: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me && name.starts_with(comm)).then_some(pid)
    })
    .collect()
}

fn server_of(kind: Interface) -> &'static str {
    match kind {
        Interface::Redis | Interface::RedisPipelined => "redis-server",
        _ => "memcached",
    }
}

/// Runs `kind` at `p`; None when the server is not installed (and that is
/// allowed).
fn run_peer(kind: Interface, p: &KvParams) -> Option<remora_bench::suite::wl::Outcome> {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r = kv_peer(kind, p);
    let left = children_named(server_of(kind));
    assert!(left.is_empty(), "{kind}: servers left running: {left:?}");
    match r {
        Ok(o) => Some(o),
        Err(e) if e.downcast_ref::<Unavailable>().is_some() && !require_peers() => {
            println!("skipped: {kind}: {e:#}");
            None
        }
        Err(e) => panic!("{kind}: {e:#}"),
    }
}

fn same_digest(kind: Interface) {
    let p = KvParams::new(0.99, 0.01, 7);
    let local = run_store(&p, &mut PlainStore(HashMap::new()), false).unwrap();
    let Some(o) = run_peer(kind, &p) else {
        return;
    };
    assert_eq!(
        o.digest, local.digest,
        "{kind}: digest differs from all-local"
    );
    assert_ne!(o.digest, 0);
    assert_eq!(o.ops, p.ops);
    assert_eq!(o.lat_us.len() as u64, p.ops.div_ceil(LAT_SAMPLE), "{kind}");
    assert!(o.secs > 0.0 && o.lat_us.iter().all(|l| *l > 0.0));
    println!(
        "{kind}: {:.0} ops/s at {} keys, {} ops",
        o.ops as f64 / o.secs,
        p.keys,
        p.ops
    );
}

#[test]
fn redis_same_digest() {
    same_digest(Interface::Redis);
}

#[test]
fn redis_pipelined_same_digest() {
    same_digest(Interface::RedisPipelined);
}

#[test]
fn memcached_same_digest() {
    same_digest(Interface::Memcached);
}

#[test]
fn memcached_pipelined_same_digest() {
    same_digest(Interface::MemcachedPipelined);
}

#[test]
fn other_interfaces_are_refused() {
    let p = KvParams::new(0.99, 0.001, 7);
    for kind in [Interface::Local, Interface::Zram, Interface::Objects] {
        let e = kv_peer(kind, &p).unwrap_err();
        assert!(e.to_string().contains("not a key-value peer"), "{e:#}");
    }
}

/// Throughput and latency of each peer at a quarter of the suite's size
/// (262k keys, 100k operations). `cargo test --release -p remora-bench
/// --test peers -- --ignored --nocapture`.
#[test]
#[ignore = "figures, not a check"]
fn figures() {
    let p = KvParams::new(0.99, 0.25, 42);
    let local = run_store(&p, &mut PlainStore(HashMap::new()), false).unwrap();
    println!(
        "local: {:.0} ops/s ({} keys, {} ops)",
        local.ops as f64 / local.secs,
        p.keys,
        p.ops
    );
    for kind in [
        Interface::Redis,
        Interface::RedisPipelined,
        Interface::Memcached,
        Interface::MemcachedPipelined,
    ] {
        let Some(o) = run_peer(kind, &p) else {
            continue;
        };
        assert_eq!(o.digest, local.digest, "{kind}");
        let mut lat = o.lat_us.clone();
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
        println!(
            "{kind}: {:.0} ops/s, latency p50 {:.1} us, p99 {:.1} us",
            o.ops as f64 / o.secs,
            pct(0.5),
            pct(0.99)
        );
    }
}

/// The shell script run under the limit: waits for "go", prints its
/// cgroup's limit, holds 64 MB in a shell variable (about twice that in
/// the shell), prints the variable's length and the cgroup's swap use.
const HOG: &str = r#"read go; [ "$go" = go ] || exit 9
cg=/sys/fs/cgroup/memory$(grep -E '^[0-9]+:memory:' /proc/self/cgroup | cut -d: -f3)
cat "$cg/memory.limit_in_bytes"
x=$(head -c 64000000 /dev/zero | tr '\0' a)
echo ${#x}
grep '^swap ' "$cg/memory.stat" || true"#;

fn sh(script: &str) -> std::process::Command {
    let mut c = std::process::Command::new("sh");
    c.args(["-c", script]);
    c
}

#[test]
fn zram_swap_or_clear_error() {
    let mut zram = match ZramSwap::setup(256 << 20) {
        Ok(z) => z,
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                e.downcast_ref::<Unavailable>().is_some() || msg.contains("zram"),
                "unclear error: {msg}"
            );
            println!("skipped: zram swap unavailable: {msg}");
            return;
        }
    };
    let dev = zram.device();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    assert!(swaps.contains(&dev), "{dev} not in /proc/swaps:\n{swaps}");

    let limit = 32u64 << 20;
    let out = zram.run_limited(limit, sh(HOG)).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(limit.to_string().as_str()), "{out}");
    assert_eq!(lines.next(), Some("64000000"), "{out}");
    match lines.next().and_then(|l| l.strip_prefix("swap ")) {
        Some(n) => {
            let n: u64 = n.trim().parse().unwrap();
            assert!(n > 0, "nothing swapped under the limit: {out}");
        }
        None => println!("no swap accounting in the cgroup; output {out:?}"),
    }

    let e = zram
        .run_limited(limit, sh("read x; echo boom >&2; exit 3"))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("exit status 3") && msg.contains("boom"),
        "{msg}"
    );

    zram.set_timeout(Duration::from_millis(500));
    let t = std::time::Instant::now();
    let e = zram
        .run_limited(limit, sh("read x; sleep 60; echo late"))
        .unwrap_err();
    assert!(format!("{e:#}").contains("still running"), "{e:#}");
    assert!(t.elapsed() < Duration::from_secs(20));

    let sys = format!("/sys/block/{}", dev.trim_start_matches("/dev/"));
    drop(zram);
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    assert!(!swaps.contains(&dev), "{dev} still swapping:\n{swaps}");
    assert!(!std::path::Path::new(&sys).exists(), "{sys} still there");
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/memory")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("remora-bench-{}-", std::process::id()))
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}
