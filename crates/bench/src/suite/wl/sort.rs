//! Sorting random 64-bit keys.
//!
//! In plain memory: `sort_unstable` in place. Over far objects: an
//! external merge sort, the way one sorts data larger than local memory:
//! runs of half the local memory are read, sorted locally and written
//! back, then merged into the output. The cache keeps the other half of
//! local memory, so the run buffer and the cache together stay within the
//! run's local memory.
//!
//! The check: the output is in order and holds the input's keys (their
//! count, sum and sum of hashes, taken as the keys were made).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use anyhow::Result;
use remora_objects::FarVec;

use super::{check, far_vec, fold, mix, scaled, Kind, Mem, Outcome};

/// Keys: 16M (128 MiB) at scale 1.
pub fn keys(scale: f64) -> u64 {
    scaled(16 << 20, scale, 1 << 14)
}

/// Bytes of the keys.
pub fn footprint(scale: f64) -> u64 {
    keys(scale) * 8
}

fn key(seed: u64, i: u64) -> u64 {
    mix(seed ^ i.wrapping_mul(0x51_7cc1))
}

/// (count, sum, sum of hashes) of a multiset of keys.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Fingerprint(u64, u64, u64);

impl Fingerprint {
    fn add(&mut self, k: u64) {
        self.0 += 1;
        self.1 = self.1.wrapping_add(k);
        self.2 = self.2.wrapping_add(mix(k));
    }
}

/// Checks order and contents as keys stream by; the digest samples them.
struct Checker {
    prev: u64,
    sorted: bool,
    fp: Fingerprint,
    digest: u64,
}

impl Checker {
    fn new() -> Checker {
        Checker {
            prev: 0,
            sorted: true,
            fp: Fingerprint::default(),
            digest: 0,
        }
    }

    fn see(&mut self, k: u64) {
        self.sorted &= k >= self.prev;
        self.prev = k;
        if self.fp.0.is_multiple_of(4096) {
            self.digest = fold(self.digest, k);
        }
        self.fp.add(k);
    }

    fn finish(self, want: Fingerprint) -> Result<u64> {
        check(self.sorted, || "the output is out of order".into())?;
        check(self.fp == want, || {
            format!(
                "the output holds other keys than the input ({:?} vs {want:?})",
                self.fp
            )
        })?;
        Ok(self.digest)
    }
}

/// Runs the workload in `mem`. `corrupt` damages one output key.
pub fn run(mem: &Mem, scale: f64, seed: u64, corrupt: bool) -> Result<Outcome> {
    let n = keys(scale);
    let mut want = Fingerprint::default();
    let mut ck = Checker::new();
    let (secs, bytes) = match &mem.kind {
        Kind::Plain => {
            let mut v: Vec<u64> = (0..n)
                .map(|i| {
                    let k = key(seed, i);
                    want.add(k);
                    k
                })
                .collect();
            let m = mem.meter()?;
            v.sort_unstable();
            let r = m.stop()?;
            if corrupt {
                v[n as usize / 2] ^= 1;
            }
            v.iter().for_each(|&k| ck.see(k));
            r
        }
        Kind::Objects { cache, .. } => {
            let input = far_vec(cache, n as usize, |i| {
                let k = key(seed, i as u64);
                want.add(k);
                k
            })?;
            let local = mem.budget.unwrap_or(n * 8 * 2);
            let m = mem.meter_at(mem.budget.map(|b| (b / 2).max(1 << 20)))?;
            let run_len = ((local / 2 / 8) as usize).max(1 << 16);
            let out = external_sort(cache, input, run_len)?;
            let r = m.stop()?;
            let mut bad = corrupt;
            for k in out.iter() {
                let k = k?;
                ck.see(if bad && ck.fp.0 == n / 2 {
                    bad = false;
                    k ^ 1
                } else {
                    k
                });
            }
            r
        }
        Kind::Regions(_) => anyhow::bail!("sort does not run on regions"),
    };
    let digest = ck.finish(want)?;
    Ok(Outcome {
        secs,
        ops: n,
        digest,
        lat_us: Vec::new(),
        bytes_moved: bytes,
    })
}

/// Sorts `input` by runs of `run_len` keys and a k-way merge.
fn external_sort(
    cache: &remora_objects::ObjectCache,
    input: FarVec<u64>,
    run_len: usize,
) -> Result<FarVec<u64>> {
    let n = input.len();
    let mut runs: FarVec<u64> = FarVec::new(cache)?;
    let mut buf = Vec::with_capacity(run_len.min(n));
    let mut bounds = Vec::new();
    let mut i = 0;
    while i < n {
        let end = (i + run_len).min(n);
        buf.clear();
        for k in input.iter_range(i..end)? {
            buf.push(k?);
        }
        buf.sort_unstable();
        runs.extend_from_slice(&buf)?;
        bounds.push((i, end));
        i = end;
    }
    drop(buf);
    drop(input);
    if bounds.len() == 1 {
        return Ok(runs);
    }
    let mut iters = bounds
        .iter()
        .map(|&(s, e)| runs.iter_range(s..e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut heap = BinaryHeap::with_capacity(iters.len());
    for (r, it) in iters.iter_mut().enumerate() {
        if let Some(k) = it.next() {
            heap.push(Reverse((k?, r)));
        }
    }
    let mut out: FarVec<u64> = FarVec::new(cache)?;
    let mut pending = Vec::with_capacity(out.chunk_elems());
    while let Some(Reverse((k, r))) = heap.pop() {
        pending.push(k);
        if pending.len() == pending.capacity() {
            out.extend_from_slice(&pending)?;
            pending.clear();
        }
        if let Some(k) = iters[r].next() {
            heap.push(Reverse((k?, r)));
        }
    }
    out.extend_from_slice(&pending)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        let a = run(&Mem::plain(), 0.002, 4, false).unwrap();
        let b = run(&Mem::plain(), 0.002, 4, false).unwrap();
        assert_eq!(a.digest, b.digest);
        let e = run(&Mem::plain(), 0.002, 4, true).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }
}
