//! `remora bench objects`: far objects against local memory, against the
//! paging interface doing the same work, and offloaded against fetched.
//!
//! Every baseline is measured in the same run:
//! * dereference cost: a plain `Box` and a `HashMap` lookup beside a cache
//!   hit of `FarBox` and `FarVec`;
//! * `FarHashMap::get` with Zipfian keys (skew 0.99) at shrinking local
//!   memory, fetching buckets and probing at the server, beside the same
//!   bucket table in a paged region (bytes moved per lookup);
//! * `FarVec` sum over a vector ten times the cache, fetched (around the
//!   cache) and offloaded, against raw TCP streaming of its bytes;
//! * a uniform-random gather of 8-byte elements at 75/50/25% local memory
//!   as slowdown against a local `Vec`, beside the paging interface.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use remora_client::Cluster;
use remora_objects::{CacheConfig, FarBox, FarHashMap, FarVec, ObjectCache, Scope};

use crate::paging::{paged_array, raw_stream_secs};

/// Settings of the far-object benchmark.
#[derive(Debug, Clone)]
pub struct ObjectsOptions {
    /// Keys in the hash map.
    pub keys: u64,
    /// Lookups per hash-map measurement.
    pub gets: u64,
    /// Local memory ratios (percent) for the hash map.
    pub map_ratios: Vec<u32>,
    /// Bytes of the summed vector (the cache gets a tenth).
    pub sum_bytes: u64,
    /// Bytes of the gathered vector.
    pub gather_bytes: u64,
    /// Elements per gather.
    pub gathers: u64,
    /// Local memory ratios (percent) for the gather.
    pub gather_ratios: Vec<u32>,
    /// Dereferences per cost measurement.
    pub derefs: u64,
}

impl Default for ObjectsOptions {
    fn default() -> Self {
        ObjectsOptions {
            keys: 200_000,
            gets: 100_000,
            map_ratios: vec![100, 50, 25, 10],
            sum_bytes: 256 << 20,
            gather_bytes: 64 << 20,
            gathers: 100_000,
            gather_ratios: vec![75, 50, 25],
            derefs: 20_000_000,
        }
    }
}

const PAGE: u64 = 4096;

/// Runs the benchmark against `cluster`, with the raw TCP server at
/// `raw_addr`. Prints the tables.
pub fn run(cluster: &Cluster, raw_addr: &str, opts: &ObjectsOptions) -> Result<()> {
    if opts.keys < 16 || opts.gets == 0 || opts.gathers == 0 || opts.derefs == 0 {
        bail!("keys, gets, gathers and derefs must be positive (keys at least 16)");
    }
    deref_costs(cluster, opts.derefs)?;
    println!();
    hash_map(cluster, opts)?;
    println!();
    vec_sum(cluster, raw_addr, opts.sum_bytes)?;
    println!();
    gather(cluster, opts)?;
    Ok(())
}

fn cache(cluster: &Cluster, budget: u64) -> Result<ObjectCache> {
    Ok(ObjectCache::new(
        cluster.clone(),
        CacheConfig {
            budget: budget.max(4096),
            region_size: 256 << 20,
            ..CacheConfig::default()
        },
    )?)
}

fn ns_per(t: Instant, n: u64) -> f64 {
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

fn deref_costs(cluster: &Cluster, iters: u64) -> Result<()> {
    println!("== dereference cost (1024 objects, all local; ns per access)");
    const N: usize = 1024;
    let mask = N as u64 - 1;
    let boxes: Vec<Box<u64>> = (0..N as u64).map(Box::new).collect();
    let map: HashMap<u64, u64> = (0..N as u64).map(|i| (i, i)).collect();
    let c = cache(cluster, 64 << 20)?;
    let far: Vec<FarBox<u64>> = (0..N as u64)
        .map(|i| FarBox::new(&c, i))
        .collect::<Result<_, _>>()?;
    let mut fv = FarVec::<u64>::new(&c)?;
    fv.extend_from_slice(&(0..N as u64).collect::<Vec<_>>())?;

    let mut best = [f64::MAX; 4];
    for _ in 0..3 {
        let boxes = black_box(&boxes);
        let t = Instant::now();
        let mut s = 0u64;
        for i in 0..iters {
            s = s.wrapping_add(*boxes[(i & mask) as usize]);
        }
        black_box(s);
        best[0] = best[0].min(ns_per(t, iters));

        let map = black_box(&map);
        let t = Instant::now();
        let mut s = 0u64;
        for i in 0..iters {
            s = s.wrapping_add(map[&(i & mask)]);
        }
        black_box(s);
        best[1] = best[1].min(ns_per(t, iters));

        let far = black_box(&far);
        let scope = Scope::new();
        let t = Instant::now();
        let mut s = 0u64;
        for i in 0..iters {
            s = s.wrapping_add(*far[(i & mask) as usize].get(&scope)?);
        }
        black_box(s);
        best[2] = best[2].min(ns_per(t, iters));

        let fv = black_box(&fv);
        let t = Instant::now();
        let mut s = 0u64;
        for i in 0..iters {
            s = s.wrapping_add(*fv.get((i & mask) as usize, &scope)?);
        }
        black_box(s);
        best[3] = best[3].min(ns_per(t, iters));
        drop(scope);
    }
    println!("  Box deref            {:6.2} ns", best[0]);
    println!("  HashMap lookup       {:6.2} ns", best[1]);
    println!(
        "  FarBox hit           {:6.2} ns  (+{:.2} ns over Box; target < 5 ns)",
        best[2],
        best[2] - best[0]
    );
    println!(
        "  FarVec element hit   {:6.2} ns  (+{:.2} ns over Box)",
        best[3],
        best[3] - best[0]
    );
    Ok(())
}

/// Zipfian keys in `0..n` (rank 1 is key 0), skew 0.99.
fn zipf_keys(n: u64, count: u64, seed: u64) -> Result<Vec<u64>> {
    let z = Zipf::new(n, 0.99).map_err(|e| anyhow::anyhow!("zipf: {e:?}"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok((0..count).map(|_| z.sample(&mut rng) as u64 - 1).collect())
}

/// A hash of a key for the paged table (multiplicative, like Fibonacci
/// hashing).
fn paged_hash(k: u64) -> u64 {
    k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The same bucket table in a paged region: buckets of 8 slots of (u64,
/// u64) after 8 fingerprint bytes, 136 bytes each, back to back.
struct PagedTable {
    pr: remora_paging::PagedRegion,
    mask: u64,
}

const BUCKET: u64 = 8 + 8 * 16;

impl PagedTable {
    fn build(cluster: &Cluster, buckets: u64, keys: u64, ratio: u32) -> Result<PagedTable> {
        let bytes = (buckets * BUCKET).next_multiple_of(PAGE);
        let pr = paged_array(cluster, bytes, ratio, true, false)?;
        // SAFETY: the mapping is `bytes` long and owned by `pr`.
        let mem = unsafe { std::slice::from_raw_parts_mut(pr.base(), pr.len()) };
        mem.fill(0);
        let mask = buckets - 1;
        for k in 0..keys {
            let mut b = paged_hash(k) >> 20 & mask;
            'probe: loop {
                let at = (b * BUCKET) as usize;
                for i in 0..8 {
                    if mem[at + i] == 0 {
                        mem[at + i] = 2;
                        let e = at + 8 + i * 16;
                        mem[e..e + 8].copy_from_slice(&k.to_le_bytes());
                        mem[e + 8..e + 16].copy_from_slice(&(k * 3).to_le_bytes());
                        break 'probe;
                    }
                }
                b = (b + 1) & mask;
            }
        }
        pr.flush()?;
        Ok(PagedTable { pr, mask })
    }

    fn get(&self, k: u64) -> Option<u64> {
        // SAFETY: as in `build`.
        let mem = unsafe { std::slice::from_raw_parts(self.pr.base(), self.pr.len()) };
        let mut b = paged_hash(k) >> 20 & self.mask;
        loop {
            let at = (b * BUCKET) as usize;
            let mut empty = false;
            for i in 0..8 {
                let e = at + 8 + i * 16;
                if mem[at + i] == 2 && mem[e..e + 8] == k.to_le_bytes() {
                    return Some(u64::from_le_bytes(mem[e + 8..e + 16].try_into().ok()?));
                }
                empty |= mem[at + i] == 0;
            }
            if empty {
                return None;
            }
            b = (b + 1) & self.mask;
        }
    }
}

fn hash_map(cluster: &Cluster, opts: &ObjectsOptions) -> Result<()> {
    println!(
        "== FarHashMap::get, {} u64 -> u64 entries, Zipfian keys (skew 0.99), {} lookups per row",
        opts.keys, opts.gets
    );
    let c = cache(cluster, 1 << 30)?;
    let mut m = FarHashMap::<u64, u64>::with_capacity(&c, opts.keys as usize)?;
    for k in 0..opts.keys {
        m.insert(k, k * 3)?;
    }
    m.flush()?;
    let table = c.stats().resident_bytes;
    println!(
        "  table: {} buckets, {:.1} MiB in the cache at 100%; bytes moved per lookup: objects (bucket fetches + offload replies) vs paging (4 KiB pages)",
        m.buckets(),
        table as f64 / (1 << 20) as f64
    );
    println!(
        "  {:>6} | {:>24} | {:>24} | {:>24}",
        "local", "fetch buckets", "offload probe", "paging (same table)"
    );
    for (n, &ratio) in opts.map_ratios.iter().enumerate() {
        c.set_budget((table * ratio as u64 / 100).max(4096))?;
        c.evict_to(c.budget())?;
        let mut cells = Vec::new();
        for offload in [false, true] {
            let keys = zipf_keys(opts.keys, opts.gets, 7 + 2 * n as u64 + offload as u64)?;
            let before = c.stats();
            let t = Instant::now();
            for &k in &keys {
                let v = if offload {
                    m.get_offloaded(&k)?
                } else {
                    m.get(&k)?
                };
                if v != Some(k * 3) {
                    bail!("lookup of {k} returned {v:?}");
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let after = c.stats();
            let moved = (after.fetched_bytes - before.fetched_bytes)
                + (after.offload_bytes - before.offload_bytes);
            cells.push(format!(
                "{:>7.0} k/s {:>7.1} B/op",
                opts.gets as f64 / secs / 1e3,
                moved as f64 / opts.gets as f64
            ));
        }
        let keys = zipf_keys(opts.keys, opts.gets, 1007 + n as u64)?;
        let pt = PagedTable::build(cluster, m.buckets() as u64, opts.keys, ratio)?;
        let before = pt.pr.stats();
        let t = Instant::now();
        for &k in &keys {
            let v = pt.get(k);
            if v != Some(k * 3) {
                bail!("paged lookup of {k} returned {v:?}");
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let fetched = pt.pr.stats().pages_fetched - before.pages_fetched;
        cells.push(format!(
            "{:>7.0} k/s {:>7.1} B/op",
            opts.gets as f64 / secs / 1e3,
            (fetched * PAGE) as f64 / opts.gets as f64
        ));
        let id = pt.pr.region().id();
        drop(pt);
        cluster.free_region(id)?;
        println!(
            "  {:>5}% | {} | {} | {}",
            ratio, cells[0], cells[1], cells[2]
        );
    }
    Ok(())
}

fn vec_sum(cluster: &Cluster, raw_addr: &str, bytes: u64) -> Result<()> {
    let n = (bytes / 8) as usize;
    println!(
        "== FarVec<u64>::sum over {:.0} MiB with a cache of a tenth of it",
        bytes as f64 / (1 << 20) as f64
    );
    let c = cache(cluster, bytes / 10)?;
    let mut v = FarVec::<u64>::new(&c)?;
    let mut x = 1u64;
    let mut want = 0u64;
    let mut batch = Vec::with_capacity(1 << 16);
    while v.len() < n {
        batch.clear();
        for _ in 0..(n - v.len()).min(1 << 16) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            batch.push(x);
            want = want.wrapping_add(x);
        }
        v.extend_from_slice(&batch)?;
    }
    v.flush()?;
    c.evict_to(0)?;

    let stream = raw_stream_secs(raw_addr, bytes)?;
    let mut rows = Vec::new();
    for (name, nocache) in [
        ("fetched, around the cache", true),
        ("fetched, through the cache", false),
    ] {
        c.evict_to(0)?;
        v.set_nocache(nocache);
        let t = Instant::now();
        let mut s = 0u64;
        for e in v.iter() {
            s = s.wrapping_add(e?);
        }
        let secs = t.elapsed().as_secs_f64();
        if s != want {
            bail!("fetched sum {s} != {want}");
        }
        rows.push((name, secs));
    }
    c.evict_to(0)?;
    let before = c.stats();
    let t = Instant::now();
    let agg = v.aggregate_offloaded(0..n)?;
    let secs = t.elapsed().as_secs_f64();
    if agg.sum_bits != want {
        bail!("offloaded sum {} != {want}", agg.sum_bits);
    }
    let after = c.stats();
    rows.push(("offloaded to the servers", secs));
    println!(
        "  raw TCP streaming of the bytes   {:7.3} s  {:6.2} GB/s",
        stream,
        bytes as f64 / stream / 1e9
    );
    for (name, secs) in rows {
        println!(
            "  {:<32} {:7.3} s  {:6.2} GB/s  ({:.2}x raw TCP time)",
            name,
            secs,
            bytes as f64 / secs / 1e9,
            secs / stream
        );
    }
    println!(
        "  offload: {} requests, {} reply bytes",
        after.offloads - before.offloads,
        after.offload_bytes - before.offload_bytes
    );
    Ok(())
}

fn gather(cluster: &Cluster, opts: &ObjectsOptions) -> Result<()> {
    let n = (opts.gather_bytes / 8) as usize;
    let chunk = 16usize;
    println!(
        "== uniform-random gather of {} u64s from {:.0} MiB (indices known ahead), slowdown vs a local Vec",
        opts.gathers,
        opts.gather_bytes as f64 / (1 << 20) as f64
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let data: Vec<u64> = (0..n as u64).map(|i| i ^ 0x5555).collect();
    println!(
        "  objects: FarVec chunks of {chunk} elements ({} B), batched prefetch; paging: 4 KiB pages; a fresh draw of indices per row",
        chunk * 8
    );
    let c = cache(cluster, 1 << 30)?;
    let mut v = FarVec::<u64>::with_chunk(&c, chunk)?;
    v.extend_from_slice(&data)?;
    v.flush()?;
    let full = c.stats().resident_bytes;
    println!(
        "  {:>6} | {:>30} | {:>30} | {:>8}",
        "local", "objects (slowdown, B/element)", "paging (slowdown, B/element)", "obj/pag"
    );
    for &ratio in &opts.gather_ratios {
        let idx: Vec<usize> = (0..opts.gathers).map(|_| rng.gen_range(0..n)).collect();
        let want: Vec<u64> = idx.iter().map(|&i| data[i]).collect();
        let mut local = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let mut s = 0u64;
            for &i in black_box(&idx) {
                s = s.wrapping_add(black_box(&data)[i]);
            }
            black_box(s);
            local = local.min(t.elapsed().as_secs_f64());
        }
        c.set_budget((full * ratio as u64 / 100).max(4096))?;
        c.evict_to(c.budget())?;
        // Warm the cache with another draw of the same distribution.
        let warm: Vec<usize> = (0..opts.gathers).map(|_| rng.gen_range(0..n)).collect();
        v.gather(&warm)?;
        let before = c.stats();
        let t = Instant::now();
        let got = v.gather(&idx)?;
        let secs = t.elapsed().as_secs_f64();
        if got != want {
            bail!("gather returned wrong values");
        }
        let moved = c.stats().fetched_bytes - before.fetched_bytes;
        if std::env::var_os("REMORA_BENCH_VERBOSE").is_some() {
            eprintln!("  budget {} B, after: {:?}", c.budget(), c.stats());
        }
        let obj = secs / local;

        let pr = paged_array(cluster, opts.gather_bytes, ratio, true, false)?;
        {
            // SAFETY: the mapping is gather_bytes long, 8-aligned.
            let mem = unsafe { std::slice::from_raw_parts_mut(pr.base() as *mut u64, n) };
            for (i, e) in mem.iter_mut().enumerate() {
                *e = i as u64 ^ 0x5555;
            }
        }
        pr.flush()?;
        // SAFETY: as above.
        let mem = unsafe { std::slice::from_raw_parts(pr.base() as *const u64, n) };
        let mut s = 0u64;
        for &i in &warm {
            s = s.wrapping_add(mem[i]);
        }
        black_box(s);
        let before = pr.stats();
        let t = Instant::now();
        let mut s = 0u64;
        for &i in &idx {
            s = s.wrapping_add(mem[i]);
        }
        let psecs = t.elapsed().as_secs_f64();
        if s != want.iter().fold(0u64, |a, b| a.wrapping_add(*b)) {
            bail!("paged gather returned wrong values");
        }
        let pages = pr.stats().pages_fetched - before.pages_fetched;
        let id = pr.region().id();
        drop(pr);
        cluster.free_region(id)?;
        let pag = psecs / local;
        println!(
            "  {:>5}% | {:>14.0}x {:>9.1} B/el | {:>14.0}x {:>9.1} B/el | {:>7.2}  (target <= 0.25; local {:.2} ms)",
            ratio,
            obj,
            moved as f64 / opts.gathers as f64,
            pag,
            (pages * PAGE) as f64 / opts.gathers as f64,
            obj / pag,
            local * 1e3
        );
    }
    Ok(())
}
