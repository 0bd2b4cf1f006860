//! `FarHashMap<K, V>`: a bucketized open-addressing hash table whose
//! buckets are far objects.
//!
//! A bucket is one object: 8 fingerprint bytes (0 empty, 1 deleted, 2..=255
//! the fingerprint of an occupied slot) followed by 8 entries, each the
//! key's bytes then the value's bytes. A key lives in its home bucket or,
//! if that is full, in the next ones (linear probing over buckets), so a
//! lookup that misses the cache costs one round trip unless its home bucket
//! overflowed. Buckets lie in far memory back to back in runs inside one
//! slab, which is what lets a memory server probe the table itself
//! ([`FarHashMap::get_offloaded`]). Keys compare by their bytes (the server
//! does too).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;

use bytemuck::Pod;
use remora_client::offload::{probe, ProbeReply};
use remora_client::OffloadOp;

use crate::cache::{ObjId, ObjectCache, Residency};
use crate::heap::FarAddr;
use crate::{check_type, ObjError, Result, Scope};

/// Entries per bucket.
pub const SLOTS: usize = 8;
const EMPTY: u8 = 0;
const DELETED: u8 = 1;
/// Occupied slots plus deleted ones, at most this fraction (in eighths) of
/// all slots before the table is rebuilt larger.
const MAX_LOAD_EIGHTHS: usize = 6;

/// A hash map whose entries live in far memory.
#[derive(Debug)]
pub struct FarHashMap<K: Pod + Eq + Hash, V: Pod> {
    cache: ObjectCache,
    /// One object per bucket; `buckets.len()` is a power of two.
    buckets: Vec<ObjId>,
    /// Far runs of buckets: (first bucket index, address, buckets).
    runs: Vec<(usize, FarAddr, usize)>,
    len: usize,
    deleted: usize,
    hasher: RandomState,
    _kv: PhantomData<(K, V)>,
}

fn entry_len<K, V>() -> usize {
    std::mem::size_of::<K>() + std::mem::size_of::<V>()
}

fn bucket_len<K, V>() -> usize {
    (8 + SLOTS * entry_len::<K, V>()).next_multiple_of(8)
}

/// A bucket's bytes viewed as fingerprints and entries.
struct Bucket<'a, K, V> {
    b: &'a [u8],
    _kv: PhantomData<(K, V)>,
}

impl<'a, K: Pod, V: Pod> Bucket<'a, K, V> {
    fn new(b: &'a [u8]) -> Self {
        Bucket {
            b,
            _kv: PhantomData,
        }
    }
    fn fp(&self, i: usize) -> u8 {
        self.b[i]
    }
    fn key_bytes(&self, i: usize) -> &'a [u8] {
        let at = 8 + i * entry_len::<K, V>();
        &self.b[at..at + std::mem::size_of::<K>()]
    }
    fn value(&self, i: usize) -> V {
        let at = 8 + i * entry_len::<K, V>() + std::mem::size_of::<K>();
        bytemuck::pod_read_unaligned(&self.b[at..at + std::mem::size_of::<V>()])
    }
    /// Slot holding `key`, or whether the probe must stop here (an empty
    /// slot: the key is nowhere further).
    fn find(&self, fp: u8, key: &[u8]) -> std::result::Result<usize, bool> {
        let mut has_empty = false;
        for i in 0..SLOTS {
            let f = self.fp(i);
            if f == fp && self.key_bytes(i) == key {
                return Ok(i);
            }
            has_empty |= f == EMPTY;
        }
        Err(has_empty)
    }
}

fn write_entry<K: Pod, V: Pod>(b: &mut [u8], i: usize, fp: u8, k: &K, v: &V) {
    b[i] = fp;
    let at = 8 + i * entry_len::<K, V>();
    let ks = std::mem::size_of::<K>();
    b[at..at + ks].copy_from_slice(bytemuck::bytes_of(k));
    b[at + ks..at + ks + std::mem::size_of::<V>()].copy_from_slice(bytemuck::bytes_of(v));
}

impl<K: Pod + Eq + Hash, V: Pod> FarHashMap<K, V> {
    /// An empty map with room for about `capacity` entries before it grows.
    pub fn with_capacity(cache: &ObjectCache, capacity: usize) -> Result<Self> {
        check_type::<K>()?;
        if std::mem::size_of::<K>() > u16::MAX as usize
            || std::mem::size_of::<V>() > u16::MAX as usize
            || bucket_len::<K, V>() > 64 << 10
        {
            return Err(ObjError::InvalidArgument(
                "far hash map entries must be under 8 KiB".into(),
            ));
        }
        // A cache holds up to 2^30 objects, a bucket is one.
        let Some(want) = capacity
            .checked_mul(8)
            .and_then(|c| {
                c.div_ceil(MAX_LOAD_EIGHTHS * SLOTS)
                    .max(1)
                    .checked_next_power_of_two()
            })
            .filter(|&n| n <= 1 << 30)
        else {
            return Err(ObjError::InvalidArgument(format!(
                "a far hash map for {capacity} entries needs more buckets than a cache holds"
            )));
        };
        let mut m = FarHashMap {
            cache: cache.clone(),
            buckets: Vec::new(),
            runs: Vec::new(),
            len: 0,
            deleted: 0,
            hasher: RandomState::new(),
            _kv: PhantomData,
        };
        m.allocate(want)?;
        Ok(m)
    }

    /// An empty map.
    pub fn new(cache: &ObjectCache) -> Result<Self> {
        Self::with_capacity(cache, 64)
    }

    fn allocate(&mut self, n: usize) -> Result<()> {
        let blen = bucket_len::<K, V>();
        let runs = self.cache.inner.heap.alloc_runs(blen as u64, n as u64)?;
        let zero = vec![0u8; blen];
        let mut buckets = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(runs.len());
        let mut failed = None;
        'outer: for (i, &(at, count)) in runs.iter().enumerate() {
            starts.push((buckets.len(), at, count as usize));
            for j in 0..count {
                let far = FarAddr(at.0 + j * blen as u64);
                match self.cache.inner.create_at(&zero, far, 8) {
                    Ok(id) => buckets.push(id),
                    Err(e) => {
                        // Give back what no object owns yet.
                        for k in j + 1..count {
                            self.cache.inner.heap.free(
                                FarAddr(at.0 + k * blen as u64),
                                blen as u64,
                                8,
                            );
                        }
                        for &(a, c) in &runs[i + 1..] {
                            self.cache.inner.heap.free(a, c * blen as u64, 8);
                        }
                        failed = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        if let Some(e) = failed {
            for id in buckets {
                self.cache.inner.destroy(id);
            }
            return Err(e);
        }
        for id in std::mem::replace(&mut self.buckets, buckets) {
            self.cache.inner.destroy(id);
        }
        self.runs = starts;
        Ok(())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buckets in the table.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    fn hash(&self, k: &K) -> (usize, u8) {
        let h = self.hasher.hash_one(k);
        let home = (h as usize) & (self.buckets.len() - 1);
        let fp = 2 + ((h >> 56) % 254) as u8;
        (home, fp)
    }

    /// The value of `key`, fetching buckets into the cache.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let (home, fp) = self.hash(key);
        self.get_from(home, fp, key)
    }

    fn get_from(&self, start: usize, fp: u8, key: &K) -> Result<Option<V>> {
        let kb = bytemuck::bytes_of(key);
        let blen = bucket_len::<K, V>();
        let n = self.buckets.len();
        for step in 0..n {
            let b = (start + step) & (n - 1);
            let s = Scope::new();
            let p = self.cache.inner.deref(self.buckets[b])?;
            // SAFETY: resident for the scope; `blen` bytes; no writer
            // while `&self` is borrowed.
            let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), blen) };
            match Bucket::<K, V>::new(bytes).find(fp, kb) {
                Ok(i) => return Ok(Some(Bucket::<K, V>::new(bytes).value(i))),
                Err(true) => return Ok(None),
                Err(false) => {}
            }
            drop(s);
        }
        Ok(None)
    }

    /// The value of `key`, probed at the memory server when its home
    /// bucket is not cached: one request returns just the value, and no
    /// bucket enters the cache. Falls back to [`FarHashMap::get`] when a
    /// bucket on the probe path has changes not yet in far memory, or when
    /// buckets are larger than the cluster's slabs.
    pub fn get_offloaded(&self, key: &K) -> Result<Option<V>> {
        let (home, fp) = self.hash(key);
        if self.cache.inner.residency(self.buckets[home]) == Residency::Local {
            return self.get_from(home, fp, key);
        }
        let n = self.buckets.len();
        let blen = bucket_len::<K, V>();
        let mut b = home;
        let mut probed_total = 0;
        while probed_total < n {
            // The run holding bucket b, and how many buckets follow in it.
            let ri = self.runs.partition_point(|r| r.0 <= b) - 1;
            let (first, at, count) = self.runs[ri];
            let left = (first + count - b).min(n - probed_total).min(1024);
            let far = FarAddr(at.0 + ((b - first) * blen) as u64);
            if blen as u64 > self.cache.inner.heap.region(far.region()).slab_size() {
                // Buckets larger than a slab straddle slab boundaries,
                // which a server cannot probe.
                return self.get_from(home, fp, key);
            }
            let op = OffloadOp::Probe {
                bucket_len: blen as u32,
                slots: SLOTS as u8,
                key_len: std::mem::size_of::<K>() as u16,
                val_len: std::mem::size_of::<V>() as u16,
                max_buckets: left as u16,
                fingerprint: fp,
                key: bytemuck::bytes_of(key),
            };
            let since = self.cache.inner.far_version();
            let reply = self
                .cache
                .inner
                .heap
                .region(far.region())
                .offload(far.offset(), &op)?;
            self.cache.inner.count_offload(reply.len());
            let r = ProbeReply::decode(&reply)
                .map_err(|e| ObjError::BadReply(format!("probe: {e}")))?;
            let probed = r.buckets as usize;
            if probed == 0 || probed > left {
                return Err(ObjError::BadReply(format!("probe of {probed} buckets")));
            }
            // The server saw far bytes; a dirty bucket on the path has
            // newer ones. The flags are read before the version: a flag
            // found clean was cleared after its write-back bumped the
            // version, so that bump is seen below.
            if (b..b + probed).any(|i| self.cache.inner.is_dirty(self.buckets[i & (n - 1)]))
                || self.cache.inner.far_version() != since
            {
                return self.get_from(home, fp, key);
            }
            match r.status {
                probe::FOUND => {
                    let vs = std::mem::size_of::<V>();
                    if r.value.len() != vs {
                        return Err(ObjError::BadReply(format!(
                            "probe found a value of {} bytes, expected {vs}",
                            r.value.len()
                        )));
                    }
                    return Ok(Some(bytemuck::pod_read_unaligned(r.value)));
                }
                probe::ABSENT => return Ok(None),
                _ => {
                    // UNFINISHED (the decoder admits nothing else).
                    probed_total += probed;
                    b = (b + probed) & (n - 1);
                }
            }
        }
        Ok(None)
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Result<Option<V>> {
        if (self.len + self.deleted + 1) * 8 > self.buckets.len() * SLOTS * MAX_LOAD_EIGHTHS {
            let n = if (self.len + 1) * 8 > self.buckets.len() * SLOTS * MAX_LOAD_EIGHTHS / 2 {
                self.buckets.len() * 2
            } else {
                self.buckets.len()
            };
            self.rebuild(n)?;
        }
        let (home, fp) = self.hash(&key);
        let kb = bytemuck::bytes_of(&key);
        let blen = bucket_len::<K, V>();
        let n = self.buckets.len();
        let mut free: Option<(usize, usize)> = None;
        let scope = Scope::new();
        for step in 0..n {
            let b = (home + step) & (n - 1);
            let p = self.cache.inner.deref(self.buckets[b])?;
            // SAFETY: resident for the scope; `&mut self` is exclusive.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), blen) };
            let bucket = Bucket::<K, V>::new(bytes);
            if let Ok(i) = bucket.find(fp, kb) {
                let old = bucket.value(i);
                self.cache.inner.mark_dirty(self.buckets[b]);
                write_entry(bytes, i, fp, &key, &value);
                return Ok(Some(old));
            }
            let mut has_empty = false;
            for (i, &f) in bytes[..SLOTS].iter().enumerate() {
                if (f == EMPTY || f == DELETED) && free.is_none() {
                    free = Some((b, i));
                }
                has_empty |= f == EMPTY;
            }
            if has_empty {
                break;
            }
        }
        let (b, i) = free.ok_or_else(|| ObjError::InvalidArgument("far hash map full".into()))?;
        let p = self.cache.inner.deref(self.buckets[b])?;
        self.cache.inner.mark_dirty(self.buckets[b]);
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), blen) };
        if bytes[i] == DELETED {
            self.deleted -= 1;
        }
        write_entry(bytes, i, fp, &key, &value);
        self.len += 1;
        drop(scope);
        Ok(None)
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Result<Option<V>> {
        let (home, fp) = self.hash(key);
        let kb = bytemuck::bytes_of(key);
        let blen = bucket_len::<K, V>();
        let n = self.buckets.len();
        let _s = Scope::new();
        for step in 0..n {
            let b = (home + step) & (n - 1);
            let p = self.cache.inner.deref(self.buckets[b])?;
            // SAFETY: resident for the scope; `&mut self` is exclusive.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), blen) };
            match Bucket::<K, V>::new(bytes).find(fp, kb) {
                Ok(i) => {
                    let v = Bucket::<K, V>::new(bytes).value(i);
                    self.cache.inner.mark_dirty(self.buckets[b]);
                    bytes[i] = DELETED;
                    self.len -= 1;
                    self.deleted += 1;
                    return Ok(Some(v));
                }
                Err(true) => return Ok(None),
                Err(false) => {}
            }
        }
        Ok(None)
    }

    /// Every entry, in table order.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        let blen = bucket_len::<K, V>();
        let mut out = Vec::with_capacity(self.len);
        // Batches that fit the budget: buckets fetched ahead beyond it
        // would be evicted before their use.
        let window = self.cache.inner.quarter_budget_objects(blen).clamp(1, 64);
        for (j, &id) in self.buckets.iter().enumerate() {
            if j % window == 0 {
                let end = (j + window).min(self.buckets.len());
                self.cache
                    .inner
                    .prefetch(self.buckets[j..end].iter().copied());
            }
            let s = Scope::new();
            let p = self.cache.inner.deref(id)?;
            // SAFETY: resident for the scope.
            let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), blen) };
            let bucket = Bucket::<K, V>::new(bytes);
            for i in 0..SLOTS {
                if bucket.fp(i) >= 2 {
                    let k = bytemuck::pod_read_unaligned(bucket.key_bytes(i));
                    out.push((k, bucket.value(i)));
                }
            }
            drop(s);
        }
        Ok(out)
    }

    /// Moves every entry to a fresh table of `n` buckets (dropping deleted
    /// markers).
    fn rebuild(&mut self, n: usize) -> Result<()> {
        let entries = self.entries()?;
        let mut fresh = FarHashMap::<K, V> {
            cache: self.cache.clone(),
            buckets: Vec::new(),
            runs: Vec::new(),
            len: 0,
            deleted: 0,
            hasher: self.hasher.clone(),
            _kv: PhantomData,
        };
        fresh.allocate(n)?;
        for (k, v) in entries {
            fresh.insert_new(k, v)?;
        }
        std::mem::swap(self, &mut fresh);
        Ok(())
    }

    /// Inserts a key known to be absent into a table with room.
    fn insert_new(&mut self, key: K, value: V) -> Result<()> {
        let (home, fp) = self.hash(&key);
        let blen = bucket_len::<K, V>();
        let n = self.buckets.len();
        let _s = Scope::new();
        for step in 0..n {
            let b = (home + step) & (n - 1);
            let p = self.cache.inner.deref(self.buckets[b])?;
            // SAFETY: resident for the scope; `&mut self` is exclusive.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), blen) };
            if let Some(i) = (0..SLOTS).find(|&i| bytes[i] == EMPTY) {
                self.cache.inner.mark_dirty(self.buckets[b]);
                write_entry(bytes, i, fp, &key, &value);
                self.len += 1;
                return Ok(());
            }
        }
        Err(ObjError::InvalidArgument("far hash map full".into()))
    }

    /// Writes the map's dirty buckets back (they stay cached).
    pub fn flush(&self) -> Result<()> {
        self.cache.inner.flush_ids(&self.buckets)
    }
}

impl<K: Pod + Eq + Hash, V: Pod> Drop for FarHashMap<K, V> {
    fn drop(&mut self) {
        for id in self.buckets.drain(..) {
            self.cache.inner.destroy(id);
        }
    }
}
