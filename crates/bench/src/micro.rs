//! Region read/write against raw loopback TCP, side by side in one run.
//!
//! The raw baseline is the best a request/response protocol can do on this
//! machine: a server thread that reads whatever requests have arrived,
//! answers them all with one write, and a client that sends a fixed-size
//! request and reads a fixed-size reply, over the same loopback TCP with
//! `TCP_NODELAY`. Remora's figures are region operations through the client
//! runtime against a real memory server process. Requests carry the same
//! payload sizes (64 B or 4 KiB), so the ratio is the cost of the protocol
//! and the runtime.

use std::collections::VecDeque;
use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use remora_client::{Cluster, Region};
use remora_net::LatencyInjector;

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct MicroOptions {
    /// Pid of the memory server process, to report the CPU it used.
    pub server_pid: Option<u32>,
    /// Client threads in the concurrent measurement.
    pub clients: usize,
    /// Operations per measurement.
    pub ops: usize,
    /// Requests in flight in the pipelined measurements.
    pub window: usize,
    /// Delay injected on receipt, on both sides, for both raw and Remora.
    pub inject_latency: Duration,
    /// Tenant token (the concurrent clients connect on their own).
    pub token: String,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// One operation measured both ways.
#[derive(Debug, Clone)]
pub struct Row {
    /// Operation, e.g. "read 4 KiB".
    pub name: String,
    /// Raw TCP latency, one in flight.
    pub raw_lat: Latency,
    /// Remora latency, one in flight.
    pub remora_lat: Latency,
    /// Raw ops/s, one in flight.
    pub raw_ops1: f64,
    /// Remora ops/s, one in flight.
    pub remora_ops1: f64,
    /// Raw ops/s, `window` in flight.
    pub raw_opsw: f64,
    /// Remora ops/s, `window` in flight.
    pub remora_opsw: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone)]
pub struct Report {
    /// Settings used.
    pub opts: MicroOptions,
    /// One row per operation.
    pub rows: Vec<Row>,
    /// Several clients at once.
    pub concurrent: Concurrent,
}

/// Aggregate throughput of several clients, each with its own connection
/// and `window` 4 KiB reads in flight.
#[derive(Debug, Clone)]
pub struct Concurrent {
    /// Number of client threads.
    pub clients: usize,
    /// Raw TCP ops/s, all clients together.
    pub raw_ops: f64,
    /// Remora ops/s, all clients together.
    pub remora_ops: f64,
    /// CPU cores the memory server process used meanwhile (from /proc).
    pub server_cores: Option<f64>,
}

#[derive(Clone, Copy)]
enum Op {
    Read(usize),
    Write(usize),
}

impl Op {
    fn name(self) -> String {
        match self {
            Op::Read(n) => format!("read {}", remora_proto::size::Bytes(n as u64)),
            Op::Write(n) => format!("write {}", remora_proto::size::Bytes(n as u64)),
        }
    }

    /// (request bytes, reply bytes) of the raw equivalent.
    fn raw_sizes(self) -> (usize, usize) {
        match self {
            Op::Read(n) => (64, n),
            Op::Write(n) => (n + 64, 64),
        }
    }
}

/// Rounds each measurement is split into (alternating raw and Remora).
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentiles(mut v: Vec<u64>) -> Latency {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    Latency {
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// Runs the benchmark on `cluster` (which should have one server for a fair
/// comparison) against the raw server at `raw_addr` (see [`serve_raw`]).
pub fn run(cluster: &Cluster, opts: &MicroOptions, raw_addr: &str) -> Result<Report> {
    let name = format!("bench-micro-{:08x}", rand_u32());
    let region = cluster
        .alloc_named(&name, 64 << 20)
        .context("allocating the benchmark region")?;
    region
        .write(0, &vec![0xA5; 64 << 20])
        .context("filling the region")?;
    let raw = RawServer {
        addr: raw_addr.to_string(),
    };
    let mut rows = Vec::new();
    for op in [
        Op::Read(64),
        Op::Write(64),
        Op::Read(4096),
        Op::Write(4096),
        Op::Read(65536),
    ] {
        let mut raw_client = raw.connect(opts.inject_latency)?;
        // Alternate raw and Remora in rounds so that drift in the machine's
        // load (it is shared) hits both sides alike.
        let per = (opts.ops / ROUNDS).max(50);
        let (mut raw_s, mut rem_s) = (Vec::new(), Vec::new());
        let (mut raw_t, mut rem_t) = (0.0, 0.0);
        let (mut raw_w, mut rem_w) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let (s, t) = raw_client.latency(op, per)?;
            raw_s.extend(s);
            raw_t += t;
            let (s, t) = remora_latency(&region, op, per)?;
            rem_s.extend(s);
            rem_t += t;
            raw_w.push(raw_client.pipelined(op, per, opts.window)?);
            rem_w.push(remora_pipelined(&region, op, per, opts.window)?);
        }
        let total = (per * ROUNDS) as f64;
        let (raw_lat, raw_ops1) = (percentiles(raw_s), total / raw_t);
        let (remora_lat, remora_ops1) = (percentiles(rem_s), total / rem_t);
        let (raw_opsw, remora_opsw) = (median(raw_w), median(rem_w));
        rows.push(Row {
            name: op.name(),
            raw_lat,
            remora_lat,
            raw_ops1,
            remora_ops1,
            raw_opsw,
            remora_opsw,
        });
    }
    let concurrent = concurrent(cluster, &name, &raw, opts)?;
    cluster.free_region(region.id())?;
    Ok(Report {
        opts: opts.clone(),
        rows,
        concurrent,
    })
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id()
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn concurrent(
    cluster: &Cluster,
    name: &str,
    raw: &RawServer,
    opts: &MicroOptions,
) -> Result<Concurrent> {
    let clients = opts.clients.max(1);
    let per = (opts.ops / clients).max(100);
    let op = Op::Read(4096);
    let run_raw = || -> Result<f64> {
        let start = Instant::now();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..clients)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        let mut c = raw.connect(opts.inject_latency)?;
                        c.pipelined(op, per, opts.window)?;
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("raw client thread panicked"))??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok((clients * per) as f64 / start.elapsed().as_secs_f64())
    };
    let controller = cluster.controller().to_string();
    let token = opts.token.clone();
    let run_remora = || -> Result<(f64, Option<f64>)> {
        // Each client its own cluster handle, hence its own connection.
        let regions: Vec<Region> = (0..clients)
            .map(|_| Cluster::connect(&controller, &token).and_then(|c| c.open_region(name)))
            .collect::<Result<_, _>>()?;
        let cpu0 = opts.server_pid.and_then(cpu_seconds);
        let start = Instant::now();
        std::thread::scope(|s| {
            let hs: Vec<_> = regions
                .iter()
                .map(|r| s.spawn(move || remora_pipelined(r, op, per, opts.window)))
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        let secs = start.elapsed().as_secs_f64();
        let cores = match (cpu0, opts.server_pid.and_then(cpu_seconds)) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        };
        Ok(((clients * per) as f64 / secs, cores))
    };
    let mut raw_v = Vec::new();
    let mut rem_v = Vec::new();
    let mut cores_v = Vec::new();
    for _ in 0..3 {
        raw_v.push(run_raw()?);
        let (ops, cores) = run_remora()?;
        rem_v.push(ops);
        cores_v.extend(cores);
    }
    Ok(Concurrent {
        clients,
        raw_ops: median(raw_v),
        remora_ops: median(rem_v),
        server_cores: if cores_v.is_empty() {
            None
        } else {
            Some(median(cores_v))
        },
    })
}

fn offsets(op: Op, n: usize) -> impl Iterator<Item = u64> {
    let size = match op {
        Op::Read(s) | Op::Write(s) => s as u64,
    };
    let slots = (64u64 << 20) / size;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % slots) * size
    })
}

/// Latency samples (ns) of `ops` operations one at a time, and the seconds they took.
fn remora_latency(region: &Region, op: Op, ops: usize) -> Result<(Vec<u64>, f64)> {
    let mut buf = vec![
        0u8;
        match op {
            Op::Read(n) | Op::Write(n) => n,
        }
    ];
    let mut lat = Vec::with_capacity(ops);
    // Warm-up: connections, caches, branch predictors.
    for off in offsets(op, ops / 10) {
        match op {
            Op::Read(_) => region.read(off, &mut buf)?,
            Op::Write(_) => region.write(off, &buf)?,
        }
    }
    let start = Instant::now();
    for off in offsets(op, ops) {
        let t = Instant::now();
        match op {
            Op::Read(_) => region.read(off, &mut buf)?,
            Op::Write(_) => region.write(off, &buf)?,
        }
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((lat, secs))
}

fn remora_pipelined(region: &Region, op: Op, ops: usize, window: usize) -> Result<f64> {
    let data = vec![
        0x5Au8;
        match op {
            Op::Read(n) | Op::Write(n) => n,
        }
    ];
    let run = |n: usize| -> Result<f64> {
        let start = Instant::now();
        match op {
            Op::Read(len) => {
                let mut q = VecDeque::with_capacity(window);
                for off in offsets(op, n) {
                    if q.len() == window {
                        if let Some(f) = q.pop_front() {
                            let f: remora_client::ReadFuture = f;
                            f.wait()?;
                        }
                    }
                    q.push_back(region.read_async(off, len));
                }
                for f in q {
                    f.wait()?;
                }
            }
            Op::Write(_) => {
                let mut q = VecDeque::with_capacity(window);
                for off in offsets(op, n) {
                    if q.len() == window {
                        if let Some(f) = q.pop_front() {
                            let f: remora_client::OpFuture<()> = f;
                            f.wait()?;
                        }
                    }
                    q.push_back(region.write_async(off, &data));
                }
                for f in q {
                    f.wait()?;
                }
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    run(ops / 10)?;
    run(ops)
}

/// A raw request/response TCP server.
struct RawServer {
    addr: String,
}

/// Serves the raw baseline protocol on `l` forever, one thread per connection
/// (like the memory server). Run it in its own process, as the memory server
/// is, so that both sides of the comparison pay the same scheduling costs.
pub fn serve_raw(l: TcpListener, inject_latency: Duration) {
    let latency = LatencyInjector::new(inject_latency);
    for s in l.incoming().flatten() {
        std::thread::spawn(move || raw_serve(s, latency));
    }
}

impl RawServer {
    fn connect(&self, delay: Duration) -> Result<RawClient> {
        let s = TcpStream::connect(&self.addr)?;
        s.set_nodelay(true)?;
        Ok(RawClient {
            s,
            buf: Vec::new(),
            rbuf: vec![0; 1 << 20],
            latency: LatencyInjector::new(delay),
        })
    }
}

/// Requests are `[req_len u32][reply_len u32][padding to req_len]`; the reply is `reply_len` bytes.
fn raw_serve(mut s: TcpStream, latency: LatencyInjector) {
    let _ = s.set_nodelay(true);
    let mut inbuf = vec![0u8; 1 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out = Vec::with_capacity(1 << 20);
    loop {
        if start == end {
            start = 0;
            end = 0;
        } else if inbuf.len() - end < 64 << 10 {
            inbuf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let n = match s.read(&mut inbuf[end..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let arrival = Instant::now();
        end += n;
        while end - start >= 8 {
            let h = &inbuf[start..start + 8];
            let req = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let rep = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            if end - start < req {
                break;
            }
            latency.hold(arrival);
            start += req;
            out.resize(out.len() + rep, 0xA5);
        }
        if !out.is_empty() {
            if s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

struct RawClient {
    s: TcpStream,
    buf: Vec<u8>,
    rbuf: Vec<u8>,
    latency: LatencyInjector,
}

impl RawClient {
    fn send(&mut self, op: Op) -> Result<()> {
        let (req, rep) = op.raw_sizes();
        self.buf.clear();
        self.buf.extend_from_slice(&(req as u32).to_le_bytes());
        self.buf.extend_from_slice(&(rep as u32).to_le_bytes());
        self.buf.resize(req, 0x11);
        self.s.write_all(&self.buf)?;
        Ok(())
    }

    fn recv(&mut self, op: Op) -> Result<()> {
        let (_, rep) = op.raw_sizes();
        self.s.read_exact(&mut self.rbuf[..rep])?;
        self.latency.hold(Instant::now());
        Ok(())
    }

    fn latency(&mut self, op: Op, ops: usize) -> Result<(Vec<u64>, f64)> {
        for _ in 0..ops / 10 {
            self.send(op)?;
            self.recv(op)?;
        }
        let mut lat = Vec::with_capacity(ops);
        let start = Instant::now();
        for _ in 0..ops {
            let t = Instant::now();
            self.send(op)?;
            self.recv(op)?;
            lat.push(t.elapsed().as_nanos() as u64);
        }
        Ok((lat, start.elapsed().as_secs_f64()))
    }

    fn pipelined(&mut self, op: Op, ops: usize, window: usize) -> Result<f64> {
        let mut run = |n: usize| -> Result<f64> {
            let start = Instant::now();
            let mut inflight = 0;
            for _ in 0..n {
                if inflight == window {
                    self.recv(op)?;
                    inflight -= 1;
                }
                self.send(op)?;
                inflight += 1;
            }
            for _ in 0..inflight {
                self.recv(op)?;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        };
        run(ops / 10)?;
        run(ops)
    }
}

impl Report {
    /// Remora/raw p50 latency of 4 KiB reads.
    pub fn read4k_p50_ratio(&self) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.name == "read 4 KiB")
            .map(|r| r.remora_lat.p50 / r.raw_lat.p50)
    }

    /// Lowest Remora/raw pipelined throughput ratio over the 64 B and 4 KiB
    /// operations (the sizes the target is set for).
    pub fn min_pipelined_ratio(&self) -> Option<f64> {
        self.rows
            .iter()
            .filter(|r| r.name.ends_with(" 64 B") || r.name.ends_with(" 4 KiB"))
            .map(|r| r.remora_opsw / r.raw_opsw)
            .min_by(|a, b| a.total_cmp(b))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.opts;
        writeln!(
            f,
            "Remora micro-benchmark: region operations vs raw loopback TCP, measured in the same run"
        )?;
        writeln!(
            f,
            "{} ops per point, pipelined window {}, injected latency {:?} per message received",
            o.ops, o.window, o.inject_latency
        )?;
        writeln!(f)?;
        writeln!(f, "Latency, one request in flight (microseconds)")?;
        writeln!(
            f,
            "{:<14} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10}",
            "operation", "raw p50", "raw p99", "remora p50", "remora p99", "p50 ratio", "p99 ratio"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<14} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>9.2}x {:>9.2}x",
                r.name,
                r.raw_lat.p50,
                r.raw_lat.p99,
                r.remora_lat.p50,
                r.remora_lat.p99,
                r.remora_lat.p50 / r.raw_lat.p50,
                r.remora_lat.p99 / r.raw_lat.p99
            )?;
        }
        writeln!(f)?;
        writeln!(f, "Throughput (operations per second)")?;
        writeln!(
            f,
            "{:<14} {:>10} {:>10} {:>7} {:>12} {:>12} {:>7}",
            "operation",
            "raw 1",
            "remora 1",
            "ratio",
            format!("raw {}", o.window),
            format!("remora {}", o.window),
            "ratio"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<14} {:>10.0} {:>10.0} {:>6.2}x {:>12.0} {:>12.0} {:>6.2}x",
                r.name,
                r.raw_ops1,
                r.remora_ops1,
                r.remora_ops1 / r.raw_ops1,
                r.raw_opsw,
                r.remora_opsw,
                r.remora_opsw / r.raw_opsw
            )?;
        }
        writeln!(f)?;
        let c = &self.concurrent;
        writeln!(
            f,
            "{} clients, each its own connection with {} 4 KiB reads in flight: raw {:.0} ops/s, remora {:.0} ops/s ({:.2}x){}",
            c.clients,
            o.window,
            c.raw_ops,
            c.remora_ops,
            c.remora_ops / c.raw_ops,
            c.server_cores
                .map(|x| format!("; memory server used {x:.2} cores"))
                .unwrap_or_default()
        )?;
        writeln!(f)?;
        if let Some(x) = self.read4k_p50_ratio() {
            writeln!(
                f,
                "target: 4 KiB read p50 within 1.15x of raw: {:.2}x ({})",
                x,
                if x <= 1.15 { "met" } else { "missed" }
            )?;
        }
        if let Some(x) = self.min_pipelined_ratio() {
            writeln!(
                f,
                "target: pipelined throughput at least 0.90x of raw (worst 64 B / 4 KiB operation): {:.2}x ({})",
                x,
                if x >= 0.90 { "met" } else { "missed" }
            )?;
        }
        Ok(())
    }
}
