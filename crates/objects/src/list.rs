//! `FarList<T>`: a singly linked list of far nodes.
//!
//! A node is one object: the far address of the next node (`u64::MAX` at
//! the end), the next node's object id (`u32::MAX` at the end), 4 bytes of
//! padding, then the value. Because nodes carry far addresses, a memory
//! server can walk the list itself ([`FarList::iter`] uses that to fetch the
//! next nodes in one request; [`FarList::to_vec_offloaded`] walks it all at
//! the servers).

use std::marker::PhantomData;

use bytemuck::Pod;
use remora_client::offload::ChaseReply;
use remora_client::OffloadOp;

use crate::cache::{ObjId, ObjectCache, Residency};
use crate::heap::FarAddr;
use crate::{check_type, ObjError, Ref, RefMut, Result, Scope};

const NIL_FAR: u64 = u64::MAX;
const NIL_ID: u32 = u32::MAX;
const HEADER: usize = 16;
/// Most nodes one offloaded traversal request returns.
const MAX_HOPS: usize = 256;

/// A singly linked list whose nodes live in far memory.
#[derive(Debug)]
pub struct FarList<T: Pod> {
    cache: ObjectCache,
    head: Option<ObjId>,
    tail: Option<ObjId>,
    len: usize,
    _t: PhantomData<T>,
}

fn node_len<T>() -> usize {
    (HEADER + std::mem::size_of::<T>()).next_multiple_of(8)
}

fn link_of(node: &[u8]) -> (u64, u32) {
    (
        u64::from_le_bytes(node[0..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(node[8..12].try_into().expect("4 bytes")),
    )
}

impl<T: Pod> FarList<T> {
    /// An empty list.
    pub fn new(cache: &ObjectCache) -> Result<FarList<T>> {
        check_type::<T>()?;
        Ok(FarList {
            cache: cache.clone(),
            head: None,
            tail: None,
            len: 0,
            _t: PhantomData,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn node_bytes(next: Option<ObjId>, far_next: u64, value: &T) -> Vec<u8> {
        let mut b = vec![0u8; node_len::<T>()];
        b[0..8].copy_from_slice(&far_next.to_le_bytes());
        b[8..12].copy_from_slice(&next.map_or(NIL_ID, |i| i.0).to_le_bytes());
        b[HEADER..HEADER + std::mem::size_of::<T>()].copy_from_slice(bytemuck::bytes_of(value));
        b
    }

    fn far_of(&self, id: ObjId) -> u64 {
        self.cache.inner.far_of(id).0 .0
    }

    /// Adds an element at the front.
    pub fn push_front(&mut self, value: T) -> Result<()> {
        let far_next = self.head.map_or(NIL_FAR, |h| self.far_of(h));
        let bytes = Self::node_bytes(self.head, far_next, &value);
        let id = self.cache.inner.create(&bytes, 8)?;
        self.head = Some(id);
        if self.tail.is_none() {
            self.tail = Some(id);
        }
        self.len += 1;
        Ok(())
    }

    /// Adds an element at the back.
    pub fn push_back(&mut self, value: T) -> Result<()> {
        let bytes = Self::node_bytes(None, NIL_FAR, &value);
        let id = self.cache.inner.create(&bytes, 8)?;
        if let Some(t) = self.tail {
            let far = self.far_of(id);
            let s = Scope::new();
            let p = match self.cache.inner.deref(t) {
                Ok(p) => p,
                Err(e) => {
                    drop(s);
                    self.cache.inner.destroy(id);
                    return Err(e);
                }
            };
            self.cache.inner.mark_dirty(t);
            // SAFETY: the tail node is resident for the scope and `&mut
            // self` is exclusive; its header is 16 bytes.
            let hdr = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), HEADER) };
            hdr[0..8].copy_from_slice(&far.to_le_bytes());
            hdr[8..12].copy_from_slice(&id.0.to_le_bytes());
            drop(s);
        } else {
            self.head = Some(id);
        }
        self.tail = Some(id);
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the first element.
    pub fn pop_front(&mut self) -> Result<Option<T>> {
        let Some(h) = self.head else { return Ok(None) };
        let s = Scope::new();
        let p = self.cache.inner.deref(h)?;
        // SAFETY: resident for the scope; a node is node_len bytes.
        let node = unsafe { std::slice::from_raw_parts(p.as_ptr(), node_len::<T>()) };
        let (_, next) = link_of(node);
        let v: T = bytemuck::pod_read_unaligned(&node[HEADER..HEADER + std::mem::size_of::<T>()]);
        drop(s);
        self.cache.inner.destroy(h);
        self.head = (next != NIL_ID).then_some(ObjId(next));
        if self.head.is_none() {
            self.tail = None;
        }
        self.len -= 1;
        Ok(Some(v))
    }

    /// The first element.
    pub fn front<'a>(&'a self, _scope: &'a Scope) -> Result<Option<Ref<'a, T>>> {
        let Some(h) = self.head else { return Ok(None) };
        let p = self.cache.inner.deref(h)?;
        // SAFETY: resident while the scope lives; the value sits 16 bytes
        // into a 16-aligned copy; writers need `&mut self`.
        let r = unsafe { &*(p.as_ptr().add(HEADER) as *const T) };
        Ok(Some(Ref { r }))
    }

    /// The first element, for writing.
    pub fn front_mut<'a>(&'a mut self, _scope: &'a mut Scope) -> Result<Option<RefMut<'a, T>>> {
        let Some(h) = self.head else { return Ok(None) };
        let p = self.cache.inner.deref(h)?;
        self.cache.inner.mark_dirty(h);
        // SAFETY: as in `front`; `&mut self` is exclusive.
        let r = unsafe { &mut *(p.as_ptr().add(HEADER) as *mut T) };
        Ok(Some(RefMut { r }))
    }

    /// Removes every element.
    pub fn clear(&mut self) -> Result<()> {
        while self.pop_front()?.is_some() {}
        Ok(())
    }

    /// Iterates over copies of the elements. When the next node is far, one
    /// offloaded request brings it and up to `window` nodes after it (the
    /// server follows the next pointers); the window doubles while the
    /// nodes fetched ahead are used and halves when they were evicted first.
    pub fn iter(&self) -> ListIter<'_, T> {
        ListIter {
            list: self,
            left: self.len,
            next: self.head,
            window: 4,
            fetched_ahead: 0,
        }
    }

    /// Walks the whole list at the memory servers (after writing back the
    /// list's dirty nodes) and returns copies of the values; nodes do not
    /// enter the cache (unless they are larger than the cluster's slabs:
    /// then the list is walked here).
    pub fn to_vec_offloaded(&self) -> Result<Vec<T>> {
        if let Some(h) = self.head {
            let (far, _) = self.cache.inner.far_of(h);
            if node_len::<T>() as u64 > self.cache.inner.heap.region(far.region()).slab_size() {
                // Nodes larger than a slab straddle slab boundaries, which
                // a server cannot follow: walk them here.
                return self.to_vec();
            }
        }
        let mut out = Vec::with_capacity(self.len);
        let mut cur = self.head;
        while let Some(id) = cur {
            if out.len() >= self.len {
                break;
            }
            if self.cache.inner.is_dirty(id) {
                self.cache.inner.flush_ids(&[id])?;
            }
            let since = self.cache.inner.far_version();
            let nodes = self.chase(id, MAX_HOPS)?;
            // Nodes after a dirty one may have newer links locally: keep
            // only the clean prefix (the first node was flushed above).
            let mut vals: Vec<T> = Vec::new();
            let mut next_id = Some(id);
            for (k, n) in nodes.iter().enumerate() {
                // More nodes than links, or a link to no object: stale
                // bytes (caught below) or a bad reply (caught after the
                // loop).
                let Some(this) = next_id else { break };
                if !self.cache.inner.is_known(this) {
                    next_id = None;
                    break;
                }
                if (k > 0 && self.cache.inner.is_dirty(this)) || out.len() + vals.len() == self.len
                {
                    break;
                }
                vals.push(bytemuck::pod_read_unaligned(
                    &n[HEADER..HEADER + std::mem::size_of::<T>()],
                ));
                let (_, nid) = link_of(n);
                next_id = (nid != NIL_ID).then_some(ObjId(nid));
            }
            // Checked after the flags: a flag found clean was cleared after
            // its write-back bumped the version, so that bump is seen here.
            if self.cache.inner.far_version() != since {
                // A write-back landed meanwhile: the bytes may be stale.
                continue;
            }
            out.extend(vals);
            cur = next_id;
        }
        if out.len() != self.len {
            return Err(ObjError::BadReply(format!(
                "traversal found {} of {} nodes",
                out.len(),
                self.len
            )));
        }
        Ok(out)
    }

    /// Asks the server holding node `id` to walk up to `hops` nodes from
    /// it; returns their bytes.
    fn chase(&self, id: ObjId, hops: usize) -> Result<Vec<Vec<u8>>> {
        let (far, _) = self.cache.inner.far_of(id);
        let nl = node_len::<T>();
        let region = self.cache.inner.heap.region(far.region());
        let slab = region.slab_size();
        let slab_start = far.offset() - far.offset() % slab;
        let op = OffloadOp::Chase {
            slab_base: FarAddr::new(far.region(), slab_start).0,
            next_off: 0,
            node_len: nl as u16,
            hops: hops.min(MAX_HOPS) as u16,
        };
        let reply = region.offload(far.offset(), &op)?;
        self.cache.inner.count_offload(reply.len());
        let r = ChaseReply::decode(&reply, nl as u16)
            .map_err(|e| ObjError::BadReply(format!("traversal: {e}")))?;
        if r.nodes == 0 {
            return Err(ObjError::BadReply("traversal returned no node".into()));
        }
        Ok(r.iter().map(|c| c.to_vec()).collect())
    }

    /// Reads `len` nodes' values starting at the head (copies).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.iter().collect()
    }
}

impl<T: Pod> Drop for FarList<T> {
    fn drop(&mut self) {
        // Unlink without reading far memory where possible: follow ids
        // through local copies, fetching only when needed.
        let mut cur = self.head.take();
        while let Some(id) = cur {
            let next = {
                let s = Scope::new();
                let next = match self.cache.inner.deref(id) {
                    Ok(p) => {
                        // SAFETY: resident for the scope; 16-byte header.
                        let hdr = unsafe { std::slice::from_raw_parts(p.as_ptr(), HEADER) };
                        let (_, n) = link_of(hdr);
                        (n != NIL_ID).then_some(ObjId(n))
                    }
                    Err(e) => {
                        tracing::warn!("dropping a far list: the rest is unreachable: {e}");
                        None
                    }
                };
                drop(s);
                next
            };
            self.cache.inner.destroy(id);
            cur = next;
        }
    }
}

/// Iterator of [`FarList::iter`].
#[derive(Debug)]
pub struct ListIter<'a, T: Pod> {
    list: &'a FarList<T>,
    /// Elements not yet returned.
    left: usize,
    next: Option<ObjId>,
    window: usize,
    /// Nodes installed ahead and not reached yet.
    fetched_ahead: usize,
}

impl<T: Pod> Iterator for ListIter<'_, T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.left == 0 {
            return None;
        }
        let id = self.next?;
        let inner = &self.list.cache.inner;
        if inner.residency(id) == Residency::Far {
            if self.fetched_ahead > 0 {
                // Fetched ahead, evicted before use.
                self.window = (self.window / 2).max(1);
            }
            let since = inner.far_version();
            match self.list.chase(id, self.window) {
                Ok(nodes) => {
                    // Install the clean prefix: stop at the first node that
                    // has a local copy (it may be newer than far memory).
                    let mut cur = Some(id);
                    let mut installed = 0usize;
                    for n in &nodes {
                        let Some(c) = cur else { break };
                        if !inner.install(c, n, since) {
                            break;
                        }
                        installed += 1;
                        let (_, nid) = link_of(n);
                        cur = (nid != NIL_ID).then_some(ObjId(nid));
                    }
                    self.fetched_ahead = installed.saturating_sub(1);
                    if installed == nodes.len() {
                        self.window = (self.window * 2).min(MAX_HOPS);
                    }
                }
                Err(e) => tracing::debug!("list traversal offload failed, fetching: {e}"),
            }
        } else if self.fetched_ahead > 0 {
            self.fetched_ahead -= 1;
        }
        let s = Scope::new();
        let p = match inner.deref(id) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        // SAFETY: resident for the scope; a node is node_len bytes.
        let node = unsafe { std::slice::from_raw_parts(p.as_ptr(), node_len::<T>()) };
        let (_, nid) = link_of(node);
        let v = bytemuck::pod_read_unaligned(&node[HEADER..HEADER + std::mem::size_of::<T>()]);
        drop(s);
        self.next = (nid != NIL_ID).then_some(ObjId(nid));
        self.left -= 1;
        Some(Ok(v))
    }
}
