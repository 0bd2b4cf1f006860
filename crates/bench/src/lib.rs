//! Remora benchmarks. Each prints figures and ratios against a baseline
//! measured in the same run; none asserts a timing.
//!
//! * [`slabs`]: the costs of a slab size (`remora bench slabs`).
//! * [`micro`]: region read/write latency and pipelined throughput against
//!   a raw loopback TCP ping-pong of the same sizes (`remora bench micro`).

pub mod micro;
pub mod slabs;
