//! The results file: one [`RunRecord`] per run, as JSON and as CSV.
//!
//! `results.json` is the file of record: [`load`] reads it back and the
//! report ([`super::report`]) is made from it. `results.csv` holds the same
//! rows for spreadsheets and scripts.

use std::fs;
use std::path::Path;

use anyhow::Context;

use super::RunRecord;

/// File name of the JSON results in a results directory.
pub const JSON_FILE: &str = "results.json";

/// File name of the CSV results in a results directory.
pub const CSV_FILE: &str = "results.csv";

/// Writes `dir/results.json` (a pretty-printed JSON array of `records`)
/// and `dir/results.csv` (a header row naming every field of
/// [`RunRecord`], then one row per record, an empty cell for `None`).
/// Creates `dir` if it does not exist.
pub fn write(records: &[RunRecord], dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let json_path = dir.join(JSON_FILE);
    let mut json = serde_json::to_string_pretty(records).context("encoding results as JSON")?;
    json.push('\n');
    fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;

    // The `csv` crate writes the header from the struct's field names, in
    // declaration order, through `RunRecord`'s own `Serialize`, so a field
    // added to the record shows up in the CSV without touching this code;
    // it also quotes cells (a status can hold commas and quotes) per RFC
    // 4180 and writes `None` as an empty cell.
    let csv_path = dir.join(CSV_FILE);
    let mut w = csv::Writer::from_path(&csv_path)
        .with_context(|| format!("creating {}", csv_path.display()))?;
    for r in records {
        w.serialize(r)
            .with_context(|| format!("writing {}", csv_path.display()))?;
    }
    if records.is_empty() {
        // With no row to serialize the crate writes no header either; write
        // it by hand so that an empty sweep still gives a well-formed file.
        w.write_record(CSV_HEADER)
            .with_context(|| format!("writing {}", csv_path.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", csv_path.display()))?;
    Ok(())
}

/// Column names of `results.csv`: the fields of [`RunRecord`] in order.
/// Only written by hand when there are no records (the `csv` crate derives
/// the header from the first record otherwise); a test checks the two agree.
pub const CSV_HEADER: [&str; 17] = [
    "workload",
    "interface",
    "ratio",
    "repeat",
    "scale",
    "footprint",
    "ops",
    "secs",
    "slowdown",
    "bytes_moved",
    "lat_p50_us",
    "lat_p99_us",
    "lat_p999_us",
    "injected_latency_us",
    "seed",
    "digest",
    "status",
];

/// Reads a `results.json` written by [`write()`]. The error names the file,
/// and for malformed input the line and column where decoding failed.
pub fn load(path: &Path) -> anyhow::Result<Vec<RunRecord>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading results file {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a results file (a JSON array of run records): {e}",
            path.display()
        )
    })
}

/// Median of `xs`, ignoring NaNs; `None` if nothing else is left. Sorts
/// `xs` in place (NaNs last). With an even count it is the mean of the two
/// middle values.
pub fn median(xs: &mut [f64]) -> Option<f64> {
    xs.sort_by(|a, b| a.is_nan().cmp(&b.is_nan()).then(a.total_cmp(b)));
    let n = xs.iter().take_while(|x| !x.is_nan()).count();
    match n {
        0 => None,
        n if n % 2 == 1 => Some(xs[n / 2]),
        n => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}
