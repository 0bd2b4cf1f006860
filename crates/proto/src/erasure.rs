//! Reed–Solomon coding of erasure-coded regions, and the stripe layout it
//! implies.
//!
//! A stripe is `k` data slabs and `m` parity slabs. Byte `p` of parity slab
//! `j` is a fixed linear combination of byte `p`'s neighbourhood in the data
//! slabs: the codec (`reed-solomon-simd`, a Leopard-style GF(2^16) code)
//! pairs bytes into 16-bit symbols inside each 64-byte block, and encodes
//! every symbol position independently. So any 64-byte-aligned range of a
//! stripe can be encoded, decoded or updated on its own, and the parity of
//! a range is unchanged outside the 64-byte blocks it touches. Ranges given
//! to this module must therefore start and end on [`BLOCK`] boundaries
//! (see [`align`]).
//!
//! Because the code is linear over a field of characteristic 2, the parity
//! of `old ^ new` is `parity(old) ^ parity(new)`: a write to one data slab
//! updates each parity slab by XOR-ing in [`Codec::parity_delta`] of the
//! change, whatever the other data slabs hold. Concurrent writers to
//! different slabs of a stripe therefore commute.
//!
//! A stripe at the end of a region may have fewer than `k` data slabs; the
//! missing ones count as zeros.

/// Alignment of every coded range, in bytes.
pub const BLOCK: u64 = 64;

/// Widens `[offset, offset + len)` to [`BLOCK`] boundaries, clipped to `limit`
/// (a slab size, itself a multiple of [`BLOCK`]).
pub fn align(offset: u64, len: u64, limit: u64) -> (u64, u64) {
    let a = offset - offset % BLOCK;
    let b = (offset + len).div_ceil(BLOCK) * BLOCK;
    (a, b.min(limit))
}

/// A `k + m` Reed–Solomon code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    k: usize,
    m: usize,
}

/// Why coding failed (bad shapes, or too few pieces to decode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("erasure coding: {0}")]
pub struct CodingError(String);

fn err(e: impl std::fmt::Display) -> CodingError {
    CodingError(e.to_string())
}

impl Codec {
    /// A code with `k` data and `m` parity pieces.
    pub fn new(k: usize, m: usize) -> Result<Self, CodingError> {
        if k == 0 || m == 0 || !reed_solomon_simd::ReedSolomonEncoder::supports(k, m) {
            return Err(err(format!("unsupported code {k}+{m}")));
        }
        Ok(Codec { k, m })
    }

    /// Data pieces.
    pub fn data(&self) -> usize {
        self.k
    }

    /// Parity pieces.
    pub fn parity(&self) -> usize {
        self.m
    }

    fn check_len(len: usize) -> Result<(), CodingError> {
        if len == 0 || !(len as u64).is_multiple_of(BLOCK) {
            return Err(err(format!(
                "range of {len} bytes is not a positive multiple of {BLOCK}"
            )));
        }
        Ok(())
    }

    /// The `m` parity shards of `data` (`None`: a data slab beyond the end
    /// of the region, all zeros). Every shard has the same length.
    pub fn encode(&self, data: &[Option<&[u8]>]) -> Result<Vec<Vec<u8>>, CodingError> {
        let len = data.iter().flatten().map(|d| d.len()).next().unwrap_or(0);
        Self::check_len(len)?;
        if data.len() != self.k || data.iter().flatten().any(|d| d.len() != len) {
            return Err(err("shards of unequal length or wrong count"));
        }
        let zero = vec![0u8; len];
        reed_solomon_simd::encode(self.k, self.m, data.iter().map(|d| d.unwrap_or(&zero)))
            .map_err(err)
    }

    /// What to XOR into each parity shard when data shard `index` changes by
    /// `delta` (old bytes XOR new bytes).
    pub fn parity_delta(&self, index: usize, delta: &[u8]) -> Result<Vec<Vec<u8>>, CodingError> {
        if index >= self.k {
            return Err(err(format!("no data shard {index}")));
        }
        let mut shards: Vec<Option<&[u8]>> = vec![None; self.k];
        shards[index] = Some(delta);
        self.encode(&shards)
    }

    /// Every data shard, restored from those present. `data` has `k`
    /// entries and `parity` `m`; `present` data or parity shards are `Some`,
    /// and `zeros` marks data shards known to be zero (beyond the region's
    /// end), which count as present. At least `k` must be present.
    pub fn reconstruct(
        &self,
        data: &[Option<&[u8]>],
        parity: &[Option<&[u8]>],
        zeros: &[bool],
    ) -> Result<Vec<Vec<u8>>, CodingError> {
        if data.len() != self.k || parity.len() != self.m || zeros.len() != self.k {
            return Err(err("wrong shard count"));
        }
        let len = data
            .iter()
            .chain(parity)
            .flatten()
            .map(|d| d.len())
            .next()
            .unwrap_or(0);
        Self::check_len(len)?;
        if data.iter().chain(parity).flatten().any(|d| d.len() != len) {
            return Err(err("shards of unequal length"));
        }
        let zero = vec![0u8; len];
        let originals: Vec<(usize, &[u8])> = (0..self.k)
            .filter_map(|i| match (data[i], zeros[i]) {
                (Some(d), _) => Some((i, d)),
                (None, true) => Some((i, &zero[..])),
                (None, false) => None,
            })
            .collect();
        let have = originals.len() + parity.iter().flatten().count();
        if have < self.k {
            return Err(err(format!(
                "{have} of {} pieces present, {} needed",
                self.k + self.m,
                self.k
            )));
        }
        let mut out: Vec<Vec<u8>> = originals.iter().map(|_| Vec::new()).collect();
        out.clear();
        out.resize(self.k, Vec::new());
        for (i, d) in &originals {
            out[*i] = d.to_vec();
        }
        if originals.len() < self.k {
            let restored = reed_solomon_simd::decode(
                self.k,
                self.m,
                originals.iter().copied(),
                parity
                    .iter()
                    .enumerate()
                    .filter_map(|(j, p)| p.map(|p| (j, p))),
            )
            .map_err(err)?;
            for (i, d) in restored {
                if let Some(slot) = out.get_mut(i) {
                    *slot = d;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
        a.iter().zip(b).map(|(x, y)| x ^ y).collect()
    }

    #[test]
    fn align_widens_to_blocks() {
        assert_eq!(align(0, 1, 4096), (0, 64));
        assert_eq!(align(63, 2, 4096), (0, 128));
        assert_eq!(align(4090, 6, 4096), (4032, 4096));
        assert_eq!(align(128, 64, 4096), (128, 192));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn ranges_code_independently(seed in any::<u64>(), k in 1usize..6, m in 1usize..4, cut in 1u64..64) {
            let c = Codec::new(k, m).unwrap();
            let len = 4096usize;
            let data: Vec<Vec<u8>> = (0..k)
                .map(|i| (0..len).map(|j| (seed.wrapping_mul(31 + i as u64).wrapping_add(j as u64 * 7) >> 3) as u8).collect())
                .collect();
            let whole = c.encode(&data.iter().map(|d| Some(&d[..])).collect::<Vec<_>>()).unwrap();
            // Encoding two aligned sub-ranges separately gives the same parity.
            let at = (cut * BLOCK) as usize;
            for (a, b) in [(0, at), (at, len)] {
                let part = c.encode(&data.iter().map(|d| Some(&d[a..b])).collect::<Vec<_>>()).unwrap();
                for j in 0..m {
                    prop_assert_eq!(&part[j][..], &whole[j][a..b]);
                }
            }
            // A change to one shard updates parity by XOR of its delta.
            let mut changed = data.clone();
            let d = (seed % k as u64) as usize;
            for (j, b) in changed[d][at - 64..at].iter_mut().enumerate() {
                *b ^= (j as u8).wrapping_mul(3) | 1;
            }
            let delta = xor(&data[d], &changed[d]);
            let upd = c.parity_delta(d, &delta).unwrap();
            let fresh = c.encode(&changed.iter().map(|d| Some(&d[..])).collect::<Vec<_>>()).unwrap();
            for j in 0..m {
                prop_assert_eq!(xor(&whole[j], &upd[j]), fresh[j].clone());
                // Unchanged outside the touched block.
                prop_assert_eq!(&upd[j][..at - 64], &vec![0u8; at - 64][..]);
            }
            // Any m shards may be lost.
            let lost: Vec<usize> = (0..m.min(k)).map(|i| (d + i) % k).collect();
            let ds: Vec<Option<&[u8]>> = (0..k).map(|i| if lost.contains(&i) { None } else { Some(&data[i][..]) }).collect();
            let ps: Vec<Option<&[u8]>> = whole.iter().map(|p| Some(&p[..])).collect();
            let got = c.reconstruct(&ds, &ps, &vec![false; k]).unwrap();
            prop_assert_eq!(got, data.clone());
        }
    }

    #[test]
    fn short_stripe_counts_missing_slabs_as_zero() {
        let c = Codec::new(4, 2).unwrap();
        let a = vec![7u8; 128];
        let b = [9u8; 128];
        let p = c.encode(&[Some(&a[..]), Some(&b[..]), None, None]).unwrap();
        let got = c
            .reconstruct(
                &[None, Some(&b[..]), None, None],
                &[Some(&p[0][..]), None],
                &[false, false, true, true],
            )
            .unwrap();
        assert_eq!(got[0], a);
        assert_eq!(got[2], vec![0u8; 128]);
    }

    #[test]
    fn too_few_pieces_is_an_error() {
        let c = Codec::new(2, 1).unwrap();
        let a = [1u8; 64];
        assert!(c
            .reconstruct(&[Some(&a[..]), None], &[None], &[false, false])
            .is_err());
        assert!(c.encode(&[Some(&a[..10]), None]).is_err());
        assert!(Codec::new(0, 1).is_err());
    }
}
