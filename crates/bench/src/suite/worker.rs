//! One run of one workload through one interface, in a process of its own
//! (the `remora-bench-worker` binary, whose global allocator is
//! `remora::FarAlloc`). It prints one line of JSON, a [`WorkerReport`], and
//! exits 0; or prints why it failed on stderr and exits 1.
//!
//! * `local`, `zram`: ordinary memory (the zram peer runs the same code
//!   under a cgroup memory limit; `--wait-go` makes it wait for a line on
//!   stdin before it allocates, so that all of its memory is charged).
//! * `paging`: the far heap is started before anything is allocated, so
//!   every byte of the workload's data is far; local memory is unbounded
//!   while data is made and shrinks to the run's share for the timed phase.
//! * `objects`, `offload`: an object cache on the cluster, its budget the
//!   run's share of the footprint during the timed phase.
//! * `regions`: the region API.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};

use super::wl::{self, Kind, Mem, Outcome};
use super::{Interface, Workload};

/// Command-line flags of `remora-bench-worker`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "remora-bench-worker",
    about = "One run of a `remora bench` workload (started by `remora bench`)."
)]
pub struct WorkerArgs {
    /// Workload name.
    #[arg(long)]
    pub workload: Workload,
    /// Interface: local, zram, paging, objects, offload or regions.
    #[arg(long)]
    pub interface: Interface,
    /// Local memory, percent of the footprint (paging, objects, offload).
    #[arg(long, default_value_t = 100)]
    pub ratio: u32,
    /// Size factor of the workload.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Seed of data and operations.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Controller of the cluster (paging, objects, offload, regions).
    #[arg(long)]
    pub controller: Option<String>,
    /// Tenant token.
    #[arg(long)]
    pub token: Option<String>,
    /// Damage the result before its check (to test the check).
    #[arg(long)]
    pub corrupt: bool,
    /// Wait for a line on stdin before allocating anything.
    #[arg(long)]
    pub wait_go: bool,
    /// Limit the worker's own cgroup v1 memory controller to the run's
    /// share of the footprint (plus the memory the process held before it
    /// made any data) for the timed phase: the zram peer.
    #[arg(long)]
    pub limit_memory: bool,
}

/// What a worker prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Bytes of the workload's data.
    pub footprint: u64,
    /// Seconds of the timed phase.
    pub secs: f64,
    /// Operations in the timed phase.
    pub ops: u64,
    /// Digest of the result.
    pub digest: u64,
    /// Bytes moved in the timed phase, where measured.
    pub bytes_moved: Option<u64>,
    /// p50, p99 and p99.9 latency of sampled operations, microseconds.
    pub latency_us: Option<(f64, f64, f64)>,
}

impl WorkerReport {
    /// The report of a workload's outcome.
    pub fn new(footprint: u64, mut o: Outcome) -> WorkerReport {
        WorkerReport {
            footprint,
            secs: o.secs,
            ops: o.ops,
            digest: o.digest,
            bytes_moved: o.bytes_moved,
            latency_us: wl::percentiles(&mut o.lat_us),
        }
    }
}

/// Bytes of a workload's data at `scale`.
pub fn footprint(w: Workload, scale: f64) -> u64 {
    match w {
        Workload::KvZipf99 | Workload::KvZipf60 => {
            wl::kv::KvParams::new(w.kv_skew().unwrap_or(1.0), scale, 0).footprint()
        }
        Workload::GraphBfs => wl::graph::footprint(scale, false),
        Workload::GraphPagerank => wl::graph::footprint(scale, true),
        Workload::Dataframe => wl::dataframe::footprint(scale),
        Workload::Sort => wl::sort::footprint(scale),
        Workload::Matmul => wl::matmul::footprint(scale),
        Workload::Chase => wl::chase::footprint(scale),
        Workload::Stream => wl::stream::footprint(scale),
    }
}

/// Runs workload `w` in `mem`.
pub fn run_workload(
    w: Workload,
    mem: &Mem,
    scale: f64,
    seed: u64,
    corrupt: bool,
) -> Result<Outcome> {
    match w {
        Workload::KvZipf99 | Workload::KvZipf60 => {
            wl::kv::run(mem, w.kv_skew().unwrap_or(1.0), scale, seed, corrupt)
        }
        Workload::GraphBfs => wl::graph::run(mem, scale, seed, false, corrupt),
        Workload::GraphPagerank => wl::graph::run(mem, scale, seed, true, corrupt),
        Workload::Dataframe => wl::dataframe::run(mem, scale, seed, corrupt),
        Workload::Sort => wl::sort::run(mem, scale, seed, corrupt),
        Workload::Matmul => wl::matmul::run(mem, scale, seed, corrupt),
        Workload::Chase => wl::chase::run(mem, scale, seed, corrupt),
        Workload::Stream => wl::stream::run(mem, scale, seed, corrupt),
    }
}

/// Local memory a paging run gets beyond its share of the footprint: the
/// free pages its pager keeps in reserve below the budget (a sixteenth,
/// at most 8 MiB), and 1 MiB for the heap's own small allocations. Object
/// runs get their share exactly; zram runs get their share plus what the
/// worker process held before it made any data.
pub fn paging_reserve(share: u64) -> u64 {
    (share / 16).min(8 << 20) + (1 << 20)
}

/// Far heap size of a paging run: room for the data and what making it
/// takes (edge lists, copies), reserved on the servers, touched as used.
pub fn paging_heap_size(footprint: u64) -> u64 {
    (footprint * 4 + (512 << 20)).next_multiple_of(1 << 20)
}

/// Does the run the flags describe.
pub fn run(a: &WorkerArgs) -> Result<WorkerReport> {
    if !a.workload.interfaces().contains(&a.interface) && a.interface != Interface::Zram {
        bail!(
            "{} does not run through {} (it runs through: {})",
            a.workload,
            a.interface,
            a.workload
                .interfaces()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !(1..=100).contains(&a.ratio) {
        bail!(
            "--ratio must be 1 to 100 (percent of the footprint), not {}",
            a.ratio
        );
    }
    if !(a.scale > 0.0 && a.scale.is_finite()) {
        bail!("--scale must be a positive number, not {}", a.scale);
    }
    if a.wait_go {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("waiting for go")?;
    }
    let fp = footprint(a.workload, a.scale);
    let budget = (fp as f64 * a.ratio as f64 / 100.0) as u64;
    let cluster = || -> Result<remora_client::Cluster> {
        let (Some(c), Some(t)) = (&a.controller, &a.token) else {
            bail!("--interface {} needs --controller and --token", a.interface);
        };
        remora_client::Cluster::connect(c, t).with_context(|| format!("connecting to {c}"))
    };
    if a.limit_memory && a.interface != Interface::Zram {
        bail!("--limit-memory is for --interface zram");
    }
    let baseline = if a.limit_memory { wl::own_rss()? } else { 0 };
    let mem = match a.interface {
        Interface::Local => Mem::plain(),
        Interface::Zram => Mem {
            cgroup_limit: a.limit_memory.then_some(budget + baseline + (1 << 20)),
            ..Mem::plain()
        },
        Interface::Paging => {
            let (Some(c), Some(t)) = (&a.controller, &a.token) else {
                bail!("--interface paging needs --controller and --token");
            };
            let size = paging_heap_size(fp);
            let opts = remora_paging::HeapOptions {
                controller: c.clone(),
                token: t.clone(),
                size,
                region_name: None,
                pager: remora_paging::PagerConfig {
                    budget: remora_paging::Budget::Bytes(size),
                    ..remora_paging::PagerConfig::default()
                },
            };
            remora_paging::FarAlloc::start(&opts).context("starting the far heap")?;
            Mem {
                kind: Kind::Plain,
                budget: Some(budget + paging_reserve(budget)),
                cgroup_limit: None,
            }
        }
        Interface::Objects | Interface::Offload => {
            let cl = cluster()?;
            let cache = remora_objects::ObjectCache::new(
                cl.clone(),
                remora_objects::CacheConfig {
                    budget: Mem::LOAD_BUDGET,
                    ..remora_objects::CacheConfig::default()
                },
            )?;
            Mem {
                kind: Kind::Objects {
                    cache,
                    cluster: cl,
                    offload: a.interface == Interface::Offload,
                },
                budget: Some(budget.max(1 << 20)),
                cgroup_limit: None,
            }
        }
        Interface::Regions => Mem {
            kind: Kind::Regions(cluster()?),
            budget: None,
            cgroup_limit: None,
        },
        other => bail!("{other} is a peer, not something a worker runs"),
    };
    let o = run_workload(a.workload, &mem, a.scale, a.seed, a.corrupt)?;
    Ok(WorkerReport::new(fp, o))
}

/// The worker's `main`: parses flags, runs, prints the report.
pub fn main() -> std::process::ExitCode {
    // A worker outlives nothing: if `remora bench` dies, so does the run.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no
    // memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let a = WorkerArgs::parse();
    match run(&a) {
        Ok(r) => match serde_json::to_string(&r) {
            Ok(line) => {
                println!("{line}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("remora-bench-worker: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!(
                "remora-bench-worker: {} via {}: {e:#}",
                a.workload, a.interface
            );
            std::process::ExitCode::FAILURE
        }
    }
}
