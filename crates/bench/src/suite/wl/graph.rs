//! Graph analytics over a power-law graph made by R-MAT (a = 0.57,
//! b = c = 0.19), stored as an undirected graph in compressed sparse rows:
//!
//! * BFS from vertex 0 (R-MAT's hub). The check is the Graph500 one: the
//!   source at depth 0, every arc's ends at most one level apart, and
//!   every reached vertex but the source with a neighbour one level up.
//! * PageRank, 10 pull iterations, damping 0.85, dangling mass spread
//!   evenly. The check: ranks positive and summing to 1.
//!
//! The graph is built before the timed phase; both run over the same
//! arrays through every interface.

use anyhow::Result;
use remora_objects::{FarVec, Scope};

use super::{check, far_vec, fold, scaled, Kind, Mem, Outcome, Rng};

/// PageRank iterations.
pub const PR_ITERS: u32 = 10;
const DAMPING: f64 = 0.85;
const UNREACHED: u32 = u32::MAX;

/// log2 of the vertex count: 2^20 at scale 1.
fn log_vertices(scale: f64) -> u32 {
    let v = scaled(1 << 20, scale, 1 << 10);
    63 - v.leading_zeros()
}

/// Vertices and generated edges (4 per vertex; each stored both ways).
pub fn size(scale: f64) -> (u64, u64) {
    let n = 1u64 << log_vertices(scale);
    (n, 4 * n)
}

/// Bytes of the graph and the workload's per-vertex arrays.
pub fn footprint(scale: f64, pagerank: bool) -> u64 {
    let (n, m) = size(scale);
    let csr = (n + 1) * 8 + 2 * m * 4;
    csr + if pagerank { 2 * n * 8 } else { 2 * n * 4 }
}

/// The graph in compressed sparse rows: `targets[offsets[v]..offsets[v+1]]`.
#[derive(Debug)]
pub struct Csr {
    /// Row starts, `n + 1` of them.
    pub offsets: Vec<u64>,
    /// Neighbours.
    pub targets: Vec<u32>,
}

/// The R-MAT edges of `scale` and `seed`, made again on each call (so that
/// building the graph needs no edge list), self-loops dropped.
fn edges(scale: f64, seed: u64, mut f: impl FnMut(u32, u32)) {
    let k = log_vertices(scale);
    let (_, m) = size(scale);
    let mut rng = Rng::new(seed, 0x67a9);
    for _ in 0..m {
        let (mut u, mut v) = (0u32, 0u32);
        for _ in 0..k {
            let r = rng.below(100);
            let (du, dv) = if r < 57 {
                (0, 0)
            } else if r < 76 {
                (0, 1)
            } else if r < 95 {
                (1, 0)
            } else {
                (1, 1)
            };
            u = u << 1 | du;
            v = v << 1 | dv;
        }
        if u != v {
            f(u, v);
        }
    }
}

/// Generates the graph of `scale` from `seed`. Two passes over the
/// edges (count, then place), so that the only memory it takes is the
/// graph's own.
pub fn generate(scale: f64, seed: u64) -> Csr {
    let (n, _) = size(scale);
    let n = n as usize;
    // ends[u + 1] counts u's arcs, then becomes the end of u's row.
    let mut ends = vec![0u64; n + 1];
    edges(scale, seed, |u, v| {
        ends[u as usize + 1] += 1;
        ends[v as usize + 1] += 1;
    });
    for i in 0..n {
        ends[i + 1] += ends[i];
    }
    let total = ends[n];
    let mut targets = vec![0u32; total as usize];
    // Place each arc just below its row's end, moving the end down: at the
    // end, ends[u + 1] is the start of u's row.
    edges(scale, seed, |u, v| {
        ends[u as usize + 1] -= 1;
        targets[ends[u as usize + 1] as usize] = v;
        ends[v as usize + 1] -= 1;
        targets[ends[v as usize + 1] as usize] = u;
    });
    ends.rotate_left(1);
    ends[n] = total;
    Csr {
        offsets: ends,
        targets,
    }
}

/// Graph500's check of BFS depths.
fn check_bfs(g: &Csr, dist: &[u32]) -> Result<()> {
    check(dist[0] == 0, || format!("the source has depth {}", dist[0]))?;
    for u in 0..dist.len() {
        let (s, e) = (g.offsets[u] as usize, g.offsets[u + 1] as usize);
        let du = dist[u];
        let mut parent = u == 0 || du == UNREACHED;
        for &v in &g.targets[s..e] {
            let dv = dist[v as usize];
            check((du == UNREACHED) == (dv == UNREACHED), || {
                format!("arc {u}-{v} joins a reached and an unreached vertex")
            })?;
            if du != UNREACHED {
                check(du.abs_diff(dv) <= 1, || {
                    format!("arc {u}-{v} spans depths {du} and {dv}")
                })?;
                parent |= dv + 1 == du;
            }
        }
        check(parent, || format!("vertex {u} at depth {du} has no parent"))?;
    }
    Ok(())
}

fn check_ranks(rank: &[f64]) -> Result<()> {
    let sum: f64 = rank.iter().sum();
    check(rank.iter().all(|&r| r > 0.0), || {
        "a rank is not positive".into()
    })?;
    check((sum - 1.0).abs() < 1e-6, || format!("ranks sum to {sum}"))
}

fn digest_u32(v: &[u32]) -> u64 {
    v.iter().fold(0, |d, &x| fold(d, x as u64))
}

fn digest_f64(v: &[f64]) -> u64 {
    v.iter().fold(0, |d, &x| fold(d, x.to_bits()))
}

/// Runs BFS (`pagerank` false) or PageRank in `mem`. `corrupt` damages the
/// result before the check.
pub fn run(mem: &Mem, scale: f64, seed: u64, pagerank: bool, corrupt: bool) -> Result<Outcome> {
    let g = generate(scale, seed);
    let n = g.offsets.len() - 1;
    let arcs = g.targets.len() as u64;
    let (secs, bytes, out) = match &mem.kind {
        Kind::Plain => {
            let m = mem.meter()?;
            let out = if pagerank {
                Out::Ranks(pagerank_plain(&g))
            } else {
                Out::Dist(bfs_plain(&g))
            };
            let (s, b) = m.stop()?;
            (s, b, out)
        }
        Kind::Objects { cache, .. } => {
            let offsets = far_vec(cache, n + 1, |i| g.offsets[i])?;
            let targets = far_vec(cache, g.targets.len(), |i| g.targets[i])?;
            let fg = FarCsr { offsets, targets };
            let m = mem.meter()?;
            let far = if pagerank {
                fg.pagerank(cache, n)?
            } else {
                fg.bfs(cache, n)?
            };
            let (s, b) = m.stop()?;
            // Read back for the check, after the timed phase.
            let out = match far {
                FarOut::Dist(d) => Out::Dist(d.iter().collect::<Result<Vec<_>, _>>()?),
                FarOut::Ranks(r) => Out::Ranks(r.iter().collect::<Result<Vec<_>, _>>()?),
            };
            (s, b, out)
        }
        Kind::Regions(_) => anyhow::bail!("graph workloads do not run on regions"),
    };
    let (ops, digest) = match out {
        Out::Dist(mut d) => {
            if corrupt {
                let v = g.targets[g.offsets[0] as usize] as usize;
                d[v] = d[v].wrapping_add(2);
            }
            check_bfs(&g, &d)?;
            (arcs, digest_u32(&d))
        }
        Out::Ranks(mut r) => {
            if corrupt {
                r[n / 2] += 0.25;
            }
            check_ranks(&r)?;
            (arcs * PR_ITERS as u64, digest_f64(&r))
        }
    };
    Ok(Outcome {
        secs,
        ops,
        digest,
        lat_us: Vec::new(),
        bytes_moved: bytes,
    })
}

enum Out {
    Dist(Vec<u32>),
    Ranks(Vec<f64>),
}

enum FarOut {
    Dist(FarVec<u32>),
    Ranks(FarVec<f64>),
}

fn bfs_plain(g: &Csr) -> Vec<u32> {
    let n = g.offsets.len() - 1;
    let mut dist = vec![UNREACHED; n];
    let mut queue = Vec::with_capacity(n);
    dist[0] = 0;
    queue.push(0u32);
    let mut head = 0;
    while head < queue.len() {
        let u = queue[head] as usize;
        head += 1;
        let du = dist[u];
        for &v in &g.targets[g.offsets[u] as usize..g.offsets[u + 1] as usize] {
            if dist[v as usize] == UNREACHED {
                dist[v as usize] = du + 1;
                queue.push(v);
            }
        }
    }
    dist
}

fn pagerank_plain(g: &Csr) -> Vec<f64> {
    let n = g.offsets.len() - 1;
    let mut rank = vec![1.0 / n as f64; n];
    let mut contrib = vec![0.0f64; n];
    for _ in 0..PR_ITERS {
        let mut dangling = 0.0;
        for (v, (r, c)) in rank.iter().zip(contrib.iter_mut()).enumerate() {
            let d = g.offsets[v + 1] - g.offsets[v];
            if d == 0 {
                dangling += r;
                *c = 0.0;
            } else {
                *c = r / d as f64;
            }
        }
        let base = (1.0 - DAMPING) / n as f64 + DAMPING * dangling / n as f64;
        for (v, r) in rank.iter_mut().enumerate() {
            let mut s = 0.0;
            for &u in &g.targets[g.offsets[v] as usize..g.offsets[v + 1] as usize] {
                s += contrib[u as usize];
            }
            *r = base + DAMPING * s;
        }
    }
    rank
}

/// The graph in far vectors.
struct FarCsr {
    offsets: FarVec<u64>,
    targets: FarVec<u32>,
}

impl FarCsr {
    fn bfs(&self, cache: &remora_objects::ObjectCache, n: usize) -> Result<FarOut> {
        let mut dist = far_vec(cache, n, |_| UNREACHED)?;
        let mut queue: FarVec<u32> = FarVec::new(cache)?;
        dist.set(0, 0)?;
        queue.push(0)?;
        let mut head = 0;
        let mut next = Vec::new();
        while head < queue.len() {
            let u = queue.read(head)? as usize;
            head += 1;
            let du = dist.read(u)?;
            let (s, e) = {
                let sc = Scope::new();
                (
                    *self.offsets.get(u, &sc)? as usize,
                    *self.offsets.get(u + 1, &sc)? as usize,
                )
            };
            next.clear();
            for v in self.targets.iter_range(s..e)? {
                next.push(v?);
            }
            for &v in &next {
                let fresh = {
                    let mut sc = Scope::new();
                    let mut d = dist.get_mut(v as usize, &mut sc)?;
                    let fresh = *d == UNREACHED;
                    if fresh {
                        *d = du + 1;
                    }
                    fresh
                };
                if fresh {
                    queue.push(v)?;
                }
            }
        }
        Ok(FarOut::Dist(dist))
    }

    fn pagerank(&self, cache: &remora_objects::ObjectCache, n: usize) -> Result<FarOut> {
        let mut rank = far_vec(cache, n, |_| 1.0 / n as f64)?;
        let mut contrib = far_vec(cache, n, |_| 0.0f64)?;
        for _ in 0..PR_ITERS {
            let mut dangling = 0.0;
            {
                let mut offs = self.offsets.iter();
                let mut prev = offs.next().transpose()?.unwrap_or(0);
                let mut ranks = rank.iter();
                let mut err = None;
                super::far_update(&mut contrib, 0..n, 16, |_, c| {
                    let o = next_or(&mut offs, prev, &mut err);
                    let r = next_or(&mut ranks, 0.0, &mut err);
                    let d = o - prev;
                    prev = o;
                    if d == 0 {
                        dangling += r;
                        *c = 0.0;
                    } else {
                        *c = r / d as f64;
                    }
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
            }
            let base = (1.0 - DAMPING) / n as f64 + DAMPING * dangling / n as f64;
            let mut offs = self.offsets.iter();
            let mut prev = offs.next().transpose()?.unwrap_or(0);
            let mut targets = self.targets.iter();
            let mut err = None;
            super::far_update(&mut rank, 0..n, 16, |_, r| {
                let o = next_or(&mut offs, prev, &mut err);
                let mut s = 0.0;
                for _ in prev..o {
                    let u = next_or(&mut targets, 0, &mut err) as usize;
                    match contrib.read(u) {
                        Ok(c) => s += c,
                        Err(e) => err = Some(e.into()),
                    }
                }
                prev = o;
                *r = base + DAMPING * s;
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(FarOut::Ranks(rank))
    }
}

/// The iterator's next element; on an error or at the end, `dflt`, with
/// the error kept in `err` (and the end reported as one).
fn next_or<T>(
    it: &mut impl Iterator<Item = Result<T, remora_objects::ObjError>>,
    dflt: T,
    err: &mut Option<anyhow::Error>,
) -> T {
    match it.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            err.get_or_insert(e.into());
            dflt
        }
        None => {
            err.get_or_insert(anyhow::anyhow!("a far array ended early"));
            dflt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        for pr in [false, true] {
            let a = run(&Mem::plain(), 0.001, 2, pr, false).unwrap();
            let b = run(&Mem::plain(), 0.001, 2, pr, false).unwrap();
            assert_eq!(a.digest, b.digest);
            let e = run(&Mem::plain(), 0.001, 2, pr, true).unwrap_err();
            assert!(e.to_string().contains("result check failed"), "{e:#}");
        }
    }
}
