//! Operations on regions with redundancy: replication and erasure coding.
//!
//! **Replicate(n).** Every slab has n copies on n distinct servers; the
//! first copy not marked lost is the primary.
//! * Reads go to the primary; one that fails, or has no reply within
//!   [`crate::ClientOptions::hedge_after`], goes to the next copy at once.
//! * Writes go to every live copy in parallel and are acknowledged when all
//!   have applied them.
//! * Atomics are ordered by the primary: the client applies the atomic
//!   there (with a request id, so a resend is applied once), then moves
//!   each other copy from the primary's old value to its new one with a
//!   compare-and-swap. Because every copy goes through the primary's
//!   transitions in the primary's order, copies agree once the atomics
//!   acknowledged so far have landed; a copy that is behind (an earlier
//!   atomic from another thread or client still on its way) is waited for;
//!   one left behind by a client that died mid-atomic is set to the
//!   primary's value after [`CONVERGE`]. Mixing plain writes and atomics on
//!   the same word concurrently has no defined order across copies.
//!
//! **Erasure(k, m).** Data slab `i` belongs to stripe `i / k`; the stripe's
//! m parity slabs hold Reed–Solomon parity (see `remora_proto::erasure`).
//! * Reads go to the data slab; one whose server is lost, failing or slow
//!   is reconstructed from the other pieces of the stripe (64-byte
//!   aligned). When a piece beyond the k needed is available it is read
//!   too and checked against the decode: a stripe caught between a write's
//!   data swap and its parity update disagrees, and the read is retried.
//! * A write swaps the new bytes into the data slab with a request id (the
//!   server returns the old bytes and keeps them, as the write's record,
//!   until the commit: a resend gets the same answer and writes nothing
//!   twice), XORs the parity delta of the change into every live parity
//!   slab (each XOR with a request id, so a resend applies once), and
//!   commits once every parity update is answered. Deltas commute, so
//!   concurrent writes to different slabs of a stripe need no lock. A
//!   rebuild freezes the stripe, waits for the records to be committed,
//!   and checks its decode against a spare piece when one survives; a
//!   stripe caught mid-write is retried later rather than decoded.
//! * If the data slab is lost and rebuilt while a write is in flight, the
//!   rebuilt slab holds either the write (every parity had it) or the
//!   bytes before it (none had): the client reads which and starts over
//!   if needed.
//! * Within one client, reconstructions of a stripe take its lock
//!   exclusively and writes take it shared. Limit: a client that dies (or
//!   gives up after `failover_timeout`) between swap and parity update
//!   leaves the range's parity stale (the classic write hole); degraded
//!   reads and rebuilds that can check against a spare piece then refuse
//!   that range rather than decode it wrongly, and with M servers lost
//!   there is no spare to check against. Likewise, while a write whose
//!   data slab died is being finished on the rebuilt slab, another
//!   client's write to the same bytes can leave that range inconsistent.
//! * Atomics are refused ([`ClientError::Unsupported`]): use a replicated
//!   region for words that need them.
//!
//! Async and batch forms: on replicated regions reads go to the first live
//! copy and writes to every live copy, in one round of requests (no
//! failover within an async call; a batch is retried as a whole until the
//! map settles); atomics and everything on erasure-coded regions are
//! blocking-only and refused with [`ClientError::Unsupported`] there.
//!
//! Writes to a slab whose server was declared dead wait for its rebuild
//! (replication writes the surviving copies at once). Every operation keeps
//! retrying through failover for [`crate::ClientOptions::failover_timeout`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_proto::ctl::{Redundancy, RegionMap, SlabLoc};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::erasure::{self, Codec};
use remora_proto::ErrorCode;

use super::{check, protocol, unsent, Attempt, Region, STRIPE_LOCKS};
use crate::conn::Conn;
use crate::{ClientError, Result};

/// How long a replica may lag the primary's atomics before it is repaired.
pub(crate) const CONVERGE: Duration = Duration::from_millis(500);
/// Deadline of a parity update. A write holds its stripe's rebuild back
/// until its parity updates are answered, so a parity server that stopped
/// answering must not hold it for the whole request timeout; a late update
/// is repaired by recomputing the range's parity.
const PARITY_DEADLINE: Duration = Duration::from_secs(1);

/// Where an erasure-coded write stands between tries.
#[derive(Debug, Clone)]
enum Stage {
    /// Nothing applied yet (or the stripe is consistent again).
    Fresh,
    /// The swap `rid` on data slab `slab` may or may not have been applied:
    /// resend it.
    Swapping { slab: u64, rid: u64 },
    /// The swap `swap_rid` on data slab `data_slab` was applied; these
    /// parity updates (parity index, request id, parity slab id, delta) are
    /// not yet known to be.
    Parity {
        data_slab: u64,
        swap_rid: u64,
        xors: Vec<(usize, u64, u64, Vec<u8>)>,
    },
    /// The parity has the write but the data slab holding it was lost and
    /// rebuilt: put the bytes into the rebuilt slab.
    Placing,
}

/// A request on its way. Dropped before its reply is taken, it is abandoned.
struct Sent {
    conn: Arc<Conn>,
    id: u64,
    taken: bool,
}

impl Drop for Sent {
    fn drop(&mut self) {
        if !self.taken {
            self.conn.abandon(self.id);
        }
    }
}

/// Waits for a reply and maps it with `f` (`None`: unexpected reply).
fn recv<T>(mut s: Sent, f: impl FnOnce(Reply<'_>) -> Option<T>) -> Result<T, Attempt> {
    s.taken = true;
    let conn = s.conn.clone();
    let r = conn.wait_with(s.id, |kind, payload| {
        check(&conn, kind, payload)?;
        match data::decode_reply(kind, payload) {
            Ok(r) => f(r).ok_or_else(|| protocol(&conn, "unexpected reply")),
            Err(_) => Err(protocol(&conn, "undecodable reply")),
        }
    });
    r.and_then(|x| x).map_err(Attempt::from)
}

/// Waits for a DATA reply of exactly `out.len()` bytes and copies it in.
fn recv_into(s: Sent, out: &mut [u8]) -> Result<(), Attempt> {
    recv(s, |r| match r {
        Reply::Data(d) if d.len() == out.len() => {
            remora_proto::copy::copy(out, d);
            Some(())
        }
        _ => None,
    })
}

fn done(r: Reply<'_>) -> Option<()> {
    matches!(r, Reply::Done).then_some(())
}

/// Errors after which trying again (another copy, a fresh map, later) can
/// help: the server or slab is unavailable, moving, rebuilt or fenced.
fn transient(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::SlabFrozen
                | ErrorCode::Fenced
                | ErrorCode::UnknownSlab
                | ErrorCode::BadCapability
                | ErrorCode::ServerUnavailable
                | ErrorCode::NotReady
                | ErrorCode::Overloaded
        )
    )
}

/// Errors with which a server refused a request before applying it.
fn refused(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::SlabFrozen
                | ErrorCode::Fenced
                | ErrorCode::UnknownSlab
                | ErrorCode::BadCapability
                | ErrorCode::NotReady
                | ErrorCode::Overloaded
        )
    )
}

fn at(loc: &SlabLoc, offset: u64) -> Target {
    Target {
        slab: loc.slab,
        key: loc.key,
        offset,
    }
}

/// The piece at `index` in [`RegionMap::pieces`] order.
fn piece(map: &RegionMap, index: usize) -> &SlabLoc {
    let n = map.slabs.len();
    if index < n {
        &map.slabs[index]
    } else {
        &map.extra[index - n]
    }
}

/// A backup copy of a word on a memory server, for [`crate::chain::follow`].
struct NetCopy<'a> {
    region: &'a Region,
    loc: &'a SlabLoc,
    primary: Option<SlabLoc>,
    off: u64,
    started: Instant,
    wait: Duration,
}

impl crate::chain::WordCopy for NetCopy<'_> {
    fn cas(&mut self, expected: u64, new: u64) -> Result<u64> {
        // No request id: a resent transition that was applied finds the
        // copy already moved, and converges through the repair.
        let req = Request::Cas {
            at: at(self.loc, self.off),
            expected,
            new,
            rid: 0,
        };
        let timeout = self.region.inner.opts.request_timeout;
        let s = self
            .region
            .send_to(self.loc, &req, timeout)
            .map_err(|a| a.err)?;
        recv(s, |r| match r {
            Reply::Value(v) => Some(v),
            _ => None,
        })
        .map_err(|a| a.err)
    }

    fn primary(&mut self) -> Result<u64> {
        let Some(p) = &self.primary else {
            // The primary left the map: the copies are being rebuilt;
            // reading this backup keeps it as it is.
            return self.cas(0, 0);
        };
        let req = Request::Read {
            at: at(p, self.off),
            len: 8,
        };
        let timeout = self.region.inner.opts.request_timeout;
        let s = self.region.send_to(p, &req, timeout).map_err(|a| a.err)?;
        recv(s, |r| match r {
            Reply::Data(d) if d.len() == 8 => {
                let mut w = [0u8; 8];
                w.copy_from_slice(d);
                Some(u64::from_le_bytes(w))
            }
            _ => None,
        })
        .map_err(|a| a.err)
    }

    fn patience_exhausted(&mut self) -> bool {
        self.started.elapsed() > CONVERGE
    }

    fn pause(&mut self) {
        std::thread::sleep(self.wait);
        self.wait = (self.wait * 2).min(Duration::from_millis(2));
    }
}

/// One piece of an operation: a range inside one data slab.
#[derive(Debug, Clone, Copy)]
struct Piece {
    slab: usize,
    off: u64,
    len: usize,
    buf_off: usize,
}

impl Region {
    fn send_to(&self, loc: &SlabLoc, req: &Request<'_>, within: Duration) -> Result<Sent, Attempt> {
        let cap = req.capability().unwrap_or((loc.slab, loc.key));
        let conn = self.inner.conn(&loc.addr, cap).map_err(unsent)?;
        let id = conn
            .submit_within(|b, id| data::encode_request(b, id, req), within)
            .map_err(unsent)?;
        Ok(Sent {
            conn,
            id,
            taken: false,
        })
    }

    fn plan(&self, map: &RegionMap, offset: u64, len: usize) -> Result<Vec<Piece>, Attempt> {
        let mut v = Vec::new();
        self.pieces(map, offset, len as u64, |slab, off, len, buf_off| {
            v.push(Piece {
                slab,
                off,
                len,
                buf_off,
            });
            Ok(())
        })?;
        Ok(v)
    }

    /// Runs `op` until it succeeds, fails for good, or failover takes longer
    /// than `failover_timeout`; between tries it backs off, drops broken
    /// connections and refreshes the map (a controller that is restarting
    /// just leaves the old map in place).
    pub(super) fn settle<T>(
        &self,
        mut op: impl FnMut(&RegionMap) -> Result<T, Attempt>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(1);
        loop {
            let map = self.map.read().clone();
            let err = match op(&map) {
                Ok(v) => return Ok(v),
                Err(a) => a.err,
            };
            if !transient(&err) || started.elapsed() > self.inner.opts.failover_timeout {
                return Err(err);
            }
            if err.is_unavailable() {
                for loc in map.pieces() {
                    self.inner.forget_conn(&loc.addr);
                }
            }
            std::thread::sleep(wait);
            // A frozen stripe is thawed within milliseconds (a rebuild
            // copies one slab at full speed); other waits are for a
            // failure to be detected.
            let cap = if err.code() == Some(ErrorCode::SlabFrozen) {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(50)
            };
            wait = (wait * 2).min(cap);
            let _ = self.refresh();
        }
    }

    /// Live copies of data slab `slab` (replication), primary first.
    fn copies<'m>(&self, map: &'m RegionMap, slab: usize) -> Vec<&'m SlabLoc> {
        map.group_of(slab)
            .into_iter()
            .map(|i| piece(map, i))
            .filter(|l| !l.lost)
            .collect()
    }

    fn group_lost(&self, map: &RegionMap, slab: usize, offset: u64) -> Attempt {
        unsent(ClientError::DataLost {
            region: self.id,
            offset: slab as u64 * map.slab_size + offset,
            detail: format!(
                "more servers of slab {slab}'s group died than {} tolerates",
                map.redundancy
            ),
        })
    }

    /// Deadline of a read's first choice: short when there is somewhere
    /// else to go.
    fn first_try(&self, map: &RegionMap, slab: usize) -> Duration {
        let o = &self.inner.opts;
        let alternatives = match map.redundancy {
            Redundancy::Replicate(_) => self.copies(map, slab).len() > 1,
            _ => true,
        };
        if alternatives {
            o.hedge_after.min(o.request_timeout)
        } else {
            o.request_timeout
        }
    }

    pub(super) fn redundant_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.settle(|map| {
            let plan = self.plan(map, offset, buf.len())?;
            // Every piece's first choice in parallel; hedged.
            let mut sent = Vec::with_capacity(plan.len());
            for p in &plan {
                let within = self.first_try(map, p.slab);
                let first = match map.redundancy {
                    Redundancy::Replicate(_) => self.copies(map, p.slab).first().copied(),
                    _ => Some(&map.slabs[p.slab]).filter(|l| !l.lost),
                };
                let s = first.and_then(|loc| {
                    let req = Request::Read {
                        at: at(loc, p.off),
                        len: p.len as u32,
                    };
                    self.send_to(loc, &req, within).ok()
                });
                sent.push(s);
            }
            for (p, s) in plan.iter().zip(sent) {
                let out = &mut buf[p.buf_off..p.buf_off + p.len];
                let got = s.map(|s| recv_into(s, out));
                match got {
                    Some(Ok(())) => {}
                    Some(Err(a)) if !transient(&a.err) => return Err(a),
                    _ => self.fallback_read(map, p, out)?,
                }
            }
            Ok(())
        })
    }

    /// Reads a piece whose first choice failed: the other copies in turn,
    /// or a reconstruction from the rest of the stripe.
    fn fallback_read(&self, map: &RegionMap, p: &Piece, out: &mut [u8]) -> Result<(), Attempt> {
        match map.redundancy {
            Redundancy::Erasure { data, parity } => {
                self.degraded_read(map, p, out, data as usize, parity as usize)
            }
            _ => {
                let copies = self.copies(map, p.slab);
                if copies.is_empty() {
                    return Err(self.group_lost(map, p.slab, p.off));
                }
                let mut last = None;
                for (i, loc) in copies.iter().enumerate().skip(1) {
                    let within = if i + 1 < copies.len() {
                        self.first_try(map, p.slab)
                    } else {
                        self.inner.opts.request_timeout
                    };
                    let req = Request::Read {
                        at: at(loc, p.off),
                        len: p.len as u32,
                    };
                    let r = self
                        .send_to(loc, &req, within)
                        .and_then(|s| recv_into(s, out));
                    match r {
                        Ok(()) => return Ok(()),
                        Err(a) => last = Some(a),
                    }
                }
                // Only one copy, or all failed: the primary once more, with
                // the full deadline, before the caller refreshes the map.
                let loc = copies[0];
                let req = Request::Read {
                    at: at(loc, p.off),
                    len: p.len as u32,
                };
                self.send_to(loc, &req, self.inner.opts.request_timeout)
                    .and_then(|s| recv_into(s, out))
                    .map_err(|a| last.unwrap_or(a))
            }
        }
    }

    /// Reconstructs a piece of a data slab from the other pieces of its
    /// stripe.
    fn degraded_read(
        &self,
        map: &RegionMap,
        p: &Piece,
        out: &mut [u8],
        k: usize,
        m: usize,
    ) -> Result<(), Attempt> {
        let stripe = p.slab / k;
        let _lock = self.stripes[stripe % STRIPE_LOCKS].write();
        let (a, b) = erasure::align(p.off, p.len as u64, map.slab_size);
        let group = map.group_of(p.slab);
        let in_stripe = group.iter().filter(|&&i| i < map.slabs.len()).count();
        let others: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&i| i != p.slab && !piece(map, i).lost)
            .collect();
        if others.len() < in_stripe {
            let lost = group.iter().filter(|&&i| piece(map, i).lost).count();
            if lost > m {
                return Err(self.group_lost(map, p.slab, p.off));
            }
            // The slab itself is there but did not answer (frozen for a
            // rebuild, slow): too few others to decode, so wait for it.
            return Err(unsent(ClientError::Remote {
                addr: map.slabs[p.slab].addr.clone(),
                code: ErrorCode::SlabFrozen,
                message: format!(
                    "slab {} did not answer and its stripe has {} of {in_stripe} other pieces",
                    p.slab,
                    others.len()
                ),
            }));
        }
        // One piece more than decoding needs, when there is one, to check
        // the decode: a stripe caught between another client's data swap
        // and its parity update decodes to bytes nobody wrote.
        let want = (in_stripe + 1).min(others.len());
        let mut shards: Vec<(usize, Vec<u8>)> = Vec::with_capacity(want);
        let mut next = 0;
        let mut last_err = None;
        // Data pieces first (group order has them first); if some fail,
        // read more of the rest.
        while shards.len() < want && next < others.len() {
            let need = want - shards.len();
            let batch: Vec<usize> = others[next..(next + need).min(others.len())].to_vec();
            next += batch.len();
            let mut sent = Vec::new();
            for &i in &batch {
                let loc = piece(map, i);
                let req = Request::Read {
                    at: at(loc, a),
                    len: (b - a) as u32,
                };
                sent.push((i, self.send_to(loc, &req, self.inner.opts.request_timeout)));
            }
            for (i, s) in sent {
                match s.and_then(|s| {
                    recv(s, |r| match r {
                        Reply::Data(d) if d.len() as u64 == b - a => Some(d.to_vec()),
                        _ => None,
                    })
                }) {
                    Ok(d) => shards.push((i, d)),
                    Err(e) => last_err = Some(e),
                }
            }
        }
        if shards.len() < in_stripe {
            return Err(last_err.unwrap_or_else(|| self.group_lost(map, p.slab, p.off)));
        }
        let n = map.slabs.len();
        let codec = Codec::new(k, m).map_err(|e| unsent(self.codec_error(e)))?;
        let mut dref: Vec<Option<&[u8]>> = vec![None; k];
        let mut pref: Vec<Option<&[u8]>> = vec![None; m];
        for (i, d) in &shards[..in_stripe] {
            if *i < n {
                dref[i % k] = Some(d);
            } else {
                pref[(i - n) % m] = Some(d);
            }
        }
        let zeros: Vec<bool> = (0..k).map(|d| d >= in_stripe).collect();
        let full = codec
            .reconstruct(&dref, &pref, &zeros)
            .map_err(|e| unsent(self.codec_error(e)))?;
        if let Some((i, extra)) = shards.get(in_stripe) {
            let expected = if *i < n {
                full[i % k].clone()
            } else {
                let refs: Vec<Option<&[u8]>> = full
                    .iter()
                    .enumerate()
                    .map(|(d, s)| (!zeros[d]).then_some(&s[..]))
                    .collect();
                let mut ps = codec
                    .encode(&refs)
                    .map_err(|e| unsent(self.codec_error(e)))?;
                ps.swap_remove((i - n) % m)
            };
            if expected != *extra {
                // A write is half-way through the stripe: try again.
                return Err(unsent(ClientError::Remote {
                    addr: piece(map, *i).addr.clone(),
                    code: ErrorCode::SlabFrozen,
                    message: format!(
                        "stripe {stripe} of region {} is being written; its pieces disagree",
                        self.id
                    ),
                }));
            }
        }
        let from = (p.off - a) as usize;
        remora_proto::copy::copy(out, &full[p.slab % k][from..from + p.len]);
        Ok(())
    }

    fn codec_error(&self, e: erasure::CodingError) -> ClientError {
        ClientError::Protocol {
            addr: self.inner.controller.clone(),
            detail: format!("region {}: {e}", self.id),
        }
    }

    pub(super) fn redundant_write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        match self.redundancy {
            Redundancy::Erasure { .. } => {
                let plan = {
                    let map = self.map.read().clone();
                    self.plan(&map, offset, bytes.len()).map_err(|a| a.err)?
                };
                for p in &plan {
                    self.ec_write(p, &bytes[p.buf_off..p.buf_off + p.len])?;
                }
                Ok(())
            }
            _ => self.settle(|map| {
                let plan = self.plan(map, offset, bytes.len())?;
                let mut sent = Vec::new();
                for p in &plan {
                    let copies = self.copies(map, p.slab);
                    if copies.is_empty() {
                        return Err(self.group_lost(map, p.slab, p.off));
                    }
                    for loc in copies {
                        let req = Request::Write {
                            at: at(loc, p.off),
                            data: &bytes[p.buf_off..p.buf_off + p.len],
                        };
                        sent.push(self.send_to(loc, &req, self.inner.opts.request_timeout)?);
                    }
                }
                let mut first = None;
                for s in sent {
                    if let Err(e) = recv(s, done) {
                        first.get_or_insert(e);
                    }
                }
                first.map_or(Ok(()), Err)
            }),
        }
    }

    /// Writes one piece of an erasure-coded region (see the module docs).
    fn ec_write(&self, p: &Piece, bytes: &[u8]) -> Result<()> {
        let mut stage = Stage::Fresh;
        self.settle(|map| {
            let Redundancy::Erasure { data, parity } = map.redundancy else {
                return Err(unsent(ClientError::Protocol {
                    addr: self.inner.controller.clone(),
                    detail: format!("region {} is no longer erasure-coded", self.id),
                }));
            };
            let (k, m) = (data as usize, parity as usize);
            let codec = Codec::new(k, m).map_err(|e| unsent(self.codec_error(e)))?;
            let stripe = p.slab / k;
            let loc = &map.slabs[p.slab];
            let (a, b) = erasure::align(p.off, p.len as u64, map.slab_size);
            let timeout = self.inner.opts.request_timeout;
            let lost_group = || {
                let lost = map
                    .group_of(p.slab)
                    .into_iter()
                    .filter(|&i| piece(map, i).lost)
                    .count();
                if lost > m {
                    self.group_lost(map, p.slab, p.off)
                } else {
                    self.rebuilding(loc, p.slab)
                }
            };
            let shared = self.stripes[stripe % STRIPE_LOCKS].read();
            // Placing bytes without a parity change must not interleave
            // with this client's other writes to the stripe.
            let exclusive = |shared| {
                drop(shared);
                self.stripes[stripe % STRIPE_LOCKS].write()
            };
            let mut swap_rid = None;
            match std::mem::replace(&mut stage, Stage::Fresh) {
                Stage::Fresh => {}
                Stage::Swapping { slab, rid } => {
                    if loc.slab == slab && !loc.lost {
                        // Resent with its request id: the slab answers with
                        // the bytes the first one replaced, writing nothing
                        // twice.
                        swap_rid = Some(rid);
                    } else if loc.lost {
                        // The slab died with the swap's record, and its
                        // parity never saw the change: once it is rebuilt,
                        // start over.
                        return Err(lost_group());
                    }
                }
                Stage::Parity {
                    data_slab,
                    swap_rid,
                    xors,
                } => {
                    // The data took the write: finish the parity updates
                    // whatever became of the data slab since.
                    self.finish_parity(map, stripe, m, a, data_slab, swap_rid, xors, &mut stage)?;
                    if loc.slab == data_slab && !loc.lost {
                        self.commit(loc, swap_rid);
                        return Ok(());
                    }
                    // The data slab was lost (with the swap's record): the
                    // parity has the write; the rebuilt slab must get it too.
                    stage = Stage::Placing;
                    if loc.lost {
                        return Err(lost_group());
                    }
                    let _x = exclusive(shared);
                    return self.place(loc, p, bytes, &mut stage);
                }
                Stage::Placing => {
                    stage = Stage::Placing;
                    if loc.lost {
                        return Err(lost_group());
                    }
                    let _x = exclusive(shared);
                    return self.place(loc, p, bytes, &mut stage);
                }
            }
            if loc.lost {
                return Err(lost_group());
            }
            let rid = swap_rid.unwrap_or_else(|| self.inner.next_rid());
            let swap = Request::Swap {
                at: at(loc, p.off),
                rid,
                data: bytes,
            };
            let s = self.send_to(loc, &swap, timeout)?;
            let old = match recv(s, |r| match r {
                Reply::Data(d) if d.len() == bytes.len() => Some(d.to_vec()),
                _ => None,
            }) {
                Ok(o) => o,
                Err(e) => {
                    // Refused: nothing happened. Otherwise resend it.
                    if !refused(&e.err) || swap_rid.is_some() {
                        stage = Stage::Swapping {
                            slab: loc.slab,
                            rid,
                        };
                    }
                    return Err(e);
                }
            };
            let mut delta = vec![0u8; (b - a) as usize];
            let from = (p.off - a) as usize;
            for (j, (o, n)) in old.iter().zip(bytes).enumerate() {
                delta[from + j] = o ^ n;
            }
            let mut xors = Vec::new();
            if delta.iter().any(|&x| x != 0) {
                let pd = codec
                    .parity_delta(p.slab % k, &delta)
                    .map_err(|e| unsent(self.codec_error(e)))?;
                for (j, (ploc, d)) in map.extra[stripe * m..(stripe + 1) * m]
                    .iter()
                    .zip(pd)
                    .enumerate()
                {
                    // A lost parity slab is recomputed from the data.
                    if !ploc.lost {
                        xors.push((j, self.inner.next_rid(), ploc.slab, d));
                    }
                }
            }
            self.finish_parity(map, stripe, m, a, loc.slab, rid, xors, &mut stage)?;
            self.commit(loc, rid);
            Ok(())
        })
    }

    /// Puts a write's bytes into a data slab rebuilt while the write was in
    /// flight, whose parity already has the write: a plain write, no parity
    /// change (unless the rebuild already decoded the bytes).
    fn place(
        &self,
        loc: &SlabLoc,
        p: &Piece,
        bytes: &[u8],
        stage: &mut Stage,
    ) -> Result<(), Attempt> {
        let timeout = self.inner.opts.request_timeout;
        let req = Request::Read {
            at: at(loc, p.off),
            len: p.len as u32,
        };
        let there = recv(self.send_to(loc, &req, timeout)?, |r| match r {
            Reply::Data(d) => Some(d == bytes),
            _ => None,
        })?;
        if !there {
            let req = Request::Write {
                at: at(loc, p.off),
                data: bytes,
            };
            recv(self.send_to(loc, &req, timeout)?, done)?;
        }
        *stage = Stage::Fresh;
        Ok(())
    }

    /// Ends a swap (the parity has it). Nobody waits for the reply: a
    /// commit lost with its connection only keeps a later rebuild of the
    /// stripe waiting until the swap's record expires.
    fn commit(&self, loc: &SlabLoc, swap_rid: u64) {
        let commit = Request::Commit {
            at: at(loc, 0),
            rid: swap_rid,
        };
        drop(self.send_to(loc, &commit, self.inner.opts.request_timeout));
    }

    /// Sends a write's parity updates (each with its request id, so a
    /// resend applies once). On failure, `stage` holds the updates left for
    /// swap `swap_rid` on data slab `data_slab`; the swap is not committed,
    /// so a rebuild of the stripe waits.
    #[allow(clippy::too_many_arguments)]
    fn finish_parity(
        &self,
        map: &RegionMap,
        stripe: usize,
        m: usize,
        a: u64,
        data_slab: u64,
        swap_rid: u64,
        xors: Vec<(usize, u64, u64, Vec<u8>)>,
        stage: &mut Stage,
    ) -> Result<(), Attempt> {
        let timeout = self.inner.opts.request_timeout.min(PARITY_DEADLINE);
        let mut sent = Vec::new();
        let mut left = Vec::new();
        let mut failed = None;
        for x in xors {
            let ploc = &map.extra[stripe * m + x.0];
            if ploc.lost || ploc.slab != x.2 {
                // Lost, or rebuilt from the data, which has this write.
                continue;
            }
            let req = Request::Xor {
                at: at(ploc, a),
                rid: x.1,
                data: &x.3,
            };
            match self.send_to(ploc, &req, timeout) {
                Ok(s) => sent.push((s, x)),
                Err(e) => {
                    failed.get_or_insert(e);
                    left.push(x);
                }
            }
        }
        for (s, x) in sent {
            if let Err(e) = recv(s, done) {
                failed.get_or_insert(e);
                left.push(x);
            }
        }
        match failed {
            Some(e) => {
                *stage = Stage::Parity {
                    data_slab,
                    swap_rid,
                    xors: left,
                };
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn rebuilding(&self, loc: &SlabLoc, slab: usize) -> Attempt {
        unsent(ClientError::Remote {
            addr: loc.addr.clone(),
            code: ErrorCode::SlabFrozen,
            message: format!("slab {slab} of region {} is being rebuilt", self.id),
        })
    }

    /// An atomic on a replicated region (see the module docs). `apply`
    /// computes the new value from the old; `make` builds the request for
    /// the primary.
    pub(super) fn redundant_atomic(
        &self,
        offset: u64,
        rid: u64,
        apply: impl Fn(u64) -> u64,
        make: impl Fn(Target, u64) -> Request<'static>,
    ) -> Result<u64> {
        if let Redundancy::Erasure { .. } = self.redundancy {
            return Err(self.unsupported_atomic());
        }
        {
            let map = self.map.read().clone();
            self.check_range(&map, offset, 8)?;
        }
        if !offset.is_multiple_of(8) {
            return Err(ClientError::Unaligned {
                region: self.id,
                offset,
            });
        }
        let timeout = self.inner.opts.request_timeout;
        // 1. The primary orders the atomic.
        // An attempt without a reply may have been applied: it is resent
        // (same request id) only to the slab it went to.
        let mut unknown: Vec<u64> = Vec::new();
        let (old, primary_slab) = self.settle(|map| {
            let slab = (offset / map.slab_size) as usize;
            let off = offset % map.slab_size;
            let Some(index) = map
                .group_of(slab)
                .into_iter()
                .find(|&i| !piece(map, i).lost)
            else {
                return Err(self.group_lost(map, slab, off));
            };
            let primary = piece(map, index);
            // Safe to send: nothing was left unanswered, or this very slab
            // was tried (its server applies a request id once). Any other
            // copy may hold the attempt already (a backup repaired from the
            // primary by another client's atomic, or a copy rebuilt from
            // one): the outcome is unknown.
            if !unknown.is_empty() && !unknown.contains(&primary.slab) {
                return Err(unsent(ClientError::OutcomeUnknown {
                    region: self.id,
                    offset,
                    detail: format!(
                        "its reply was lost and the copy that may have applied it was replaced; {} is now the first copy",
                        primary.addr
                    ),
                }));
            }
            let s = self.send_to(primary, &make(at(primary, off), rid), timeout)?;
            let v = recv(s, |r| match r {
                Reply::Value(v) => Some(v),
                _ => None,
            })
            .inspect_err(|a| {
                if a.err.is_unavailable() && !unknown.contains(&primary.slab) {
                    unknown.push(primary.slab);
                }
            })?;
            Ok((v, primary.slab))
        })?;
        let new = apply(old);
        if new == old {
            return Ok(old);
        }
        // 2. Every other copy goes through the same transition.
        self.settle(|map| {
            let slab = (offset / map.slab_size) as usize;
            let off = offset % map.slab_size;
            let copies = self.copies(map, slab);
            for loc in copies {
                if loc.slab == primary_slab {
                    continue;
                }
                self.follow(loc, off, old, new, primary_slab, map)?;
            }
            Ok(old)
        })
    }

    /// Moves one backup copy of a word from `old` to `new` (see
    /// [`crate::chain`]).
    fn follow(
        &self,
        loc: &SlabLoc,
        off: u64,
        old: u64,
        new: u64,
        primary_slab: u64,
        map: &RegionMap,
    ) -> Result<(), Attempt> {
        let primary = map.pieces().find(|l| l.slab == primary_slab).cloned();
        let mut copy = NetCopy {
            region: self,
            loc,
            primary,
            off,
            started: Instant::now(),
            wait: Duration::from_micros(20),
        };
        if crate::chain::follow(&mut copy, old, new)? == crate::chain::Followed::Repaired {
            tracing::warn!(
                "region {}: copy on {} lagged the primary at offset {off}; set to the primary's value",
                self.id,
                loc.addr
            );
        }
        Ok(())
    }

    fn unsupported_atomic(&self) -> ClientError {
        ClientError::Unsupported {
            region: self.id,
            what: format!(
                "atomics are not available on erasure-coded regions ({}); use a replicated region for words that need them",
                self.redundancy
            ),
        }
    }
}
