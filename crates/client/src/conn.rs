//! A pipelined, multiplexed connection to one memory server.
//!
//! Many requests may be in flight on one connection and their replies may
//! arrive in any order; each request gets a slot keyed by its request id.
//!
//! Who reads the socket (leader/follower): a thread waiting for a reply
//! becomes the reader if nobody is reading, reads frames and delivers each
//! to its slot until its own reply is there, then hands the role on. So a
//! single thread doing one request at a time reads its own reply directly,
//! with no thread hand-off on the critical path. Futures cannot block, so
//! when a future is pending and nobody is reading, a per-connection driver
//! thread takes the reader role until no future is waiting; it also expires
//! the deadlines of futures.
//!
//! Concurrency contract: `state` guards the slots and the `reading` flag;
//! only the thread that set `reading` locks `reader`; `writer` is locked
//! only while one frame is written. A connection that fails (I/O error,
//! undecodable frame) is marked dead: every pending slot completes with the
//! error and the pool replaces the connection on next use.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use remora_net::{FramedReader, LatencyInjector, NetError, OwnedFrame, Stream, Transport};
use remora_proto::data::{self, Reply};
use remora_proto::VERSION;

use crate::ClientError;

/// Receives the kind and payload of a waiter's own reply.
type Sink<'a> = &'a mut dyn FnMut(u16, &[u8]);

/// How long a reader blocks in one `read` before re-checking deadlines.
const READ_TICK: Duration = Duration::from_millis(20);

enum Slot {
    Pending {
        waker: Option<Waker>,
        deadline: Instant,
    },
    Ready(Result<OwnedFrame, ClientError>),
}

struct State {
    slots: HashMap<u64, Slot>,
    reading: bool,
    dead: Option<ClientError>,
    /// Slots with a registered waker (futures waiting).
    async_waiters: usize,
}

struct Writer {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

/// One connection to a memory server.
pub(crate) struct Conn {
    addr: String,
    state: Mutex<State>,
    cond: Condvar,
    reader: Mutex<FramedReader>,
    writer: Mutex<Writer>,
    /// A handle to close the socket without taking any lock.
    shutdown: Box<dyn Stream>,
    next_id: AtomicU64,
    driver_started: AtomicBool,
    timeout: Duration,
    max_frame: u32,
    /// When the connection was made (the origin of `last_sent`).
    born: Instant,
    /// Nanoseconds after `born` of the last request sent.
    last_sent: AtomicU64,
    /// A connection idle this long is replaced before use: half the time
    /// after which the server closes an idle connection.
    stale_after: Option<Duration>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Connects and performs the handshake, authenticated by the slab
    /// capability `cap` (`(0, 0)`: a connection that may only ask for
    /// statistics).
    pub(crate) fn connect(
        transport: &dyn Transport,
        addr: &str,
        connect_timeout: Duration,
        timeout: Duration,
        latency: LatencyInjector,
        session: u64,
        cap: (u64, u64),
    ) -> Result<Arc<Conn>, ClientError> {
        let net = |source: NetError| ClientError::net(addr, source);
        let s = transport.connect(addr, connect_timeout).map_err(net)?;
        let io = |source| {
            net(NetError::Io {
                op: "set up",
                addr: addr.to_string(),
                source,
            })
        };
        let mut w = s.try_clone_stream().map_err(io)?;
        s.set_read_timeout(Some(READ_TICK)).map_err(io)?;
        let mut r = FramedReader::new(s, addr, remora_proto::frame::DEFAULT_MAX_FRAME, latency);
        let mut buf = Vec::new();
        data::hello(&mut buf, 0, 0, session, cap);
        w.write_all(&buf).map_err(|source| {
            net(NetError::Io {
                op: "write to",
                addr: addr.to_string(),
                source,
            })
        })?;
        let f = r.next_owned(Some(Instant::now() + timeout)).map_err(net)?;
        // The handshake wait changed the read timeout; readers need the tick.
        r.stream().set_read_timeout(Some(READ_TICK)).map_err(io)?;
        // A blocked write returns now and then so the writer can read
        // replies the server is waiting to send (see `submit`).
        w.set_write_timeout(Some(READ_TICK)).map_err(io)?;
        let shutdown = w.try_clone_stream().map_err(io)?;
        let (max_frame, idle_ms) = match data::decode_reply(f.kind, &f.payload) {
            Ok(Reply::HelloOk {
                version,
                max_frame,
                idle_ms,
                ..
            }) if version == VERSION => (max_frame, idle_ms),
            Ok(Reply::Error { code, message }) => {
                return Err(ClientError::Remote {
                    addr: addr.to_string(),
                    code,
                    message: message.to_string(),
                })
            }
            other => {
                return Err(ClientError::Protocol {
                    addr: addr.to_string(),
                    detail: format!("bad handshake reply: {other:?}"),
                })
            }
        };
        Ok(Arc::new(Conn {
            addr: addr.to_string(),
            state: Mutex::new(State {
                slots: HashMap::new(),
                reading: false,
                dead: None,
                async_waiters: 0,
            }),
            cond: Condvar::new(),
            reader: Mutex::new(r),
            writer: Mutex::new(Writer { stream: w, buf }),
            shutdown,
            next_id: AtomicU64::new(1),
            born: Instant::now(),
            last_sent: AtomicU64::new(0),
            stale_after: (idle_ms > 0).then(|| Duration::from_millis(u64::from(idle_ms) / 2)),
            driver_started: AtomicBool::new(false),
            timeout,
            max_frame,
        }))
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.state.lock().dead.is_some()
    }

    /// True if the connection has sent nothing for half the server's idle
    /// timeout: the server may close it any time now, so a request sent on
    /// it could be lost with its outcome unknown. The pool replaces it.
    pub(crate) fn is_stale(&self) -> bool {
        self.stale_after.is_some_and(|d| {
            let last = Duration::from_nanos(self.last_sent.load(Ordering::Relaxed));
            self.born.elapsed().saturating_sub(last) > d
        })
    }

    /// Sends the frame `encode(buf, id)` appends; returns its request id.
    pub(crate) fn submit(
        &self,
        encode: impl FnOnce(&mut Vec<u8>, u64),
    ) -> Result<u64, ClientError> {
        self.submit_within(encode, self.timeout)
    }

    /// Like [`Conn::submit`], with a deadline of `timeout` from now instead
    /// of the connection's.
    pub(crate) fn submit_within(
        &self,
        encode: impl FnOnce(&mut Vec<u8>, u64),
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.last_sent
            .store(self.born.elapsed().as_nanos() as u64, Ordering::Relaxed);
        {
            let mut st = self.state.lock();
            if let Some(e) = &st.dead {
                return Err(e.clone());
            }
            st.slots.insert(
                id,
                Slot::Pending {
                    waker: None,
                    deadline: Instant::now() + timeout,
                },
            );
        }
        let res = {
            let mut w = self.writer.lock();
            let w = &mut *w;
            w.buf.clear();
            encode(&mut w.buf, id);
            if w.buf.len() > self.max_frame as usize {
                let n = w.buf.len();
                self.state.lock().slots.remove(&id);
                return Err(ClientError::Remote {
                    addr: self.addr.clone(),
                    code: remora_proto::ErrorCode::FrameTooLarge,
                    message: format!(
                        "request of {n} bytes exceeds the server's maximum frame of {}",
                        self.max_frame
                    ),
                });
            }
            self.write_draining(w)
        };
        if let Err(source) = res {
            let e = ClientError::net(
                &self.addr,
                NetError::Io {
                    op: "write to",
                    addr: self.addr.clone(),
                    source,
                },
            );
            self.fail_all(e.clone());
            self.state.lock().slots.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Writes the whole buffer. When the socket stays full, the server may
    /// be blocked writing replies that nobody reads (one thread sending
    /// large reads and then large writes, say): so between attempts this
    /// thread reads and delivers replies itself if nobody else is reading.
    fn write_draining(&self, w: &mut Writer) -> std::io::Result<()> {
        let started = Instant::now();
        let mut pos = 0;
        while pos < w.buf.len() {
            match w.stream.write(&w.buf[pos..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => pos += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if started.elapsed() > self.timeout {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("server accepted no data for {:?}", self.timeout),
                        ));
                    }
                    self.drain_once();
                    if self.is_dead() {
                        return Err(std::io::ErrorKind::BrokenPipe.into());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads once and delivers what arrived, if no other thread is reading.
    fn drain_once(&self) {
        {
            let mut st = self.state.lock();
            if st.reading || st.dead.is_some() {
                return;
            }
            st.reading = true;
        }
        let mut r = self.reader.lock();
        let mut failure = None;
        match r.fill() {
            Ok(_) => loop {
                match r.try_frame() {
                    Ok(Some(f)) => {
                        let frame = OwnedFrame::from_raw(f);
                        r.consume();
                        self.deliver(frame);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            },
            Err(e) => failure = Some(e),
        }
        drop(r);
        if let Some(e) = failure {
            self.fail_all(ClientError::net(&self.addr, e));
        }
        self.state.lock().reading = false;
        self.cond.notify_all();
    }

    /// Marks the connection dead and completes every pending slot with `e`.
    fn fail_all(&self, e: ClientError) {
        let mut st = self.state.lock();
        if st.dead.is_none() {
            st.dead = Some(e.clone());
        }
        for slot in st.slots.values_mut() {
            if let Slot::Pending { waker, .. } = slot {
                if let Some(w) = waker.take() {
                    w.wake();
                }
                *slot = Slot::Ready(Err(e.clone()));
            }
        }
        st.async_waiters = 0;
        drop(st);
        let _ = self.shutdown.shutdown();
        self.cond.notify_all();
    }

    /// Takes a finished slot, if finished.
    fn take_ready(st: &mut State, id: u64) -> Option<Result<OwnedFrame, ClientError>> {
        if let Some(Slot::Ready(_)) = st.slots.get(&id) {
            if let Some(Slot::Ready(r)) = st.slots.remove(&id) {
                return Some(r);
            }
        }
        None
    }

    /// Blocks until the reply to `id` arrives (or its deadline passes), then hands its kind and
    /// payload to `f`. When this thread reads its own reply, `f` sees it in
    /// the receive buffer: no copy, no allocation.
    pub(crate) fn wait_with<T>(
        &self,
        id: u64,
        f: impl FnOnce(u16, &[u8]) -> T,
    ) -> Result<T, ClientError> {
        let mut f = Some(f);
        let mut out: Option<T> = None;
        let mut st = self.state.lock();
        loop {
            if let Some(r) = Self::take_ready(&mut st, id) {
                let frame = r?;
                return match f.take() {
                    Some(f) => Ok(f(frame.kind, &frame.payload)),
                    None => Err(self.not_pending(id)),
                };
            }
            let deadline = match st.slots.get(&id) {
                Some(Slot::Pending { deadline, .. }) => *deadline,
                _ => return Err(self.not_pending(id)),
            };
            if Instant::now() >= deadline {
                self.expire(&mut st, id);
                continue;
            }
            if !st.reading {
                st.reading = true;
                drop(st);
                let mut sink = |kind: u16, payload: &[u8]| {
                    if let Some(f) = f.take() {
                        out = Some(f(kind, payload));
                    }
                };
                self.lead(Some((id, &mut sink)));
                st = self.state.lock();
                st.reading = false;
                self.cond.notify_all();
                if let Some(v) = out.take() {
                    return Ok(v);
                }
            } else {
                self.cond.wait_until(&mut st, deadline);
            }
        }
    }

    fn not_pending(&self, id: u64) -> ClientError {
        ClientError::Protocol {
            addr: self.addr.clone(),
            detail: format!("request {id} is not pending"),
        }
    }

    fn expire(&self, st: &mut State, id: u64) {
        if let Some(Slot::Pending { waker, .. }) = st.slots.get_mut(&id) {
            if let Some(w) = waker.take() {
                w.wake();
                st.async_waiters = st.async_waiters.saturating_sub(1);
            }
            st.slots.insert(
                id,
                Slot::Ready(Err(ClientError::Timeout {
                    addr: self.addr.clone(),
                    timeout: self.timeout,
                })),
            );
        }
    }

    /// Reads and delivers frames as the reader. With `Some((id, sink))`,
    /// returns once that reply has been handed to `sink` (straight from the
    /// receive buffer) or has otherwise completed; with `None` (the driver),
    /// returns once no future waits. Also returns on connection failure.
    fn lead(&self, mut own: Option<(u64, Sink<'_>)>) {
        let own_id = own.as_ref().map(|(id, _)| *id);
        let mut r = self.reader.lock();
        loop {
            // Deliver everything buffered.
            loop {
                let frame = match r.try_frame() {
                    Ok(Some(f)) if Some(f.id) == own_id => {
                        let mine = {
                            let mut st = self.state.lock();
                            match st.slots.get(&f.id) {
                                Some(Slot::Pending { waker, .. }) => {
                                    if waker.is_some() {
                                        st.async_waiters = st.async_waiters.saturating_sub(1);
                                    }
                                    st.slots.remove(&f.id);
                                    true
                                }
                                // Timed out meanwhile: the error stays for the waiter.
                                _ => false,
                            }
                        };
                        if mine {
                            if let Some((_, sink)) = own.as_mut() {
                                sink(f.kind, f.payload);
                            }
                        }
                        r.consume();
                        // Leave later frames in the buffer: their owners
                        // (often this same thread, next) read them there
                        // without a copy.
                        return;
                    }
                    Ok(Some(f)) => OwnedFrame::from_raw(f),
                    Ok(None) => break,
                    Err(source) => {
                        drop(r);
                        self.fail_all(ClientError::net(&self.addr, source));
                        return;
                    }
                };
                r.consume();
                self.deliver(frame);
            }
            {
                let mut st = self.state.lock();
                if st.dead.is_some() {
                    return;
                }
                match own_id {
                    Some(id) => {
                        if !matches!(st.slots.get(&id), Some(Slot::Pending { .. })) {
                            return;
                        }
                    }
                    None => {
                        self.expire_due(&mut st);
                        if st.async_waiters == 0 {
                            return;
                        }
                    }
                }
                if let (Some(id), Some(Slot::Pending { deadline, .. })) =
                    (own_id, own_id.and_then(|i| st.slots.get(&i)))
                {
                    if Instant::now() >= *deadline {
                        self.expire(&mut st, id);
                        return;
                    }
                }
            }
            match r.fill() {
                Ok(true) => {}
                // An idle tick: expire futures whose deadline passed.
                Ok(false) => self.expire_due(&mut self.state.lock()),
                Err(source) => {
                    drop(r);
                    self.fail_all(ClientError::net(&self.addr, source));
                    return;
                }
            }
        }
    }

    fn expire_due(&self, st: &mut State) {
        let now = Instant::now();
        let due: Vec<u64> = st
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Pending { deadline, .. } if *deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.expire(st, id);
        }
    }

    fn deliver(&self, f: OwnedFrame) {
        let mut st = self.state.lock();
        let id = f.id;
        let mut was_async = false;
        match st.slots.get_mut(&id) {
            Some(slot @ Slot::Pending { .. }) => {
                if let Slot::Pending { waker: Some(w), .. } =
                    std::mem::replace(slot, Slot::Ready(Ok(f)))
                {
                    was_async = true;
                    w.wake();
                }
            }
            // A late reply to a request that timed out or was abandoned.
            _ => return,
        }
        if was_async {
            st.async_waiters = st.async_waiters.saturating_sub(1);
        }
        drop(st);
        self.cond.notify_all();
    }

    /// Polls the reply to `id` from a future.
    pub(crate) fn poll(
        self: &Arc<Self>,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<OwnedFrame, ClientError>> {
        let mut st = self.state.lock();
        if let Some(r) = Self::take_ready(&mut st, id) {
            return Poll::Ready(r);
        }
        match st.slots.get_mut(&id) {
            Some(Slot::Pending { waker, .. }) => {
                if waker.is_none() {
                    *waker = Some(cx.waker().clone());
                    st.async_waiters += 1;
                } else if let Some(w) = waker.as_mut() {
                    w.clone_from(cx.waker());
                }
            }
            _ => {
                return Poll::Ready(Err(ClientError::Protocol {
                    addr: self.addr.clone(),
                    detail: format!("request {id} is not pending"),
                }))
            }
        }
        drop(st);
        self.ensure_driver();
        self.cond.notify_all();
        Poll::Pending
    }

    /// Forgets a request whose result is no longer wanted.
    pub(crate) fn abandon(&self, id: u64) {
        let mut st = self.state.lock();
        if let Some(Slot::Pending { waker: Some(_), .. }) = st.slots.remove(&id) {
            st.async_waiters = st.async_waiters.saturating_sub(1);
        }
    }

    fn ensure_driver(self: &Arc<Self>) {
        if self.driver_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("remora-client-driver".into())
            .spawn(move || {
                crate::thread_started();
                driver(weak)
            });
        if spawned.is_err() {
            self.driver_started.store(false, Ordering::Release);
        }
    }
}

/// Reads on behalf of pending futures; exits when the connection is dropped or dead.
fn driver(weak: Weak<Conn>) {
    loop {
        let Some(c) = weak.upgrade() else { return };
        {
            let mut st = c.state.lock();
            if st.dead.is_some() {
                return;
            }
            if st.async_waiters == 0 || st.reading {
                // Wait for work; time out so a dropped connection ends the thread.
                c.cond.wait_for(&mut st, Duration::from_millis(100));
                continue;
            }
            st.reading = true;
        }
        c.lead(None);
        let mut st = c.state.lock();
        st.reading = false;
        drop(st);
        c.cond.notify_all();
    }
}
