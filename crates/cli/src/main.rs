//! `remora`: one binary for every role.
//!
//! `up` (embedded cluster), `server`, `controller`, `status`, `region`
//! (the administrator's tool for far memory) and `bench`.

/// `println!` for command output: a closed pipe (`remora status | head`)
/// ends the program quietly instead of panicking.
macro_rules! outln {
    () => {
        $crate::write_out(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

mod bench_cmd;
mod embedded;
mod region_cmd;
mod run_cmd;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use remora_client::{ClientOptions, Cluster};
use remora_proto::size::{parse_size, Bytes};

use embedded::{ClusterInfo, Embedded, EmbeddedConfig};

#[derive(Parser, Debug)]
#[command(
    name = "remora",
    version,
    about = "Remora: far memory pooled across memory servers",
    long_about = "Remora pools DRAM of memory servers into far memory that applications use \
                  through regions (one-sided reads, writes and atomics).\n\n\
                  Start a cluster on this machine with `remora up`, then use `remora status` \
                  and `remora region ...` from another terminal."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Exit when the process with this pid is no longer our parent (used by `remora up`).
    #[arg(long, global = true, hide = true)]
    exit_with_parent: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start an embedded cluster (controller + N memory servers) on loopback.
    Up(UpArgs),
    /// Run a memory server.
    Server(ServerArgs),
    /// Run the controller.
    Controller(ControllerArgs),
    /// Show servers, tenants and regions.
    Status(ClientArgs),
    /// Manage and access regions.
    #[command(subcommand)]
    Region(region_cmd::RegionCmd),
    /// Run the benchmark suite (with no subcommand), or one of the focused
    /// benchmarks.
    Bench(BenchArgs),
    /// Run an unmodified program with its heap in far memory.
    Run(run_cmd::RunArgs),
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    remora_net::parse_duration(s)
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Number of memory servers.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Capacity of each memory server (e.g. 512MiB, 4GiB).
    #[arg(long, default_value = "1GiB", value_parser = size_arg)]
    capacity_per_server: u64,
    /// Controller listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    controller_listen: String,
    /// Slab size.
    #[arg(long, default_value = "1MiB", value_parser = size_arg)]
    slab_size: u64,
    /// Placement policy: p2c or least-loaded.
    #[arg(long, default_value = "p2c")]
    placement: String,
    /// Keep controller metadata here (default: a temporary directory removed on exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Delay added by the servers to every received message (e.g. 5us).
    #[arg(long, value_parser = duration_arg)]
    inject_latency: Option<Duration>,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7071")]
    listen: String,
    /// Address to advertise to the controller and clients (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Controller address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    controller: String,
    /// Memory to serve (e.g. 4GiB).
    #[arg(long, default_value = "1GiB", value_parser = size_arg)]
    capacity: u64,
    /// Delay added to every received message (e.g. 5us).
    #[arg(long, value_parser = duration_arg)]
    inject_latency: Option<Duration>,
    /// Largest frame accepted.
    #[arg(long, default_value = "16MiB", value_parser = size_arg)]
    max_frame: u64,
    /// Most authenticated client connections served at once (more are
    /// refused in their handshake with "overloaded").
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most authenticated connections of one tenant at once (default: a
    /// quarter of --max-connections).
    #[arg(long)]
    max_connections_per_tenant: Option<usize>,
    /// Most connections that have not authenticated yet; a new one at the
    /// limit closes the oldest.
    #[arg(long, default_value_t = 256)]
    max_unauthenticated: usize,
    /// How long a new connection may take to authenticate (the whole
    /// handshake; also all that a connection without a credential may do).
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    handshake_timeout: Duration,
    /// Close an authenticated connection that sends nothing for this long
    /// (clients reconnect by themselves).
    #[arg(long, default_value = "600s", value_parser = duration_arg)]
    idle_timeout: Duration,
    /// Memory all connections' receive and reply buffers may hold
    /// together (at least 32MiB); requests beyond it are refused with
    /// "overloaded", nothing applied.
    #[arg(long, default_value = "256MiB", value_parser = size_arg)]
    buffer_budget: u64,
    /// Secret to present to the controller when registering.
    #[arg(long, env = "REMORA_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
}

#[derive(Args, Debug)]
struct ControllerArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<String>,
    /// TOML config file (settings and tenants).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the metadata store (default: in memory, nothing persists).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cluster slab size.
    #[arg(long, value_parser = size_arg)]
    slab_size: Option<u64>,
    /// Placement policy: p2c or least-loaded.
    #[arg(long)]
    placement: Option<String>,
    /// Declare a server dead after this long without heartbeats (e.g. 2s).
    #[arg(long, value_parser = duration_arg)]
    dead_after: Option<Duration>,
    /// How often servers heartbeat (e.g. 200ms).
    #[arg(long, value_parser = duration_arg)]
    heartbeat_interval: Option<Duration>,
    /// Bytes per second a rebuild of lost slabs may move (e.g. 256MiB).
    #[arg(long, value_parser = size_arg)]
    rebuild_rate: Option<u64>,
    /// Add an unlimited admin tenant "default" with this token.
    #[arg(long, env = "REMORA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Secret memory servers must present to register.
    #[arg(long, env = "REMORA_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
}

/// How client commands find the cluster.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Controller address (default: the cluster `remora up` started).
    #[arg(long, env = "REMORA_CONTROLLER")]
    controller: Option<String>,
    /// Tenant token (default: the cluster `remora up` started).
    #[arg(long, env = "REMORA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Delay added to every received reply (e.g. 5us).
    #[arg(long, value_parser = duration_arg)]
    inject_latency: Option<Duration>,
    /// Deadline of each request to a server (default 5s).
    #[arg(long, value_parser = duration_arg)]
    timeout: Option<Duration>,
    /// How long an operation on a replicated or erasure-coded region keeps
    /// failing over while a dead server is detected and rebuilt (default 10s).
    #[arg(long, value_parser = duration_arg)]
    failover_timeout: Option<Duration>,
}

impl ClientArgs {
    fn info(&self) -> Result<ClusterInfo> {
        match (&self.controller, &self.token) {
            (Some(c), Some(t)) => Ok(ClusterInfo {
                controller: c.clone(),
                token: t.clone(),
            }),
            (c, t) => {
                let mut f = embedded::read_cluster_file(&embedded::cluster_file())?;
                if let Some(c) = c {
                    f.controller = c.clone();
                }
                if let Some(t) = t {
                    f.token = t.clone();
                }
                Ok(f)
            }
        }
    }

    /// Connects to the cluster.
    pub fn connect(&self) -> Result<Cluster> {
        if self.timeout.is_some_and(|t| t.is_zero())
            || self.failover_timeout.is_some_and(|t| t.is_zero())
        {
            bail!("--timeout and --failover-timeout must be positive");
        }
        let info = self.info()?;
        let d = ClientOptions::default();
        let opts = ClientOptions {
            inject_latency: self.inject_latency.unwrap_or_default(),
            request_timeout: self.timeout.unwrap_or(d.request_timeout),
            failover_timeout: self.failover_timeout.unwrap_or(d.failover_timeout),
            ..d
        };
        Cluster::connect_with(&info.controller, &info.token, opts)
            .with_context(|| format!("connecting to the controller at {}", info.controller))
    }
}

/// `remora bench`: with no subcommand, the standard suite on an embedded
/// cluster; it leaves results (JSON, CSV), plots and an HTML report in
/// `--out`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    #[command(flatten)]
    suite: bench_cmd::SuiteArgs,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Render the suite's report again from a results file.
    Report {
        /// A results.json written by `remora bench`.
        #[arg(long)]
        from: std::path::PathBuf,
        /// Where the report goes.
        #[arg(long, default_value = "remora-bench-report")]
        out: std::path::PathBuf,
    },
    /// Region read/write latency and throughput against raw loopback TCP, in one run.
    Micro(MicroArgs),
    /// Costs of each slab size (allocation, map size, streaming, fragmentation).
    Slabs {
        /// Slab sizes to compare.
        #[arg(long, value_delimiter = ',', default_value = "64KiB,256KiB,1MiB,4MiB,16MiB", value_parser = size_arg)]
        sizes: Vec<u64>,
    },
    /// Far page faults and array scans at shrinking local memory, against raw
    /// userfaultfd + TCP, all-local memory, raw TCP streaming and zram swap.
    Paging {
        /// Bytes in the scanned array.
        #[arg(long, default_value = "2GiB", value_parser = size_arg)]
        size: u64,
        /// Random 8-byte reads per random scan.
        #[arg(long, default_value_t = 200_000)]
        random_reads: u64,
        /// Local memory ratios in percent.
        #[arg(long, value_delimiter = ',', default_value = "100,75,50,25,10")]
        ratios: Vec<u32>,
        /// Skip the zram swap comparison.
        #[arg(long)]
        no_zram: bool,
    },
    /// Far objects: dereference cost against Box and HashMap, FarHashMap
    /// lookups (fetch vs offload vs paging), FarVec sum (offloaded vs
    /// fetched vs raw TCP) and a random gather (objects vs paging).
    Objects {
        /// Keys in the hash map.
        #[arg(long, default_value_t = 200_000)]
        keys: u64,
        /// Lookups per hash-map row.
        #[arg(long, default_value_t = 100_000)]
        gets: u64,
        /// Bytes of the summed vector (the cache gets a tenth).
        #[arg(long, default_value = "256MiB", value_parser = size_arg)]
        sum_size: u64,
        /// Bytes of the gathered vector.
        #[arg(long, default_value = "64MiB", value_parser = size_arg)]
        gather_size: u64,
        /// Elements per gather.
        #[arg(long, default_value_t = 100_000)]
        gathers: u64,
    },
    /// Internal: the zram comparison's worker process.
    #[command(hide = true)]
    ZramWorker { size: u64, reads: u64 },
    /// Replication vs erasure coding vs none: latency, throughput, memory,
    /// reads through a server's death and rebuild (8 servers, kills two).
    Redundancy {
        /// Bytes per region.
        #[arg(long, default_value = "128MiB", value_parser = size_arg)]
        region: u64,
        /// Operations per latency figure.
        #[arg(long, default_value_t = 3000)]
        ops: usize,
        /// Bytes per random read or write.
        #[arg(long, default_value = "4KiB", value_parser = size_arg)]
        io: u64,
        /// Rebuild rate limit of the controller.
        #[arg(long, default_value = "256MiB", value_parser = size_arg)]
        rebuild_rate: u64,
    },
    /// The raw TCP baseline server of `bench micro` (started by it).
    #[command(hide = true)]
    RawServer {
        /// Delay added to every received message.
        #[arg(long, value_parser = duration_arg)]
        inject_latency: Option<Duration>,
    },
}

#[derive(Args, Debug)]
struct MicroArgs {
    /// Operations per measurement.
    #[arg(long, default_value_t = 20_000)]
    ops: usize,
    /// Requests in flight for the pipelined measurements.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Client threads (each with its own connection) in the concurrent measurement.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Delay injected on both sides of every transport (server and client, also for raw TCP).
    #[arg(long, value_parser = duration_arg)]
    inject_latency: Option<Duration>,
}

/// Writes one line of command output; exits quietly if stdout is closed.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing standard output: {e}");
        std::process::exit(1);
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    if let Some(p) = cli.exit_with_parent {
        embedded::exit_with_parent(p);
    }
    if let Err(e) = run(cli.cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Up(a) => up(a),
        Cmd::Run(a) => {
            let code = run_cmd::run(a)?;
            std::process::exit(code);
        }
        Cmd::Server(a) => server(a),
        Cmd::Controller(a) => controller(a),
        Cmd::Status(a) => status(a),
        Cmd::Region(c) => region_cmd::run(c),
        Cmd::Bench(b) => match b.cmd {
            None => bench_cmd::suite(b.suite),
            Some(c) => match c {
                BenchCmd::Report { from, out } => bench_cmd::rerender(from, out),
                BenchCmd::Micro(a) => micro(a),
                BenchCmd::Slabs { sizes } => slabs(sizes),
                BenchCmd::Paging {
                    size,
                    random_reads,
                    ratios,
                    no_zram,
                } => paging_bench(size, random_reads, ratios, no_zram),
                BenchCmd::Objects {
                    keys,
                    gets,
                    sum_size,
                    gather_size,
                    gathers,
                } => objects_bench(remora_bench::objects::ObjectsOptions {
                    keys,
                    gets,
                    sum_bytes: sum_size,
                    gather_bytes: gather_size,
                    gathers,
                    ..Default::default()
                }),
                BenchCmd::ZramWorker { size, reads } => {
                    remora_bench::paging::zram_worker(size, reads)
                }
                BenchCmd::Redundancy {
                    region,
                    ops,
                    io,
                    rebuild_rate,
                } => redundancy(region, ops, io, rebuild_rate),
                BenchCmd::RawServer { inject_latency } => {
                    let l = std::net::TcpListener::bind("127.0.0.1:0")
                        .context("binding the raw server")?;
                    announce("raw-server", &l.local_addr()?.to_string());
                    remora_bench::micro::serve_raw(l, inject_latency.unwrap_or_default());
                    Ok(())
                }
            },
        },
    }
}

fn announce(what: &str, addr: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "remora {what} listening on {addr}");
    let _ = out.flush();
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn server(a: ServerArgs) -> Result<()> {
    let max_frame = u32::try_from(a.max_frame)
        .ok()
        .filter(|&m| m >= 64 << 10)
        .context("--max-frame must be between 64KiB and 4GiB")?;
    let h = remora_server::start(remora_server::ServerConfig {
        listen: a.listen,
        advertise: a.advertise,
        controller: a.controller,
        capacity: a.capacity,
        inject_latency: a.inject_latency.unwrap_or_default(),
        max_frame,
        max_connections: a.max_connections,
        max_connections_per_tenant: a
            .max_connections_per_tenant
            .unwrap_or(a.max_connections / 4),
        max_unauthenticated: a.max_unauthenticated,
        idle_timeout: a.idle_timeout,
        handshake_timeout: a.handshake_timeout,
        buffer_budget: a.buffer_budget,
        cluster_secret: a.cluster_secret,
    })?;
    announce("server", h.addr());
    park_forever()
}

fn controller(a: ControllerArgs) -> Result<()> {
    let mut cfg = remora_controller::ControllerConfig::default();
    if let Some(p) = &a.config {
        cfg = cfg.load_file(p)?;
    }
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = Some(v);
    }
    if let Some(v) = a.slab_size {
        cfg.slab_size = v;
    }
    if let Some(v) = a.placement {
        cfg.placement = v.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(v) = a.dead_after {
        cfg.dead_after = v;
    }
    if let Some(v) = a.heartbeat_interval {
        cfg.heartbeat_interval = v;
    }
    if let Some(v) = a.rebuild_rate {
        cfg.rebuild_rate = v;
    }
    if let Some(v) = a.cluster_secret {
        cfg.cluster_secret = Some(v);
    }
    if let Some(t) = a.token {
        if cfg
            .tenants
            .iter()
            .any(|x| x.name == "default" && x.token != t)
        {
            bail!("--token (or REMORA_TOKEN) conflicts with the tenant \"default\" of the config file");
        }
        if !cfg.tenants.iter().any(|x| x.token == t) {
            cfg.tenants.push(remora_controller::store::StoredTenant {
                name: "default".into(),
                token: t,
                quota: None,
                admin: true,
            });
        }
    }
    let h = remora_controller::start(cfg)?;
    announce("controller", h.addr());
    park_forever()
}

fn up(a: UpArgs) -> Result<()> {
    if a.servers == 0 {
        bail!("--servers must be at least 1");
    }
    let cfg = EmbeddedConfig {
        servers: a.servers,
        capacity_per_server: a.capacity_per_server,
        controller_listen: a.controller_listen,
        slab_size: a.slab_size,
        data_dir: a.data_dir,
        inject_latency: a.inject_latency.map(|d| format!("{}ns", d.as_nanos())),
        placement: a.placement,
        controller_args: Vec::new(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let mut cl = Embedded::start(&cfg)?;
    let file = embedded::cluster_file();
    embedded::write_cluster_file(&file, &cl.info)?;
    outln!(
        "Remora cluster up: {} servers x {}",
        cfg.servers,
        Bytes(cfg.capacity_per_server)
    );
    outln!("  controller  {}", cl.info.controller);
    for s in &cl.servers {
        outln!("  server      {s}");
    }
    outln!("  token       {}", cl.info.token);
    outln!(
        "  cluster file {} (other remora commands use it)",
        file.display()
    );
    outln!("Try: remora status | remora region create demo --size 64MiB");
    outln!("Press Ctrl-C to stop.");
    let reason = loop {
        if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            break None;
        }
        if let Some(r) = cl.exited() {
            break Some(r);
        }
    };
    cl.stop();
    // Remove the cluster file only if it is still ours.
    if embedded::read_cluster_file(&file).is_ok_and(|f| f == cl.info) {
        let _ = std::fs::remove_file(&file);
    }
    match reason {
        None => {
            outln!("Remora cluster stopped.");
            Ok(())
        }
        Some(r) => bail!("cluster stopped: {r}"),
    }
}

fn status(a: ClientArgs) -> Result<()> {
    let c = a.connect()?;
    let s = c.status()?;
    outln!(
        "controller {}  tenant {}  slab size {}  placement {}",
        c.controller(),
        c.tenant(),
        Bytes(s.slab_size),
        s.placement
    );
    outln!();
    outln!("SERVERS");
    outln!(
        "{:<22} {:>10} {:>10} {:>10} {:>6}  {:<10} {:>10} {:>10} {:>12} {:>6}",
        "ADDRESS",
        "CAPACITY",
        "USED",
        "FREE",
        "USE%",
        "STATE",
        "READ",
        "WRITTEN",
        "OPS",
        "CONNS"
    );
    let (mut cap, mut used) = (0u64, 0u64);
    for sv in &s.servers {
        let u = sv.slabs_used * s.slab_size;
        let t = sv.slabs_total * s.slab_size;
        cap += t;
        used += u;
        // Live figures straight from the server (skipped for dead ones).
        let stats = if sv.alive {
            c.server_stats(&sv.addr).ok()
        } else {
            None
        };
        let (rd, wr, ops, conns) = match stats {
            Some(st) => (
                Bytes(st.bytes_read).to_string(),
                Bytes(st.bytes_written).to_string(),
                st.ops.to_string(),
                st.connections.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        outln!(
            "{:<22} {:>10} {:>10} {:>10} {:>5.1}%  {:<10} {:>10} {:>10} {:>12} {:>6}",
            sv.addr,
            Bytes(t).to_string(),
            Bytes(u).to_string(),
            Bytes(t.saturating_sub(u)).to_string(),
            if t == 0 {
                0.0
            } else {
                100.0 * u as f64 / t as f64
            },
            region_cmd::server_state(sv),
            rd,
            wr,
            ops,
            conns
        );
    }
    outln!(
        "{:<22} {:>10} {:>10} {:>10}",
        "total",
        Bytes(cap).to_string(),
        Bytes(used).to_string(),
        Bytes(cap.saturating_sub(used)).to_string()
    );
    outln!();
    outln!("TENANTS");
    outln!(
        "{:<16} {:>10} {:>10} {:>8}",
        "NAME",
        "QUOTA",
        "USED",
        "REGIONS"
    );
    for t in &s.tenants {
        outln!(
            "{:<16} {:>10} {:>10} {:>8}",
            t.name,
            t.quota
                .map_or("unlimited".to_string(), |q| Bytes(q).to_string()),
            Bytes(t.used).to_string(),
            t.regions
        );
    }
    outln!();
    region_cmd::print_regions(&s.regions);
    let lost: u64 = s.regions.iter().map(|r| r.lost).sum();
    let at_risk: u64 = s.regions.iter().map(|r| r.at_risk).sum();
    let waiting = s.servers.iter().filter(|sv| sv.waiting).count();
    if at_risk > 0 || waiting > 0 {
        outln!();
        outln!(
            "AT RISK: {at_risk} slabs; the controller is waiting for {waiting} {} (not registered since it started, or joining), declared dead if not back within dead_after",
            if waiting == 1 { "server" } else { "servers" }
        );
    }
    if lost > 0 || s.rebuilt_slabs > 0 {
        outln!();
        outln!(
            "REBUILD: {} slabs lost and not yet rebuilt; {} rebuilt since the controller started ({} read and written)",
            lost,
            s.rebuilt_slabs,
            Bytes(s.rebuilt_bytes)
        );
    }
    Ok(())
}

fn micro(a: MicroArgs) -> Result<()> {
    let cfg = EmbeddedConfig {
        inject_latency: a.inject_latency.map(|d| format!("{}ns", d.as_nanos())),
        ..EmbeddedConfig::loopback(1, 1 << 30)
    };
    eprintln!("starting an embedded cluster (1 server) ...");
    let cl = Embedded::start(&cfg)?;
    let opts = ClientOptions {
        inject_latency: a.inject_latency.unwrap_or_default(),
        ..ClientOptions::default()
    };
    let cluster = Cluster::connect_with(&cl.info.controller, &cl.info.token, opts)?;
    let mut raw_args = vec!["bench".to_string(), "raw-server".to_string()];
    if let Some(d) = a.inject_latency {
        raw_args.push("--inject-latency".into());
        raw_args.push(format!("{}ns", d.as_nanos()));
    }
    let raw = embedded::spawn_announcing("raw TCP server", &raw_args)?;
    let report = remora_bench::micro::run(
        &cluster,
        &remora_bench::micro::MicroOptions {
            ops: a.ops.max(100),
            window: a.window.max(1),
            inject_latency: a.inject_latency.unwrap_or_default(),
            token: cl.info.token.clone(),
            server_pid: cl.server_pids().first().copied(),
            clients: a.clients.max(1),
        },
        &raw.addr,
    )?;
    outln!("{report}");
    Ok(())
}

fn redundancy(region: u64, ops: usize, io: u64, rebuild_rate: u64) -> Result<()> {
    if io == 0 || io > region {
        bail!("--io must be between 1 byte and the region size");
    }
    let cfg = EmbeddedConfig {
        controller_args: vec!["--rebuild-rate".into(), rebuild_rate.to_string()],
        ..EmbeddedConfig::loopback(8, (region * 2).max(64 << 20))
    };
    eprintln!("starting an embedded cluster (8 servers) ...");
    let mut cl = Embedded::start(&cfg)?;
    let cluster = Cluster::connect(&cl.info.controller, &cl.info.token)?;
    let servers = cl.servers.clone();
    let mut kill = |addr: &str| -> Result<()> {
        let i = servers
            .iter()
            .position(|s| s == addr)
            .with_context(|| format!("{addr} is not a server of this cluster"))?;
        cl.kill_server(i)
    };
    let report = remora_bench::redundancy::run(
        &cluster,
        &remora_bench::redundancy::Options {
            region,
            ops: ops.max(10),
            io: io as usize,
        },
        rebuild_rate,
        &mut kill,
    )?;
    outln!("{report}");
    Ok(())
}

fn slabs(sizes: Vec<u64>) -> Result<()> {
    outln!("Slab size comparison: 3 servers x 1 GiB on loopback, one cluster per size");
    outln!(
        "{:>10} {:>14} {:>16} {:>14} {:>18}",
        "slab",
        "alloc 256MiB",
        "map bytes/GiB",
        "stream GB/s",
        "small-region use"
    );
    for size in sizes {
        let cfg = EmbeddedConfig {
            servers: 3,
            capacity_per_server: 1 << 30,
            controller_listen: "127.0.0.1:0".into(),
            slab_size: size,
            data_dir: None,
            inject_latency: None,
            placement: "p2c".into(),
            controller_args: Vec::new(),
        };
        let cl = Embedded::start(&cfg)?;
        let cluster = Cluster::connect(&cl.info.controller, &cl.info.token)?;
        let r = remora_bench::slabs::measure(&cluster)?;
        outln!(
            "{:>10} {:>11.1} ms {:>16.0} {:>14.2} {:>17.2}x",
            Bytes(r.slab_size).to_string(),
            r.alloc_ms,
            r.map_bytes_per_gib,
            r.stream_gbps,
            r.small_overhead
        );
    }
    Ok(())
}

fn objects_bench(opts: remora_bench::objects::ObjectsOptions) -> Result<()> {
    if opts.sum_bytes < 1 << 20 || opts.gather_bytes < 1 << 20 {
        bail!("--sum-size and --gather-size must be at least 1MiB");
    }
    let (_cl, raw, cluster) = bench_cluster(opts.sum_bytes + 2 * opts.gather_bytes + (1 << 30))?;
    remora_bench::objects::run(&cluster, &raw.addr, &opts)
}

/// An embedded cluster of two servers with `capacity` bytes each, a raw TCP
/// server for baselines, and a client.
fn bench_cluster(capacity: u64) -> Result<(Embedded, embedded::Helper, Cluster)> {
    let cfg = EmbeddedConfig::loopback(2, capacity);
    eprintln!("starting an embedded cluster (2 servers) and a raw TCP server ...");
    let cl = Embedded::start(&cfg)?;
    let raw = embedded::spawn_announcing(
        "raw TCP server",
        &["bench".to_string(), "raw-server".to_string()],
    )?;
    let cluster = Cluster::connect(&cl.info.controller, &cl.info.token)?;
    Ok((cl, raw, cluster))
}

fn paging_bench(size: u64, random_reads: u64, ratios: Vec<u32>, no_zram: bool) -> Result<()> {
    if ratios.is_empty() || ratios.iter().any(|&r| r == 0 || r > 100) {
        bail!("--ratios must be percentages in 1..=100");
    }
    if size < 16 << 20 {
        bail!("--size must be at least 16MiB");
    }
    let (_cl, raw, cluster) = bench_cluster(size + (1 << 30))?;
    let exe = std::env::current_exe().context("locating the remora binary")?;
    let worker = vec![
        exe.display().to_string(),
        "bench".to_string(),
        "zram-worker".to_string(),
    ];
    let opts = remora_bench::paging::PagingOptions {
        size,
        random_reads,
        ratios,
        zram: !no_zram,
        ..Default::default()
    };
    remora_bench::paging::run(&cluster, &raw.addr, &opts, &worker)
}
