//! The Remora memory server.
//!
//! A server owns a fixed capacity of DRAM carved into slabs ([`pool`]) and
//! serves one-sided operations on them: read, write, compare-and-swap,
//! fetch-and-add and batches of these, operations it runs on a slab's bytes
//! for the client ([`offload`]: aggregates, filters, hash probes, pointer
//! chases, copies), plus control operations (create, drop
//! and copy slab) that only the controller may send (it authenticates with
//! the server's admin key in the handshake). It registers with the
//! controller, learns the cluster's slab size from it, and heartbeats its
//! usage.
//!
//! The server never trusts a client: every data operation carries a slab
//! capability that is checked before any byte is touched; a malformed
//! request gets a typed error reply; a frame that breaks the framing (too
//! large, too short) gets an error reply and the connection is closed.
//! Nothing a client sends can panic the process or touch another slab.
//!
//! Threading: one thread per connection. Each reads as many frames as have
//! arrived, executes them in order, and writes all replies with one write
//! before it blocks again, so pipelined requests cost one system call per
//! burst rather than per request. The protocol itself lives in [`session`]
//! (sans-IO); the thread only moves bytes.
//!
//! What a peer can make the server hold is bounded ([`admission`]):
//! connections must authenticate in the handshake (admin key or a slab
//! capability) within a deadline to count as clients; clients are limited
//! in number, per tenant, and in the bytes their buffers hold; no socket
//! I/O ever blocks while a lock is held that another request needs, and
//! heartbeats take no data-path lock at all. A peer that stops reading
//! slows only itself.

pub mod admission;
pub mod dedupe;
pub mod offload;
pub mod pool;
pub mod session;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use remora_net::{LatencyInjector, NetError, RpcConn, TcpTransport};
use remora_proto::ctl::{self, CtlReply, CtlRequest};
use remora_proto::data::{self, Reply, Request, Target};
use remora_proto::frame::DEFAULT_MAX_FRAME;
use remora_proto::{ErrorCode, VERSION};
use tracing::{debug, info, warn};

use admission::{Admission, Limits};
pub use pool::SlabPool;
use session::{Session, Step};

/// Smallest maximum frame a server may be configured with.
pub const MIN_MAX_FRAME: u32 = 64 << 10;
/// How long sending one burst of replies may take before the connection
/// is dropped (a peer that reads slowly or not at all).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Smallest buffer budget a server may be configured with.
pub const MIN_BUFFER_BUDGET: u64 = 32 << 20;

/// Memory server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Address to advertise to the controller and clients (default: the bound address).
    pub advertise: Option<String>,
    /// Controller address.
    pub controller: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Delay added to every received message.
    pub inject_latency: Duration,
    /// Largest frame accepted (at least 64 KiB).
    pub max_frame: u32,
    /// Most authenticated client connections at once; more are refused
    /// with `Overloaded` in their handshake.
    pub max_connections: usize,
    /// Most authenticated connections of one tenant at once (at most
    /// `max_connections`; the default is a quarter of it).
    pub max_connections_per_tenant: usize,
    /// Most connections that have not authenticated yet, at once; more are
    /// closed on accept.
    pub max_unauthenticated: usize,
    /// An authenticated connection that sends nothing for this long is
    /// closed (clients reconnect on their next request).
    pub idle_timeout: Duration,
    /// How long a new connection may take to authenticate: the whole
    /// handshake, and all that a connection without a credential may do.
    pub handshake_timeout: Duration,
    /// Bytes all connections' receive and reply buffers may hold together
    /// (at least [`MIN_BUFFER_BUDGET`]).
    pub buffer_budget: u64,
    /// Secret the controller requires from servers that register.
    pub cluster_secret: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:0".into(),
            advertise: None,
            controller: "127.0.0.1:7070".into(),
            capacity: 1 << 30,
            inject_latency: Duration::ZERO,
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 4096,
            max_connections_per_tenant: 1024,
            max_unauthenticated: 256,
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            buffer_budget: 256 << 20,
            cluster_secret: None,
        }
    }
}

/// Server errors (start-up only: serving errors go to the client).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Could not bind the listen address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Capacity too small.
    #[error("capacity must be at least one byte")]
    ZeroCapacity,
}

#[derive(Debug)]
struct Shared {
    id: u64,
    admin_key: u64,
    cfg: ServerConfig,
    pool: OnceLock<SlabPool>,
    latency: LatencyInjector,
    /// Connection slots and the buffer budget.
    admission: Admission,
    /// Connections not yet authenticated, oldest first (see `accept_loop`).
    pending: parking_lot::Mutex<Pending>,
    /// Clock origin of `lease_until`.
    born: Instant,
    /// Data operations are served until this many nanoseconds after `born`
    /// (0: never registered). Renewed by each answered heartbeat.
    lease_until: AtomicU64,
    /// Outcomes of atomics with request ids.
    dedupe: dedupe::Dedupe,
}

impl Shared {
    fn new(cfg: ServerConfig) -> Self {
        Shared {
            id: nonzero_random(),
            admin_key: nonzero_random(),
            latency: LatencyInjector::new(cfg.inject_latency),
            admission: Admission::new(
                Limits {
                    max_connections: cfg.max_connections,
                    max_per_tenant: cfg.max_connections_per_tenant,
                    // The acceptor keeps pending connections at
                    // `max_unauthenticated` by closing the oldest; threads
                    // of closed ones may linger a moment, up to this.
                    max_pending: cfg.max_unauthenticated.saturating_mul(2),
                },
                usize::try_from(cfg.buffer_budget).unwrap_or(usize::MAX),
            ),
            cfg,
            pending: Default::default(),
            pool: OnceLock::new(),
            born: Instant::now(),
            lease_until: AtomicU64::new(0),
            dedupe: Default::default(),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.born).as_nanos() as u64
    }

    /// True while the controller's last answer is recent enough.
    fn leased(&self) -> bool {
        self.nanos(Instant::now()) < self.lease_until.load(Ordering::Acquire)
    }

    /// Extends the lease to `lease` after `sent` (when the request the
    /// controller just answered left).
    fn renew(&self, sent: Instant, lease: Duration) {
        self.lease_until
            .fetch_max(self.nanos(sent + lease), Ordering::AcqRel);
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: String,
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// The address clients reach the server at.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This server's id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// True once registered with a controller (slabs can be created).
    pub fn ready(&self) -> bool {
        self.shared.pool.get().is_some()
    }
}

/// Binds the listen address and starts the acceptor and registration threads.
pub fn start(mut cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    cfg.max_frame = cfg.max_frame.max(MIN_MAX_FRAME);
    cfg.buffer_budget = cfg.buffer_budget.max(MIN_BUFFER_BUDGET);
    cfg.max_connections_per_tenant = cfg
        .max_connections_per_tenant
        .clamp(1, cfg.max_connections.max(1));
    cfg.max_unauthenticated = cfg.max_unauthenticated.max(1);
    if cfg.capacity == 0 {
        return Err(ServerError::ZeroCapacity);
    }
    return_freed_memory();
    let listener = TcpListener::bind(&cfg.listen).map_err(|source| ServerError::Bind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen.clone(),
            source,
        })?
        .to_string();
    let addr = cfg.advertise.clone().unwrap_or(bound);
    let shared = Arc::new(Shared::new(cfg));
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("remora-accept".into())
            .spawn(move || accept_loop(listener, shared))
            .map_err(|source| ServerError::Bind {
                addr: addr.clone(),
                source,
            })?;
    }
    {
        let shared = shared.clone();
        let a = addr.clone();
        std::thread::Builder::new()
            .name("remora-register".into())
            .spawn(move || register_loop(shared, a))
            .map_err(|source| ServerError::Bind {
                addr: addr.clone(),
                source,
            })?;
    }
    Ok(ServerHandle { addr, shared })
}

fn nonzero_random() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Makes glibc give freed buffers back to the system at once: large
/// allocations (128 KiB and up: slabs, large frames and replies) are always
/// their own mappings, unmapped when freed. Without this, glibc raises its
/// mapping threshold after the first large free and keeps later large
/// buffers in its heap, where a burst of large frames leaves the process
/// holding hundreds of MiB (and zeroed slabs would be written, not mapped).
fn return_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // once, before this server allocates its buffers, with valid
        // parameter codes.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        }
    });
}

/// Connections not yet authenticated, by accept order: a second handle on
/// each socket, so that the acceptor can close the oldest.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    socks: std::collections::VecDeque<(u64, TcpStream)>,
}

impl Shared {
    /// Forgets pending connection `id` (it authenticated or ended).
    fn unpend(&self, id: u64) {
        let mut p = self.pending.lock();
        if let Some(i) = p.socks.iter().position(|(c, _)| *c == id) {
            p.socks.remove(i);
        }
    }
}

/// Accepts connections. At most `max_unauthenticated` may be pending at
/// once; when a new one arrives at that limit, the oldest pending one is
/// closed instead of refusing the newcomer. Strangers that hold
/// connections open (idle, or trickling a handshake) then only push each
/// other out, and a client, which authenticates within a round trip, gets
/// in however many of them there are.
fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for s in listener.incoming() {
        match s {
            Ok(s) => {
                let id = {
                    let mut p = shared.pending.lock();
                    while p.socks.len() >= shared.cfg.max_unauthenticated {
                        if let Some((_, old)) = p.socks.pop_front() {
                            debug!("closing the oldest connection not yet authenticated");
                            let _ = old.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    let Ok(handle) = s.try_clone() else {
                        continue;
                    };
                    let id = p.next;
                    p.next += 1;
                    p.socks.push_back((id, handle));
                    id
                };
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("remora-conn".into())
                    .spawn({
                        let shared = shared.clone();
                        move || serve(s, shared, id)
                    });
                if let Err(e) = spawned {
                    shared.unpend(id);
                    warn!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Registers with the controller and heartbeats; reconnects forever.
fn register_loop(shared: Arc<Shared>, addr: String) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match register_once(&shared, &addr) {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                debug!("controller {}: {e}", shared.cfg.controller);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        std::thread::sleep(backoff);
    }
}

fn ctl_call(conn: &mut RpcConn, req: &CtlRequest) -> Result<CtlReply, String> {
    let f = conn
        .call(|b, id| ctl::encode(b, id, ctl::CTL_REQUEST, req))
        .map_err(|e| e.to_string())?;
    if f.kind != ctl::CTL_REPLY {
        return Err(format!("unexpected reply kind 0x{:x}", f.kind));
    }
    ctl::decode_reply(&f.payload).map_err(|e| e.to_string())
}

fn register_once(shared: &Shared, addr: &str) -> Result<(), String> {
    let mut conn = RpcConn::connect(
        &TcpTransport,
        &shared.cfg.controller,
        Duration::from_secs(5),
        LatencyInjector::default(),
    )
    .map_err(|e| e.to_string())?;
    let sent = Instant::now();
    let reply = ctl_call(
        &mut conn,
        &CtlRequest::Register {
            version: VERSION,
            server_id: shared.id,
            addr: addr.to_string(),
            admin_key: shared.admin_key,
            capacity: shared.cfg.capacity,
            secret: shared.cfg.cluster_secret.clone(),
            slabs_used: shared.pool.get().map_or(0, |p| p.used_slabs()),
        },
    )?;
    let (slab_size, hb, lease, keep) = match reply {
        CtlReply::Registered {
            slab_size,
            heartbeat_ms,
            lease_ms,
            keep,
        } => (
            slab_size,
            heartbeat_ms,
            Duration::from_millis(lease_ms),
            keep,
        ),
        CtlReply::Error { code, message } => {
            return Err(format!("register refused: {code}: {message}"))
        }
        other => return Err(format!("unexpected reply {other:?}")),
    };
    let pool = shared
        .pool
        .get_or_init(|| SlabPool::new(shared.cfg.capacity, slab_size));
    if pool.slab_size() != slab_size {
        return Err(format!(
            "controller wants slab size {slab_size} but this server already uses {}; restart the server",
            pool.slab_size()
        ));
    }
    if let Some(keep) = keep {
        let dropped = pool.retain(&keep.into_iter().collect());
        if dropped > 0 {
            warn!("dropped {dropped} slabs the controller no longer maps to this server");
        }
    }
    shared.renew(sent, lease);
    info!(
        "registered with controller {} as server {:016x} ({} slabs of {} bytes)",
        shared.cfg.controller,
        shared.id,
        pool.total_slabs(),
        slab_size
    );
    let interval = Duration::from_millis(hb.clamp(10, 60_000));
    // The first heartbeat goes out at once: it tells the controller the
    // slabs are carved and the server can take control operations.
    let mut first = true;
    loop {
        if !first {
            std::thread::sleep(interval);
        }
        first = false;
        let sent = Instant::now();
        let reply = ctl_call(
            &mut conn,
            &CtlRequest::Heartbeat {
                server_id: shared.id,
                slabs_used: pool.used_slabs(),
                slabs_total: pool.total_slabs(),
            },
        )?;
        match reply {
            CtlReply::Ack => shared.renew(sent, lease),
            CtlReply::Error {
                code: ErrorCode::Fenced,
                message,
            } => {
                // Declared dead: the data was rebuilt elsewhere or reported
                // lost, so none of it may be served again.
                let dropped = pool.retain(&Default::default());
                warn!("the controller declared this server dead ({message}): dropped {dropped} slabs, registering again");
                return Err("declared dead".into());
            }
            CtlReply::Error { code, message } => {
                return Err(format!("heartbeat refused: {code}: {message}"))
            }
            other => return Err(format!("unexpected reply {other:?}")),
        }
    }
}

/// One connection's thread: moves bytes between the socket and its
/// [`Session`].
fn serve(mut stream: TcpStream, shared: Arc<Shared>, id: u64) {
    let accepted = Instant::now();
    let Some(ticket) = shared.admission.accept() else {
        debug!("refusing a connection: too many not yet authenticated");
        shared.unpend(id);
        return;
    };
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    let mut sess = Session::new(&shared, ticket);
    let result = drive(&mut stream, &shared, &mut sess, accepted, id);
    drop(sess);
    shared.unpend(id);
    match result {
        Ok(()) => debug!("{peer}: connection closed"),
        Err(e) => debug!("{peer}: {e}"),
    }
}

fn drive(
    stream: &mut TcpStream,
    shared: &Shared,
    sess: &mut Session<'_>,
    accepted: Instant,
    id: u64,
) -> std::io::Result<()> {
    let mut listed = true;
    // The read timeout in force: the handshake's remaining time while
    // pending, then the idle timeout.
    let mut timeout = None;
    loop {
        loop {
            match sess.step() {
                Step::Read => break,
                Step::Send => {}
                Step::Close => {
                    let _ = send_all(stream, sess.out());
                    return Ok(());
                }
                Step::Direct { id, at, len } => {
                    send_all(stream, sess.out())?;
                    sess.settle();
                    direct(stream, sess, id, &at, len)?;
                }
                Step::Copy(job) => {
                    let r = match shared.pool.get() {
                        Some(pool) => {
                            copy_slab(pool, job.slab, &job.dest_addr, job.dest_slab, job.dest_key)
                        }
                        None => Err((ErrorCode::NotReady, "server not ready".into())),
                    };
                    sess.copied(job.id, r);
                }
            }
            send_all(stream, sess.out())?;
            sess.settle();
        }
        send_all(stream, sess.out())?;
        sess.settle();
        if listed && !sess.is_pending() {
            // Authenticated: no longer the acceptor's to close.
            shared.unpend(id);
            listed = false;
        }
        let want = if sess.is_pending() {
            let limit = shared.cfg.handshake_timeout;
            let left = limit.saturating_sub(accepted.elapsed());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not authenticated within {limit:?}"),
                ));
            }
            // Rounded up, so that a deadline is never a zero timeout.
            Some(left.max(Duration::from_millis(1)))
        } else if sess.is_client() {
            Some(shared.cfg.idle_timeout.max(Duration::from_millis(1)))
        } else {
            None
        };
        // Only when it changes: once authenticated, one setsockopt in all.
        if want != timeout {
            stream.set_read_timeout(want)?;
            timeout = want;
        }
        let spare = match sess.spare() {
            Some(s) => s,
            None => {
                let _ = send_all(stream, sess.out());
                return Err(std::io::Error::other("buffer budget spent"));
            }
        };
        match stream.read(spare) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                let arrival = Instant::now();
                sess.filled(n);
                if !shared.latency.delay().is_zero() && sess.has_frame() {
                    shared.latency.hold(arrival);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if sess.is_client() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("idle for {:?}", shared.cfg.idle_timeout),
                    ));
                }
                // Pending: the loop checks the handshake deadline.
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends a large read's reply straight from slab memory: the header and
/// slab bytes go out with one non-blocking `writev` under the slab's read
/// lock (so the lock is never held while the peer is slow); whatever the
/// socket did not take is copied out and sent after the lock is released.
fn direct(
    stream: &mut TcpStream,
    sess: &mut Session<'_>,
    id: u64,
    at: &Target,
    len: u32,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let r = sess.direct_read(id, at, len, |hdr, bytes| {
        let mut bufs = [std::io::IoSlice::new(hdr), std::io::IoSlice::new(bytes)];
        let mut left: &mut [std::io::IoSlice<'_>] = &mut bufs;
        let mut sent = 0;
        while !left.is_empty() {
            match stream.write_vectored(left) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    sent += n;
                    std::io::IoSlice::advance_slices(&mut left, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    });
    stream.set_nonblocking(false)?;
    r?;
    send_all(stream, sess.out())?;
    sess.settle();
    Ok(())
}

/// Sends `buf` and clears it. One burst may take at most [`SEND_TIMEOUT`]
/// in all (each write blocks at most that long, and no new write starts
/// after it), so a peer that reads a trickle cannot hold the thread.
fn send_all(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut off = 0;
    let mut started = None;
    while off < buf.len() {
        match stream.write(&buf[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if off < buf.len() {
            let t = *started.get_or_insert_with(Instant::now);
            if t.elapsed() > SEND_TIMEOUT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer took no replies for {SEND_TIMEOUT:?}"),
                ));
            }
        }
    }
    buf.clear();
    Ok(())
}

/// Copies a whole slab to another server in 1 MiB writes.
fn copy_slab(
    pool: &SlabPool,
    slab: u64,
    dest_addr: &str,
    dest_slab: u64,
    dest_key: u64,
) -> Result<(), (ErrorCode, String)> {
    let mut buf = Vec::new();
    pool.set_frozen(slab, true)
        .map_err(|c| (c, format!("copy slab {slab}: {c}")))?;
    let unavailable = |e: NetError| {
        (
            ErrorCode::ServerUnavailable,
            format!("copy to {dest_addr}: {e}"),
        )
    };
    let mut conn = RpcConn::connect(
        &TcpTransport,
        dest_addr,
        Duration::from_secs(5),
        LatencyInjector::default(),
    )
    .map_err(unavailable)?;
    let check = |f: remora_net::OwnedFrame| -> Result<(), (ErrorCode, String)> {
        match data::decode_reply(f.kind, &f.payload) {
            Ok(Reply::HelloOk { .. }) | Ok(Reply::Done) => Ok(()),
            Ok(Reply::Error { code, message }) => {
                Err((code, format!("copy to {dest_addr}: {message}")))
            }
            other => Err((
                ErrorCode::Internal,
                format!("copy to {dest_addr}: unexpected {other:?}"),
            )),
        }
    };
    check(
        conn.call(|b, id| data::hello(b, id, 0, 0, (dest_slab, dest_key)))
            .map_err(unavailable)?,
    )?;
    let started = Instant::now();
    let size = pool.slab_size();
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        pool.read_admin(slab, off, &mut buf, n)
            .map_err(|c| (c, format!("copy slab {slab}: {c}")))?;
        let at = Target {
            slab: dest_slab,
            key: dest_key,
            offset: off,
        };
        let data: &[u8] = &buf;
        check(
            conn.call(|b, id| data::encode_request(b, id, &Request::Write { at, data }))
                .map_err(unavailable)?,
        )?;
        off += n as u64;
    }
    debug!(
        "copied slab {slab} to {dest_addr} in {:?}",
        started.elapsed()
    );
    Ok(())
}
