//! The results file and the report, on a small hand-made sweep
//! (`tests/data/results-small.json`): two workloads, two local-memory
//! ratios, two repeats, peers, and one failed run.
//!
//! The fixture's sort/paging point at 25% local memory has slowdowns 3.0
//! and 3.4 over its two repeats (3.30 s and 3.74 s against a median local
//! time of 1.10 s), so the summary shows their median, 3.2×.

use std::path::{Path, PathBuf};

use remora_bench::suite::report::{self, ReportMeta};
use remora_bench::suite::results;
use remora_bench::suite::RunRecord;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/results-small.json")
}

fn fixture() -> Vec<RunRecord> {
    results::load(&fixture_path()).expect("fixture loads")
}

fn meta() -> ReportMeta {
    ReportMeta {
        command: "remora bench --workloads kv-zipf0.99,sort --ratios 50,25 --repeats 2 <test>"
            .to_string(),
        machine: report::machine_description(),
        started: "2025-01-01 00:00:00 UTC".to_string(),
        duration_secs: 754.2,
        notes: vec!["zram at 25%: one repeat failed & was kept out".to_string()],
    }
}

#[test]
fn load_reads_the_fixture() {
    let records = fixture();
    assert_eq!(records.len(), 28);
    assert_eq!(records.iter().filter(|r| !r.ok()).count(), 1);
    let r = &records[0];
    assert_eq!(
        (r.workload.as_str(), r.interface.as_str(), r.ratio),
        ("kv-zipf0.99", "local", 100)
    );
    assert_eq!(r.bytes_moved, None);
    assert_eq!(r.lat_p99_us, Some(1.2));
}

#[test]
fn load_rejects_malformed_input_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("garbage.json", "this is not json"),
        ("truncated.json", "[{\"workload\": \"sort\""),
        ("wrong-shape.json", "{\"workload\": \"sort\"}"),
        (
            "missing-field.json",
            "[{\"workload\": \"sort\", \"interface\": \"local\"}]",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", results::load(&path).unwrap_err());
        assert!(
            err.contains(name),
            "{name}: error does not name the file: {err}"
        );
        assert!(err.contains("not a results file"), "{name}: {err}");
    }
    let missing = dir.path().join("absent.json");
    let err = format!("{:#}", results::load(&missing).unwrap_err());
    assert!(err.contains("absent.json"), "{err}");
}

#[test]
fn write_then_load_round_trips_and_csv_has_a_row_per_record() {
    let records = fixture();
    let dir = tempfile::tempdir().unwrap();
    results::write(&records, dir.path()).unwrap();
    let back = results::load(&dir.path().join(results::JSON_FILE)).unwrap();
    assert_eq!(back, records);

    let mut csv = csv::Reader::from_path(dir.path().join(results::CSV_FILE)).unwrap();
    let header: Vec<String> = csv.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, results::CSV_HEADER);
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), records.len());
    for (row, r) in rows.iter().zip(&records) {
        assert_eq!(row.len(), header.len());
        assert_eq!(&row[0], r.workload);
        assert_eq!(&row[1], r.interface);
        assert_eq!(row[7].parse::<f64>().unwrap(), r.secs);
        assert_eq!(&row[16], r.status);
    }
    // None is an empty cell; a status with commas and quotes survives.
    assert_eq!(&rows[0][9], "");
    let failed = rows.iter().find(|r| &r[16] != "ok").unwrap();
    assert!(failed[16].contains("\"memory.limit\""));

    // An empty sweep still has the header.
    let empty = tempfile::tempdir().unwrap();
    results::write(&[], empty.path()).unwrap();
    let text = std::fs::read_to_string(empty.path().join(results::CSV_FILE)).unwrap();
    assert_eq!(text.trim_end(), results::CSV_HEADER.join(","));
    assert!(results::load(&empty.path().join(results::JSON_FILE))
        .unwrap()
        .is_empty());
}

#[test]
fn median_of_odd_even_empty_and_nan() {
    assert_eq!(results::median(&mut []), None);
    assert_eq!(results::median(&mut [f64::NAN]), None);
    assert_eq!(results::median(&mut [3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(results::median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(results::median(&mut [f64::NAN, 5.0, 1.0]), Some(3.0));
}

/// The text of the summary table row of `interface` within `workload`'s
/// rows.
fn summary_row<'a>(html: &'a str, workload: &str, interface: &str) -> &'a str {
    let table = &html[html.find("<table class=\"summary\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    let from = table
        .find(&format!("\">{workload}</td>"))
        .unwrap_or_else(|| panic!("no summary rows for {workload}"));
    let rows = &table[from..];
    let start = rows
        .find(&format!("<td>{interface}</td>"))
        .unwrap_or_else(|| panic!("no summary row for {workload}/{interface}"));
    let row = &rows[start..];
    &row[..row.find("</tr>").unwrap()]
}

#[test]
fn render_writes_plots_and_summary_with_medians() {
    let records = fixture();
    let dir = tempfile::tempdir().unwrap();
    let html_path = report::render(&records, &meta(), dir.path()).unwrap();
    assert_eq!(html_path, dir.path().join("index.html"));
    let html = std::fs::read_to_string(&html_path).unwrap();

    // Every plot is a file and is inlined in the page.
    let expected = [
        "kv-zipf0.99-slowdown.svg",
        "kv-zipf0.99-latency.svg",
        "kv-zipf0.99-bytes.svg",
        "sort-slowdown.svg",
        "sort-bytes.svg",
    ];
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        files, want,
        "sort has no latency figures, so no latency plot"
    );
    for f in expected {
        let svg = std::fs::read_to_string(dir.path().join("plots").join(f)).unwrap();
        let body = &svg[svg.find("<svg").unwrap()..];
        assert!(html.contains(body.trim_end()), "{f} is not inlined");
        assert!(
            html.contains(&format!("href=\"plots/{f}\"")),
            "no link to {f}"
        );
        // Labels are SVG text, readable without fonts at render time.
        assert!(svg.contains("<text"), "{f} has no text");
        assert!(
            svg.contains("local memory, % of footprint"),
            "{f}: no x label"
        );
    }
    assert_eq!(html.matches("<svg").count(), expected.len());
    let slowdown =
        std::fs::read_to_string(dir.path().join("plots/kv-zipf0.99-slowdown.svg")).unwrap();
    for label in [
        "paging",
        "objects",
        "regions (no local cache)",
        "redis (server holds all data)",
        "local (all in memory)",
    ] {
        assert!(slowdown.contains(label), "legend lacks {label}");
    }

    // Summary: columns by ratio, most local memory first; the hand-computed
    // cell (see the top of this file); the local time of sort (median of
    // 1.0 s and 1.2 s).
    assert!(html.contains("<th>50% local</th><th>25% local</th>"));
    assert_eq!(
        summary_row(&html, "sort", "paging"),
        "<td>paging</td><td class=\"num\">2.1×</td><td class=\"num\">3.2×</td>"
    );
    // zram at 25% has one ok repeat of two: 8.8 s / 1.1 s.
    assert_eq!(
        summary_row(&html, "sort", "zram"),
        "<td>zram</td><td class=\"num\">4.1×</td><td class=\"num\">8×</td>"
    );
    assert!(html.contains("<td rowspan=\"3\" class=\"num\">1.10 s</td>"));
    // regions do not depend on local memory: (2.6 / 0.52 + 2.8 / 0.52) / 2.
    assert!(summary_row(&html, "kv-zipf0.99", "regions").contains("5.19×"));

    // Peers table: redis for the key-value store, zram for sort.
    let peers = &html[html.find("<table class=\"peers\"").unwrap()..];
    let peers = &peers[..peers.find("</table>").unwrap()];
    assert!(peers.contains("<td>redis</td>"));
    assert!(peers.contains("<td>zram</td>"));

    // The failed run is listed, escaped, and only there.
    let failed = &html[html.find("<table class=\"failed\"").unwrap()..];
    assert!(failed.contains("&lt;oom&gt; &amp; &quot;memory.limit&quot;"));
    assert!(!html.contains("<oom>"));

    // Meta and notes, escaped.
    assert!(html.contains("--repeats 2 &lt;test&gt;"));
    assert!(html.contains("one repeat failed &amp; was kept out"));
    assert!(html.contains("12 min 34 s"));

    // Self-contained: nothing is fetched.
    for needle in ["<script", "<link", "<img", "src=", "@import", "url("] {
        assert!(!html.contains(needle), "page has {needle}");
    }
    let without_svg_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(!without_svg_ns.contains("http://") && !without_svg_ns.contains("https://"));
}

#[test]
fn render_with_no_successful_run_still_writes_a_page() {
    let mut records = fixture();
    for r in &mut records {
        r.status = "skipped: test".to_string();
    }
    let dir = tempfile::tempdir().unwrap();
    let html =
        std::fs::read_to_string(report::render(&records, &meta(), dir.path()).unwrap()).unwrap();
    assert!(!html.contains("<svg"));
    assert_eq!(html.matches("skipped: test").count(), records.len());
}

#[test]
fn machine_description_names_cpus_memory_and_kernel() {
    let m = report::machine_description();
    assert!(m.contains("CPU"), "{m}");
    assert!(m.contains("memory"), "{m}");
    assert!(m.contains("Linux") || m.contains("unknown kernel"), "{m}");
}

/// Opens the report in headless Chromium and counts pixels of the plot
/// colours in the screenshot, against the same page with no plots.
/// Skipped (with a message) when Chromium is not installed, unless
/// `REMORA_REQUIRE_CHROMIUM=1`. Set `REMORA_KEEP_SCREENSHOT=<file.png>` to
/// keep the screenshot of the report.
#[test]
fn report_in_a_browser_shows_the_plots() {
    if report::find_chromium().is_none() {
        if std::env::var("REMORA_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("chromium not installed and REMORA_REQUIRE_CHROMIUM=1");
        }
        println!("skipped: chromium not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let records = fixture();
    let html = report::render(&records, &meta(), &dir.path().join("report")).unwrap();
    let png = dir.path().join("report.png");
    report::screenshot(&html, &png).unwrap();
    let with_plots = report::plot_pixel_count(&png).unwrap();
    if let Ok(keep) = std::env::var("REMORA_KEEP_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }

    let mut failed = records;
    for r in &mut failed {
        r.status = "skipped: test".to_string();
    }
    let bare = report::render(&failed, &meta(), &dir.path().join("bare")).unwrap();
    let bare_png = dir.path().join("bare.png");
    report::screenshot(&bare, &bare_png).unwrap();
    let without_plots = report::plot_pixel_count(&bare_png).unwrap();

    println!("plot pixels: {with_plots} with plots, {without_plots} without");
    assert!(with_plots > 2000, "only {with_plots} plot pixels");
    assert!(
        without_plots < 100,
        "{without_plots} plot pixels without plots"
    );
}
