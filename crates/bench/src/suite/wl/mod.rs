//! The workloads. Each has a footprint that follows a scale factor, a fixed
//! seed, a timed phase, and a check of its result: a run that computes a
//! wrong answer returns an error, never a figure.
//!
//! Every workload is written once over plain memory (`Vec`s: all-local,
//! the paging interface, and the zram peer run this code) and once over
//! far objects; regions and offloaded variants exist where they are the
//! natural way to write the workload.

pub mod chase;
pub mod dataframe;
pub mod graph;
pub mod kv;
pub mod matmul;
pub mod sort;
pub mod stream;

use std::time::Instant;

use anyhow::{bail, Context, Result};

/// What a workload measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Seconds of the timed phase.
    pub secs: f64,
    /// Operations in the timed phase.
    pub ops: u64,
    /// Digest of the result, equal across interfaces.
    pub digest: u64,
    /// Sampled per-operation latencies in microseconds, if the workload
    /// times operations.
    pub lat_us: Vec<f64>,
    /// Bytes the timed phase moved, where the workload counts them itself
    /// (regions); otherwise the worker measures them.
    pub bytes_moved: Option<u64>,
}

/// Sizes of a workload at a scale factor: `base * scale`, at least `min`.
pub fn scaled(base: u64, scale: f64, min: u64) -> u64 {
    ((base as f64 * scale) as u64).max(min)
}

/// SplitMix64: a fast, fixed, portable mixer for generating data from a
/// seed and an index (the same bytes on every machine and every run).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A sequential generator over [`mix`].
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and `stream` (independent streams per purpose).
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng(mix(seed ^ mix(stream)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Folds `v` into a running digest (order-sensitive).
pub fn fold(d: u64, v: u64) -> u64 {
    mix(d ^ v).wrapping_add(v)
}

/// Fails with "result check failed: …" when `ok` is false.
pub fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if !ok {
        bail!("result check failed: {}", what());
    }
    Ok(())
}

/// Where a workload's data lives.
#[derive(Debug)]
pub enum Kind {
    /// Ordinary heap memory: all-local, the zram peer, or, when the worker
    /// started the far heap of `remora::FarAlloc`, transparent paging.
    Plain,
    /// Far objects in this cache; `offload` runs what can run at the
    /// memory servers there.
    Objects {
        /// The object cache.
        cache: remora_objects::ObjectCache,
        /// The cluster (for data that offloaded traversals follow).
        cluster: remora_client::Cluster,
        /// Offload aggregates, filters, probes and pointer chases.
        offload: bool,
    },
    /// The region API on this cluster, no local cache.
    Regions(remora_client::Cluster),
}

/// A workload's memory, and the local memory its timed phase may use.
///
/// Data is loaded with local memory unbounded; [`Mem::meter`] shrinks the
/// far heap's or the object cache's budget to the run's local memory (and
/// waits until it holds) before the timed phase, and [`Meter::stop`]
/// lifts it again for the check.
#[derive(Debug)]
pub struct Mem {
    /// Where the data lives.
    pub kind: Kind,
    /// Local memory of the timed phase in bytes (None: unbounded).
    pub budget: Option<u64>,
    /// A cgroup v1 memory limit this process puts on itself for the timed
    /// phase (the zram peer: data is made with memory to spare, as in the
    /// other interfaces, then the limit pushes the rest out to swap).
    pub cgroup_limit: Option<u64>,
}

impl Mem {
    /// Ordinary memory with no far heap involved (tests, all-local).
    pub fn plain() -> Mem {
        Mem {
            kind: Kind::Plain,
            budget: None,
            cgroup_limit: None,
        }
    }

    /// Bytes moved over the network so far, where this process can tell:
    /// pages fetched and written back by the far heap, or object bytes
    /// fetched, written back, read around the cache and returned by
    /// offloaded operations.
    pub fn bytes_moved(&self) -> Option<u64> {
        match &self.kind {
            Kind::Plain => remora_paging::heap::far_heap().map(|h| {
                let s = h.stats();
                (s.pages_fetched + s.pages_written) * remora_paging::uffd::PAGE as u64
            }),
            Kind::Objects { cache, .. } => {
                let s = cache.stats();
                Some(s.fetched_bytes + s.written_bytes + s.uncached_bytes + s.offload_bytes)
            }
            Kind::Regions(_) => None,
        }
    }

    /// Applies the run's budget, then starts timing.
    pub fn meter(&self) -> Result<Meter<'_>> {
        self.meter_at(self.budget)
    }

    /// Applies `budget` (instead of the run's), writes back everything
    /// still dirty from loading the data (so that the timed phase pays
    /// only for what it does itself), then starts timing.
    pub fn meter_at(&self, budget: Option<u64>) -> Result<Meter<'_>> {
        match (&self.kind, budget) {
            (Kind::Plain, Some(b)) => {
                if let Some(h) = remora_paging::heap::far_heap() {
                    h.pager().set_budget(b);
                    if !h
                        .pager()
                        .wait_within_budget(std::time::Duration::from_secs(120))
                    {
                        bail!("the far heap did not shrink to its budget of {b} bytes");
                    }
                    // Write-back buffers must not come from the far heap
                    // being written back.
                    remora_paging::heap::as_internal(|| h.pager().flush())?;
                }
            }
            (Kind::Objects { cache, .. }, Some(b)) => {
                cache.set_budget(b)?;
                cache.evict_to(b)?;
                let resident = cache.stats().resident_bytes;
                if resident > b {
                    bail!("the object cache holds {resident} bytes after evicting to {b}");
                }
                cache.flush()?;
            }
            _ => {}
        }
        let restore = match self.cgroup_limit {
            Some(limit) => {
                let old = own_memory_limit()?;
                set_own_memory_limit(&limit.to_string())
                    .with_context(|| format!("limiting this process to {limit} bytes"))?;
                Some(old)
            }
            None => None,
        };
        Ok(Meter {
            mem: self,
            bytes: self.bytes_moved(),
            restore,
            start: Instant::now(),
        })
    }

    /// The object cache's budget while data is loaded and checked.
    pub const LOAD_BUDGET: u64 = 64 << 30;
}

/// A timed phase in progress.
#[derive(Debug)]
pub struct Meter<'a> {
    mem: &'a Mem,
    bytes: Option<u64>,
    /// The cgroup memory limit to put back when the phase ends.
    restore: Option<String>,
    start: Instant,
}

impl Meter<'_> {
    /// Ends the phase: its seconds and the bytes it moved. Local memory is
    /// unbounded again afterwards.
    pub fn stop(self) -> Result<(f64, Option<u64>)> {
        let secs = self.start.elapsed().as_secs_f64();
        let bytes = match (self.bytes, self.mem.bytes_moved()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        if let Some(old) = &self.restore {
            set_own_memory_limit(old).context("lifting this process's memory limit")?;
        }
        if self.mem.budget.is_some() {
            match &self.mem.kind {
                Kind::Plain => {
                    if let Some(h) = remora_paging::heap::far_heap() {
                        h.pager().set_budget(u64::MAX);
                    }
                }
                Kind::Objects { cache, .. } => cache.set_budget(Mem::LOAD_BUDGET)?,
                Kind::Regions(_) => {}
            }
        }
        Ok((secs, bytes))
    }
}

/// `memory.limit_in_bytes` of this process's cgroup v1 memory controller.
fn own_limit_file() -> Result<String> {
    let groups =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let Some(path) = groups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',').any(|c| c == "memory").then_some(path)
    }) else {
        bail!("this process is in no cgroup v1 memory controller");
    };
    Ok(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
}

fn own_memory_limit() -> Result<String> {
    let file = own_limit_file()?;
    Ok(std::fs::read_to_string(&file)
        .with_context(|| format!("reading {file}"))?
        .trim()
        .to_string())
}

/// Writes `limit` to this process's cgroup memory limit. Lowering it makes
/// the kernel reclaim (swap) until the process fits, or fail.
fn set_own_memory_limit(limit: &str) -> Result<()> {
    let file = own_limit_file()?;
    std::fs::write(&file, limit).with_context(|| format!("writing {limit} to {file}"))
}

/// Resident bytes of this process now (`/proc/self/statm`).
pub fn own_rss() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("parsing /proc/self/statm")?;
    Ok(pages * 4096)
}

/// Rewrites every element of `v` in `range` in order with `f(index, &mut
/// element)`, fetching chunks `ahead` chunks in front of the cursor.
pub fn far_update<T: remora_objects::Pod>(
    v: &mut remora_objects::FarVec<T>,
    range: std::ops::Range<usize>,
    ahead: usize,
    mut f: impl FnMut(usize, &mut T),
) -> Result<()> {
    let chunk = v.chunk_elems();
    let mut i = range.start;
    while i < range.end {
        let end = ((i / chunk + 1) * chunk).min(range.end);
        v.prefetch(end..(end + ahead * chunk).min(range.end));
        let mut s = remora_objects::Scope::new();
        for j in i..end {
            let mut r = v.get_mut(j, &mut s)?;
            f(j, &mut *r);
        }
        i = end;
    }
    Ok(())
}

/// A far vector of `n` elements made by `f(index)`.
pub fn far_vec<T: remora_objects::Pod>(
    cache: &remora_objects::ObjectCache,
    n: usize,
    mut f: impl FnMut(usize) -> T,
) -> Result<remora_objects::FarVec<T>> {
    let mut v = remora_objects::FarVec::new(cache)?;
    let mut buf = Vec::with_capacity(4096);
    let mut i = 0;
    while i < n {
        buf.clear();
        buf.extend((i..(i + 4096).min(n)).map(&mut f));
        v.extend_from_slice(&buf)?;
        i += buf.len();
    }
    Ok(v)
}

/// Percentiles p50, p99 and p99.9 of `lat`.
pub fn percentiles(lat: &mut [f64]) -> Option<(f64, f64, f64)> {
    if lat.is_empty() {
        return None;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    Some((at(0.5), at(0.99), at(0.999)))
}
