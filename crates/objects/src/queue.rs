//! `FarQueue<T>`: a FIFO queue of far chunks.

use std::collections::VecDeque;
use std::marker::PhantomData;

use bytemuck::Pod;

use crate::cache::{ObjId, ObjectCache};
use crate::vec::DEFAULT_CHUNK_BYTES;
use crate::{check_type, Ref, Result, Scope};

/// A first-in first-out queue whose elements live in far memory, in chunks
/// (the unit of caching). Only the chunks at the two ends are touched by
/// pushes and pops, so they stay hot while the middle can be far.
#[derive(Debug)]
pub struct FarQueue<T: Pod> {
    cache: ObjectCache,
    chunks: VecDeque<ObjId>,
    /// Index of the front element in the first chunk.
    head: usize,
    len: usize,
    per: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> FarQueue<T> {
    /// An empty queue with chunks of about 4 KiB.
    pub fn new(cache: &ObjectCache) -> Result<FarQueue<T>> {
        let per = (DEFAULT_CHUNK_BYTES / std::mem::size_of::<T>().max(1)).max(1);
        Self::with_chunk(cache, per)
    }

    /// An empty queue with `chunk_elems` elements per chunk (at least 1).
    pub fn with_chunk(cache: &ObjectCache, chunk_elems: usize) -> Result<FarQueue<T>> {
        check_type::<T>()?;
        if chunk_elems == 0 || chunk_elems.saturating_mul(std::mem::size_of::<T>()) > 16 << 20 {
            return Err(crate::ObjError::InvalidArgument(format!(
                "queue chunk of {chunk_elems} elements (1 up to 16 MiB)"
            )));
        }
        Ok(FarQueue {
            cache: cache.clone(),
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
            per: chunk_elems,
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

    fn elem_ptr(&self, pos: usize) -> Result<*mut T> {
        let abs = self.head + pos;
        let id = self.chunks[abs / self.per];
        let p = self.cache.inner.deref(id)?;
        // SAFETY: the chunk copy holds `per` elements.
        Ok(unsafe { p.as_ptr().add((abs % self.per) * std::mem::size_of::<T>()) } as *mut T)
    }

    /// Adds an element at the back.
    pub fn push_back(&mut self, value: T) -> Result<()> {
        let abs = self.head + self.len;
        if abs == self.chunks.len() * self.per {
            let mut bytes = vec![0u8; self.per * std::mem::size_of::<T>()];
            bytes[..std::mem::size_of::<T>()].copy_from_slice(bytemuck::bytes_of(&value));
            let id = self
                .cache
                .inner
                .create(&bytes, std::mem::align_of::<T>().max(8) as u64)?;
            self.chunks.push_back(id);
        } else {
            let _s = Scope::new();
            let p = self.elem_ptr(self.len)?;
            self.cache.inner.mark_dirty(self.chunks[abs / self.per]);
            // SAFETY: resident for the scope; `&mut self` is exclusive;
            // aligned like `FarVec`'s elements.
            unsafe { p.write(value) };
        }
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the front element.
    pub fn pop_front(&mut self) -> Result<Option<T>> {
        if self.len == 0 {
            return Ok(None);
        }
        let v = {
            let _s = Scope::new();
            let p = self.elem_ptr(0)?;
            // SAFETY: resident for the scope.
            unsafe { p.read() }
        };
        self.head += 1;
        self.len -= 1;
        if self.head == self.per || self.len == 0 {
            // The first chunk is used up (or the queue is empty: start over).
            let drop_n = if self.len == 0 { self.chunks.len() } else { 1 };
            for _ in 0..drop_n {
                if let Some(id) = self.chunks.pop_front() {
                    self.cache.inner.destroy(id);
                }
            }
            self.head = 0;
        }
        Ok(Some(v))
    }

    /// The front element.
    pub fn front<'a>(&'a self, _scope: &'a Scope) -> Result<Option<Ref<'a, T>>> {
        if self.len == 0 {
            return Ok(None);
        }
        let p = self.elem_ptr(0)?;
        // SAFETY: resident while the scope lives; writers need `&mut self`.
        Ok(Some(Ref { r: unsafe { &*p } }))
    }

    /// Copies of the elements, front to back, fetching chunks ahead.
    pub fn iter(&self) -> impl Iterator<Item = Result<T>> + '_ {
        let window = self
            .cache
            .inner
            .quarter_budget_objects(self.per * std::mem::size_of::<T>())
            .clamp(1, 64);
        (0..self.len).map(move |pos| {
            let abs = self.head + pos;
            if abs.is_multiple_of(self.per) || pos == 0 {
                let c = abs / self.per;
                let end = (c + 1 + window).min(self.chunks.len());
                if c + 1 < end {
                    self.cache
                        .inner
                        .prefetch(self.chunks.range(c + 1..end).copied());
                }
            }
            let _s = Scope::new();
            // SAFETY: resident for the scope.
            Ok(unsafe { self.elem_ptr(pos)?.read() })
        })
    }
}

impl<T: Pod> Drop for FarQueue<T> {
    fn drop(&mut self) {
        for id in self.chunks.drain(..) {
            self.cache.inner.destroy(id);
        }
    }
}
