//! The workloads. Each has a footprint that follows a scale factor, a fixed
//! seed, a timed phase, and a check of its result: a run that computes a
//! wrong answer returns an error, never a figure.
//!
//! Every workload is written once over plain memory (`Vec`s: all-local,
//! the paging interface, and the zram peer run this code) and once over
//! far objects; regions and offloaded variants exist where they are the
//! natural way to write the workload.

pub mod chase;
pub mod dataframe;
pub mod graph;
pub mod kv;
pub mod matmul;
pub mod sort;
pub mod stream;

use std::time::Instant;

use anyhow::{bail, Result};

/// What a workload measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Seconds of the timed phase.
    pub secs: f64,
    /// Operations in the timed phase.
    pub ops: u64,
    /// Digest of the result, equal across interfaces.
    pub digest: u64,
    /// Sampled per-operation latencies in microseconds, if the workload
    /// times operations.
    pub lat_us: Vec<f64>,
    /// Bytes the timed phase moved, where the workload counts them itself
    /// (regions); otherwise the worker measures them.
    pub bytes_moved: Option<u64>,
}

/// Sizes of a workload at a scale factor: `base * scale`, at least `min`.
pub fn scaled(base: u64, scale: f64, min: u64) -> u64 {
    ((base as f64 * scale) as u64).max(min)
}

/// SplitMix64: a fast, fixed, portable mixer for generating data from a
/// seed and an index (the same bytes on every machine and every run).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A sequential generator over [`mix`].
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and `stream` (independent streams per purpose).
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng(mix(seed ^ mix(stream)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Folds `v` into a running digest (order-sensitive).
pub fn fold(d: u64, v: u64) -> u64 {
    mix(d ^ v).wrapping_add(v)
}

/// Times the closure.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let r = f()?;
    Ok((r, t.elapsed().as_secs_f64()))
}

/// Fails with a message naming the workload when `ok` is false.
pub fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if !ok {
        bail!("result check failed: {}", what());
    }
    Ok(())
}
