//! The Remora client runtime.
//!
//! [`Cluster::connect`] authenticates to the controller as a tenant; the
//! cluster handle allocates, opens and frees [`Region`]s. A region is a far
//! byte range `[0, size)` spread over slabs on several memory servers; the
//! client caches the region→slab map and talks to the servers directly, one
//! pipelined connection per server ([`conn`]), shared by every region and
//! thread of the process.
//!
//! On a region: [`Region::read`], [`Region::write`],
//! [`Region::compare_and_swap`] and [`Region::fetch_add`] (8-byte aligned,
//! little-endian words), vectored and batched forms ([`Region::batch`]),
//! and async forms (`*_async`, plain `std::future::Future`s that work on any
//! executor) so one thread keeps many requests in flight. A request that
//! spans slabs is split and its pieces go out in parallel.
//! [`Region::offload`] runs an [`OffloadOp`] on the server that holds the
//! bytes (an aggregate, a filter, a hash-table probe, a list walk or a
//! copy within one slab) and returns its reply, decoded with the types in
//! [`offload`].
//!
//! Failure handling: every request has a deadline; a dropped connection is
//! replaced on next use; reads and writes (idempotent) are retried after a
//! reconnect or a map refresh; atomics carry a request id (unique in this
//! client's session) so that a retry after a lost reply is applied once. A
//! server that no longer knows a slab triggers a refresh of the region map
//! from the controller.
//!
//! Redundancy: a region allocated with [`Redundancy::Replicate`] or
//! [`Redundancy::Erasure`] survives the loss of servers; its operations
//! fail over to other copies or reconstruct from parity, and wait (up to
//! [`ClientOptions::failover_timeout`]) while the controller declares a
//! server dead and rebuilds its slabs. See the `redundant` module for the
//! consistency each scheme gives.
//!
//! Sharing: [`FarMutex`] and [`FarBarrier`] coordinate clients that share a
//! named region, using the servers' compare-and-swap and fetch-and-add.

pub mod chain;
mod conn;
mod region;
mod sync;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use remora_net::{LatencyInjector, NetError, RpcConn, TcpTransport, Transport};
pub use remora_proto::ctl::Redundancy;
use remora_proto::ctl::{self, ClusterStatus, CtlReply, CtlRequest, RegionInfo, RegionMap};
use remora_proto::data;
pub use remora_proto::data::{ServerStats, Target};
pub use remora_proto::offload::{self, OffloadOp};
use remora_proto::{ErrorCode, VERSION};

pub use region::{Batch, BatchResult, OpFuture, ReadFuture, Region};
pub use remora_proto::ctl::{ClusterStatus as Status, RegionInfo as RegionSummary};
pub use sync::{FarBarrier, FarMutex, FarMutexGuard, FarWords};

use conn::Conn;

/// Client errors. Each says what failed and where.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Talking to the controller failed.
    #[error("controller {addr}: {source}")]
    Controller {
        /// Controller address.
        addr: String,
        /// Cause.
        #[source]
        source: Arc<NetError>,
    },
    /// The controller refused the request.
    #[error("controller: {code}: {message}")]
    Rejected {
        /// Error code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Talking to a memory server failed (connection refused, reset, closed).
    #[error("server {addr}: {source}")]
    Server {
        /// Server address.
        addr: String,
        /// Cause.
        #[source]
        source: Arc<NetError>,
    },
    /// A memory server refused the request.
    #[error("server {addr}: {message}")]
    Remote {
        /// Server address.
        addr: String,
        /// Error code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// No reply before the deadline.
    #[error("server {addr}: no reply within {timeout:?}")]
    Timeout {
        /// Server address.
        addr: String,
        /// The deadline.
        timeout: Duration,
    },
    /// Access outside the region.
    #[error("region {region}: range [{offset}, {offset}+{len}) is outside its {size} bytes")]
    OutOfRange {
        /// Region id.
        region: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// An atomic at an offset that is not 8-byte aligned.
    #[error("region {region}: atomic at offset {offset} is not 8-byte aligned")]
    Unaligned {
        /// Region id.
        region: u64,
        /// Offset.
        offset: u64,
    },
    /// The bytes were on a server that died, and the region has no copy or
    /// parity left to rebuild them from.
    #[error("region {region}: the data at offset {offset} was lost with its server ({detail})")]
    DataLost {
        /// Region id.
        region: u64,
        /// Offset of the first lost byte asked for.
        offset: u64,
        /// Which slab, and why.
        detail: String,
    },
    /// An atomic was sent, its reply was lost, and the copy that may have
    /// applied it is gone: it may or may not have taken effect.
    #[error("region {region}: the outcome of the atomic at offset {offset} is unknown ({detail})")]
    OutcomeUnknown {
        /// Region id.
        region: u64,
        /// Offset of the word.
        offset: u64,
        /// Why.
        detail: String,
    },
    /// The arguments of an operation are invalid (checked before anything
    /// is sent).
    #[error("region {region}: {detail}")]
    InvalidArgument {
        /// Region id.
        region: u64,
        /// What is wrong.
        detail: String,
    },
    /// The operation is not available on this region.
    #[error("region {region}: {what}")]
    Unsupported {
        /// Region id.
        region: u64,
        /// What is not supported, and what to use instead.
        what: String,
    },
    /// The peer answered something this client does not understand.
    #[error("{addr}: protocol error: {detail}")]
    Protocol {
        /// Peer address.
        addr: String,
        /// What was wrong.
        detail: String,
    },
}

impl ClientError {
    pub(crate) fn net(addr: &str, source: NetError) -> Self {
        match source {
            NetError::Timeout { timeout, .. } => ClientError::Timeout {
                addr: addr.to_string(),
                timeout,
            },
            source => ClientError::Server {
                addr: addr.to_string(),
                source: Arc::new(source),
            },
        }
    }

    /// The protocol error code behind this error, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rejected { code, .. } | ClientError::Remote { code, .. } => Some(*code),
            ClientError::OutOfRange { .. } => Some(ErrorCode::OutOfRange),
            ClientError::Unaligned { .. } => Some(ErrorCode::Unaligned),
            ClientError::DataLost { .. } => Some(ErrorCode::DataLost),
            ClientError::Unsupported { .. } => Some(ErrorCode::Unsupported),
            ClientError::InvalidArgument { .. } => Some(ErrorCode::InvalidArgument),
            ClientError::Server { .. } | ClientError::Timeout { .. } => {
                Some(ErrorCode::ServerUnavailable)
            }
            _ => None,
        }
    }

    /// True if the connection to a server failed or timed out.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClientError::Server { .. } | ClientError::Timeout { .. }
        )
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of each connection attempt.
    pub connect_timeout: Duration,
    /// Deadline of each controller request (allocating a large region takes
    /// one control round trip per slab on the servers).
    pub control_timeout: Duration,
    /// Delay added to every received reply (fabric emulation).
    pub inject_latency: Duration,
    /// Largest piece one read or write request carries; bigger ones are split.
    pub max_io: usize,
    /// How often a failed idempotent request is retried.
    pub retries: u32,
    /// How long an operation on a region with redundancy keeps failing over
    /// and waiting for the cluster to settle (a server declared dead, a
    /// slab rebuilt) before it gives up. Should exceed the controller's
    /// `dead_after`.
    pub failover_timeout: Duration,
    /// A read of a replicated or erasure-coded region that has no reply
    /// after this long goes to another copy or is reconstructed from the
    /// other pieces instead (bounds the tail when a server is slow).
    pub hedge_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            control_timeout: Duration::from_secs(60),
            inject_latency: Duration::ZERO,
            max_io: 1 << 20,
            retries: 3,
            failover_timeout: Duration::from_secs(10),
            hedge_after: Duration::from_millis(50),
        }
    }
}

/// A connection to a Remora cluster, authenticated as one tenant.
///
/// Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Where the connection to one server lives; locked while connecting.
type ConnSlot = Arc<Mutex<Option<Arc<Conn>>>>;

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) controller: String,
    token: String,
    tenant: String,
    pub(crate) opts: ClientOptions,
    transport: Arc<dyn Transport>,
    /// Idle controller connections (one per concurrent control call).
    ctl: Mutex<Vec<RpcConn>>,
    /// One slot per server address; a slot's lock is held while connecting
    /// to that server only.
    conns: Mutex<HashMap<String, ConnSlot>>,
    /// Random id of this client, sent in every server handshake: servers
    /// remember atomics by (session, request id).
    session: u64,
    next_rid: std::sync::atomic::AtomicU64,
}

impl Cluster {
    /// Connects to the controller at `controller` with a tenant token.
    pub fn connect(controller: &str, token: &str) -> Result<Cluster> {
        Self::connect_with(controller, token, ClientOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(controller: &str, token: &str, opts: ClientOptions) -> Result<Cluster> {
        let mut inner = Inner {
            controller: controller.to_string(),
            token: token.to_string(),
            tenant: String::new(),
            opts,
            transport: Arc::new(TcpTransport),
            ctl: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            session: loop {
                let v: u64 = rand::random();
                if v != 0 {
                    break v;
                }
            },
            next_rid: std::sync::atomic::AtomicU64::new(1),
        };
        let (conn, tenant) = inner.ctl_connect()?;
        inner.tenant = tenant;
        inner.ctl.get_mut().push(conn);
        Ok(Cluster {
            inner: Arc::new(inner),
        })
    }

    /// The tenant this cluster handle acts for.
    pub fn tenant(&self) -> &str {
        &self.inner.tenant
    }

    /// The controller address.
    pub fn controller(&self) -> &str {
        &self.inner.controller
    }

    /// Allocates an unnamed region of `size` bytes.
    pub fn alloc_region(&self, size: u64) -> Result<Region> {
        self.alloc_with(size, None, Redundancy::None)
    }

    /// Allocates a region that other clients of the tenant can open by `name`.
    pub fn alloc_named(&self, name: &str, size: u64) -> Result<Region> {
        self.alloc_with(size, Some(name), Redundancy::None)
    }

    /// Allocates a region, optionally named, that survives the loss of
    /// servers as `redundancy` says (it costs `redundancy`'s memory overhead
    /// in quota).
    pub fn alloc_with(
        &self,
        size: u64,
        name: Option<&str>,
        redundancy: Redundancy,
    ) -> Result<Region> {
        let req = CtlRequest::Alloc {
            size,
            name: name.map(str::to_string),
            redundancy,
        };
        match self.inner.ctl_call(&req, false)? {
            CtlReply::Region(map) => Region::new(self.inner.clone(), map),
            other => Err(unexpected(&self.inner.controller, &other)),
        }
    }

    /// Opens the tenant's region called `name`.
    pub fn open_region(&self, name: &str) -> Result<Region> {
        match self.inner.ctl_call(
            &CtlRequest::Open {
                name: name.to_string(),
            },
            true,
        )? {
            CtlReply::Region(map) => Region::new(self.inner.clone(), map),
            other => Err(unexpected(&self.inner.controller, &other)),
        }
    }

    /// Frees a region by id (its data is gone; other handles to it get errors).
    pub fn free_region(&self, id: u64) -> Result<()> {
        match self
            .inner
            .ctl_call(&CtlRequest::Free { region: id }, false)?
        {
            CtlReply::Ack => Ok(()),
            other => Err(unexpected(&self.inner.controller, &other)),
        }
    }

    /// The tenant's regions.
    pub fn list_regions(&self) -> Result<Vec<RegionInfo>> {
        match self.inner.ctl_call(&CtlRequest::List, true)? {
            CtlReply::Regions(v) => Ok(v),
            other => Err(unexpected(&self.inner.controller, &other)),
        }
    }

    /// Moves slab `index` of region `id` to the server at `to` (or one chosen
    /// by placement); returns the new map. Clients using the region pause
    /// briefly while the slab is copied and then follow it.
    pub fn move_slab(&self, id: u64, index: u64, to: Option<&str>) -> Result<RegionMap> {
        let req = CtlRequest::MoveSlab {
            region: id,
            index,
            to: to.map(str::to_string),
        };
        match self.inner.ctl_call(&req, false)? {
            CtlReply::Region(m) => Ok(m),
            other => Err(unexpected(&self.inner.controller, &other)),
        }
    }

    /// Cluster status: servers, tenants and regions visible to this tenant.
    pub fn status(&self) -> Result<ClusterStatus> {
        match self.inner.ctl_call(&CtlRequest::Status, true)? {
            CtlReply::Status(s) => Ok(s),
            other => Err(unexpected(&self.inner.controller, &other)),
        }
    }

    /// Statistics of the memory server at `addr` (capacity, slabs, bytes
    /// and operations served, open connections).
    pub fn server_stats(&self, addr: &str) -> Result<ServerStats> {
        // A connection of its own, without a credential (statistics need
        // none), closed when done.
        let conn = Conn::connect(
            &*self.inner.transport,
            addr,
            self.inner.opts.connect_timeout,
            self.inner.opts.request_timeout,
            LatencyInjector::new(self.inner.opts.inject_latency),
            self.inner.session,
            (0, 0),
        )?;
        let id = conn.submit(|b, id| data::encode_request(b, id, &data::Request::Stats))?;
        conn.wait_with(id, |kind, payload| {
            match data::decode_reply(kind, payload) {
                Ok(data::Reply::Stats(s)) => Ok(s),
                Ok(data::Reply::Error { code, message }) => Err(ClientError::Remote {
                    addr: addr.to_string(),
                    code,
                    message: message.to_string(),
                }),
                other => Err(ClientError::Protocol {
                    addr: addr.to_string(),
                    detail: format!("expected statistics, got {other:?}"),
                }),
            }
        })?
    }
}

fn unexpected(addr: &str, r: &CtlReply) -> ClientError {
    ClientError::Protocol {
        addr: addr.to_string(),
        detail: format!("unexpected reply {r:?}"),
    }
}

impl Inner {
    fn ctl_connect(&self) -> Result<(RpcConn, String)> {
        let e = |source| ClientError::Controller {
            addr: self.controller.clone(),
            source: Arc::new(source),
        };
        let mut c = RpcConn::connect(
            &*self.transport,
            &self.controller,
            self.opts.connect_timeout,
            LatencyInjector::default(),
        )
        .map_err(e)?;
        c.set_timeout(self.opts.control_timeout);
        let hello = CtlRequest::ClientHello {
            version: VERSION,
            token: self.token.clone(),
        };
        let f = c
            .call(|b, id| ctl::encode(b, id, ctl::CTL_REQUEST, &hello))
            .map_err(e)?;
        match decode_ctl(&self.controller, &f)? {
            CtlReply::Welcome { tenant } => Ok((c, tenant)),
            other => Err(unexpected(&self.controller, &other)),
        }
    }

    /// Sends a control request on an idle controller connection (a new one
    /// if none is idle, so a slow request never holds up another).
    /// `retry`: the request is safe to resend after a failure mid-call.
    fn ctl_call(&self, req: &CtlRequest, retry: bool) -> Result<CtlReply> {
        let mut attempts = if retry { 2 } else { 1 };
        loop {
            attempts -= 1;
            let idle = self.ctl.lock().pop();
            let mut c = match idle {
                Some(c) => c,
                None => self.ctl_connect()?.0,
            };
            match c.call(|b, id| ctl::encode(b, id, ctl::CTL_REQUEST, req)) {
                Ok(f) => {
                    let mut pool = self.ctl.lock();
                    if pool.len() < 4 {
                        pool.push(c);
                    }
                    drop(pool);
                    return decode_ctl(&self.controller, &f);
                }
                Err(e) => {
                    // Broken or timed out: drop it, and the idle ones with
                    // it (they reach the same, possibly restarted, controller).
                    self.ctl.lock().clear();
                    if attempts == 0 {
                        return Err(ClientError::Controller {
                            addr: self.controller.clone(),
                            source: Arc::new(e),
                        });
                    }
                }
            }
        }
    }

    pub(crate) fn get_map(&self, region: u64) -> Result<RegionMap> {
        match self.ctl_call(&CtlRequest::GetMap { region }, true)? {
            CtlReply::Region(m) => Ok(m),
            other => Err(unexpected(&self.controller, &other)),
        }
    }

    /// The pooled connection to `addr`, (re)connecting if needed. Only
    /// callers of the same server wait for a connection attempt. A new
    /// connection authenticates with `cap`, the capability (slab id, key)
    /// of the slab the caller is about to use: the server counts it as
    /// this tenant's.
    pub(crate) fn conn(&self, addr: &str, cap: (u64, u64)) -> Result<Arc<Conn>> {
        let slot = {
            let mut pool = self.conns.lock();
            match pool.get(addr) {
                Some(s) => s.clone(),
                None => pool.entry(addr.to_string()).or_default().clone(),
            }
        };
        let mut slot = slot.lock();
        if let Some(c) = slot.as_ref() {
            if !c.is_dead() && !c.is_stale() {
                return Ok(c.clone());
            }
        }
        let c = Conn::connect(
            &*self.transport,
            addr,
            self.opts.connect_timeout,
            self.opts.request_timeout,
            LatencyInjector::new(self.opts.inject_latency),
            self.session,
            cap,
        )?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A request id for an atomic, unique within this client's session.
    pub(crate) fn next_rid(&self) -> u64 {
        self.next_rid
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops a broken connection so the next use reconnects.
    pub(crate) fn forget_conn(&self, addr: &str) {
        let slot = self.conns.lock().get(addr).cloned();
        if let Some(slot) = slot {
            if let Some(mut s) = slot.try_lock() {
                if s.as_ref().is_some_and(|c| c.is_dead()) {
                    *s = None;
                }
            }
        }
    }
}

fn decode_ctl(addr: &str, f: &remora_net::OwnedFrame) -> Result<CtlReply> {
    if f.kind != ctl::CTL_REPLY {
        if let Ok(remora_proto::data::Reply::Error { code, message }) =
            remora_proto::data::decode_reply(f.kind, &f.payload)
        {
            return Err(ClientError::Rejected {
                code,
                message: message.to_string(),
            });
        }
        return Err(ClientError::Protocol {
            addr: addr.to_string(),
            detail: format!("unexpected frame kind 0x{:x}", f.kind),
        });
    }
    match ctl::decode_reply(&f.payload) {
        Ok(CtlReply::Error { code, message }) => Err(ClientError::Rejected { code, message }),
        Ok(r) => Ok(r),
        Err(e) => Err(ClientError::Protocol {
            addr: addr.to_string(),
            detail: e.to_string(),
        }),
    }
}

static THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets a function that every thread the client library starts runs first
/// (once per process; later calls are ignored). The far heap uses it to keep
/// the runtime's own threads' allocations in local memory.
pub fn set_thread_start_hook(hook: fn()) {
    let _ = THREAD_START.set(hook);
}

pub(crate) fn thread_started() {
    if let Some(hook) = THREAD_START.get() {
        hook();
    }
}
