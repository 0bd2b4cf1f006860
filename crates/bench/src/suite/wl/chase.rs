//! Pointer chasing: a walk through a randomly linked list (the worst case
//! for caching and prefetching, the best case for offload).
//!
//! Nodes are 16 bytes: the next node, and a payload that is a function of
//! the node's own index. The links form one random cycle over all nodes.
//! The walk checks every payload it passes and, at its end, that it stands
//! where the permutation says.

use std::time::Instant;

use anyhow::{Context, Result};
use bytemuck::{Pod, Zeroable};
use remora_client::offload::{ChaseReply, OffloadOp, CHASE_END, MAX_CHASE_HOPS};

use super::{check, fold, mix, scaled, Kind, Mem, Outcome, Rng};

/// One in this many hops is timed for the latency percentiles.
pub const LAT_SAMPLE: u64 = 16;

/// A list node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Node {
    /// Index of the next node (a region byte offset in the offloaded form).
    pub next: u64,
    /// `payload(seed, index)`.
    pub payload: u64,
}

/// Nodes in the list: 4M (64 MiB) at scale 1.
pub fn nodes(scale: f64) -> u64 {
    scaled(4 << 20, scale, 4096)
}

/// Hops of the walk: 200k at scale 1.
pub fn hops(scale: f64) -> u64 {
    scaled(200_000, scale, 2000)
}

/// Bytes of the list.
pub fn footprint(scale: f64) -> u64 {
    nodes(scale) * 16
}

fn payload(seed: u64, i: u64) -> u64 {
    mix(seed ^ i.wrapping_mul(0x9e37))
}

/// The list: one random cycle through all nodes (Sattolo's algorithm, in
/// place, so that making it needs no memory beyond the list), its first
/// node, and the node the walk must end on.
fn make_list(n: u64, h: u64, seed: u64, corrupt: bool) -> (Vec<Node>, u64, u64) {
    let mut list: Vec<Node> = (0..n)
        .map(|i| Node {
            next: i,
            payload: payload(seed, i),
        })
        .collect();
    let mut rng = Rng::new(seed, 0xc4a5e);
    for i in (1..n as usize).rev() {
        let j = rng.below(i as u64) as usize;
        let t = list[i].next;
        list[i].next = list[j].next;
        list[j].next = t;
    }
    let mut last = 0;
    for _ in 0..h {
        last = list[last as usize].next;
    }
    if corrupt {
        let second = list[0].next as usize;
        list[second].payload ^= 1;
    }
    (list, 0, last)
}

struct Walk {
    seed: u64,
    digest: u64,
    lat: Vec<f64>,
}

impl Walk {
    /// Walks `hops` nodes from `from`, reading each with `node`, timing
    /// one hop in [`LAT_SAMPLE`]; returns where the walk ends.
    fn walk(
        &mut self,
        from: u64,
        hops: u64,
        mut node: impl FnMut(u64) -> Result<Node>,
    ) -> Result<u64> {
        let mut cur = from;
        for k in 0..hops {
            let t0 = k.is_multiple_of(LAT_SAMPLE).then(Instant::now);
            let nd = node(cur)?;
            self.visit(cur, &nd)?;
            cur = nd.next;
            if let Some(t0) = t0 {
                self.lat.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(cur)
    }

    fn visit(&mut self, index: u64, node: &Node) -> Result<()> {
        let want = payload(self.seed, index);
        check(node.payload == want, || {
            format!(
                "node {index} holds payload {:#x}, expected {want:#x}",
                node.payload
            )
        })?;
        self.digest = fold(self.digest, node.payload);
        Ok(())
    }
}

/// Runs the workload in `mem`. `corrupt` damages the payload of the second
/// node of the walk.
pub fn run(mem: &Mem, scale: f64, seed: u64, corrupt: bool) -> Result<Outcome> {
    let (n, h) = (nodes(scale), hops(scale));
    let (list, first, last) = make_list(n, h, seed, corrupt);
    let mut w = Walk {
        seed,
        digest: 0,
        lat: Vec::with_capacity((h / LAT_SAMPLE + 1) as usize),
    };
    let (secs, bytes, cur) = match &mem.kind {
        Kind::Plain => {
            let m = mem.meter()?;
            let end = w.walk(first, h, |i| Ok(list[i as usize]))?;
            let (secs, bytes) = m.stop()?;
            (secs, bytes, end)
        }
        Kind::Objects {
            cache,
            offload: false,
            ..
        } => {
            let local = list;
            let list = super::far_vec(cache, n as usize, |i| local[i])?;
            drop(local);
            let m = mem.meter()?;
            let end = w.walk(first, h, |i| Ok(list.read(i as usize)?))?;
            let (secs, bytes) = m.stop()?;
            (secs, bytes, end)
        }
        Kind::Objects {
            cluster,
            offload: true,
            ..
        } => {
            // Server-side traversal needs links the server can follow:
            // region offsets in one region.
            let region = cluster
                .alloc_region(n * 16)
                .context("allocating the list region")?;
            load_region(&region, n, |i| {
                let mut nd = list[i as usize];
                nd.next *= 16;
                nd
            })?;
            drop(list);
            let t = Instant::now();
            let mut bytes = 0u64;
            let mut at = first * 16;
            let mut k = 0u64;
            while k < h {
                let t0 = Instant::now();
                let want = (h - k).min(MAX_CHASE_HOPS as u64) as u16;
                let reply = region.offload(
                    at,
                    &OffloadOp::Chase {
                        slab_base: 0,
                        next_off: 0,
                        node_len: 16,
                        hops: want,
                    },
                )?;
                bytes += reply.len() as u64;
                let r = ChaseReply::decode(&reply, 16)?;
                let mut got = 0u64;
                for raw in r.iter() {
                    let nd: Node = bytemuck::pod_read_unaligned(raw);
                    w.visit(at / 16, &nd)?;
                    at = nd.next;
                    got += 1;
                }
                check(got > 0 && r.next != CHASE_END, || {
                    format!("the offloaded walk stopped after {k} hops")
                })?;
                // One request serves `got` hops: each sampled hop in it
                // waited for the whole request.
                let per = t0.elapsed().as_secs_f64() * 1e6;
                for j in k..k + got {
                    if j.is_multiple_of(LAT_SAMPLE) {
                        w.lat.push(per);
                    }
                }
                k += got;
            }
            (t.elapsed().as_secs_f64(), Some(bytes), at / 16)
        }
        Kind::Regions(cluster) => {
            let region = cluster
                .alloc_region(n * 16)
                .context("allocating the list region")?;
            load_region(&region, n, |i| list[i as usize])?;
            drop(list);
            let t = Instant::now();
            let end = w.walk(first, h, |i| {
                let mut b = [0u8; 16];
                region.read(i * 16, &mut b)?;
                Ok(bytemuck::pod_read_unaligned(&b))
            })?;
            (t.elapsed().as_secs_f64(), Some(h * 16), end)
        }
    };
    check(cur == last, || {
        format!("the walk ended on node {cur}, expected {last}")
    })?;
    Ok(Outcome {
        secs,
        ops: h,
        digest: w.digest,
        lat_us: w.lat,
        bytes_moved: bytes,
    })
}

/// Writes the `n` nodes `f(i)` into `region` in 1 MiB pieces.
fn load_region(region: &remora_client::Region, n: u64, f: impl Fn(u64) -> Node) -> Result<()> {
    let per = 65536u64;
    let mut buf = Vec::with_capacity(per as usize);
    let mut i = 0;
    while i < n {
        buf.clear();
        buf.extend((i..(i + per).min(n)).map(&f));
        region.write(i * 16, bytemuck::cast_slice(&buf))?;
        i += buf.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        let a = run(&Mem::plain(), 0.001, 9, false).unwrap();
        let b = run(&Mem::plain(), 0.001, 9, false).unwrap();
        assert_eq!(a.digest, b.digest);
        let e = run(&Mem::plain(), 0.001, 9, true).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }
}
