//! Offloaded operations through the region API, against real controller and
//! server processes: every result checked against the same computation on a
//! local copy of the bytes.

mod common;

use std::collections::HashMap;

use common::{Opts, Rng, TestCluster};
use remora_client::offload::{
    self, cmp, elem, output, probe, AggregateReply, ChaseReply, FilterReply, ProbeReply, CHASE_END,
};
use remora_client::{ClientError, OffloadOp, Redundancy, Region, Target};
use remora_proto::ErrorCode;

/// The test cluster's slab size.
const SLAB: u64 = 64 << 10;

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

#[test]
fn aggregates_and_filters_match_a_local_copy() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let size = 4 * SLAB;
    let r = c.alloc_region(size).unwrap();
    let mut rng = Rng(0x5eed_0ff1_0ad5);
    // Small magnitudes of both signs among random words.
    let mut local = vec![0u8; size as usize];
    for w in local.chunks_mut(8) {
        let v = if rng.below(2) == 0 {
            rng.next()
        } else {
            (rng.below(9) as i64 - 4) as u64
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
    r.write(0, &local).unwrap();
    let elems = [elem::U64, elem::I64, elem::U32, elem::I32];
    for round in 0..120 {
        let elem = elems[round % 4];
        let w = elem::width(elem).unwrap();
        let count = 1 + rng.below(SLAB / w - 1);
        // Anywhere in the region, elements aligned, inside one slab.
        let offset = rng.below(4) * SLAB + rng.below((SLAB - count * w) / w + 1) * w;
        let bytes = &local[offset as usize..(offset + count * w) as usize];
        let count = count as u32;

        let op = OffloadOp::Aggregate { elem, count };
        let got = AggregateReply::decode(&r.offload(offset, &op).unwrap()).unwrap();
        assert_eq!(Some(got), offload::aggregate_locally(&op, bytes));

        let i = rng.below(count as u64) as usize * w as usize;
        let out = (round / 4 % 3) as u8;
        let op = OffloadOp::Filter {
            elem,
            count,
            cmp: 1 + rng.below(6) as u8,
            operand: elem::widen(elem, &bytes[i..i + w as usize]).unwrap(),
            max_out: 1 + rng.below(count.min(3000) as u64) as u32,
            out,
        };
        let d = r.offload(offset, &op).unwrap();
        let got = FilterReply::decode(&d, elem, out).unwrap();
        let (scanned, hits) = offload::filter_locally(&op, bytes).unwrap();
        assert_eq!((got.scanned, got.matched as usize), (scanned, hits.len()));
        let items: Vec<u64> = match out {
            output::INDICES => got.indices().map(u64::from).collect(),
            output::VALUES => got.values().collect(),
            _ => Vec::new(),
        };
        let want: Vec<u64> = match out {
            output::INDICES => hits.iter().map(|h| h.0 as u64).collect(),
            output::VALUES => hits.iter().map(|h| h.1).collect(),
            _ => Vec::new(),
        };
        assert_eq!(items, want, "{op:?}");
    }

    // Signed extremes: i32 −1 is all ones when widened, and the minimum.
    let words: Vec<u8> = [-7i32, 3, -1, i32::MIN, i32::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    r.write(SLAB + 400, &words).unwrap();
    let agg = |elem| {
        let d = r
            .offload(SLAB + 400, &OffloadOp::Aggregate { elem, count: 5 })
            .unwrap();
        AggregateReply::decode(&d).unwrap()
    };
    let s = agg(elem::I32);
    assert_eq!(s.min, i32::MIN as i64 as u64);
    assert_eq!(s.max, i32::MAX as u64);
    assert_eq!(s.sum as i64, -7 + 3 - 1 + i32::MIN as i64 + i32::MAX as i64);
    let u = agg(elem::U32);
    assert_eq!((u.min, u.max), (3, u32::MAX as u64));
    let d = r
        .offload(
            SLAB + 400,
            &OffloadOp::Filter {
                elem: elem::I32,
                count: 5,
                cmp: cmp::LT,
                operand: 0,
                max_out: 10,
                out: output::VALUES,
            },
        )
        .unwrap();
    let f = FilterReply::decode(&d, elem::I32, output::VALUES).unwrap();
    let neg: Vec<u64> = [-7i64, -1, i32::MIN as i64]
        .iter()
        .map(|v| *v as u64)
        .collect();
    assert_eq!(f.values().collect::<Vec<_>>(), neg);
    // Each value in the element's own width.
    assert_eq!(f.items().len(), 12);
}

const BUCKET: u64 = 128;
const SLOTS: usize = 6;
const ENTRY: usize = 16;

fn hash(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fingerprint(k: u64) -> u8 {
    2 + (hash(k) >> 56) as u8 % 254
}

/// Looks `key` up in the table of `buckets` buckets at `base`, probing at
/// most `max` buckets per request and wrapping around at the table's end.
/// Returns the value and the requests it took.
fn lookup(r: &Region, base: u64, buckets: u64, key: u64, max: u16) -> (Option<Vec<u8>>, usize) {
    let k = key.to_le_bytes();
    let mut b = hash(key) % buckets;
    let mut seen = 0;
    let mut requests = 0;
    loop {
        let op = OffloadOp::Probe {
            bucket_len: BUCKET as u32,
            slots: SLOTS as u8,
            key_len: 8,
            val_len: 8,
            max_buckets: max.min((buckets - b) as u16),
            fingerprint: fingerprint(key),
            key: &k,
        };
        let d = r.offload(base + b * BUCKET, &op).unwrap();
        requests += 1;
        let p = ProbeReply::decode(&d).unwrap();
        assert!(p.buckets >= 1);
        match p.status {
            probe::FOUND => return (Some(p.value.to_vec()), requests),
            probe::ABSENT => return (None, requests),
            _ => {
                seen += p.buckets as u64;
                assert!(seen <= buckets, "probed the whole table");
                b = (b + p.buckets as u64) % buckets;
            }
        }
    }
}

#[test]
fn probes_find_keys_across_buckets_and_slabs() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = c.alloc_region(4 * SLAB).unwrap();
    // The table fills slabs 1 and 2; crowded, so that chains run through
    // full buckets and across the slab boundary.
    let base = SLAB;
    let buckets = 2 * SLAB / BUCKET;
    let mut table = vec![0u8; (2 * SLAB) as usize];
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut rng = Rng(0xfeed_beef);
    let mut slots_of: HashMap<u64, usize> = HashMap::new();
    while model.len() < (buckets as usize * SLOTS) * 9 / 10 {
        let key = rng.next();
        let mut b = hash(key) % buckets;
        'place: loop {
            let at = (b * BUCKET) as usize;
            for i in 0..SLOTS {
                if table[at + i] == 0 {
                    table[at + i] = fingerprint(key);
                    let e = at + 8 + i * ENTRY;
                    table[e..e + 8].copy_from_slice(&key.to_le_bytes());
                    table[e + 8..e + 16].copy_from_slice(&(key ^ 0xabcd).to_le_bytes());
                    slots_of.insert(key, at + i);
                    break 'place;
                }
            }
            b = (b + 1) % buckets;
        }
        model.insert(key, key ^ 0xabcd);
    }
    // Delete some: their slots are marked deleted, keys left in place.
    let keys: Vec<u64> = model.keys().copied().collect();
    for key in keys.iter().step_by(7) {
        table[slots_of[key]] = offload::fp::DELETED;
        model.remove(key);
    }
    // The last three buckets of slab 1 get no empty slot (their empty
    // ones marked deleted, which changes no lookup's answer): probes run
    // through them into slab 2.
    let last = SLAB / BUCKET - 1;
    for b in last - 2..=last {
        for f in &mut table[(b * BUCKET) as usize..][..SLOTS] {
            if *f == offload::fp::EMPTY {
                *f = offload::fp::DELETED;
            }
        }
    }
    r.write(base, &table).unwrap();

    let mut multi = 0;
    for (i, key) in keys.iter().enumerate() {
        let max = if i.is_multiple_of(3) { 1 } else { 1024 };
        let (got, requests) = lookup(&r, base, buckets, *key, max);
        assert_eq!(
            got.map(|v| u64::from_le_bytes(v.try_into().unwrap())),
            model.get(key).copied(),
            "key {key:x}"
        );
        if requests > 1 {
            multi += 1;
        }
    }
    assert!(multi > 0, "no lookup needed a second request");
    for _ in 0..500 {
        let key = rng.next();
        assert_eq!(lookup(&r, base, buckets, key, 1024).0, None);
    }
    // From the third-last bucket of slab 1, a probe stops at the slab's
    // end, not finished.
    let missing = 0x1234u64.to_le_bytes();
    let op = OffloadOp::Probe {
        bucket_len: BUCKET as u32,
        slots: SLOTS as u8,
        key_len: 8,
        val_len: 8,
        max_buckets: 1024,
        fingerprint: 2,
        key: &missing,
    };
    let d = r.offload(base + (last - 2) * BUCKET, &op).unwrap();
    let p = ProbeReply::decode(&d).unwrap();
    assert_eq!((p.status, p.buckets), (probe::UNFINISHED, 3));
    // A first bucket across the slab boundary is refused before sending.
    let e = r.offload(2 * SLAB - 64, &op).unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument { .. }), "{e}");
}

#[test]
fn chases_follow_lists_slab_by_slab() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let size = 4 * SLAB;
    let r = c.alloc_region(size).unwrap();
    const NODE: u64 = 32;
    // 100 nodes in each slab, in a random order within it.
    let mut rng = Rng(0xc4a5e);
    let mut order = Vec::new();
    for slab in 0..4 {
        let mut spots: Vec<u64> = (0..SLAB / NODE).collect();
        for i in 0..100 {
            let j = i + rng.below(spots.len() as u64 - i as u64) as usize;
            spots.swap(i, j);
            order.push(slab * SLAB + spots[i] * NODE);
        }
    }
    let mut local = vec![0u8; size as usize];
    for (i, at) in order.iter().enumerate() {
        let next = order.get(i + 1).copied().unwrap_or(CHASE_END);
        let n = &mut local[*at as usize..(*at + NODE) as usize];
        n[..8].copy_from_slice(&(i as u64).to_le_bytes());
        n[8..16].copy_from_slice(&next.to_le_bytes());
        n[16..].fill(i as u8);
    }
    r.write(0, &local).unwrap();
    let mut cur = order[0];
    let mut walked = Vec::new();
    let mut requests = 0;
    while cur != CHASE_END {
        let op = OffloadOp::Chase {
            // Set by the client.
            slab_base: 12345,
            next_off: 8,
            node_len: NODE as u16,
            hops: 64,
        };
        let d = r.offload(cur, &op).unwrap();
        requests += 1;
        let reply = ChaseReply::decode(&d, NODE as u16).unwrap();
        assert!(reply.nodes >= 1);
        for (k, n) in reply.iter().enumerate() {
            let i = walked.len();
            let at = order[i] as usize;
            assert_eq!(n, &local[at..at + NODE as usize]);
            // Every node of one reply comes from the slab it started in.
            assert_eq!(order[i] / SLAB, cur / SLAB, "node {k} of a reply");
            walked.push(i);
        }
        if reply.next != CHASE_END && reply.nodes < 64 {
            assert_ne!(reply.next / SLAB, cur / SLAB, "stopped inside the slab");
        }
        cur = reply.next;
    }
    assert_eq!(walked, (0..400).collect::<Vec<_>>());
    // 64 + 36 nodes per slab.
    assert_eq!(requests, 8);
}

#[test]
fn copies_within_a_server_and_refusals() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let size = 6 * SLAB;
    let r = c.alloc_region(size).unwrap();
    let mut rng = Rng(0xc0b1);
    let mut local = rng.bytes(size as usize);
    r.write(0, &local).unwrap();
    let copy = |from: u64, to: u64, len: u32| {
        let dest = Target {
            slab: 0,
            key: 0,
            offset: to,
        };
        r.offload(from, &OffloadOp::Copy { dest, len })
    };
    let apply = |local: &mut Vec<u8>, from: u64, to: u64, len: u64| {
        local.copy_within(from as usize..(from + len) as usize, to as usize);
    };
    // Within a slab: apart, and overlapping both ways.
    for (from, to, len) in [
        (100, 20_000, 5000),
        (100, 150, 9000),
        (30_000, 29_000, 9000),
    ] {
        assert_eq!(copy(from, to, len).unwrap(), Vec::<u8>::new());
        apply(&mut local, from, to, len as u64);
    }
    let map = r.map();
    let server = |i: usize| map.slabs[i].server_id;
    // Six slabs on three servers: two of them share one (placement is
    // random, so which two varies).
    let (a, same) = (0..6)
        .flat_map(|a| (0..6).map(move |b| (a, b)))
        .find(|&(a, b)| a != b && server(a) == server(b))
        .expect("two slabs on one server");
    let other = (0..6)
        .find(|&i| server(i) != server(a))
        .expect("slabs on two servers");
    let (from, to) = (a as u64 * SLAB + 77, same as u64 * SLAB + 1000);
    copy(from, to, 40_000).unwrap();
    apply(&mut local, from, to, 40_000);
    let mut got = vec![0u8; size as usize];
    r.read(0, &mut got).unwrap();
    assert!(got == local, "region differs from the local copy");

    let e = copy(a as u64 * SLAB, other as u64 * SLAB, 10).unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::Unsupported), "{e}");
    let e = copy(0, 2 * SLAB - 5, 10).unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument { .. }), "{e}");
    let e = copy(SLAB - 5, 3 * SLAB, 10).unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument { .. }), "{e}");
    let e = copy(0, size - 5, 10).unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::OutOfRange), "{e}");
    let e = copy(0, 8, 0).unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidArgument), "{e}");
    r.read(0, &mut got).unwrap();
    assert!(got == local, "a refused copy changed the region");
}

#[test]
fn refusals_and_redundancy() {
    let tc = TestCluster::start(Opts::default());
    let c = tc.client();
    let r = c.alloc_region(2 * SLAB + 1000).unwrap();
    let agg = |elem, count| OffloadOp::Aggregate { elem, count };
    let err = |offset, op: OffloadOp<'_>| r.offload(offset, &op).unwrap_err();
    // Checked by the client.
    let e = err(0, agg(9, 1));
    assert!(matches!(e, ClientError::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("element type"), "{e}");
    let e = err(0, agg(elem::U64, (2 << 20) + 1));
    assert_eq!(code(&e), Some(ErrorCode::InvalidArgument), "{e}");
    let e = err(SLAB - 8, agg(elem::U64, 2));
    assert!(e.to_string().contains("slab boundary"), "{e}");
    assert_eq!(code(&e), Some(ErrorCode::InvalidArgument));
    let e = err(2 * SLAB + 1000 - 8, agg(elem::U64, 2));
    assert_eq!(code(&e), Some(ErrorCode::OutOfRange), "{e}");
    let e = err(
        0,
        OffloadOp::Filter {
            elem: elem::U32,
            count: 4,
            cmp: 0,
            operand: 0,
            max_out: 1,
            out: output::INDICES,
        },
    );
    assert_eq!(code(&e), Some(ErrorCode::InvalidArgument), "{e}");
    // Checked by the server.
    let e = err(4, agg(elem::U64, 1));
    assert!(
        matches!(
            e,
            ClientError::Remote {
                code: ErrorCode::Unaligned,
                ..
            }
        ),
        "{e}"
    );
    let big_chase = OffloadOp::Chase {
        slab_base: 0,
        next_off: 0,
        node_len: 4096,
        hops: 4096,
    };
    let e = err(0, big_chase);
    assert!(
        matches!(
            e,
            ClientError::Remote {
                code: ErrorCode::FrameTooLarge,
                ..
            }
        ),
        "{e}"
    );
    // The last, partial slab: bytes past the region's end are refused even
    // though the slab holds them.
    assert!(r.offload(2 * SLAB + 992, &agg(elem::U64, 1)).is_ok());
    let e = err(2 * SLAB + 1000, agg(elem::U64, 1));
    assert_eq!(code(&e), Some(ErrorCode::OutOfRange), "{e}");

    // A moved slab: the stale map is refreshed and the operation retried.
    r.write(SLAB, &5u64.to_le_bytes()).unwrap();
    let before = r.map().slabs[1].slab;
    c.move_slab(r.id(), 1, None).unwrap();
    let d = r.offload(SLAB, &agg(elem::U64, 1)).unwrap();
    assert_eq!(AggregateReply::decode(&d).unwrap().sum, 5);
    assert_ne!(r.map().slabs[1].slab, before);

    // Replicated: read-only operations go to a copy; copies are refused.
    let rep = c
        .alloc_with(2 * SLAB, None, Redundancy::Replicate(2))
        .unwrap();
    let words: Vec<u8> = (1..=100u64).flat_map(|v| v.to_le_bytes()).collect();
    rep.write(SLAB + 8, &words).unwrap();
    let d = rep.offload(SLAB + 8, &agg(elem::U64, 100)).unwrap();
    assert_eq!(AggregateReply::decode(&d).unwrap().sum, 5050);
    let dest = Target {
        slab: 0,
        key: 0,
        offset: 0,
    };
    let e = rep
        .offload(SLAB, &OffloadOp::Copy { dest, len: 8 })
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::Unsupported), "{e}");
    // Erasure-coded: refused.
    let ec = c
        .alloc_with(2 * SLAB, None, Redundancy::Erasure { data: 2, parity: 1 })
        .unwrap();
    let e = ec.offload(0, &agg(elem::U64, 1)).unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::Unsupported), "{e}");
}
