//! What redundancy costs and what it buys: latency and throughput of
//! regions without redundancy, replicated and erasure-coded, side by side on
//! one cluster; reads while a server is dead and while its slabs are
//! rebuilt; rebuild time and traffic per GiB lost; memory overhead.
//!
//! `remora bench redundancy` runs this on an embedded cluster and kills
//! memory servers with SIGKILL through the `kill` callback.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use remora_client::{Cluster, Redundancy, Region};

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per region.
    pub region: u64,
    /// Operations per latency measurement.
    pub ops: usize,
    /// Bytes per random read or write.
    pub io: usize,
}

/// Healthy figures of one scheme.
#[derive(Debug, Clone)]
pub struct SchemeRow {
    /// The scheme.
    pub scheme: Redundancy,
    /// Slab bytes per region byte.
    pub memory: f64,
    /// Sequential 1 MiB writes, MB/s (one thread).
    pub write_mbps: f64,
    /// Sequential 1 MiB reads, MB/s (one thread).
    pub read_mbps: f64,
    /// Random writes of `io` bytes: p50 and p99, microseconds.
    pub write_us: (f64, f64),
    /// Random reads of `io` bytes: p50 and p99, microseconds.
    pub read_us: (f64, f64),
}

/// Reads through a server loss, and the rebuild.
#[derive(Debug, Clone)]
pub struct FailureRow {
    /// The scheme.
    pub scheme: Redundancy,
    /// Read p50/p99 (µs) and count: healthy, the server dead but not yet
    /// declared, its slabs marked lost and being rebuilt, rebuilt.
    pub phases: [(f64, f64, usize); 4],
    /// Slabs of the region lost with the server.
    pub lost_slabs: u64,
    /// Bytes lost.
    pub lost_bytes: u64,
    /// From the loss being declared to the region being whole.
    pub rebuild: Duration,
    /// Bytes the controller read and wrote to rebuild.
    pub moved_bytes: u64,
    /// Reads that failed (must be 0).
    pub errors: usize,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// Settings.
    pub opts: Options,
    /// Servers in the cluster.
    pub servers: usize,
    /// Slab size.
    pub slab_size: u64,
    /// Rebuild rate limit, bytes per second.
    pub rebuild_rate: u64,
    /// Healthy figures.
    pub schemes: Vec<SchemeRow>,
    /// Failure figures.
    pub failures: Vec<FailureRow>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A small xorshift generator (deterministic offsets).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}

fn fill(r: &Region, size: u64) -> Result<f64> {
    let chunk = 1usize << 20;
    let buf: Vec<u8> = (0..chunk).map(|i| (i * 31 + 7) as u8).collect();
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = chunk.min((size - off) as usize);
        r.write(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(size as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn stream_read(r: &Region, size: u64) -> Result<f64> {
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = chunk.min((size - off) as usize);
        r.read(off, &mut buf[..n])?;
        off += n as u64;
    }
    Ok(size as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn random_ops(r: &Region, o: &Options, write: bool, seed: u64) -> Result<(f64, f64)> {
    let mut rng = Rng(seed);
    let mut buf = vec![0x5au8; o.io];
    let mut lat = Vec::with_capacity(o.ops);
    let slots = o.region / o.io as u64;
    for _ in 0..o.ops {
        let off = rng.below(slots) * o.io as u64;
        let t = Instant::now();
        if write {
            r.write(off, &buf)?;
        } else {
            r.read(off, &mut buf)?;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
}

fn measure(c: &Cluster, o: &Options, scheme: Redundancy) -> Result<(SchemeRow, Region)> {
    let r = c
        .alloc_with(o.region, None, scheme)
        .with_context(|| format!("allocating a {scheme} region"))?;
    let m = r.map();
    let memory = (m.slabs.len() + m.extra.len()) as f64 * m.slab_size as f64 / o.region as f64;
    let write_mbps = fill(&r, o.region)?;
    let read_mbps = stream_read(&r, o.region)?;
    let write_us = random_ops(&r, o, true, 11)?;
    let read_us = random_ops(&r, o, false, 12)?;
    Ok((
        SchemeRow {
            scheme,
            memory,
            write_mbps,
            read_mbps,
            write_us,
            read_us,
        },
        r,
    ))
}

fn lost(c: &Cluster, id: u64) -> Option<u64> {
    c.list_regions()
        .ok()?
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| r.lost)
}

/// Kills the server of the region's first data slab and reads random
/// ranges until the region has been rebuilt.
fn through_failure(
    c: &Cluster,
    o: &Options,
    r: &Region,
    healthy: (f64, f64),
    kill: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<FailureRow> {
    let m = r.map();
    let victim = m.slabs[0].addr.clone();
    let on_victim = m.pieces().filter(|l| l.addr == victim).count() as u64;
    let before = c.status()?;
    // Phase: 1 dead, 2 rebuilding, 3 rebuilt.
    let phase = Arc::new(AtomicU8::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    kill(&victim)?;
    let killed = Instant::now();
    let watcher = {
        let (phase, stop, c, id) = (phase.clone(), stop.clone(), c.clone(), r.id());
        std::thread::spawn(move || -> (Option<Instant>, Option<Instant>) {
            let (mut declared, mut whole) = (None, None);
            while !stop.load(Ordering::Relaxed) {
                match lost(&c, id) {
                    Some(n) if n > 0 && declared.is_none() => {
                        declared = Some(Instant::now());
                        phase.store(2, Ordering::Relaxed);
                    }
                    Some(0) if declared.is_some() && whole.is_none() => {
                        whole = Some(Instant::now());
                        phase.store(3, Ordering::Relaxed);
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (declared, whole)
        })
    };
    let mut lat: [Vec<f64>; 3] = Default::default();
    let mut rng = Rng(99);
    let mut buf = vec![0u8; o.io];
    let slots = o.region / o.io as u64;
    let mut errors = 0;
    let mut rebuilt_at = None;
    loop {
        let p = phase.load(Ordering::Relaxed);
        if p == 3 {
            let at = *rebuilt_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_millis(500) {
                break;
            }
        }
        if killed.elapsed() > Duration::from_secs(120) {
            stop.store(true, Ordering::Relaxed);
            bail!("the region was not rebuilt within 120 s of the server's death");
        }
        let off = rng.below(slots) * o.io as u64;
        let t = Instant::now();
        match r.read(off, &mut buf) {
            Ok(()) => lat[p as usize - 1].push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => errors += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (declared, whole) = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
    let after = c.status()?;
    let rebuild = match (declared, whole) {
        (Some(d), Some(w)) => w - d,
        _ => Duration::ZERO,
    };
    let mut ph = [
        (healthy.0, healthy.1, o.ops),
        (0.0, 0.0, 0),
        (0.0, 0.0, 0),
        (0.0, 0.0, 0),
    ];
    for (i, v) in lat.iter_mut().enumerate() {
        ph[i + 1] = (pct(v, 0.5), pct(v, 0.99), v.len());
    }
    Ok(FailureRow {
        scheme: m.redundancy,
        phases: ph,
        lost_slabs: on_victim,
        lost_bytes: on_victim * m.slab_size,
        rebuild,
        moved_bytes: after.rebuilt_bytes.saturating_sub(before.rebuilt_bytes),
        errors,
    })
}

/// Runs the benchmark. `kill(addr)` must kill the memory server at `addr`
/// at once (SIGKILL); the cluster needs at least 8 servers (erasure 4+2
/// with a spare for rebuilding, after one server is already lost).
pub fn run(
    c: &Cluster,
    o: &Options,
    rebuild_rate: u64,
    kill: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Report> {
    let st = c.status()?;
    let servers = st.servers.iter().filter(|s| s.alive).count();
    if servers < 8 {
        bail!("the redundancy benchmark needs 8 live servers, the cluster has {servers}");
    }
    let ec = Redundancy::Erasure { data: 4, parity: 2 };
    let rep = Redundancy::Replicate(2);
    let mut schemes = Vec::new();
    let mut regions = Vec::new();
    for s in [Redundancy::None, rep, ec] {
        eprintln!("measuring {s} ...");
        let (row, r) = measure(c, o, s)?;
        schemes.push(row);
        regions.push(r);
    }
    // One loss per scheme, on a cluster holding only that scheme's region
    // (so the rebuild traffic is that region's alone).
    let mut failures = Vec::new();
    let healthy: Vec<(f64, f64)> = schemes.iter().map(|s| s.read_us).collect();
    let ids: Vec<u64> = regions.iter().map(|r| r.id()).collect();
    c.free_region(ids[0])?;
    c.free_region(ids[2])?;
    eprintln!("killing a server under the {rep} region ...");
    failures.push(through_failure(c, o, &regions[1], healthy[1], kill)?);
    c.free_region(ids[1])?;
    let (_, r) = measure(c, o, ec)?;
    eprintln!("killing a server under the {ec} region ...");
    failures.push(through_failure(c, o, &r, healthy[2], kill)?);
    c.free_region(r.id())?;
    Ok(Report {
        opts: o.clone(),
        servers,
        slab_size: st.slab_size,
        rebuild_rate,
        schemes,
        failures,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "Redundancy: {} servers on loopback, {:.0} MiB regions, {} B random ops ({} per figure), slabs of {:.0} MiB, one client thread",
            self.servers,
            mib(self.opts.region),
            self.opts.io,
            self.opts.ops,
            mib(self.slab_size)
        )?;
        writeln!(
            f,
            "{:<13} {:>7} {:>11} {:>10} {:>18} {:>18}",
            "scheme", "memory", "write MB/s", "read MB/s", "write p50/p99 us", "read p50/p99 us"
        )?;
        for s in &self.schemes {
            writeln!(
                f,
                "{:<13} {:>6.2}x {:>11.0} {:>10.0} {:>18} {:>18}",
                s.scheme.to_string(),
                s.memory,
                s.write_mbps,
                s.read_mbps,
                format!("{:.0} / {:.0}", s.write_us.0, s.write_us.1),
                format!("{:.0} / {:.0}", s.read_us.0, s.read_us.1),
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Reads through the SIGKILL of the server holding slab 0, p50 / p99 us (reads):"
        )?;
        writeln!(
            f,
            "{:<13} {:>18} {:>24} {:>22} {:>18} {:>7}",
            "scheme", "healthy", "dead, not yet declared", "lost, rebuilding", "rebuilt", "errors"
        )?;
        for r in &self.failures {
            let cell = |p: (f64, f64, usize)| {
                if p.2 == 0 {
                    "-".to_string()
                } else {
                    format!("{:.0} / {:.0} ({})", p.0, p.1, p.2)
                }
            };
            writeln!(
                f,
                "{:<13} {:>18} {:>24} {:>22} {:>18} {:>7}",
                r.scheme.to_string(),
                format!("{:.0} / {:.0}", r.phases[0].0, r.phases[0].1),
                cell(r.phases[1]),
                cell(r.phases[2]),
                cell(r.phases[3]),
                r.errors
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Rebuild (rate limit {:.0} MiB/s):",
            mib(self.rebuild_rate)
        )?;
        for r in &self.failures {
            let gib = r.lost_bytes as f64 / (1u64 << 30) as f64;
            writeln!(
                f,
                "{:<13} {} slabs ({:.0} MiB) lost, rebuilt in {:.2} s = {:.1} s per GiB lost; {:.1} GiB read+written per GiB lost",
                r.scheme.to_string(),
                r.lost_slabs,
                mib(r.lost_bytes),
                r.rebuild.as_secs_f64(),
                if gib > 0.0 { r.rebuild.as_secs_f64() / gib } else { f64::NAN },
                if r.lost_bytes > 0 { r.moved_bytes as f64 / r.lost_bytes as f64 } else { f64::NAN },
            )?;
        }
        Ok(())
    }
}
