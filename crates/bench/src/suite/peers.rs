//! The peers that run on the machine beside Remora.
//!
//! * [`ZramSwap`]: Linux swap to compressed RAM, with commands run under a
//!   cgroup v1 memory limit ([`ZramSwap::run_limited`]): the plain-memory
//!   code of a workload, with what does not fit the limit swapped to zram.
//! * [`kv_peer`]: the key-value workload against a real Redis or memcached
//!   server on loopback, one request at a time or pipelined.
//!
//! What a machine lacks (root, the zram module, the cgroup v1 memory
//! controller, a server binary) is reported as [`Unavailable`], so that
//! callers can tell "skipped" from "failed".

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::wl::kv::{run_store, KvParams, Op, Store, Value, LAT_SAMPLE, VALUE_SIZE};
use super::wl::{fold, Outcome};
use super::Interface;

/// A peer that cannot run on this machine: a missing program, kernel
/// module, permission or cgroup controller. A reason to skip a run, not a
/// failed run; find it with `anyhow::Error::downcast_ref::<Unavailable>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn uid() -> u32 {
    // SAFETY: as in `is_root`.
    unsafe { libc::geteuid() }
}

// ---------------------------------------------------------------------------
// zram swap and cgroup v1 memory limits

const CGROUP_MEMORY: &str = "/sys/fs/cgroup/memory";
const ZRAM_CONTROL: &str = "/sys/class/zram-control";

/// How long [`ZramSwap::run_limited`] lets a command run before it kills
/// it, unless [`ZramSwap::set_timeout`] says otherwise.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// A zram device used as swap (at the highest priority, so it is used
/// before any other swap), and a place for memory-limited cgroups (cgroup
/// v1 memory controller). Dropping it removes every cgroup it made, turns
/// the swap off and removes the device.
///
/// Needs root, the zram module (`/sys/class/zram-control`), the cgroup v1
/// memory controller mounted at `/sys/fs/cgroup/memory`, and `mkswap`,
/// `swapon`, `swapoff` (util-linux).
#[derive(Debug)]
pub struct ZramSwap {
    /// Device number: `/dev/zram{id}`.
    id: String,
    /// Whether `swapon` succeeded (so Drop must `swapoff`).
    swapped_on: bool,
    /// Cgroups made and not yet removed.
    cgroups: Mutex<Vec<PathBuf>>,
    /// Cgroups made so far (names are numbered).
    made: AtomicU64,
    timeout: Duration,
}

impl ZramSwap {
    /// Adds a zram device of `disksize` bytes (uncompressed: the most that
    /// can be swapped to it), makes it swap and turns it on at priority
    /// 32767. Fails with [`Unavailable`] naming everything the machine
    /// lacks (root, the zram module, the cgroup v1 memory controller).
    pub fn setup(disksize: u64) -> Result<ZramSwap> {
        if disksize == 0 {
            bail!("the zram device needs a size above 0 bytes");
        }
        let mut missing = Vec::new();
        if !is_root() {
            missing.push(format!("root (running as uid {})", uid()));
        }
        if !Path::new(ZRAM_CONTROL).join("hot_add").exists() {
            missing.push(format!(
                "the zram module ({ZRAM_CONTROL}/hot_add is missing: modprobe zram)"
            ));
        }
        if !Path::new(CGROUP_MEMORY)
            .join("memory.limit_in_bytes")
            .exists()
        {
            missing.push(format!(
                "the cgroup v1 memory controller at {CGROUP_MEMORY} (cgroup v2 alone is not supported)"
            ));
        }
        if !missing.is_empty() {
            return Err(Unavailable(format!(
                "zram swap under a cgroup memory limit needs {}",
                missing.join("; ")
            ))
            .into());
        }
        let id = std::fs::read_to_string(Path::new(ZRAM_CONTROL).join("hot_add"))
            .map_err(|e| {
                Unavailable(format!(
                    "cannot add a zram device ({ZRAM_CONTROL}/hot_add: {e})"
                ))
            })?
            .trim()
            .to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            // Nothing to remove: we do not know which device it was.
            bail!("{ZRAM_CONTROL}/hot_add returned {id:?}, not a device number");
        }
        // From here on, Drop undoes whatever was done.
        let mut zram = ZramSwap {
            id,
            swapped_on: false,
            cgroups: Mutex::new(Vec::new()),
            made: AtomicU64::new(0),
            timeout: DEFAULT_RUN_TIMEOUT,
        };
        let dev = zram.device();
        write_file(
            &format!("/sys/block/zram{}/disksize", zram.id),
            &disksize.to_string(),
        )?;
        run_tool("mkswap", &[&dev])?;
        run_tool("swapon", &["-p", "32767", &dev])?;
        zram.swapped_on = true;
        Ok(zram)
    }

    /// The device's path, `/dev/zramN`.
    pub fn device(&self) -> String {
        format!("/dev/zram{}", self.id)
    }

    /// Sets how long [`run_limited`](Self::run_limited) lets a command run
    /// before it kills it and fails (default [`DEFAULT_RUN_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `cmd` in a fresh cgroup limited to `limit_bytes` of memory
    /// (what does not fit is swapped, to zram first) and returns its
    /// standard output.
    ///
    /// The command gets a piped stdin; once it is in the cgroup it is sent
    /// the line `go`. A command that waits for that line before it
    /// allocates has all of its memory charged to the cgroup. Its stdout
    /// and stderr are read whole; a command that fails (or is killed by
    /// the OOM killer when the limit and the swap cannot hold it) is an
    /// error with its exit status and stderr. A command still running
    /// after the timeout is killed, with everything it started.
    /// The cgroup's `memory.swappiness` is set to 100 (swap anonymous
    /// memory rather than drop file pages), where the file exists.
    pub fn run_limited(&self, limit_bytes: u64, mut cmd: Command) -> Result<String> {
        if limit_bytes == 0 {
            bail!("a memory limit of 0 bytes leaves nothing to run in");
        }
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        let cg = PathBuf::from(format!(
            "{CGROUP_MEMORY}/remora-bench-{}-zram{}-{n}",
            std::process::id(),
            self.id
        ));
        std::fs::create_dir(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        self.cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cg.clone());
        let result = self.run_in(&cg, limit_bytes, &mut cmd);
        kill_cgroup(&cg);
        if remove_cgroup(&cg) {
            self.cgroups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|c| c != &cg);
        }
        result.with_context(|| {
            format!(
                "running {cmd:?} under a memory limit of {:.1} MiB",
                limit_bytes as f64 / (1 << 20) as f64
            )
        })
    }

    fn run_in(&self, cg: &Path, limit_bytes: u64, cmd: &mut Command) -> Result<String> {
        write_file(
            &cg.join("memory.limit_in_bytes").to_string_lossy(),
            &limit_bytes.to_string(),
        )?;
        let swappiness = cg.join("memory.swappiness");
        if swappiness.exists() {
            write_file(&swappiness.to_string_lossy(), "100")?;
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the command")?;
        // Kill and reap the child on every early return below.
        let mut guard = ChildGuard { child, armed: true };
        let child = &mut guard.child;
        let stdout = spawn_reader(child.stdout.take());
        let stderr = spawn_reader(child.stderr.take());
        write_file(
            &cg.join("cgroup.procs").to_string_lossy(),
            &child.id().to_string(),
        )
        .context("moving the command into its cgroup")?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that exits without reading it is judged by its exit
            // status below, so a broken pipe here is not an error.
            let _ = stdin.write_all(b"go\n");
        }
        let start = Instant::now();
        let mut nap = Duration::from_millis(1);
        let status = loop {
            if let Some(st) = child.try_wait().context("waiting for the command")? {
                break st;
            }
            if start.elapsed() >= self.timeout {
                kill_cgroup(cg);
                let _ = child.kill();
                let _ = child.wait();
                guard.armed = false;
                let err = collect(stderr, Duration::from_secs(5)).unwrap_or_default();
                bail!(
                    "still running after {:?}: killed{}",
                    self.timeout,
                    stderr_note(&err)
                );
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        };
        guard.armed = false;
        // Anything the command left running would hold the pipes open.
        kill_cgroup(cg);
        let out =
            collect(stdout, Duration::from_secs(10)).context("reading the command's stdout")?;
        let err = collect(stderr, Duration::from_secs(10)).unwrap_or_default();
        if !status.success() {
            let oom = oom_kills(cg);
            bail!(
                "{}{}{}",
                describe_status(status),
                if oom > 0 {
                    format!(
                        " (the OOM killer struck {oom} time(s) in its cgroup: the limit plus the swap cannot hold it)"
                    )
                } else {
                    String::new()
                },
                stderr_note(&err)
            );
        }
        Ok(out)
    }
}

impl Drop for ZramSwap {
    fn drop(&mut self) {
        let cgroups = std::mem::take(&mut *self.cgroups.lock().unwrap_or_else(|e| e.into_inner()));
        for cg in &cgroups {
            kill_cgroup(cg);
            remove_cgroup(cg);
        }
        let dev = self.device();
        if self.swapped_on {
            let _ = Command::new("swapoff")
                .arg(&dev)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::write(format!("/sys/block/zram{}/reset", self.id), "1");
        let _ = std::fs::write(Path::new(ZRAM_CONTROL).join("hot_remove"), &self.id);
    }
}

/// Kills (SIGKILL) and reaps a child unless disarmed.
struct ChildGuard {
    child: Child,
    armed: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_file(path: &str, v: &str) -> Result<()> {
    std::fs::write(path, v).with_context(|| format!("writing {v:?} to {path}"))
}

/// Runs a system tool, failing with its stderr.
fn run_tool(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| -> anyhow::Error {
            if e.kind() == ErrorKind::NotFound {
                let package = if cmd == "mkswap" {
                    "util-linux"
                } else {
                    "mount"
                };
                Unavailable(format!("{cmd} is not installed (Debian package {package})")).into()
            } else {
                anyhow::Error::new(e).context(format!("running {cmd}"))
            }
        })?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}){}",
            args.join(" "),
            describe_status(out.status),
            stderr_note(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(())
}

/// Reads a pipe to its end on a thread of its own.
fn spawn_reader<R: Read + Send + 'static>(
    pipe: Option<R>,
) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    match pipe {
        Some(mut p) => {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let r = p.read_to_end(&mut buf).map(|_| buf);
                let _ = tx.send(r);
            });
        }
        None => {
            let _ = tx.send(Ok(Vec::new()));
        }
    }
    rx
}

/// What a reader thread read, waiting at most `wait` for the pipe to close.
fn collect(rx: mpsc::Receiver<std::io::Result<Vec<u8>>>, wait: Duration) -> Result<String> {
    match rx.recv_timeout(wait) {
        Ok(r) => Ok(String::from_utf8_lossy(&r?).into_owned()),
        Err(_) => bail!("the pipe stayed open {wait:?} after the command ended"),
    }
}

fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

fn stderr_note(err: &str) -> String {
    let err = err.trim();
    if err.is_empty() {
        return String::new();
    }
    // The end of a long stderr says the most.
    let tail = match err.char_indices().rev().nth(2000) {
        Some((i, _)) => &err[i..],
        None => err,
    };
    format!("; stderr: {tail}")
}

/// Kills every process in a cgroup (SIGKILL).
fn kill_cgroup(cg: &Path) {
    let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) else {
        return;
    };
    for pid in procs
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        if pid > 0 {
            // SAFETY: kill has no memory preconditions; the pid is a member
            // of a cgroup this process made for its own commands.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes a cgroup, waiting a little for killed members to leave it.
/// Returns whether it is gone.
fn remove_cgroup(cg: &Path) -> bool {
    for _ in 0..100 {
        match std::fs::remove_dir(cg) {
            Ok(()) => return true,
            Err(e) if e.kind() == ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

/// OOM kills recorded in a cgroup's `memory.oom_control`.
fn oom_kills(cg: &Path) -> u64 {
    std::fs::read_to_string(cg.join("memory.oom_control"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Redis and memcached

/// Operations per pipelined batch in the timed phase of the pipelined peers.
pub const PIPELINE_BATCH: usize = 32;

/// SETs per pipelined batch while loading the keys (untimed).
const LOAD_BATCH: usize = 512;

/// How long a server gets to accept connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request may wait for its reply before the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the key-value workload against a real server on loopback: `Redis`
/// and `Memcached` send one request at a time, `RedisPipelined` and
/// `MemcachedPipelined` send the operations in order in batches of
/// [`PIPELINE_BATCH`].
///
/// The server (`redis-server`, `memcached`) is started here on a free port
/// of 127.0.0.1 and killed when the run ends, whatever happens. Every key
/// is loaded first (pipelined, untimed); the timed phase then runs the
/// operations of [`KvParams::ops`] with the semantics of
/// [`run_store`]: every GET is checked with [`KvParams::check_value`] and
/// its version folded into the digest in operation order, so the digest
/// equals the all-local run's. One operation in [`LAT_SAMPLE`] is timed;
/// a pipelined operation's latency is that of the whole batch it was sent
/// in (send to last reply). Keys are 16-character hex strings; values are
/// the 32 bytes of [`Value`].
///
/// A missing server binary is [`Unavailable`] (naming the Debian package).
pub fn kv_peer(kind: Interface, p: &KvParams) -> Result<Outcome> {
    let (server, pipelined) = match kind {
        Interface::Redis => (ServerKind::Redis, false),
        Interface::RedisPipelined => (ServerKind::Redis, true),
        Interface::Memcached => (ServerKind::Memcached, false),
        Interface::MemcachedPipelined => (ServerKind::Memcached, true),
        other => bail!(
            "{other} is not a key-value peer (one of: redis, redis-pipelined, memcached, memcached-pipelined)"
        ),
    };
    check_params(p)?;
    let mut server = Server::start(server, p)?;
    let run = |server: &Server| -> Result<Outcome> {
        let mut wire: Box<dyn Wire> = match server.kind {
            ServerKind::Redis => Box::new(RedisWire::connect(server.port)?),
            ServerKind::Memcached => Box::new(MemcachedWire::connect(server.port)?),
        };
        if pipelined {
            run_pipelined(p, wire.as_mut())
        } else {
            let mut store = LoadBatching {
                wire: wire.as_mut(),
                pending: Vec::with_capacity(LOAD_BATCH),
                loads_left: p.keys,
            };
            run_store(p, &mut store, false)
        }
    };
    let out = run(&server);
    // Check the server before killing it: a crash explains a failed run.
    let exited = server.exited();
    out.with_context(|| {
        format!(
            "{kind} against {} on 127.0.0.1:{}{}",
            server.kind.binary(),
            server.port,
            exited.unwrap_or_default()
        )
    })
}

/// Rejects parameters the workload's generator cannot run with.
fn check_params(p: &KvParams) -> Result<()> {
    if p.keys == 0 {
        bail!("the key-value workload needs at least one key");
    }
    if !(p.skew.is_finite() && p.skew > 0.0) {
        bail!(
            "the key-value workload needs a finite skew above 0 (got {})",
            p.skew
        );
    }
    if p.get_percent > 100 {
        bail!(
            "GETs are {}% of the operations: at most 100%",
            p.get_percent
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Redis,
    Memcached,
}

impl ServerKind {
    fn binary(self) -> &'static str {
        match self {
            ServerKind::Redis => "redis-server",
            ServerKind::Memcached => "memcached",
        }
    }

    /// The Debian package with the binary.
    fn package(self) -> &'static str {
        match self {
            ServerKind::Redis => "redis-server",
            ServerKind::Memcached => "memcached",
        }
    }

    fn command(self, port: u16, p: &KvParams) -> Command {
        let mut cmd = Command::new(self.binary());
        let port = port.to_string();
        match self {
            ServerKind::Redis => {
                cmd.args(["--port", &port, "--bind", "127.0.0.1"]).args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ]);
            }
            ServerKind::Memcached => {
                // An item of a 16-byte key and a 32-byte value takes about
                // 120 bytes of slab; twice that, plus room for the slab
                // classes' first pages. A cap, not an allocation.
                let mib = p.keys.saturating_mul(256) / (1 << 20) + 64;
                cmd.args(["-l", "127.0.0.1", "-p", &port, "-U", "0"])
                    .args(["-m", &mib.to_string()]);
                if is_root() {
                    cmd.args(["-u", "root"]);
                }
            }
        }
        cmd
    }
}

/// A server process, killed and reaped when dropped.
struct Server {
    kind: ServerKind,
    port: u16,
    child: Child,
    /// The server's stdout and stderr.
    log: PathBuf,
}

/// A fresh log file name per server in this process.
static SERVERS: AtomicU64 = AtomicU64::new(0);

impl Server {
    /// Starts the server on a free port and waits until it accepts
    /// connections. A server that exits at once (the port was taken in the
    /// meantime) is tried again on another port, twice.
    fn start(kind: ServerKind, p: &KvParams) -> Result<Server> {
        let mut last = None;
        for _ in 0..3 {
            let port = free_port()?;
            let n = SERVERS.fetch_add(1, Ordering::Relaxed);
            let log = std::env::temp_dir().join(format!(
                "remora-bench-{}-{}-{n}.log",
                kind.binary(),
                std::process::id()
            ));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let mut cmd = kind.command(port, p);
            cmd.stdin(Stdio::null())
                .stdout(file.try_clone().context("duplicating the log file")?)
                .stderr(file);
            // SAFETY: the closure runs in the child between fork and exec
            // and only calls prctl, which is async-signal-safe. It makes
            // the kernel kill the server if this thread dies without
            // dropping the guard (e.g. the benchmark is killed).
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    Ok(())
                });
            }
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&log);
                    if e.kind() == ErrorKind::NotFound {
                        return Err(Unavailable(format!(
                            "{} is not installed (Debian: apt-get install {})",
                            kind.binary(),
                            kind.package()
                        ))
                        .into());
                    }
                    return Err(
                        anyhow::Error::new(e).context(format!("starting {}", kind.binary()))
                    );
                }
            };
            let mut server = Server {
                kind,
                port,
                child,
                log,
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(e) if server.exited().is_some() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("three tries"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().context("waiting for the server")? {
                bail!(
                    "{} exited at start ({}){}",
                    self.kind.binary(),
                    describe_status(st),
                    self.output_note()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() >= START_TIMEOUT {
                bail!(
                    "{} did not accept connections on {addr} within {START_TIMEOUT:?}{}",
                    self.kind.binary(),
                    self.output_note()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// "; the server exited (status); its output: ..." if it is no longer
    /// running.
    fn exited(&mut self) -> Option<String> {
        let st = self.child.try_wait().ok()??;
        Some(format!(
            "; the server exited ({}){}",
            describe_status(st),
            self.output_note()
        ))
    }

    fn output_note(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let out = out.trim();
        if out.is_empty() {
            return String::new();
        }
        let tail = match out.char_indices().rev().nth(2000) {
            Some((i, _)) => &out[i..],
            None => out,
        };
        format!("; its output: {tail}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port no one listens on now (the kernel's pick).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The wire form of a key: 16 lowercase hex digits.
fn key_bytes(key: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[(key >> (60 - 4 * i) & 0xf) as usize];
    }
    out
}

/// A value read back: exactly [`VALUE_SIZE`] bytes.
fn decode_value(key: u64, bytes: &[u8]) -> Result<Value> {
    if bytes.len() != VALUE_SIZE {
        bail!(
            "result check failed: GET of key {key:#x} returned {} bytes, not {VALUE_SIZE}",
            bytes.len()
        );
    }
    Ok(bytemuck::pod_read_unaligned(bytes))
}

/// One request of a batch.
enum Req {
    Get(u64),
    Set(u64, Value),
}

/// A client connection to one server.
trait Wire {
    fn get(&mut self, key: u64) -> Result<Option<Value>>;
    fn set(&mut self, key: u64, v: &Value) -> Result<()>;
    /// Sends `reqs` in order in one write and reads all of their replies;
    /// pushes what each GET found onto `got`, in order.
    fn batch(&mut self, reqs: &[Req], got: &mut Vec<Option<Value>>) -> Result<()>;
}

/// The one-request-at-a-time peers as a [`Store`] for [`run_store`]. The
/// first `keys` SETs are the untimed load (run_store loads every key before
/// its timed phase): they are buffered and sent pipelined. Any other
/// request first sends what is buffered, then goes alone.
struct LoadBatching<'a> {
    wire: &'a mut dyn Wire,
    pending: Vec<Req>,
    loads_left: u64,
}

impl LoadBatching<'_> {
    fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            let mut got = Vec::new();
            self.wire.batch(&self.pending, &mut got)?;
            self.pending.clear();
        }
        Ok(())
    }
}

impl Store for LoadBatching<'_> {
    fn set(&mut self, key: u64, v: &Value) -> Result<()> {
        if self.loads_left > 0 && v.version == 0 {
            self.pending.push(Req::Set(key, *v));
            self.loads_left -= 1;
            if self.pending.len() >= LOAD_BATCH || self.loads_left == 0 {
                self.flush()?;
            }
            return Ok(());
        }
        self.flush()?;
        self.wire.set(key, v)
    }

    fn get(&mut self, key: u64) -> Result<Option<Value>> {
        self.flush()?;
        self.wire.get(key)
    }
}

/// Loads every key, pipelined.
fn load(p: &KvParams, wire: &mut dyn Wire) -> Result<()> {
    let mut reqs = Vec::with_capacity(LOAD_BATCH);
    let mut got = Vec::new();
    for rank in 0..p.keys {
        let key = p.key(rank);
        reqs.push(Req::Set(key, p.value(key, 0)));
        if reqs.len() == LOAD_BATCH || rank + 1 == p.keys {
            wire.batch(&reqs, &mut got)?;
            reqs.clear();
        }
    }
    Ok(())
}

/// The timed phase of [`run_store`], pipelined: the same operations in
/// the same order, in batches of [`PIPELINE_BATCH`].
fn run_pipelined(p: &KvParams, wire: &mut dyn Wire) -> Result<Outcome> {
    load(p, wire).context("loading the keys")?;
    let ops = p.ops();
    let mut lat = Vec::with_capacity((ops.len() as u64 / LAT_SAMPLE + 1) as usize);
    let mut digest = 0u64;
    let mut reqs = Vec::with_capacity(PIPELINE_BATCH);
    let mut got = Vec::with_capacity(PIPELINE_BATCH);
    let t = Instant::now();
    for (b, chunk) in ops.chunks(PIPELINE_BATCH).enumerate() {
        let t0 = Instant::now();
        reqs.clear();
        got.clear();
        reqs.extend(chunk.iter().map(|op| match *op {
            Op::Get(key) => Req::Get(key),
            Op::Set(key, version) => Req::Set(key, p.value(key, version)),
        }));
        wire.batch(&reqs, &mut got)?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        let mut found = got.iter();
        for (j, op) in chunk.iter().enumerate() {
            if let Op::Get(key) = *op {
                let v = found
                    .next()
                    .context("a pipelined batch returned fewer GET replies than it sent")?;
                let version = p.check_value(key, v.as_ref())?;
                digest = fold(digest, version);
            }
            if ((b * PIPELINE_BATCH + j) as u64).is_multiple_of(LAT_SAMPLE) {
                lat.push(us);
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Outcome {
        secs,
        ops: p.ops,
        digest,
        lat_us: lat,
        bytes_moved: None,
    })
}

/// Redis through the `redis` crate (RESP2, one connection, TCP_NODELAY).
struct RedisWire {
    con: redis::Connection,
    pipe: redis::Pipeline,
}

impl RedisWire {
    fn connect(port: u16) -> Result<RedisWire> {
        use redis::IntoConnectionInfo;
        let info = ("127.0.0.1", port)
            .into_connection_info()
            .context("redis connection info")?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).context("redis client")?;
        let con = client
            .get_connection_with_timeout(START_TIMEOUT)
            .context("connecting to redis-server")?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(RedisWire {
            con,
            pipe: redis::pipe(),
        })
    }

    fn get_reply(key: u64, v: redis::Value) -> Result<Option<Value>> {
        match v {
            redis::Value::Nil => Ok(None),
            redis::Value::BulkString(b) => decode_value(key, &b).map(Some),
            other => bail!("redis answered GET of key {key:#x} with {other:?}"),
        }
    }

    fn set_reply(key: u64, v: redis::Value) -> Result<()> {
        match v {
            redis::Value::Okay => Ok(()),
            other => bail!("redis answered SET of key {key:#x} with {other:?}"),
        }
    }
}

impl Wire for RedisWire {
    fn get(&mut self, key: u64) -> Result<Option<Value>> {
        let v = redis::cmd("GET")
            .arg(&key_bytes(key)[..])
            .query(&mut self.con)
            .with_context(|| format!("redis GET of key {key:#x}"))?;
        Self::get_reply(key, v)
    }

    fn set(&mut self, key: u64, v: &Value) -> Result<()> {
        let r = redis::cmd("SET")
            .arg(&key_bytes(key)[..])
            .arg(bytemuck::bytes_of(v))
            .query(&mut self.con)
            .with_context(|| format!("redis SET of key {key:#x}"))?;
        Self::set_reply(key, r)
    }

    fn batch(&mut self, reqs: &[Req], got: &mut Vec<Option<Value>>) -> Result<()> {
        self.pipe.clear();
        for r in reqs {
            match r {
                Req::Get(key) => {
                    self.pipe.cmd("GET").arg(&key_bytes(*key)[..]);
                }
                Req::Set(key, v) => {
                    self.pipe
                        .cmd("SET")
                        .arg(&key_bytes(*key)[..])
                        .arg(bytemuck::bytes_of(v));
                }
            }
        }
        let replies: Vec<redis::Value> =
            self.pipe.query(&mut self.con).context("a redis pipeline")?;
        if replies.len() != reqs.len() {
            bail!(
                "a redis pipeline of {} commands returned {} replies",
                reqs.len(),
                replies.len()
            );
        }
        for (r, v) in reqs.iter().zip(replies) {
            match r {
                Req::Get(key) => got.push(Self::get_reply(*key, v)?),
                Req::Set(key, _) => Self::set_reply(*key, v)?,
            }
        }
        Ok(())
    }
}

/// memcached through the `memcache` crate's meta-protocol connection
/// (`mg`/`ms`; one connection, TCP_NODELAY, no pool).
struct MemcachedWire {
    con: memcache::exp::MetaConnection,
    cmds: Vec<memcache::exp::MetaCommand>,
}

impl MemcachedWire {
    fn connect(port: u16) -> Result<MemcachedWire> {
        let stream = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            START_TIMEOUT,
        )
        .context("connecting to memcached")?;
        stream.set_nodelay(true)?;
        let mut con = memcache::exp::MetaConnection::from_stream(stream);
        con.set_io_timeout(Some(IO_TIMEOUT));
        Ok(MemcachedWire {
            con,
            cmds: Vec::new(),
        })
    }

    fn get_cmd(key: u64) -> memcache::exp::MetaCommand {
        memcache::exp::MetaCommand::new(memcache::exp::MetaOp::Get, key_bytes(key).to_vec())
            .flag("v")
    }

    fn set_cmd(key: u64, v: &Value) -> memcache::exp::MetaCommand {
        memcache::exp::MetaCommand::new(memcache::exp::MetaOp::Set, key_bytes(key).to_vec())
            .value(bytemuck::bytes_of(v).to_vec())
    }

    fn get_reply(key: u64, r: &memcache::exp::MetaResponse) -> Result<Option<Value>> {
        use memcache::exp::ReturnCode;
        match r.rc() {
            ReturnCode::En => Ok(None),
            ReturnCode::Va => decode_value(key, r.value().unwrap_or_default()).map(Some),
            other => bail!("memcached answered GET of key {key:#x} with {other:?}"),
        }
    }

    fn set_reply(key: u64, r: &memcache::exp::MetaResponse) -> Result<()> {
        use memcache::exp::ReturnCode;
        match r.rc() {
            ReturnCode::Hd => Ok(()),
            ReturnCode::Ns => {
                bail!("memcached did not store key {key:#x} (NS: out of memory for items?)")
            }
            other => bail!("memcached answered SET of key {key:#x} with {other:?}"),
        }
    }
}

impl Wire for MemcachedWire {
    fn get(&mut self, key: u64) -> Result<Option<Value>> {
        let r = self
            .con
            .execute(&Self::get_cmd(key))
            .with_context(|| format!("memcached GET of key {key:#x}"))?;
        Self::get_reply(key, &r)
    }

    fn set(&mut self, key: u64, v: &Value) -> Result<()> {
        let r = self
            .con
            .execute(&Self::set_cmd(key, v))
            .with_context(|| format!("memcached SET of key {key:#x}"))?;
        Self::set_reply(key, &r)
    }

    fn batch(&mut self, reqs: &[Req], got: &mut Vec<Option<Value>>) -> Result<()> {
        self.cmds.clear();
        self.cmds.extend(reqs.iter().map(|r| match r {
            Req::Get(key) => Self::get_cmd(*key),
            Req::Set(key, v) => Self::set_cmd(*key, v),
        }));
        let replies = self
            .con
            .execute_batch(&self.cmds)
            .context("a memcached pipeline")?;
        if replies.len() != reqs.len() {
            bail!(
                "a memcached pipeline of {} commands returned {} replies",
                reqs.len(),
                replies.len()
            );
        }
        for (r, v) in reqs.iter().zip(&replies) {
            match r {
                Req::Get(key) => got.push(Self::get_reply(*key, v)?),
                Req::Set(key, _) => Self::set_reply(*key, v)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex() {
        assert_eq!(&key_bytes(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&key_bytes(1), b"0000000000000001");
    }

    #[test]
    fn short_values_fail_the_check() {
        let e = decode_value(5, &[0u8; 31]).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }

    #[test]
    fn only_kv_peers() {
        let p = KvParams::new(0.99, 0.001, 1);
        let e = kv_peer(Interface::Local, &p).unwrap_err();
        assert!(e.to_string().contains("not a key-value peer"), "{e:#}");
        let bad = KvParams { keys: 0, ..p };
        assert!(kv_peer(Interface::Redis, &bad).is_err());
        let bad = KvParams {
            skew: f64::NAN,
            ..p
        };
        assert!(kv_peer(Interface::Memcached, &bad).is_err());
    }
}
