//! The sweep: which runs to make, making them one worker process at a
//! time, repeats and medians, the check that every interface computed the
//! all-local answer, and progress bars.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::peers;
use super::results::median;
use super::wl::kv::KvParams;
use super::worker::{footprint, WorkerReport};
use super::{Interface, RunRecord, Workload};

/// What `remora bench` runs.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Interfaces and peers to run (local always runs: it is the baseline).
    pub interfaces: Vec<Interface>,
    /// Local memory ratios in percent.
    pub ratios: Vec<u32>,
    /// Ratios at which the zram peer runs (None: every ratio below 100).
    pub zram_ratios: Option<Vec<u32>>,
    /// Workloads the zram peer runs (None: all).
    pub zram_workloads: Option<Vec<Workload>>,
    /// Repeats of each point.
    pub repeat: u32,
    /// Size factor of every workload.
    pub scale: f64,
    /// Seed of every workload.
    pub seed: u64,
    /// Latency the memory servers add to every reply, in microseconds.
    pub latency_us: u64,
    /// Longest a single run may take.
    pub run_timeout: Duration,
}

impl SuiteOptions {
    /// The default suite: every workload, interface and peer, at 100, 75,
    /// 50, 25 and 10% local memory, three repeats, scale 1.
    pub fn full() -> SuiteOptions {
        SuiteOptions {
            workloads: Workload::ALL.to_vec(),
            interfaces: Interface::ALL.to_vec(),
            ratios: vec![100, 75, 50, 25, 10],
            zram_ratios: None,
            zram_workloads: None,
            repeat: 3,
            scale: 1.0,
            seed: 42,
            latency_us: 0,
            run_timeout: Duration::from_secs(900),
        }
    }

    /// The quick suite: every workload and interface at 100 and 25% local
    /// memory at a quarter of the size, once; the key-value peers, and
    /// zram for the key-value store at 25%.
    pub fn quick() -> SuiteOptions {
        SuiteOptions {
            ratios: vec![100, 25],
            zram_ratios: Some(vec![25]),
            zram_workloads: Some(vec![Workload::KvZipf99]),
            repeat: 1,
            scale: 0.25,
            run_timeout: Duration::from_secs(300),
            ..SuiteOptions::full()
        }
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.workloads.is_empty() {
            bail!("no workloads selected");
        }
        if self.repeat == 0 {
            bail!("--repeat must be at least 1");
        }
        if self.ratios.is_empty() {
            bail!("no local-memory ratios given");
        }
        if let Some(r) = self.ratios.iter().find(|r| !(1..=100).contains(*r)) {
            bail!("local-memory ratio {r}% is not between 1 and 100");
        }
        if !(self.scale > 0.0 && self.scale <= 64.0) {
            bail!("--scale must be above 0 and at most 64, not {}", self.scale);
        }
        Ok(())
    }

    /// The runs, in the order they are made.
    pub fn plan(&self) -> Vec<RunSpec> {
        let mut v = Vec::new();
        for &w in &self.workloads {
            for r in 0..self.repeat {
                v.push(RunSpec::new(w, Interface::Local, 0, r));
            }
            let chosen = |i: &Interface| self.interfaces.contains(i);
            for &i in w.interfaces().iter().chain(w.peers()).filter(|i| chosen(i)) {
                if i == Interface::Local {
                    continue;
                }
                if i == Interface::Zram
                    && !self
                        .zram_workloads
                        .as_ref()
                        .is_none_or(|ws| ws.contains(&w))
                {
                    continue;
                }
                let ratios: Vec<u32> = if i == Interface::Zram {
                    match &self.zram_ratios {
                        Some(z) => z.clone(),
                        None => self.ratios.iter().copied().filter(|&r| r < 100).collect(),
                    }
                } else if i.has_ratio() {
                    self.ratios.clone()
                } else {
                    vec![0]
                };
                for ratio in ratios {
                    for r in 0..self.repeat {
                        v.push(RunSpec::new(w, i, ratio, r));
                    }
                }
            }
        }
        v
    }

    /// Largest footprint among the workloads.
    pub fn max_footprint(&self) -> u64 {
        self.workloads
            .iter()
            .map(|&w| footprint(w, self.scale))
            .max()
            .unwrap_or(0)
    }
}

/// One run to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSpec {
    /// The workload.
    pub workload: Workload,
    /// Through what.
    pub interface: Interface,
    /// Local memory in percent (0: not a parameter).
    pub ratio: u32,
    /// Repeat number.
    pub repeat: u32,
}

impl RunSpec {
    fn new(workload: Workload, interface: Interface, ratio: u32, repeat: u32) -> RunSpec {
        RunSpec {
            workload,
            interface,
            ratio,
            repeat,
        }
    }

    fn label(&self) -> String {
        if self.ratio > 0 {
            format!(
                "{} via {} at {}% (#{})",
                self.workload,
                self.interface,
                self.ratio,
                self.repeat + 1
            )
        } else {
            format!(
                "{} via {} (#{})",
                self.workload,
                self.interface,
                self.repeat + 1
            )
        }
    }
}

/// How runs reach the cluster and the worker program.
#[derive(Debug, Clone)]
pub struct Target {
    /// Controller address.
    pub controller: String,
    /// Tenant token.
    pub token: String,
    /// The `remora-bench-worker` executable.
    pub worker: PathBuf,
}

/// Finds `remora-bench-worker` next to the running executable.
pub fn find_worker() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("this executable has no directory")?;
    for d in [dir.to_path_buf(), dir.join("..")] {
        let p = d.join("remora-bench-worker");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "remora-bench-worker not found next to {} (build it with `cargo build --release`)",
        exe.display()
    )
}

/// What the sweep produced.
#[derive(Debug, Clone)]
pub struct SuiteOutcome {
    /// One record per run.
    pub records: Vec<RunRecord>,
    /// Things a reader of the report should know (peers skipped, …).
    pub notes: Vec<String>,
    /// Remora runs that failed or computed a wrong answer.
    pub failures: usize,
}

/// Runs the suite.
pub fn run(opts: &SuiteOptions, target: &Target) -> Result<SuiteOutcome> {
    opts.validate()?;
    let plan = opts.plan();
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = ProgressBar::new(plan.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} runs  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    } else {
        ProgressBar::hidden()
    };
    let say = |line: String| {
        if tty {
            bar.println(line);
        } else {
            eprintln!("{line}");
        }
    };

    let mut notes = Vec::new();
    let zram = if plan.iter().any(|s| s.interface == Interface::Zram) {
        match peers::ZramSwap::setup(opts.max_footprint() * 2 + (256 << 20)) {
            Ok(mut z) => {
                z.set_timeout(opts.run_timeout);
                Some(z)
            }
            Err(e) => {
                let n = format!("zram peer skipped: {e:#}");
                say(n.clone());
                notes.push(n);
                None
            }
        }
    } else {
        None
    };

    let admin = remora_client::Cluster::connect(&target.controller, &target.token)
        .with_context(|| format!("connecting to {}", target.controller))?;
    let mut records: Vec<RunRecord> = Vec::with_capacity(plan.len());
    let mut local_secs: HashMap<Workload, Vec<f64>> = HashMap::new();
    let mut local_digest: HashMap<Workload, String> = HashMap::new();
    let mut failures = 0;
    for spec in &plan {
        if interrupted() {
            let n = format!("interrupted: {} of {} runs made", records.len(), plan.len());
            say(n.clone());
            notes.push(n);
            break;
        }
        bar.set_message(spec.label());
        let t = Instant::now();
        let mut rec = record(opts, spec);
        let result = if spec.interface == Interface::Zram && zram.is_none() {
            Err(Skip("zram not available here (see the notes)".into()).into())
        } else {
            run_one(opts, target, spec, zram.as_ref())
        };
        // The cluster is the suite's own: whatever a run allocated (its far
        // heap, its cache's regions) goes back before the next, even if the
        // worker died without freeing it.
        if let Err(e) = free_all(&admin) {
            say(format!("warning: freeing the last run's regions: {e:#}"));
        }
        match result {
            Ok(r) => {
                rec.footprint = r.footprint;
                rec.secs = r.secs;
                rec.ops = r.ops;
                rec.digest = format!("{:016x}", r.digest);
                rec.bytes_moved = r.bytes_moved;
                if let Some((a, b, c)) = r.latency_us {
                    rec.lat_p50_us = Some(a);
                    rec.lat_p99_us = Some(b);
                    rec.lat_p999_us = Some(c);
                }
                rec.status = "ok".into();
                if spec.interface == Interface::Local {
                    let d = local_digest
                        .entry(spec.workload)
                        .or_insert_with(|| rec.digest.clone());
                    if *d == rec.digest {
                        local_secs.entry(spec.workload).or_default().push(r.secs);
                    } else {
                        rec.status = format!(
                            "error: all-local runs disagree (digest {} vs {d})",
                            rec.digest
                        );
                    }
                } else {
                    match local_digest.get(&spec.workload) {
                        Some(d) if *d != rec.digest => {
                            rec.status = format!(
                                "error: wrong answer: digest {} differs from all-local {d}",
                                rec.digest
                            );
                        }
                        Some(_) => {}
                        None => {
                            rec.status =
                                "error: unchecked: the all-local baseline failed".to_string();
                        }
                    }
                }
            }
            Err(e) => {
                rec.status = if let Some(s) = e.downcast_ref::<Skip>() {
                    format!("skipped: {}", s.0)
                } else if let Some(u) = e.downcast_ref::<peers::Unavailable>() {
                    format!("skipped: {}", u.0)
                } else if spec.interface == Interface::Paging
                    && format!("{e:#}").contains("starting the far heap: userfaultfd")
                {
                    // Not permitted here (neither root nor
                    // vm.unprivileged_userfaultfd=1): the machine's limit,
                    // not a failure of the run.
                    format!("skipped: {e:#}")
                } else {
                    format!("error: {e:#}")
                };
                if spec.interface == Interface::Local {
                    rec.status = format!("error: the all-local baseline failed: {e:#}");
                }
            }
        }
        if let Some(l) = local_secs
            .get(&spec.workload)
            .and_then(|v| median(&mut v.clone()))
        {
            if rec.ok() && l > 0.0 {
                rec.slowdown = Some(rec.secs / l);
            }
        }
        // A peer that fails is reported, but it is not Remora failing.
        if rec.status.starts_with("error") && !spec.interface.is_peer() {
            failures += 1;
        }
        say(format!(
            "{:<44} {}  ({:.1} s)",
            spec.label(),
            if rec.ok() {
                match rec.slowdown {
                    Some(s) => format!("{:.3} s  {s:.2}x", rec.secs),
                    None => format!("{:.3} s", rec.secs),
                }
            } else {
                rec.status.clone()
            },
            t.elapsed().as_secs_f64()
        ));
        records.push(rec);
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Slowdowns against the median of all the local repeats (the first
    // runs saw only the repeats made before them).
    for rec in records.iter_mut().filter(|r| r.ok()) {
        let w: Workload = rec.workload.parse().map_err(anyhow::Error::msg)?;
        if let Some(l) = local_secs.get(&w).and_then(|v| median(&mut v.clone())) {
            rec.slowdown = (l > 0.0).then(|| rec.secs / l);
        }
    }
    drop(zram);
    Ok(SuiteOutcome {
        records,
        notes,
        failures,
    })
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running suite to stop: the run in progress is killed, no more
/// start, and the results so far are kept (for a Ctrl-C handler).
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Frees every region of the tenant.
fn free_all(c: &remora_client::Cluster) -> Result<()> {
    for r in c.list_regions()? {
        c.free_region(r.id)?;
    }
    Ok(())
}

/// A run that could not be made here (not a failure of Remora).
#[derive(Debug)]
struct Skip(String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

fn record(opts: &SuiteOptions, spec: &RunSpec) -> RunRecord {
    RunRecord {
        workload: spec.workload.name().into(),
        interface: spec.interface.name().into(),
        ratio: spec.ratio,
        repeat: spec.repeat,
        scale: opts.scale,
        footprint: footprint(spec.workload, opts.scale),
        ops: 0,
        secs: 0.0,
        slowdown: None,
        bytes_moved: None,
        lat_p50_us: None,
        lat_p99_us: None,
        lat_p999_us: None,
        injected_latency_us: opts.latency_us,
        seed: opts.seed,
        digest: String::new(),
        status: String::new(),
    }
}

/// The worker command for a run.
pub fn worker_command(opts: &SuiteOptions, target: &Target, spec: &RunSpec) -> Command {
    let mut c = Command::new(&target.worker);
    c.arg("--workload")
        .arg(spec.workload.name())
        .arg("--interface")
        .arg(spec.interface.name())
        .arg("--ratio")
        .arg(spec.ratio.max(1).to_string())
        .arg("--scale")
        .arg(opts.scale.to_string())
        .arg("--seed")
        .arg(opts.seed.to_string())
        .arg("--controller")
        .arg(&target.controller)
        .arg("--token")
        .arg(&target.token);
    c
}

fn run_one(
    opts: &SuiteOptions,
    target: &Target,
    spec: &RunSpec,
    zram: Option<&peers::ZramSwap>,
) -> Result<WorkerReport> {
    let fp = footprint(spec.workload, opts.scale);
    match spec.interface {
        Interface::Redis
        | Interface::RedisPipelined
        | Interface::Memcached
        | Interface::MemcachedPipelined => {
            let Some(skew) = spec.workload.kv_skew() else {
                bail!("{} has no key-value peer", spec.workload);
            };
            let p = KvParams::new(skew, opts.scale, opts.seed);
            Ok(WorkerReport::new(fp, peers::kv_peer(spec.interface, &p)?))
        }
        Interface::Zram => {
            let z = zram.context("zram is not set up")?;
            // Data is made with memory to spare; the worker lowers its
            // cgroup's limit to the run's share (plus what the process held
            // before making data) for the timed phase. Under heavy swapping
            // the kernel's cgroup v1 controller sometimes OOM-kills a
            // process that fits in limit plus swap (every refaulted page is
            // active, none is left to reclaim): such a run is tried again,
            // up to three times in all.
            let mut tries = 0;
            loop {
                tries += 1;
                let mut c = worker_command(opts, target, spec);
                c.arg("--wait-go").arg("--limit-memory");
                match z.run_limited(fp * 3 + (512 << 20), c) {
                    Ok(out) => return parse_report(&out),
                    Err(e) if tries < 3 && format!("{e:#}").contains("OOM killer") => continue,
                    Err(e) if format!("{e:#}").contains("OOM killer") => {
                        bail!("the kernel OOM-killed the zram run {tries} times: {e:#}")
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        _ => {
            let c = worker_command(opts, target, spec);
            run_worker(c, opts.run_timeout)
        }
    }
}

fn parse_report(stdout: &str) -> Result<WorkerReport> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("the worker printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("the worker printed {line:?}"))
}

/// Runs a worker to completion (killing it after `timeout`) and parses its
/// report; a failed worker's error is the last line it wrote to stderr.
pub fn run_worker(mut c: Command, timeout: Duration) -> Result<WorkerReport> {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting remora-bench-worker")?;
    let mut out = child.stdout.take().context("worker stdout")?;
    let mut err = child.stderr.take().context("worker stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).context("waiting for the worker");
            }
        }
        let why = if start.elapsed() > timeout {
            Some(format!("timed out after {} s", timeout.as_secs()))
        } else if interrupted() {
            Some("interrupted".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{why}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        let why = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim_start_matches("remora-bench-worker: ")
            .to_string();
        bail!("{why} ({status})");
    }
    parse_report(&stdout)
}

/// Prints the table of median slowdowns (rows: workload and interface,
/// columns: ratios) to stdout.
pub fn print_summary(records: &[RunRecord], ratios: &[u32]) {
    let mut cols: Vec<u32> = ratios.to_vec();
    cols.sort_unstable_by(|a, b| b.cmp(a));
    let mut rows: Vec<(String, String)> = Vec::new();
    for r in records {
        let k = (r.workload.clone(), r.interface.clone());
        if !rows.contains(&k) {
            rows.push(k);
        }
    }
    print!("{:<16} {:<20}", "workload", "interface");
    for c in &cols {
        print!(" {:>9}", format!("{c}%"));
    }
    println!(" {:>9}", "no cache");
    for (w, i) in rows {
        print!("{w:<16} {i:<20}");
        let cell = |ratio: u32| -> String {
            let mut v: Vec<f64> = records
                .iter()
                .filter(|r| r.workload == w && r.interface == i && r.ratio == ratio && r.ok())
                .filter_map(|r| r.slowdown)
                .collect();
            let any = records
                .iter()
                .any(|r| r.workload == w && r.interface == i && r.ratio == ratio);
            match median(&mut v) {
                Some(m) => format!("{m:.2}x"),
                None if any => "failed".into(),
                None => "".into(),
            }
        };
        if i == "local" {
            for _ in &cols {
                print!(" {:>9}", "");
            }
            println!(" {:>9}", format!("{:.3}s", local_secs(records, &w)));
            continue;
        }
        for &c in &cols {
            print!(" {:>9}", cell(c));
        }
        println!(" {:>9}", cell(0));
    }
}

fn local_secs(records: &[RunRecord], w: &str) -> f64 {
    let mut v: Vec<f64> = records
        .iter()
        .filter(|r| r.workload == w && r.interface == "local" && r.ok())
        .map(|r| r.secs)
        .collect();
    median(&mut v).unwrap_or(f64::NAN)
}

/// Where a suite's files go: `dir`, created if needed.
pub fn prepare_out(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
