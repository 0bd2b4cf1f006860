//! Remora for Rust programs: one crate to depend on.
//!
//! * [`Cluster`] and [`Region`]: the region API (one-sided reads, writes,
//!   atomics, async and batched forms).
//! * [`PagedRegion`]: a far region mapped into the address space.
//! * [`FarAlloc`]: a `#[global_allocator]` that puts the heap in far memory.
//! * [`objects`]: far data structures (`FarBox`, `FarVec`, `FarHashMap`,
//!   `FarList`, `FarQueue`) on an object cache.
//! * [`size`]: parsing sizes such as `512MiB`.

pub use remora_objects as objects;
pub use remora_proto::size;

pub use remora_client::*;
pub use remora_paging::{
    far_heap, Budget, FarAlloc, FarHeap, HeapOptions, PagedRegion, PagerConfig, PagerStats,
    PagingError,
};
