//! Streaming: sequential read/modify/write passes over a large array of
//! 64-bit words (the best case for prefetching).
//!
//! The array starts as `mix(seed ^ i)`; each pass sets
//! `a[i] = a[i] * K + (i ^ pass)`, and the last pass also sums the words.
//! The check recomputes that sum from the formula, without the array, so a
//! word damaged anywhere in memory changes it.

use anyhow::Result;

use super::{check, far_update, far_vec, mix, scaled, Kind, Mem, Outcome};

/// Multiplier of each pass.
const K: u64 = 0x2545_f491_4f6c_dd1d;
/// Passes over the array.
pub const PASSES: u64 = 2;
/// Bytes per region read or write.
const REGION_IO: usize = 1 << 20;

/// Words in the array: 32M (256 MiB) at scale 1.
pub fn words(scale: f64) -> u64 {
    scaled(32 << 20, scale, 1 << 16)
}

/// Bytes of the array.
pub fn footprint(scale: f64) -> u64 {
    words(scale) * 8
}

fn init(seed: u64, i: u64) -> u64 {
    mix(seed ^ i)
}

fn step(x: u64, i: u64, pass: u64) -> u64 {
    x.wrapping_mul(K).wrapping_add(i ^ pass)
}

/// The sum the last pass must find.
fn expected_sum(n: u64, seed: u64) -> u64 {
    let mut sum = 0u64;
    for i in 0..n {
        let mut x = init(seed, i);
        for pass in 0..PASSES {
            x = step(x, i, pass);
        }
        sum = sum.wrapping_add(x);
    }
    sum
}

/// Runs the workload in `mem`. `corrupt` damages one word after loading.
pub fn run(mem: &Mem, scale: f64, seed: u64, corrupt: bool) -> Result<Outcome> {
    let n = words(scale);
    let mut sum = 0u64;
    let (secs, bytes) = match &mem.kind {
        Kind::Plain => {
            let mut a: Vec<u64> = (0..n).map(|i| init(seed, i)).collect();
            if corrupt {
                a[n as usize / 2] ^= 1 << 7;
            }
            let m = mem.meter()?;
            for pass in 0..PASSES {
                let last = pass + 1 == PASSES;
                for (i, x) in a.iter_mut().enumerate() {
                    *x = step(*x, i as u64, pass);
                    if last {
                        sum = sum.wrapping_add(*x);
                    }
                }
            }
            let r = m.stop()?;
            std::hint::black_box(&a);
            r
        }
        Kind::Objects { cache, .. } => {
            let mut a = far_vec(cache, n as usize, |i| init(seed, i as u64))?;
            if corrupt {
                let i = n as usize / 2;
                a.set(i, a.read(i)? ^ (1 << 7))?;
            }
            let m = mem.meter()?;
            for pass in 0..PASSES {
                let last = pass + 1 == PASSES;
                far_update(&mut a, 0..n as usize, 16, |i, x| {
                    *x = step(*x, i as u64, pass);
                    if last {
                        sum = sum.wrapping_add(*x);
                    }
                })?;
            }
            m.stop()?
        }
        Kind::Regions(cluster) => {
            let region = cluster.alloc_region(n * 8)?;
            let mut buf = vec![0u64; REGION_IO / 8];
            let mut i = 0u64;
            while i < n {
                let k = (n - i).min(buf.len() as u64) as usize;
                for (j, w) in buf[..k].iter_mut().enumerate() {
                    *w = init(seed, i + j as u64);
                }
                if corrupt && (i..i + k as u64).contains(&(n / 2)) {
                    buf[(n / 2 - i) as usize] ^= 1 << 7;
                }
                region.write(i * 8, bytemuck::cast_slice(&buf[..k]))?;
                i += k as u64;
            }
            let t = std::time::Instant::now();
            for pass in 0..PASSES {
                let last = pass + 1 == PASSES;
                let mut i = 0u64;
                while i < n {
                    let k = (n - i).min(buf.len() as u64) as usize;
                    region.read(i * 8, bytemuck::cast_slice_mut(&mut buf[..k]))?;
                    for (j, x) in buf[..k].iter_mut().enumerate() {
                        *x = step(*x, i + j as u64, pass);
                        if last {
                            sum = sum.wrapping_add(*x);
                        }
                    }
                    region.write(i * 8, bytemuck::cast_slice(&buf[..k]))?;
                    i += k as u64;
                }
            }
            (t.elapsed().as_secs_f64(), Some(2 * PASSES * n * 8))
        }
    };
    let want = expected_sum(n, seed);
    check(sum == want, || {
        format!("stream sum {sum:#x}, expected {want:#x} (a word was damaged)")
    })?;
    Ok(Outcome {
        secs,
        ops: n * PASSES,
        digest: sum,
        lat_us: Vec::new(),
        bytes_moved: bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        let ok = run(&Mem::plain(), 0.001, 5, false).unwrap();
        assert_eq!(ok.ops, words(0.001) * PASSES);
        let e = run(&Mem::plain(), 0.001, 5, true).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }
}
