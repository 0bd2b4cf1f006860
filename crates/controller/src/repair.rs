//! Failure handling: marking a dead server's slabs lost, and rebuilding
//! them from redundancy onto live servers.
//!
//! When the detector declares a server dead, every slab it held is marked
//! `lost` in its region's map (version bumped, persisted) under the state
//! lock, so clients that refresh stop using it at once: reads fail over to
//! another copy or reconstruct from parity, and a region without
//! redundancy reports `DataLost` for those slabs.
//!
//! A rebuild thread then restores each lost slab of a redundant region, one
//! at a time: it picks a live server outside the slab's group, creates the
//! new slab there, freezes the group's surviving slabs (clients get
//! `SlabFrozen` and wait, so nothing changes under the copy), waits for the
//! erasure-coded writes in flight on them to commit (trying again later if
//! they do not within 5 s), copies a replica or decodes the slab from `k`
//! survivors (checking the decode against every other survivor: a
//! disagreement means a write is half-way, and the rebuild is tried again
//! later) in chunks, switches the map to the new slab and gives the
//! survivors new capability keys (so that a client with the old map cannot
//! write the old group), and thaws them. Pacing to `rebuild_rate` happens
//! between slabs, so a group is frozen only while its slab is copied. A
//! failed step is undone (survivors thawed with their committed keys, the
//! new slab dropped) and the slab is tried again later.
//!
//! Crash safety: the switched map is persisted in one transaction before
//! any survivor is rekeyed. A controller that dies before it leaves the
//! piece `lost` (rebuilt again by the next one) and an uncommitted slab
//! (dropped when its server joins the next controller); one that dies
//! after it leaves survivors frozen with their old keys, which the next
//! controller thaws with the keys of the committed map when their servers
//! join it (see ARCHITECTURE.md, "Crash-safe control steps").

use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_proto::ctl::{Redundancy, RegionMap, SlabLoc};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::erasure::Codec;
use remora_proto::ErrorCode;
use tracing::{debug, info, warn};

use crate::placement;
use crate::{candidates, new_key, reserve_slab, unpend, Failure, Inner, State};

/// Most bytes copied per request while rebuilding (less if a server's
/// maximum frame is smaller).
const CHUNK: u64 = 1 << 20;
/// Tries to thaw a survivor before leaving it to the failure detector.
const THAW_TRIES: u32 = 50;
/// Wait before retrying a rebuild that could not run.
const RETRY: Duration = Duration::from_millis(200);
/// Longest wait for erasure-coded writes in flight to finish their parity
/// updates once a stripe is frozen (a client that died mid-write never
/// finishes; its write was never acknowledged).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs queued rebuilds forever.
pub(crate) fn rebuild_loop(inner: Arc<Inner>) {
    loop {
        let job = {
            let mut q = inner.rebuild_queue.lock();
            loop {
                if let Some(j) = q.pop_front() {
                    break j;
                }
                inner.rebuild_cv.wait(&mut q);
            }
        };
        let (region, index) = job;
        let started = Instant::now();
        match inner.rebuild(region, index) {
            Ok(moved) => {
                // Rate limit between slabs, not during a copy: the copy
                // runs at full speed so its stripe is frozen briefly.
                let due = Duration::from_secs_f64(moved as f64 / inner.cfg.rebuild_rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            Err((ErrorCode::DataLost, msg)) => {
                warn!("region {region}: slab {index} cannot be rebuilt: {msg}");
            }
            Err((code, msg)) => {
                debug!(
                    "region {region}: rebuilding slab {index} failed ({code}: {msg}); will retry"
                );
                std::thread::sleep(RETRY);
                inner.rebuild_queue.lock().push_back(job);
            }
        }
    }
}

/// Where one piece of a group sits in its erasure-coded stripe.
#[derive(Debug, Clone, Copy)]
enum Role {
    Data(usize),
    Parity(usize),
}

fn role(map: &RegionMap, index: usize) -> Role {
    let n = map.slabs.len();
    match map.redundancy {
        Redundancy::Erasure { data, parity } => {
            if index < n {
                Role::Data(index % data as usize)
            } else {
                Role::Parity((index - n) % parity as usize)
            }
        }
        _ => Role::Data(0),
    }
}

impl Inner {
    /// Marks every slab on `server` lost, bumping and persisting the maps
    /// it touches, and queues rebuilds for regions with redundancy.
    pub(crate) fn mark_lost(&self, st: &mut State, server: u64) {
        let mut queued = 0;
        let mut changed = Vec::new();
        let mut lost_for_good = 0;
        let mut q = self.rebuild_queue.lock();
        for (id, r) in st.regions.iter_mut() {
            let mut next = r.clone();
            let mut hit = Vec::new();
            let n = next.map.slabs.len();
            for i in 0..n + next.map.extra.len() {
                if let Some(l) = next.map.piece_mut(i) {
                    if l.server_id == server && !l.lost {
                        l.lost = true;
                        hit.push(i);
                    }
                }
            }
            if hit.is_empty() {
                continue;
            }
            next.map.version += 1;
            changed.push(*id);
            if next.map.redundancy == Redundancy::None {
                lost_for_good += hit.len();
            } else {
                queued += hit.len();
                q.extend(hit.into_iter().map(|i| (*id, i)));
            }
            *r = next;
        }
        // One transaction for all (this runs under the state lock).
        let rs: Vec<&crate::store::StoredRegion> =
            changed.iter().filter_map(|id| st.regions.get(id)).collect();
        if let Err(e) = self.store.put_regions(&rs) {
            // Still marked in memory: clients must not use the slabs.
            warn!("persisting {} regions after a server loss: {e}", rs.len());
        }
        if lost_for_good > 0 {
            warn!("{lost_for_good} slabs of regions without redundancy were lost with server {server:016x}");
        }
        if queued > 0 {
            info!("{queued} slabs of server {server:016x} queued for rebuild");
        }
    }

    /// Freezes a slab; returns the erasure-coded writes on it still in flight.
    fn admin_freeze(&self, server: u64, slab: u64) -> Result<u64, Failure> {
        let f = self.with_admin_conn(server, |c| {
            c.call(|b, id| data::encode_request(b, id, &Request::FreezeSlab { slab }))
        })?;
        match data::decode_reply(f.kind, &f.payload) {
            Ok(Reply::Value(n)) => Ok(n),
            Ok(Reply::Error { code, message }) => Err((code, message.to_string())),
            other => Err((
                ErrorCode::Internal,
                format!("freezing slab {slab}: {other:?}"),
            )),
        }
    }

    /// Reads `len` bytes at `offset` of a slab over the admin connection.
    fn admin_read(
        &self,
        server: u64,
        slab: u64,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, Failure> {
        let f = self.with_admin_conn(server, |c| {
            c.call(|b, id| data::encode_request(b, id, &Request::ReadSlab { slab, offset, len }))
        })?;
        match data::decode_reply(f.kind, &f.payload) {
            Ok(Reply::Data(d)) if d.len() == len as usize => Ok(d.to_vec()),
            Ok(Reply::Error { code, message }) => Err((code, message.to_string())),
            other => Err((
                ErrorCode::Internal,
                format!("reading slab {slab}: {other:?}"),
            )),
        }
    }

    /// Rebuilds piece `index` of `region` if it is still lost; returns the
    /// bytes read and written.
    fn rebuild(&self, region: u64, index: usize) -> Result<u64, Failure> {
        let started = Instant::now();
        // Plan under the lock: survivors, destination, new slab id.
        let (map, survivors, needed, dest) = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let Some(r) = st.regions.get(&region) else {
                return Ok(0);
            };
            let map = r.map.clone();
            match map.pieces().nth(index) {
                Some(l) if l.lost => {}
                _ => return Ok(0),
            }
            let group = map.group_of(index);
            let survivors: Vec<(usize, SlabLoc)> = group
                .iter()
                .filter(|&&i| i != index)
                .filter_map(|&i| map.pieces().nth(i).map(|l| (i, l.clone())))
                .filter(|(_, l)| !l.lost)
                .collect();
            let needed = match map.redundancy {
                Redundancy::None => {
                    return Err((ErrorCode::DataLost, "the region has no redundancy".into()))
                }
                Redundancy::Replicate(_) => 1,
                Redundancy::Erasure { .. } => {
                    group.iter().filter(|&&i| i < map.slabs.len()).count()
                }
            };
            if survivors.len() < needed {
                return Err((
                    ErrorCode::DataLost,
                    format!("{} of its group survive, {needed} needed", survivors.len()),
                ));
            }
            if let Some((_, l)) = survivors
                .iter()
                .find(|(_, l)| !st.servers.get(&l.server_id).is_some_and(|s| s.usable()))
            {
                return Err((
                    ErrorCode::ServerUnavailable,
                    format!("survivor server {} is not ready", l.addr),
                ));
            }
            if survivors.iter().any(|(_, l)| st.moving.contains(&l.slab)) {
                return Err((ErrorCode::SlabFrozen, "the group is being moved".into()));
            }
            let exclude: Vec<u64> = survivors.iter().map(|(_, l)| l.server_id).collect();
            let cands = candidates(st, &[]);
            let Some(pick) =
                placement::place_groups(&cands, 1, 1, &exclude, self.cfg.placement, &mut st.rng)
                    .and_then(|g| g.first().and_then(|g| g.first().copied()))
            else {
                return Err((
                    ErrorCode::InsufficientCapacity,
                    "no live server outside the group has a free slab".into(),
                ));
            };
            let Some(dest) = reserve_slab(st, pick, true) else {
                return Err((ErrorCode::Internal, "server vanished".into()));
            };
            for (_, l) in &survivors {
                st.moving.insert(l.slab);
            }
            (map, survivors, needed, dest)
        };
        let undo = |frozen: &[SlabLoc], drop_dest: bool| {
            for l in frozen {
                // The key of the committed map, which is not switched.
                self.thaw(l, l.key);
            }
            if drop_dest {
                let _ = self.admin_call(dest.server_id, &Request::DropSlab { slab: dest.slab });
            }
            let mut st = self.state.lock();
            if let Some(s) = st.servers.get_mut(&dest.server_id) {
                s.assigned = s.assigned.saturating_sub(1);
            }
            for (_, l) in &survivors {
                st.moving.remove(&l.slab);
            }
            unpend(&mut st, dest.slab);
        };
        if let Err(e) = self.admin_call(
            dest.server_id,
            &Request::CreateSlab {
                slab: dest.slab,
                key: dest.key,
                owner: self.owner_of(region),
            },
        ) {
            undo(&[], e.0 == ErrorCode::ServerUnavailable);
            return Err(e);
        }
        self.pause_point("rebuild:after_create");
        // Freeze the whole group so that no write lands behind the copy,
        // then let erasure-coded writes already past their data swap finish
        // their parity updates, so the stripe is consistent when read.
        let mut frozen = Vec::new();
        let mut in_flight = Vec::new();
        for (_, l) in &survivors {
            match self.admin_freeze(l.server_id, l.slab) {
                Ok(n) => in_flight.push(n),
                Err(e) => {
                    undo(&frozen, true);
                    return Err(e);
                }
            }
            frozen.push(l.clone());
        }
        self.pause_point("rebuild:after_freeze");
        let drain_started = Instant::now();
        while in_flight.iter().any(|&n| n > 0) {
            if drain_started.elapsed() > DRAIN_TIMEOUT {
                // Try again later (records of abandoned writes expire).
                undo(&frozen, true);
                return Err((
                    ErrorCode::SlabFrozen,
                    format!("writes in flight on slab {index}'s stripe did not finish within {DRAIN_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
            for (n, (_, l)) in in_flight.iter_mut().zip(&survivors) {
                if *n > 0 {
                    match self.admin_freeze(l.server_id, l.slab) {
                        Ok(v) => *n = v,
                        Err(e) => {
                            undo(&frozen, true);
                            return Err(e);
                        }
                    }
                }
            }
        }
        let copied = self.copy_piece(&map, index, &survivors, needed, &dest);
        let moved = match copied {
            Ok(b) => b,
            Err(e) => {
                undo(&frozen, true);
                return Err(e);
            }
        };
        self.pause_point("rebuild:after_copy");
        // Switch the map: the new slab in, new keys for the survivors.
        let rekeyed = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let (nr, ns) = (st.next_region, st.next_slab);
            let mut keys = Vec::new();
            for _ in &survivors {
                keys.push(new_key(&mut st.rng));
            }
            let dest_ok = st.servers.get(&dest.server_id).is_some_and(|s| s.usable());
            let result = match st.regions.get_mut(&region) {
                None => Err(None),
                // Declared dead during the copy: its slab is worthless.
                Some(_) if !dest_ok => Err(Some((
                    ErrorCode::ServerUnavailable,
                    format!("{} died during the rebuild", dest.addr),
                ))),
                Some(r) => {
                    let mut next = r.clone();
                    let still_lost = next.map.pieces().nth(index).is_some_and(|l| {
                        l.lost && l.slab == map.pieces().nth(index).map_or(0, |o| o.slab)
                    });
                    if !still_lost {
                        Err(None)
                    } else {
                        if let Some(p) = next.map.piece_mut(index) {
                            *p = dest.clone();
                        }
                        let mut rekeyed = Vec::new();
                        for ((i, old), key) in survivors.iter().zip(&keys) {
                            if let Some(p) = next.map.piece_mut(*i) {
                                if p.slab == old.slab && !p.lost {
                                    p.key = *key;
                                    rekeyed.push((old.clone(), *key));
                                }
                            }
                        }
                        next.map.version += 1;
                        match self.store.put_region(&next, nr, ns) {
                            Ok(()) => {
                                *r = next;
                                Ok(rekeyed)
                            }
                            Err(e) => Err(Some((ErrorCode::Internal, e.to_string()))),
                        }
                    }
                }
            };
            if result.is_ok() {
                // The survivors stay claimed until they are thawed below.
                unpend(st, dest.slab);
            }
            result
        };
        let rekeyed = match rekeyed {
            Ok(r) => r,
            Err(None) => {
                // Freed, or rebuilt by someone else meanwhile.
                undo(&frozen, true);
                return Ok(0);
            }
            Err(Some(e)) => {
                undo(&frozen, true);
                return Err(e);
            }
        };
        self.pause_point("rebuild:after_switch");
        // A controller that dies from here on leaves survivors frozen with
        // their old keys; the next one thaws them with the keys of the map
        // just persisted when their servers join it (`finish_join`).
        let drop_thaw = self.hook_is("rebuild:drop_thaw");
        for (n, (l, key)) in rekeyed.iter().enumerate() {
            if !drop_thaw {
                self.thaw(l, *key);
            }
            if n == 0 {
                self.pause_point("rebuild:after_first_thaw");
            }
        }
        {
            let mut st = self.state.lock();
            for (_, l) in &survivors {
                st.moving.remove(&l.slab);
            }
        }
        {
            let mut c = self.rebuilt.lock();
            c.0 += 1;
            c.1 += moved;
        }
        info!(
            "rebuilt slab {index} of region {region} ({}) on {}: {} read and written in {:?}",
            map.redundancy,
            dest.addr,
            remora_proto::size::Bytes(moved),
            started.elapsed()
        );
        Ok(moved)
    }

    /// Thaws a frozen survivor (with a new key unless 0), retrying while
    /// its server is alive: a survivor left frozen would refuse every data
    /// operation of its group.
    fn thaw(&self, l: &SlabLoc, new_key: u64) {
        for attempt in 0..THAW_TRIES {
            let req = Request::ThawSlab {
                slab: l.slab,
                new_key,
            };
            match self.admin_call(l.server_id, &req) {
                Ok(()) | Err((ErrorCode::UnknownSlab, _)) => return,
                Err((code, msg)) => {
                    let alive = self
                        .state
                        .lock()
                        .servers
                        .get(&l.server_id)
                        .is_some_and(|s| s.alive);
                    if !alive {
                        // Declared dead: its slabs are lost anyway.
                        return;
                    }
                    if attempt + 1 == THAW_TRIES {
                        warn!("cannot thaw slab {} on {}: {code}: {msg}", l.slab, l.addr);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Largest chunk every one of `servers` accepts in a frame.
    fn chunk_for(&self, servers: &[u64]) -> u64 {
        let frames = self.max_frames.lock();
        let min = servers
            .iter()
            .map(|s| frames.get(s).copied().unwrap_or(64 << 10) as u64)
            .min()
            .unwrap_or(64 << 10);
        // Room for the header and a target; coded ranges are 64-byte aligned.
        (min.saturating_sub(4096) / 64 * 64).clamp(64, CHUNK)
    }

    /// Fills `dest` with the content of lost piece `index`, from a replica
    /// or decoded from `needed` survivors, at no more than the rebuild
    /// rate. Returns the bytes read and written.
    fn copy_piece(
        &self,
        map: &RegionMap,
        index: usize,
        survivors: &[(usize, SlabLoc)],
        needed: usize,
        dest: &SlabLoc,
    ) -> Result<u64, Failure> {
        let ss = map.slab_size;
        let mut moved = 0u64;
        let codec = match map.redundancy {
            Redundancy::Erasure { data, parity } => Some(
                Codec::new(data as usize, parity as usize)
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?,
            ),
            _ => None,
        };
        // Data pieces first: decoding from data needs no arithmetic. With
        // erasure coding, every other survivor too, to check the decode
        // against.
        let mut sources: Vec<&(usize, SlabLoc)> = survivors.iter().collect();
        sources.sort_by_key(|(i, _)| *i >= map.slabs.len());
        if codec.is_none() {
            sources.truncate(needed);
        }
        let involved: Vec<u64> = sources
            .iter()
            .map(|(_, l)| l.server_id)
            .chain(std::iter::once(dest.server_id))
            .collect();
        let chunk = self.chunk_for(&involved);
        let mut off = 0;
        while off < ss {
            let len = chunk.min(ss - off);
            let bytes = match &codec {
                None => {
                    let (_, l) = sources[0];
                    let b = self.admin_read(l.server_id, l.slab, off, len as u32)?;
                    moved += len;
                    b
                }
                Some(c) => {
                    let (k, m) = (c.data(), c.parity());
                    let mut data: Vec<Option<Vec<u8>>> = vec![None; k];
                    let mut parity: Vec<Option<Vec<u8>>> = vec![None; m];
                    let mut checks = Vec::new();
                    for (n, (i, l)) in sources.iter().enumerate() {
                        let b = self.admin_read(l.server_id, l.slab, off, len as u32)?;
                        moved += len;
                        if n >= needed {
                            checks.push((*i, b));
                            continue;
                        }
                        match role(map, *i) {
                            Role::Data(d) => data[d] = Some(b),
                            Role::Parity(p) => parity[p] = Some(b),
                        }
                    }
                    // Data slabs past the region's end are zeros.
                    let in_stripe = map
                        .group_of(index)
                        .iter()
                        .filter(|&&i| i < map.slabs.len())
                        .count();
                    let zeros: Vec<bool> = (0..k).map(|d| d >= in_stripe).collect();
                    let dref: Vec<Option<&[u8]>> = data.iter().map(|d| d.as_deref()).collect();
                    let pref: Vec<Option<&[u8]>> = parity.iter().map(|p| p.as_deref()).collect();
                    let full = c
                        .reconstruct(&dref, &pref, &zeros)
                        .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                    let encode = |full: &[Vec<u8>]| {
                        let refs: Vec<Option<&[u8]>> = full
                            .iter()
                            .enumerate()
                            .map(|(d, s)| (!zeros[d]).then_some(&s[..]))
                            .collect();
                        c.encode(&refs)
                            .map_err(|e| (ErrorCode::Internal, e.to_string()))
                    };
                    let parity = if checks.is_empty() {
                        Vec::new()
                    } else {
                        encode(&full)?
                    };
                    for (i, b) in &checks {
                        let expected = match role(map, *i) {
                            Role::Data(d) => &full[d],
                            Role::Parity(p) => &parity[p],
                        };
                        if expected != b {
                            // A write is half-way through (or was abandoned
                            // half-way): decoding now would be wrong.
                            return Err((
                                ErrorCode::SlabFrozen,
                                format!("stripe bytes {off}+{len} disagree: a write is in flight"),
                            ));
                        }
                    }
                    match role(map, index) {
                        Role::Data(d) => full[d].clone(),
                        Role::Parity(p) => match parity.get(p) {
                            Some(v) => v.clone(),
                            None => encode(&full)?.swap_remove(p),
                        },
                    }
                }
            };
            let at = Target {
                slab: dest.slab,
                key: dest.key,
                offset: off,
            };
            self.admin_call(dest.server_id, &Request::Write { at, data: &bytes })?;
            moved += len;
            off += len;
        }
        Ok(moved)
    }
}
