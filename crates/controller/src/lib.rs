//! The Remora controller: the global memory manager.
//!
//! It owns membership (servers register and heartbeat; a server silent for
//! `dead_after` is declared dead), tenants (token, quota), and regions
//! (allocation, placement of slabs on servers, the region→slab map, free,
//! open by name). Clients fetch a region's map once and then go straight to
//! the servers: the controller is never on the data path.
//!
//! Metadata lives in a [`store::MetaStore`]; a region is acknowledged only
//! after it is durable there, so a restarted controller finds it again.
//! Server membership is soft state: after a restart, servers re-register on
//! their next heartbeat.
//!
//! Locking: one mutex guards the in-memory state and is never held across
//! network I/O; slabs are reserved under the lock, created on servers
//! outside it, and released again if creation fails.

pub mod config;
pub mod placement;
mod repair;
pub mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::Rng;
use remora_net::{FramedReader, LatencyInjector, NetError, RpcConn, Stream, TcpTransport};
use remora_proto::ctl::{
    self, ClusterStatus, CtlReply, CtlRequest, Redundancy, RegionInfo, RegionMap, ServerInfo,
    SlabLoc, TenantInfo,
};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::frame::DEFAULT_MAX_FRAME;
use remora_proto::{ErrorCode, VERSION};
use tracing::{debug, info, warn};

pub use config::ControllerConfig;
use placement::Candidate;
use store::{MetaStore, StoredRegion, StoredTenant};

/// Deadline of a burst of control operations on a memory server.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest region, in slabs, one allocation may ask for.
pub const MAX_REGION_SLABS: u64 = 1 << 22;

/// Controller start-up errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// Cannot bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
}

type Failure = (ErrorCode, String);

#[derive(Debug)]
struct ServerState {
    addr: String,
    admin_key: u64,
    capacity: u64,
    slabs_total: u64,
    slabs_used: u64,
    /// Slabs of known regions placed on this server (plus reservations).
    assigned: u64,
    last_seen: Instant,
    /// False once declared dead: its slabs are marked lost (and rebuilt
    /// where the region has redundancy); if it comes back it must drop
    /// everything and register again.
    alive: bool,
    /// Set by the first heartbeat: the server has carved its slabs and can
    /// take control operations. Placement uses only ready servers.
    ready: bool,
    /// Committed slabs, with the keys their maps record, to thaw (and
    /// rekey) when the server first heartbeats (first registration with
    /// this controller only).
    join_work: Option<Vec<(u64, u64)>>,
    /// Between the first heartbeat and the end of [`Inner::finish_join`]:
    /// not ready yet, and the join is under way.
    joining: bool,
    /// Known only from the region maps (this controller started and the
    /// server has not registered yet): if it never does, the detector
    /// declares it dead like any other.
    placeholder: bool,
}

impl ServerState {
    fn usable(&self) -> bool {
        self.alive && self.ready
    }

    fn free(&self) -> u64 {
        self.slabs_total
            .saturating_sub(self.assigned.max(self.slabs_used))
    }
}

#[derive(Debug)]
struct TenantState {
    t: StoredTenant,
    used: u64,
    regions: u64,
}

#[derive(Debug)]
struct State {
    servers: BTreeMap<u64, ServerState>,
    tenants: BTreeMap<String, TenantState>,
    by_token: HashMap<String, String>,
    regions: BTreeMap<u64, StoredRegion>,
    /// (tenant, name) → region id; `0` while an allocation is in progress.
    names: HashMap<(String, String), u64>,
    /// Slabs being moved.
    moving: std::collections::HashSet<u64>,
    /// Slab ids handed out but not yet committed (allocations and moves in
    /// flight), as half-open ranges; reconciliation never drops these.
    pending: Vec<(u64, u64)>,
    next_region: u64,
    next_slab: u64,
    rng: rand::rngs::StdRng,
}

#[derive(Debug)]
struct Inner {
    cfg: ControllerConfig,
    store: Box<dyn MetaStore>,
    state: Mutex<State>,
    admin_conns: Mutex<HashMap<u64, Arc<Mutex<Option<RpcConn>>>>>,
    /// Lost slabs to rebuild: (region, piece index).
    rebuild_queue: Mutex<VecDeque<(u64, usize)>>,
    rebuild_cv: Condvar,
    /// Slabs rebuilt, and bytes read and written doing it.
    rebuilt: Mutex<(u64, u64)>,
    /// Each server's maximum frame, from its handshake (bounds the chunks
    /// a rebuild reads and writes).
    max_frames: Mutex<HashMap<u64, u32>>,
    /// Test hook (see [`PAUSE_AT_ENV`]): the step to stop at, and the file
    /// to write its name to when there.
    pause_at: Option<(String, Option<std::path::PathBuf>)>,
}

/// Test hook, off unless set: `REMORA_TEST_PAUSE_AT=<step>` makes the
/// controller stop for good when it reaches the named step of a multi-step
/// change (the thread doing it sleeps; nothing else stops), so that a test
/// can kill it there and check what a restarted controller makes of the
/// half-done change. Steps: `rebuild:after_create`, `rebuild:after_freeze`,
/// `rebuild:after_copy`, `rebuild:after_switch`, `rebuild:after_first_thaw`,
/// `move:after_create`, `move:after_copy`, `move:after_switch`. With
/// [`PAUSE_MARK_ENV`] set to a path, the step's name is written there on
/// arrival. One more value injects a fault instead of stopping:
/// `rebuild:drop_thaw` makes rebuilds skip thawing and rekeying the
/// survivors, as if every `ThawSlab` were lost, which reconciliation must
/// find and repair. Never set it in production.
pub const PAUSE_AT_ENV: &str = "REMORA_TEST_PAUSE_AT";
/// See [`PAUSE_AT_ENV`].
pub const PAUSE_MARK_ENV: &str = "REMORA_TEST_PAUSE_MARK";

/// A running controller.
#[derive(Debug)]
pub struct ControllerHandle {
    addr: String,
}

impl ControllerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// Opens the store, binds, and starts serving in background threads.
pub fn start(cfg: ControllerConfig) -> Result<ControllerHandle, ControllerError> {
    cfg.validate().map_err(ControllerError::Config)?;
    let store: Box<dyn MetaStore> = match &cfg.data_dir {
        Some(d) => Box::new(store::RedbStore::open(d)?),
        None => Box::new(store::MemStore::default()),
    };
    for t in &cfg.tenants {
        store.put_tenant(t)?;
    }
    let snap = store.load()?;
    let mut st = State {
        servers: BTreeMap::new(),
        tenants: BTreeMap::new(),
        by_token: HashMap::new(),
        regions: BTreeMap::new(),
        names: HashMap::new(),
        moving: Default::default(),
        pending: Vec::new(),
        next_region: snap.next_region,
        next_slab: snap.next_slab,
        rng: rand::SeedableRng::from_entropy(),
    };
    for (name, t) in snap.tenants {
        if st.by_token.insert(t.token.clone(), name.clone()).is_some() {
            return Err(ControllerError::Config(format!(
                "tenant {name:?} shares a token with another stored tenant"
            )));
        }
        st.tenants.insert(
            name,
            TenantState {
                t,
                used: 0,
                regions: 0,
            },
        );
    }
    for (id, r) in snap.regions {
        if let Some(t) = st.tenants.get_mut(&r.tenant) {
            t.used += r.map.pieces().count() as u64 * r.map.slab_size;
            t.regions += 1;
        }
        if let Some(n) = &r.map.name {
            st.names.insert((r.tenant.clone(), n.clone()), id);
        }
        st.regions.insert(id, r);
    }
    let listener = TcpListener::bind(&cfg.listen).map_err(|source| ControllerError::Bind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ControllerError::Bind {
            addr: cfg.listen.clone(),
            source,
        })?
        .to_string();
    info!(
        "controller on {addr}: {} tenants, {} regions, slab size {}, placement {}",
        st.tenants.len(),
        st.regions.len(),
        cfg.slab_size,
        cfg.placement.name()
    );
    // Servers the maps name are expected back; those that do not come
    // within `dead_after` are declared dead and their slabs rebuilt.
    for r in st.regions.values() {
        for l in r.map.pieces().filter(|l| !l.lost) {
            let s = st
                .servers
                .entry(l.server_id)
                .or_insert_with(|| ServerState {
                    addr: l.addr.clone(),
                    admin_key: 0,
                    capacity: 0,
                    slabs_total: 0,
                    slabs_used: 0,
                    assigned: 0,
                    last_seen: Instant::now(),
                    alive: true,
                    ready: false,
                    join_work: None,
                    joining: false,
                    placeholder: true,
                });
            s.assigned += 1;
        }
    }
    // Slabs lost before a restart are rebuilt once servers are back.
    let mut lost = VecDeque::new();
    for r in st.regions.values() {
        if r.map.redundancy != Redundancy::None {
            for (i, l) in r.map.pieces().enumerate() {
                if l.lost {
                    lost.push_back((r.map.id, i));
                }
            }
        }
    }
    let inner = Arc::new(Inner {
        cfg,
        store,
        state: Mutex::new(st),
        admin_conns: Mutex::new(HashMap::new()),
        rebuild_queue: Mutex::new(lost),
        rebuild_cv: Condvar::new(),
        rebuilt: Mutex::new((0, 0)),
        max_frames: Mutex::new(HashMap::new()),
        pause_at: std::env::var(PAUSE_AT_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| {
                warn!("test hook {PAUSE_AT_ENV} set: the controller stops at step {s}");
                let mark = std::env::var_os(PAUSE_MARK_ENV).map(std::path::PathBuf::from);
                (s, mark)
            }),
    });
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(drop)
            .map_err(|source| ControllerError::Bind {
                addr: addr.clone(),
                source,
            })
    };
    let i = inner.clone();
    spawn(
        "remora-ctl-accept",
        Box::new(move || accept_loop(listener, i)),
    )?;
    let i = inner.clone();
    spawn("remora-ctl-detector", Box::new(move || detector_loop(i)))?;
    let i = inner.clone();
    spawn(
        "remora-ctl-rebuild",
        Box::new(move || repair::rebuild_loop(i)),
    )?;
    spawn(
        "remora-ctl-reconcile",
        Box::new(move || reconcile_loop(inner)),
    )?;
    Ok(ControllerHandle { addr })
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    for s in listener.incoming() {
        match s {
            Ok(s) => {
                let inner = inner.clone();
                let r = std::thread::Builder::new()
                    .name("remora-ctl-conn".into())
                    .spawn(move || serve(s, inner));
                if let Err(e) = r {
                    warn!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reclaims orphan slabs on live servers, now and then.
fn reconcile_loop(inner: Arc<Inner>) {
    loop {
        std::thread::sleep(inner.cfg.reconcile_interval);
        inner.reconcile();
    }
}

/// Declares servers dead when their heartbeats stop.
fn detector_loop(inner: Arc<Inner>) {
    let tick = (inner.cfg.heartbeat_interval / 2).max(Duration::from_millis(10));
    let mut last = Instant::now();
    loop {
        std::thread::sleep(tick);
        let mut dead = Vec::new();
        {
            let mut st = inner.state.lock();
            let now = Instant::now();
            let lag = now.duration_since(last).saturating_sub(tick);
            if lag > inner.cfg.heartbeat_interval {
                // This process stalled (paused, swapping, or the lock was
                // held): heartbeats may be waiting unread. The stall is not
                // the servers' silence: move their clocks past it.
                warn!("the controller stalled for {lag:?}; not counting it against servers");
                for s in st.servers.values_mut() {
                    if s.alive {
                        s.last_seen = (s.last_seen + lag).min(now);
                    }
                }
            }
            for (id, s) in st.servers.iter_mut() {
                if s.alive && s.last_seen.elapsed() > inner.cfg.dead_after {
                    s.alive = false;
                    warn!(
                        "server {id:016x} at {} missed heartbeats for {:?}: declared dead",
                        s.addr, inner.cfg.dead_after
                    );
                    dead.push(*id);
                }
            }
            // Under the same lock, so that the server cannot rejoin and be
            // told to keep slabs that are about to be marked lost.
            for id in &dead {
                inner.mark_lost(&mut st, *id);
            }
        }
        // Measured from here, so the work above is not taken for a stall.
        last = Instant::now();
        if !dead.is_empty() {
            inner.rebuild_cv.notify_all();
        }
    }
}

enum Role {
    None,
    Client(String),
    Server(u64),
}

fn serve(stream: TcpStream, inner: Arc<Inner>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let boxed: Box<dyn Stream> = Box::new(stream);
    let mut r = FramedReader::new(boxed, &peer, DEFAULT_MAX_FRAME, LatencyInjector::default());
    let mut role = Role::None;
    let mut out = Vec::new();
    loop {
        let f = match r.next_owned(None) {
            Ok(f) => f,
            Err(NetError::Decode { source, .. }) => {
                data::put_error(&mut out, 0, ErrorCode::Malformed, &source.to_string());
                let _ = w.write_all(&out);
                return;
            }
            Err(e) => {
                debug!("{peer}: {e}");
                return;
            }
        };
        out.clear();
        let reply = if f.kind != ctl::CTL_REQUEST {
            CtlReply::Error {
                code: ErrorCode::Malformed,
                message: format!("expected a control request, got kind 0x{:x}", f.kind),
            }
        } else {
            match ctl::decode_request(&f.payload) {
                Ok(req) => inner.handle(&mut role, req),
                Err(e) => CtlReply::Error {
                    code: ErrorCode::Malformed,
                    message: e.to_string(),
                },
            }
        };
        ctl::encode(&mut out, f.id, ctl::CTL_REPLY, &reply);
        if let Err(e) = w.write_all(&out) {
            debug!("{peer}: {e}");
            return;
        }
    }
}

fn fail(code: ErrorCode, message: impl Into<String>) -> CtlReply {
    CtlReply::Error {
        code,
        message: message.into(),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl Inner {
    /// The test hook of [`PAUSE_AT_ENV`]: stops the calling thread for good
    /// if `step` is the one named. Never called with the state lock held.
    fn pause_point(&self, step: &str) {
        if !self.hook_is(step) {
            return;
        }
        let Some((_, mark)) = &self.pause_at else {
            return;
        };
        warn!("test hook: stopping at step {step}");
        if let Some(m) = mark {
            let _ = std::fs::write(m, step);
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    /// Whether the test hook of [`PAUSE_AT_ENV`] names `step`.
    fn hook_is(&self, step: &str) -> bool {
        self.pause_at.as_ref().is_some_and(|(at, _)| at == step)
    }

    fn handle(self: &Arc<Self>, role: &mut Role, req: CtlRequest) -> CtlReply {
        match (&*role, req) {
            (_, CtlRequest::ClientHello { version, token }) => {
                if version != VERSION {
                    return fail(
                        ErrorCode::UnsupportedVersion,
                        format!("controller speaks version {VERSION}, client {version}"),
                    );
                }
                let st = self.state.lock();
                match st.by_token.get(&token) {
                    Some(t) => {
                        *role = Role::Client(t.clone());
                        CtlReply::Welcome { tenant: t.clone() }
                    }
                    None => fail(ErrorCode::Unauthenticated, "unknown tenant token"),
                }
            }
            (
                _,
                CtlRequest::Register {
                    version,
                    server_id,
                    addr,
                    admin_key,
                    capacity,
                    secret,
                    slabs_used,
                },
            ) => {
                if version != VERSION {
                    return fail(
                        ErrorCode::UnsupportedVersion,
                        format!("controller speaks version {VERSION}, server {version}"),
                    );
                }
                if let Some(want) = &self.cfg.cluster_secret {
                    if secret.as_deref() != Some(want.as_str()) {
                        return fail(
                            ErrorCode::Unauthenticated,
                            "wrong or missing cluster secret",
                        );
                    }
                }
                let keep = match self.register(server_id, addr, admin_key, capacity, slabs_used) {
                    Ok(k) => k,
                    Err(msg) => return fail(ErrorCode::InvalidArgument, msg),
                };
                *role = Role::Server(server_id);
                CtlReply::Registered {
                    slab_size: self.cfg.slab_size,
                    heartbeat_ms: self.cfg.heartbeat_interval.as_millis() as u64,
                    lease_ms: self.cfg.lease().as_millis() as u64,
                    keep,
                }
            }
            (
                Role::Server(me),
                CtlRequest::Heartbeat {
                    server_id,
                    slabs_used,
                    slabs_total,
                },
            ) => {
                if *me != server_id {
                    return fail(ErrorCode::InvalidArgument, "heartbeat for another server");
                }
                let mut st = self.state.lock();
                if st.servers.get(&server_id).is_some_and(|s| !s.alive) {
                    // Back after being declared dead: its slabs were marked
                    // lost or rebuilt elsewhere. It must wipe and rejoin.
                    if let Some(s) = st.servers.remove(&server_id) {
                        info!("server {server_id:016x} at {} is back after being declared dead: it drops its slabs and registers again", s.addr);
                    }
                    drop(st);
                    self.admin_conns.lock().remove(&server_id);
                    return fail(
                        ErrorCode::Fenced,
                        "declared dead: drop every slab and register again",
                    );
                }
                match st.servers.get_mut(&server_id) {
                    Some(s) => {
                        s.last_seen = Instant::now();
                        if !s.ready && !s.joining {
                            match s.join_work.take() {
                                Some(slabs) => {
                                    // Ready once the join is done.
                                    s.joining = true;
                                    let me = self.clone();
                                    std::thread::spawn(move || me.finish_join(server_id, slabs));
                                }
                                None => s.ready = true,
                            }
                        }
                        // The total was fixed at registration; a report can
                        // only say how much of it is in use.
                        s.slabs_used = slabs_used.min(s.slabs_total);
                        if slabs_total != s.slabs_total {
                            debug!("server {server_id:016x} reports {slabs_total} slabs, registered with {}", s.slabs_total);
                        }
                        CtlReply::Ack
                    }
                    None => fail(ErrorCode::UnknownServer, "register again"),
                }
            }
            (Role::Client(t), req) => {
                let t = t.clone();
                match self.client_request(&t, req) {
                    Ok(r) => r,
                    Err((code, message)) => CtlReply::Error { code, message },
                }
            }
            (Role::Server(_), _) => fail(ErrorCode::NotAuthorized, "servers may only heartbeat"),
            (Role::None, _) => fail(
                ErrorCode::Unauthenticated,
                "send ClientHello with a token first",
            ),
        }
    }

    /// Registers a server; returns the slabs it may keep when it must drop
    /// the others (it is new to this controller, or was declared dead).
    fn register(
        self: &Arc<Self>,
        id: u64,
        addr: String,
        admin_key: u64,
        capacity: u64,
        used: u64,
    ) -> Result<Option<Vec<u64>>, String> {
        let mut st = self.state.lock();
        let slabs_total = capacity / self.cfg.slab_size;
        if st
            .servers
            .get(&id)
            .is_some_and(|s| !s.alive || s.placeholder)
        {
            // Declared dead meanwhile (a new member as far as slabs go), or
            // known only from the maps: register it as new.
            st.servers.remove(&id);
            self.admin_conns.lock().remove(&id);
        }
        if let Some(s) = st.servers.get_mut(&id) {
            // The same server again (its controller connection dropped):
            // keep its accounting, including reservations in flight.
            if s.addr != addr && s.alive {
                return Err(format!(
                    "server id {id:016x} is already registered at {}",
                    s.addr
                ));
            }
            s.addr = addr;
            s.admin_key = admin_key;
            s.last_seen = Instant::now();
            s.alive = true;
            drop(st);
            self.admin_conns.lock().remove(&id);
            return Ok(None);
        }
        // A new process at the address of a known server replaces it: the
        // old one's slabs are gone with it.
        let stale: Vec<u64> = st
            .servers
            .iter()
            .filter(|(_, s)| s.addr == addr)
            .map(|(sid, _)| *sid)
            .collect();
        let mut replaced = Vec::new();
        for s in stale {
            warn!("server at {addr} restarted (was {s:016x}, now {id:016x})");
            if st.servers.remove(&s).is_some_and(|old| old.alive) {
                replaced.push(s);
            }
            self.admin_conns.lock().remove(&s);
        }
        for s in &replaced {
            // The old process's slabs died with it.
            self.mark_lost(&mut st, *s);
        }
        if !replaced.is_empty() {
            self.rebuild_cv.notify_all();
        }
        // First registration with this controller: its slabs are those of
        // the committed region maps.
        let slabs = committed_on(&st, id);
        let assigned = slabs.len() as u64;
        info!("server {id:016x} registered at {addr}: {slabs_total} slabs");
        st.servers.insert(
            id,
            ServerState {
                addr,
                admin_key,
                capacity,
                slabs_total,
                slabs_used: used.min(slabs_total),
                assigned,
                last_seen: Instant::now(),
                alive: true,
                ready: false,
                join_work: None,
                joining: false,
                placeholder: false,
            },
        );
        for (s, _) in &slabs {
            st.moving.insert(*s);
        }
        let keep = slabs.iter().map(|(s, _)| *s).collect();
        if let Some(s) = st.servers.get_mut(&id) {
            s.join_work = Some(slabs);
        }
        Ok(Some(keep))
    }

    /// First heartbeat of a server new to this controller. A previous
    /// controller may have died in the middle of a move, a rebuild or a
    /// rekey, leaving slabs of this server frozen, or with the key of an
    /// older map: every slab of a committed map must serve with the key
    /// that map records, so thaw each with that key (`ThawSlab` with the
    /// key a slab already has is a no-op; moves and rebuilds of these slabs
    /// wait until this is done). Then make sure no slab id this controller
    /// hands out is already on the server (its metadata may be older than
    /// the slabs), check the server against the maps as reconciliation
    /// does, and let placement use it. If the server does not answer, the
    /// join is tried again on a later heartbeat; until then the server
    /// stays `waiting`.
    fn finish_join(self: &Arc<Self>, id: u64, claimed: Vec<(u64, u64)>) {
        // The maps as they are now (the keys recorded at registration are
        // claimed until here, so only a freed region can differ).
        let slabs = {
            let mut st = self.state.lock();
            for (s, _) in &claimed {
                st.moving.remove(s);
            }
            let slabs = committed_on(&st, id);
            for (s, _) in &slabs {
                st.moving.insert(*s);
            }
            slabs
        };
        let reqs: Vec<Request<'_>> = slabs
            .iter()
            .map(|&(slab, key)| Request::ThawSlab { slab, new_key: key })
            .collect();
        let mut failed = None;
        for r in self.admin_calls(id, &reqs) {
            match r {
                Ok(()) | Err((ErrorCode::UnknownSlab, _)) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let listed = match self.admin_list(id) {
            Ok(l) => Some(l),
            Err(e) => {
                failed.get_or_insert(e);
                None
            }
        };
        {
            let mut st = self.state.lock();
            for (s, _) in &slabs {
                st.moving.remove(s);
            }
            if let Some(max) = listed.and_then(|v| v.into_iter().max()) {
                st.next_slab = st.next_slab.max(max + 1);
            }
        }
        if let Some((code, msg)) = failed {
            warn!("server {id:016x} joining: {code}: {msg}; trying again");
            std::thread::sleep(Duration::from_millis(500));
            let mut st = self.state.lock();
            if let Some(s) = st.servers.get_mut(&id).filter(|s| s.joining) {
                // The next heartbeat starts the join again.
                s.joining = false;
                s.join_work = Some(slabs);
            }
            return;
        }
        self.reconcile_server(id);
        let mut st = self.state.lock();
        if let Some(s) = st.servers.get_mut(&id).filter(|s| s.joining) {
            s.joining = false;
            s.ready = true;
        }
    }

    /// The data-plane tag of the tenant that owns `region` (memory servers
    /// count connections per owner); 0 if the region is gone. Takes the
    /// state lock: never call it with the lock held.
    fn owner_of(&self, region: u64) -> u64 {
        self.state
            .lock()
            .regions
            .get(&region)
            .map_or(0, |r| remora_proto::tenant_tag(&r.tenant))
    }

    fn client_request(&self, tenant: &str, req: CtlRequest) -> Result<CtlReply, Failure> {
        match req {
            CtlRequest::Alloc {
                size,
                name,
                redundancy,
            } => self
                .alloc(tenant, size, name, redundancy)
                .map(CtlReply::Region),
            CtlRequest::Free { region } => self.free(tenant, region).map(|_| CtlReply::Ack),
            CtlRequest::Open { name } => {
                let st = self.state.lock();
                match st.names.get(&(tenant.to_string(), name.clone())) {
                    Some(&id) if id != 0 => Ok(CtlReply::Region(st.regions[&id].map.clone())),
                    _ => Err((
                        ErrorCode::RegionNotFound,
                        format!("no region named {name:?}"),
                    )),
                }
            }
            CtlRequest::GetMap { region } => {
                let st = self.state.lock();
                match st.regions.get(&region) {
                    Some(r) if r.tenant == tenant => Ok(CtlReply::Region(r.map.clone())),
                    _ => Err((ErrorCode::RegionNotFound, format!("no region {region}"))),
                }
            }
            CtlRequest::List => {
                let st = self.state.lock();
                Ok(CtlReply::Regions(
                    st.regions
                        .values()
                        .filter(|r| r.tenant == tenant)
                        .map(|r| region_info(r, &st.servers))
                        .collect(),
                ))
            }
            CtlRequest::Status => Ok(CtlReply::Status(self.status(tenant))),
            CtlRequest::MoveSlab { region, index, to } => self
                .move_slab(tenant, region, index, to)
                .map(CtlReply::Region),
            other => Err((
                ErrorCode::NotAuthorized,
                format!("clients may not send {other:?}"),
            )),
        }
    }

    fn status(&self, tenant: &str) -> ClusterStatus {
        let (rebuilt_slabs, rebuilt_bytes) = *self.rebuilt.lock();
        let st = self.state.lock();
        let admin = st.tenants.get(tenant).is_some_and(|t| t.t.admin);
        ClusterStatus {
            slab_size: self.cfg.slab_size,
            placement: self.cfg.placement.name().to_string(),
            servers: st
                .servers
                .iter()
                .map(|(id, s)| ServerInfo {
                    id: *id,
                    addr: s.addr.clone(),
                    capacity: s.capacity,
                    slabs_total: s.slabs_total,
                    slabs_used: s.slabs_used.max(s.assigned),
                    alive: s.usable(),
                    last_seen_ms: s.last_seen.elapsed().as_millis() as u64,
                    waiting: s.alive && !s.ready,
                })
                .collect(),
            tenants: st
                .tenants
                .values()
                .filter(|t| admin || t.t.name == tenant)
                .map(|t| TenantInfo {
                    name: t.t.name.clone(),
                    quota: t.t.quota,
                    used: t.used,
                    regions: t.regions,
                })
                .collect(),
            regions: st
                .regions
                .values()
                .filter(|r| admin || r.tenant == tenant)
                .map(|r| region_info(r, &st.servers))
                .collect(),
            rebuilt_slabs,
            rebuilt_bytes,
        }
    }

    fn alloc(
        &self,
        tenant: &str,
        size: u64,
        name: Option<String>,
        redundancy: Redundancy,
    ) -> Result<RegionMap, Failure> {
        let ss = self.cfg.slab_size;
        if size == 0 {
            return Err((
                ErrorCode::InvalidArgument,
                "region size must be positive".into(),
            ));
        }
        redundancy
            .validate()
            .map_err(|m| (ErrorCode::InvalidArgument, m))?;
        let n = size.div_ceil(ss);
        if n > MAX_REGION_SLABS {
            return Err((
                ErrorCode::InvalidArgument,
                format!(
                    "region of {size} bytes exceeds the maximum of {} bytes",
                    MAX_REGION_SLABS * ss
                ),
            ));
        }
        if let Some(nm) = &name {
            if !valid_name(nm) {
                return Err((
                    ErrorCode::InvalidArgument,
                    format!("invalid region name {nm:?}: use 1-128 of [A-Za-z0-9-_./]"),
                ));
            }
        }
        let extra = redundancy.extra_slabs(n);
        let total = n + extra;
        // Reserve under the lock.
        let (region_id, slabs, extra_locs) = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let t = st
                .tenants
                .get(tenant)
                .ok_or((ErrorCode::Unauthenticated, "tenant vanished".to_string()))?;
            let bytes = total * ss;
            if let Some(q) = t.t.quota {
                if t.used + bytes > q {
                    return Err((
                        ErrorCode::QuotaExceeded,
                        format!(
                            "tenant {tenant:?} would use {} of its {} quota",
                            remora_proto::size::Bytes(t.used + bytes),
                            remora_proto::size::Bytes(q)
                        ),
                    ));
                }
            }
            if let Some(nm) = &name {
                if st.names.contains_key(&(tenant.to_string(), nm.clone())) {
                    return Err((
                        ErrorCode::NameTaken,
                        format!("a region named {nm:?} exists"),
                    ));
                }
            }
            let cands = candidates(st, &[]);
            let (groups, width) = match redundancy {
                Redundancy::None => (n, 1),
                Redundancy::Replicate(c) => (n, c as usize),
                Redundancy::Erasure { data, .. } => (n.div_ceil(data as u64), redundancy.width()),
            };
            let picks = placement::place_groups(
                &cands,
                groups,
                width,
                &[],
                self.cfg.placement,
                &mut st.rng,
            )
            .ok_or_else(|| {
                let free: u64 = cands.iter().map(|c| c.free).sum();
                (
                    ErrorCode::InsufficientCapacity,
                    format!(
                        "need {total} slabs of {ss} bytes ({redundancy}: groups of {width} on distinct servers), {} live servers have {free} free",
                        cands.len()
                    ),
                )
            })?;
            // Server of each piece, in map order (data slabs, then extra).
            let mut data_srv = Vec::with_capacity(n as usize);
            let mut extra_srv = Vec::with_capacity(extra as usize);
            match redundancy {
                Redundancy::None | Redundancy::Replicate(_) => {
                    for g in &picks {
                        data_srv.push(g[0]);
                        extra_srv.extend_from_slice(&g[1..]);
                    }
                }
                Redundancy::Erasure { data, .. } => {
                    let k = data as usize;
                    for (si, g) in picks.iter().enumerate() {
                        let in_stripe = (n as usize - si * k).min(k);
                        data_srv.extend_from_slice(&g[..in_stripe]);
                        extra_srv.extend_from_slice(&g[k..]);
                    }
                }
            }
            let region_id = st.next_region;
            st.next_region += 1;
            let first_slab = st.next_slab;
            st.next_slab += total;
            st.pending.push((first_slab, first_slab + total));
            let mut locs = Vec::with_capacity(total as usize);
            for (i, sid) in data_srv.into_iter().chain(extra_srv).enumerate() {
                let key = new_key(&mut st.rng);
                let s = st
                    .servers
                    .get_mut(&sid)
                    .ok_or((ErrorCode::Internal, "server vanished".to_string()))?;
                s.assigned += 1;
                locs.push(SlabLoc {
                    server_id: sid,
                    addr: s.addr.clone(),
                    slab: first_slab + i as u64,
                    key,
                    lost: false,
                    restored: false,
                });
            }
            if let Some(t) = st.tenants.get_mut(tenant) {
                t.used += bytes;
                t.regions += 1;
            }
            if let Some(nm) = &name {
                st.names.insert((tenant.to_string(), nm.clone()), 0);
            }
            let extra_locs = locs.split_off(n as usize);
            (region_id, locs, extra_locs)
        };
        let map = RegionMap {
            id: region_id,
            name: name.clone(),
            size,
            slab_size: ss,
            version: 1,
            redundancy,
            slabs,
            extra: extra_locs,
        };
        // Create the slabs outside the lock, one pipelined burst per server.
        let mut by_server: BTreeMap<u64, Vec<&SlabLoc>> = BTreeMap::new();
        for loc in map.pieces() {
            by_server.entry(loc.server_id).or_default().push(loc);
        }
        let mut created: Vec<SlabLoc> = Vec::new();
        let mut failure = None;
        for (sid, locs) in &by_server {
            let reqs: Vec<Request<'_>> = locs
                .iter()
                .map(|l| Request::CreateSlab {
                    slab: l.slab,
                    key: l.key,
                    owner: remora_proto::tenant_tag(tenant),
                })
                .collect();
            for (l, r) in locs.iter().zip(self.admin_calls(*sid, &reqs)) {
                match r {
                    Ok(()) => created.push((*l).clone()),
                    Err(e) => {
                        // The server may have created it before the
                        // connection failed: drop it on rollback too.
                        if e.0 == ErrorCode::ServerUnavailable {
                            created.push((*l).clone());
                        }
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        let stored = StoredRegion {
            tenant: tenant.to_string(),
            map: map.clone(),
        };
        if failure.is_none() {
            let (nr, ns) = {
                let st = self.state.lock();
                (st.next_region, st.next_slab)
            };
            if let Err(e) = self.store.put_region(&stored, nr, ns) {
                failure = Some((ErrorCode::Internal, e.to_string()));
            }
        }
        let first_slab = map.slabs.first().map_or(0, |l| l.slab);
        let mut st = self.state.lock();
        if let Some((code, msg)) = failure {
            drop(st);
            self.drop_slabs(&created);
            let mut st = self.state.lock();
            self.release(&mut st, &stored);
            unpend(&mut st, first_slab);
            return Err((code, format!("allocating region: {msg}")));
        }
        if let Some(nm) = &name {
            st.names.insert((tenant.to_string(), nm.clone()), region_id);
        }
        st.regions.insert(region_id, stored);
        unpend(&mut st, first_slab);
        info!(
            "tenant {tenant:?} allocated region {region_id} ({size} bytes, {} slabs, {redundancy})",
            map.slabs.len() + map.extra.len()
        );
        Ok(map)
    }

    /// Undoes the accounting of a region (which is not, or no longer, in `regions`).
    fn release(&self, st: &mut State, r: &StoredRegion) {
        for loc in r.map.pieces() {
            if let Some(s) = st.servers.get_mut(&loc.server_id) {
                s.assigned = s.assigned.saturating_sub(1);
            }
        }
        if let Some(t) = st.tenants.get_mut(&r.tenant) {
            t.used = t
                .used
                .saturating_sub(r.map.pieces().count() as u64 * r.map.slab_size);
            t.regions = t.regions.saturating_sub(1);
        }
        if let Some(nm) = &r.map.name {
            st.names.remove(&(r.tenant.clone(), nm.clone()));
        }
    }

    fn free(&self, tenant: &str, region: u64) -> Result<(), Failure> {
        let r = {
            let mut st = self.state.lock();
            match st.regions.get(&region) {
                Some(r) if r.tenant == tenant => {}
                _ => return Err((ErrorCode::RegionNotFound, format!("no region {region}"))),
            }
            self.store
                .delete_region(region)
                .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
            let Some(r) = st.regions.remove(&region) else {
                return Err((ErrorCode::RegionNotFound, format!("no region {region}")));
            };
            self.release(&mut st, &r);
            r
        };
        let live: Vec<SlabLoc> = r.map.pieces().filter(|l| !l.lost).cloned().collect();
        self.drop_slabs(&live);
        info!("tenant {tenant:?} freed region {region}");
        Ok(())
    }

    /// Moves slab `index` of a region to another server: create the new
    /// slab, have the source freeze and copy its slab there, switch the map
    /// (version + 1, persisted), drop the old slab. Clients that hit the
    /// frozen or dropped slab refresh their map and retry.
    fn move_slab(
        &self,
        tenant: &str,
        region: u64,
        index: u64,
        to: Option<String>,
    ) -> Result<RegionMap, Failure> {
        let (src, dest, dest_server) = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let admin = st.tenants.get(tenant).is_some_and(|t| t.t.admin);
            let r = match st.regions.get(&region) {
                Some(r) if r.tenant == tenant || admin => r,
                _ => return Err((ErrorCode::RegionNotFound, format!("no region {region}"))),
            };
            let Some(src) = r.map.pieces().nth(index as usize).cloned() else {
                return Err((
                    ErrorCode::InvalidArgument,
                    format!(
                        "region {region} has {} slabs, no slab {index}",
                        r.map.pieces().count()
                    ),
                ));
            };
            if matches!(r.map.redundancy, Redundancy::Erasure { .. }) {
                return Err((
                    ErrorCode::Unsupported,
                    "slabs of erasure-coded regions are not moved (parity updates in flight would miss the copy); they are rebuilt when lost".into(),
                ));
            }
            if src.lost {
                return Err((
                    ErrorCode::DataLost,
                    format!("slab {index} of region {region} is lost (its server died)"),
                ));
            }
            // The other pieces of its group stay on other servers.
            let group: Vec<u64> = r
                .map
                .group_of(index as usize)
                .into_iter()
                .filter_map(|i| r.map.pieces().nth(i).map(|l| l.server_id))
                .collect();
            if !st.moving.insert(src.slab) {
                return Err((
                    ErrorCode::InvalidArgument,
                    format!("slab {index} of region {region} is already moving"),
                ));
            }
            let pick = match &to {
                Some(addr) => st
                    .servers
                    .iter()
                    .find(|(_, s)| &s.addr == addr && s.usable())
                    .map(|(id, s)| (*id, s.free()))
                    .filter(|(id, free)| !group.contains(id) && *free > 0)
                    .map(|(id, _)| id),
                None => {
                    let cands = candidates(st, &group);
                    placement::place(&cands, 1, self.cfg.placement, &mut st.rng)
                        .and_then(|v| v.first().copied())
                }
            };
            let Some(dest_server) = pick else {
                st.moving.remove(&src.slab);
                return Err((
                    ErrorCode::InsufficientCapacity,
                    match &to {
                        Some(a) => format!(
                            "{a} is not a live server with a free slab outside the slab's group"
                        ),
                        None => {
                            "no live server outside the slab's group has a free slab".to_string()
                        }
                    },
                ));
            };
            let Some(dest) = reserve_slab(st, dest_server, false) else {
                st.moving.remove(&src.slab);
                return Err((ErrorCode::Internal, "server vanished".into()));
            };
            (src, dest, dest_server)
        };
        let undo = |thaw: bool, drop_dest: bool| {
            if thaw {
                let _ = self.admin_call(
                    src.server_id,
                    &Request::ThawSlab {
                        slab: src.slab,
                        new_key: src.key,
                    },
                );
            }
            if drop_dest {
                let _ = self.admin_call(dest_server, &Request::DropSlab { slab: dest.slab });
            }
            let mut st = self.state.lock();
            if let Some(s) = st.servers.get_mut(&dest_server) {
                s.assigned = s.assigned.saturating_sub(1);
            }
            st.moving.remove(&src.slab);
            unpend(&mut st, dest.slab);
        };
        if let Err((code, msg)) = self.admin_call(
            dest_server,
            &Request::CreateSlab {
                slab: dest.slab,
                key: dest.key,
                owner: self.owner_of(region),
            },
        ) {
            // Outcome unknown on a connection failure: drop it to be sure.
            undo(false, code == ErrorCode::ServerUnavailable);
            return Err((code, format!("moving slab: {msg}")));
        }
        self.pause_point("move:after_create");
        let copy = Request::CopySlab {
            slab: src.slab,
            dest_slab: dest.slab,
            dest_key: dest.key,
            dest_addr: &dest.addr,
        };
        if let Err((code, msg)) = self.admin_call(src.server_id, &copy) {
            undo(true, true);
            return Err((code, format!("moving slab: {msg}")));
        }
        self.pause_point("move:after_copy");
        // Switch the map.
        let switched = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let (nr, ns) = (st.next_region, st.next_slab);
            let dest_ok = st.servers.get(&dest_server).is_some_and(|s| s.usable());
            match st.regions.get_mut(&region) {
                None => Err((
                    ErrorCode::RegionNotFound,
                    format!("region {region} was freed during the move"),
                )),
                Some(_) if !dest_ok => Err((
                    ErrorCode::ServerUnavailable,
                    format!("{} died during the move", dest.addr),
                )),
                Some(r) => {
                    let mut next = r.clone();
                    let same = match next.map.piece_mut(index as usize) {
                        Some(p) if p.slab == src.slab && !p.lost => {
                            *p = dest.clone();
                            true
                        }
                        _ => false,
                    };
                    next.map.version += 1;
                    let stored = if same {
                        self.store
                            .put_region(&next, nr, ns)
                            .map_err(|e| e.to_string())
                    } else {
                        Err(format!(
                            "slab {index} of region {region} was lost during the move"
                        ))
                    };
                    match stored {
                        Ok(()) => {
                            *r = next;
                            if let Some(s) = st.servers.get_mut(&src.server_id) {
                                s.assigned = s.assigned.saturating_sub(1);
                            }
                            let map = r.map.clone();
                            st.moving.remove(&src.slab);
                            unpend(st, dest.slab);
                            Ok(map)
                        }
                        Err(e) => Err((ErrorCode::Internal, e)),
                    }
                }
            }
        };
        match switched {
            Ok(map) => {
                self.pause_point("move:after_switch");
                let _ = self.admin_call(src.server_id, &Request::DropSlab { slab: src.slab });
                info!(
                    "moved slab {index} of region {region} from {} to {} (map version {})",
                    src.addr, dest.addr, map.version
                );
                Ok(map)
            }
            Err(e) => {
                undo(true, true);
                Err(e)
            }
        }
    }

    /// Drops slabs on their servers (best effort: a dead server has lost them anyway).
    fn drop_slabs(&self, slabs: &[SlabLoc]) {
        let mut by_server: BTreeMap<u64, Vec<Request<'_>>> = BTreeMap::new();
        for l in slabs {
            by_server
                .entry(l.server_id)
                .or_default()
                .push(Request::DropSlab { slab: l.slab });
        }
        for (sid, reqs) in by_server {
            for r in self.admin_calls(sid, &reqs) {
                if let Err((code, msg)) = r {
                    debug!("dropping a slab on server {sid:016x}: {code}: {msg}");
                }
            }
        }
    }

    /// Sends a control operation to a server over a cached admin connection.
    fn admin_call(&self, server_id: u64, req: &Request<'_>) -> Result<(), Failure> {
        self.admin_calls(server_id, std::slice::from_ref(req))
            .pop()
            .unwrap_or_else(|| Err((ErrorCode::Internal, "no reply".into())))
    }

    /// Runs `f` on the cached admin connection to a server (connecting and
    /// handshaking with its admin key first if needed); a failed connection
    /// is dropped from the cache.
    fn with_admin_conn<T>(
        &self,
        server_id: u64,
        f: impl FnOnce(&mut RpcConn) -> Result<T, NetError>,
    ) -> Result<T, Failure> {
        let (addr, key) = {
            let st = self.state.lock();
            match st.servers.get(&server_id) {
                Some(s) => (s.addr.clone(), s.admin_key),
                None => {
                    return Err((
                        ErrorCode::ServerUnavailable,
                        format!("server {server_id:016x} is gone"),
                    ))
                }
            }
        };
        let slot = self
            .admin_conns
            .lock()
            .entry(server_id)
            .or_insert_with(|| Arc::new(Mutex::new(None)))
            .clone();
        let mut conn = slot.lock();
        let unavailable =
            |e: NetError| (ErrorCode::ServerUnavailable, format!("server {addr}: {e}"));
        if conn.is_none() {
            let mut c = RpcConn::connect(
                &TcpTransport,
                &addr,
                Duration::from_secs(2),
                LatencyInjector::default(),
            )
            .map_err(unavailable)?;
            c.set_timeout(ADMIN_TIMEOUT);
            let f = c
                .call(|b, id| data::hello(b, id, key, 0, (0, 0)))
                .map_err(unavailable)?;
            match data::decode_reply(f.kind, &f.payload) {
                Ok(Reply::HelloOk { max_frame, .. }) => {
                    self.max_frames.lock().insert(server_id, max_frame);
                    *conn = Some(c);
                }
                other => {
                    return Err((
                        ErrorCode::ServerUnavailable,
                        format!("server {addr}: handshake: {other:?}"),
                    ))
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            return Err((ErrorCode::Internal, "no admin connection".into()));
        };
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => {
                *conn = None;
                Err(unavailable(e))
            }
        }
    }

    /// Sends control operations to one server, pipelined in bursts; one
    /// result per request, in order.
    fn admin_calls(&self, server_id: u64, reqs: &[Request<'_>]) -> Vec<Result<(), Failure>> {
        let frames = self.with_admin_conn(server_id, |c| {
            let mut frames = Vec::with_capacity(reqs.len());
            for burst in reqs.chunks(1024) {
                frames.extend(c.call_pipelined(burst.len(), |b, i, id| {
                    data::encode_request(b, id, &burst[i])
                })?);
            }
            Ok(frames)
        });
        let frames = match frames {
            Ok(f) => f,
            Err(e) => return reqs.iter().map(|_| Err(e.clone())).collect(),
        };
        let addr = self
            .state
            .lock()
            .servers
            .get(&server_id)
            .map_or_else(|| format!("{server_id:016x}"), |s| s.addr.clone());
        frames
            .into_iter()
            .map(|f| match data::decode_reply(f.kind, &f.payload) {
                Ok(Reply::Done) => Ok(()),
                Ok(Reply::Error { code, message }) => {
                    Err((code, format!("server {addr}: {message}")))
                }
                other => Err((
                    ErrorCode::Internal,
                    format!("server {addr}: unexpected reply {other:?}"),
                )),
            })
            .collect()
    }

    /// Every slab id a server holds.
    fn admin_list(&self, server_id: u64) -> Result<Vec<u64>, Failure> {
        self.with_admin_conn(server_id, |c| {
            let mut ids = Vec::new();
            let mut after = 0;
            loop {
                let f = c.call(|b, id| {
                    data::encode_request(b, id, &Request::ListSlabs { after, max: 65536 })
                })?;
                let page: Vec<u64> = match data::decode_reply(f.kind, &f.payload) {
                    Ok(Reply::Data(d)) => d
                        .chunks_exact(8)
                        .map(|w| {
                            u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
                        })
                        .collect(),
                    _ => return Ok(ids),
                };
                match page.last() {
                    Some(&last) if last > after => {
                        after = last;
                        ids.extend(page);
                    }
                    _ => return Ok(ids),
                }
            }
        })
    }

    /// Checks every live server against the committed maps (see
    /// [`Inner::reconcile_server`]).
    fn reconcile(&self) {
        let servers: Vec<u64> = {
            let st = self.state.lock();
            st.servers
                .iter()
                .filter(|(_, s)| s.usable())
                .map(|(id, _)| *id)
                .collect()
        };
        for sid in servers {
            self.reconcile_server(sid);
        }
    }

    /// Checks one server against the committed maps:
    /// * drops slabs it holds that no committed map and no allocation, move
    ///   or rebuild in flight knows (left by a failed drop, a controller
    ///   that died mid-allocation, or a move whose source drop failed);
    /// * probes each slab the maps place on it with the key they record (a
    ///   read of zero bytes). A slab refused with `BadCapability` (its key
    ///   disagrees with the map: a rekey was lost) or `SlabFrozen` while no
    ///   move, rebuild or join of it is in flight (a thaw was lost) is
    ///   thawed with the map's key. `UnknownSlab` means the server lost a
    ///   slab of a committed map: reported.
    fn reconcile_server(&self, sid: u64) {
        let Ok(listed) = self.admin_list(sid) else {
            return;
        };
        let (orphans, committed) = {
            let st = self.state.lock();
            let committed = committed_on(&st, sid);
            let known: std::collections::HashSet<u64> =
                committed.iter().map(|(slab, _)| *slab).collect();
            let orphans: Vec<u64> = listed
                .into_iter()
                .filter(|id| {
                    !known.contains(id) && !st.pending.iter().any(|(a, b)| (*a..*b).contains(id))
                })
                .collect();
            (orphans, committed)
        };
        if !orphans.is_empty() {
            let reqs: Vec<Request<'_>> = orphans
                .iter()
                .map(|&slab| Request::DropSlab { slab })
                .collect();
            let dropped = self
                .admin_calls(sid, &reqs)
                .into_iter()
                .filter(|r| r.is_ok())
                .count();
            info!("dropped {dropped} orphan slabs on server {sid:016x}");
        }
        if committed.is_empty() {
            return;
        }
        let Ok(probed) = self.admin_probe(sid, &committed) else {
            return;
        };
        let mut suspect = Vec::new();
        for ((slab, _), code) in committed.iter().zip(probed) {
            match code {
                None => {}
                Some(ErrorCode::BadCapability | ErrorCode::SlabFrozen) => suspect.push(*slab),
                Some(ErrorCode::UnknownSlab) => {
                    warn!("server {sid:016x} does not hold slab {slab} of a committed map")
                }
                Some(code) => debug!("probing slab {slab} on server {sid:016x}: {code}"),
            }
        }
        if suspect.is_empty() {
            return;
        }
        // Claim the suspects that are still placed there and that no move,
        // rebuild or join has frozen meanwhile (those end by thawing them
        // with the map's key themselves), with the key the map records now.
        let claimed: Vec<(u64, u64)> = {
            let mut st = self.state.lock();
            let now: HashMap<u64, u64> = committed_on(&st, sid).into_iter().collect();
            let claimed: Vec<(u64, u64)> = suspect
                .iter()
                .filter_map(|slab| now.get(slab).map(|key| (*slab, *key)))
                .filter(|(slab, _)| !st.moving.contains(slab))
                .collect();
            for (slab, _) in &claimed {
                st.moving.insert(*slab);
            }
            claimed
        };
        let reqs: Vec<Request<'_>> = claimed
            .iter()
            .map(|&(slab, key)| Request::ThawSlab { slab, new_key: key })
            .collect();
        let mut repaired = 0;
        for ((slab, _), r) in claimed.iter().zip(self.admin_calls(sid, &reqs)) {
            match r {
                Ok(()) => repaired += 1,
                Err((code, msg)) => {
                    debug!("thawing slab {slab} on server {sid:016x}: {code}: {msg}")
                }
            }
        }
        {
            let mut st = self.state.lock();
            for (slab, _) in &claimed {
                st.moving.remove(slab);
            }
        }
        if repaired > 0 {
            warn!(
                "server {sid:016x}: {repaired} slabs were frozen or keyed unlike their committed maps; thawed with the maps' keys"
            );
        }
    }

    /// Reads zero bytes of each `(slab, key)` on a server, pipelined: `None`
    /// where the server accepts the key, else the error code it answers.
    fn admin_probe(
        &self,
        sid: u64,
        slabs: &[(u64, u64)],
    ) -> Result<Vec<Option<ErrorCode>>, Failure> {
        let frames = self.with_admin_conn(sid, |c| {
            let mut frames = Vec::with_capacity(slabs.len());
            for burst in slabs.chunks(1024) {
                frames.extend(c.call_pipelined(burst.len(), |b, i, id| {
                    let (slab, key) = burst[i];
                    data::encode_request(
                        b,
                        id,
                        &Request::Read {
                            at: Target {
                                slab,
                                key,
                                offset: 0,
                            },
                            len: 0,
                        },
                    )
                })?);
            }
            Ok(frames)
        })?;
        Ok(frames
            .into_iter()
            .map(|f| match data::decode_reply(f.kind, &f.payload) {
                Ok(Reply::Data(_)) => None,
                Ok(Reply::Error { code, .. }) => Some(code),
                _ => Some(ErrorCode::Internal),
            })
            .collect())
    }
}

/// Reserves a new slab on server `sid`: a fresh id (pending until its map
/// is committed), a key, one more slab assigned to the server. `None` if
/// the server is unknown.
fn reserve_slab(st: &mut State, sid: u64, restored: bool) -> Option<SlabLoc> {
    let key = new_key(&mut st.rng);
    let s = st.servers.get_mut(&sid)?;
    s.assigned += 1;
    let addr = s.addr.clone();
    let slab = st.next_slab;
    st.next_slab += 1;
    st.pending.push((slab, slab + 1));
    Some(SlabLoc {
        server_id: sid,
        addr,
        slab,
        key,
        lost: false,
        restored,
    })
}

/// The slabs the committed maps place on server `sid` (not lost), with the
/// keys the maps record.
fn committed_on(st: &State, sid: u64) -> Vec<(u64, u64)> {
    st.regions
        .values()
        .flat_map(|r| r.map.pieces())
        .filter(|l| l.server_id == sid && !l.lost)
        .map(|l| (l.slab, l.key))
        .collect()
}

/// The servers placement may use (live and ready), but those in `exclude`.
fn candidates(st: &State, exclude: &[u64]) -> Vec<Candidate> {
    st.servers
        .iter()
        .filter(|(id, s)| s.usable() && !exclude.contains(id))
        .map(|(id, s)| Candidate {
            id: *id,
            free: s.free(),
        })
        .collect()
}

/// Forgets the pending range that starts at `first`.
fn unpend(st: &mut State, first: u64) {
    st.pending.retain(|(a, _)| *a != first);
}

fn region_info(r: &StoredRegion, servers: &BTreeMap<u64, ServerState>) -> RegionInfo {
    RegionInfo {
        id: r.map.id,
        name: r.map.name.clone(),
        tenant: r.tenant.clone(),
        size: r.map.size,
        slabs: r.map.slabs.len() as u64,
        version: r.map.version,
        redundancy: r.map.redundancy,
        lost: r.map.lost() as u64,
        pieces: r.map.pieces().count() as u64,
        at_risk: r
            .map
            .pieces()
            .filter(|l| !l.lost && !servers.get(&l.server_id).is_some_and(|s| s.usable()))
            .count() as u64,
    }
}

/// A random non-zero capability key.
fn new_key(rng: &mut impl Rng) -> u64 {
    loop {
        let k: u64 = rng.gen();
        if k != 0 {
            return k;
        }
    }
}
