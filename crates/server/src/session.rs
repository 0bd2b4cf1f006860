//! One connection's protocol state, without I/O (sans-IO).
//!
//! The connection thread in `lib.rs` is a small driver: it reads bytes into
//! [`Session::spare`], reports them with [`Session::filled`], calls
//! [`Session::step`] and does what the returned [`Step`] says (send the
//! reply buffer, send a large read straight from slab memory, copy a slab
//! to another server, close). Every decision (framing, the handshake and
//! what it authenticates, which operations a connection may send, what it
//! may make the server hold) is made here, where unit tests and the fuzz
//! target drive it with arbitrary bytes through [`Harness`].
//!
//! A connection is *pending* until its handshake presents the admin key or
//! a slab capability (see [`crate::admission`]): before the handshake its
//! frames are at most 4 KiB; after a handshake without a credential it may
//! only ask for statistics. An authenticated client connection's buffers
//! (the frame decoder and the reply buffer) are charged to the server's
//! buffer budget before they grow, and given back after each send.

use remora_proto::data::{
    self, decode_request, put_data_header, put_error, BatchReplyWriter, Reply, Request, SubOp,
    Target,
};
use remora_proto::frame::{FrameDecoder, HEADER_LEN, INITIAL_BUFFER};
use remora_proto::{DecodeError, ErrorCode, VERSION};

use crate::admission::Ticket;
use crate::{offload, Shared, SlabPool};

/// Largest frame accepted before the handshake.
pub const PRE_HANDSHAKE_MAX_FRAME: u32 = 4096;
/// Reads at least this large are sent straight from slab memory.
pub const DIRECT_MIN: u32 = 16 << 10;
/// The reply buffer an authenticated client connection keeps between
/// sends; replies are sent once it holds this much.
pub const OUT_BASE: usize = 64 << 10;
/// Room reserved for any reply beyond what its request says it returns
/// (headers, error messages, statistics).
const SMALL_REPLY: usize = 512;

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// Send [`Session::out`], then call [`Session::step`] again.
    Send,
    /// Send [`Session::out`], then read more bytes.
    Read,
    /// Send [`Session::out`], then send the `len` bytes at `at` as the
    /// DATA reply to request `id`, straight from slab memory
    /// ([`Session::direct_read`]), then call [`Session::step`] again.
    Direct {
        /// Request id.
        id: u64,
        /// Where.
        at: Target,
        /// How many bytes.
        len: u32,
    },
    /// Copy a slab to another server (an admin operation that needs the
    /// network), then report with [`Session::copied`].
    Copy(CopyJob),
    /// Send [`Session::out`], then close the connection.
    Close,
}

/// A slab copy to run for the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyJob {
    /// Request id.
    pub id: u64,
    /// The slab to copy.
    pub slab: u64,
    /// The destination slab.
    pub dest_slab: u64,
    /// Its key.
    pub dest_key: u64,
    /// The destination server.
    pub dest_addr: String,
}

enum Action {
    Continue,
    Close,
    Direct { id: u64, at: Target, len: u32 },
    Copy(CopyJob),
}

struct ConnState<'a> {
    ticket: Ticket<'a>,
    greeted: bool,
    session: u64,
    scratch: Vec<u8>,
    /// Bytes charged to the budget (client connections only).
    charged: usize,
}

/// One connection's state.
pub struct Session<'a> {
    shared: &'a Shared,
    dec: FrameDecoder,
    st: ConnState<'a>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("ticket", &self.st.ticket)
            .field("greeted", &self.st.greeted)
            .field("charged", &self.st.charged)
            .finish_non_exhaustive()
    }
}

impl<'a> Session<'a> {
    /// A session for a connection that holds `ticket` (from
    /// [`crate::admission::Admission::accept`]).
    pub(crate) fn new(shared: &'a Shared, ticket: Ticket<'a>) -> Self {
        Session {
            shared,
            dec: FrameDecoder::new(PRE_HANDSHAKE_MAX_FRAME),
            st: ConnState {
                ticket,
                greeted: false,
                session: 0,
                scratch: Vec::new(),
                charged: 0,
            },
            out: Vec::new(),
        }
    }

    /// True until the connection authenticated (its deadline is the
    /// handshake's).
    pub fn is_pending(&self) -> bool {
        self.st.ticket.is_pending()
    }

    /// True for a tenant's client connection (closed when idle; the
    /// controller's connections are not).
    pub fn is_client(&self) -> bool {
        matches!(self.st.ticket, Ticket::Client(..))
    }

    /// Replies waiting to be sent.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// True if a whole frame is buffered (the driver holds it for the
    /// injected latency before stepping).
    pub fn has_frame(&mut self) -> bool {
        matches!(self.dec.peek(), Ok(Some(_)))
    }

    /// Bytes this connection's buffers hold.
    pub fn memory(&self) -> usize {
        self.dec.memory() + self.out.capacity() + self.st.scratch.capacity()
    }

    /// Room to read into (up to 64 KiB, never more than the next frame
    /// needs beyond 16 KiB), charged to the budget first. `None` when the
    /// budget cannot cover it: the driver sends [`Self::out`] (which then
    /// holds an `Overloaded` error) and closes.
    pub fn spare(&mut self) -> Option<&mut [u8]> {
        let cap = (self.dec.max_frame() as usize).min(16 << 10);
        let want = self.dec.needed().clamp(cap, 64 << 10);
        let grow = self.dec.growth_for(want);
        if grow > 0 && !self.charge(grow) {
            put_error(
                &mut self.out,
                0,
                ErrorCode::Overloaded,
                "the server's buffer budget is spent: this frame cannot be received now",
            );
            return None;
        }
        Some(self.dec.spare(want))
    }

    /// Records `n` bytes read into [`Self::spare`].
    pub fn filled(&mut self, n: usize) {
        self.dec.filled(n);
    }

    /// Charges `n` more bytes for a client connection (others are not
    /// charged: pending ones hold a few KiB, and the controller's must
    /// never be refused).
    fn charge(&mut self, n: usize) -> bool {
        charge(self.shared, &mut self.st, n)
    }

    /// After a send: gives back the memory of large frames and replies and
    /// the charge for it.
    pub fn settle(&mut self) {
        self.out.clear();
        if self.out.capacity() > OUT_BASE {
            self.out.shrink_to(OUT_BASE);
        }
        self.dec.shrink(INITIAL_BUFFER);
        if self.st.scratch.capacity() > 0 {
            self.st.scratch = Vec::new();
        }
        if matches!(self.st.ticket, Ticket::Client(..)) {
            let m = self.memory();
            let budget = &self.shared.admission.budget;
            if m < self.st.charged {
                budget.release(self.st.charged - m);
            } else {
                // Never expected: every growth is charged before it happens.
                budget.force(m - self.st.charged);
            }
            self.st.charged = m;
        }
    }

    /// Executes the frames that have arrived until the driver has work.
    pub fn step(&mut self) -> Step {
        loop {
            if self.out.len() >= OUT_BASE - SMALL_REPLY {
                return Step::Send;
            }
            let frame = match self.dec.peek() {
                Ok(Some(f)) => f,
                Ok(None) => return Step::Read,
                Err(source) => {
                    // The framing is broken (oversized or undersized
                    // length): say why, then hang up, as the stream cannot
                    // be resynchronised.
                    let code = match source {
                        DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::Malformed,
                    };
                    put_error(&mut self.out, 0, code, &source.to_string());
                    return Step::Close;
                }
            };
            let (id, kind) = (frame.id, frame.kind);
            let was_greeted = self.st.greeted;
            let action = handle(
                self.shared,
                &mut self.st,
                id,
                decode_request(kind, frame.payload),
                &mut self.out,
            );
            self.dec.consume();
            if self.st.greeted && !was_greeted && !self.st.ticket.is_pending() {
                self.dec.set_max_frame(self.shared.cfg.max_frame);
            }
            match action {
                Action::Continue => {}
                Action::Close => return Step::Close,
                Action::Direct { id, at, len } => return Step::Direct { id, at, len },
                Action::Copy(job) => return Step::Copy(job),
            }
        }
    }

    /// Sends a large read's reply straight from slab memory. `write` gets
    /// the frame (header, then the slab's bytes) under the slab's read lock
    /// and must not block: it returns how many bytes it took, and the rest
    /// is copied into [`Self::out`] (charged to the budget first) for the
    /// driver to send after the lock is gone. A refused read (bad key,
    /// range, frozen, or no budget for the rest) gets its error reply in
    /// [`Self::out`] instead.
    pub fn direct_read(
        &mut self,
        id: u64,
        at: &Target,
        len: u32,
        write: impl FnOnce(&[u8], &[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<()> {
        let Some(pool) = self.shared.pool.get() else {
            not_ready(&mut self.out, id);
            return Ok(());
        };
        // Room for whatever the socket does not take at once.
        let need = HEADER_LEN + len as usize;
        if !reserve(self.shared, &mut self.st, &mut self.out, need) {
            overloaded(&mut self.out, id);
            return Ok(());
        }
        let out = &mut self.out;
        let r = pool.read(at, len, |bytes| {
            let mut hdr = Vec::with_capacity(HEADER_LEN);
            put_data_header(&mut hdr, id, bytes.len());
            let sent = write(&hdr, bytes)?;
            if sent < hdr.len() {
                out.extend_from_slice(&hdr[sent..]);
                remora_proto::copy::extend(out, bytes);
            } else {
                remora_proto::copy::extend(out, &bytes[sent - hdr.len()..]);
            }
            Ok(())
        });
        match r {
            Ok(sent) => sent,
            Err(code) => {
                put_error(&mut self.out, id, code, &describe(code, at));
                Ok(())
            }
        }
    }

    /// Reports the outcome of a [`Step::Copy`].
    pub fn copied(&mut self, id: u64, result: Result<(), (ErrorCode, String)>) {
        match result {
            Ok(()) => data::encode_reply(&mut self.out, id, &Reply::Done),
            Err((code, msg)) => put_error(&mut self.out, id, code, &msg),
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.shared.admission.budget.release(self.st.charged);
    }
}

fn charge(shared: &Shared, st: &mut ConnState<'_>, n: usize) -> bool {
    if !matches!(st.ticket, Ticket::Client(..)) {
        return true;
    }
    if shared.admission.budget.try_charge(n) {
        st.charged += n;
        true
    } else {
        false
    }
}

/// Makes room in `out` for `n` more bytes without reallocating later,
/// charging the growth first; false if the budget cannot cover it.
fn reserve(shared: &Shared, st: &mut ConnState<'_>, out: &mut Vec<u8>, n: usize) -> bool {
    let need = out.len() + n;
    if need > out.capacity() {
        if !charge(shared, st, need - out.capacity()) {
            return false;
        }
        out.reserve_exact(need - out.len());
    }
    true
}

fn not_ready(out: &mut Vec<u8>, id: u64) {
    put_error(
        out,
        id,
        ErrorCode::NotReady,
        "server has not registered with a controller yet",
    );
}

fn overloaded(out: &mut Vec<u8>, id: u64) {
    put_error(
        out,
        id,
        ErrorCode::Overloaded,
        "the server's buffer budget is spent: nothing was applied; retry later",
    );
}

/// The most a request's reply can take beyond [`SMALL_REPLY`].
fn reply_bound(req: &Request<'_>, max_reply: usize) -> usize {
    let n = match req {
        Request::Read { len, .. } | Request::ReadSlab { len, .. } => *len as usize,
        Request::Swap { data, .. } => data.len(),
        Request::Offload { op, .. } => usize::try_from(op.reply_bound()).unwrap_or(usize::MAX),
        Request::ListSlabs { max, .. } => (*max as usize).saturating_mul(8),
        Request::Batch(ops) => {
            let mut n = 4usize;
            for sub in ops.iter() {
                n = n.saturating_add(match sub {
                    Ok(SubOp::Read { len, .. }) => len as usize + 6,
                    _ => 10,
                });
            }
            n
        }
        _ => 0,
    };
    n.min(max_reply)
}

/// The statistics reply.
fn stats(shared: &Shared, pool: Option<&SlabPool>, id: u64, out: &mut Vec<u8>) {
    // Before registration there are no slabs yet, only the capacity.
    let mut s = pool.map_or(
        data::ServerStats {
            capacity: shared.cfg.capacity,
            ..Default::default()
        },
        SlabPool::stats,
    );
    let (pending, clients, admins) = shared.admission.open();
    s.connections = (pending + clients + admins) as u64;
    data::encode_reply(out, id, &Reply::Stats(s));
}

/// Executes one request and appends its reply.
fn handle(
    shared: &Shared,
    st: &mut ConnState<'_>,
    id: u64,
    req: Result<Request<'_>, DecodeError>,
    out: &mut Vec<u8>,
) -> Action {
    let req = match req {
        Ok(r) => r,
        Err(DecodeError::OtherVersion(v)) => {
            put_error(
                out,
                id,
                ErrorCode::UnsupportedVersion,
                &format!("server speaks protocol version {VERSION}, client {v}"),
            );
            return Action::Close;
        }
        Err(e) => {
            put_error(out, id, ErrorCode::Malformed, &e.to_string());
            return if st.greeted {
                Action::Continue
            } else {
                Action::Close
            };
        }
    };
    if !st.greeted {
        return hello(shared, st, id, req, out);
    }
    if st.ticket.is_pending() {
        // Greeted without a credential: statistics only.
        if matches!(req, Request::Stats) {
            stats(shared, shared.pool.get(), id, out);
        } else {
            put_error(
                out,
                id,
                ErrorCode::NotAuthorized,
                "this connection did not authenticate: present a slab capability in the handshake",
            );
        }
        return Action::Continue;
    }
    let Some(pool) = shared.pool.get() else {
        not_ready(out, id);
        return Action::Continue;
    };
    let admin = matches!(st.ticket, Ticket::Admin(_));
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
    if control && !admin {
        put_error(
            out,
            id,
            ErrorCode::NotAuthorized,
            "control operations need the admin key",
        );
        return Action::Continue;
    }
    if !control && !admin && !shared.leased() && !matches!(req, Request::Stats) {
        put_error(
            out,
            id,
            ErrorCode::Fenced,
            "server has not heard from the controller within its lease; try another copy or later",
        );
        return Action::Continue;
    }
    let max_reply = shared.cfg.max_frame as usize - HEADER_LEN;
    let direct =
        matches!(req, Request::Read { len, .. } if len >= DIRECT_MIN && len as usize <= max_reply);
    if !direct && !reserve(shared, st, out, reply_bound(&req, max_reply) + SMALL_REPLY) {
        overloaded(out, id);
        return Action::Continue;
    }
    match req {
        Request::Hello { .. } => put_error(out, id, ErrorCode::Malformed, "handshake already done"),
        Request::Read { at, len }
            if len >= DIRECT_MIN && len as usize <= max_reply && !st.ticket.is_pending() =>
        {
            // Sent from slab memory by the driver (see `Step::Direct`).
            return Action::Direct { id, at, len };
        }
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
        Request::CreateSlab { slab, key, owner } => match pool.create(slab, key, owner) {
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
        } => {
            return Action::Copy(CopyJob {
                id,
                slab,
                dest_slab,
                dest_key,
                dest_addr: dest_addr.to_string(),
            })
        }
        Request::Stats => stats(shared, Some(pool), id, out),
    }
    Action::Continue
}

/// The handshake: the version, then what the connection may do.
fn hello(
    shared: &Shared,
    st: &mut ConnState<'_>,
    id: u64,
    req: Request<'_>,
    out: &mut Vec<u8>,
) -> Action {
    let Request::Hello {
        version,
        admin_key,
        session,
        cap,
    } = req
    else {
        put_error(
            out,
            id,
            ErrorCode::HandshakeRequired,
            "send a handshake first",
        );
        return Action::Close;
    };
    if version != VERSION {
        put_error(
            out,
            id,
            ErrorCode::UnsupportedVersion,
            &format!("server speaks protocol version {VERSION}, client {version}"),
        );
        return Action::Close;
    }
    if admin_key != 0 && admin_key == shared.admin_key {
        st.ticket.promote_admin();
    } else if cap != (0, 0) {
        let Some(pool) = shared.pool.get() else {
            not_ready(out, id);
            return Action::Close;
        };
        let owner = match pool.authenticate(cap.0, cap.1) {
            Ok(owner) => owner,
            Err(code) => {
                put_error(
                    out,
                    id,
                    code,
                    &format!("handshake with the capability of slab {}: {code}", cap.0),
                );
                return Action::Close;
            }
        };
        if let Err(why) = st.ticket.promote_client(owner) {
            put_error(out, id, ErrorCode::Overloaded, &why);
            return Action::Close;
        }
        // The decoder and reply buffers a client connection keeps.
        // (The exact figure is settled after the first send.)
        if !charge(shared, st, PRE_HANDSHAKE_MAX_FRAME as usize + OUT_BASE) {
            put_error(
                out,
                id,
                ErrorCode::Overloaded,
                "the server's buffer budget is spent: no room for another connection",
            );
            return Action::Close;
        }
        out.reserve_exact(OUT_BASE.saturating_sub(out.len()));
    }
    st.greeted = true;
    st.session = session;
    data::encode_reply(
        out,
        id,
        &Reply::HelloOk {
            version: VERSION,
            server_id: shared.id,
            slab_size: shared.pool.get().map_or(0, |p| p.slab_size()),
            max_frame: if st.ticket.is_pending() {
                PRE_HANDSHAKE_MAX_FRAME
            } else {
                shared.cfg.max_frame
            },
            idle_ms: if matches!(st.ticket, Ticket::Client(..)) {
                u32::try_from(shared.cfg.idle_timeout.as_millis()).unwrap_or(u32::MAX)
            } else {
                0
            },
        },
    );
    Action::Continue
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

/// Runs sessions over bytes with no socket and no network, against a
/// registered server's state: for tests and the fuzz target.
#[derive(Debug)]
pub struct Harness {
    shared: std::sync::Arc<Shared>,
}

/// What one [`Harness::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// Everything the session would have sent.
    pub sent: Vec<u8>,
    /// True if the session closed the connection itself.
    pub closed: bool,
    /// Whether the connection authenticated.
    pub authenticated: bool,
}

impl Harness {
    /// A server of `capacity` bytes in slabs of `slab_size` with the given
    /// slabs `(id, key, owner)` created, whose admin key is `admin_key`,
    /// with a buffer budget of `budget` bytes and room for `max_per_tenant`
    /// connections per tenant.
    pub fn new(
        capacity: u64,
        slab_size: u64,
        slabs: &[(u64, u64, u64)],
        admin_key: u64,
        budget: u64,
        max_per_tenant: usize,
    ) -> Self {
        let cfg = crate::ServerConfig {
            capacity,
            buffer_budget: budget,
            max_connections_per_tenant: max_per_tenant,
            ..Default::default()
        };
        let mut shared = Shared::new(cfg);
        shared.admin_key = admin_key;
        shared.lease_until = std::sync::atomic::AtomicU64::new(u64::MAX);
        let pool = SlabPool::new(capacity, slab_size);
        for &(id, key, owner) in slabs {
            let _ = pool.create(id, key, owner);
        }
        let _ = shared.pool.set(pool);
        Harness {
            shared: std::sync::Arc::new(shared),
        }
    }

    /// The slab pool.
    pub fn pool(&self) -> &SlabPool {
        self.shared
            .pool
            .get()
            .expect("the harness creates its pool")
    }

    /// Bytes charged to the buffer budget now (0 when no session runs).
    pub fn charged(&self) -> usize {
        self.shared.admission.budget.used()
    }

    /// Connection slots held now: (pending, clients, admin).
    pub fn open(&self) -> (usize, usize, usize) {
        self.shared.admission.open()
    }

    /// Feeds `chunks` to a new session, one read each, as the connection
    /// thread would; a large read's direct send "takes" `take` bytes at
    /// once (the rest goes through the reply buffer). Checks the session's
    /// accounting after every send: a client connection's buffers are
    /// exactly what it has charged, and the budget is never exceeded.
    pub fn run(&self, chunks: &[&[u8]], take: usize) -> Transcript {
        let ticket = self
            .shared
            .admission
            .accept()
            .expect("the harness runs one session at a time");
        let mut sess = Session::new(&self.shared, ticket);
        let mut sent = Vec::new();
        let mut closed = false;
        let budget = &self.shared.admission.budget;
        let send = |sess: &mut Session<'_>, sent: &mut Vec<u8>| {
            sent.append(sess.out());
            sess.settle();
            if matches!(sess.st.ticket, Ticket::Client(..)) {
                assert_eq!(sess.st.charged, sess.memory(), "charges follow memory");
            }
            assert!(budget.used() <= budget.limit(), "budget exceeded");
        };
        'input: for chunk in chunks {
            let mut chunk: &[u8] = chunk;
            while !chunk.is_empty() {
                let Some(spare) = sess.spare() else {
                    closed = true;
                    send(&mut sess, &mut sent);
                    break 'input;
                };
                let n = spare.len().min(chunk.len());
                spare[..n].copy_from_slice(&chunk[..n]);
                sess.filled(n);
                chunk = &chunk[n..];
                loop {
                    match sess.step() {
                        Step::Read => break,
                        Step::Send => {}
                        Step::Close => {
                            closed = true;
                            send(&mut sess, &mut sent);
                            break 'input;
                        }
                        Step::Direct { id, at, len } => {
                            send(&mut sess, &mut sent);
                            let mut taken = Vec::new();
                            let r = sess.direct_read(id, &at, len, |hdr, bytes| {
                                let all = [hdr, bytes].concat();
                                let n = take.min(all.len());
                                taken.extend_from_slice(&all[..n]);
                                Ok(n)
                            });
                            assert!(r.is_ok());
                            sent.append(&mut taken);
                        }
                        Step::Copy(job) => sess.copied(
                            job.id,
                            Err((ErrorCode::ServerUnavailable, "no network here".into())),
                        ),
                    }
                    send(&mut sess, &mut sent);
                }
                send(&mut sess, &mut sent);
            }
        }
        let authenticated = !sess.is_pending();
        drop(sess);
        Transcript {
            sent,
            closed,
            authenticated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::frame::put_header;

    const ADMIN: u64 = 0xad;
    const SLAB: u64 = 3;
    const KEY: u64 = 0x5eed;
    const OWNER: u64 = 77;

    fn harness(budget: u64, per_tenant: usize) -> Harness {
        Harness::new(
            16 << 20,
            1 << 20,
            &[(SLAB, KEY, OWNER), (4, 0x44, 78)],
            ADMIN,
            budget,
            per_tenant,
        )
    }

    fn at(offset: u64) -> Target {
        Target {
            slab: SLAB,
            key: KEY,
            offset,
        }
    }

    fn frames(reqs: &[(u64, Request<'_>)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (id, r) in reqs {
            data::encode_request(&mut b, *id, r);
        }
        b
    }

    fn hello(cap: (u64, u64), admin: u64) -> Vec<u8> {
        let mut b = Vec::new();
        data::hello(&mut b, 1, admin, 9, cap);
        b
    }

    /// The replies in a transcript: (id, decoded reply as text, data bytes).
    fn replies(sent: &[u8]) -> Vec<(u64, Result<Vec<u8>, ErrorCode>)> {
        let mut d = FrameDecoder::new(u32::MAX);
        let s = d.spare(sent.len());
        s[..sent.len()].copy_from_slice(sent);
        d.filled(sent.len());
        let mut v = Vec::new();
        while let Some(f) = d.peek().unwrap() {
            let r = match data::decode_reply(f.kind, f.payload).unwrap() {
                Reply::Error { code, .. } => Err(code),
                Reply::Data(b) => Ok(b.to_vec()),
                _ => Ok(Vec::new()),
            };
            v.push((f.id, r));
            d.consume();
        }
        assert_eq!(d.buffered(), 0, "a partial frame was sent");
        v
    }

    #[test]
    fn a_connection_without_a_credential_gets_statistics_only() {
        let h = harness(64 << 20, 8);
        let mut input = hello((0, 0), 0);
        input.extend(frames(&[
            (2, Request::Stats),
            (3, Request::Read { at: at(0), len: 8 }),
            (4, Request::DropSlab { slab: SLAB }),
        ]));
        let t = h.run(&[&input], usize::MAX);
        assert!(!t.authenticated);
        let r = replies(&t.sent);
        assert_eq!(r.len(), 4);
        assert!(r[0].1.is_ok() && r[1].1.is_ok());
        assert_eq!(r[2].1, Err(ErrorCode::NotAuthorized));
        assert_eq!(r[3].1, Err(ErrorCode::NotAuthorized));
        assert!(h.pool().used_slabs() == 2);
        assert_eq!(h.open(), (0, 0, 0));
    }

    #[test]
    fn before_the_handshake_frames_are_small_and_only_hello() {
        let h = harness(64 << 20, 8);
        let t = h.run(&[&frames(&[(5, Request::Stats)])], usize::MAX);
        assert!(t.closed);
        assert_eq!(replies(&t.sent)[0].1, Err(ErrorCode::HandshakeRequired));
        // A header claiming more than 4 KiB closes before any payload.
        let mut b = Vec::new();
        put_header(&mut b, 1, data::op::HELLO, 8 << 10);
        let t = h.run(&[&b], usize::MAX);
        assert!(t.closed);
        assert_eq!(replies(&t.sent)[0].1, Err(ErrorCode::FrameTooLarge));
        // Another protocol version is refused by name.
        let mut b = Vec::new();
        put_header(&mut b, 1, data::op::HELLO, 6);
        b.extend_from_slice(b"RMRA");
        b.extend_from_slice(&2u16.to_le_bytes());
        let t = h.run(&[&b], usize::MAX);
        assert!(t.closed);
        assert_eq!(replies(&t.sent)[0].1, Err(ErrorCode::UnsupportedVersion));
        // A greeted connection without a credential keeps the small limit.
        let mut input = hello((0, 0), 0);
        let data = vec![1u8; 8 << 10];
        input.extend(frames(&[(
            2,
            Request::Write {
                at: at(0),
                data: &data,
            },
        )]));
        let t = h.run(&[&input], usize::MAX);
        assert!(t.closed);
        assert_eq!(replies(&t.sent)[1].1, Err(ErrorCode::FrameTooLarge));
        assert_eq!(h.charged(), 0);
    }

    #[test]
    fn a_capability_authenticates_and_a_wrong_one_is_refused() {
        let h = harness(64 << 20, 8);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut input = hello((SLAB, KEY), 0);
        input.extend(frames(&[
            (
                2,
                Request::Write {
                    at: at(10),
                    data: &data,
                },
            ),
            (
                3,
                Request::Read {
                    at: at(10),
                    len: 100_000,
                },
            ),
            (4, Request::Read { at: at(10), len: 5 }),
            (
                5,
                Request::CreateSlab {
                    slab: 9,
                    key: 1,
                    owner: 1,
                },
            ),
        ]));
        // The socket takes 1000 bytes of the large read at once; the rest
        // goes through the reply buffer.
        let t = h.run(&[&input], 1000);
        assert!(t.authenticated && !t.closed);
        let r = replies(&t.sent);
        assert_eq!(r[2], (3, Ok(data.clone())));
        assert_eq!(r[3], (4, Ok(data[..5].to_vec())));
        assert_eq!(r[4].1, Err(ErrorCode::NotAuthorized));
        assert_eq!(h.charged(), 0, "charges are given back at the end");
        for (cap, code) in [
            ((SLAB, KEY ^ 1), ErrorCode::BadCapability),
            ((99, KEY), ErrorCode::UnknownSlab),
        ] {
            let t = h.run(&[&hello(cap, 0)], usize::MAX);
            assert!(t.closed && !t.authenticated);
            assert_eq!(replies(&t.sent)[0].1, Err(code));
        }
        // The admin key authenticates too, and may use control operations.
        let mut input = hello((0, 0), ADMIN);
        input.extend(frames(&[(
            2,
            Request::CreateSlab {
                slab: 9,
                key: 1,
                owner: 5,
            },
        )]));
        let t = h.run(&[&input], usize::MAX);
        assert!(t.authenticated);
        assert!(replies(&t.sent)[1].1.is_ok());
        assert_eq!(h.open(), (0, 0, 0));
    }

    #[test]
    fn a_tenant_at_its_connection_limit_is_refused() {
        let h = harness(64 << 20, 1);
        // Hold one connection of tenant OWNER open by hand.
        let ticket = h.shared.admission.accept().unwrap();
        let mut held = Session::new(&h.shared, ticket);
        let b = hello((SLAB, KEY), 0);
        held.spare().unwrap()[..b.len()].copy_from_slice(&b);
        held.filled(b.len());
        assert_eq!(held.step(), Step::Read);
        assert!(!held.is_pending());
        let t = h.run(&[&hello((SLAB, KEY), 0)], usize::MAX);
        assert!(t.closed);
        assert_eq!(replies(&t.sent)[0].1, Err(ErrorCode::Overloaded));
        // Another tenant is not affected.
        let t = h.run(&[&hello((4, 0x44), 0)], usize::MAX);
        assert!(t.authenticated && !t.closed);
        drop(held);
        assert_eq!(h.open(), (0, 0, 0));
        assert_eq!(h.charged(), 0);
    }

    #[test]
    fn buffers_are_charged_before_they_grow_and_refused_past_the_budget() {
        // A budget that holds a connection and a little more.
        let h = harness(1 << 20, 8);
        // Half of a 4 MiB frame: the connection holds about what arrived,
        // then cannot receive more and is closed with Overloaded.
        let mut input = hello((SLAB, KEY), 0);
        put_header(&mut input, 2, data::op::WRITE, 4 << 20);
        input.extend(std::iter::repeat_n(0u8, 2 << 20));
        let t = h.run(&[&input], usize::MAX);
        assert!(t.closed);
        let r = replies(&t.sent);
        assert_eq!(r.last().unwrap().1, Err(ErrorCode::Overloaded));
        assert_eq!(h.charged(), 0);
        // A read whose reply does not fit is refused, nothing else.
        let mut input = hello((SLAB, KEY), 0);
        let mut bb = data::BatchBuilder::new();
        bb.push(&SubOp::Read {
            at: at(0),
            len: 1 << 20,
        });
        input.extend(frames(&[
            (2, bb.as_request()),
            (3, Request::Read { at: at(0), len: 4 }),
        ]));
        let t = h.run(&[&input], usize::MAX);
        assert!(!t.closed);
        let r = replies(&t.sent);
        assert_eq!(r[1].1, Err(ErrorCode::Overloaded));
        assert_eq!(r[2], (3, Ok(vec![0; 4])));
    }

    #[test]
    fn split_input_gives_the_same_replies() {
        let h = harness(64 << 20, 8);
        let mut input = hello((SLAB, KEY), 0);
        let data = vec![7u8; 40_000];
        input.extend(frames(&[
            (
                2,
                Request::Write {
                    at: at(0),
                    data: &data,
                },
            ),
            (
                3,
                Request::Read {
                    at: at(0),
                    len: 40_000,
                },
            ),
            (
                4,
                Request::Faa {
                    at: at(64),
                    delta: 1,
                    rid: 0,
                },
            ),
        ]));
        let whole = h.run(&[&input], usize::MAX);
        for cut in [1, 13, 50, 4000, 40_000] {
            let chunks: Vec<&[u8]> = input.chunks(cut).collect();
            let t = h.run(&chunks, 7);
            let (a, b) = (replies(&whole.sent), replies(&t.sent));
            assert_eq!(a.len(), b.len());
            assert_eq!(a[..3], b[..3], "cut {cut}");
        }
    }

    /// Valid frames mixed with arbitrary bytes, in arbitrary chunks: never
    /// a panic, and every charge and slot is given back (the fuzz target
    /// `server_session` does the same for longer).
    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        fn op() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                (any::<u32>(), 0u64..(1 << 20)).prop_map(|(len, off)| frames(&[(
                    2,
                    Request::Read {
                        at: at(off),
                        len: len % (1 << 21)
                    }
                )])),
                (0u64..(1 << 20), 0usize..70_000).prop_map(|(off, n)| {
                    let d = vec![9u8; n];
                    frames(&[(
                        3,
                        Request::Write {
                            at: at(off),
                            data: &d,
                        },
                    )])
                }),
                Just(frames(&[(
                    4,
                    Request::Faa {
                        at: at(8),
                        delta: 1,
                        rid: 5
                    }
                )])),
                Just(frames(&[(5, Request::DropSlab { slab: SLAB })])),
                Just(frames(&[(6, Request::Stats)])),
            ]
        }

        proptest! {
            #[test]
            fn sessions_never_panic_and_give_everything_back(
                cred in 0u8..3,
                ops in proptest::collection::vec(op(), 0..12),
                chunk in 1usize..5000,
                take in 0usize..100_000,
                budget in 1u64..64,
            ) {
                let h = harness(budget << 16, 2);
                let mut input = match cred {
                    0 => hello((0, 0), 0),
                    1 => hello((SLAB, KEY), 0),
                    _ => hello((0, 0), ADMIN),
                };
                for o in &ops {
                    input.extend_from_slice(o);
                }
                let chunks: Vec<&[u8]> = input.chunks(chunk).collect();
                h.run(&chunks, take);
                prop_assert_eq!(h.charged(), 0);
                prop_assert_eq!(h.open(), (0, 0, 0));
            }
        }
    }
}
