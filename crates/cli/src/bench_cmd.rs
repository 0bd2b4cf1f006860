//! `remora bench` with no subcommand: the benchmark suite on an embedded
//! cluster (see `remora_bench::suite`), and `remora bench report`.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Args;
use remora_bench::suite::report::{self, ReportMeta};
use remora_bench::suite::runner::{self, SuiteOptions, Target};
use remora_bench::suite::{results, worker, Interface, Workload};

use crate::embedded::{Embedded, EmbeddedConfig};

/// Flags of the suite.
#[derive(Args, Debug, Default)]
pub struct SuiteArgs {
    /// The quick suite (about a minute): every workload and interface at
    /// 100% and 25% local memory, a quarter of the size, once, with the
    /// key-value peers and zram for the key-value store.
    #[arg(long)]
    quick: bool,
    /// Workloads to run (default: all).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    workloads: Vec<Workload>,
    /// Interfaces and peers to run (default: all; local always runs).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    interfaces: Vec<Interface>,
    /// Local memory in percent of each workload's footprint
    /// (default 100,75,50,25,10).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    ratios: Vec<u32>,
    /// Repeats of each point; the median is reported (default 3).
    #[arg(long)]
    repeat: Option<u32>,
    /// Size factor of every workload (default 1; --quick: 0.25).
    #[arg(long)]
    scale: Option<f64>,
    /// Seed of every workload's data and operations.
    #[arg(long)]
    seed: Option<u64>,
    /// Fabric latency the memory servers add to every reply (e.g. 5us;
    /// default off).
    #[arg(long, value_parser = crate::duration_arg)]
    latency: Option<Duration>,
    /// Longest one run may take before it is killed and recorded as failed.
    #[arg(long, value_parser = crate::duration_arg)]
    run_timeout: Option<Duration>,
    /// Where results, plots and the report go.
    #[arg(long, default_value = "remora-bench-report")]
    out: PathBuf,
}

/// Runs the suite and writes its results and report.
pub fn suite(a: SuiteArgs) -> Result<()> {
    let mut o = if a.quick {
        SuiteOptions::quick()
    } else {
        SuiteOptions::full()
    };
    if !a.workloads.is_empty() {
        o.workloads = a.workloads;
    }
    if !a.interfaces.is_empty() {
        o.interfaces = a.interfaces;
    }
    if !a.ratios.is_empty() {
        o.ratios = a.ratios;
        o.zram_ratios = None;
    }
    if let Some(r) = a.repeat {
        o.repeat = r;
    }
    if let Some(s) = a.scale {
        o.scale = s;
    }
    if let Some(s) = a.seed {
        o.seed = s;
    }
    if let Some(l) = a.latency {
        o.latency_us = l.as_micros() as u64;
    }
    if let Some(t) = a.run_timeout {
        o.run_timeout = t;
    }
    o.validate()?;
    let worker_exe = runner::find_worker()?;
    runner::prepare_out(&a.out)?;
    let started = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let t0 = Instant::now();

    let fp = o.max_footprint();
    let mut cfg = EmbeddedConfig::loopback(2, worker::paging_heap_size(fp) + (1 << 30));
    // Slabs as large as the pointer-chasing list at scale 1, so that a
    // server-side traversal can follow it without crossing servers.
    cfg.slab_size = 64 << 20;
    if o.latency_us > 0 {
        cfg.inject_latency = Some(format!("{}us", o.latency_us));
    }
    let runs = o.plan().len();
    eprintln!(
        "remora bench: {} workloads, {runs} runs, scale {}, {} repeat(s); starting an embedded cluster (2 servers) ...",
        o.workloads.len(),
        o.scale,
        o.repeat
    );
    // Ctrl-C (or SIGTERM) stops the suite between runs, killing the run
    // in progress; the cluster and the zram device are still torn down
    // and the results so far still written.
    let _ = ctrlc::set_handler(runner::interrupt);
    let cluster = Embedded::start(&cfg)?;
    let target = Target {
        controller: cluster.info.controller.clone(),
        token: cluster.info.token.clone(),
        worker: worker_exe,
    };
    let out = runner::run(&o, &target)?;
    drop(cluster);

    results::write(&out.records, &a.out)?;
    let meta = ReportMeta {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: report::machine_description(),
        started,
        duration_secs: t0.elapsed().as_secs_f64(),
        notes: out.notes.clone(),
    };
    let html = report::render(&out.records, &meta, &a.out)?;
    println!();
    println!("median slowdown against all-local memory, by local memory (percent of footprint):");
    runner::print_summary(&out.records, &o.ratios);
    println!();
    for n in &out.notes {
        println!("note: {n}");
    }
    println!(
        "results: {} and {}",
        a.out.join("results.json").display(),
        a.out.join("results.csv").display()
    );
    println!("report:  {}", html.display());
    if out.failures > 0 {
        bail!(
            "{} run(s) failed or computed a wrong answer (see the report's failed runs)",
            out.failures
        );
    }
    Ok(())
}

/// `remora bench report`: renders the report again from a results file.
pub fn rerender(from: PathBuf, out: PathBuf) -> Result<()> {
    let records = results::load(&from)?;
    runner::prepare_out(&out)?;
    let meta = ReportMeta {
        command: format!("rendered from {}", from.display()),
        machine: report::machine_description(),
        started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        duration_secs: 0.0,
        notes: Vec::new(),
    };
    let html = report::render(&records, &meta, &out)
        .with_context(|| format!("rendering the report into {}", out.display()))?;
    println!("report: {}", html.display());
    Ok(())
}
