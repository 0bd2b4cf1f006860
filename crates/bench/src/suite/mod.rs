//! `remora bench`: the standard far-memory benchmark suite.
//!
//! Seven workload families, from compute-bound to memory-bound, each run
//! through every interface that fits it at shrinking local memory, beside
//! all-local memory and the peers that run on the machine (Linux swap to
//! zram under a cgroup limit, Redis and memcached for the key-value store).
//!
//! * [`Workload`], [`Interface`]: what runs, and through what.
//! * [`worker`]: one run in a process of its own (`remora-bench-worker`),
//!   so that every run starts from an empty heap and a run's far heap or
//!   cache cannot leak into the next.
//! * [`wl`]: the workloads, each with a fixed seed, a footprint that
//!   follows a scale factor, and a check of its result.
//! * [`results`]: one [`RunRecord`] per run, written as JSON and CSV.
//! * [`report`]: plots and the HTML report, made from a results file.
//! * [`peers`]: zram swap under a cgroup memory limit; Redis and memcached.
//! * [`runner`]: the sweep: runs, repeats, medians, progress bars.

pub mod peers;
pub mod report;
pub mod results;
pub mod runner;
pub mod wl;
pub mod worker;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A workload of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Workload {
    /// Key-value store, 90% GET / 10% SET, Zipfian keys with skew 0.99.
    KvZipf99,
    /// Key-value store, 90% GET / 10% SET, Zipfian keys with skew 0.6.
    KvZipf60,
    /// Breadth-first search over a power-law (R-MAT) graph.
    GraphBfs,
    /// PageRank over the same graph.
    GraphPagerank,
    /// Dataframe analytics: scan, filter and group-by aggregate over columns.
    Dataframe,
    /// Sorting 64-bit keys.
    Sort,
    /// Dense blocked matrix multiply.
    Matmul,
    /// Pointer chasing through a randomly linked list.
    Chase,
    /// Sequential read/modify/write over a large array.
    Stream,
}

impl Workload {
    /// Every workload, in report order (compute-bound first is not the
    /// order; the order is kept so readers find them).
    pub const ALL: [Workload; 9] = [
        Workload::KvZipf99,
        Workload::KvZipf60,
        Workload::GraphBfs,
        Workload::GraphPagerank,
        Workload::Dataframe,
        Workload::Sort,
        Workload::Matmul,
        Workload::Chase,
        Workload::Stream,
    ];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Workload::KvZipf99 => "kv-zipf0.99",
            Workload::KvZipf60 => "kv-zipf0.6",
            Workload::GraphBfs => "graph-bfs",
            Workload::GraphPagerank => "graph-pagerank",
            Workload::Dataframe => "dataframe",
            Workload::Sort => "sort",
            Workload::Matmul => "matmul",
            Workload::Chase => "chase",
            Workload::Stream => "stream",
        }
    }

    /// The Zipf exponent of a key-value workload.
    pub fn kv_skew(self) -> Option<f64> {
        match self {
            Workload::KvZipf99 => Some(0.99),
            Workload::KvZipf60 => Some(0.6),
            _ => None,
        }
    }

    /// Remora interfaces (and the local baseline) that fit the workload.
    pub fn interfaces(self) -> &'static [Interface] {
        use Interface::*;
        match self {
            Workload::KvZipf99 | Workload::KvZipf60 => &[Local, Paging, Objects, Offload, Regions],
            Workload::GraphBfs | Workload::GraphPagerank | Workload::Sort | Workload::Matmul => {
                &[Local, Paging, Objects]
            }
            Workload::Dataframe => &[Local, Paging, Objects, Offload],
            Workload::Chase => &[Local, Paging, Objects, Offload, Regions],
            Workload::Stream => &[Local, Paging, Objects, Regions],
        }
    }

    /// Peers that run this workload.
    pub fn peers(self) -> &'static [Interface] {
        use Interface::*;
        match self {
            Workload::KvZipf99 | Workload::KvZipf60 => {
                &[Zram, Redis, RedisPipelined, Memcached, MemcachedPipelined]
            }
            _ => &[Zram],
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown workload {s:?} (one of: {})",
                    Workload::ALL.map(|w| w.name()).join(", ")
                )
            })
    }
}

/// How a run reaches its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Interface {
    /// All-local memory: the baseline every slowdown is measured against.
    Local,
    /// Transparent paging: the worker's heap is the far heap of
    /// `remora::FarAlloc` (userfaultfd, local page cache).
    Paging,
    /// Far objects (`FarVec`, `FarHashMap`), fetched into the object cache.
    Objects,
    /// Far objects with the operations that can run at the memory servers
    /// offloaded to them (aggregate, filter, hash probe, pointer chase).
    Offload,
    /// The region API: one-sided reads and writes, no local cache.
    Regions,
    /// Peer: Linux swap to compressed RAM under a cgroup v1 memory limit.
    Zram,
    /// Peer: Redis on loopback, one request at a time.
    Redis,
    /// Peer: Redis on loopback, requests pipelined.
    RedisPipelined,
    /// Peer: memcached on loopback, one request at a time.
    Memcached,
    /// Peer: memcached on loopback, requests pipelined.
    MemcachedPipelined,
}

impl Interface {
    /// Every interface and peer.
    pub const ALL: [Interface; 10] = [
        Interface::Local,
        Interface::Paging,
        Interface::Objects,
        Interface::Offload,
        Interface::Regions,
        Interface::Zram,
        Interface::Redis,
        Interface::RedisPipelined,
        Interface::Memcached,
        Interface::MemcachedPipelined,
    ];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Interface::Local => "local",
            Interface::Paging => "paging",
            Interface::Objects => "objects",
            Interface::Offload => "offload",
            Interface::Regions => "regions",
            Interface::Zram => "zram",
            Interface::Redis => "redis",
            Interface::RedisPipelined => "redis-pipelined",
            Interface::Memcached => "memcached",
            Interface::MemcachedPipelined => "memcached-pipelined",
        }
    }

    /// Whether this is a peer system rather than a Remora interface.
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            Interface::Zram
                | Interface::Redis
                | Interface::RedisPipelined
                | Interface::Memcached
                | Interface::MemcachedPipelined
        )
    }

    /// Whether local memory is a parameter of this interface. Regions have
    /// no cache and the key-value servers hold everything themselves; they
    /// run once per repeat and are recorded at ratio 0.
    pub fn has_ratio(self) -> bool {
        matches!(
            self,
            Interface::Paging | Interface::Objects | Interface::Offload | Interface::Zram
        )
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Interface {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Interface::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown interface {s:?} (one of: {})",
                    Interface::ALL.map(|i| i.name()).join(", ")
                )
            })
    }
}

/// One run's record: every parameter and every figure, one row of the
/// results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Workload name ([`Workload::name`]).
    pub workload: String,
    /// Interface or peer name ([`Interface::name`]).
    pub interface: String,
    /// Local memory as a percentage of the footprint (0 where the
    /// interface has no local memory to size).
    pub ratio: u32,
    /// Repeat number, from 0.
    pub repeat: u32,
    /// Size factor of the workload (1.0 is the default suite).
    pub scale: f64,
    /// Bytes of the workload's data.
    pub footprint: u64,
    /// Operations in the timed phase (lookups, edges, rows, keys, …).
    pub ops: u64,
    /// Seconds of the timed phase.
    pub secs: f64,
    /// `secs` over the median all-local `secs` of the same workload.
    pub slowdown: Option<f64>,
    /// Bytes moved over the network in the timed phase (None where not
    /// measured).
    pub bytes_moved: Option<u64>,
    /// Per-operation latency percentiles in microseconds (p50, p99,
    /// p99.9), where the workload has operations to time.
    pub lat_p50_us: Option<f64>,
    /// p99 latency in microseconds.
    pub lat_p99_us: Option<f64>,
    /// p99.9 latency in microseconds.
    pub lat_p999_us: Option<f64>,
    /// Emulated fabric latency added per reply, in microseconds.
    pub injected_latency_us: u64,
    /// Seed of the workload's data and operations.
    pub seed: u64,
    /// Digest of the result (equal across interfaces for one workload,
    /// scale and seed).
    pub digest: String,
    /// "ok", or why the run failed or was skipped.
    pub status: String,
}

impl RunRecord {
    /// Bytes moved per operation.
    pub fn bytes_per_op(&self) -> Option<f64> {
        let b = self.bytes_moved?;
        (self.ops > 0).then(|| b as f64 / self.ops as f64)
    }

    /// Whether the run finished with a checked result.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}
