//! Remora benchmarks. Each prints figures and ratios against a baseline
//! measured in the same run; none asserts a timing.
//!
//! * [`slabs`]: the costs of a slab size (`remora bench slabs`).
//! * [`micro`]: region read/write latency and pipelined throughput against
//!   a raw loopback TCP ping-pong of the same sizes (`remora bench micro`).
//! * [`paging`]: far page faults and scans at shrinking local memory against
//!   raw userfaultfd, raw TCP and zram swap (`remora bench paging`).
//! * [`objects`]: far objects' dereference cost, hash-map lookups, offloaded
//!   against fetched sums and a random gather, beside local memory and the
//!   paging interface (`remora bench objects`).
//! * [`redundancy`]: none vs replication vs erasure coding, healthy and
//!   through a server's death and rebuild (`remora bench redundancy`).

pub mod micro;
pub mod objects;
pub mod paging;
pub mod redundancy;
pub mod slabs;
pub mod suite;
