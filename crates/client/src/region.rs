//! Regions: far byte ranges, and the operations on them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::RwLock;
use remora_proto::ctl::{Redundancy, RegionMap};
use remora_proto::data::{self, BatchBuilder, OffloadOp, Reply, Request, SubOp, SubResult, Target};
use remora_proto::ErrorCode;

use crate::conn::Conn;
use crate::{ClientError, FarBarrier, FarMutex, Inner, Result};

#[path = "redundant.rs"]
mod redundant;

/// Stripe locks per region (erasure coding; see `redundant`).
const STRIPE_LOCKS: usize = 64;

/// Bits of a chase's `slab_base` (and of node links) that carry the
/// caller's tag rather than a region offset.
const CHASE_TAG_MASK: u64 = !((1 << 48) - 1);

/// A far memory region `[0, size)` of one tenant.
///
/// Cheap to share between threads (`&Region` is enough for every operation).
#[derive(Debug)]
pub struct Region {
    inner: Arc<Inner>,
    id: u64,
    map: RwLock<Arc<RegionMap>>,
    redundancy: Redundancy,
    /// Erasure-coded regions: this client's writes to a stripe hold its lock
    /// shared, and reconstructions and parity repairs hold it exclusive, so
    /// that this client never decodes a stripe it is half-way through
    /// updating. Indexed by stripe modulo [`STRIPE_LOCKS`].
    stripes: Vec<RwLock<()>>,
}

/// One request in flight: the connection, the request id, and where its
/// bytes go in the caller's buffer.
#[derive(Debug)]
struct Part {
    conn: Arc<Conn>,
    id: u64,
    buf_off: usize,
    len: usize,
}

/// A failed attempt, and whether the request may have reached the server.
struct Attempt {
    err: ClientError,
    sent: bool,
}

impl From<ClientError> for Attempt {
    fn from(err: ClientError) -> Self {
        Attempt { err, sent: true }
    }
}

/// When a request that may have reached a server can be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Always (reads, writes: applying twice is harmless).
    Idempotent,
    /// Only if the server refused it before applying anything.
    Atomic,
    /// Only if the server refused it before applying anything, and not
    /// after a lost reply (an overlapping copy applied twice would copy
    /// its own output).
    Refused,
    /// Never (a batch with atomics may have been applied in part).
    Never,
}

fn unsent(err: ClientError) -> Attempt {
    Attempt { err, sent: false }
}

impl Region {
    pub(crate) fn new(inner: Arc<Inner>, map: RegionMap) -> Result<Self> {
        validate(&inner, &map)?;
        Ok(Region {
            inner,
            id: map.id,
            redundancy: map.redundancy,
            map: RwLock::new(Arc::new(map)),
            stripes: (0..STRIPE_LOCKS).map(|_| RwLock::new(())).collect(),
        })
    }

    /// Region id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Region name, if named.
    pub fn name(&self) -> Option<String> {
        self.map.read().name.clone()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.map.read().size
    }

    /// How the region survives the loss of servers.
    pub fn redundancy(&self) -> Redundancy {
        self.redundancy
    }

    /// Bytes per slab.
    pub fn slab_size(&self) -> u64 {
        self.map.read().slab_size
    }

    /// The cached map's version.
    pub fn version(&self) -> u64 {
        self.map.read().version
    }

    /// The cached region→slab map.
    pub fn map(&self) -> Arc<RegionMap> {
        self.map.read().clone()
    }

    /// Fetches the current map from the controller.
    pub fn refresh(&self) -> Result<()> {
        let m = self.inner.get_map(self.id)?;
        validate(&self.inner, &m)?;
        {
            let cur = self.map.read();
            if m.size != cur.size
                || m.slab_size != cur.slab_size
                || m.redundancy != cur.redundancy
                || m.slabs.len() != cur.slabs.len()
            {
                return Err(ClientError::Protocol {
                    addr: self.inner.controller.clone(),
                    detail: format!("region {} changed shape in a new map", self.id),
                });
            }
        }
        *self.map.write() = Arc::new(m);
        Ok(())
    }

    fn check_range(&self, map: &RegionMap, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= map.size => Ok(()),
            _ => Err(ClientError::OutOfRange {
                region: self.id,
                offset,
                len,
                size: map.size,
            }),
        }
    }

    /// Splits `[offset, offset+len)` at slab boundaries and at `max_io`.
    fn pieces(
        &self,
        map: &RegionMap,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, usize, usize) -> Result<(), Attempt>,
    ) -> Result<(), Attempt> {
        self.check_range(map, offset, len).map_err(unsent)?;
        let ss = map.slab_size;
        let max_io = self.inner.opts.max_io.max(1) as u64;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let slab = (pos / ss) as usize;
            let in_slab = pos % ss;
            let n = (ss - in_slab).min(len - done).min(max_io);
            f(slab, in_slab, n as usize, done as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Where byte `offset` of slab `slab` lives; a lost slab (its server
    /// died, and the region has no redundancy) is an error.
    fn target<'m>(
        &self,
        map: &'m RegionMap,
        slab: usize,
        offset: u64,
    ) -> Result<(Target, &'m str), Attempt> {
        let loc = &map.slabs[slab];
        if loc.lost {
            return Err(unsent(self.lost(map, slab, offset)));
        }
        Ok((
            Target {
                slab: loc.slab,
                key: loc.key,
                offset,
            },
            &loc.addr,
        ))
    }

    /// Where a request on byte `offset` of data slab `slab` goes: its one
    /// slab, or with replication the first live copy (`all`: every live
    /// copy, for writes).
    fn targets<'m>(
        &self,
        map: &'m RegionMap,
        slab: usize,
        offset: u64,
        all: bool,
    ) -> Result<Vec<(Target, &'m str)>, Attempt> {
        match map.redundancy {
            Redundancy::None => Ok(vec![self.target(map, slab, offset)?]),
            Redundancy::Replicate(_) => {
                let n = map.slabs.len();
                let mut v: Vec<(Target, &str)> = map
                    .group_of(slab)
                    .into_iter()
                    .map(|i| {
                        if i < n {
                            &map.slabs[i]
                        } else {
                            &map.extra[i - n]
                        }
                    })
                    .filter(|l| !l.lost)
                    .map(|l| {
                        (
                            Target {
                                slab: l.slab,
                                key: l.key,
                                offset,
                            },
                            l.addr.as_str(),
                        )
                    })
                    .collect();
                if v.is_empty() {
                    return Err(unsent(self.lost(map, slab, offset)));
                }
                if !all {
                    v.truncate(1);
                }
                Ok(v)
            }
            Redundancy::Erasure { .. } => Err(unsent(self.unsupported("this form"))),
        }
    }

    fn lost(&self, map: &RegionMap, slab: usize, offset: u64) -> ClientError {
        ClientError::DataLost {
            region: self.id,
            offset: slab as u64 * map.slab_size + offset,
            detail: format!(
                "slab {slab} was on server {} ({})",
                map.slabs[slab].addr, map.redundancy
            ),
        }
    }

    fn unsupported(&self, what: &str) -> ClientError {
        ClientError::Unsupported {
            region: self.id,
            what: format!(
                "{what} is not available on regions with redundancy ({}); use the blocking forms",
                self.redundancy
            ),
        }
    }

    /// Runs `op` against the current map, refreshing the map or reconnecting
    /// and trying again when that can help. A request that may have reached
    /// the server is retried only if `policy` allows it.
    fn retrying<T>(
        &self,
        policy: Retry,
        mut op: impl FnMut(&RegionMap) -> Result<T, Attempt>,
    ) -> Result<T> {
        let mut attempt = 0;
        let mut frozen_wait = Duration::from_millis(1);
        let started = std::time::Instant::now();
        loop {
            let map = self.map.read().clone();
            let Attempt { err, sent } = match op(&map) {
                Ok(v) => return Ok(v),
                Err(a) => a,
            };
            let code = err.code();
            // Codes with which the server refuses before applying anything.
            let refused = matches!(
                code,
                Some(
                    ErrorCode::UnknownSlab
                        | ErrorCode::BadCapability
                        | ErrorCode::SlabFrozen
                        | ErrorCode::NotReady
                        | ErrorCode::Fenced
                        | ErrorCode::Overloaded
                )
            );
            let may = !sent
                || match policy {
                    Retry::Idempotent => true,
                    // The request id makes a resend safe (the operation
                    // checks it goes to the same slab).
                    Retry::Atomic => refused || err.is_unavailable(),
                    Retry::Refused => refused,
                    Retry::Never => false,
                };
            if !may {
                return Err(err);
            }
            if code == Some(ErrorCode::Overloaded) {
                // The server is at a connection or buffer limit: nothing
                // was applied; back off and try again until the deadline.
                if started.elapsed() > self.inner.opts.request_timeout {
                    return Err(err);
                }
                std::thread::sleep(frozen_wait);
                frozen_wait = (frozen_wait * 2).min(Duration::from_millis(50));
                continue;
            }
            if matches!(code, Some(ErrorCode::SlabFrozen | ErrorCode::Fenced)) {
                // A slab is being moved: wait for the new map.
                if started.elapsed() > self.inner.opts.request_timeout {
                    return Err(err);
                }
                std::thread::sleep(frozen_wait);
                frozen_wait = (frozen_wait * 2).min(Duration::from_millis(50));
                self.refresh()?;
                continue;
            }
            attempt += 1;
            if attempt > self.inner.opts.retries {
                return Err(err);
            }
            match code {
                Some(ErrorCode::UnknownSlab | ErrorCode::BadCapability) => {
                    self.refresh()?;
                    if self.version() == map.version {
                        // The controller has nothing newer: the slab is gone.
                        return Err(err);
                    }
                }
                Some(ErrorCode::ServerUnavailable | ErrorCode::NotReady) => {
                    for loc in map.pieces() {
                        self.inner.forget_conn(&loc.addr);
                    }
                    std::thread::sleep(Duration::from_millis(20 * attempt as u64));
                    // The region may have moved while the server was away.
                    let _ = self.refresh();
                }
                _ => return Err(err),
            }
        }
    }

    fn submit(&self, addr: &str, req: &Request<'_>) -> Result<(Arc<Conn>, u64), Attempt> {
        let cap = req.capability().unwrap_or((0, 0));
        let conn = self.inner.conn(addr, cap).map_err(unsent)?;
        let id = conn
            .submit(|b, id| data::encode_request(b, id, req))
            .map_err(unsent)?;
        Ok((conn, id))
    }

    /// Sends one request per piece of `[offset, offset+len)`; `make` builds
    /// it from the piece's target, offset in the caller's buffer and length.
    /// With `all`, to every live copy (writes of replicated regions).
    fn start_pieces<'d>(
        &self,
        map: &RegionMap,
        offset: u64,
        len: usize,
        all: bool,
        make: impl Fn(Target, usize, usize) -> Request<'d>,
    ) -> Result<Vec<Part>, Attempt> {
        let mut parts = Vec::new();
        self.pieces(map, offset, len as u64, |slab, off, n, buf_off| {
            for (at, addr) in self.targets(map, slab, off, all)? {
                let (conn, id) = self.submit(addr, &make(at, buf_off, n))?;
                parts.push(Part {
                    conn,
                    id,
                    buf_off,
                    len: n,
                });
            }
            Ok(())
        })
        .inspect_err(|_| abandon(&parts))?;
        Ok(parts)
    }

    fn start_read(&self, map: &RegionMap, offset: u64, len: usize) -> Result<Vec<Part>, Attempt> {
        self.start_pieces(map, offset, len, false, |at, _, n| Request::Read {
            at,
            len: n as u32,
        })
    }

    fn start_write(
        &self,
        map: &RegionMap,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Vec<Part>, Attempt> {
        self.start_pieces(map, offset, bytes.len(), true, |at, buf_off, n| {
            Request::Write {
                at,
                data: &bytes[buf_off..buf_off + n],
            }
        })
    }

    fn start_atomic(
        &self,
        map: &RegionMap,
        offset: u64,
        make: impl FnOnce(Target) -> Request<'static>,
    ) -> Result<Vec<Part>, Attempt> {
        self.check_range(map, offset, 8).map_err(unsent)?;
        if !offset.is_multiple_of(8) {
            return Err(unsent(ClientError::Unaligned {
                region: self.id,
                offset,
            }));
        }
        let slab = (offset / map.slab_size) as usize;
        let (at, addr) = self.target(map, slab, offset % map.slab_size)?;
        let (conn, id) = self.submit(addr, &make(at))?;
        Ok(vec![Part {
            conn,
            id,
            buf_off: 0,
            len: 8,
        }])
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.redundancy != Redundancy::None {
            return self.redundant_read(offset, buf);
        }
        self.retrying(Retry::Idempotent, |map| {
            let parts = self.start_read(map, offset, buf.len())?;
            wait_all(parts, |p, k, d| fill(p, k, d, buf))
        })
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.redundancy != Redundancy::None {
            return self.redundant_write(offset, data);
        }
        self.retrying(Retry::Idempotent, |map| {
            let parts = self.start_write(map, offset, data)?;
            wait_all(parts, expect_done)
        })
    }

    /// Atomically sets the 8-byte word at `offset` to `new` if it equals
    /// `expected`; returns the previous value (equal to `expected` on success).
    pub fn compare_and_swap(&self, offset: u64, expected: u64, new: u64) -> Result<u64> {
        let rid = self.inner.next_rid();
        if self.redundancy != Redundancy::None {
            return self.redundant_atomic(
                offset,
                rid,
                |old| if old == expected { new } else { old },
                |at, rid| Request::Cas {
                    at,
                    expected,
                    new,
                    rid,
                },
            );
        }
        self.atomic_once(offset, move |at| Request::Cas {
            at,
            expected,
            new,
            rid,
        })
    }

    /// Runs an atomic with a request id: resent after a lost reply or a
    /// reconnect (the server applies it once), but never to another slab
    /// than the one that may have applied it.
    fn atomic_once(&self, offset: u64, make: impl Fn(Target) -> Request<'static>) -> Result<u64> {
        let tried: std::cell::Cell<Option<u64>> = std::cell::Cell::new(None);
        self.retrying(Retry::Atomic, |map| {
            let slab = (offset / map.slab_size.max(1)) as usize;
            if let (Some(prev), Some(loc)) = (tried.get(), map.slabs.get(slab)) {
                if prev != loc.slab {
                    return Err(Attempt {
                        err: ClientError::OutcomeUnknown {
                            region: self.id,
                            offset,
                            detail: "its reply was lost and its slab moved or was lost".into(),
                        },
                        sent: true,
                    });
                }
            }
            let parts = self.start_atomic(map, offset, &make)?;
            let mut v = 0;
            match wait_all(parts, |p, k, d| value(p, k, d, &mut v)) {
                Ok(()) => Ok(v),
                Err(a) => {
                    // No reply: the server may have applied it.
                    if a.err.is_unavailable() {
                        if let Some(loc) = map.slabs.get(slab) {
                            tried.set(Some(loc.slab));
                        }
                    }
                    Err(a)
                }
            }
        })
    }

    /// Atomically adds `delta` (wrapping) to the 8-byte word at `offset`; returns the previous value.
    pub fn fetch_add(&self, offset: u64, delta: u64) -> Result<u64> {
        let rid = self.inner.next_rid();
        if self.redundancy != Redundancy::None {
            return self.redundant_atomic(
                offset,
                rid,
                |old| old.wrapping_add(delta),
                |at, rid| Request::Faa { at, delta, rid },
            );
        }
        self.atomic_once(offset, move |at| Request::Faa { at, delta, rid })
    }

    /// Starts a read of `len` bytes at `offset`; the future yields the bytes.
    ///
    /// The requests are sent before this returns, so several futures overlap
    /// even before they are polled. Async forms are not retried: on error,
    /// the caller decides (the sync forms retry). Dropping the future
    /// abandons the result (the request may still be executed).
    pub fn read_async(&self, offset: u64, len: usize) -> ReadFuture {
        if matches!(self.redundancy, Redundancy::Erasure { .. }) {
            return ReadFuture::new(Err(unsent(self.unsupported("read_async"))), len);
        }
        let map = self.map.read().clone();
        ReadFuture::new(self.start_read(&map, offset, len), len)
    }

    /// Starts a write of `data` at `offset` (the data is sent before this returns).
    pub fn write_async(&self, offset: u64, data: &[u8]) -> OpFuture<()> {
        if matches!(self.redundancy, Redundancy::Erasure { .. }) {
            return OpFuture::new(Err(unsent(self.unsupported("write_async"))), |_| ());
        }
        let map = self.map.read().clone();
        OpFuture::new(self.start_write(&map, offset, data), |_| ())
    }

    /// Starts a compare-and-swap; the future yields the previous value.
    pub fn compare_and_swap_async(&self, offset: u64, expected: u64, new: u64) -> OpFuture<u64> {
        if self.redundancy != Redundancy::None {
            return OpFuture::new(
                Err(unsent(self.unsupported("compare_and_swap_async"))),
                |v| v,
            );
        }
        let map = self.map.read().clone();
        let rid = self.inner.next_rid();
        OpFuture::new(
            self.start_atomic(&map, offset, |at| Request::Cas {
                at,
                expected,
                new,
                rid,
            }),
            |v| v,
        )
    }

    /// Starts a fetch-and-add; the future yields the previous value.
    pub fn fetch_add_async(&self, offset: u64, delta: u64) -> OpFuture<u64> {
        if self.redundancy != Redundancy::None {
            return OpFuture::new(Err(unsent(self.unsupported("fetch_add_async"))), |v| v);
        }
        let map = self.map.read().clone();
        let rid = self.inner.next_rid();
        OpFuture::new(
            self.start_atomic(&map, offset, |at| Request::Faa { at, delta, rid }),
            |v| v,
        )
    }

    /// Reads several ranges, one batch frame per server.
    pub fn read_vectored(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        if matches!(self.redundancy, Redundancy::Erasure { .. }) {
            for (off, buf) in reqs.iter_mut() {
                self.read(*off, buf)?;
            }
            return Ok(());
        }
        let mut b = self.batch();
        for (off, buf) in reqs.iter() {
            b.read(*off, buf.len());
        }
        let results = b.execute()?;
        for ((_, buf), r) in reqs.iter_mut().zip(results) {
            if let BatchResult::Data(d) = r {
                remora_proto::copy::copy(buf, &d);
            }
        }
        Ok(())
    }

    /// Writes several ranges, one batch frame per server.
    pub fn write_vectored(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        if matches!(self.redundancy, Redundancy::Erasure { .. }) {
            for (off, data) in reqs {
                self.write(*off, data)?;
            }
            return Ok(());
        }
        let mut b = self.batch();
        for (off, data) in reqs {
            b.write(*off, data);
        }
        b.execute().map(|_| ())
    }

    /// A batch of operations sent as one frame per server.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            region: self,
            ops: Vec::new(),
        }
    }

    /// Runs `op` on the memory server holding the bytes at region offset
    /// `offset`, and returns the bytes of its DATA reply (empty for a copy,
    /// which replies DONE). Decode them with the types in
    /// [`crate::offload`]: `AggregateReply`, `FilterReply`, `ProbeReply`,
    /// `ChaseReply`.
    ///
    /// The operation's extent from `offset` ([`OffloadOp::extent`]: the
    /// elements of an aggregate or filter, a probe's first bucket, a
    /// chase's first node, the bytes of a copy) must lie in one slab of the
    /// region, or the call fails with [`ClientError::InvalidArgument`]
    /// before anything is sent (as it does for parameters that
    /// [`OffloadOp::validate`] refuses). A probe that reaches the slab's
    /// end, or a chase whose next node is in another slab, stops there and
    /// says where to go on from.
    ///
    /// * [`OffloadOp::Chase`]: node links are region offsets, optionally
    ///   tagged in their top 16 bits (a region is smaller than 2^48 bytes;
    ///   far objects put the region's index there, so that a link into
    ///   another region never matches this slab). The client sets the low
    ///   48 bits of `slab_base` to the region offset of the slab holding
    ///   `offset` and keeps the caller's tag bits.
    /// * [`OffloadOp::Copy`]: `dest.offset` is the destination's region
    ///   offset (`dest.slab` and `dest.key` are filled in); the destination
    ///   range must also lie in one slab, on the same server as the source
    ///   ([`ClientError::Unsupported`] otherwise: read and write instead).
    ///
    /// Read-only operations are retried like reads; a copy is retried like
    /// a write, except that an overlapping one is resent only when the
    /// server refused it unapplied. On replicated regions the read-only
    /// operations go to one live copy, as reads do; erasure-coded regions,
    /// and copies on any region with redundancy, are refused with
    /// [`ClientError::Unsupported`].
    pub fn offload(&self, offset: u64, op: &OffloadOp<'_>) -> Result<Vec<u8>> {
        op.validate().map_err(|e| ClientError::InvalidArgument {
            region: self.id,
            detail: format!("offload at offset {offset}: {e}"),
        })?;
        let copy = match *op {
            OffloadOp::Copy { dest, len } => Some((dest.offset, len as u64)),
            _ => None,
        };
        match self.redundancy {
            Redundancy::None => {}
            Redundancy::Replicate(_) if copy.is_none() => {}
            r => {
                let what = if copy.is_some() {
                    format!("offloaded copies are not available on regions with redundancy ({r}); read and write instead")
                } else {
                    format!("offloaded operations are not available on erasure-coded regions ({r}); read the bytes instead")
                };
                return Err(ClientError::Unsupported {
                    region: self.id,
                    what,
                });
            }
        }
        let run = |map: &RegionMap| {
            let (slab, off) = self.within_slab(map, offset, op.extent())?;
            let (at, addr) = self.targets(map, slab, off, false)?.swap_remove(0);
            let op = match *op {
                OffloadOp::Chase {
                    slab_base,
                    next_off,
                    node_len,
                    hops,
                } => OffloadOp::Chase {
                    slab_base: (slab_base & CHASE_TAG_MASK) | (slab as u64 * map.slab_size),
                    next_off,
                    node_len,
                    hops,
                },
                OffloadOp::Copy { dest, len } => {
                    let (dslab, doff) = self.within_slab(map, dest.offset, len as u64)?;
                    let (dest, _) = self.target(map, dslab, doff)?;
                    let (from, to) = (&map.slabs[slab], &map.slabs[dslab]);
                    if from.server_id != to.server_id {
                        return Err(unsent(ClientError::Unsupported {
                            region: self.id,
                            what: format!(
                                "an offloaded copy needs both ranges on one server, but slab {slab} is on {} and slab {dslab} on {}; read and write instead",
                                from.addr, to.addr
                            ),
                        }));
                    }
                    OffloadOp::Copy { dest, len }
                }
                other => other,
            };
            let (conn, id) = self.submit(addr, &Request::Offload { at, op })?;
            conn.wait_with(id, |kind, payload| {
                check(&conn, kind, payload)?;
                match data::decode_reply(kind, payload) {
                    Ok(Reply::Data(d)) if copy.is_none() => Ok(remora_proto::copy::to_vec(d)),
                    Ok(Reply::Done) if copy.is_some() => Ok(Vec::new()),
                    _ => Err(protocol(
                        &conn,
                        "unexpected reply to an offloaded operation",
                    )),
                }
            })
            .and_then(|r| r)
            .map_err(Attempt::from)
        };
        if let Redundancy::Replicate(_) = self.redundancy {
            return self.settle(run);
        }
        let overlapping = copy.is_some_and(|(dest, len)| {
            offset < dest.saturating_add(len) && dest < offset.saturating_add(len)
        });
        let policy = if overlapping {
            Retry::Refused
        } else {
            Retry::Idempotent
        };
        self.retrying(policy, run)
    }

    /// The slab holding `[offset, offset + len)` and the offset in it; the
    /// range must lie in the region and in one slab.
    fn within_slab(&self, map: &RegionMap, offset: u64, len: u64) -> Result<(usize, u64), Attempt> {
        self.check_range(map, offset, len).map_err(unsent)?;
        let ss = map.slab_size;
        let (slab, off) = ((offset / ss) as usize, offset % ss);
        if off + len > ss {
            return Err(unsent(ClientError::InvalidArgument {
                region: self.id,
                detail: format!(
                    "the {len} bytes an offloaded operation needs at offset {offset} cross the slab boundary at {} (slabs of {ss} bytes); split it there",
                    offset - off + ss
                ),
            }));
        }
        Ok((slab, off))
    }

    /// A distributed mutex on the 8-byte word at `offset` (which must start at 0).
    pub fn mutex(&self, offset: u64) -> FarMutex<'_> {
        FarMutex::new(self, offset)
    }

    /// A barrier for `parties` participants on the two 8-byte words at `offset`
    /// (which must start at 0).
    pub fn barrier(&self, offset: u64, parties: u64) -> FarBarrier<'_> {
        FarBarrier::new(self, offset, parties)
    }
}

/// Checks that a map from the controller covers its region exactly, so that
/// offset arithmetic on it can neither divide by zero nor index past it.
fn validate(inner: &Inner, m: &RegionMap) -> Result<()> {
    let n = m.slabs.len() as u64;
    let shape_ok = m.redundancy.validate().is_ok()
        && m.extra.len() as u64 == m.redundancy.extra_slabs(n)
        && (!matches!(m.redundancy, Redundancy::Erasure { .. })
            || m.slab_size.is_multiple_of(remora_proto::erasure::BLOCK));
    if !shape_ok {
        return Err(ClientError::Protocol {
            addr: inner.controller.clone(),
            detail: format!(
                "region {} map has {} redundant slabs for {} data slabs with {}",
                m.id,
                m.extra.len(),
                n,
                m.redundancy
            ),
        });
    }
    if m.slab_size == 0 || m.slabs.len() as u64 != m.size.div_ceil(m.slab_size) {
        return Err(ClientError::Protocol {
            addr: inner.controller.clone(),
            detail: format!(
                "region {} map has {} slabs of {} bytes for {} bytes",
                m.id,
                m.slabs.len(),
                m.slab_size,
                m.size
            ),
        });
    }
    Ok(())
}

fn abandon(parts: &[Part]) {
    for p in parts {
        p.conn.abandon(p.id);
    }
}

/// Turns an error reply into the server's error.
fn check(conn: &Conn, kind: u16, payload: &[u8]) -> Result<()> {
    if kind == data::reply::ERROR {
        return Err(match data::decode_reply(kind, payload) {
            Ok(Reply::Error { code, message }) => ClientError::Remote {
                addr: conn.addr().to_string(),
                code,
                message: message.to_string(),
            },
            _ => protocol(conn, "undecodable error reply"),
        });
    }
    Ok(())
}

fn protocol(conn: &Conn, detail: &str) -> ClientError {
    ClientError::Protocol {
        addr: conn.addr().to_string(),
        detail: detail.to_string(),
    }
}

fn fill(p: &Part, kind: u16, payload: &[u8], buf: &mut [u8]) -> Result<()> {
    check(&p.conn, kind, payload)?;
    match data::decode_reply(kind, payload) {
        Ok(Reply::Data(d)) if d.len() == p.len => {
            remora_proto::copy::copy(&mut buf[p.buf_off..p.buf_off + p.len], d);
            Ok(())
        }
        _ => Err(protocol(&p.conn, "expected data of the requested length")),
    }
}

/// Appends a part's data; the buffer must end exactly where the part starts
/// (parts taken in offset order).
fn append(p: &Part, kind: u16, payload: &[u8], buf: &mut Vec<u8>) -> Result<()> {
    check(&p.conn, kind, payload)?;
    match data::decode_reply(kind, payload) {
        Ok(Reply::Data(d)) if d.len() == p.len && buf.len() == p.buf_off => {
            remora_proto::copy::extend(buf, d);
            Ok(())
        }
        _ => Err(protocol(&p.conn, "expected data of the requested length")),
    }
}

fn expect_done(p: &Part, kind: u16, payload: &[u8]) -> Result<()> {
    check(&p.conn, kind, payload)?;
    match data::decode_reply(kind, payload) {
        Ok(Reply::Done) => Ok(()),
        _ => Err(protocol(&p.conn, "expected done")),
    }
}

fn value(p: &Part, kind: u16, payload: &[u8], out: &mut u64) -> Result<()> {
    check(&p.conn, kind, payload)?;
    match data::decode_reply(kind, payload) {
        Ok(Reply::Value(v)) => {
            *out = v;
            Ok(())
        }
        Ok(Reply::Done) => Ok(()),
        _ => Err(protocol(&p.conn, "expected a value")),
    }
}

/// Waits for every part, handing each reply to `each`; returns the first error.
fn wait_all(
    parts: Vec<Part>,
    mut each: impl FnMut(&Part, u16, &[u8]) -> Result<()>,
) -> Result<(), Attempt> {
    let mut first: Option<ClientError> = None;
    for p in &parts {
        if first.is_some() {
            p.conn.abandon(p.id);
            continue;
        }
        let r = p
            .conn
            .wait_with(p.id, |kind, payload| each(p, kind, payload));
        if let Err(e) = r.and_then(|x| x) {
            first = Some(e);
        }
    }
    match first {
        None => Ok(()),
        Some(e) => Err(e.into()),
    }
}

/// The requests of one async operation, polled together.
#[derive(Debug)]
struct Inflight {
    parts: Vec<Part>,
    done: Vec<bool>,
    err: Option<ClientError>,
}

impl Inflight {
    fn new(r: Result<Vec<Part>, Attempt>) -> Self {
        let (parts, err) = match r {
            Ok(p) => (p, None),
            Err(a) => (Vec::new(), Some(a.err)),
        };
        Inflight {
            done: vec![false; parts.len()],
            parts,
            err,
        }
    }

    /// Blocks until every part is done, handing each reply to `each`.
    fn wait(&mut self, each: impl FnMut(&Part, u16, &[u8]) -> Result<()>) -> Result<()> {
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        self.done.fill(true);
        wait_all(std::mem::take(&mut self.parts), each).map_err(|a| a.err)
    }

    /// Polls every part not yet done; ready when all are, or at the first error.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut each: impl FnMut(&Part, u16, &[u8]) -> Result<()>,
    ) -> Poll<Result<()>> {
        let mut pending = false;
        for i in 0..self.parts.len() {
            if self.done[i] || self.err.is_some() {
                continue;
            }
            let p = &self.parts[i];
            match p.conn.poll(p.id, cx) {
                Poll::Ready(r) => {
                    self.done[i] = true;
                    if let Err(e) = r.and_then(|f| each(p, f.kind, &f.payload)) {
                        self.err = Some(e);
                    }
                }
                Poll::Pending => pending = true,
            }
        }
        if let Some(e) = self.err.take() {
            self.abandon_rest();
            return Poll::Ready(Err(e));
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn abandon_rest(&mut self) {
        for (i, p) in self.parts.iter().enumerate() {
            if !self.done[i] {
                p.conn.abandon(p.id);
                self.done[i] = true;
            }
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.abandon_rest();
    }
}

/// Future of [`Region::read_async`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled or waited"]
pub struct ReadFuture {
    inflight: Inflight,
    buf: Vec<u8>,
    len: usize,
}

impl ReadFuture {
    fn new(r: Result<Vec<Part>, Attempt>, len: usize) -> Self {
        // Filled by appending in offset order where possible, so the buffer
        // is never zeroed first (see `append`).
        let buf = if r.is_ok() {
            Vec::with_capacity(len)
        } else {
            Vec::new()
        };
        ReadFuture {
            inflight: Inflight::new(r),
            buf,
            len,
        }
    }

    /// Blocks the calling thread until the read completes.
    pub fn wait(mut self) -> Result<Vec<u8>> {
        let mut buf = std::mem::take(&mut self.buf);
        // `wait` hands the parts over in offset order.
        self.inflight.wait(|p, k, d| append(p, k, d, &mut buf))?;
        Ok(buf)
    }
}

impl Future for ReadFuture {
    type Output = Result<Vec<u8>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let buf = &mut this.buf;
        let len = this.len;
        // Parts may complete in any order here: append when in order,
        // otherwise zero the buffer once and fill in place.
        match this.inflight.poll(cx, |p, k, d| {
            if buf.len() == p.buf_off {
                append(p, k, d, buf)
            } else {
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                fill(p, k, d, buf)
            }
        }) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(std::mem::take(&mut this.buf))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Future of a write or an atomic; yields `()` or the previous value.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled or waited"]
pub struct OpFuture<T> {
    inflight: Inflight,
    value: u64,
    map: fn(u64) -> T,
}

impl<T> OpFuture<T> {
    fn new(r: Result<Vec<Part>, Attempt>, map: fn(u64) -> T) -> Self {
        OpFuture {
            inflight: Inflight::new(r),
            value: 0,
            map,
        }
    }

    /// Blocks the calling thread until the operation completes.
    pub fn wait(mut self) -> Result<T> {
        let mut v = 0;
        self.inflight.wait(|p, k, d| value(p, k, d, &mut v))?;
        Ok((self.map)(v))
    }
}

impl<T> Unpin for OpFuture<T> {}

impl<T> Future for OpFuture<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let v = &mut this.value;
        match this.inflight.poll(cx, |p, k, d| value(p, k, d, v)) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok((this.map)(this.value))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Debug, Clone)]
enum BatchOp {
    Read { off: u64, len: usize },
    Write { off: u64, data: Vec<u8> },
    Cas { off: u64, expected: u64, new: u64 },
    Faa { off: u64, delta: u64 },
}

/// Result of one operation of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// Bytes read.
    Data(Vec<u8>),
    /// Write done.
    Done,
    /// Previous value of an atomic.
    Value(u64),
}

/// A batch of region operations, sent as one frame per server (split where
/// frames would grow past the client's `max_io`).
///
/// Operations on different servers run in parallel; operations in one frame
/// run in order. A batch that holds no atomic is retried like a read or
/// write; one with atomics is not retried once sent.
#[derive(Debug)]
pub struct Batch<'r> {
    region: &'r Region,
    ops: Vec<BatchOp>,
}

/// Where one sub-operation's result goes: (operation index, byte offset in
/// it, bytes expected).
type Dest = (usize, usize, usize);

/// A batch frame being built: sub-operations, their destinations, reply bytes so far.
type PendingFrame = (BatchBuilder, Vec<Dest>, usize);

impl Batch<'_> {
    /// Adds a read of `len` bytes at `off`.
    pub fn read(&mut self, off: u64, len: usize) -> &mut Self {
        self.ops.push(BatchOp::Read { off, len });
        self
    }

    /// Adds a write.
    pub fn write(&mut self, off: u64, data: &[u8]) -> &mut Self {
        self.ops.push(BatchOp::Write {
            off,
            data: remora_proto::copy::to_vec(data),
        });
        self
    }

    /// Adds a compare-and-swap.
    pub fn compare_and_swap(&mut self, off: u64, expected: u64, new: u64) -> &mut Self {
        self.ops.push(BatchOp::Cas { off, expected, new });
        self
    }

    /// Adds a fetch-and-add.
    pub fn fetch_add(&mut self, off: u64, delta: u64) -> &mut Self {
        self.ops.push(BatchOp::Faa { off, delta });
        self
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Sends the batch and returns one result per operation, in order.
    pub fn execute(&self) -> Result<Vec<BatchResult>> {
        let atomics = self
            .ops
            .iter()
            .any(|o| matches!(o, BatchOp::Cas { .. } | BatchOp::Faa { .. }));
        match self.region.redundancy {
            Redundancy::None => {}
            Redundancy::Replicate(_) if !atomics => {}
            Redundancy::Replicate(_) => {
                return Err(self.region.unsupported("a batch with atomics"));
            }
            Redundancy::Erasure { .. } => return Err(self.region.unsupported("a batch")),
        }
        let idempotent = self
            .ops
            .iter()
            .all(|o| matches!(o, BatchOp::Read { .. } | BatchOp::Write { .. }));
        let policy = if idempotent {
            Retry::Idempotent
        } else {
            Retry::Never
        };
        if let Redundancy::Replicate(_) = self.region.redundancy {
            // Reads and writes only: retried until the map shows the
            // cluster settled (a dead copy marked lost).
            return self.region.settle(|map| self.run(map));
        }
        self.region.retrying(policy, |map| self.run(map))
    }

    fn run<'m>(&self, map: &'m RegionMap) -> Result<Vec<BatchResult>, Attempt> {
        let r = self.region;
        let max = r.inner.opts.max_io.max(64);
        // Per server: frames under construction with their destinations.
        let mut frames: HashMap<&str, Vec<PendingFrame>> = HashMap::new();
        let mut results: Vec<BatchResult> = Vec::with_capacity(self.ops.len());
        let mut push = |addr: &'m str, sub: SubOp<'_>, dest: Dest, reply_len: usize| {
            let list = frames.entry(addr).or_default();
            let need_new = match list.last() {
                None => true,
                Some((b, _, reply)) => {
                    b.frame_len() + 64 + sub_len(&sub) > max
                        || reply + reply_len > max
                        || b.len() >= data::MAX_BATCH_OPS
                }
            };
            if need_new {
                list.push((BatchBuilder::new(), Vec::new(), 0));
            }
            if let Some((b, d, reply)) = list.last_mut() {
                b.push(&sub);
                d.push(dest);
                *reply += reply_len;
            }
        };
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                BatchOp::Read { off, len } => {
                    results.push(BatchResult::Data(vec![0; *len]));
                    r.pieces(map, *off, *len as u64, |slab, so, n, buf_off| {
                        for (at, addr) in r.targets(map, slab, so, false)? {
                            push(
                                addr,
                                SubOp::Read { at, len: n as u32 },
                                (i, buf_off, n),
                                n + 8,
                            );
                        }
                        Ok(())
                    })?;
                }
                BatchOp::Write { off, data } => {
                    results.push(BatchResult::Done);
                    r.pieces(map, *off, data.len() as u64, |slab, so, n, buf_off| {
                        for (at, addr) in r.targets(map, slab, so, true)? {
                            push(
                                addr,
                                SubOp::Write {
                                    at,
                                    data: &data[buf_off..buf_off + n],
                                },
                                (i, buf_off, n),
                                4,
                            );
                        }
                        Ok(())
                    })?;
                }
                BatchOp::Cas { off, .. } | BatchOp::Faa { off, .. } => {
                    results.push(BatchResult::Value(0));
                    r.check_range(map, *off, 8).map_err(unsent)?;
                    if !off.is_multiple_of(8) {
                        return Err(unsent(ClientError::Unaligned {
                            region: r.id,
                            offset: *off,
                        }));
                    }
                    let slab = (*off / map.slab_size) as usize;
                    let (at, addr) = r.target(map, slab, off % map.slab_size)?;
                    let sub = match op {
                        BatchOp::Cas { expected, new, .. } => SubOp::Cas {
                            at,
                            expected: *expected,
                            new: *new,
                        },
                        BatchOp::Faa { delta, .. } => SubOp::Faa { at, delta: *delta },
                        _ => unreachable!("only atomics reach this arm"),
                    };
                    push(addr, sub, (i, 0, 8), 12);
                }
            }
        }
        // Send everything, then collect.
        let mut inflight: Vec<(Arc<Conn>, u64, Vec<Dest>)> = Vec::new();
        for (addr, list) in frames {
            for (b, dests, _) in list {
                match r.submit(addr, &b.as_request()) {
                    Ok((conn, id)) => inflight.push((conn, id, dests)),
                    Err(a) => {
                        for (c, id, _) in &inflight {
                            c.abandon(*id);
                        }
                        // Earlier frames may have been applied.
                        return Err(Attempt {
                            err: a.err,
                            sent: !inflight.is_empty(),
                        });
                    }
                }
            }
        }
        let mut first: Option<ClientError> = None;
        for (conn, id, dests) in inflight {
            if first.is_some() {
                conn.abandon(id);
                continue;
            }
            let res = conn
                .wait_with(id, |kind, payload| {
                    check(&conn, kind, payload)?;
                    let Ok(Reply::Batch(br)) = data::decode_reply(kind, payload) else {
                        return Err(protocol(&conn, "expected a batch reply"));
                    };
                    if br.len() as usize != dests.len() {
                        return Err(protocol(
                            &conn,
                            "batch reply has the wrong number of results",
                        ));
                    }
                    for (sub, (op, at, want)) in br.iter().zip(dests) {
                        match (sub, &mut results[op]) {
                            (Ok(SubResult::Data(d)), BatchResult::Data(buf))
                                if d.len() == want && at + d.len() <= buf.len() =>
                            {
                                remora_proto::copy::copy(&mut buf[at..at + d.len()], d)
                            }
                            (Ok(SubResult::Done), BatchResult::Done) => {}
                            (Ok(SubResult::Value(v)), BatchResult::Value(slot)) => *slot = v,
                            (Ok(SubResult::Error(code)), _) => {
                                return Err(ClientError::Remote {
                                    addr: conn.addr().to_string(),
                                    code,
                                    message: format!("batch operation {op}: {code}"),
                                })
                            }
                            _ => {
                                return Err(protocol(
                                    &conn,
                                    "batch result does not match its operation",
                                ))
                            }
                        }
                    }
                    Ok(())
                })
                .and_then(|r| r);
            if let Err(e) = res {
                first = Some(e);
            }
        }
        match first {
            None => Ok(results),
            Some(e) => Err(e.into()),
        }
    }
}

fn sub_len(s: &SubOp<'_>) -> usize {
    match s {
        SubOp::Write { data, .. } => 30 + data.len(),
        _ => 42,
    }
}
