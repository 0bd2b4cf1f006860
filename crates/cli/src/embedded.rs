//! The embedded cluster: a controller and N memory servers started as real
//! child processes of this binary on loopback, and the cluster file that
//! lets other `remora` commands on this machine find them.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a client needs to reach a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// Controller address.
    pub controller: String,
    /// Tenant token.
    pub token: String,
}

/// Directory of per-user Remora state: `$REMORA_HOME`, else `~/.remora`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("REMORA_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    base.join(".remora")
}

/// The file `remora up` writes.
pub fn cluster_file() -> PathBuf {
    home().join("cluster.toml")
}

/// Writes the cluster file (readable by the owner only: it holds the token).
pub fn write_cluster_file(path: &Path, info: &ClusterInfo) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let text = format!(
        "# Written by `remora up`; removed when it stops.\ncontroller = \"{}\"\ntoken = \"{}\"\n",
        info.controller, info.token
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Reads the cluster file.
pub fn read_cluster_file(path: &Path) -> Result<ClusterInfo> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no cluster given: pass --controller and --token, or start one with `remora up` (it writes {})",
            path.display()
        )
    })?;
    let mut controller = None;
    let mut token = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "controller" => controller = Some(v),
            "token" => token = Some(v),
            _ => {}
        }
    }
    match (controller, token) {
        (Some(controller), Some(token)) => Ok(ClusterInfo { controller, token }),
        _ => bail!("{} lacks controller or token", path.display()),
    }
}

/// Settings of an embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Number of memory servers.
    pub servers: usize,
    /// Capacity of each server.
    pub capacity_per_server: u64,
    /// Controller listen address.
    pub controller_listen: String,
    /// Slab size.
    pub slab_size: u64,
    /// Controller metadata directory (`None`: a temporary one).
    pub data_dir: Option<PathBuf>,
    /// Latency injected by the servers.
    pub inject_latency: Option<String>,
    /// Placement policy.
    pub placement: String,
    /// More controller flags (e.g. `--dead-after 1s`).
    pub controller_args: Vec<String>,
}

impl EmbeddedConfig {
    /// `servers` servers of `capacity_per_server` bytes on loopback, 1 MiB
    /// slabs, any free ports, a temporary metadata directory.
    pub fn loopback(servers: usize, capacity_per_server: u64) -> EmbeddedConfig {
        EmbeddedConfig {
            servers,
            capacity_per_server,
            controller_listen: "127.0.0.1:0".into(),
            slab_size: 1 << 20,
            data_dir: None,
            inject_latency: None,
            placement: "p2c".into(),
            controller_args: Vec::new(),
        }
    }
}

/// A running embedded cluster; stops its processes when dropped.
#[derive(Debug)]
pub struct Embedded {
    /// How to reach it.
    pub info: ClusterInfo,
    /// Server addresses.
    pub servers: Vec<String>,
    children: Vec<(String, Child)>,
    _tmp: Option<TempDir>,
}

/// A directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads the first stdout line of a child, which announces its address.
fn announced_addr(name: &str, child: &mut Child) -> Result<String> {
    let out = child.stdout.take().context("child has no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(out).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .with_context(|| format!("{name} did not start within 20 s"))?
        .with_context(|| format!("reading {name}'s output"))?;
    match line.trim().rsplit_once(' ') {
        Some((_, addr)) if line.contains("listening on") => Ok(addr.to_string()),
        _ => bail!("{name} failed to start (see its error above)"),
    }
}

impl Embedded {
    /// Starts the controller and the servers and waits until all servers registered.
    pub fn start(cfg: &EmbeddedConfig) -> Result<Embedded> {
        let exe = std::env::current_exe().context("locating the remora binary")?;
        let (data_dir, tmp) = match &cfg.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "remora-up-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                (d.clone(), Some(TempDir(d)))
            }
        };
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        // Keep the token of an existing data directory so that regions stay reachable.
        let config = data_dir.join("controller.toml");
        let token = match std::fs::read_to_string(&config).ok().and_then(|t| {
            t.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("token = ")
                    .map(|v| v.trim_matches('"').to_string())
            })
        }) {
            Some(t) => t,
            None => {
                let t = format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                );
                std::fs::write(
                    &config,
                    format!(
                        "# Tenants of the embedded cluster.\n[[tenants]]\nname = \"default\"\ntoken = \"{t}\"\nadmin = true\n"
                    ),
                )
                .with_context(|| format!("writing {}", config.display()))?;
                t
            }
        };
        let quiet = std::env::var_os("RUST_LOG").is_none();
        // Only this cluster's servers may join its controller.
        let secret = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let pid = std::process::id().to_string();
        let spawn = |name: &str, args: Vec<String>| -> Result<(String, Child)> {
            let mut c = Command::new(&exe);
            // Own process group: a terminal's Ctrl-C reaches `remora up`
            // alone, which then stops the children in order.
            c.process_group(0)
                .args(&args)
                .args(["--exit-with-parent", &pid])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if quiet {
                c.env("RUST_LOG", "warn");
            }
            c.env("REMORA_CLUSTER_SECRET", &secret)
                .env_remove("REMORA_TOKEN")
                .env_remove("REMORA_CONTROLLER");
            let child = c.spawn().with_context(|| format!("starting {name}"))?;
            Ok((name.to_string(), child))
        };
        let mut me = Embedded {
            info: ClusterInfo {
                controller: String::new(),
                token,
            },
            servers: Vec::new(),
            children: Vec::new(),
            _tmp: tmp,
        };
        let ctl_args = vec![
            "controller".into(),
            "--listen".into(),
            cfg.controller_listen.clone(),
            "--config".into(),
            config.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--slab-size".into(),
            cfg.slab_size.to_string(),
            "--placement".into(),
            cfg.placement.clone(),
        ];
        let mut ctl_args = ctl_args;
        ctl_args.extend(cfg.controller_args.iter().cloned());
        me.children.push(spawn("controller", ctl_args)?);
        let ctl = announced_addr("controller", &mut me.children[0].1)?;
        me.info.controller = ctl.clone();
        for i in 0..cfg.servers {
            let mut args = vec![
                "server".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--controller".into(),
                ctl.clone(),
                "--capacity".into(),
                cfg.capacity_per_server.to_string(),
            ];
            if let Some(l) = &cfg.inject_latency {
                args.push("--inject-latency".into());
                args.push(l.clone());
            }
            let name = format!("server {i}");
            me.children.push(spawn(&name, args)?);
            let n = me.children.len() - 1;
            let addr = announced_addr(&name, &mut me.children[n].1)?;
            me.servers.push(addr);
        }
        me.wait_registered(cfg.servers)?;
        Ok(me)
    }

    fn wait_registered(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = remora_client::Cluster::connect(&self.info.controller, &self.info.token)?;
            let alive = c.status()?.servers.iter().filter(|s| s.alive).count();
            if alive >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {alive} of {n} servers registered within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills memory server `i` at once (SIGKILL), as a crash would.
    pub fn kill_server(&mut self, i: usize) -> Result<()> {
        let name = format!("server {i}");
        let (_, c) = self
            .children
            .iter_mut()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("no {name}"))?;
        c.kill().with_context(|| format!("killing {name}"))?;
        let _ = c.wait();
        Ok(())
    }

    /// Process ids of the memory servers.
    pub fn server_pids(&self) -> Vec<u32> {
        self.children
            .iter()
            .filter(|(n, _)| n.starts_with("server"))
            .map(|(_, c)| c.id())
            .collect()
    }

    /// The first child that exited, if any.
    pub fn exited(&mut self) -> Option<String> {
        for (name, c) in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(format!("{name} exited ({st})"));
            }
        }
        None
    }

    /// Stops every process.
    pub fn stop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A helper child process that announced its address; killed on drop.
#[derive(Debug)]
pub struct Helper {
    /// Its address.
    pub addr: String,
    child: Child,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this binary with `args` and waits for its "listening on" line.
pub fn spawn_announcing(name: &str, args: &[String]) -> Result<Helper> {
    let exe = std::env::current_exe().context("locating the remora binary")?;
    let mut child = Command::new(exe)
        .process_group(0)
        .args(args)
        .args(["--exit-with-parent", &std::process::id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    match announced_addr(name, &mut child) {
        Ok(addr) => Ok(Helper { addr, child }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Exits this process when its parent goes away (children of `remora up`
/// must not outlive it even if it is killed with SIGKILL).
pub fn exit_with_parent(parent: u32) {
    std::thread::spawn(move || loop {
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}
