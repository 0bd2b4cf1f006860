//! Slab placement (sans-IO): which server gets each slab of a new region.
//!
//! Two policies. `p2c` (power of two choices, the default): for each slab,
//! sample two distinct candidate servers at random and take the one with
//! more free slabs; this balances as well as least-loaded in practice but
//! does not herd every concurrent allocation onto the same server.
//! `least-loaded`: always the server with the most free slabs. Both count
//! the slabs already chosen for this region, so a region spreads across
//! servers instead of filling one.

use rand::Rng;

/// Placement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Power of two choices on free memory.
    #[default]
    PowerOfTwo,
    /// Most free memory first.
    LeastLoaded,
}

impl Policy {
    /// The policy's config name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::PowerOfTwo => "p2c",
            Policy::LeastLoaded => "least-loaded",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "p2c" | "power-of-two" | "power-of-two-choices" => Ok(Policy::PowerOfTwo),
            "least-loaded" => Ok(Policy::LeastLoaded),
            other => Err(format!(
                "unknown placement policy {other:?} (p2c, least-loaded)"
            )),
        }
    }
}

/// A server that may receive slabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Server id.
    pub id: u64,
    /// Free slabs.
    pub free: u64,
}

/// Picks a server for each of `n` slabs; `None` if the candidates lack room.
pub fn place(
    candidates: &[Candidate],
    n: u64,
    policy: Policy,
    rng: &mut impl Rng,
) -> Option<Vec<u64>> {
    place_groups(candidates, n, 1, &[], policy, rng).map(|g| g.into_iter().flatten().collect())
}

/// Picks servers for `groups` groups of `width` slabs each, the slabs of a
/// group on distinct servers (the copies of a slab, or one erasure-coded
/// stripe), none of them in `exclude`. `None` if the candidates lack room
/// or there are fewer than `width` servers with room.
pub fn place_groups(
    candidates: &[Candidate],
    groups: u64,
    width: usize,
    exclude: &[u64],
    policy: Policy,
    rng: &mut impl Rng,
) -> Option<Vec<Vec<u64>>> {
    let total = candidates
        .iter()
        .fold(0u64, |a, c| a.saturating_add(c.free));
    if total < groups.saturating_mul(width as u64) {
        return None;
    }
    let mut free: Vec<Candidate> = candidates
        .iter()
        .copied()
        .filter(|c| c.free > 0 && !exclude.contains(&c.id))
        .collect();
    let mut out = Vec::with_capacity(groups as usize);
    let mut eligible: Vec<usize> = Vec::with_capacity(free.len());
    for _ in 0..groups {
        let mut group: Vec<u64> = Vec::with_capacity(width);
        for _ in 0..width {
            eligible.clear();
            eligible.extend((0..free.len()).filter(|&i| !group.contains(&free[i].id)));
            let i = match policy {
                Policy::LeastLoaded => *eligible
                    .iter()
                    .max_by_key(|&&i| (free[i].free, std::cmp::Reverse(free[i].id)))?,
                Policy::PowerOfTwo => match eligible.len() {
                    0 => return None,
                    1 => eligible[0],
                    n => {
                        let a = rng.gen_range(0..n);
                        let mut b = rng.gen_range(0..n - 1);
                        if b >= a {
                            b += 1;
                        }
                        let (a, b) = (eligible[a], eligible[b]);
                        if free[a].free >= free[b].free {
                            a
                        } else {
                            b
                        }
                    }
                },
            };
            group.push(free[i].id);
            free[i].free -= 1;
            if free[i].free == 0 {
                free.swap_remove(i);
            }
        }
        out.push(group);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    fn counts(v: &[u64]) -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for &s in v {
            *m.entry(s).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn spreads_evenly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let c: Vec<_> = (0..4).map(|id| Candidate { id, free: 1000 }).collect();
        for policy in [Policy::PowerOfTwo, Policy::LeastLoaded] {
            let got = place(&c, 400, policy, &mut rng).unwrap();
            for (_, n) in counts(&got) {
                assert!((90..=110).contains(&n), "{policy:?}: {n}");
            }
        }
    }

    #[test]
    fn prefers_free_servers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let c = [
            Candidate { id: 1, free: 10 },
            Candidate { id: 2, free: 100 },
        ];
        let got = place(&c, 50, Policy::PowerOfTwo, &mut rng).unwrap();
        assert_eq!(counts(&got).get(&2), Some(&50));
        assert!(place(&c, 111, Policy::PowerOfTwo, &mut rng).is_none());
        assert_eq!(
            place(&c, 110, Policy::LeastLoaded, &mut rng).unwrap().len(),
            110
        );
    }

    #[test]
    fn groups_use_distinct_servers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let c: Vec<_> = (0..6).map(|id| Candidate { id, free: 100 }).collect();
        for policy in [Policy::PowerOfTwo, Policy::LeastLoaded] {
            let g = place_groups(&c, 50, 6, &[], policy, &mut rng).unwrap();
            for grp in &g {
                let mut s = grp.clone();
                s.sort_unstable();
                s.dedup();
                assert_eq!(s.len(), 6, "{policy:?}: {grp:?}");
            }
            assert!(place_groups(&c, 1, 7, &[], policy, &mut rng).is_none());
            let g = place_groups(&c, 3, 2, &[0, 1, 2, 3], policy, &mut rng).unwrap();
            assert!(g.iter().flatten().all(|&id| id >= 4));
        }
    }

    proptest! {
        #[test]
        fn never_overfills(frees in proptest::collection::vec(0u64..20, 0..6), n in 0u64..80, seed in any::<u64>(), ll in any::<bool>()) {
            let c: Vec<_> = frees.iter().enumerate().map(|(i, &f)| Candidate { id: i as u64, free: f }).collect();
            let policy = if ll { Policy::LeastLoaded } else { Policy::PowerOfTwo };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            match place(&c, n, policy, &mut rng) {
                None => prop_assert!(frees.iter().sum::<u64>() < n),
                Some(v) => {
                    prop_assert_eq!(v.len() as u64, n);
                    for (id, k) in counts(&v) {
                        prop_assert!(k <= frees[id as usize]);
                    }
                }
            }
        }
    }
}
