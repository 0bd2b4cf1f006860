//! `remora bench`: the suite end to end (`--quick`, the report opened in a
//! browser), and each workload's check catching a damaged result through
//! every interface, against real server processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Opts, TestCluster, TOKEN};
use remora_bench::suite::{report, results, Interface, Workload};

fn worker_exe() -> &'static str {
    env!("CARGO_BIN_EXE_remora-bench-worker")
}

/// Runs one worker against the cluster, then frees what it left allocated
/// (as `remora bench` does between runs).
fn worker(tc: &TestCluster, w: Workload, i: Interface, extra: &[&str]) -> Output {
    let out = Command::new(worker_exe())
        .args(["--workload", w.name(), "--interface", i.name()])
        .args(["--scale", "0.01", "--ratio", "25", "--seed", "11"])
        .args(["--controller", &tc.controller_addr, "--token", TOKEN])
        .args(extra)
        .output()
        .expect("run the worker");
    let c = tc.client();
    for r in c.list_regions().unwrap() {
        c.free_region(r.id).unwrap();
    }
    out
}

fn digest(out: &Output) -> u64 {
    let s = String::from_utf8_lossy(&out.stdout);
    let r: remora_bench::suite::worker::WorkerReport =
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"));
    r.digest
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn cluster() -> TestCluster {
    TestCluster::start(Opts {
        servers: 2,
        capacity: "1GiB",
        slab: "1MiB",
        ..Opts::default()
    })
}

/// Every workload through every interface that fits it computes the
/// all-local answer, and a damaged result fails its check loudly.
#[test]
fn every_workload_checks_its_result_through_every_interface() {
    let tc = cluster();
    for w in Workload::ALL {
        let local = worker(&tc, w, Interface::Local, &[]);
        assert!(local.status.success(), "{w} local: {}", stderr(&local));
        let want = digest(&local);
        for &i in w.interfaces() {
            let ok = worker(&tc, w, i, &[]);
            assert!(ok.status.success(), "{w} via {i}: {}", stderr(&ok));
            assert_eq!(digest(&ok), want, "{w} via {i} computed another answer");
            let bad = worker(&tc, w, i, &["--corrupt"]);
            assert!(
                !bad.status.success(),
                "{w} via {i}: a damaged result passed"
            );
            let e = stderr(&bad);
            assert!(e.contains("result check failed"), "{w} via {i}: {e}");
            assert!(!e.contains("panicked"), "{w} via {i}: {e}");
        }
    }
}

#[test]
fn the_worker_refuses_bad_arguments_clearly() {
    let tc = cluster();
    let out = worker(&tc, Workload::Matmul, Interface::Regions, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not run through regions"),
        "{}",
        stderr(&out)
    );
    for args in [
        &["--workload", "nope", "--interface", "local"][..],
        &["--workload", "sort", "--interface", "local", "--ratio", "0"],
        &[
            "--workload",
            "sort",
            "--interface",
            "local",
            "--scale",
            "-1",
        ],
        &["--workload", "sort", "--interface", "objects"],
    ] {
        let out = Command::new(worker_exe()).args(args).output().unwrap();
        let e = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            !e.trim().is_empty() && !e.contains("panicked"),
            "{args:?}: {e}"
        );
    }
}

fn require(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

/// `remora bench --quick`, as CI runs it: every workload at two ratios,
/// every interface, the peers; then the report in headless Chromium.
#[test]
fn quick_suite_runs_end_to_end_and_the_report_shows_its_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("report");
    let out = Command::new(common::exe())
        .args(["bench", "--quick", "--out"])
        .arg(&out_dir)
        .env("REMORA_HOME", dir.path().join("home"))
        .output()
        .expect("run remora bench --quick");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "remora bench --quick failed:\n{text}\n{}",
        stderr(&out)
    );
    assert!(text.contains("median slowdown"), "{text}");
    let recs = results::load(&out_dir.join("results.json")).unwrap();
    for w in Workload::ALL {
        for &i in w.interfaces() {
            let ratios: &[u32] = match i {
                Interface::Local | Interface::Regions => &[0],
                _ => &[100, 25],
            };
            for &r in ratios {
                let rec = recs
                    .iter()
                    .find(|x| x.workload == w.name() && x.interface == i.name() && x.ratio == r)
                    .unwrap_or_else(|| panic!("no record of {w} via {i} at {r}%"));
                assert!(rec.ok(), "{w} via {i} at {r}%: {}", rec.status);
                assert!(rec.secs > 0.0 && rec.ops > 0, "{rec:?}");
                if i != Interface::Local {
                    assert!(rec.slowdown.is_some(), "{rec:?}");
                }
            }
        }
    }
    let peers = [
        "redis",
        "redis-pipelined",
        "memcached",
        "memcached-pipelined",
    ];
    for p in peers {
        let rec = recs
            .iter()
            .find(|x| x.workload == "kv-zipf0.99" && x.interface == p)
            .unwrap_or_else(|| panic!("no {p} record"));
        if require("REMORA_REQUIRE_PEERS") {
            assert!(rec.ok(), "{p}: {}", rec.status);
        } else {
            assert!(
                rec.ok() || rec.status.starts_with("skipped"),
                "{p}: {}",
                rec.status
            );
        }
    }
    let zram = recs
        .iter()
        .find(|x| x.interface == "zram")
        .expect("a zram record");
    assert!(
        zram.ok() || zram.status.starts_with("skipped"),
        "{}",
        zram.status
    );
    assert!(out_dir.join("results.csv").is_file());
    let html_path = out_dir.join("index.html");
    let html = std::fs::read_to_string(&html_path).unwrap();
    for w in Workload::ALL {
        assert!(html.contains(w.name()), "the report does not mention {w}");
    }
    assert!(
        html.matches("<svg").count() >= Workload::ALL.len(),
        "too few plots"
    );
    screenshot_check(&html_path, dir.path());
}

fn screenshot_check(html: &Path, dir: &Path) {
    if report::find_chromium().is_none() {
        assert!(
            !require("REMORA_REQUIRE_CHROMIUM"),
            "chromium not installed and REMORA_REQUIRE_CHROMIUM=1"
        );
        eprintln!("skipped the browser check: chromium not installed");
        return;
    }
    let png: PathBuf = dir.join("report.png");
    report::screenshot(html, &png).unwrap();
    let n = report::plot_pixel_count(&png).unwrap();
    assert!(
        n > 5000,
        "the screenshot shows only {n} pixels of plot colours"
    );
}

#[test]
fn bench_report_renders_from_a_results_file() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/tests/data/results-small.json");
    let out = Command::new(common::exe())
        .args(["bench", "report", "--from"])
        .arg(&fixture)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
    assert!(html.contains("<svg"));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    let out = Command::new(common::exe())
        .args(["bench", "report", "--from"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad.json"), "{}", stderr(&out));
}

#[test]
fn bad_suite_flags_are_refused_before_anything_starts() {
    for (args, says) in [
        (&["--workloads", "nope"][..], "unknown workload"),
        (&["--interfaces", "nfs"], "unknown interface"),
        (&["--ratios", "0"], "between 1 and 100"),
        (&["--ratios", "150"], "between 1 and 100"),
        (&["--repeat", "0"], "at least 1"),
        (&["--scale", "0"], "--scale"),
    ] {
        let out = Command::new(common::exe())
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        let e = stderr(&out);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(e.contains(says), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}

/// `--latency` reaches the servers: every hop of an uncached walk waits
/// at least the injected delay, and the record says what was injected.
#[test]
fn injected_latency_reaches_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::exe())
        .args(["bench", "--workloads", "chase", "--interfaces", "regions"])
        .args([
            "--repeat",
            "1",
            "--scale",
            "0.01",
            "--latency",
            "300us",
            "--out",
        ])
        .arg(dir.path())
        .env("REMORA_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = results::load(&dir.path().join("results.json")).unwrap();
    let r = recs.iter().find(|r| r.interface == "regions").unwrap();
    assert!(r.ok(), "{}", r.status);
    assert_eq!(r.injected_latency_us, 300);
    let p50 = r.lat_p50_us.unwrap();
    assert!(p50 >= 300.0, "a hop took {p50} µs with 300 µs injected");
}
