//! `FarBox<T>`: one value in far memory.

use std::marker::PhantomData;

use bytemuck::Pod;

use crate::cache::{ObjId, ObjectCache};
use crate::{check_type, Ref, RefMut, Result, Scope};

/// A single far object holding a `T`.
#[derive(Debug)]
pub struct FarBox<T: Pod> {
    cache: ObjectCache,
    id: ObjId,
    _t: PhantomData<T>,
}

impl<T: Pod> FarBox<T> {
    /// Puts `value` in a new far object (resident and dirty until evicted).
    pub fn new(cache: &ObjectCache, value: T) -> Result<FarBox<T>> {
        check_type::<T>()?;
        let id = cache.inner.create(
            bytemuck::bytes_of(&value),
            std::mem::align_of::<T>().max(8) as u64,
        )?;
        Ok(FarBox {
            cache: cache.clone(),
            id,
            _t: PhantomData,
        })
    }

    /// The object's handle in its cache.
    pub fn id(&self) -> ObjId {
        self.id
    }

    /// Dereferences for reading, fetching the object if it is far.
    #[inline]
    pub fn get<'a>(&'a self, _scope: &'a Scope) -> Result<Ref<'a, T>> {
        let p = self.cache.inner.deref(self.id)?;
        // SAFETY: the copy holds a valid `T` (Pod: any bytes are valid),
        // 16-byte aligned (checked at creation), and stays resident while
        // the scope lives; writers need `&mut self`, so no one writes it
        // while this shared borrow of `self` lasts.
        let r = unsafe { &*(p.as_ptr() as *const T) };
        Ok(Ref { r })
    }

    /// Dereferences for writing; the object is marked dirty.
    #[inline]
    pub fn get_mut<'a>(&'a mut self, _scope: &'a mut Scope) -> Result<RefMut<'a, T>> {
        let p = self.cache.inner.deref(self.id)?;
        self.cache.inner.mark_dirty(self.id);
        // SAFETY: as in `get`, and `&mut self` makes this the only borrow.
        let r = unsafe { &mut *(p.as_ptr() as *mut T) };
        Ok(RefMut { r })
    }

    /// A copy of the value.
    pub fn read(&self) -> Result<T> {
        let s = Scope::new();
        Ok(*self.get(&s)?)
    }

    /// Replaces the value.
    pub fn set(&mut self, value: T) -> Result<()> {
        let mut s = Scope::new();
        *self.get_mut(&mut s)? = value;
        Ok(())
    }

    /// True if the value has a local copy now.
    pub fn is_local(&self) -> bool {
        self.cache.inner.is_local(self.id)
    }

    /// Hint: evict this object first (no second chance), e.g. after a
    /// one-time use.
    pub fn set_nocache(&self, on: bool) {
        self.cache.inner.set_nocache(self.id, on);
    }

    /// Starts fetching the object without waiting.
    pub fn prefetch(&self) {
        self.cache.inner.prefetch([self.id]);
    }
}

impl<T: Pod> Drop for FarBox<T> {
    fn drop(&mut self) {
        self.cache.inner.destroy(self.id);
    }
}
