//! Key-value store: 90% GET, 10% SET, Zipfian keys, 32-byte values.
//!
//! The operations are generated before the timed phase from the seed, so
//! every interface and every peer runs the same sequence. A value carries
//! its key, the version that wrote it and a check word; every GET checks
//! all three, and the digest folds the versions GETs returned.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytemuck::{Pod, Zeroable};
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};
use remora_client::Cluster;
use remora_objects::{FarHashMap, ObjectCache};

use super::{check, fold, mix, scaled, Kind, Mem, Outcome};

/// Bytes of a value.
pub const VALUE_SIZE: usize = 32;

/// One in this many operations is timed for the latency percentiles.
pub const LAT_SAMPLE: u64 = 16;

/// Sizes of the key-value workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvParams {
    /// Keys loaded before the timed phase.
    pub keys: u64,
    /// Operations in the timed phase.
    pub ops: u64,
    /// Zipf exponent of the key distribution.
    pub skew: f64,
    /// Percent of operations that are GETs.
    pub get_percent: u32,
    /// Seed of keys and operations.
    pub seed: u64,
}

impl KvParams {
    /// 1M keys and 200k operations at scale 1.
    pub fn new(skew: f64, scale: f64, seed: u64) -> KvParams {
        KvParams {
            keys: scaled(1 << 20, scale, 1024),
            ops: scaled(200_000, scale, 10_000),
            skew,
            get_percent: 90,
            seed,
        }
    }

    /// Bytes of the store's data as the all-local store holds it: std's
    /// `HashMap` sized for the keys (a power-of-two table at most 7/8
    /// full, an entry and a control byte per bucket).
    pub fn footprint(&self) -> u64 {
        let buckets = (self.keys * 8 / 7).next_power_of_two();
        buckets * (8 + VALUE_SIZE as u64 + 1)
    }

    /// The key of popularity rank `rank` (0 is the hottest). Ranks are
    /// scattered over the key space so that hot keys are not neighbours.
    pub fn key(&self, rank: u64) -> u64 {
        mix(rank ^ mix(self.seed)) | 1
    }

    /// The value a key holds at `version` (0: as loaded).
    pub fn value(&self, key: u64, version: u64) -> Value {
        Value {
            key,
            version,
            check: mix(key ^ version.rotate_left(17) ^ 0x5eed),
            fill: !key,
        }
    }

    /// The operations of the timed phase.
    pub fn ops(&self) -> Vec<Op> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed ^ 0x6b76));
        let zipf = Zipf::new(self.keys, self.skew).expect("keys > 0 and skew > 0");
        let mut pick = super::Rng::new(self.seed, 0x6f70);
        (0..self.ops)
            .map(|i| {
                let rank = zipf.sample(&mut rng) as u64 - 1;
                let key = self.key(rank);
                if pick.below(100) < self.get_percent as u64 {
                    Op::Get(key)
                } else {
                    Op::Set(key, i + 1)
                }
            })
            .collect()
    }

    /// Checks a value a GET of `key` returned; returns its version.
    pub fn check_value(&self, key: u64, v: Option<&Value>) -> Result<u64> {
        let Some(v) = v else {
            bail!("result check failed: GET of loaded key {key:#x} found nothing");
        };
        check(v.key == key && *v == self.value(key, v.version), || {
            format!("GET of key {key:#x} returned a corrupt value {v:?}")
        })?;
        Ok(v.version)
    }
}

/// A stored value: 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Value {
    /// The key it belongs to.
    pub key: u64,
    /// The operation that wrote it (0: loaded).
    pub version: u64,
    /// Check word over key and version.
    pub check: u64,
    /// Filler to the value size.
    pub fill: u64,
}

/// One operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read a key.
    Get(u64),
    /// Write a key with a new version.
    Set(u64, u64),
}

/// A store the workload runs against.
pub trait Store {
    /// Loads or overwrites a key.
    fn set(&mut self, key: u64, v: &Value) -> Result<()>;
    /// Reads a key.
    fn get(&mut self, key: u64) -> Result<Option<Value>>;
    /// Loads `entries` (keys not yet in the store), by default one SET
    /// each.
    fn load(&mut self, entries: &mut dyn Iterator<Item = (u64, Value)>) -> Result<()> {
        for (k, v) in entries {
            self.set(k, &v)?;
        }
        Ok(())
    }
    /// Bytes this store has moved, if it counts them itself.
    fn bytes_moved(&self) -> Option<u64> {
        None
    }
}

/// Loads every key, then runs the operations, timing one in
/// [`LAT_SAMPLE`]. `corrupt` damages a loaded value that a GET reads (the
/// check must catch it).
pub fn run_store(p: &KvParams, store: &mut dyn Store, corrupt: bool) -> Result<Outcome> {
    run_store_in(p, store, corrupt, &Mem::plain())
}

/// [`run_store`] with the timed phase metered in `mem` (its budget
/// applied, its bytes counted).
pub fn run_store_in(
    p: &KvParams,
    store: &mut dyn Store,
    corrupt: bool,
    mem: &Mem,
) -> Result<Outcome> {
    store.load(&mut (0..p.keys).map(|rank| {
        let key = p.key(rank);
        (key, p.value(key, 0))
    }))?;
    // The request stream is the workload's input, not its data: it stays
    // in local memory in every interface (outside the far heap).
    let ops = remora_paging::heap::as_internal(|| p.ops());
    if corrupt {
        // Damage the key the first GET reads (no SET reaches it before).
        if let Some(Op::Get(key)) = ops.iter().find(|o| matches!(o, Op::Get(_))) {
            let mut v = p.value(*key, 0);
            v.check ^= 1;
            store.set(*key, &v)?;
        }
    }
    let mut lat = Vec::with_capacity((ops.len() as u64 / LAT_SAMPLE + 1) as usize);
    let mut digest = 0u64;
    let b0 = store.bytes_moved();
    let m = mem.meter()?;
    for (i, op) in ops.iter().enumerate() {
        let t0 = (i as u64).is_multiple_of(LAT_SAMPLE).then(Instant::now);
        match *op {
            Op::Get(key) => {
                let v = store.get(key)?;
                let version = p.check_value(key, v.as_ref())?;
                digest = fold(digest, version);
            }
            Op::Set(key, version) => store.set(key, &p.value(key, version))?,
        }
        if let Some(t0) = t0 {
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (secs, mut bytes_moved) = m.stop()?;
    if let (Some(a), Some(b)) = (b0, store.bytes_moved()) {
        bytes_moved = Some(b - a);
    }
    Ok(Outcome {
        secs,
        ops: p.ops,
        digest,
        lat_us: lat,
        bytes_moved,
    })
}

/// Runs the workload with Zipf exponent `skew` in `mem`.
pub fn run(mem: &Mem, skew: f64, scale: f64, seed: u64, corrupt: bool) -> Result<Outcome> {
    let p = KvParams::new(skew, scale, seed);
    match &mem.kind {
        Kind::Plain => {
            let mut s = PlainStore(HashMap::with_capacity(p.keys as usize));
            run_store_in(&p, &mut s, corrupt, mem)
        }
        Kind::Objects { cache, offload, .. } => {
            let mut s = ObjectStore::new(cache, &p, *offload)?;
            run_store_in(&p, &mut s, corrupt, mem)
        }
        Kind::Regions(cluster) => {
            let mut s = RegionStore::new(cluster, &p)?;
            run_store_in(&p, &mut s, corrupt, mem)
        }
    }
}

/// std's `HashMap` (all-local, paging, zram).
#[derive(Debug)]
pub struct PlainStore(pub HashMap<u64, Value>);

impl Store for PlainStore {
    fn set(&mut self, key: u64, v: &Value) -> Result<()> {
        self.0.insert(key, *v);
        Ok(())
    }
    fn get(&mut self, key: u64) -> Result<Option<Value>> {
        Ok(self.0.get(&key).copied())
    }
}

/// `FarHashMap`, GETs fetched into the cache or probed at the server.
#[derive(Debug)]
pub struct ObjectStore {
    map: FarHashMap<u64, Value>,
    offload: bool,
}

impl ObjectStore {
    /// A map sized for the workload's keys.
    pub fn new(cache: &ObjectCache, p: &KvParams, offload: bool) -> Result<ObjectStore> {
        Ok(ObjectStore {
            map: FarHashMap::with_capacity(cache, p.keys as usize)?,
            offload,
        })
    }
}

impl Store for ObjectStore {
    fn set(&mut self, key: u64, v: &Value) -> Result<()> {
        self.map.insert(key, *v)?;
        Ok(())
    }
    fn get(&mut self, key: u64) -> Result<Option<Value>> {
        Ok(if self.offload {
            self.map.get_offloaded(&key)?
        } else {
            self.map.get(&key)?
        })
    }
}

/// A table in a region, no local cache: open addressing over 64-byte
/// slots (key, then value); a GET or SET reads one slot, or a few where
/// keys collide, and a SET writes one.
#[derive(Debug)]
pub struct RegionStore {
    region: remora_client::Region,
    slots: u64,
    /// Bytes moved by reads and writes.
    pub bytes: u64,
}

const SLOT: u64 = 64;

impl RegionStore {
    /// A table at 7/8 load for the workload's keys.
    pub fn new(cluster: &Cluster, p: &KvParams) -> Result<RegionStore> {
        let slots = (p.keys * 8 / 7 + 1).next_power_of_two();
        let region = cluster
            .alloc_region(slots * SLOT)
            .context("allocating the key-value region")?;
        Ok(RegionStore {
            region,
            slots,
            bytes: 0,
        })
    }

    /// The slot holding `key` or the empty slot where it goes.
    fn find(&mut self, key: u64) -> Result<(u64, [u8; SLOT as usize])> {
        let mut s = mix(key) & (self.slots - 1);
        for _ in 0..self.slots {
            let mut buf = [0u8; SLOT as usize];
            self.region.read(s * SLOT, &mut buf)?;
            self.bytes += SLOT;
            let k = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            if k == key || k == 0 {
                return Ok((s, buf));
            }
            s = (s + 1) & (self.slots - 1);
        }
        bail!("the key-value region is full")
    }
}

impl Store for RegionStore {
    fn set(&mut self, key: u64, v: &Value) -> Result<()> {
        let (s, _) = self.find(key)?;
        let mut buf = [0u8; 8 + VALUE_SIZE];
        buf[..8].copy_from_slice(&key.to_le_bytes());
        buf[8..].copy_from_slice(bytemuck::bytes_of(v));
        self.region.write(s * SLOT, &buf)?;
        self.bytes += buf.len() as u64;
        Ok(())
    }
    fn get(&mut self, key: u64) -> Result<Option<Value>> {
        let (_, buf) = self.find(key)?;
        let k = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        if k != key {
            return Ok(None);
        }
        Ok(Some(bytemuck::pod_read_unaligned(&buf[8..8 + VALUE_SIZE])))
    }
    fn bytes_moved(&self) -> Option<u64> {
        Some(self.bytes)
    }

    /// Builds the table locally and writes it in 1 MiB pieces.
    fn load(&mut self, entries: &mut dyn Iterator<Item = (u64, Value)>) -> Result<()> {
        let mut table = vec![0u8; (self.slots * SLOT) as usize];
        for (key, v) in entries {
            let mut s = mix(key) & (self.slots - 1);
            loop {
                let at = (s * SLOT) as usize;
                let k = u64::from_le_bytes(table[at..at + 8].try_into().expect("8 bytes"));
                if k == 0 || k == key {
                    table[at..at + 8].copy_from_slice(&key.to_le_bytes());
                    table[at + 8..at + 8 + VALUE_SIZE].copy_from_slice(bytemuck::bytes_of(&v));
                    break;
                }
                s = (s + 1) & (self.slots - 1);
            }
        }
        for (i, piece) in table.chunks(1 << 20).enumerate() {
            self.region.write((i << 20) as u64, piece)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_is_caught() {
        let p = KvParams::new(0.99, 0.001, 7);
        let mut s = PlainStore(HashMap::new());
        assert!(run_store(&p, &mut s, false).is_ok());
        let mut s = PlainStore(HashMap::new());
        let e = run_store(&p, &mut s, true).unwrap_err();
        assert!(e.to_string().contains("result check failed"), "{e:#}");
    }

    #[test]
    fn same_ops_same_digest() {
        let p = KvParams::new(0.6, 0.001, 3);
        let a = run_store(&p, &mut PlainStore(HashMap::new()), false).unwrap();
        let b = run_store(&p, &mut PlainStore(HashMap::new()), false).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, 0);
        let q = KvParams { seed: 4, ..p };
        let c = run_store(&q, &mut PlainStore(HashMap::new()), false).unwrap();
        assert_ne!(a.digest, c.digest);
    }
}
