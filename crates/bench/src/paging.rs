//! `remora bench paging`: the cost of a far page fault against its physical
//! parts, and scans of a large array at shrinking local memory, against
//! all-local memory, raw TCP streaming and Linux swap to zram.
//!
//! Every baseline is measured in the same run:
//! * a userfaultfd fault resolved by a handler thread with `UFFDIO_COPY`
//!   (no network), and a raw 4 KiB TCP round trip to a raw server process;
//! * the same scan on ordinary local memory;
//! * raw TCP streaming of the array's bytes (for the sequential scan);
//! * the random scan in a child process under a cgroup v1 memory limit with
//!   swap on zram (set up and torn down here; needs root).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use remora_client::Cluster;
use remora_paging::uffd::{Event, Uffd, PAGE};
use remora_paging::{Budget, PagedRegion, PagerConfig};

use crate::suite::peers::ZramSwap;

/// Settings of the paging benchmark.
#[derive(Debug, Clone)]
pub struct PagingOptions {
    /// Bytes in the scanned array.
    pub size: u64,
    /// Random 8-byte reads per random scan.
    pub random_reads: u64,
    /// Local memory ratios (percent) to scan at.
    pub ratios: Vec<u32>,
    /// Faults timed for the latency figures.
    pub faults: usize,
    /// Run the zram comparison (needs root, zram and cgroup v1 memory).
    pub zram: bool,
}

impl Default for PagingOptions {
    fn default() -> Self {
        PagingOptions {
            size: 2 << 30,
            random_reads: 200_000,
            ratios: vec![100, 75, 50, 25, 10],
            faults: 3000,
            zram: true,
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A mapping of anonymous local memory.
struct Local {
    p: *mut u8,
    len: usize,
}

impl Local {
    fn new(len: usize) -> Result<Local> {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap {len}: {}", std::io::Error::last_os_error());
        }
        Ok(Local { p: p.cast(), len })
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

/// Median and p99 (µs) of a userfaultfd fault served by a handler thread
/// with `UFFDIO_COPY`, no network.
pub fn raw_fault_us(n: usize) -> Result<(f64, f64)> {
    let len = n * PAGE;
    let m = Local::new(len)?;
    let uffd = Arc::new(Uffd::open()?);
    uffd.register(m.p as usize, len)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (u2, s2) = (uffd.clone(), stop.clone());
    let h = std::thread::spawn(move || {
        let page = vec![7u8; PAGE];
        while !s2.load(Ordering::Relaxed) {
            if !u2.wait_readable(50).unwrap_or(false) {
                continue;
            }
            if let Ok(Some(Event::Fault { addr, .. })) = u2.next_event() {
                // SAFETY: page is one readable page; addr is a missing page of the range.
                let _ = unsafe { u2.copy(addr & !(PAGE - 1), page.as_ptr(), PAGE, false) };
            }
        }
    });
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        // SAFETY: inside the mapping; the read faults and is served above.
        let v = unsafe { std::ptr::read_volatile(m.p.add(i * PAGE)) };
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(v, 7);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
}

fn raw_request(s: &mut TcpStream, reply: usize) -> Result<()> {
    let mut req = [0u8; 16];
    req[..4].copy_from_slice(&16u32.to_le_bytes());
    req[4..8].copy_from_slice(&(reply as u32).to_le_bytes());
    s.write_all(&req)?;
    Ok(())
}

/// Median and p99 (µs) of a 16-byte request answered with 4 KiB by the raw
/// server at `addr`.
pub fn raw_rtt_us(addr: &str, n: usize) -> Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr).context("connecting to the raw server")?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; PAGE];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        raw_request(&mut s, PAGE)?;
        s.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
}

/// Seconds raw TCP needs to stream `bytes` from the raw server (64 KiB
/// replies, 16 in flight).
pub fn raw_stream_secs(addr: &str, bytes: u64) -> Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let chunk = 64 << 10;
    let n = bytes.div_ceil(chunk as u64);
    let mut buf = vec![0u8; chunk];
    let t = Instant::now();
    let mut sent = 0u64;
    for _ in 0..16.min(n) {
        raw_request(&mut s, chunk)?;
        sent += 1;
    }
    for _ in 0..n {
        s.read_exact(&mut buf)?;
        if sent < n {
            raw_request(&mut s, chunk)?;
            sent += 1;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Sum of every 8-byte word's first byte, one word per 512 (so each page is
/// touched 8 times, in order).
fn seq_scan(p: *const u8, len: usize) -> u64 {
    let mut sum = 0u64;
    let mut off = 0;
    while off < len {
        // SAFETY: off < len, inside the mapping.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(p.add(off)) } as u64);
        off += 512;
    }
    sum
}

fn random_scan(p: *const u8, len: usize, reads: u64, seed: u64) -> u64 {
    let words = (len / 8) as u64;
    let mut x = seed | 1;
    let mut sum = 0u64;
    for _ in 0..reads {
        let w = xorshift(&mut x) % words;
        // SAFETY: w < words, so the 8 bytes are inside the mapping.
        sum = sum
            .wrapping_add(unsafe { std::ptr::read_volatile(p.add(w as usize * 8).cast::<u64>()) });
    }
    sum
}

fn fill(p: *mut u8, len: usize) {
    let mut off = 0;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while off < len {
        // SAFETY: off + 8 <= len (len is a multiple of 8).
        unsafe { std::ptr::write(p.add(off).cast::<u64>(), xorshift(&mut x)) };
        off += 8;
    }
}

/// One paged region holding the filled array, at `ratio`% local memory.
pub(crate) fn paged_array(
    cluster: &Cluster,
    size: u64,
    ratio: u32,
    prefetch: bool,
    eviction_fifo: bool,
) -> Result<PagedRegion> {
    let region = cluster.alloc_region(size)?;
    let budget = (size * ratio as u64 / 100).max(64 * PAGE as u64);
    let cfg = PagerConfig {
        budget: Budget::Bytes(budget),
        prefetch_window: if prefetch {
            PagerConfig::default().prefetch_window
        } else {
            0
        },
        inactive_fraction: if eviction_fifo { 0.0 } else { 0.25 },
        ..PagerConfig::default()
    };
    let pr = PagedRegion::new(region, cfg)?;
    fill(pr.base(), pr.len());
    Ok(pr)
}

/// Runs the benchmark against `cluster`, with the raw server at `raw_addr`;
/// `self_exe` re-runs this binary as the zram worker. Prints the tables.
pub fn run(
    cluster: &Cluster,
    raw_addr: &str,
    opts: &PagingOptions,
    zram_worker: &[String],
) -> Result<()> {
    let size = opts.size / PAGE as u64 * PAGE as u64;
    println!("== far page fault (prefetch off, 1/16 local, random pages)");
    let (uf50, uf99) = raw_fault_us(opts.faults)?;
    let (rt50, rt99) = raw_rtt_us(raw_addr, opts.faults)?;
    let fpages = (opts.faults * 4).max(1024) as u64;
    let pr = {
        let region = cluster.alloc_region(fpages * PAGE as u64)?;
        let cfg = PagerConfig {
            budget: Budget::Bytes(fpages * PAGE as u64 / 16),
            prefetch_window: 0,
            ..PagerConfig::default()
        };
        let pr = PagedRegion::new(region, cfg)?;
        fill(pr.base(), pr.len());
        pr.flush()?;
        pr
    };
    let mut lat = Vec::with_capacity(opts.faults);
    let mut x = 12345u64;
    for _ in 0..opts.faults {
        let page = xorshift(&mut x) % fpages;
        let t = Instant::now();
        // SAFETY: inside the mapping.
        let _ = unsafe { std::ptr::read_volatile(pr.base().add(page as usize * PAGE)) };
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (f50, f99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let id = pr.region().id();
    drop(pr);
    cluster.free_region(id)?;
    let floor = uf50 + rt50;
    println!("  raw userfaultfd fault (handler thread, UFFDIO_COPY): p50 {uf50:6.1} µs  p99 {uf99:6.1} µs");
    println!("  raw TCP 4 KiB round trip:                           p50 {rt50:6.1} µs  p99 {rt99:6.1} µs");
    println!(
        "  Remora far page fault:                              p50 {f50:6.1} µs  p99 {f99:6.1} µs"
    );
    println!(
        "  far fault / (raw fault + raw round trip): p50 {:.2}x  (target <= 1.2x)",
        f50 / floor
    );

    println!();
    println!(
        "== scans of a {:.1} GiB array (sequential: every page; random: {} 8-byte reads)",
        size as f64 / (1u64 << 30) as f64,
        opts.random_reads
    );
    let local = Local::new(size as usize)?;
    fill(local.p, local.len);
    let t = Instant::now();
    let s_local = seq_scan(local.p, local.len);
    let seq_local = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r_local = random_scan(local.p, local.len, opts.random_reads, 99);
    let rand_local = t.elapsed().as_secs_f64();
    drop(local);
    let stream = raw_stream_secs(raw_addr, size)?;
    println!(
        "  all local: sequential {:.3} s, random {:.3} s; raw TCP streaming of the bytes: {:.3} s ({:.2} GB/s)",
        seq_local,
        rand_local,
        stream,
        size as f64 / stream / 1e9
    );
    println!(
        "  {:>6} | {:>22} | {:>22} | {:>22} | {:>22} | {:>10}",
        "local",
        "seq, prefetch (x local)",
        "seq, no prefetch",
        "random, prefetch",
        "random, no prefetch",
        "seq/TCP"
    );
    let mut results = Vec::new();
    for &ratio in &opts.ratios {
        let mut row = Vec::new();
        let mut seq_pf = 0.0;
        for prefetch in [true, false] {
            let pr = paged_array(cluster, size, ratio, prefetch, false)?;
            let before = pr.stats();
            let t = Instant::now();
            let s = seq_scan(pr.base(), pr.len());
            let seq = t.elapsed().as_secs_f64();
            if std::env::var_os("REMORA_BENCH_VERBOSE").is_some() {
                let a = pr.stats();
                eprintln!(
                    "    {ratio}% prefetch {prefetch}: sequential: demand faults {}, second-chance {}, prefetched {}, evictions {}",
                    a.faults - before.faults,
                    a.second_chance - before.second_chance,
                    a.prefetched - before.prefetched,
                    a.evictions - before.evictions
                );
            }
            if s != s_local {
                bail!("sequential scan of far memory gave a different sum");
            }
            let t = Instant::now();
            let r = random_scan(pr.base(), pr.len(), opts.random_reads, 99);
            let rnd = t.elapsed().as_secs_f64();
            if r != r_local {
                bail!("random scan of far memory gave a different sum");
            }
            if prefetch {
                seq_pf = seq;
            }
            row.push((seq, rnd));
            let id = pr.region().id();
            drop(pr);
            cluster.free_region(id)?;
        }
        println!(
            "  {:>5}% | {:>9.3} s {:>9.1}x | {:>9.3} s {:>9.1}x | {:>9.3} s {:>9.1}x | {:>9.3} s {:>9.1}x | {:>9.2}x",
            ratio,
            row[0].0,
            row[0].0 / seq_local,
            row[1].0,
            row[1].0 / seq_local,
            row[0].1,
            row[0].1 / rand_local,
            row[1].1,
            row[1].1 / rand_local,
            seq_pf / stream
        );
        results.push((ratio, row[0].1 / rand_local));
    }
    println!("  target: sequential at 10% within 1.3x of raw TCP streaming; random no worse than zram swap");

    println!();
    println!("== eviction policy on a skewed workload (90% of reads to 10% of pages, 25% local)");
    for (name, fifo) in [("second chance", false), ("FIFO", true)] {
        let pr = paged_array(cluster, size.min(256 << 20), 25, false, fifo)?;
        let pages = pr.len() / PAGE;
        let hot = pages / 10;
        let mut x = 7u64;
        let mut pass = |reads: u64| {
            for _ in 0..reads {
                let r = xorshift(&mut x);
                let page = if r % 10 < 9 {
                    (r >> 8) as usize % hot
                } else {
                    (r >> 8) as usize % pages
                };
                // SAFETY: inside the mapping.
                let _ = unsafe { std::ptr::read_volatile(pr.base().add(page * PAGE + 64)) };
            }
        };
        // Warm up (every hot page's first touch is a miss under any policy),
        // then measure.
        pass(opts.random_reads.max(4 * pages as u64));
        let before = pr.stats();
        let t = Instant::now();
        pass(opts.random_reads);
        let el = t.elapsed().as_secs_f64();
        let s = pr.stats();
        let id = pr.region().id();
        drop(pr);
        cluster.free_region(id)?;
        println!(
            "  {name:>13}: {:.3} s, fetches {} ({:.1}% of reads), second-chance faults {}",
            el,
            s.pages_fetched - before.pages_fetched,
            100.0 * (s.pages_fetched - before.pages_fetched) as f64 / opts.random_reads as f64,
            s.second_chance - before.second_chance
        );
    }

    if opts.zram {
        println!();
        println!("== Linux swap to zram under a cgroup v1 memory limit (random scan, same array and reads)");
        match zram_compare(size, opts, zram_worker, rand_local) {
            Ok(rows) => {
                for (ratio, slow) in rows {
                    let ours = results.iter().find(|(r, _)| *r == ratio).map(|(_, s)| *s);
                    match ours {
                        Some(o) => println!(
                            "  {ratio:>3}% local: zram {slow:8.1}x   Remora {o:8.1}x   Remora/zram {:.2}",
                            o / slow
                        ),
                        None => println!("  {ratio:>3}% local: zram {slow:8.1}x"),
                    }
                }
            }
            Err(e) => println!("  zram comparison unavailable: {e:#}"),
        }
    }
    Ok(())
}

/// Sets up zram swap, runs the worker under each memory limit, tears down.
fn zram_compare(
    size: u64,
    opts: &PagingOptions,
    worker: &[String],
    rand_local: f64,
) -> Result<Vec<(u32, f64)>> {
    let Some((exe, args)) = worker.split_first() else {
        bail!("no zram worker command");
    };
    let zram = ZramSwap::setup(size * 2)?;
    let mut rows = Vec::new();
    for &ratio in &opts.ratios {
        if !(25..100).contains(&ratio) {
            // 100%: no limit to test; below 25% zram takes many minutes.
            continue;
        }
        let limit = size * ratio as u64 / 100 + (16 << 20);
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .arg(size.to_string())
            .arg(opts.random_reads.to_string());
        let out = zram
            .run_limited(limit, cmd)
            .context("running the zram worker")?;
        let line = out.lines().next().unwrap_or_default();
        let secs: f64 = line
            .trim()
            .parse()
            .with_context(|| format!("zram worker said {line:?}"))?;
        rows.push((ratio, secs / rand_local));
    }
    Ok(rows)
}

/// The zram worker: waits for "go" (so it is in the cgroup before it
/// allocates), fills `size` bytes of ordinary memory, then prints the
/// seconds its random scan took.
pub fn zram_worker(size: u64, reads: u64) -> Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let m = Local::new(size as usize)?;
    fill(m.p, m.len);
    let t = Instant::now();
    let s = random_scan(m.p, m.len, reads, 99);
    let secs = t.elapsed().as_secs_f64();
    println!("{secs}");
    std::hint::black_box(s);
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
