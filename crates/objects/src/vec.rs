//! `FarVec<T>`: a growable array of far chunks.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ops::Range;

use bytemuck::Pod;
use remora_client::offload::{
    cmp as cmp_code, output, AggregateReply, FilterReply, MAX_OFFLOAD_SCAN,
};
use remora_client::{ClientError, OffloadOp, ReadFuture};

use crate::cache::{ObjId, ObjectCache, Residency};
use crate::heap::FarAddr;
use crate::{check_type, ObjError, Ref, RefMut, Result, Scope};

/// Default chunk size in bytes (elements per chunk: this divided by the
/// element size, rounded down to a power of two).
pub const DEFAULT_CHUNK_BYTES: usize = 4096;

/// A growable array whose elements live in far memory, in chunks of a
/// power-of-two number of elements; a chunk is the unit of caching.
///
/// Reads take `&self`, writes `&mut self`, as for `Vec`; share it between
/// threads behind a lock.
#[derive(Debug)]
pub struct FarVec<T: Pod> {
    pub(crate) cache: ObjectCache,
    pub(crate) chunks: Vec<ObjId>,
    len: usize,
    shift: u32,
    nocache: bool,
    _t: PhantomData<T>,
}

impl<T: Pod> FarVec<T> {
    /// An empty vector with chunks of about 4 KiB.
    pub fn new(cache: &ObjectCache) -> Result<FarVec<T>> {
        let per = (DEFAULT_CHUNK_BYTES / std::mem::size_of::<T>().max(1)).max(1);
        Self::with_chunk(cache, 1 << per.ilog2())
    }

    /// An empty vector with `chunk_elems` elements per chunk (a power of
    /// two). Small chunks move less data per random access; large chunks
    /// cost less local metadata and fewer requests per scan.
    pub fn with_chunk(cache: &ObjectCache, chunk_elems: usize) -> Result<FarVec<T>> {
        check_type::<T>()?;
        if !chunk_elems.is_power_of_two() {
            return Err(ObjError::InvalidArgument(format!(
                "chunk of {chunk_elems} elements: must be a power of two"
            )));
        }
        let bytes = chunk_elems.checked_mul(std::mem::size_of::<T>());
        if bytes.is_none_or(|b| b > (16 << 20)) {
            return Err(ObjError::InvalidArgument(format!(
                "chunk of {chunk_elems} elements is larger than 16 MiB"
            )));
        }
        Ok(FarVec {
            cache: cache.clone(),
            chunks: Vec::new(),
            len: 0,
            shift: chunk_elems.ilog2(),
            nocache: false,
            _t: PhantomData,
        })
    }

    /// Elements per chunk.
    pub fn chunk_elems(&self) -> usize {
        1 << self.shift
    }

    fn chunk_bytes(&self) -> usize {
        self.chunk_elems() * std::mem::size_of::<T>()
    }

    fn far_align(&self) -> u64 {
        std::mem::align_of::<T>().max(8) as u64
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hint for one-touch scans: iterators read chunks that are not local
    /// around the cache instead of through it.
    pub fn set_nocache(&mut self, on: bool) {
        self.nocache = on;
    }

    fn check(&self, index: usize) -> Result<()> {
        if index >= self.len {
            return Err(ObjError::OutOfBounds {
                index,
                len: self.len,
            });
        }
        Ok(())
    }

    #[inline]
    fn elem_ptr(&self, index: usize) -> Result<*mut T> {
        let c = self.chunks[index >> self.shift];
        let p = self.cache.inner.deref(c)?;
        let off = (index & (self.chunk_elems() - 1)) * std::mem::size_of::<T>();
        // SAFETY: the chunk copy holds chunk_elems elements.
        Ok(unsafe { p.as_ptr().add(off) } as *mut T)
    }

    /// Dereferences element `index` for reading.
    #[inline]
    pub fn get<'a>(&'a self, index: usize, _scope: &'a Scope) -> Result<Ref<'a, T>> {
        self.check(index)?;
        let p = self.elem_ptr(index)?;
        // SAFETY: resident while the scope lives; aligned (chunk copies are
        // 16-aligned, elements at multiples of their size); writers need
        // `&mut self`.
        Ok(Ref { r: unsafe { &*p } })
    }

    /// Dereferences element `index` for writing (its chunk becomes dirty).
    #[inline]
    pub fn get_mut<'a>(&'a mut self, index: usize, _scope: &'a mut Scope) -> Result<RefMut<'a, T>> {
        self.check(index)?;
        let p = self.elem_ptr(index)?;
        self.cache
            .inner
            .mark_dirty(self.chunks[index >> self.shift]);
        // SAFETY: as in `get`; `&mut self` makes the borrow exclusive.
        let r = unsafe { &mut *p };
        Ok(RefMut { r })
    }

    /// A copy of element `index`.
    pub fn read(&self, index: usize) -> Result<T> {
        let s = Scope::new();
        Ok(*self.get(index, &s)?)
    }

    /// Replaces element `index`.
    pub fn set(&mut self, index: usize, value: T) -> Result<()> {
        let mut s = Scope::new();
        *self.get_mut(index, &mut s)? = value;
        Ok(())
    }

    /// Appends an element.
    pub fn push(&mut self, value: T) -> Result<()> {
        if self.len & (self.chunk_elems() - 1) == 0 {
            let mut bytes = vec![0u8; self.chunk_bytes()];
            bytes[..std::mem::size_of::<T>()].copy_from_slice(bytemuck::bytes_of(&value));
            let id = self.cache.inner.create(&bytes, self.far_align())?;
            self.chunks.push(id);
            self.len += 1;
            return Ok(());
        }
        self.len += 1;
        let i = self.len - 1;
        if let Err(e) = self.set(i, value) {
            self.len -= 1;
            return Err(e);
        }
        Ok(())
    }

    /// Appends all of `values`, filling whole chunks directly.
    pub fn extend_from_slice(&mut self, mut values: &[T]) -> Result<()> {
        while !values.is_empty() && self.len & (self.chunk_elems() - 1) != 0 {
            self.push(values[0])?;
            values = &values[1..];
        }
        let per = self.chunk_elems();
        while !values.is_empty() {
            let n = per.min(values.len());
            let mut bytes = vec![0u8; self.chunk_bytes()];
            bytes[..n * std::mem::size_of::<T>()]
                .copy_from_slice(bytemuck::cast_slice(&values[..n]));
            let id = self.cache.inner.create(&bytes, self.far_align())?;
            self.chunks.push(id);
            self.len += n;
            values = &values[n..];
        }
        Ok(())
    }

    /// Removes and returns the last element.
    pub fn pop(&mut self) -> Result<Option<T>> {
        if self.len == 0 {
            return Ok(None);
        }
        let v = self.read(self.len - 1)?;
        self.len -= 1;
        if self.len & (self.chunk_elems() - 1) == 0 {
            let id = self.chunks.pop().expect("a chunk per element");
            self.cache.inner.destroy(id);
        }
        Ok(Some(v))
    }

    /// Shortens the vector to `len` elements (no-op if it is shorter).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        let keep = len.div_ceil(self.chunk_elems());
        for id in self.chunks.drain(keep..) {
            self.cache.inner.destroy(id);
        }
    }

    /// Removes every element.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Starts fetching the chunks that hold `range` without waiting.
    pub fn prefetch(&self, range: Range<usize>) {
        let end = range.end.min(self.len);
        if range.start >= end {
            return;
        }
        let first = range.start >> self.shift;
        let last = (end - 1) >> self.shift;
        self.cache
            .inner
            .prefetch(self.chunks[first..=last].iter().copied());
    }

    /// Copies of the elements at `indices`, in order. The indices are known
    /// ahead, so their chunks are fetched in batches, many in flight at once.
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<T>> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len) {
            return Err(ObjError::OutOfBounds {
                index: bad,
                len: self.len,
            });
        }
        let window = self
            .cache
            .inner
            .quarter_budget_objects(self.chunk_bytes())
            .clamp(1, 512);
        let mut out = Vec::with_capacity(indices.len());
        let mut ahead = 0;
        for (j, &i) in indices.iter().enumerate() {
            if ahead <= j {
                let end = (j + window).min(indices.len());
                let ids = indices[ahead.max(j)..end]
                    .iter()
                    .map(|&k| self.chunks[k >> self.shift]);
                self.cache.inner.prefetch(ids);
                ahead = end;
            } else if ahead - j < window / 2 && ahead < indices.len() {
                let end = (ahead + window / 2).min(indices.len());
                let ids = indices[ahead..end]
                    .iter()
                    .map(|&k| self.chunks[k >> self.shift]);
                self.cache.inner.prefetch(ids);
                ahead = end;
            }
            let s = Scope::new();
            out.push(*self.get(i, &s)?);
        }
        Ok(out)
    }

    /// Iterates over copies of the elements, fetching chunks ahead with a
    /// window that grows while the consumer waits for the network and
    /// shrinks when chunks fetched ahead were evicted before their use.
    /// With the no-cache hint, chunks that are not local are read around
    /// the cache.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            vec: self,
            next: 0,
            buf: Vec::new(),
            pos: 0,
            window: 2,
            ahead: 0,
            uncached: VecDeque::new(),
            run: None,
        }
    }

    /// Writes the vector's dirty chunks back (they stay cached).
    pub fn flush(&self) -> Result<()> {
        self.cache.inner.flush_ids(&self.chunks)
    }

    /// Local sum (wrapping), min and max over `range`, by iteration.
    pub fn aggregate_local(&self, range: Range<usize>) -> Result<Aggregate<T>>
    where
        T: FarNum,
    {
        let mut agg = Aggregate::empty();
        for v in self.iter_range(range)? {
            agg.add(v?);
        }
        Ok(agg)
    }

    /// Sum (wrapping), min, max and count over `range`, computed at the
    /// memory servers: one request per run of chunks that lie back to back
    /// in one slab, 32 bytes back each. Dirty chunks in the range are
    /// written back first.
    pub fn aggregate_offloaded(&self, range: Range<usize>) -> Result<Aggregate<T>>
    where
        T: FarNum,
    {
        let range = self.clip(range)?;
        self.flush_range(&range)?;
        let mut agg = Aggregate::empty();
        for (far, _, count) in self.far_runs(&range) {
            let op = OffloadOp::Aggregate {
                elem: T::ELEM,
                count: count as u32,
            };
            let r = self.offload(far, &op)?;
            let r = AggregateReply::decode(&r)
                .map_err(|e| ObjError::BadReply(format!("aggregate: {e}")))?;
            if r.n != count as u64 {
                return Err(ObjError::BadReply(format!(
                    "aggregated {} of {count} elements",
                    r.n
                )));
            }
            agg.merge(Aggregate {
                sum_bits: r.sum,
                min: Some(T::from_bits(r.min)),
                max: Some(T::from_bits(r.max)),
                count: r.n,
            });
        }
        Ok(agg)
    }

    /// Indices (ascending) of the elements in `range` with `element <cmp>
    /// operand`, found by the memory servers: only the matching indices
    /// cross the network.
    pub fn filter_offloaded(&self, range: Range<usize>, cmp: Cmp, operand: T) -> Result<Vec<usize>>
    where
        T: FarNum,
    {
        let range = self.clip(range)?;
        self.flush_range(&range)?;
        let mut out = Vec::new();
        for (far, first, count) in self.far_runs(&range) {
            let mut done = 0usize;
            while done < count {
                let left = count - done;
                let at = FarAddr(far.0 + (done * std::mem::size_of::<T>()) as u64);
                let op = OffloadOp::Filter {
                    elem: T::ELEM,
                    count: left as u32,
                    cmp: cmp.code(),
                    operand: operand.to_bits(),
                    max_out: left.min(1 << 18) as u32,
                    out: output::INDICES,
                };
                let r = self.offload(at, &op)?;
                let r = FilterReply::decode(&r, T::ELEM, output::INDICES)
                    .map_err(|e| ObjError::BadReply(format!("filter: {e}")))?;
                let scanned = r.scanned as usize;
                if scanned == 0 || scanned > left {
                    return Err(ObjError::BadReply(format!(
                        "filter scanned {scanned} of {left} elements"
                    )));
                }
                out.extend(r.indices().map(|i| first + done + i as usize));
                done += scanned;
            }
        }
        Ok(out)
    }

    /// Local counterpart of [`FarVec::filter_offloaded`]: iterates (fetching
    /// every chunk) and compares here.
    pub fn filter_local(&self, range: Range<usize>, cmp: Cmp, operand: T) -> Result<Vec<usize>>
    where
        T: FarNum,
    {
        let start = range.start;
        let mut out = Vec::new();
        for (k, v) in self.iter_range(range)?.enumerate() {
            if cmp.holds(v?, operand) {
                out.push(start + k);
            }
        }
        Ok(out)
    }

    /// Copies elements `src` to position `dest` (ranges may overlap, like
    /// `copy_within`). Chunks that are local are copied here; the rest is
    /// copied by the memory servers when both sides lie on one server, so
    /// those bytes never cross the network.
    pub fn copy_within(&mut self, src: Range<usize>, dest: usize) -> Result<()> {
        let src = self.clip(src)?;
        let n = src.len();
        if dest.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(ObjError::OutOfBounds {
                index: dest.saturating_add(n),
                len: self.len,
            });
        }
        if n == 0 || src.start == dest {
            return Ok(());
        }
        // Element order as memmove: backwards when moving right.
        let order: Box<dyn Iterator<Item = usize>> = if dest > src.start {
            Box::new((0..n).rev())
        } else {
            Box::new(0..n)
        };
        let size = std::mem::size_of::<T>();
        let mask = self.chunk_elems() - 1;
        let mut pending: Vec<usize> = Vec::new();
        let flush_pending = |v: &mut Self, pending: &mut Vec<usize>| -> Result<()> {
            // `pending` holds consecutive offsets (in copy order) whose
            // source and destination elements are both far and clean.
            if pending.is_empty() {
                return Ok(());
            }
            let lo = *pending.iter().min().expect("non-empty");
            let cnt = pending.len();
            pending.clear();
            let (sf, _) = v.cache.inner.far_of(v.chunks[(src.start + lo) >> v.shift]);
            let (df, _) = v.cache.inner.far_of(v.chunks[(dest + lo) >> v.shift]);
            let s_at = FarAddr(sf.0 + (((src.start + lo) & mask) * size) as u64);
            let d_at = FarAddr(df.0 + (((dest + lo) & mask) * size) as u64);
            let copied = if s_at.region() == d_at.region() {
                let region = v.cache.inner.heap.region(s_at.region());
                let op = OffloadOp::Copy {
                    dest: remora_client::Target {
                        slab: 0,
                        key: 0,
                        offset: d_at.offset(),
                    },
                    len: (cnt * size) as u32,
                };
                match region.offload(s_at.offset(), &op) {
                    Ok(r) => {
                        v.cache.inner.count_offload(r.len());
                        true
                    }
                    // Refused, so not applied (other servers, a slab
                    // boundary, a server's refusal): copy here.
                    Err(
                        e @ (ClientError::Unsupported { .. }
                        | ClientError::InvalidArgument { .. }
                        | ClientError::Remote { .. }),
                    ) => {
                        tracing::debug!("offloaded copy refused ({e}); copying here");
                        false
                    }
                    // It may have been applied (an overlapping copy is not
                    // resent): copying again from a source it overwrote
                    // would be wrong.
                    Err(e) => return Err(e.into()),
                }
            } else {
                false
            };
            if !copied {
                let vals: Vec<T> = (lo..lo + cnt)
                    .map(|k| v.read(src.start + k))
                    .collect::<Result<_>>()?;
                for (k, val) in vals.into_iter().enumerate() {
                    v.set(dest + lo + k, val)?;
                }
            }
            Ok(())
        };
        for k in order {
            let (s, d) = (src.start + k, dest + k);
            let sc = self.chunks[s >> self.shift];
            let dc = self.chunks[d >> self.shift];
            let both_far = self.cache.inner.residency(sc) == Residency::Far
                && self.cache.inner.residency(dc) == Residency::Far;
            let extends = pending.last().is_none_or(|&last| {
                // Same chunk pair as the run so far, next in copy order.
                let prev_s = self.chunks[(src.start + last) >> self.shift];
                let prev_d = self.chunks[(dest + last) >> self.shift];
                prev_s == sc && prev_d == dc && last.abs_diff(k) == 1
            });
            if both_far && extends {
                pending.push(k);
                continue;
            }
            flush_pending(self, &mut pending)?;
            if both_far {
                pending.push(k);
            } else {
                let v = self.read(s)?;
                self.set(d, v)?;
            }
        }
        flush_pending(self, &mut pending)
    }

    /// Writes back the dirty chunks holding `range`.
    fn flush_range(&self, range: &Range<usize>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let ids = &self.chunks[range.start >> self.shift..=(range.end - 1) >> self.shift];
        let dirty: Vec<ObjId> = ids
            .iter()
            .copied()
            .filter(|&id| self.cache.inner.is_dirty(id))
            .collect();
        self.cache.inner.flush_ids(&dirty)
    }

    /// Splits `range` into runs of elements that lie back to back in far
    /// memory inside one slab and within the server's scan bound:
    /// `(far address of the first, its index, elements)`.
    fn far_runs(&self, range: &Range<usize>) -> Vec<(FarAddr, usize, usize)> {
        let size = std::mem::size_of::<T>();
        let max_elems = (MAX_OFFLOAD_SCAN as usize / size).min(u32::MAX as usize);
        let mask = self.chunk_elems() - 1;
        let mut runs: Vec<(FarAddr, usize, usize)> = Vec::new();
        let mut i = range.start;
        while i < range.end {
            let c = i >> self.shift;
            let (base, _) = self.cache.inner.far_of(self.chunks[c]);
            let at = FarAddr(base.0 + ((i & mask) * size) as u64);
            let slab = self.cache.inner.heap.region(at.region()).slab_size();
            // A chunk larger than a slab straddles slab boundaries: its part
            // in this slab only.
            let in_slab = ((slab - at.offset() % slab) as usize / size).max(1);
            let n = (((c + 1) << self.shift).min(range.end) - i).min(in_slab);
            match runs.last_mut() {
                Some((start, _, cnt))
                    if start.0 + (*cnt * size) as u64 == at.0
                        && start.offset() / slab
                            == (at.offset() + (n * size) as u64 - 1) / slab
                        && *cnt + n <= max_elems =>
                {
                    *cnt += n;
                }
                _ => runs.push((at, i, n)),
            }
            i += n;
        }
        runs
    }

    fn offload(&self, at: FarAddr, op: &OffloadOp<'_>) -> Result<Vec<u8>> {
        let r = self
            .cache
            .inner
            .heap
            .region(at.region())
            .offload(at.offset(), op)?;
        self.cache.inner.count_offload(r.len());
        Ok(r)
    }

    /// Iterates over copies of the elements in `range`.
    pub fn iter_range(&self, range: Range<usize>) -> Result<std::iter::Take<Iter<'_, T>>> {
        let range = self.clip(range)?;
        let mut it = self.iter();
        it.seek(range.start);
        Ok(it.take(range.len()))
    }

    fn clip(&self, range: Range<usize>) -> Result<Range<usize>> {
        if range.start > range.end || range.end > self.len {
            return Err(ObjError::OutOfBounds {
                index: range.end,
                len: self.len,
            });
        }
        Ok(range)
    }
}

impl<T: Pod> Drop for FarVec<T> {
    fn drop(&mut self) {
        for id in self.chunks.drain(..) {
            self.cache.inner.destroy(id);
        }
    }
}

/// Iterator of [`FarVec::iter`].
#[derive(Debug)]
pub struct Iter<'a, T: Pod> {
    vec: &'a FarVec<T>,
    /// Next chunk to load into `buf`.
    next: usize,
    buf: Vec<T>,
    pos: usize,
    window: usize,
    /// Chunks below this were asked for ahead of use.
    ahead: usize,
    /// Reads around the cache in flight (no-cache hint), in chunk order:
    /// first chunk, chunks, future.
    uncached: VecDeque<(usize, usize, ReadFuture)>,
    /// The last completed read around the cache: first chunk, chunks, bytes.
    run: Option<(usize, usize, Vec<u8>)>,
}

impl<T: Pod> Iter<'_, T> {
    /// Moves the iterator to element `index`.
    pub fn seek(&mut self, index: usize) {
        let c = index >> self.vec.shift;
        self.next = c;
        self.buf.clear();
        self.pos = 0;
        self.ahead = self.ahead.max(c);
        self.uncached.clear();
        self.run = None;
        if c < self.vec.chunks.len() {
            if let Err(e) = self.load_chunk() {
                // Reported again by `next`, which retries the chunk.
                tracing::debug!("seek: {e}");
                self.next = c;
                return;
            }
            self.pos = index & (self.vec.chunk_elems() - 1);
        }
    }

    fn max_window(&self) -> usize {
        self.vec
            .cache
            .inner
            .quarter_budget_objects(self.vec.chunk_bytes())
            .clamp(1, 256)
    }

    fn elems_in(&self, c: usize) -> usize {
        (self.vec.len - (c << self.vec.shift)).min(self.vec.chunk_elems())
    }

    fn load_chunk(&mut self) -> Result<()> {
        let c = self.next;
        let inner = &self.vec.cache.inner;
        let n = self.elems_in(c);
        self.buf.clear();
        if self.vec.nocache {
            return self.load_uncached(c, n);
        }
        // Keep up to `window` chunks requested ahead of this one, asking
        // for more once half of them are used, so that requests cover runs
        // of chunks (read together when they lie back to back).
        let want = (c + 1 + self.window).min(self.vec.chunks.len());
        if self.ahead < want && self.ahead <= c + 1 + self.window / 2 {
            let from = self.ahead.max(c + 1);
            inner.prefetch(self.vec.chunks[from..want].iter().copied());
            self.ahead = want;
        }
        let id = self.vec.chunks[c];
        match inner.residency(id) {
            Residency::InFlight => self.window = (self.window * 2).min(self.max_window()),
            Residency::Far if c < self.ahead && c > 0 => {
                // Fetched ahead and evicted before use: too far ahead.
                self.window = (self.window / 2).max(1);
            }
            _ => {}
        }
        let s = Scope::new();
        let p = inner.deref(id)?;
        // SAFETY: the chunk copy holds chunk_elems elements and stays
        // resident while `s` lives.
        let elems = unsafe { std::slice::from_raw_parts(p.as_ptr() as *const T, n) };
        self.buf.extend_from_slice(elems);
        drop(s);
        self.next = c + 1;
        self.pos = 0;
        Ok(())
    }

    fn load_uncached(&mut self, c: usize, n: usize) -> Result<()> {
        let inner = &self.vec.cache.inner;
        let cb = self.vec.chunk_bytes();
        // Up to 1 MiB in flight, in reads of up to 256 KiB that each cover
        // chunks lying back to back in far memory.
        let max_run = ((256 << 10) / cb).max(1);
        let max_inflight = ((1 << 20) / cb).max(4);
        let mut k = self
            .uncached
            .back()
            .map(|&(b, len, _)| b + len)
            .unwrap_or(c)
            .max(c)
            .max(self.run.as_ref().map_or(0, |r| r.0 + r.1));
        let mut inflight: usize = self.uncached.iter().map(|r| r.1).sum();
        while inflight < max_inflight && k < self.vec.chunks.len() {
            if inner.residency(self.vec.chunks[k]) != Residency::Far {
                k += 1;
                continue;
            }
            let (start, _) = inner.far_of(self.vec.chunks[k]);
            let mut len = 1;
            while len < max_run
                && k + len < self.vec.chunks.len()
                && inner.residency(self.vec.chunks[k + len]) == Residency::Far
                && inner.far_of(self.vec.chunks[k + len]).0 .0 == start.0 + (len * cb) as u64
            {
                len += 1;
            }
            self.uncached
                .push_back((k, len, inner.read_uncached_async(start, len * cb)));
            inflight += len;
            k += len;
        }
        if !self.run.as_ref().is_some_and(|r| r.0 <= c && c < r.0 + r.1) {
            while self
                .uncached
                .front()
                .is_some_and(|&(b, len, _)| b + len <= c)
            {
                self.uncached.pop_front();
            }
            self.run = None;
            if self.uncached.front().is_some_and(|&(b, _, _)| b <= c) {
                let (b, len, fut) = self.uncached.pop_front().expect("front");
                let bytes = fut.wait()?;
                if bytes.len() != len * cb {
                    return Err(ObjError::BadReply(format!(
                        "a read of {} bytes returned {}",
                        len * cb,
                        bytes.len()
                    )));
                }
                self.run = Some((b, len, bytes));
            }
        }
        match &self.run {
            Some((b, _, bytes)) if *b <= c => {
                let at = (c - b) * cb;
                // The bytes may be under-aligned for T: read element by element.
                self.buf.extend(
                    bytes[at..at + n * std::mem::size_of::<T>()]
                        .chunks_exact(std::mem::size_of::<T>())
                        .map(bytemuck::pod_read_unaligned::<T>),
                );
            }
            _ => {
                let s = Scope::new();
                let p = inner.deref(self.vec.chunks[c])?;
                // SAFETY: as in `load_chunk`.
                let elems = unsafe { std::slice::from_raw_parts(p.as_ptr() as *const T, n) };
                self.buf.extend_from_slice(elems);
                drop(s);
            }
        }
        self.next = c + 1;
        self.pos = 0;
        Ok(())
    }
}

impl<T: Pod> Iterator for Iter<'_, T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.pos >= self.buf.len() {
            if self.next >= self.vec.chunks.len() {
                return None;
            }
            if let Err(e) = self.load_chunk() {
                // Stop after reporting: the next call retries the chunk.
                return Some(Err(e));
            }
            if self.buf.is_empty() {
                return None;
            }
        }
        let v = self.buf[self.pos];
        self.pos += 1;
        Some(Ok(v))
    }
}

/// A comparison for filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `element < operand`
    Lt,
    /// `element <= operand`
    Le,
    /// `element == operand`
    Eq,
    /// `element != operand`
    Ne,
    /// `element >= operand`
    Ge,
    /// `element > operand`
    Gt,
}

impl Cmp {
    fn code(self) -> u8 {
        match self {
            Cmp::Lt => cmp_code::LT,
            Cmp::Le => cmp_code::LE,
            Cmp::Eq => cmp_code::EQ,
            Cmp::Ne => cmp_code::NE,
            Cmp::Ge => cmp_code::GE,
            Cmp::Gt => cmp_code::GT,
        }
    }

    /// Whether `a <self> b` holds.
    pub fn holds<T: Ord>(self, a: T, b: T) -> bool {
        match self {
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Ge => a >= b,
            Cmp::Gt => a > b,
        }
    }
}

/// Element types with offloaded arithmetic: the integer types the memory
/// server knows.
pub trait FarNum: Pod + Ord + std::fmt::Debug {
    /// The element code of the offload protocol.
    const ELEM: u8;
    /// Widens to 64-bit two's complement bits (sign-extending signed types).
    fn to_bits(self) -> u64;
    /// Narrows 64-bit two's complement bits back to the type (truncating).
    fn from_bits(bits: u64) -> Self;
    /// The smallest and largest value.
    const MIN: Self;
    /// The largest value.
    const MAX: Self;
}

macro_rules! far_num {
    ($($t:ty => $code:expr, $wide:ty;)*) => {$(
        impl FarNum for $t {
            const ELEM: u8 = $code;
            const MIN: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            #[inline]
            fn to_bits(self) -> u64 {
                self as $wide as u64
            }
            #[inline]
            fn from_bits(bits: u64) -> Self {
                bits as $t
            }
        }
    )*};
}

far_num! {
    u64 => 1, u64;
    i64 => 2, i64;
    u32 => 3, u64;
    i32 => 4, i64;
}

/// Sum (wrapping, in 64-bit two's complement of the widened values), min,
/// max and count of a range: what the server computes, and what the local
/// path computes the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aggregate<T> {
    /// Wrapping sum of the widened values, as 64-bit two's complement bits.
    pub sum_bits: u64,
    /// Smallest element (`None` for an empty range).
    pub min: Option<T>,
    /// Largest element.
    pub max: Option<T>,
    /// Elements aggregated.
    pub count: u64,
}

impl<T: FarNum> Aggregate<T> {
    fn empty() -> Self {
        Aggregate {
            sum_bits: 0,
            min: None,
            max: None,
            count: 0,
        }
    }

    fn add(&mut self, v: T) {
        self.sum_bits = self.sum_bits.wrapping_add(v.to_bits());
        self.min = Some(self.min.map_or(v, |m| m.min(v)));
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        self.count += 1;
    }

    pub(crate) fn merge(&mut self, o: Aggregate<T>) {
        self.sum_bits = self.sum_bits.wrapping_add(o.sum_bits);
        self.min = match (self.min, o.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, o.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.count += o.count;
    }

    /// The sum as `i128`-free signed or unsigned 64-bit bits reinterpreted:
    /// for unsigned types the wrapping `u64` sum, for signed the wrapping
    /// `i64` sum.
    pub fn sum_u64(&self) -> u64 {
        self.sum_bits
    }

    /// The sum as a wrapping `i64`.
    pub fn sum_i64(&self) -> i64 {
        self.sum_bits as i64
    }
}
