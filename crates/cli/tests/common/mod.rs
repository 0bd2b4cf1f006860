//! Test harness: real `remora` controller and server processes on loopback.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remora_client::{ClientOptions, Cluster};
use remora_proto::data::{self, Reply, Request};
use remora_proto::frame::FrameDecoder;
use remora_proto::ErrorCode;

pub const TOKEN: &str = "tok-default";
pub const OTHER_TOKEN: &str = "tok-other";

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_remora")
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut cmd = Command::new(exe());
        cmd.args(args);
        Self::spawn_cmd(&mut cmd)
    }

    /// Spawns `cmd` (which runs `remora` and announces its address).
    pub fn spawn_cmd(cmd: &mut Command) -> Proc {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let log = std::env::var("REMORA_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let mut child = cmd
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn remora");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("read announce line");
        assert!(
            line.contains("listening on"),
            "unexpected first line {line:?} from {args:?}"
        );
        let addr = line.trim().rsplit(' ').next().expect("addr").to_string();
        Proc { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }
}

pub struct Opts {
    pub servers: usize,
    pub capacity: &'static str,
    pub slab: &'static str,
    pub server_args: Vec<String>,
    pub secret: Option<&'static str>,
    /// The controller's `dead_after`.
    pub dead_after: &'static str,
    /// The controller's `reconcile_interval`.
    pub reconcile_interval: &'static str,
    /// More lines of controller configuration (TOML, top level).
    pub controller_config: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            servers: 3,
            capacity: "8MiB",
            slab: "64KiB",
            server_args: Vec::new(),
            secret: None,
            dead_after: "1s",
            reconcile_interval: "200ms",
            controller_config: String::new(),
        }
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub controller: Option<Proc>,
    pub controller_addr: String,
    pub servers: Vec<Proc>,
    pub opts: Opts,
}

impl TestCluster {
    pub fn start(opts: Opts) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("controller.toml"),
            format!(
                r#"
slab_size = "{}"
heartbeat_interval = "100ms"
dead_after = "{}"
reconcile_interval = "{}"
{}
{}
[[tenants]]
name = "default"
token = "{TOKEN}"
admin = true
[[tenants]]
name = "other"
token = "{OTHER_TOKEN}"
quota = "1MiB"
"#,
                opts.slab,
                opts.dead_after,
                opts.reconcile_interval,
                opts.controller_config,
                opts.secret
                    .map(|s| format!("cluster_secret = \"{s}\""))
                    .unwrap_or_default()
            ),
        )
        .expect("write config");
        let mut tc = TestCluster {
            dir,
            controller: None,
            controller_addr: "127.0.0.1:0".into(),
            servers: Vec::new(),
            opts,
        };
        tc.start_controller();
        for _ in 0..tc.opts.servers {
            tc.add_server(&[]);
        }
        tc.wait_alive(tc.opts.servers);
        tc
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start_controller(&mut self) {
        self.start_controller_env(&[]);
    }

    /// Starts the controller (again: same address, configuration and data
    /// directory) with more environment variables (test hooks).
    pub fn start_controller_env(&mut self, env: &[(&str, &str)]) {
        let cfg = self.dir.path().join("controller.toml");
        let data = self.data_dir();
        let mut cmd = Command::new(exe());
        cmd.args([
            "controller",
            "--listen",
            &self.controller_addr,
            "--config",
            cfg.to_str().expect("utf8"),
            "--data-dir",
            data.to_str().expect("utf8"),
        ]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let p = Proc::spawn_cmd(&mut cmd);
        self.controller_addr = p.addr.clone();
        self.controller = Some(p);
    }

    pub fn kill_controller(&mut self) {
        self.controller = None;
    }

    /// Sum of the slabs the servers report in use (via the controller).
    pub fn slabs_used(&self) -> u64 {
        self.client()
            .status()
            .expect("status")
            .servers
            .iter()
            .map(|s| s.slabs_used)
            .sum()
    }

    /// Waits until the servers report `n` slabs in use.
    pub fn wait_slabs_used(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used = self.slabs_used();
            if used == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "servers report {used} slabs, want {n}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn add_server(&mut self, extra: &[&str]) -> usize {
        let mut args = vec![
            "server",
            "--listen",
            "127.0.0.1:0",
            "--controller",
            &self.controller_addr,
            "--capacity",
            self.opts.capacity,
        ];
        let mut owned: Vec<String> = self.opts.server_args.clone();
        if let Some(secret) = self.opts.secret {
            if !extra.contains(&"--cluster-secret") {
                owned.push("--cluster-secret".into());
                owned.push(secret.into());
            }
        }
        args.extend(owned.iter().map(|s| s.as_str()));
        args.extend_from_slice(extra);
        self.servers.push(Proc::spawn(&args));
        self.servers.len() - 1
    }

    pub fn client(&self) -> Cluster {
        Cluster::connect(&self.controller_addr, TOKEN).expect("connect")
    }

    pub fn client_with(&self, token: &str, opts: ClientOptions) -> remora_client::Result<Cluster> {
        Cluster::connect_with(&self.controller_addr, token, opts)
    }

    /// Waits until exactly `n` servers are alive.
    pub fn wait_alive(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = Cluster::connect(&self.controller_addr, TOKEN) {
                if let Ok(s) = c.status() {
                    if s.servers.iter().filter(|s| s.alive).count() == n {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "servers did not reach {n} alive");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `remora` command pointed at this cluster.
    pub fn remora(&self, args: &[&str]) -> Command {
        let mut c = Command::new(exe());
        c.args(args)
            .env("REMORA_CONTROLLER", &self.controller_addr)
            .env("REMORA_TOKEN", TOKEN)
            .env("REMORA_HOME", self.dir.path().join("home"))
            .env("RUST_LOG", "warn");
        c
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A deterministic xorshift generator for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A raw protocol connection for sending hand-made frames.
pub struct Raw {
    pub s: TcpStream,
    dec: FrameDecoder,
}

pub enum Got {
    Reply(u64, u16, Vec<u8>),
    Closed,
}

impl Raw {
    /// A connection that has sent nothing yet.
    pub fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw {
            s,
            dec: FrameDecoder::new(32 << 20),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed; that is an acceptable answer.
        let _ = self.s.write_all(bytes);
    }

    pub fn request(&mut self, id: u64, req: &Request<'_>) {
        let mut b = Vec::new();
        data::encode_request(&mut b, id, req);
        self.send(&b);
    }

    pub fn recv(&mut self) -> Got {
        loop {
            if let Some(f) = self.dec.peek().unwrap() {
                let g = Got::Reply(f.id, f.kind, f.payload.to_vec());
                self.dec.consume();
                return g;
            }
            let spare = self.dec.spare(4096);
            match self.s.read(spare) {
                Ok(0) | Err(_) => return Got::Closed,
                Ok(n) => self.dec.filled(n),
            }
        }
    }

    pub fn expect_error(&mut self, want: ErrorCode) {
        match self.recv() {
            Got::Reply(_, kind, p) => match data::decode_reply(kind, &p).unwrap() {
                Reply::Error { code, message } => {
                    assert_eq!(code, want, "{message}");
                    assert!(!message.is_empty());
                }
                other => panic!("expected {want:?}, got {other:?}"),
            },
            Got::Closed => panic!("expected {want:?}, connection closed"),
        }
    }

    /// A handshake with the admin key or a slab capability (`(0, 0)`:
    /// none, so only statistics may follow).
    pub fn hello(&mut self, admin_key: u64, cap: (u64, u64)) {
        let mut b = Vec::new();
        data::hello(&mut b, 1, admin_key, 7, cap);
        self.send(&b);
        match self.recv() {
            Got::Reply(1, kind, p) => assert!(matches!(
                data::decode_reply(kind, &p),
                Ok(Reply::HelloOk { .. })
            )),
            _ => panic!("no handshake reply"),
        }
    }

    pub fn expect_closed_eventually(&mut self) {
        for _ in 0..4 {
            if let Got::Closed = self.recv() {
                return;
            }
        }
        panic!("connection stayed open");
    }
}

/// The resident memory of process `pid` in bytes (`VmRSS`).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}
