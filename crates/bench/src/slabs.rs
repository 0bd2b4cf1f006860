//! What the slab size costs: allocation time, map size, streaming
//! throughput and internal fragmentation, for one cluster.
//!
//! `remora bench slabs` runs this on one embedded cluster per slab size and
//! prints the rows side by side; the default slab size is chosen from it
//! (see ARCHITECTURE.md).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Result;
use remora_client::Cluster;

/// Figures for one slab size.
#[derive(Debug, Clone)]
pub struct SlabRow {
    /// Slab size in bytes.
    pub slab_size: u64,
    /// Median time to allocate a 256 MiB region, in milliseconds.
    pub alloc_ms: f64,
    /// Encoded region-map bytes per GiB of region.
    pub map_bytes_per_gib: f64,
    /// Sequential read of 64 MiB in 1 MiB requests, 8 in flight, GB/s.
    pub stream_gbps: f64,
    /// Slab bytes allocated / bytes requested, for 100 regions of 1 KiB..1 MiB.
    pub small_overhead: f64,
}

/// Measures one cluster.
pub fn measure(cluster: &Cluster) -> Result<SlabRow> {
    let mut times = Vec::new();
    let mut map_bytes = 0usize;
    let mut slab_size = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let r = cluster.alloc_region(256 << 20)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let m = r.map();
        slab_size = m.slab_size;
        map_bytes = postcard::to_stdvec(&*m)?.len();
        cluster.free_region(r.id())?;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let r = cluster.alloc_region(64 << 20)?;
    r.write(0, &vec![7u8; 64 << 20])?;
    let chunk = 1usize << 20;
    let t = Instant::now();
    let mut q = VecDeque::new();
    for i in 0..64u64 {
        if q.len() == 8 {
            if let Some(f) = q.pop_front() {
                let f: remora_client::ReadFuture = f;
                f.wait()?;
            }
        }
        q.push_back(r.read_async(i * chunk as u64, chunk));
    }
    for f in q {
        f.wait()?;
    }
    let stream_gbps = (64u64 << 20) as f64 / t.elapsed().as_secs_f64() / 1e9;
    cluster.free_region(r.id())?;
    // Many small regions of mixed sizes.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut requested = 0u64;
    let mut ids = Vec::new();
    for _ in 0..100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = 1024 + x % (1 << 20);
        requested += size;
        ids.push(cluster.alloc_region(size)?.id());
    }
    let used: u64 = cluster
        .status()?
        .servers
        .iter()
        .map(|s| s.slabs_used)
        .sum::<u64>()
        * slab_size;
    for id in ids {
        cluster.free_region(id)?;
    }
    Ok(SlabRow {
        slab_size,
        alloc_ms: times[1],
        map_bytes_per_gib: map_bytes as f64 * 4.0,
        stream_gbps,
        small_overhead: used as f64 / requested as f64,
    })
}
