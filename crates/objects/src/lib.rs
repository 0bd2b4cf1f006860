//! Far objects: data structures whose elements live in far memory and are
//! cached locally one object at a time.
//!
//! Paging moves 4 KiB to use 8 bytes; far objects move exactly the object.
//! An [`ObjectCache`] holds local copies within a byte budget, evicts the
//! coldest (CLOCK over per-object hot bits) from a background thread, writes
//! back only dirty objects and only their bytes, and fetches what iterators
//! will touch next. On top: [`FarBox`], [`FarVec`], [`FarHashMap`],
//! [`FarList`] and [`FarQueue`].
//!
//! # Dereferencing
//!
//! Objects are read and written through guards that borrow a [`Scope`]:
//!
//! ```no_run
//! # fn demo(cluster: remora_client::Cluster) -> remora_objects::Result<()> {
//! use remora_objects::{CacheConfig, FarBox, ObjectCache, Scope};
//! let cache = ObjectCache::new(cluster, CacheConfig::default())?;
//! let mut b = FarBox::new(&cache, [0u64; 4])?;
//! let mut scope = Scope::new();
//! b.get_mut(&mut scope)?[1] = 7;
//! assert_eq!(b.get(&scope)?[1], 7);
//! # Ok(()) }
//! ```
//!
//! While a scope is open on a thread, nothing dereferenced through it is
//! evicted: the evictor unpublishes its victims, then waits for the scopes
//! that were open at that moment to end ([`epoch`]). A guard cannot outlive
//! its scope or its structure (the borrow checker sees to it), so a use
//! after eviction does not compile. A hit costs one load of the object's
//! state word; a miss fetches the object (or takes back a victim that was
//! not written back yet). Keep scopes short: a scope held for long holds up
//! eviction.
//!
//! # What can go far
//!
//! Elements are plain data ([`bytemuck::Pod`]): their far encoding is their
//! in-memory bytes (little-endian on the machines Remora runs on), with no
//! serialization step and no pointers to fix up. Types with alignment above
//! 16 are refused.
//!
//! # Offloaded operations
//!
//! Data-heavy operations can run at the memory server instead of moving the
//! data: [`FarVec`] aggregates and filters, [`FarHashMap::get_offloaded`]
//! (one request probes the table at the server), [`FarList`] traversal (the
//! server follows next pointers), in-server copy. Each structure flushes its
//! own dirty objects first, so an offloaded result equals the local one.

pub mod arena;
mod boxed;
pub mod cache;
pub mod epoch;
pub mod heap;
mod list;
mod map;
mod queue;
mod vec;

pub use boxed::FarBox;
pub use cache::{CacheConfig, CacheStats, ObjId, ObjectCache};
pub use epoch::Scope;
pub use list::FarList;
pub use map::FarHashMap;
pub use queue::FarQueue;
pub use vec::{Aggregate, Cmp, FarNum, FarVec, Iter};

use remora_client::ClientError;

/// Re-exported so that users can derive the element trait.
pub use bytemuck::{Pod, Zeroable};

/// Errors of far-object operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjError {
    /// Far memory failed (server unavailable, quota, ...).
    #[error(transparent)]
    Far(#[from] ClientError),
    /// An index past the end.
    #[error("index {index} out of range for length {len}")]
    OutOfBounds {
        /// The index.
        index: usize,
        /// The structure's length.
        len: usize,
    },
    /// An argument or type the structures do not support.
    #[error("{0}")]
    InvalidArgument(String),
    /// The system allocator refused memory for a local copy.
    #[error("out of local memory for object copies")]
    OutOfLocalMemory,
    /// A call that waits for eviction was made with a scope open on the
    /// same thread (it would wait for itself).
    #[error("a dereference scope is open on this thread; close it first")]
    ScopeOpen,
    /// A memory server returned an offload reply that does not decode.
    #[error("malformed offload reply: {0}")]
    BadReply(String),
}

/// Result of far-object operations.
pub type Result<T, E = ObjError> = std::result::Result<T, E>;

/// A shared reference to a far object's local copy, valid for its scope.
#[derive(Debug)]
pub struct Ref<'a, T> {
    r: &'a T,
}

impl<T> std::ops::Deref for Ref<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        self.r
    }
}

/// A mutable reference to a far object's local copy, valid for its scope;
/// the object is marked dirty.
#[derive(Debug)]
pub struct RefMut<'a, T> {
    r: &'a mut T,
}

impl<T> std::ops::Deref for RefMut<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        self.r
    }
}

impl<T> std::ops::DerefMut for RefMut<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        self.r
    }
}

/// Checks that `T` can live in an object copy (16-byte aligned, non-empty).
fn check_type<T>() -> Result<()> {
    if std::mem::size_of::<T>() == 0 {
        return Err(ObjError::InvalidArgument(format!(
            "{} has no bytes to keep far",
            std::any::type_name::<T>()
        )));
    }
    if std::mem::align_of::<T>() > arena::ALIGN {
        return Err(ObjError::InvalidArgument(format!(
            "{} needs alignment {}, far objects give {}",
            std::any::type_name::<T>(),
            std::mem::align_of::<T>(),
            arena::ALIGN
        )));
    }
    Ok(())
}
