//! Offloaded operations: aggregates, filters, hash probes, pointer chases
//! and copies, run next to a slab's bytes (layouts and limits in
//! `remora_proto::offload`).
//!
//! Each runs under its slab's read lock after the checks a read makes (a
//! copy: [`SlabPool::copy`], with the destination checked as for a write)
//! and writes its reply straight into the connection's reply buffer, so a
//! successful operation allocates nothing. Every parameter and range is
//! checked before the reply is begun; after that an operation cannot fail,
//! only stop early (at its limits, or at the slab's end).

use std::sync::atomic::Ordering;

use remora_proto::data::{self, reply, OffloadOp, Reply, Target};
use remora_proto::frame::{begin_frame, finish_frame};
use remora_proto::offload::{
    cmp, elem, fp, output, probe, AggregateReply, ChaseReply, FilterReply, ProbeReply, CHASE_END,
};
use remora_proto::ErrorCode;

use crate::pool::{span, SlabPool};

/// Runs `op` on slab `at.slab` from `at.offset` and appends its reply
/// (DATA, or DONE for a copy) to `out`; on error nothing is appended and
/// the caller replies with the code and message.
pub fn execute(
    pool: &SlabPool,
    at: &Target,
    op: &OffloadOp<'_>,
    id: u64,
    max_reply: usize,
    out: &mut Vec<u8>,
) -> Result<(), (ErrorCode, String)> {
    let whence = || format!("offload at slab {} offset {}", at.slab, at.offset);
    op.validate()
        .map_err(|e| (ErrorCode::InvalidArgument, format!("{}: {e}", whence())))?;
    let bound = op.reply_bound();
    if bound > max_reply as u64 {
        return Err((
            ErrorCode::FrameTooLarge,
            format!(
                "{}: a reply of up to {bound} bytes exceeds the maximum reply of {max_reply}",
                whence()
            ),
        ));
    }
    if let OffloadOp::Copy { dest, len } = *op {
        pool.copy(at, &dest, len as u64).map_err(|code| {
            (
                code,
                format!(
                    "copy of {len} bytes from slab {} offset {} to slab {} offset {}: {code}",
                    at.slab, at.offset, dest.slab, dest.offset
                ),
            )
        })?;
        data::encode_reply(out, id, &Reply::Done);
        return Ok(());
    }
    let (extent, align) = (op.extent(), op.alignment());
    let scanned = pool
        .scan(at, |bytes| {
            let range = span(bytes.len() as u64, at.offset, extent)?;
            if !at.offset.is_multiple_of(align) {
                return Err(ErrorCode::Unaligned);
            }
            let start = begin_frame(out, id, reply::DATA);
            match run(bytes, range, op, out) {
                Ok(n) => {
                    finish_frame(out, start);
                    Ok(n)
                }
                Err(code) => {
                    out.truncate(start);
                    Err(code)
                }
            }
        })
        .map_err(|code| {
            let msg = match code {
                ErrorCode::Unaligned => {
                    format!("{}: not a multiple of the element width {align}", whence())
                }
                ErrorCode::OutOfRange => format!(
                    "{}: {extent} bytes from there pass the slab's end",
                    whence()
                ),
                _ => format!("{}: {code}", whence()),
            };
            (code, msg)
        })?;
    pool.counters
        .bytes_read
        .fetch_add(scanned, Ordering::Relaxed);
    Ok(())
}

/// Runs a validated read-only operation whose first `extent` bytes are
/// `range` of the slab `bytes`; appends the reply's payload and returns
/// the slab bytes it scanned.
fn run(
    bytes: &[u8],
    range: std::ops::Range<usize>,
    op: &OffloadOp<'_>,
    out: &mut Vec<u8>,
) -> Result<u64, ErrorCode> {
    let data = &bytes[range.clone()];
    match *op {
        OffloadOp::Aggregate { elem, .. } => match elem {
            elem::U64 => Ok(aggregate::<U64>(data, out)),
            elem::I64 => Ok(aggregate::<I64>(data, out)),
            elem::U32 => Ok(aggregate::<U32>(data, out)),
            elem::I32 => Ok(aggregate::<I32>(data, out)),
            _ => Err(ErrorCode::InvalidArgument),
        },
        OffloadOp::Filter {
            elem,
            cmp,
            operand,
            max_out,
            out: kind,
            ..
        } => {
            let f = Filter {
                cmp,
                operand,
                max_out,
                kind,
            };
            match elem {
                elem::U64 => f.run::<U64>(data, out),
                elem::I64 => f.run::<I64>(data, out),
                elem::U32 => f.run::<U32>(data, out),
                elem::I32 => f.run::<I32>(data, out),
                _ => Err(ErrorCode::InvalidArgument),
            }
        }
        OffloadOp::Probe {
            bucket_len,
            slots,
            key_len,
            val_len,
            max_buckets,
            fingerprint,
            key,
        } => {
            let table = Table {
                bucket_len: bucket_len as usize,
                slots: slots as usize,
                key_len: key_len as usize,
                entry: key_len as usize + val_len as usize,
            };
            Ok(table.probe(bytes, range.start, max_buckets, fingerprint, key, out))
        }
        OffloadOp::Chase {
            slab_base,
            next_off,
            node_len,
            hops,
        } => Ok(chase(
            bytes,
            range.start,
            slab_base,
            next_off as usize,
            node_len as usize,
            hops,
            out,
        )),
        OffloadOp::Copy { .. } => Err(ErrorCode::InvalidArgument),
    }
}

/// An element type: how to load one and the 64-bit type it widens to.
trait Elem {
    /// `u64` or `i64`: comparisons in it are unsigned or signed.
    type Wide: Copy + Ord;
    const WIDTH: usize;
    /// Loads the element held in exactly `WIDTH` little-endian bytes.
    fn load(b: &[u8]) -> Self::Wide;
    fn from_bits(bits: u64) -> Self::Wide;
    fn bits(w: Self::Wide) -> u64;
    fn add(a: Self::Wide, b: Self::Wide) -> Self::Wide;
}

struct U64;
struct I64;
struct U32;
struct I32;

macro_rules! elem_type {
    ($name:ident, $prim:ty, $wide:ty, $width:expr) => {
        impl Elem for $name {
            type Wide = $wide;
            const WIDTH: usize = $width;
            #[inline]
            fn load(b: &[u8]) -> $wide {
                let mut a = [0u8; $width];
                a.copy_from_slice(b);
                <$prim>::from_le_bytes(a) as $wide
            }
            #[inline]
            fn from_bits(bits: u64) -> $wide {
                bits as $wide
            }
            #[inline]
            fn bits(w: $wide) -> u64 {
                w as u64
            }
            #[inline]
            fn add(a: $wide, b: $wide) -> $wide {
                a.wrapping_add(b)
            }
        }
    };
}

elem_type!(U64, u64, u64, 8);
elem_type!(I64, i64, i64, 8);
elem_type!(U32, u32, u64, 4);
elem_type!(I32, i32, i64, 4);

fn aggregate<E: Elem>(data: &[u8], out: &mut Vec<u8>) -> u64 {
    let mut it = data.chunks_exact(E::WIDTH).map(E::load);
    let r = match it.next() {
        Some(first) => {
            let (mut sum, mut min, mut max, mut n) = (first, first, first, 1u64);
            for v in it {
                sum = E::add(sum, v);
                min = min.min(v);
                max = max.max(v);
                n += 1;
            }
            AggregateReply {
                sum: E::bits(sum),
                min: E::bits(min),
                max: E::bits(max),
                n,
            }
        }
        // Not reached: a count of 0 is refused.
        None => AggregateReply {
            sum: 0,
            min: 0,
            max: 0,
            n: 0,
        },
    };
    r.put(out);
    data.len() as u64
}

/// A filter's parameters.
struct Filter {
    cmp: u8,
    operand: u64,
    max_out: u32,
    kind: u8,
}

impl Filter {
    fn run<E: Elem>(&self, data: &[u8], out: &mut Vec<u8>) -> Result<u64, ErrorCode> {
        let x = E::from_bits(self.operand);
        // One scan loop per comparison, each compiled with its test inline.
        Ok(match self.cmp {
            cmp::LT => self.scan::<E>(data, |v| v < x, out),
            cmp::LE => self.scan::<E>(data, |v| v <= x, out),
            cmp::EQ => self.scan::<E>(data, |v| v == x, out),
            cmp::NE => self.scan::<E>(data, |v| v != x, out),
            cmp::GE => self.scan::<E>(data, |v| v >= x, out),
            cmp::GT => self.scan::<E>(data, |v| v > x, out),
            _ => return Err(ErrorCode::InvalidArgument),
        })
    }

    fn scan<E: Elem>(&self, data: &[u8], hit: impl Fn(E::Wide) -> bool, out: &mut Vec<u8>) -> u64 {
        let head = out.len();
        out.resize(head + FilterReply::HEAD_LEN, 0);
        let limit = if self.kind == output::COUNT {
            u32::MAX
        } else {
            self.max_out
        };
        let (mut scanned, mut matched) = (0u32, 0u32);
        for b in data.chunks_exact(E::WIDTH) {
            let index = scanned;
            scanned += 1;
            if hit(E::load(b)) {
                matched += 1;
                match self.kind {
                    output::INDICES => out.extend_from_slice(&index.to_le_bytes()),
                    output::VALUES => out.extend_from_slice(b),
                    _ => {}
                }
                if matched == limit {
                    break;
                }
            }
        }
        FilterReply::put_head(&mut out[head..], scanned, matched);
        scanned as u64 * E::WIDTH as u64
    }
}

/// A bucketized hash table's layout.
struct Table {
    bucket_len: usize,
    slots: usize,
    key_len: usize,
    /// Bytes per entry: key and value.
    entry: usize,
}

impl Table {
    /// Looks `key` up from the bucket at `start` (which lies in `bytes`).
    fn probe(
        &self,
        bytes: &[u8],
        start: usize,
        max_buckets: u16,
        fingerprint: u8,
        key: &[u8],
        out: &mut Vec<u8>,
    ) -> u64 {
        let mut at = start;
        let mut buckets = 0u16;
        let mut reply = ProbeReply {
            status: probe::UNFINISHED,
            buckets: 0,
            slot: 0,
            value: &[],
        };
        while buckets < max_buckets {
            let Some(bucket) = at
                .checked_add(self.bucket_len)
                .and_then(|end| bytes.get(at..end))
            else {
                // The next bucket crosses the slab's end.
                break;
            };
            buckets += 1;
            if let Some((slot, value)) = self.find(bucket, fingerprint, key) {
                reply.status = probe::FOUND;
                reply.slot = slot as u8;
                reply.value = value;
                break;
            }
            let fps = bucket.get(..self.slots).unwrap_or_default();
            if fps.contains(&fp::EMPTY) {
                reply.status = probe::ABSENT;
                break;
            }
            at += self.bucket_len;
        }
        reply.buckets = buckets;
        reply.put(out);
        buckets as u64 * self.bucket_len as u64
    }

    /// The slot holding `key` in `bucket`, and its value.
    fn find<'b>(&self, bucket: &'b [u8], fingerprint: u8, key: &[u8]) -> Option<(usize, &'b [u8])> {
        (0..self.slots).find_map(|i| {
            if bucket.get(i) != Some(&fingerprint) {
                return None;
            }
            let e = 8 + i * self.entry;
            if bucket.get(e..e + self.key_len)? != key {
                return None;
            }
            Some((i, bucket.get(e + self.key_len..e + self.entry)?))
        })
    }
}

/// Follows the list from the node at `start` (which lies in `bytes`).
fn chase(
    bytes: &[u8],
    start: usize,
    slab_base: u64,
    next_off: usize,
    node_len: usize,
    hops: u16,
    out: &mut Vec<u8>,
) -> u64 {
    let head = out.len();
    out.resize(head + ChaseReply::HEAD_LEN, 0);
    let slab_len = bytes.len() as u64;
    let mut at = start;
    let mut nodes = 0u16;
    let next = loop {
        let Some(node) = at.checked_add(node_len).and_then(|end| bytes.get(at..end)) else {
            // This node crosses the slab's end: the caller reads it.
            break slab_base.wrapping_add(at as u64);
        };
        remora_proto::copy::extend(out, node);
        nodes += 1;
        let next = match node.get(next_off..next_off + 8) {
            Some(b) => {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                u64::from_le_bytes(w)
            }
            None => CHASE_END,
        };
        if next == CHASE_END || nodes == hops {
            break next;
        }
        match next.checked_sub(slab_base) {
            Some(off) if off < slab_len => at = off as usize,
            // Another slab's node.
            _ => break next,
        }
    };
    ChaseReply::put_head(&mut out[head..], nodes, next);
    nodes as u64 * node_len as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::frame::HEADER_LEN;
    use remora_proto::offload::{
        aggregate_locally, filter_locally, MAX_OFFLOAD_SCAN, MAX_PROBE_BUCKETS,
    };

    const SLAB: u64 = 1 << 16;
    const KEY: u64 = 77;
    const MAX_REPLY: usize = 1 << 20;

    /// A deterministic xorshift generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn pool() -> SlabPool {
        let p = SlabPool::new(4 * SLAB, SLAB);
        for slab in 1..=3 {
            p.create(slab, KEY + slab, 0).unwrap();
        }
        p
    }

    fn at(slab: u64, offset: u64) -> Target {
        Target {
            slab,
            key: KEY + slab,
            offset,
        }
    }

    /// Runs `op` and returns the reply's kind and payload, or the error.
    fn call_with(
        p: &SlabPool,
        at: Target,
        op: OffloadOp<'_>,
        max_reply: usize,
    ) -> Result<(u16, Vec<u8>), ErrorCode> {
        let mut out = vec![9u8; 3];
        match execute(p, &at, &op, 42, max_reply, &mut out) {
            Ok(()) => {
                let f = &out[3..];
                let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
                assert_eq!(len + 4, f.len(), "frame length");
                assert_eq!(u64::from_le_bytes(f[4..12].try_into().unwrap()), 42);
                let kind = u16::from_le_bytes(f[12..14].try_into().unwrap());
                Ok((kind, f[HEADER_LEN..].to_vec()))
            }
            Err((code, msg)) => {
                assert_eq!(out, [9; 3], "an error appends nothing");
                assert!(!msg.is_empty());
                Err(code)
            }
        }
    }

    fn call(p: &SlabPool, at: Target, op: OffloadOp<'_>) -> Result<Vec<u8>, ErrorCode> {
        call_with(p, at, op, MAX_REPLY).map(|(kind, d)| {
            assert_eq!(kind, reply::DATA);
            d
        })
    }

    fn fill_random(p: &SlabPool, slab: u64, rng: &mut Rng) -> Vec<u8> {
        let mut bytes = vec![0u8; SLAB as usize];
        for b in bytes.chunks_mut(8) {
            // Small magnitudes half the time, so that comparisons and
            // extremes see ties and both signs.
            let v = if rng.below(2) == 0 {
                rng.next()
            } else {
                (rng.below(7) as i64 - 3) as u64
            };
            b.copy_from_slice(&v.to_le_bytes()[..b.len()]);
        }
        p.write(&at(slab, 0), &bytes).unwrap();
        bytes
    }

    const ELEMS: [u8; 4] = [elem::U64, elem::I64, elem::U32, elem::I32];

    /// A random element type, count and aligned offset in a slab.
    fn place(rng: &mut Rng, round: usize, small: u64) -> (u8, u32, u64, std::ops::Range<usize>) {
        let code = ELEMS[round % 4];
        let w = elem::width(code).unwrap();
        let count = 1 + rng.below(if round.is_multiple_of(3) {
            small
        } else {
            SLAB / w - 1
        });
        let offset = rng.below((SLAB - count * w) / w + 1) * w;
        let range = offset as usize..(offset + count * w) as usize;
        (code, count as u32, offset, range)
    }

    #[test]
    fn aggregates_match_a_local_computation() {
        let p = pool();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let bytes = fill_random(&p, 1, &mut rng);
        for round in 0..200 {
            let (elem, count, offset, range) = place(&mut rng, round, 8);
            let op = OffloadOp::Aggregate { elem, count };
            let d = call(&p, at(1, offset), op).unwrap();
            let want = aggregate_locally(&op, &bytes[range]);
            assert_eq!(
                Some(AggregateReply::decode(&d).unwrap()),
                want,
                "{op:?} at {offset}"
            );
        }
        // i32 −1 widens to all ones; signed extremes compare signed.
        p.write(
            &at(2, 0),
            &[(-1i32).to_le_bytes(), 5i32.to_le_bytes()].concat(),
        )
        .unwrap();
        let sum = |elem| {
            let d = call(&p, at(2, 0), OffloadOp::Aggregate { elem, count: 2 }).unwrap();
            let r = AggregateReply::decode(&d).unwrap();
            (r.sum, r.min, r.max)
        };
        assert_eq!(sum(elem::I32), (4, u64::MAX, 5));
        assert_eq!(sum(elem::U32), (u32::MAX as u64 + 5, 5, u32::MAX as u64));
    }

    #[test]
    fn filters_match_a_local_computation() {
        let p = pool();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let bytes = fill_random(&p, 1, &mut rng);
        for round in 0..400 {
            let (elem, count, offset, range) = place(&mut rng, round, 16);
            let w = elem::width(elem).unwrap() as usize;
            let operand = if rng.below(2) == 0 {
                let i = range.start + rng.below(count as u64) as usize * w;
                elem::widen(elem, &bytes[i..i + w]).unwrap()
            } else {
                (rng.below(5) as i64 - 2) as u64
            };
            let out = rng.below(3) as u8;
            let op = OffloadOp::Filter {
                elem,
                count,
                cmp: 1 + rng.below(6) as u8,
                operand,
                max_out: 1 + rng.below(count as u64 + 3) as u32,
                out,
            };
            let d = call(&p, at(1, offset), op).unwrap();
            let got = FilterReply::decode(&d, elem, out).unwrap();
            let (scanned, hits) = filter_locally(&op, &bytes[range]).unwrap();
            assert_eq!(
                (got.scanned, got.matched as usize),
                (scanned, hits.len()),
                "{op:?}"
            );
            match out {
                output::INDICES => assert!(got.indices().eq(hits.iter().map(|h| h.0)), "{op:?}"),
                output::VALUES => assert!(got.values().eq(hits.iter().map(|h| h.1)), "{op:?}"),
                _ => assert!(got.items().is_empty()),
            }
        }
    }

    /// Writes a bucket: (fingerprint, key, value) per slot.
    fn bucket(p: &SlabPool, offset: u64, slots: &[(u8, &[u8; 4], &[u8; 2])]) {
        let mut b = vec![0u8; 64];
        for (i, (f, k, v)) in slots.iter().enumerate() {
            b[i] = *f;
            let e = 8 + i * 6;
            b[e..e + 4].copy_from_slice(*k);
            b[e + 4..e + 6].copy_from_slice(*v);
        }
        p.write(&at(1, offset), &b).unwrap();
    }

    fn probe_op(key: &[u8], fingerprint: u8, max_buckets: u16) -> OffloadOp<'_> {
        OffloadOp::Probe {
            bucket_len: 64,
            slots: 4,
            key_len: 4,
            val_len: 2,
            max_buckets,
            fingerprint,
            key,
        }
    }

    fn probe_at(
        p: &SlabPool,
        offset: u64,
        key: &[u8],
        fingerprint: u8,
        max: u16,
    ) -> (u8, u16, u8, Vec<u8>) {
        let d = call(p, at(1, offset), probe_op(key, fingerprint, max)).unwrap();
        let r = ProbeReply::decode(&d).unwrap();
        (r.status, r.buckets, r.slot, r.value.to_vec())
    }

    #[test]
    fn probes_find_skip_and_stop() {
        let p = pool();
        // Bucket 0 full: a deleted slot, a colliding fingerprint with
        // another key, two others. Bucket 1 holds "key2" in slot 2 and has
        // an empty slot.
        bucket(
            &p,
            0,
            &[
                (1, b"key1", b"d1"),
                (9, b"zzzz", b"zz"),
                (9, b"abcd", b"v1"),
                (3, b"efgh", b"v2"),
            ],
        );
        bucket(
            &p,
            64,
            &[
                (4, b"aaaa", b"xx"),
                (5, b"bbbb", b"yy"),
                (9, b"key2", b"v3"),
            ],
        );
        assert_eq!(
            probe_at(&p, 0, b"abcd", 9, 8),
            (probe::FOUND, 1, 2, b"v1".to_vec())
        );
        assert_eq!(
            probe_at(&p, 0, b"efgh", 3, 8),
            (probe::FOUND, 1, 3, b"v2".to_vec())
        );
        // Fingerprint matches but key differs in bucket 0; found in bucket 1.
        assert_eq!(
            probe_at(&p, 0, b"key2", 9, 8),
            (probe::FOUND, 2, 2, b"v3".to_vec())
        );
        // A deleted slot is skipped even if its key matches.
        assert_eq!(
            probe_at(&p, 0, b"key1", 9, 8),
            (probe::ABSENT, 2, 0, vec![])
        );
        // Absent: bucket 1 has an empty slot.
        assert_eq!(
            probe_at(&p, 0, b"none", 9, 8),
            (probe::ABSENT, 2, 0, vec![])
        );
        // Not finished within max_buckets.
        assert_eq!(
            probe_at(&p, 0, b"key2", 9, 1),
            (probe::UNFINISHED, 1, 0, vec![])
        );
        // Slots beyond `slots` are not looked at: a fingerprint in slot 5 is
        // ignored, and a zero there does not make the bucket non-full.
        let mut full = vec![7u8; 64];
        full[..8].copy_from_slice(&[7, 7, 7, 7, 0, 9, 0, 0]);
        for b in 0..(SLAB / 64) {
            p.write(&at(2, b * 64), &full).unwrap();
        }
        let op = probe_op(b"\x07\x07\x07\x08", 7, MAX_PROBE_BUCKETS);
        let d = call(&p, at(2, SLAB - 3 * 64), op).unwrap();
        // Stops at the slab's end.
        let r = ProbeReply::decode(&d).unwrap();
        assert_eq!((r.status, r.buckets), (probe::UNFINISHED, 3));
        // A first bucket past the end is out of range; so is a partial one.
        assert_eq!(call(&p, at(2, SLAB - 63), op), Err(ErrorCode::OutOfRange));
        let d = call(&p, at(2, SLAB - 64 - 10), op).unwrap();
        let r = ProbeReply::decode(&d).unwrap();
        assert_eq!((r.status, r.buckets), (probe::UNFINISHED, 1));
        // Found: key of all 7s in slot 0.
        let op = probe_op(&[7, 7, 7, 7], 7, 1);
        let d = call(&p, at(2, 0), op).unwrap();
        let r = ProbeReply::decode(&d).unwrap();
        assert_eq!(
            (r.status, r.slot, r.value),
            (probe::FOUND, 0, &[7u8, 7][..])
        );
    }

    /// Writes nodes of 24 bytes: payload u64, next u64 at byte 8, tag u64.
    fn node(p: &SlabPool, slab: u64, offset: u64, next: u64, tag: u64) {
        let b = [tag.to_le_bytes(), next.to_le_bytes(), (!tag).to_le_bytes()].concat();
        p.write(&at(slab, offset), &b).unwrap();
    }

    fn chase_op(slab_base: u64, hops: u16) -> OffloadOp<'static> {
        OffloadOp::Chase {
            slab_base,
            next_off: 8,
            node_len: 24,
            hops,
        }
    }

    fn chase_at(p: &SlabPool, offset: u64, op: OffloadOp<'_>) -> (u64, Vec<u64>) {
        let d = call(p, at(1, offset), op).unwrap();
        let OffloadOp::Chase { node_len, .. } = op else {
            unreachable!()
        };
        let r = ChaseReply::decode(&d, node_len).unwrap();
        let tags = r
            .iter()
            .map(|n| u64::from_le_bytes(n[..8].try_into().unwrap()))
            .collect::<Vec<_>>();
        assert_eq!(tags.len(), r.nodes as usize);
        (r.next, tags)
    }

    #[test]
    fn chases_follow_lists_within_the_slab() {
        let p = pool();
        let base = 5 * SLAB;
        // 100 -> 2000 -> 40 -> end, as region offsets.
        node(&p, 1, 100, base + 2000, 1);
        node(&p, 1, 2000, base + 40, 2);
        node(&p, 1, 40, CHASE_END, 3);
        assert_eq!(
            chase_at(&p, 100, chase_op(base, 10)),
            (CHASE_END, vec![1, 2, 3])
        );
        assert_eq!(
            chase_at(&p, 100, chase_op(base, 2)),
            (base + 40, vec![1, 2])
        );
        let d = call(&p, at(1, 100), chase_op(base, 2)).unwrap();
        let r = ChaseReply::decode(&d, 24).unwrap();
        let first = r.iter().next().unwrap();
        assert_eq!(first[16..24], (!1u64).to_le_bytes());
        // A pointer into another slab (either side) stops the chase there.
        node(&p, 1, 40, base + SLAB, 3);
        assert_eq!(
            chase_at(&p, 100, chase_op(base, 10)),
            (base + SLAB, vec![1, 2, 3])
        );
        node(&p, 1, 40, base - 1, 3);
        assert_eq!(
            chase_at(&p, 100, chase_op(base, 10)),
            (base - 1, vec![1, 2, 3])
        );
        // A node that would cross the slab's end is left to the caller.
        node(&p, 1, 40, base + SLAB - 10, 3);
        assert_eq!(
            chase_at(&p, 100, chase_op(base, 10)),
            (base + SLAB - 10, vec![1, 2, 3])
        );
        // A cycle ends at the hop limit.
        node(&p, 1, 40, base + 100, 3);
        let (next, tags) = chase_at(&p, 100, chase_op(base, 7));
        assert_eq!((next, tags), (base + 2000, vec![1, 2, 3, 1, 2, 3, 1]));
        // A slab at region offset 0 and a next offset at the node's end.
        let op = OffloadOp::Chase {
            slab_base: 0,
            next_off: 16,
            node_len: 24,
            hops: 3,
        };
        // Node at 100 holds !1 at byte 16: outside the slab.
        assert_eq!(chase_at(&p, 100, op).0, !1u64);
        // The first node must lie in the slab.
        assert_eq!(
            call(&p, at(1, SLAB - 23), chase_op(base, 1)),
            Err(ErrorCode::OutOfRange)
        );
        assert!(call(&p, at(1, SLAB - 24), chase_op(base, 1)).is_ok());
    }

    #[test]
    fn copies_between_and_within_slabs() {
        let p = pool();
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        p.write(&at(1, 100), &data).unwrap();
        let copy = |from: Target, to: Target, len: u32| {
            call_with(&p, from, OffloadOp::Copy { dest: to, len }, MAX_REPLY)
        };
        assert_eq!(copy(at(1, 100), at(2, 7), 5000), Ok((reply::DONE, vec![])));
        let got = p.read(&at(2, 7), 5000, |b| b.to_vec()).unwrap();
        assert_eq!(got, data);
        // Opposite direction, lower id as destination.
        assert!(copy(at(2, 7), at(1, 20_000), 5000).is_ok());
        assert_eq!(p.read(&at(1, 20_000), 5000, |b| b.to_vec()).unwrap(), data);
        // Overlapping, both directions, like memmove.
        assert!(copy(at(1, 100), at(1, 150), 5000).is_ok());
        assert_eq!(p.read(&at(1, 150), 5000, |b| b.to_vec()).unwrap(), data);
        assert!(copy(at(1, 150), at(1, 120), 5000).is_ok());
        assert_eq!(p.read(&at(1, 120), 5000, |b| b.to_vec()).unwrap(), data);
        // Ranges, keys, slabs, freeze.
        assert_eq!(
            copy(at(1, SLAB - 10), at(2, 0), 11),
            Err(ErrorCode::OutOfRange)
        );
        assert_eq!(
            copy(at(1, 0), at(2, SLAB - 10), 11),
            Err(ErrorCode::OutOfRange)
        );
        assert_eq!(
            copy(at(1, 0), at(1, u64::MAX), 11),
            Err(ErrorCode::OutOfRange)
        );
        let mut bad = at(2, 0);
        bad.key += 1;
        assert_eq!(copy(at(1, 0), bad, 8), Err(ErrorCode::BadCapability));
        assert_eq!(copy(bad, at(1, 0), 8), Err(ErrorCode::BadCapability));
        assert_eq!(copy(at(1, 0), at(9, 0), 8), Err(ErrorCode::UnknownSlab));
        assert_eq!(copy(at(9, 0), at(1, 0), 8), Err(ErrorCode::UnknownSlab));
        assert_eq!(copy(at(1, 0), at(2, 0), 0), Err(ErrorCode::InvalidArgument));
        assert_eq!(
            copy(at(1, 0), at(2, 0), (16 << 20) + 1),
            Err(ErrorCode::InvalidArgument)
        );
        p.set_frozen(2, true).unwrap();
        assert_eq!(copy(at(1, 0), at(2, 0), 8), Err(ErrorCode::SlabFrozen));
        assert_eq!(copy(at(2, 0), at(1, 0), 8), Err(ErrorCode::SlabFrozen));
        assert_eq!(copy(at(2, 0), at(2, 8), 8), Err(ErrorCode::SlabFrozen));
        p.set_frozen(2, false).unwrap();
        // Nothing changed by the refused copies.
        assert_eq!(p.read(&at(2, 7), 5000, |b| b.to_vec()).unwrap(), data);
    }

    #[test]
    fn opposite_copies_do_not_deadlock() {
        let p = std::sync::Arc::new(pool());
        let hs: Vec<_> = [(1, 2), (2, 1), (2, 3), (3, 1), (1, 1)]
            .into_iter()
            .map(|(a, b)| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let r = call_with(
                            &p,
                            at(a, i % 64),
                            OffloadOp::Copy {
                                dest: at(b, 1000 + i % 64),
                                len: 4096,
                            },
                            MAX_REPLY,
                        );
                        assert!(r.is_ok());
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn refusals() {
        use ErrorCode::*;
        let p = pool();
        let agg = |elem, count| OffloadOp::Aggregate { elem, count };
        let filter = |cmp, max_out, out| OffloadOp::Filter {
            elem: elem::U32,
            count: 16,
            cmp,
            operand: 1,
            max_out,
            out,
        };
        let probe =
            |bucket_len, slots, fingerprint, max_buckets, key: &'static [u8]| OffloadOp::Probe {
                bucket_len,
                slots,
                key_len: 4,
                val_len: 2,
                max_buckets,
                fingerprint,
                key,
            };
        let chase = |next_off, node_len, hops| OffloadOp::Chase {
            slab_base: 0,
            next_off,
            node_len,
            hops,
        };
        let too_many = (MAX_OFFLOAD_SCAN / 8 + 1) as u32;
        let mut bad = at(1, 0);
        bad.key = 1;
        // (target, operation, outcome), with 1000 bytes of reply room.
        let cases = [
            // Parameters.
            (at(1, 0), agg(0, 1), Some(InvalidArgument)),
            (at(1, 0), agg(5, 1), Some(InvalidArgument)),
            (at(1, 0), agg(elem::U64, 0), Some(InvalidArgument)),
            (at(1, 0), agg(elem::U64, too_many), Some(InvalidArgument)),
            (at(1, 0), filter(0, 1, 1), Some(InvalidArgument)),
            (at(1, 0), filter(7, 1, 1), Some(InvalidArgument)),
            (at(1, 0), filter(1, 1, 3), Some(InvalidArgument)),
            (at(1, 0), filter(1, 0, 1), Some(InvalidArgument)),
            (at(1, 0), filter(1, 0, 0), None),
            (at(1, 0), probe(64, 4, 2, 1, b"abcd"), None),
            (at(1, 0), probe(31, 4, 2, 1, b"abcd"), Some(InvalidArgument)),
            (at(1, 0), probe(64, 9, 2, 1, b"abcd"), Some(InvalidArgument)),
            (at(1, 0), probe(64, 0, 2, 1, b"abcd"), Some(InvalidArgument)),
            (at(1, 0), probe(64, 4, 1, 1, b"abcd"), Some(InvalidArgument)),
            (at(1, 0), probe(64, 4, 2, 0, b"abcd"), Some(InvalidArgument)),
            (
                at(1, 0),
                probe(64, 4, 2, 1025, b"abcd"),
                Some(InvalidArgument),
            ),
            (at(1, 0), probe(64, 4, 2, 1, b"abc"), Some(InvalidArgument)),
            (
                at(1, 0),
                probe(1 << 20, 4, 2, 17, b"abcd"),
                Some(InvalidArgument),
            ),
            (at(1, 0), chase(0, 7, 1), Some(InvalidArgument)),
            (at(1, 0), chase(1, 8, 1), Some(InvalidArgument)),
            (at(1, 0), chase(0, 8, 0), Some(InvalidArgument)),
            (at(1, 0), chase(0, 8, 4097), Some(InvalidArgument)),
            // Replies that could not fit in a frame.
            (at(1, 0), filter(1, 200, output::INDICES), None),
            (at(1, 0), filter(1, 200, output::VALUES), None),
            (at(1, 0), chase(0, 100, 10), Some(FrameTooLarge)),
            (at(1, 0), chase(0, 99, 10), None),
            (
                at(1, 0),
                OffloadOp::Filter {
                    elem: elem::U64,
                    count: 1000,
                    cmp: 1,
                    operand: 0,
                    max_out: 200,
                    out: output::VALUES,
                },
                Some(FrameTooLarge),
            ),
            (
                at(1, 0),
                OffloadOp::Probe {
                    bucket_len: 2000,
                    slots: 1,
                    key_len: 0,
                    val_len: 997,
                    max_buckets: 1,
                    fingerprint: 2,
                    key: b"",
                },
                Some(FrameTooLarge),
            ),
            // Ranges and alignment.
            (at(1, SLAB - 8), agg(elem::U64, 2), Some(OutOfRange)),
            (at(1, SLAB - 8), agg(elem::U64, 1), None),
            (at(1, u64::MAX - 3), agg(elem::U32, 1), Some(OutOfRange)),
            (at(1, 4), agg(elem::U64, 1), Some(Unaligned)),
            (at(1, 4), agg(elem::I32, 1), None),
            (at(1, 2), filter(1, 1, 1), Some(Unaligned)),
            (at(1, SLAB), probe(64, 4, 2, 1, b"abcd"), Some(OutOfRange)),
            // Slab and key: as for reads.
            (at(9, 0), agg(elem::U64, 1), Some(UnknownSlab)),
            (bad, agg(elem::U64, 1), Some(BadCapability)),
            (bad, chase(0, 8, 1), Some(BadCapability)),
            (bad, probe(64, 4, 2, 1, b"abcd"), Some(BadCapability)),
            (bad, filter(1, 1, 1), Some(BadCapability)),
        ];
        for (at, op, want) in cases {
            let got = call_with(&p, at, op, 1000).err();
            assert_eq!(got, want, "{op:?} at {at:?}");
        }
        // Frozen: refused as reads are, until thawed.
        p.set_frozen(1, true).unwrap();
        assert_eq!(call(&p, at(1, 0), agg(elem::U64, 1)), Err(SlabFrozen));
        assert_eq!(call(&p, at(1, 0), chase(0, 8, 1)), Err(SlabFrozen));
        p.set_frozen(1, false).unwrap();
        assert!(call(&p, at(1, 0), agg(elem::U64, 1)).is_ok());
    }

    #[test]
    fn arbitrary_operations_never_panic() {
        let p = pool();
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        fill_random(&p, 1, &mut rng);
        fill_random(&p, 2, &mut rng);
        let key = [7u8; 64];
        // Offsets near the edges and parameters near their limits.
        let pick = |rng: &mut Rng, edges: &[u64]| -> u64 {
            match rng.below(3) {
                0 => edges[rng.below(edges.len() as u64) as usize],
                1 => rng.below(256),
                _ => rng.next(),
            }
        };
        for _ in 0..20_000 {
            let offset = pick(&mut rng, &[0, 8, SLAB - 8, SLAB - 1, SLAB, u64::MAX]);
            let n = pick(&mut rng, &[0, 1, 4096, 4097, 1 << 21, u32::MAX as u64]);
            let small = rng.next();
            let op = match rng.below(5) {
                0 => OffloadOp::Aggregate {
                    elem: small as u8 % 6,
                    count: n as u32,
                },
                1 => OffloadOp::Filter {
                    elem: small as u8 % 6,
                    count: n as u32,
                    cmp: (small >> 8) as u8 % 8,
                    operand: rng.next(),
                    max_out: pick(&mut rng, &[0, 1, u32::MAX as u64]) as u32,
                    out: (small >> 16) as u8 % 4,
                },
                2 => {
                    let key_len = (small >> 8) as u16 % 9;
                    OffloadOp::Probe {
                        bucket_len: n as u32,
                        slots: small as u8 % 10,
                        key_len,
                        val_len: (small >> 16) as u16 % 300,
                        max_buckets: (small >> 24) as u16 % 1100,
                        fingerprint: (small >> 40) as u8,
                        key: &key[..key_len as usize + (small >> 48) as usize % 2],
                    }
                }
                3 => OffloadOp::Chase {
                    slab_base: pick(&mut rng, &[0, SLAB, u64::MAX - 10]),
                    next_off: (small >> 8) as u16 % 64,
                    node_len: (small >> 16) as u16 % 128,
                    hops: n as u16,
                },
                _ => OffloadOp::Copy {
                    dest: at(1 + small % 4, pick(&mut rng, &[0, SLAB - 8, u64::MAX])),
                    len: n as u32,
                },
            };
            let slab = 1 + rng.below(4);
            match call_with(&p, at(slab, offset), op, MAX_REPLY) {
                Ok((reply::DONE, d)) => assert!(d.is_empty()),
                Ok((_, d)) => {
                    let ok = match op {
                        OffloadOp::Aggregate { .. } => AggregateReply::decode(&d).is_ok(),
                        OffloadOp::Filter { elem, out, .. } => {
                            FilterReply::decode(&d, elem, out).is_ok()
                        }
                        OffloadOp::Probe { .. } => ProbeReply::decode(&d).is_ok(),
                        OffloadOp::Chase { node_len, .. } => {
                            ChaseReply::decode(&d, node_len).is_ok()
                        }
                        OffloadOp::Copy { .. } => false,
                    };
                    assert!(ok, "{op:?} replied {} undecodable bytes", d.len());
                }
                Err(_) => {}
            }
        }
    }
}
