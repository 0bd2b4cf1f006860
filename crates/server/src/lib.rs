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
//! burst rather than per request.

pub mod dedupe;
pub mod offload;
pub mod pool;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use remora_net::{FramedReader, LatencyInjector, NetError, RpcConn, Stream, TcpTransport};
use remora_proto::ctl::{self, CtlReply, CtlRequest};
use remora_proto::data::{
    self, decode_request, put_data_header, put_error, BatchReplyWriter, Reply, Request, SubOp,
    Target,
};
use remora_proto::frame::{DEFAULT_MAX_FRAME, HEADER_LEN};
use remora_proto::{ErrorCode, VERSION};
use tracing::{debug, info, warn};

pub use pool::SlabPool;

/// Smallest maximum frame a server may be configured with.
pub const MIN_MAX_FRAME: u32 = 64 << 10;
/// Largest frame accepted before the handshake.
const PRE_HANDSHAKE_MAX_FRAME: u32 = 4096;
/// How long a new connection may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one send may block before the connection is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads at least this large are sent straight from slab memory.
const DIRECT_MIN: u32 = 16 << 10;

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
    /// Most connections served at once; more are closed on accept.
    pub max_connections: usize,
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
    connections: AtomicU64,
    /// Clock origin of `lease_until`.
    born: Instant,
    /// Data operations are served until this many nanoseconds after `born`
    /// (0: never registered). Renewed by each answered heartbeat.
    lease_until: AtomicU64,
    /// Outcomes of atomics with request ids.
    dedupe: dedupe::Dedupe,
}

impl Shared {
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
    if cfg.capacity == 0 {
        return Err(ServerError::ZeroCapacity);
    }
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
    let shared = Arc::new(Shared {
        id: nonzero_random(),
        admin_key: nonzero_random(),
        latency: LatencyInjector::new(cfg.inject_latency),
        cfg,
        pool: OnceLock::new(),
        connections: AtomicU64::new(0),
        born: Instant::now(),
        lease_until: AtomicU64::new(0),
        dedupe: Default::default(),
    });
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

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for s in listener.incoming() {
        match s {
            Ok(s) => {
                if shared.connections.load(Ordering::Relaxed) >= shared.cfg.max_connections as u64 {
                    // Over the limit: refuse by closing at once.
                    debug!("refusing a connection: {} open", shared.cfg.max_connections);
                    continue;
                }
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("remora-conn".into())
                    .spawn({
                        let shared = shared.clone();
                        move || serve(s, shared)
                    });
                if let Err(e) = spawned {
                    shared.connections.fetch_sub(1, Ordering::Relaxed);
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

struct ConnState {
    admin: bool,
    greeted: bool,
    session: u64,
    scratch: Vec<u8>,
}

fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("{peer}: {e}");
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    // Until the handshake: small frames only, and a deadline to send it.
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    // A client that takes no replies for this long is dropped: the server
    // never blocks forever on a send, least of all holding a slab lock.
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    let boxed: Box<dyn Stream> = Box::new(stream);
    let mut reader = FramedReader::new(boxed, &peer, PRE_HANDSHAKE_MAX_FRAME, shared.latency);
    let mut st = ConnState {
        admin: false,
        greeted: false,
        session: 0,
        scratch: Vec::new(),
    };
    let mut out: Vec<u8> = Vec::with_capacity(256 << 10);
    let result = (|| -> Result<(), NetError> {
        loop {
            loop {
                let f = match reader.try_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(NetError::Decode { source, .. }) => {
                        // The framing is broken (oversized or undersized
                        // length): say why, then hang up, as the stream
                        // cannot be resynchronised.
                        let code = match source {
                            remora_proto::DecodeError::FrameTooLarge { .. } => {
                                ErrorCode::FrameTooLarge
                            }
                            _ => ErrorCode::Malformed,
                        };
                        put_error(&mut out, 0, code, &source.to_string());
                        let _ = writer.write_all(&out);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let (id, kind) = (f.id, f.kind);
                let was_greeted = st.greeted;
                let req = decode_request(kind, f.payload);
                if st.greeted && (st.admin || shared.leased()) {
                    if let Ok(Request::Read { at, len }) = req {
                        if len >= DIRECT_MIN
                            && len as usize <= shared.cfg.max_frame as usize - HEADER_LEN
                        {
                            if let Some(pool) = shared.pool.get() {
                                flush(&mut writer, &mut out, &peer)?;
                                match send_direct(pool, &mut writer, id, &at, len) {
                                    Ok(true) => {
                                        reader.consume();
                                        continue;
                                    }
                                    // Refused (bad key, range, ...): the
                                    // ordinary path sends the error.
                                    Ok(false) => {}
                                    Err(source) => {
                                        return Err(NetError::Io {
                                            op: "write to",
                                            addr: peer.clone(),
                                            source,
                                        })
                                    }
                                }
                            }
                        }
                    }
                }
                let keep = handle(&shared, &mut st, id, req, &mut out);
                reader.consume();
                if st.greeted && !was_greeted {
                    reader.set_max_frame(shared.cfg.max_frame);
                    let _ = reader.stream().set_read_timeout(None);
                }
                if !keep {
                    let _ = writer.write_all(&out);
                    return Ok(());
                }
                if out.len() >= 256 << 10 {
                    flush(&mut writer, &mut out, &peer)?;
                }
            }
            flush(&mut writer, &mut out, &peer)?;
            if !reader.fill()? && !st.greeted {
                debug!("{peer}: no handshake within {HANDSHAKE_TIMEOUT:?}");
                return Ok(());
            }
        }
    })();
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(()) | Err(NetError::Closed { .. }) => debug!("{peer}: connection closed"),
        Err(e) => debug!("{peer}: {e}"),
    }
}

/// Sends a large read's reply straight from slab memory (header and slab
/// bytes in one `writev`), saving the copy into the reply buffer. Holds the
/// slab's read lock for the send, which [`SEND_TIMEOUT`] bounds. `Ok(false)`
/// when the read is refused (the caller replies with the error).
fn send_direct(
    pool: &SlabPool,
    w: &mut TcpStream,
    id: u64,
    at: &Target,
    len: u32,
) -> std::io::Result<bool> {
    let r = pool.read(at, len, |bytes| {
        let mut hdr = Vec::with_capacity(HEADER_LEN);
        put_data_header(&mut hdr, id, bytes.len());
        let mut bufs = [std::io::IoSlice::new(&hdr), std::io::IoSlice::new(bytes)];
        let mut left: &mut [std::io::IoSlice<'_>] = &mut bufs;
        while !left.is_empty() {
            match w.write_vectored(left) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    match r {
        Ok(sent) => sent.map(|()| true),
        Err(_) => Ok(false),
    }
}

fn flush(w: &mut TcpStream, out: &mut Vec<u8>, peer: &str) -> Result<(), NetError> {
    if out.is_empty() {
        return Ok(());
    }
    w.write_all(out).map_err(|source| NetError::Io {
        op: "write to",
        addr: peer.to_string(),
        source,
    })?;
    out.clear();
    Ok(())
}

/// Executes one request and appends its reply. Returns false to close the connection.
fn handle(
    shared: &Shared,
    st: &mut ConnState,
    id: u64,
    req: Result<Request<'_>, remora_proto::DecodeError>,
    out: &mut Vec<u8>,
) -> bool {
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            put_error(out, id, ErrorCode::Malformed, &e.to_string());
            return st.greeted;
        }
    };
    if !st.greeted {
        return match req {
            Request::Hello {
                version,
                admin_key,
                session,
            } => {
                if version != VERSION {
                    put_error(
                        out,
                        id,
                        ErrorCode::UnsupportedVersion,
                        &format!("server speaks protocol version {VERSION}, client {version}"),
                    );
                    return false;
                }
                st.greeted = true;
                st.admin = admin_key != 0 && admin_key == shared.admin_key;
                st.session = session;
                data::encode_reply(
                    out,
                    id,
                    &Reply::HelloOk {
                        version: VERSION,
                        server_id: shared.id,
                        slab_size: shared.pool.get().map_or(0, |p| p.slab_size()),
                        max_frame: shared.cfg.max_frame,
                    },
                );
                true
            }
            _ => {
                put_error(
                    out,
                    id,
                    ErrorCode::HandshakeRequired,
                    "send a handshake first",
                );
                false
            }
        };
    }
    let Some(pool) = shared.pool.get() else {
        put_error(
            out,
            id,
            ErrorCode::NotReady,
            "server has not registered with a controller yet",
        );
        return true;
    };
    let control = matches!(
        req,
        Request::CreateSlab { .. }
            | Request::DropSlab { .. }
            | Request::ListSlabs { .. }
            | Request::ThawSlab { .. }
            | Request::CopySlab { .. }
            | Request::ReadSlab { .. }
            | Request::FreezeSlab { .. }
    );
    if control && !st.admin {
        put_error(
            out,
            id,
            ErrorCode::NotAuthorized,
            "control operations need the admin key",
        );
        return true;
    }
    if !control && !st.admin && !shared.leased() && !matches!(req, Request::Stats) {
        put_error(
            out,
            id,
            ErrorCode::Fenced,
            "server has not heard from the controller within its lease; try another copy or later",
        );
        return true;
    }
    let max_reply = shared.cfg.max_frame as usize - HEADER_LEN;
    match req {
        Request::Hello { .. } => put_error(out, id, ErrorCode::Malformed, "handshake already done"),
        Request::Read { at, len } => {
            if !too_large(out, id, len, max_reply) {
                let r = pool.read(&at, len, |bytes| {
                    put_data_header(out, id, bytes.len());
                    remora_proto::copy::extend(out, bytes);
                });
                if let Err(code) = r {
                    put_error(out, id, code, &describe(code, &at));
                }
            }
        }
        Request::Write { at, data } => match pool.write(&at, data) {
            Ok(()) => data::encode_reply(out, id, &Reply::Done),
            Err(code) => put_error(out, id, code, &describe(code, &at)),
        },
        Request::Cas {
            at,
            expected,
            new,
            rid,
        } => match once(shared, st.session, rid, || pool.cas(&at, expected, new)) {
            Ok(v) => data::encode_reply(out, id, &Reply::Value(v)),
            Err(code) => put_error(out, id, code, &describe(code, &at)),
        },
        Request::Faa { at, delta, rid } => {
            match once(shared, st.session, rid, || pool.faa(&at, delta)) {
                Ok(v) => data::encode_reply(out, id, &Reply::Value(v)),
                Err(code) => put_error(out, id, code, &describe(code, &at)),
            }
        }
        Request::Swap { at, rid, data } => {
            let r = pool.swap(&at, st.session, rid, data, |old| {
                put_data_header(out, id, old.len());
                remora_proto::copy::extend(out, old);
            });
            if let Err(code) = r {
                put_error(out, id, code, &describe(code, &at));
            }
        }
        Request::Xor { at, rid, data } => {
            match once(shared, st.session, rid, || pool.xor(&at, data).map(|()| 0)) {
                Ok(_) => data::encode_reply(out, id, &Reply::Done),
                Err(code) => put_error(out, id, code, &describe(code, &at)),
            }
        }
        Request::Offload { at, op } => {
            if let Err((code, msg)) = offload::execute(pool, &at, &op, id, max_reply, out) {
                put_error(out, id, code, &msg);
            }
        }
        Request::Commit { at, rid } => match pool.commit(&at, st.session, rid) {
            Ok(()) => data::encode_reply(out, id, &Reply::Done),
            Err(code) => put_error(out, id, code, &describe(code, &at)),
        },
        Request::FreezeSlab { slab } => match pool.freeze(slab) {
            Ok(n) => data::encode_reply(out, id, &Reply::Value(n)),
            Err(code) => put_error(out, id, code, &format!("freeze slab {slab}: {code}")),
        },
        Request::ReadSlab { slab, offset, len } => {
            if !too_large(out, id, len, max_reply) {
                match pool.read_admin(slab, offset, &mut st.scratch, len as usize) {
                    Ok(()) => {
                        put_data_header(out, id, st.scratch.len());
                        remora_proto::copy::extend(out, &st.scratch);
                    }
                    Err(code) => put_error(out, id, code, &format!("read slab {slab}: {code}")),
                }
            }
        }
        Request::Batch(ops) => {
            let mut w = BatchReplyWriter::begin(out, id);
            // Reserve room for the count and for the largest non-data
            // result of every sub-operation, so the reply always fits.
            let mut reply_bytes = 4 + ops.len() as usize * 10;
            for sub in ops.iter() {
                match sub {
                    Ok(SubOp::Read { at, len }) => {
                        if reply_bytes + len as usize + 6 > max_reply {
                            w.error(out, ErrorCode::FrameTooLarge);
                            continue;
                        }
                        reply_bytes += len as usize + 6;
                        let r = pool.read(&at, len, |bytes| {
                            w.data(out, bytes.len(), |d| remora_proto::copy::copy(d, bytes))
                        });
                        if let Err(code) = r {
                            w.error(out, code);
                        }
                    }
                    Ok(SubOp::Write { at, data }) => match pool.write(&at, data) {
                        Ok(()) => w.done(out),
                        Err(code) => w.error(out, code),
                    },
                    Ok(SubOp::Cas { at, expected, new }) => match pool.cas(&at, expected, new) {
                        Ok(v) => w.value(out, v),
                        Err(code) => w.error(out, code),
                    },
                    Ok(SubOp::Faa { at, delta }) => match pool.faa(&at, delta) {
                        Ok(v) => w.value(out, v),
                        Err(code) => w.error(out, code),
                    },
                    Err(_) => w.error(out, ErrorCode::Malformed),
                }
            }
            w.finish(out);
        }
        Request::CreateSlab { slab, key } => match pool.create(slab, key) {
            Ok(()) => data::encode_reply(out, id, &Reply::Done),
            Err(code) => put_error(out, id, code, &format!("create slab {slab}: {code}")),
        },
        Request::DropSlab { slab } => match pool.drop_slab(slab) {
            Ok(()) => data::encode_reply(out, id, &Reply::Done),
            Err(code) => put_error(out, id, code, &format!("drop slab {slab}: {code}")),
        },
        Request::ListSlabs { after, max } => {
            let max = (max as usize).min(max_reply / 8);
            let ids = pool.list(after, max);
            put_data_header(out, id, ids.len() * 8);
            for i in ids {
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        Request::ThawSlab { slab, new_key } => match (if new_key != 0 {
            pool.rekey(slab, new_key)
        } else {
            Ok(())
        })
        .and_then(|()| pool.set_frozen(slab, false))
        {
            Ok(()) => data::encode_reply(out, id, &Reply::Done),
            Err(code) => put_error(out, id, code, &format!("thaw slab {slab}: {code}")),
        },
        Request::CopySlab {
            slab,
            dest_slab,
            dest_key,
            dest_addr,
        } => match copy_slab(pool, slab, dest_addr, dest_slab, dest_key, &mut st.scratch) {
            Ok(()) => data::encode_reply(out, id, &Reply::Done),
            Err((code, msg)) => put_error(out, id, code, &msg),
        },
        Request::Stats => {
            let mut s = pool.stats();
            s.connections = shared.connections.load(Ordering::Relaxed);
            data::encode_reply(out, id, &Reply::Stats(s));
        }
    }
    true
}

/// Replies FrameTooLarge to a read whose reply would not fit in a frame;
/// true if it did.
fn too_large(out: &mut Vec<u8>, id: u64, len: u32, max_reply: usize) -> bool {
    let big = len as usize > max_reply;
    if big {
        put_error(
            out,
            id,
            ErrorCode::FrameTooLarge,
            &format!("read of {len} bytes exceeds the maximum reply of {max_reply}"),
        );
    }
    big
}

/// Applies an atomic once per (session, request id): a retry of one that
/// was applied gets its first result. Request id 0 opts out.
fn once(
    shared: &Shared,
    session: u64,
    rid: u64,
    apply: impl FnOnce() -> Result<u64, ErrorCode>,
) -> Result<u64, ErrorCode> {
    if rid == 0 {
        return apply();
    }
    // Held across the apply so that two retries racing on two connections
    // cannot both apply; atomics are short.
    let mut d = shared.dedupe.shard(session, rid);
    if let Some(v) = d.get(session, rid) {
        return Ok(v);
    }
    let v = apply()?;
    d.put(session, rid, v);
    Ok(v)
}

fn describe(code: ErrorCode, at: &Target) -> String {
    format!("slab {} offset {}: {code}", at.slab, at.offset)
}

/// Copies a whole slab to another server in 1 MiB writes.
fn copy_slab(
    pool: &SlabPool,
    slab: u64,
    dest_addr: &str,
    dest_slab: u64,
    dest_key: u64,
    buf: &mut Vec<u8>,
) -> Result<(), (ErrorCode, String)> {
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
        conn.call(|b, id| data::hello(b, id, 0, 0))
            .map_err(unavailable)?,
    )?;
    let started = Instant::now();
    let size = pool.slab_size();
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        pool.read_admin(slab, off, buf, n)
            .map_err(|c| (c, format!("copy slab {slab}: {c}")))?;
        let at = Target {
            slab: dest_slab,
            key: dest_key,
            offset: off,
        };
        let data: &[u8] = buf;
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
