//! `remora run`: an unmodified program with its heap in far memory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context, Result};
use clap::Args;
use remora_client::{ClientOptions, Cluster};
use remora_paging::Budget;

use crate::embedded::{Embedded, EmbeddedConfig};
use crate::size_arg;

/// `remora run` flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Local memory: a share of the memory the program touches (25%) or a
    /// size (512MiB). The rest of its heap lives in far memory.
    #[arg(long, default_value = "25%")]
    local_mem: String,
    /// Largest far heap of the program (address space reserved on the
    /// servers, used as the program allocates).
    #[arg(long, value_parser = size_arg, default_value = "4GiB")]
    heap_size: u64,
    /// Controller of an existing cluster (default: start an embedded one for the run).
    #[arg(long, env = "REMORA_CONTROLLER", requires = "token")]
    controller: Option<String>,
    /// Tenant token for --controller.
    #[arg(long, env = "REMORA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Largest prefetch window in pages (0 turns prefetching off).
    #[arg(long, default_value_t = 256)]
    prefetch: u32,
    /// Pages fetched per fault (1, 2, 4, …).
    #[arg(long, default_value_t = 1)]
    fetch_unit: u32,
    /// Eviction policy: clock (second chance) or fifo.
    #[arg(long, default_value = "clock", value_parser = ["clock", "fifo"])]
    eviction: String,
    /// Print far-memory counters when the program exits.
    #[arg(long)]
    stats: bool,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROG"
    )]
    command: Vec<String>,
}

/// Finds `libremora_preload.so`: `REMORA_PRELOAD`, else next to this
/// executable (or in its `deps/`, where cargo puts it for `cargo run`).
fn preload_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REMORA_PRELOAD") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("REMORA_PRELOAD names {}, which does not exist", p.display());
    }
    let exe = std::env::current_exe().context("locating the remora binary")?;
    let dir = exe.parent().context("the remora binary has no directory")?;
    // Both may exist after a workspace build; the newer one matches this binary.
    let newest = [
        dir.join("libremora_preload.so"),
        dir.join("deps/libremora_preload.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
    .max_by_key(|(t, _)| *t);
    if let Some((_, p)) = newest {
        return Ok(p);
    }
    bail!(
        "libremora_preload.so not found next to {} (build it with `cargo build --release`, \
         or set REMORA_PRELOAD)",
        exe.display()
    )
}

/// Resolves a program name like the shell does.
fn find_program(name: &str) -> Result<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.is_file()
            && p.metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        if is_exec(&p) {
            return Ok(p);
        }
        bail!("{name}: no such executable file");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if is_exec(&p) {
            return Ok(p);
        }
    }
    bail!("{name}: command not found in PATH")
}

/// Runs the program; returns its exit code (128 + signal if killed).
pub fn run(a: RunArgs) -> Result<i32> {
    a.local_mem
        .parse::<Budget>()
        .map_err(|e| anyhow::anyhow!("--local-mem: {e}"))?;
    if !a.fetch_unit.is_power_of_two() || a.fetch_unit > 512 {
        bail!(
            "--fetch-unit must be a power of two up to 512, not {}",
            a.fetch_unit
        );
    }
    if a.heap_size < 1 << 20 {
        bail!("--heap-size must be at least 1MiB");
    }
    let prog = find_program(&a.command[0])?;
    let lib = preload_library()?;

    let (embedded, controller, token) = match (&a.controller, &a.token) {
        (Some(c), Some(t)) => {
            Cluster::connect_with(c, t, ClientOptions::default())
                .with_context(|| format!("cannot reach the controller at {c}"))?;
            (None, c.clone(), t.clone())
        }
        _ => {
            // Room for the program's heap and for a few programs it may start.
            let cfg = EmbeddedConfig::loopback(2, a.heap_size.saturating_mul(4).max(1 << 30));
            let e = Embedded::start(&cfg).context("starting an embedded cluster for the run")?;
            let (c, t) = (e.info.controller.clone(), e.info.token.clone());
            (Some(e), c, t)
        }
    };

    // Unique per run, also across hosts and containers sharing a cluster.
    let tag = format!("run-{}-{:016x}", std::process::id(), rand::random::<u64>());
    // A private directory for the counters (no predictable name in /tmp).
    let stats_dir = std::env::temp_dir().join(format!("remora-{tag}"));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&stats_dir)
            .with_context(|| format!("creating {}", stats_dir.display()))?;
    }
    let stats_file = stats_dir.join("stats");
    let lib = lib
        .canonicalize()
        .with_context(|| format!("resolving {}", lib.display()))?;
    let mut preload = lib.display().to_string();
    if preload.contains([' ', ':']) {
        bail!("the preload library path {preload:?} contains a space or ':', which LD_PRELOAD cannot carry");
    }
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        if !old.is_empty() {
            preload = format!("{preload} {}", old.to_string_lossy());
        }
    }
    let mut cmd = Command::new(&prog);
    cmd.args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env("REMORA_CONTROLLER", &controller)
        .env("REMORA_TOKEN", &token)
        .env("REMORA_LOCAL_MEM", &a.local_mem)
        .env("REMORA_HEAP_SIZE", a.heap_size.to_string())
        .env("REMORA_HEAP_REGION", &tag)
        .env("REMORA_RUN_PID", std::process::id().to_string())
        .env("REMORA_PREFETCH", a.prefetch.to_string())
        .env("REMORA_FETCH_UNIT", a.fetch_unit.to_string())
        .env("REMORA_EVICTION", &a.eviction);
    if a.stats {
        cmd.env("REMORA_STATS_FILE", &stats_file);
    } else {
        cmd.env_remove("REMORA_STATS_FILE");
    }
    // The program dies with remora (its far memory would be gone anyway).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", prog.display()))?;
    forward_signals(child.id() as i32);
    let status = child.wait().context("waiting for the program")?;

    if a.stats {
        print_stats(&stats_file);
    }
    let _ = std::fs::remove_dir_all(&stats_dir);
    if embedded.is_none() {
        free_regions(&controller, &token, &tag);
    }
    drop(embedded);
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

extern "C" fn ignore(_sig: libc::c_int) {}

/// While the program runs, remora passes SIGTERM and SIGHUP on to it and
/// ignores SIGINT (the terminal sends that to the program itself), so that
/// it always outlives the program and cleans up. Handlers, unlike ignored
/// dispositions, are reset in the program by exec.
fn forward_signals(child: i32) {
    CHILD.store(child, Ordering::Relaxed);
    // SAFETY: installing plain handlers that only call async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t);
    }
}

/// Frees the far heaps the program (and programs it started) allocated.
fn free_regions(controller: &str, token: &str, tag: &str) {
    let Ok(c) = Cluster::connect(controller, token) else {
        eprintln!("remora: could not reach {controller} to free the program's far heap");
        return;
    };
    let prefix = format!("{tag}-");
    if let Ok(list) = c.list_regions() {
        for r in list
            .iter()
            .filter(|r| r.name.as_deref().is_some_and(|n| n.starts_with(&prefix)))
        {
            if let Err(e) = c.free_region(r.id) {
                eprintln!("remora: freeing far heap region {}: {e}", r.id);
            }
        }
    }
}

fn print_stats(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        eprintln!("remora: no far-memory counters (the program did not start a far heap, or exited abnormally)");
        return;
    };
    for line in text.lines() {
        let kv: Vec<(&str, u64)> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
            .collect();
        let get = |k: &str| {
            kv.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| *v)
                .unwrap_or(0)
        };
        let mib = |pages: u64| pages as f64 * 4096.0 / (1 << 20) as f64;
        let prefetched = get("prefetched");
        let accuracy = if prefetched > 0 {
            format!(
                "{:.0}%",
                100.0 * get("prefetch_hits") as f64 / prefetched as f64
            )
        } else {
            "-".into()
        };
        eprintln!(
            "remora: pid {}: faults {} (zero-filled {}, from second chance {}), write faults {}, \
             fetched {:.1} MiB, written back {:.1} MiB, evictions {}, prefetched {} pages \
             (used {}, wasted {}, accuracy {accuracy}), local {:.1} of {:.1} MiB",
            get("pid"),
            get("faults") + get("second_chance"),
            get("zero_fills"),
            get("second_chance"),
            get("write_faults"),
            mib(get("fetched")),
            mib(get("written")),
            get("evictions"),
            prefetched,
            get("prefetch_hits"),
            get("prefetch_wasted"),
            mib(get("resident")),
            mib(get("budget")),
        );
    }
}
