//! Dense blocked matrix multiply, `C = A × B` over `n × n` matrices of
//! f64 (the compute-bound end of the suite: 2n³ flops over 3n² words).
//!
//! Entries of A and B are small integers, so every product is exact and
//! every interface computes the same bits. The check is Freivalds': for a
//! random vector r, `A(Br) = Cr` exactly.

use anyhow::Result;
use remora_objects::{FarVec, Scope};

use super::{check, far_vec, fold, mix, Kind, Mem, Outcome, Rng};

/// Tile edge.
pub const BLOCK: usize = 64;

/// Matrix order: 1024 at scale 1 (24 MiB in three matrices), following
/// the footprint's scale, a multiple of the tile edge.
pub fn order(scale: f64) -> usize {
    let n = (1024.0 * scale.sqrt()) as usize;
    (n / BLOCK).max(2) * BLOCK
}

/// Bytes of A, B and C.
pub fn footprint(scale: f64) -> u64 {
    let n = order(scale) as u64;
    3 * n * n * 8
}

fn entry(seed: u64, which: u64, i: usize) -> f64 {
    (mix(seed ^ which << 60 ^ i as u64) % 8) as f64
}

/// Runs the workload in `mem`. `corrupt` damages one entry of C.
pub fn run(mem: &Mem, scale: f64, seed: u64, corrupt: bool) -> Result<Outcome> {
    let n = order(scale);
    let a = |i: usize| entry(seed, 1, i);
    let b = |i: usize| entry(seed, 2, i);
    let (secs, bytes, mut c) = match &mem.kind {
        Kind::Plain => {
            let av: Vec<f64> = (0..n * n).map(a).collect();
            let bv: Vec<f64> = (0..n * n).map(b).collect();
            let mut cv = vec![0.0f64; n * n];
            let m = mem.meter()?;
            for ii in (0..n).step_by(BLOCK) {
                for kk in (0..n).step_by(BLOCK) {
                    for jj in (0..n).step_by(BLOCK) {
                        for i in ii..ii + BLOCK {
                            let crow = &mut cv[i * n + jj..i * n + jj + BLOCK];
                            for k in kk..kk + BLOCK {
                                let x = av[i * n + k];
                                let brow = &bv[k * n + jj..k * n + jj + BLOCK];
                                for (cj, bj) in crow.iter_mut().zip(brow) {
                                    *cj += x * bj;
                                }
                            }
                        }
                    }
                }
            }
            let (s, by) = m.stop()?;
            (s, by, cv)
        }
        Kind::Objects { cache, .. } => {
            let av = far_vec(cache, n * n, a)?;
            let bv = far_vec(cache, n * n, b)?;
            let mut cv = far_vec(cache, n * n, |_| 0.0f64)?;
            let m = mem.meter()?;
            let mut at = vec![0.0f64; BLOCK * BLOCK];
            let mut bt = vec![0.0f64; BLOCK * BLOCK];
            let mut ct = vec![0.0f64; BLOCK * BLOCK];
            for ii in (0..n).step_by(BLOCK) {
                for jj in (0..n).step_by(BLOCK) {
                    ct.iter_mut().for_each(|x| *x = 0.0);
                    for kk in (0..n).step_by(BLOCK) {
                        load_tile(&av, n, ii, kk, &mut at)?;
                        load_tile(&bv, n, kk, jj, &mut bt)?;
                        for i in 0..BLOCK {
                            let crow = &mut ct[i * BLOCK..(i + 1) * BLOCK];
                            for k in 0..BLOCK {
                                let x = at[i * BLOCK + k];
                                let brow = &bt[k * BLOCK..(k + 1) * BLOCK];
                                for (cj, bj) in crow.iter_mut().zip(brow) {
                                    *cj += x * bj;
                                }
                            }
                        }
                    }
                    for i in 0..BLOCK {
                        let row = (ii + i) * n + jj;
                        let mut s = Scope::new();
                        for j in 0..BLOCK {
                            *cv.get_mut(row + j, &mut s)? = ct[i * BLOCK + j];
                        }
                    }
                }
            }
            let (s, by) = m.stop()?;
            (s, by, cv.iter().collect::<Result<Vec<_>, _>>()?)
        }
        Kind::Regions(_) => anyhow::bail!("matmul does not run on regions"),
    };
    if corrupt {
        c[n / 2 * n + n / 3] += 1.0;
    }
    // Freivalds: r with entries 1..=16 (a single wrong entry always shows).
    let mut rng = Rng::new(seed, 0xf4e1);
    let r: Vec<f64> = (0..n).map(|_| (rng.below(16) + 1) as f64).collect();
    let mat_vec = |m: &dyn Fn(usize) -> f64, v: &[f64]| -> Vec<f64> {
        (0..n)
            .map(|i| (0..n).map(|j| m(i * n + j) * v[j]).sum())
            .collect()
    };
    let br = mat_vec(&b, &r);
    let abr = mat_vec(&a, &br);
    let cr = mat_vec(&|i| c[i], &r);
    check(abr == cr, || {
        let row = (0..n).find(|&i| abr[i] != cr[i]).unwrap_or(0);
        format!("C differs from A×B in row {row}")
    })?;
    Ok(Outcome {
        secs,
        ops: 2 * (n as u64).pow(3),
        digest: cr.iter().fold(0, |d, x| fold(d, x.to_bits())),
        lat_us: Vec::new(),
        bytes_moved: bytes,
    })
}

/// Copies the tile at (`r0`, `c0`) of the `n × n` far matrix `m` into `t`.
fn load_tile(m: &FarVec<f64>, n: usize, r0: usize, c0: usize, t: &mut [f64]) -> Result<()> {
    for i in 0..BLOCK {
        let row = (r0 + i) * n + c0;
        m.prefetch(row..row + BLOCK);
    }
    for i in 0..BLOCK {
        let row = (r0 + i) * n + c0;
        let s = Scope::new();
        for j in 0..BLOCK {
            t[i * BLOCK + j] = *m.get(row + j, &s)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        let a = run(&Mem::plain(), 0.01, 6, false).unwrap();
        let b = run(&Mem::plain(), 0.01, 6, false).unwrap();
        assert_eq!(a.digest, b.digest);
        let e = run(&Mem::plain(), 0.01, 6, true).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }
}
