//! The slab pool: a server's capacity carved into fixed-size slabs.
//!
//! Concurrency contract: the slab table maps ids to reference-counted slabs
//! behind a reader-writer lock that is held only to look a slab up (an
//! operation clones the slab's handle and lets the table go) or to insert
//! and remove one; nothing else, least of all socket I/O, ever runs under
//! it, so creating or dropping a slab never waits for another slab's
//! operations. Each slab's bytes are behind their own reader-writer lock
//! that reads take shared and writes and atomics take exclusive, so every
//! operation on one slab is linearizable (an atomic never interleaves with a
//! write of the same slab) and reads of one slab run in parallel. Callers
//! must not block on anything but memory while inside a slab's lock (the
//! server sends large reads from slab memory only with non-blocking
//! writes). A dropped slab's memory is freed when the last operation that
//! looked it up before the drop finishes. The number of slabs in use is an
//! atomic counter, so heartbeats and statistics take no lock at all. No
//! `unsafe` is needed.
//!
//! Slab memory comes from a zeroed allocation, which the allocator serves from
//! fresh anonymous pages: capacity is reserved in slab counts, but physical
//! memory is only touched when a slab is written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use remora_proto::data::{ServerStats, Target};
use remora_proto::ErrorCode;

/// One slab: its capability, its owner and its bytes.
#[derive(Debug)]
struct Slab {
    /// The capability key; changed only under the data lock (see
    /// [`SlabPool::rekey`]).
    key: AtomicU64,
    /// The owning tenant's tag (0: unknown).
    owner: u64,
    data: RwLock<SlabData>,
}

impl Slab {
    fn key(&self) -> u64 {
        self.key.load(Ordering::Acquire)
    }
}

/// A slab's bytes, whether it is frozen (being moved or rebuilt), and the
/// erasure-coded writes on it that await their parity updates.
#[derive(Debug)]
struct SlabData {
    bytes: Box<[u8]>,
    frozen: bool,
    /// Swaps by (session, request id): in flight (the bytes they replaced)
    /// or committed (a marker that refuses a late duplicate).
    swaps: HashMap<(u64, u64), SwapRecord>,
    /// Committed markers, oldest first (at most [`MAX_MARKERS`]).
    markers: std::collections::VecDeque<(u64, u64)>,
    /// When expired records were last swept.
    swept: Instant,
    /// Bytes held by records of swaps in flight (at most twice the slab's
    /// size, so a client cannot make the server hold more than that per
    /// slab of its own).
    record_bytes: usize,
}

/// A swap not yet committed.
#[derive(Debug)]
struct SwapRecord {
    offset: u64,
    /// The replaced bytes; `None` once committed (kept until the TTL so
    /// that a late duplicate of the swap is refused, not applied).
    old: Option<Vec<u8>>,
    at: Instant,
}

/// Swaps in flight one slab may hold.
pub const MAX_SWAPS: usize = 4096;
/// Committed swaps one slab remembers (to refuse late duplicates).
pub const MAX_MARKERS: usize = 1024;
/// A swap not committed after this long was abandoned by its client.
pub const SWAP_TTL: Duration = Duration::from_secs(120);

/// Counters shared by all connections.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes served by reads.
    pub bytes_read: AtomicU64,
    /// Bytes received by writes.
    pub bytes_written: AtomicU64,
    /// Data operations executed.
    pub ops: AtomicU64,
}

/// A server's slabs.
#[derive(Debug)]
pub struct SlabPool {
    capacity: u64,
    slab_size: u64,
    total: u64,
    slabs: RwLock<HashMap<u64, Arc<Slab>>>,
    /// Slabs in the table (changed under its write lock, read without it).
    used: AtomicU64,
    /// Operation counters.
    pub counters: Counters,
}

impl SlabPool {
    /// A pool of `capacity / slab_size` slabs.
    pub fn new(capacity: u64, slab_size: u64) -> Self {
        let slab_size = slab_size.max(1);
        SlabPool {
            capacity,
            slab_size,
            total: capacity / slab_size,
            slabs: RwLock::new(HashMap::new()),
            used: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// Bytes per slab.
    pub fn slab_size(&self) -> u64 {
        self.slab_size
    }

    /// Slabs the capacity holds.
    pub fn total_slabs(&self) -> u64 {
        self.total
    }

    /// Slabs in use (no lock: heartbeats and statistics read this).
    pub fn used_slabs(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The slab `id`, looked up under the table lock, which is released at
    /// once.
    fn get(&self, id: u64) -> Result<Arc<Slab>, ErrorCode> {
        self.slabs
            .read()
            .get(&id)
            .cloned()
            .ok_or(ErrorCode::UnknownSlab)
    }

    /// Creates slab `id` with capability `key`, owned by the tenant whose
    /// tag is `owner`.
    pub fn create(&self, id: u64, key: u64, owner: u64) -> Result<(), ErrorCode> {
        if self.slabs.read().contains_key(&id) {
            return Err(ErrorCode::SlabExists);
        }
        if self.used_slabs() >= self.total {
            return Err(ErrorCode::OutOfCapacity);
        }
        let len = usize::try_from(self.slab_size).map_err(|_| ErrorCode::OutOfCapacity)?;
        // A zeroed allocation, made outside the table lock: large ones come
        // straight from fresh anonymous pages, so nothing is touched until
        // written; failure is an error, not an abort.
        let data = bytemuck::allocation::try_zeroed_slice_box::<u8>(len)
            .map_err(|_| ErrorCode::OutOfCapacity)?;
        let slab = Arc::new(Slab {
            key: AtomicU64::new(key),
            owner,
            data: RwLock::new(SlabData {
                bytes: data,
                frozen: false,
                swaps: HashMap::new(),
                markers: Default::default(),
                swept: Instant::now(),
                record_bytes: 0,
            }),
        });
        let mut t = self.slabs.write();
        // Checked again: another creation may have won meanwhile.
        if t.contains_key(&id) {
            return Err(ErrorCode::SlabExists);
        }
        if t.len() as u64 >= self.total {
            return Err(ErrorCode::OutOfCapacity);
        }
        t.insert(id, slab);
        self.used.store(t.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Drops slab `id`; its memory is freed once the operations that
    /// already hold it finish.
    pub fn drop_slab(&self, id: u64) -> Result<(), ErrorCode> {
        let gone = {
            let mut t = self.slabs.write();
            let gone = t.remove(&id);
            self.used.store(t.len() as u64, Ordering::Release);
            gone
        };
        // Freed here, outside the table lock.
        match gone {
            Some(_) => Ok(()),
            None => Err(ErrorCode::UnknownSlab),
        }
    }

    /// The owner tag of slab `id` if `key` is its capability (a connection
    /// presenting it in its handshake is authenticated as that tenant).
    pub fn authenticate(&self, id: u64, key: u64) -> Result<u64, ErrorCode> {
        let slab = self.get(id)?;
        if slab.key() != key {
            return Err(ErrorCode::BadCapability);
        }
        Ok(slab.owner)
    }

    fn range(
        &self,
        slab: &Slab,
        at: &Target,
        len: u64,
    ) -> Result<std::ops::Range<usize>, ErrorCode> {
        if slab.key() != at.key {
            return Err(ErrorCode::BadCapability);
        }
        span(self.slab_size, at.offset, len)
    }

    /// Hands the whole of slab `at.slab` to `f` under its read lock, after
    /// the checks of a read (the slab exists, is not frozen, and `at.key`
    /// is its key); `f` checks its own ranges (see [`span`]). Counts one
    /// operation if `f` succeeds.
    pub fn scan<R>(
        &self,
        at: &Target,
        f: impl FnOnce(&[u8]) -> Result<R, ErrorCode>,
    ) -> Result<R, ErrorCode> {
        let slab = self.get(at.slab)?;
        let data = slab.data.read();
        // Frozen first: while a slab is rekeyed during a rebuild, clients
        // holding either key are told to wait, not that their key is bad.
        if data.frozen {
            return Err(ErrorCode::SlabFrozen);
        }
        if slab.key() != at.key {
            return Err(ErrorCode::BadCapability);
        }
        let r = f(&data.bytes)?;
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// Reads `len` bytes at `at`, handing them to `f`.
    pub fn read<R>(
        &self,
        at: &Target,
        len: u32,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ErrorCode> {
        let r = self.scan(at, |bytes| {
            let r = span(bytes.len() as u64, at.offset, len as u64)?;
            Ok(f(&bytes[r]))
        })?;
        self.counters
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(r)
    }

    /// Copies `len` bytes from `from` to `to`, two slabs of this pool or
    /// one (overlapping ranges behave like `memmove`). The source is
    /// checked as for a read, the destination as for a write; a frozen
    /// slab refuses it.
    pub fn copy(&self, from: &Target, to: &Target, len: u64) -> Result<(), ErrorCode> {
        let src = self.get(from.slab)?;
        let dst = self.get(to.slab)?;
        if from.slab == to.slab {
            let mut data = src.data.write();
            if data.frozen {
                return Err(ErrorCode::SlabFrozen);
            }
            let rs = self.range(&src, from, len)?;
            let rd = self.range(&dst, to, len)?;
            data.bytes.copy_within(rs, rd.start);
        } else {
            // Two slabs are locked in the order of their ids, so that
            // copies in opposite directions cannot wait for each other.
            let (s, mut d) = if from.slab < to.slab {
                let s = src.data.read();
                (s, dst.data.write())
            } else {
                let d = dst.data.write();
                (src.data.read(), d)
            };
            if s.frozen || d.frozen {
                return Err(ErrorCode::SlabFrozen);
            }
            let rs = self.range(&src, from, len)?;
            let rd = self.range(&dst, to, len)?;
            remora_proto::copy::copy(&mut d.bytes[rd], &s.bytes[rs]);
        }
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `bytes` at `at`.
    pub fn write(&self, at: &Target, bytes: &[u8]) -> Result<(), ErrorCode> {
        let slab = self.get(at.slab)?;
        let mut data = slab.data.write();
        if data.frozen {
            return Err(ErrorCode::SlabFrozen);
        }
        let r = self.range(&slab, at, bytes.len() as u64)?;
        remora_proto::copy::copy(&mut data.bytes[r], bytes);
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn atomic(&self, at: &Target, f: impl FnOnce(u64) -> u64) -> Result<u64, ErrorCode> {
        let slab = self.get(at.slab)?;
        let mut data = slab.data.write();
        if data.frozen {
            return Err(ErrorCode::SlabFrozen);
        }
        let r = self.range(&slab, at, 8)?;
        if !at.offset.is_multiple_of(8) {
            return Err(ErrorCode::Unaligned);
        }
        let word = &mut data.bytes[r];
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        let old = u64::from_le_bytes(b);
        word.copy_from_slice(&f(old).to_le_bytes());
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        Ok(old)
    }

    /// Writes `bytes` at `at` and hands the bytes they replaced to `f`, in
    /// one step (erasure-coded writes derive their parity update from it).
    /// With a request id (`rid != 0`) the replaced bytes are kept until
    /// [`SlabPool::commit`]: a resend of the same swap gets them again and
    /// writes nothing (even while the slab is frozen, so that a write in
    /// flight can finish while a rebuild waits for it).
    pub fn swap<R>(
        &self,
        at: &Target,
        session: u64,
        rid: u64,
        bytes: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ErrorCode> {
        let slab = self.get(at.slab)?;
        let mut data = slab.data.write();
        let r = self.range(&slab, at, bytes.len() as u64)?;
        if rid != 0 {
            if let Some(rec) = data.swaps.get(&(session, rid)) {
                return match &rec.old {
                    Some(old) if rec.offset == at.offset && old.len() == bytes.len() => Ok(f(old)),
                    // Committed already, or another request under its id.
                    _ => Err(ErrorCode::InvalidArgument),
                };
            }
        }
        if data.frozen {
            return Err(ErrorCode::SlabFrozen);
        }
        if rid != 0 {
            if data.swept.elapsed() > Duration::from_secs(1) {
                sweep(&mut data);
            }
            if data.record_bytes + bytes.len() > 2 * self.slab_size as usize {
                // Refused, nothing applied: the client retries once the
                // writes in flight on this slab commit.
                return Err(ErrorCode::SlabFrozen);
            }
            // Markers are bounded on their own; only writes in flight count.
            if data.swaps.len() - data.markers.len().min(data.swaps.len()) >= MAX_SWAPS
                && data.swaps.values().filter(|r| r.old.is_some()).count() >= MAX_SWAPS
            {
                return Err(ErrorCode::OutOfCapacity);
            }
            let old = data.bytes[r.clone()].to_vec();
            data.record_bytes += old.len();
            data.swaps.insert(
                (session, rid),
                SwapRecord {
                    offset: at.offset,
                    old: Some(old),
                    at: Instant::now(),
                },
            );
        }
        let out = f(&data.bytes[r.clone()]);
        remora_proto::copy::copy(&mut data.bytes[r], bytes);
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// XORs `bytes` into the slab at `at` (parity updates). Applied even
    /// to a frozen slab: a rebuild freezes a stripe and then waits for the
    /// writes in flight to finish their parity updates.
    pub fn xor(&self, at: &Target, bytes: &[u8]) -> Result<(), ErrorCode> {
        let slab = self.get(at.slab)?;
        let r = self.range(&slab, at, bytes.len() as u64)?;
        let mut data = slab.data.write();
        for (d, s) in data.bytes[r].iter_mut().zip(bytes) {
            *d ^= *s;
        }
        self.counters.ops.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the swap `(session, rid)` on slab `at.slab` (its parity updates
    /// are done); a no-op if it is not in flight.
    ///
    /// Not checked against the slab's key: the (session, request id) pair
    /// names the swap, and a commit that went out just before a rebuild
    /// rekeyed the slab must still end it.
    pub fn commit(&self, at: &Target, session: u64, rid: u64) -> Result<(), ErrorCode> {
        let slab = self.get(at.slab)?;
        let mut data = slab.data.write();
        let data = &mut *data;
        if let Some(rec) = data.swaps.get_mut(&(session, rid)) {
            if let Some(old) = rec.old.take() {
                data.record_bytes -= old.len();
                data.markers.push_back((session, rid));
                while data.markers.len() > MAX_MARKERS {
                    if let Some(k) = data.markers.pop_front() {
                        if data.swaps.get(&k).is_some_and(|r| r.old.is_none()) {
                            data.swaps.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Freezes slab `id`; returns the swaps on it still in flight.
    pub fn freeze(&self, id: u64) -> Result<u64, ErrorCode> {
        let slab = self.get(id)?;
        let mut data = slab.data.write();
        data.frozen = true;
        sweep(&mut data);
        Ok(data.swaps.values().filter(|r| r.old.is_some()).count() as u64)
    }

    /// Compare-and-swap; returns the previous value (equal to `expected` on success).
    pub fn cas(&self, at: &Target, expected: u64, new: u64) -> Result<u64, ErrorCode> {
        self.atomic(at, |old| if old == expected { new } else { old })
    }

    /// Wrapping fetch-and-add; returns the previous value.
    pub fn faa(&self, at: &Target, delta: u64) -> Result<u64, ErrorCode> {
        self.atomic(at, |old| old.wrapping_add(delta))
    }

    /// Copies `len` bytes from `offset` of slab `id` into `out`, whatever
    /// its key or freeze (slab copies and rebuilds).
    pub fn read_admin(
        &self,
        id: u64,
        offset: u64,
        out: &mut Vec<u8>,
        len: usize,
    ) -> Result<(), ErrorCode> {
        let slab = self.get(id)?;
        let at = Target {
            slab: id,
            key: slab.key(),
            offset,
        };
        let r = self.range(&slab, &at, len as u64)?;
        out.clear();
        remora_proto::copy::extend(out, &slab.data.read().bytes[r]);
        Ok(())
    }

    /// Freezes or thaws slab `id`. A frozen slab refuses every data
    /// operation with [`ErrorCode::SlabFrozen`] (nothing applied; only slab
    /// copies read it), so that no client sees or changes it while it moves;
    /// freezing waits for operations already inside the slab.
    pub fn set_frozen(&self, id: u64, frozen: bool) -> Result<(), ErrorCode> {
        let slab = self.get(id)?;
        slab.data.write().frozen = frozen;
        Ok(())
    }

    /// Replaces slab `id`'s capability key (clients holding the old one are
    /// refused with [`ErrorCode::BadCapability`] and fetch the new map).
    ///
    /// Takes only that slab's lock (operations on it finish first), never
    /// the table's.
    pub fn rekey(&self, id: u64, key: u64) -> Result<(), ErrorCode> {
        let slab = self.get(id)?;
        let _quiet = slab.data.write();
        slab.key.store(key, Ordering::Release);
        Ok(())
    }

    /// Drops every slab not in `keep`; returns how many were dropped.
    pub fn retain(&self, keep: &std::collections::HashSet<u64>) -> usize {
        let mut gone = Vec::new();
        {
            let mut t = self.slabs.write();
            t.retain(|id, slab| {
                let k = keep.contains(id);
                if !k {
                    gone.push(slab.clone());
                }
                k
            });
            self.used.store(t.len() as u64, Ordering::Release);
        }
        // Freed here, outside the table lock.
        gone.len()
    }

    /// Up to `max` slab ids greater than `after`, ascending.
    pub fn list(&self, after: u64, max: usize) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .slabs
            .read()
            .keys()
            .copied()
            .filter(|&id| id > after)
            .collect();
        ids.sort_unstable();
        ids.truncate(max);
        ids
    }

    /// A statistics snapshot (connections are counted by the caller).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            capacity: self.capacity,
            slab_size: self.slab_size,
            slabs_total: self.total,
            slabs_used: self.used_slabs(),
            bytes_read: self.counters.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.counters.bytes_written.load(Ordering::Relaxed),
            ops: self.counters.ops.load(Ordering::Relaxed),
            connections: 0,
        }
    }
}

/// The byte range `[offset, offset + len)` of a slab of `slab_len` bytes,
/// or `OutOfRange` if it does not fit.
pub fn span(slab_len: u64, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ErrorCode> {
    match offset.checked_add(len) {
        Some(end) if end <= slab_len => Ok(offset as usize..end as usize),
        _ => Err(ErrorCode::OutOfRange),
    }
}

/// Forgets swap records older than [`SWAP_TTL`].
fn sweep(data: &mut SlabData) {
    data.swaps.retain(|_, rec| rec.at.elapsed() < SWAP_TTL);
    data.record_bytes = data
        .swaps
        .values()
        .filter_map(|r| r.old.as_ref().map(Vec::len))
        .sum();
    data.swept = Instant::now();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(slab: u64, key: u64, offset: u64) -> Target {
        Target { slab, key, offset }
    }

    #[test]
    fn capacity_and_capabilities() {
        let p = SlabPool::new(3 * 4096, 4096);
        assert_eq!(p.total_slabs(), 3);
        for i in 0..3 {
            p.create(i, 100 + i, 0).unwrap();
        }
        assert_eq!(p.create(9, 1, 0), Err(ErrorCode::OutOfCapacity));
        assert_eq!(p.create(0, 1, 0), Err(ErrorCode::SlabExists));
        p.write(&at(1, 101, 10), b"hello").unwrap();
        assert_eq!(
            p.write(&at(1, 102, 10), b"x"),
            Err(ErrorCode::BadCapability)
        );
        assert_eq!(
            p.write(&at(1, 101, 4095), b"xy"),
            Err(ErrorCode::OutOfRange)
        );
        assert_eq!(
            p.write(&at(1, 101, u64::MAX), b"xy"),
            Err(ErrorCode::OutOfRange)
        );
        assert_eq!(p.write(&at(7, 101, 0), b"x"), Err(ErrorCode::UnknownSlab));
        let got = p.read(&at(1, 101, 8), 9, |b| b.to_vec()).unwrap();
        assert_eq!(&got, b"\0\0hello\0\0");
        // Another slab is untouched.
        assert!(p
            .read(&at(2, 102, 0), 4096, |b| b.iter().all(|&x| x == 0))
            .unwrap());
        p.set_frozen(2, true).unwrap();
        assert_eq!(p.write(&at(2, 102, 0), b"x"), Err(ErrorCode::SlabFrozen));
        assert_eq!(p.faa(&at(2, 102, 0), 1), Err(ErrorCode::SlabFrozen));
        assert_eq!(
            p.read(&at(2, 102, 0), 1, |b| b[0]),
            Err(ErrorCode::SlabFrozen)
        );
        let mut out = Vec::new();
        p.read_admin(2, 0, &mut out, 4).unwrap();
        assert_eq!(out, [0; 4]);
        p.set_frozen(2, false).unwrap();
        p.write(&at(2, 102, 0), b"x").unwrap();
        assert_eq!(p.set_frozen(77, true), Err(ErrorCode::UnknownSlab));
        assert_eq!(p.list(0, 10), vec![1, 2]);
        assert_eq!(p.list(0, 1), vec![1]);
        assert_eq!(p.list(1, 10), vec![2]);
        p.drop_slab(1).unwrap();
        assert_eq!(p.drop_slab(1), Err(ErrorCode::UnknownSlab));
        p.create(9, 1, 0).unwrap();
    }

    #[test]
    fn swap_and_xor() {
        let p = SlabPool::new(8192, 4096);
        p.create(1, 7, 0).unwrap();
        p.write(&at(1, 7, 10), &[1, 2, 3]).unwrap();
        let old = p
            .swap(&at(1, 7, 9), 5, 1, &[9, 9, 9, 9], |b| b.to_vec())
            .unwrap();
        assert_eq!(old, vec![0, 1, 2, 3]);
        assert_eq!(p.freeze(1), Ok(1));
        // A resend returns the first answer and writes nothing, even frozen.
        let again = p
            .swap(&at(1, 7, 9), 5, 1, &[7, 7, 7, 7], |b| b.to_vec())
            .unwrap();
        assert_eq!(again, vec![0, 1, 2, 3]);
        assert_eq!(
            p.swap(&at(1, 7, 9), 5, 2, &[7], |_| ()),
            Err(ErrorCode::SlabFrozen)
        );
        p.xor(&at(1, 7, 9), &[1, 1, 1, 1]).unwrap();
        p.commit(&at(1, 7, 0), 5, 1).unwrap();
        p.commit(&at(1, 7, 0), 5, 1).unwrap();
        assert_eq!(p.freeze(1), Ok(0));
        // A late duplicate of a committed swap is refused, not applied.
        assert_eq!(
            p.swap(&at(1, 7, 9), 5, 1, &[7, 7, 7, 7], |_| ()),
            Err(ErrorCode::InvalidArgument)
        );
        // Uncommitted records hold at most twice the slab's size.
        p.set_frozen(1, false).unwrap();
        let big = vec![3u8; 3000];
        p.swap(&at(1, 7, 1000), 6, 1, &big, |_| ()).unwrap();
        p.swap(&at(1, 7, 1000), 6, 2, &big, |_| ()).unwrap();
        assert_eq!(
            p.swap(&at(1, 7, 1000), 6, 3, &big, |_| ()),
            Err(ErrorCode::SlabFrozen)
        );
        p.commit(&at(1, 7, 1000), 6, 1).unwrap();
        p.swap(&at(1, 7, 1000), 6, 3, &big, |_| ()).unwrap();
        p.commit(&at(1, 7, 1000), 6, 2).unwrap();
        p.commit(&at(1, 7, 1000), 6, 3).unwrap();
        // Committed swaps never use up the room for writes in flight.
        p.set_frozen(1, false).unwrap();
        for rid in 100..100 + (MAX_SWAPS + MAX_MARKERS) as u64 * 2 {
            p.swap(&at(1, 7, 0), 5, rid, &[1], |_| ()).unwrap();
            p.commit(&at(1, 7, 0), 5, rid).unwrap();
        }
        assert_eq!(p.freeze(1), Ok(0));
        p.set_frozen(1, false).unwrap();
        p.set_frozen(1, false).unwrap();
        let mut got = Vec::new();
        p.read(&at(1, 7, 9), 4, |b| got.extend_from_slice(b))
            .unwrap();
        assert_eq!(got, vec![8, 8, 8, 8]);
        assert_eq!(p.xor(&at(1, 8, 0), &[1]), Err(ErrorCode::BadCapability));
        assert_eq!(
            p.swap(&at(1, 7, 4095), 5, 3, &[1, 2], |_| ()),
            Err(ErrorCode::OutOfRange)
        );
        p.rekey(1, 99).unwrap();
        assert_eq!(p.write(&at(1, 7, 0), &[1]), Err(ErrorCode::BadCapability));
        p.write(&at(1, 99, 0), &[1]).unwrap();
        p.create(2, 1, 0).unwrap();
        assert_eq!(p.retain(&[2].into_iter().collect()), 1);
        assert_eq!(p.list(0, 10), vec![2]);
    }

    #[test]
    fn atomics() {
        let p = SlabPool::new(4096, 4096);
        p.create(0, 5, 0).unwrap();
        assert_eq!(p.faa(&at(0, 5, 8), 3), Ok(0));
        assert_eq!(p.faa(&at(0, 5, 8), u64::MAX), Ok(3));
        assert_eq!(p.cas(&at(0, 5, 8), 2, 10), Ok(2));
        assert_eq!(p.cas(&at(0, 5, 8), 2, 11), Ok(10));
        assert_eq!(p.cas(&at(0, 5, 12), 0, 1), Err(ErrorCode::Unaligned));
        assert_eq!(p.faa(&at(0, 5, 4096), 1), Err(ErrorCode::OutOfRange));
        assert_eq!(p.faa(&at(0, 5, 4088), 1), Ok(0));
        let le = p.read(&at(0, 5, 8), 8, |b| b.to_vec()).unwrap();
        assert_eq!(le, 10u64.to_le_bytes());
    }

    #[test]
    fn concurrent_faa_sums() {
        let p = std::sync::Arc::new(SlabPool::new(4096, 4096));
        p.create(0, 1, 0).unwrap();
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        p.faa(&at(0, 1, 0), 1).unwrap();
                        p.write(&at(0, 1, 64), &[7; 64]).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(p.faa(&at(0, 1, 0), 0), Ok(80_000));
    }
}
