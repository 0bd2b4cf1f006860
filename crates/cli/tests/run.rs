//! `remora run`: real, unmodified programs with their heap in far memory,
//! each checked for the same output as a native run.

mod common;

use std::process::{Command, Output};

use common::exe;

/// Runs `prog args` natively and under `remora run --local-mem 25% --stats`;
/// returns (native stdout, far stdout, far stderr).
fn both(prog: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>, String) {
    let native = Command::new(prog).args(args).output().expect("native run");
    assert!(
        native.status.success(),
        "{prog} failed natively: {native:?}"
    );
    let far = remora_run(
        &[
            "--local-mem",
            "25%",
            "--heap-size",
            "1GiB",
            "--stats",
            "--",
            prog,
        ],
        args,
    );
    let err = String::from_utf8_lossy(&far.stderr).to_string();
    assert!(
        far.status.success(),
        "{prog} under remora run failed: {err}"
    );
    (native.stdout, far.stdout, err)
}

fn remora_run(flags: &[&str], args: &[&str]) -> Output {
    Command::new(exe())
        .arg("run")
        .args(flags)
        .args(args)
        .output()
        .expect("remora run")
}

/// The counters line `--stats` printed: (faults, evictions).
fn counters(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("remora: pid"))
        .unwrap_or_else(|| panic!("no counters in: {stderr}"));
    let after = |key: &str| -> u64 {
        let i = line
            .find(key)
            .unwrap_or_else(|| panic!("{key} missing in {line}"))
            + key.len();
        line[i..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (after("faults"), after("evictions"))
}

fn check_far_memory_was_used(what: &str, stderr: &str) {
    let (faults, evictions) = counters(stderr);
    assert!(
        faults > 100 && evictions > 100,
        "{what}: far memory barely used: {stderr}"
    );
}

#[test]
fn sort_gives_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("numbers.txt");
    let mut rng = common::Rng(42);
    let text: String = (0..400_000)
        .map(|_| format!("{}\n", rng.next() % 10_000_000))
        .collect();
    std::fs::write(&input, text).unwrap();
    let (native, far, err) = both("sort", &["-n", input.to_str().unwrap()]);
    assert!(native == far, "sort output differs");
    check_far_memory_was_used("sort", &err);
}

#[test]
fn python_dict_gives_the_same_output() {
    let script = "d = {i: str(i) * 3 for i in range(300000)}\nprint(sum(len(v) for v in d.values()), sum(d))";
    let (native, far, err) = both("python3", &["-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&native),
        String::from_utf8_lossy(&far)
    );
    check_far_memory_was_used("python3", &err);
}

#[test]
fn sqlite_in_memory_database_gives_the_same_output() {
    let sql = "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);\n\
               WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000)\n\
               INSERT INTO t SELECT x, (x * 7919) % 1000, printf('%040d', x) FROM c;\n\
               CREATE INDEX tk ON t(k);\n\
               SELECT k, count(*), sum(id), max(v) FROM t GROUP BY k ORDER BY k LIMIT 5;\n\
               SELECT count(*), sum(length(v)) FROM t WHERE k BETWEEN 100 AND 200;";
    let (native, far, err) = both("sqlite3", &[":memory:", sql]);
    assert_eq!(
        String::from_utf8_lossy(&native),
        String::from_utf8_lossy(&far)
    );
    check_far_memory_was_used("sqlite3", &err);
}

#[test]
fn gzip_round_trip_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.txt");
    let mut rng = common::Rng(7);
    let text: String = (0..300_000)
        .map(|i| format!("{i} {}\n", rng.next() % 1000))
        .collect();
    std::fs::write(&input, &text).unwrap();
    let (native_gz, far_gz, _) = both("gzip", &["-c", "-6", input.to_str().unwrap()]);
    assert!(native_gz == far_gz, "gzip output differs");
    let gz = dir.path().join("data.txt.gz");
    std::fs::write(&gz, &far_gz).unwrap();
    let back = remora_run(
        &["--local-mem", "25%", "--", "gunzip"],
        &["-c", gz.to_str().unwrap()],
    );
    assert!(back.status.success(), "{back:?}");
    assert!(
        back.stdout == text.as_bytes(),
        "gunzip did not give the input back"
    );
}

#[test]
fn forked_child_sees_the_whole_heap() {
    // The parent builds a big list (mostly evicted), forks; the child sums it.
    let script = "import os\n\
                  xs = [str(i) * 4 for i in range(200000)]\n\
                  r, w = os.pipe()\n\
                  pid = os.fork()\n\
                  if pid == 0:\n    os.write(w, str(sum(len(x) for x in xs)).encode()); os._exit(0)\n\
                  os.waitpid(pid, 0)\n\
                  print(os.read(r, 100).decode(), sum(len(x) for x in xs))";
    let (native, far, err) = both("python3", &["-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&native),
        String::from_utf8_lossy(&far)
    );
    check_far_memory_was_used("python3 with fork", &err);
}

/// The C allocator API through the preload library (`tests/c/malloc_api.c`):
/// calloc zeroes recycled memory, every aligned allocator aligns, realloc
/// keeps bytes while growing and shrinking, `malloc_usable_size` covers the
/// request, threads free and reallocate each other's blocks, and `fork`
/// while other threads allocate gives a child that can use the heap. Needs a C
/// compiler (`cc`); skipped without one.
#[test]
fn c_allocator_api_behaves_like_glibc() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("malloc_api");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/malloc_api.c");
    match Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(src)
        .status()
    {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("no C compiler ({other:?}); skipped");
            return;
        }
    }
    let bin = bin.to_str().unwrap();
    let (native, far, err) = both(bin, &[]);
    assert!(native.starts_with(b"ok "), "{native:?}");
    assert_eq!(
        String::from_utf8_lossy(&native),
        String::from_utf8_lossy(&far),
        "{err}"
    );
    let (faults, _) = counters(&err);
    assert!(faults > 100, "far memory barely used: {err}");
}

#[test]
fn bad_invocations_are_refused_clearly() {
    let o = remora_run(&["--", "no-such-program-xyz"], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("command not found"),
        "{o:?}"
    );
    let o = remora_run(&["--local-mem", "250%", "--", "true"], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--local-mem"),
        "{o:?}"
    );
    let o = remora_run(
        &["--controller", "127.0.0.1:1", "--token", "x", "--", "true"],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach the controller"),
        "{o:?}"
    );
    let o = remora_run(&["--bogus-flag", "--", "true"], &[]);
    assert!(!o.status.success());
    let o = remora_run(&[], &[]);
    assert!(!o.status.success());
    // The program's exit code comes back.
    let o = remora_run(&["--", "sh"], &["-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));
}

#[test]
fn sigterm_reaches_the_program_and_remora_cleans_up() {
    let mut child = Command::new(exe())
        .args(["run", "--", "sleep", "30"])
        .spawn()
        .expect("remora run");
    // Let the cluster start and the program begin.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let t = std::time::Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let st = child.wait().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "remora run did not end promptly"
    );
    assert_eq!(st.code(), Some(128 + 15), "{st:?}");
}
