//! Dataframe analytics over three columns of 64-bit values (group, price,
//! quantity), one timed phase of three queries:
//!
//! 1. scan: `SUM(price)`;
//! 2. filter: `COUNT(*), SUM(price) WHERE qty < 10`;
//! 3. group-by: `SUM(price), SUM(price * qty), COUNT(*) GROUP BY group`.
//!
//! Rows are a function of the seed and the row number, so the check
//! recomputes every answer from the generator alone.

use anyhow::Result;
use remora_objects::{Cmp, FarVec};

use super::{check, far_vec, fold, mix, scaled, Kind, Mem, Outcome};

/// Groups of the group-by.
pub const GROUPS: usize = 1024;
/// The filter's bound on quantity.
pub const QTY_BELOW: u64 = 10;

/// Rows: 16M at scale 1 (384 MiB in three columns).
pub fn rows(scale: f64) -> u64 {
    scaled(16 << 20, scale, 1 << 14)
}

/// Bytes of the three columns.
pub fn footprint(scale: f64) -> u64 {
    rows(scale) * 24
}

/// Row `i`: (group, price, qty).
fn row(seed: u64, i: u64) -> (u64, u64, u64) {
    let r = mix(seed ^ i.wrapping_mul(0x2f1d));
    (
        r % GROUPS as u64,
        (r >> 10) % 10_000 + 1,
        (r >> 30) % 100 + 1,
    )
}

/// The answers of the three queries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answers {
    sum: u64,
    filtered: u64,
    filtered_sum: u64,
    groups: Vec<[u64; 3]>,
}

impl Answers {
    fn new() -> Answers {
        Answers {
            sum: 0,
            filtered: 0,
            filtered_sum: 0,
            groups: vec![[0; 3]; GROUPS],
        }
    }

    fn group(&mut self, g: u64, p: u64, q: u64) {
        let e = &mut self.groups[g as usize % GROUPS];
        e[0] = e[0].wrapping_add(p);
        e[1] = e[1].wrapping_add(p.wrapping_mul(q));
        e[2] += 1;
    }

    fn digest(&self) -> u64 {
        let mut d = fold(fold(fold(0, self.sum), self.filtered), self.filtered_sum);
        for g in &self.groups {
            d = fold(fold(fold(d, g[0]), g[1]), g[2]);
        }
        d
    }
}

fn expected(n: u64, seed: u64) -> Answers {
    let mut a = Answers::new();
    for i in 0..n {
        let (g, p, q) = row(seed, i);
        a.sum = a.sum.wrapping_add(p);
        if q < QTY_BELOW {
            a.filtered += 1;
            a.filtered_sum = a.filtered_sum.wrapping_add(p);
        }
        a.group(g, p, q);
    }
    a
}

/// Runs the workload in `mem`. `corrupt` damages one price.
pub fn run(mem: &Mem, scale: f64, seed: u64, corrupt: bool) -> Result<Outcome> {
    let n = rows(scale);
    let bad = n / 3;
    let price = |i: u64| row(seed, i).1 ^ if corrupt && i == bad { 1 << 20 } else { 0 };
    let mut a = Answers::new();
    let (secs, bytes) = match &mem.kind {
        Kind::Plain => {
            let group: Vec<u64> = (0..n).map(|i| row(seed, i).0).collect();
            let prices: Vec<u64> = (0..n).map(price).collect();
            let qty: Vec<u64> = (0..n).map(|i| row(seed, i).2).collect();
            let m = mem.meter()?;
            a.sum = prices.iter().fold(0u64, |s, &p| s.wrapping_add(p));
            for (&p, &q) in prices.iter().zip(&qty) {
                if q < QTY_BELOW {
                    a.filtered += 1;
                    a.filtered_sum = a.filtered_sum.wrapping_add(p);
                }
            }
            for ((&g, &p), &q) in group.iter().zip(&prices).zip(&qty) {
                a.group(g, p, q);
            }
            m.stop()?
        }
        Kind::Objects { cache, offload, .. } => {
            let group = far_vec(cache, n as usize, |i| row(seed, i as u64).0)?;
            let prices = far_vec(cache, n as usize, |i| price(i as u64))?;
            let qty = far_vec(cache, n as usize, |i| row(seed, i as u64).2)?;
            let m = mem.meter()?;
            if *offload {
                a.sum = prices.aggregate_offloaded(0..n as usize)?.sum_u64();
                let hits = qty.filter_offloaded(0..n as usize, Cmp::Lt, QTY_BELOW)?;
                a.filtered = hits.len() as u64;
                a.filtered_sum = gather_sum(&prices, &hits)?;
            } else {
                for p in prices.iter() {
                    a.sum = a.sum.wrapping_add(p?);
                }
                for (p, q) in prices.iter().zip(qty.iter()) {
                    let (p, q) = (p?, q?);
                    if q < QTY_BELOW {
                        a.filtered += 1;
                        a.filtered_sum = a.filtered_sum.wrapping_add(p);
                    }
                }
            }
            for ((g, p), q) in group.iter().zip(prices.iter()).zip(qty.iter()) {
                a.group(g?, p?, q?);
            }
            m.stop()?
        }
        Kind::Regions(_) => anyhow::bail!("dataframe does not run on regions"),
    };
    let want = expected(n, seed);
    check(a == want, || {
        format!(
            "dataframe answers differ from the generator's (sum {:#x} vs {:#x}, filtered {} vs {})",
            a.sum, want.sum, a.filtered, want.filtered
        )
    })?;
    Ok(Outcome {
        secs,
        ops: n * 3,
        digest: a.digest(),
        lat_us: Vec::new(),
        bytes_moved: bytes,
    })
}

/// Sum of the prices at the filter's hits, fetched in batches.
fn gather_sum(prices: &FarVec<u64>, hits: &[usize]) -> Result<u64> {
    let mut s = 0u64;
    for batch in hits.chunks(1 << 16) {
        for p in prices.gather(batch)? {
            s = s.wrapping_add(p);
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        let ok = run(&Mem::plain(), 0.002, 3, false).unwrap();
        assert_eq!(ok.ops, rows(0.002) * 3);
        let e = run(&Mem::plain(), 0.002, 3, true).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }
}
