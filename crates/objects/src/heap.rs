//! Far memory for objects: regions taken from the cluster on demand and cut
//! into objects by a bump pointer with exact-size free lists.
//!
//! A far address packs the region's index (high 16 bits) and the byte offset
//! inside it (low 48 bits), so a list node can hold the address of the next
//! node and the memory server can follow it. An object no larger than a slab
//! never straddles a slab boundary: offloaded operations run inside one slab.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use remora_client::{Cluster, Region};

use crate::{ObjError, Result};

/// Bits of a far address that hold the offset.
pub const OFFSET_BITS: u32 = 48;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;

/// A packed far address: region index and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FarAddr(pub u64);

impl FarAddr {
    /// Packs a region index and an offset.
    pub fn new(region: usize, offset: u64) -> FarAddr {
        FarAddr(((region as u64) << OFFSET_BITS) | offset)
    }
    /// The region's index in the heap.
    pub fn region(self) -> usize {
        (self.0 >> OFFSET_BITS) as usize
    }
    /// The byte offset inside the region.
    pub fn offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
}

#[derive(Debug)]
struct State {
    /// Region being cut, and the first free byte in it.
    current: Option<usize>,
    bump: u64,
    /// Freed objects by (length, alignment).
    free: HashMap<(u64, u64), Vec<FarAddr>>,
    /// Bytes handed out and not freed.
    used: u64,
}

/// The far heap of one object cache.
#[derive(Debug)]
pub struct FarHeap {
    cluster: Cluster,
    region_size: u64,
    regions: RwLock<Vec<Arc<Region>>>,
    state: Mutex<State>,
}

impl FarHeap {
    /// A heap that takes regions of `region_size` bytes from `cluster`.
    pub fn new(cluster: Cluster, region_size: u64) -> FarHeap {
        FarHeap {
            cluster,
            region_size,
            regions: RwLock::new(Vec::new()),
            state: Mutex::new(State {
                current: None,
                bump: 0,
                free: HashMap::new(),
                used: 0,
            }),
        }
    }

    /// The cluster the heap allocates from.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The region with index `i`.
    pub fn region(&self, i: usize) -> Arc<Region> {
        self.regions.read()[i].clone()
    }

    /// Bytes of objects allocated and not freed.
    pub fn used(&self) -> u64 {
        self.state.lock().used
    }

    /// Bytes of regions held.
    pub fn reserved(&self) -> u64 {
        self.regions.read().iter().map(|r| r.size()).sum()
    }

    fn add_region(&self, size: u64) -> Result<usize> {
        let mut regions = self.regions.write();
        if regions.len() >= 1 << (64 - OFFSET_BITS) {
            return Err(ObjError::InvalidArgument(
                "far heap has the most regions it can address".into(),
            ));
        }
        let r = self.cluster.alloc_region(size)?;
        regions.push(Arc::new(r));
        Ok(regions.len() - 1)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two). Objects up
    /// to a slab in size do not straddle slab boundaries.
    pub fn alloc(&self, len: u64, align: u64) -> Result<FarAddr> {
        if len == 0 || !align.is_power_of_two() {
            return Err(ObjError::InvalidArgument(format!(
                "far allocation of {len} bytes aligned to {align}"
            )));
        }
        let mut st = self.state.lock();
        if let Some(a) = st.free.get_mut(&(len, align)).and_then(|v| v.pop()) {
            st.used += len;
            return Ok(a);
        }
        if len > self.region_size {
            drop(st);
            let i = self.add_region(len)?;
            self.state.lock().used += len;
            return Ok(FarAddr::new(i, 0));
        }
        loop {
            if let Some(cur) = st.current {
                let slab = self.regions.read()[cur].slab_size();
                let mut off = st.bump.next_multiple_of(align);
                if len <= slab && off / slab != (off + len - 1) / slab {
                    off = off.next_multiple_of(slab);
                }
                if off + len <= self.region_size {
                    st.bump = off + len;
                    st.used += len;
                    return Ok(FarAddr::new(cur, off));
                }
            }
            let i = self.add_region(self.region_size)?;
            st.current = Some(i);
            st.bump = 0;
        }
    }

    /// The cluster's slab size (taking a first region if none is held).
    fn slab_size(&self) -> Result<u64> {
        if let Some(r) = self.regions.read().first() {
            return Ok(r.slab_size());
        }
        let mut st = self.state.lock();
        if st.current.is_none() {
            let i = self.add_region(self.region_size)?;
            st.current = Some(i);
            st.bump = 0;
        }
        drop(st);
        Ok(self.regions.read()[0].slab_size())
    }

    /// Allocates `count` consecutive pieces of `len` bytes, in runs that
    /// each lie inside one slab (pieces larger than a slab: one per run):
    /// returns each run's address and number of pieces.
    pub fn alloc_runs(&self, len: u64, count: u64) -> Result<Vec<(FarAddr, u64)>> {
        const RUN_BYTES: u64 = 64 << 10;
        if len == 0 || len > RUN_BYTES {
            return Err(ObjError::InvalidArgument(format!(
                "run pieces of {len} bytes (1 to {RUN_BYTES})"
            )));
        }
        // A run no larger than a slab is placed inside one.
        let per = (RUN_BYTES.min(self.slab_size()?) / len).max(1);
        let mut runs = Vec::new();
        let mut left = count;
        while left > 0 {
            let n = per.min(left);
            match self.alloc(n * len, 8) {
                Ok(a) => runs.push((a, n)),
                Err(e) => {
                    for (a, n) in runs {
                        self.free(a, n * len, 8);
                    }
                    return Err(e);
                }
            }
            left -= n;
        }
        Ok(runs)
    }

    /// Returns an object's far memory for reuse by objects of the same
    /// length and alignment.
    pub fn free(&self, at: FarAddr, len: u64, align: u64) {
        let mut st = self.state.lock();
        st.used -= len;
        st.free.entry((len, align)).or_default().push(at);
    }

    /// Releases every region (the cache is going away).
    pub fn release(&self) {
        let regions = std::mem::take(&mut *self.regions.write());
        for r in regions {
            if let Err(e) = self.cluster.free_region(r.id()) {
                tracing::warn!(region = r.id(), "freeing a far-object region: {e}");
            }
        }
    }
}
