//! Remora's transport layer: byte streams, framed blocking I/O, latency injection.
//!
//! Everything above this crate sees a [`Transport`] that yields [`Stream`]s;
//! TCP ([`TcpTransport`]) is the only one today, and the trait is the seam for
//! shared-memory or RDMA transports. [`FramedReader`] pulls whole frames out
//! of a stream with the sans-IO [`FrameDecoder`]; [`RpcConn`] is a simple
//! blocking connection for control traffic, one call or one pipelined burst
//! at a time (the client runtime has its own multiplexed connection).
//! [`LatencyInjector`] holds each received
//! message until a fixed delay after its arrival, which emulates a slower
//! fabric without limiting how many messages are in flight.
//!
//! This crate never interprets payloads beyond the frame envelope.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use remora_proto::frame::{FrameDecoder, RawFrame, DEFAULT_MAX_FRAME};
use remora_proto::DecodeError;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Socket-level failure.
    #[error("{op} {addr}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Peer address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The peer sent bytes that are not a frame.
    #[error("{addr}: bad frame: {source}")]
    Decode {
        /// Peer address.
        addr: String,
        /// Cause.
        #[source]
        source: DecodeError,
    },
    /// The peer closed the connection.
    #[error("{addr}: connection closed by peer")]
    Closed {
        /// Peer address.
        addr: String,
    },
    /// No reply within the deadline.
    #[error("{addr}: no reply within {timeout:?}")]
    Timeout {
        /// Peer address.
        addr: String,
        /// The deadline that passed.
        timeout: Duration,
    },
}

/// A bidirectional byte stream.
pub trait Stream: Read + Write + Send + Sync + std::fmt::Debug {
    /// A second handle to the same stream (one reads while the other writes).
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// Bounds how long a read may block (`None`: forever).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Bounds how long a write may block (`None`: forever).
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Closes both directions; pending reads on other handles return.
    fn shutdown(&self) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }

    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
}

/// Something that opens streams to `host:port` addresses.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Connects, giving up after `timeout`.
    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Stream>, NetError>;
}

/// Plain TCP with `TCP_NODELAY`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

impl Transport for TcpTransport {
    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Stream>, NetError> {
        let io = |source| NetError::Io {
            op: "connect",
            addr: addr.to_string(),
            source,
        };
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(io)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_nodelay(true).map_err(io)?;
                    return Ok(Box::new(s));
                }
                Err(e) => last = e,
            }
        }
        Err(io(last))
    }
}

/// Holds received messages until `delay` after their arrival.
///
/// A delay of zero costs one branch. Waits under 200 µs spin (sleeping has
/// coarser granularity than the delays being emulated); longer ones sleep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyInjector {
    delay: Duration,
}

impl LatencyInjector {
    /// An injector adding `delay` to every received message.
    pub fn new(delay: Duration) -> Self {
        LatencyInjector { delay }
    }

    /// The configured delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Blocks until `delay` has passed since `arrival`.
    #[inline]
    pub fn hold(&self, arrival: Instant) {
        if self.delay.is_zero() {
            return;
        }
        let until = arrival + self.delay;
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            let left = until - now;
            if left > Duration::from_micros(200) {
                std::thread::sleep(left - Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Parses a duration such as `5us`, `1.5ms`, `2s`, `250ns` (plain numbers are microseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 5us, 1.5ms, 2s)"))?;
    let nanos = match unit.trim() {
        "ns" => v,
        "" | "us" | "µs" => v * 1e3,
        "ms" => v * 1e6,
        "s" => v * 1e9,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?} (ns, us, ms, s)"
            ))
        }
    };
    if !nanos.is_finite() || !(0.0..=1e15).contains(&nanos) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// An owned frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    /// Request id.
    pub id: u64,
    /// Frame kind.
    pub kind: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

impl OwnedFrame {
    /// An owned copy of a borrowed frame.
    pub fn from_raw(f: RawFrame<'_>) -> Self {
        OwnedFrame {
            id: f.id,
            kind: f.kind,
            payload: remora_proto::copy::to_vec(f.payload),
        }
    }
}

/// Reads whole frames from a stream.
#[derive(Debug)]
pub struct FramedReader {
    stream: Box<dyn Stream>,
    dec: FrameDecoder,
    peer: String,
    latency: LatencyInjector,
    last_arrival: Instant,
}

impl FramedReader {
    /// Wraps a stream; frames over `max_frame` bytes are a fatal error.
    pub fn new(
        stream: Box<dyn Stream>,
        peer: &str,
        max_frame: u32,
        latency: LatencyInjector,
    ) -> Self {
        FramedReader {
            stream,
            dec: FrameDecoder::new(max_frame),
            peer: peer.to_string(),
            latency,
            last_arrival: Instant::now(),
        }
    }

    /// The peer's address as given.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Changes the largest frame accepted (e.g. after a handshake).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.dec.set_max_frame(max_frame);
    }

    /// The underlying stream.
    pub fn stream(&self) -> &dyn Stream {
        &*self.stream
    }

    /// Reads once from the stream into the decoder. `Ok(false)` on timeout.
    ///
    /// The buffer grows with the bytes that actually arrive (at most 64 KiB
    /// more per read), never to the size a frame header merely claims.
    pub fn fill(&mut self) -> Result<bool, NetError> {
        let want = self.dec.needed().clamp(16 << 10, 64 << 10);
        let spare = self.dec.spare(want);
        match self.stream.read(spare) {
            Ok(0) => Err(NetError::Closed {
                addr: self.peer.clone(),
            }),
            Ok(n) => {
                self.dec.filled(n);
                self.last_arrival = Instant::now();
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(NetError::Io {
                op: "read from",
                addr: self.peer.clone(),
                source: e,
            }),
        }
    }

    /// The next buffered frame without reading, held for the injected latency.
    pub fn try_frame(&mut self) -> Result<Option<RawFrame<'_>>, NetError> {
        let peer = &self.peer;
        let decode = |source| NetError::Decode {
            addr: peer.clone(),
            source,
        };
        if !self.latency.delay().is_zero() {
            // Hold a complete frame before lending it out.
            match self.dec.peek() {
                Ok(Some(_)) => self.latency.hold(self.last_arrival),
                Ok(None) => return Ok(None),
                Err(source) => return Err(decode(source)),
            }
        }
        self.dec.peek().map_err(decode)
    }

    /// Releases the frame returned by [`Self::try_frame`].
    pub fn consume(&mut self) {
        self.dec.consume();
    }

    /// True if bytes are buffered beyond consumed frames.
    pub fn has_buffered(&self) -> bool {
        self.dec.buffered() > 0
    }

    /// Blocks until a whole frame arrives (or `deadline` passes) and returns it owned.
    pub fn next_owned(&mut self, deadline: Option<Instant>) -> Result<OwnedFrame, NetError> {
        let start = Instant::now();
        loop {
            if let Some(f) = self.try_frame()? {
                let f = OwnedFrame::from_raw(f);
                self.consume();
                return Ok(f);
            }
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err(NetError::Timeout {
                        addr: self.peer.clone(),
                        timeout: d.saturating_duration_since(start),
                    });
                }
                let _ = self.stream.set_read_timeout(Some(d - now));
            }
            self.fill()?;
        }
    }
}

/// A blocking connection for control traffic: one call, or one pipelined burst, at a time.
#[derive(Debug)]
pub struct RpcConn {
    reader: FramedReader,
    writer: Box<dyn Stream>,
    buf: Vec<u8>,
    next_id: u64,
    timeout: Duration,
}

impl RpcConn {
    /// Connects to `addr`.
    pub fn connect(
        transport: &dyn Transport,
        addr: &str,
        timeout: Duration,
        latency: LatencyInjector,
    ) -> Result<Self, NetError> {
        let s = transport.connect(addr, timeout)?;
        let w = s.try_clone_stream().map_err(|source| NetError::Io {
            op: "clone socket for",
            addr: addr.to_string(),
            source,
        })?;
        Ok(RpcConn {
            reader: FramedReader::new(s, addr, DEFAULT_MAX_FRAME, latency),
            writer: w,
            buf: Vec::new(),
            next_id: 1,
            timeout,
        })
    }

    /// The peer address.
    pub fn peer(&self) -> &str {
        self.reader.peer()
    }

    /// Sets the deadline of each call (initially the connect timeout).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `n` frames (`encode(buf, i, id)` appends the `i`-th) in one
    /// write and waits for all their replies, returned in request order.
    /// The caller keeps `n` small enough that the replies fit in the
    /// socket buffers (a few thousand small frames).
    pub fn call_pipelined(
        &mut self,
        n: usize,
        mut encode: impl FnMut(&mut Vec<u8>, usize, u64),
    ) -> Result<Vec<OwnedFrame>, NetError> {
        let first = self.next_id;
        self.next_id += n as u64;
        self.buf.clear();
        for i in 0..n {
            encode(&mut self.buf, i, first + i as u64);
        }
        self.writer
            .write_all(&self.buf)
            .map_err(|source| NetError::Io {
                op: "write to",
                addr: self.reader.peer().to_string(),
                source,
            })?;
        let deadline = Instant::now() + self.timeout;
        let mut out: Vec<Option<OwnedFrame>> = vec![None; n];
        let mut got = 0;
        while got < n {
            if Instant::now() >= deadline {
                return Err(NetError::Timeout {
                    addr: self.reader.peer().to_string(),
                    timeout: self.timeout,
                });
            }
            let f = self
                .reader
                .next_owned(Some(deadline))
                .map_err(|e| match e {
                    NetError::Timeout { addr, .. } => NetError::Timeout {
                        addr,
                        timeout: self.timeout,
                    },
                    e => e,
                })?;
            if f.id >= first && f.id < first + n as u64 {
                let slot = &mut out[(f.id - first) as usize];
                if slot.is_none() {
                    got += 1;
                }
                *slot = Some(f);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Sends the frame that `encode(buf, id)` appends and waits for the reply with that id.
    pub fn call(&mut self, encode: impl FnOnce(&mut Vec<u8>, u64)) -> Result<OwnedFrame, NetError> {
        let mut encode = Some(encode);
        let mut replies = self.call_pipelined(1, |b, _, id| {
            if let Some(e) = encode.take() {
                e(b, id);
            }
        })?;
        replies.pop().ok_or_else(|| NetError::Closed {
            addr: self.reader.peer().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5us").unwrap(), Duration::from_micros(5));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_micros(5));
        assert_eq!(
            parse_duration("1.5ms").unwrap(),
            Duration::from_micros(1500)
        );
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ns").unwrap(), Duration::from_nanos(250));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-3us").is_err());
    }

    #[test]
    fn latency_is_held() {
        let l = LatencyInjector::new(Duration::from_micros(300));
        let t = Instant::now();
        l.hold(t);
        assert!(t.elapsed() >= Duration::from_micros(300));
    }

    #[test]
    fn rpc_roundtrip_and_close() {
        use remora_proto::frame::put_header;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r =
                FramedReader::new(Box::new(s), "client", 1 << 20, LatencyInjector::default());
            let f = r.next_owned(None).unwrap();
            let mut out = Vec::new();
            put_header(&mut out, f.id, f.kind + 1, f.payload.len());
            out.extend_from_slice(&f.payload);
            w.write_all(&out).unwrap();
        });
        let mut c = RpcConn::connect(
            &TcpTransport,
            &addr,
            Duration::from_secs(5),
            LatencyInjector::default(),
        )
        .unwrap();
        let f = c
            .call(|b, id| {
                put_header(b, id, 7, 3);
                b.extend_from_slice(b"abc");
            })
            .unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (8, &b"abc"[..]));
        h.join().unwrap();
        let e = c.call(|b, id| put_header(b, id, 7, 0)).unwrap_err();
        assert!(
            matches!(e, NetError::Closed { .. } | NetError::Io { .. }),
            "{e}"
        );
    }
}
