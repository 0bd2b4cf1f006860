//! The `remora` command line, as a user runs it.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Opts, Rng, TestCluster};

fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("run remora");
    assert!(
        out.status.success(),
        "remora failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn run_err(mut c: Command) -> String {
    let out = c.output().expect("run remora");
    assert!(!out.status.success(), "remora unexpectedly succeeded");
    String::from_utf8(out.stderr).expect("utf8")
}

#[test]
fn region_commands_stream_files_in_and_out() {
    let tc = TestCluster::start(Opts::default());
    let out = run_ok(tc.remora(&["region", "create", "blob", "--size", "3MiB"]));
    assert!(out.contains("created region blob"), "{out}");
    let data = Rng(3).bytes((2 << 20) + 12345);
    let file = tc.dir.path().join("in.bin");
    std::fs::write(&file, &data).unwrap();
    let mut w = tc.remora(&["region", "write", "blob", "--offset", "4KiB"]);
    w.stdin(std::fs::File::open(&file).unwrap());
    run_ok(w);
    let out = tc
        .remora(&[
            "region",
            "read",
            "blob",
            "--offset",
            "4096",
            "--len",
            &data.len().to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data, "read back differs");
    let whole = tc.remora(&["region", "read", "blob"]).output().unwrap();
    assert_eq!(whole.stdout.len(), 3 << 20);
    assert!(whole.stdout[..4096].iter().all(|&b| b == 0));
    let list = run_ok(tc.remora(&["region", "list"]));
    assert!(list.contains("blob") && list.contains("3 MiB"), "{list}");
    let status = run_ok(tc.remora(&["status"]));
    assert!(
        status.contains("SERVERS") && status.contains("alive"),
        "{status}"
    );
    assert_eq!(status.matches("alive").count(), 3, "{status}");
    assert!(status.contains("blob"), "{status}");
    assert!(
        status.contains("WRITTEN") && status.contains("MiB"),
        "{status}"
    );
    // A reader that goes away (`remora status | head -1`) ends it quietly.
    let mut c = tc.remora(&["status"]);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");

    // Errors are clear and exit non-zero.
    let e = run_err(tc.remora(&["region", "create", "x", "--size", "12 parsecs"]));
    assert!(e.contains("invalid size"), "{e}");
    let e = run_err(tc.remora(&["region", "create", "blob", "--size", "1MiB"]));
    assert!(e.contains("name taken"), "{e}");
    let e = run_err(tc.remora(&["region", "read", "missing"]));
    assert!(e.contains("region not found"), "{e}");
    let e = run_err(tc.remora(&["region", "read", "blob", "--offset", "3MiB", "--len", "1"]));
    assert!(e.contains("past the end"), "{e}");
    let mut w = tc.remora(&["region", "write", "blob", "--offset", "3MiB"]);
    w.stdin(std::fs::File::open(&file).unwrap());
    let e = run_err(w);
    assert!(e.contains("does not fit"), "{e}");
    let e = run_err(tc.remora(&["status", "--token", "wrong"]));
    assert!(e.contains("unauthenticated"), "{e}");

    run_ok(tc.remora(&["region", "rm", "blob"]));
    let list = run_ok(tc.remora(&["region", "list"]));
    assert!(!list.contains("blob"), "{list}");
}

#[test]
fn redundant_regions_from_the_command_line() {
    let tc = TestCluster::start(Opts::default());
    let out = run_ok(tc.remora(&[
        "region",
        "create",
        "coded",
        "--size",
        "200KiB",
        "--redundancy",
        "erasure:2+1",
    ]));
    assert!(
        out.contains("erasure:2+1") && out.contains("6 slabs"),
        "{out}"
    );
    run_ok(tc.remora(&[
        "region",
        "create",
        "copies",
        "--size",
        "100KiB",
        "--redundancy",
        "replicate:3",
    ]));
    let data = Rng(5).bytes(150_000);
    let file = tc.dir.path().join("in.bin");
    std::fs::write(&file, &data).unwrap();
    for name in ["coded", "copies"] {
        let mut w = tc.remora(&["region", "write", name, "--offset", "100"]);
        w.stdin(std::fs::File::open(&file).unwrap());
        if name == "copies" {
            // 100 KiB region: the input does not fit.
            let e = run_err(w);
            assert!(e.contains("does not fit"), "{e}");
            continue;
        }
        run_ok(w);
        let out = tc
            .remora(&["region", "read", name, "--offset", "100", "--len", "150000"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(out.stdout == data, "read back differs");
    }
    let show = run_ok(tc.remora(&["region", "show", "coded"]));
    assert!(
        show.contains("parity:0") && show.contains("parity:1") && show.contains("data"),
        "{show}"
    );
    let show = run_ok(tc.remora(&["region", "show", "copies"]));
    assert!(show.contains("copy:1"), "{show}");
    let list = run_ok(tc.remora(&["region", "list"]));
    assert!(
        list.contains("replicate:3") && list.contains("erasure:2+1"),
        "{list}"
    );
    let e = run_err(tc.remora(&[
        "region",
        "create",
        "x",
        "--size",
        "1MiB",
        "--redundancy",
        "raid5",
    ]));
    assert!(e.contains("invalid redundancy"), "{e}");
    let e = run_err(tc.remora(&[
        "region",
        "create",
        "x",
        "--size",
        "1MiB",
        "--redundancy",
        "erasure:4+2",
    ]));
    assert!(e.contains("distinct servers"), "{e}");
    let e = run_err(tc.remora(&["region", "move", "coded", "--slab", "0"]));
    assert!(e.contains("erasure-coded"), "{e}");
    let e = run_err(tc.remora(&["region", "list", "--timeout", "0s"]));
    assert!(e.contains("must be positive"), "{e}");
    let out = run_ok(tc.remora(&[
        "region",
        "read",
        "coded",
        "--len",
        "10",
        "--timeout",
        "2s",
        "--failover-timeout",
        "3s",
    ]));
    assert_eq!(out.len(), 10);
}

#[test]
fn commands_without_a_cluster_say_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::exe())
        .args(["status"])
        .env("REMORA_HOME", dir.path())
        .env_remove("REMORA_CONTROLLER")
        .env_remove("REMORA_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("remora up"), "{e}");
    let out = Command::new(common::exe())
        .args(["--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("region"));
}

#[test]
fn up_starts_a_cluster_that_other_commands_find_and_stops_on_ctrl_c() {
    let home = tempfile::tempdir().unwrap();
    let mut up = Command::new(common::exe())
        .process_group(0)
        .args([
            "up",
            "--servers",
            "2",
            "--capacity-per-server",
            "64MiB",
            "--controller-listen",
            "127.0.0.1:0",
        ])
        .env("REMORA_HOME", home.path())
        .env_remove("REMORA_CONTROLLER")
        .env_remove("REMORA_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let file = home.path().join("cluster.toml");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() {
        assert!(
            Instant::now() < deadline,
            "remora up did not write its cluster file"
        );
        assert!(up.try_wait().unwrap().is_none(), "remora up exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let remora = |args: &[&str]| {
        let mut c = Command::new(common::exe());
        c.args(args)
            .env("REMORA_HOME", home.path())
            .env_remove("REMORA_CONTROLLER")
            .env_remove("REMORA_TOKEN");
        c
    };
    let status = run_ok(remora(&["status"]));
    assert_eq!(status.matches("alive").count(), 2, "{status}");
    run_ok(remora(&["region", "create", "demo", "--size", "8MiB"]));
    let mut w = remora(&["region", "write", "demo"]);
    w.stdin(Stdio::piped());
    let mut child = w
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"hello far memory")
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    let out = remora(&["region", "read", "demo", "--len", "16"])
        .output()
        .unwrap();
    assert_eq!(&out.stdout, b"hello far memory");

    // Ctrl-C stops everything and removes the cluster file.
    let st = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "remora up did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code}");
    let mut stdout = String::new();
    use std::io::Read;
    up.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(
        stdout.contains("Remora cluster up") && stdout.contains("stopped"),
        "{stdout}"
    );
    assert!(!file.exists(), "cluster file left behind");
    // The controller and servers are gone too.
    let addrs: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("server ") || l.trim_start().starts_with("controller ")
        })
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(addrs.len(), 3, "{stdout}");
    for a in addrs {
        assert!(
            std::net::TcpStream::connect(a).is_err(),
            "{a} still accepts connections"
        );
    }
    let e = run_err(remora(&["status"]));
    assert!(e.contains("remora up"), "{e}");
}
