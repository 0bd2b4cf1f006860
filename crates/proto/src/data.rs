//! Memory-server operations: requests and replies on slabs.
//!
//! Every payload is a fixed little-endian layout (documented byte by byte in
//! `docs/protocol.md`). Decoding borrows from the receive buffer and never
//! allocates, so the server's hot path stays allocation-free.

use crate::frame::{begin_frame, finish_frame, put_header};
pub use crate::offload::OffloadOp;
use crate::{DecodeError, ErrorCode, MAGIC, VERSION};

/// Frame kinds (opcodes) of requests to a memory server.
pub mod op {
    /// Versioned handshake; must be the first frame on a connection.
    pub const HELLO: u16 = 0x01;
    /// Read bytes from a slab.
    pub const READ: u16 = 0x02;
    /// Write bytes to a slab.
    pub const WRITE: u16 = 0x03;
    /// Compare-and-swap an aligned 8-byte word.
    pub const CAS: u16 = 0x04;
    /// Fetch-and-add on an aligned 8-byte word.
    pub const FAA: u16 = 0x05;
    /// A vector of the four data operations above in one frame.
    pub const BATCH: u16 = 0x06;
    /// Write bytes and return the bytes they replaced (erasure-coded writes).
    pub const SWAP: u16 = 0x07;
    /// XOR bytes into a slab (parity updates of erasure-coded writes).
    pub const XOR: u16 = 0x08;
    /// End of an erasure-coded write: its parity updates are done.
    pub const COMMIT: u16 = 0x09;
    /// An operation the server runs on a slab's bytes (aggregate, filter,
    /// hash probe, pointer chase, copy); see [`crate::offload`].
    pub const OFFLOAD: u16 = 0x0A;
    /// Control (admin only): create a slab.
    pub const CREATE_SLAB: u16 = 0x10;
    /// Control (admin only): drop a slab.
    pub const DROP_SLAB: u16 = 0x11;
    /// Control (admin only): copy a slab to a slab on another server.
    pub const COPY_SLAB: u16 = 0x12;
    /// Server statistics.
    pub const STATS: u16 = 0x13;
    /// Control (admin only): let a frozen slab take writes again.
    pub const THAW_SLAB: u16 = 0x14;
    /// Control (admin only): list slab ids, in order, after a given id.
    pub const LIST_SLABS: u16 = 0x15;
    /// Control (admin only): read a slab's bytes whatever its key or
    /// freeze (for rebuilding lost slabs).
    pub const READ_SLAB: u16 = 0x16;
    /// Control (admin only): freeze a slab (data operations refused with
    /// SlabFrozen until it is thawed).
    pub const FREEZE_SLAB: u16 = 0x17;
}

/// Frame kinds of replies from a memory server.
pub mod reply {
    /// Handshake accepted.
    pub const HELLO_OK: u16 = 0x81;
    /// Bytes read.
    pub const DATA: u16 = 0x82;
    /// Operation done, no result.
    pub const DONE: u16 = 0x83;
    /// An 8-byte result (previous value of an atomic).
    pub const VALUE: u16 = 0x84;
    /// Results of a batch, one per sub-operation.
    pub const BATCH: u16 = 0x86;
    /// Server statistics.
    pub const STATS: u16 = 0x93;
    /// Typed error: `code u16, msg_len u16, msg utf-8`.
    pub const ERROR: u16 = 0xFF;
}

/// Most sub-operations one batch frame may carry.
pub const MAX_BATCH_OPS: u32 = 4096;

/// Where a data operation applies: a slab, its capability, and a byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Slab id (cluster-unique).
    pub slab: u64,
    /// The slab's capability key.
    pub key: u64,
    /// Byte offset inside the slab.
    pub offset: u64,
}

/// A request to a memory server, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// Handshake.
    Hello {
        /// Protocol version the client speaks.
        version: u16,
        /// Admin key (0 for ordinary clients).
        admin_key: u64,
        /// The client's session id: atomics carrying a request id are
        /// applied once per (session, request id), across connections.
        session: u64,
        /// A slab capability that authenticates the connection as the
        /// slab's owner (slab id and key; `0, 0` for none). A connection
        /// with neither this nor the admin key may only ask for STATS.
        cap: (u64, u64),
    },
    /// Read `len` bytes.
    Read {
        /// Location.
        at: Target,
        /// Bytes to read.
        len: u32,
    },
    /// Write `data`.
    Write {
        /// Location.
        at: Target,
        /// Bytes to write.
        data: &'a [u8],
    },
    /// Compare-and-swap the little-endian u64 at an 8-aligned offset.
    Cas {
        /// Location.
        at: Target,
        /// Expected value.
        expected: u64,
        /// Value stored if the current value equals `expected`.
        new: u64,
        /// Request id (0: none). A retry with the same session and id gets
        /// the first outcome instead of being applied again.
        rid: u64,
    },
    /// Wrapping fetch-and-add on the little-endian u64 at an 8-aligned offset.
    Faa {
        /// Location.
        at: Target,
        /// Added value (wrapping).
        delta: u64,
        /// Request id (0: none), as for [`Request::Cas`].
        rid: u64,
    },
    /// Write `data` and reply DATA with the bytes it replaced, atomically.
    /// With a request id, the slab keeps the replaced bytes until a
    /// [`Request::Commit`] with the same id: a resend returns them again
    /// instead of writing twice, and the swap counts as in flight.
    Swap {
        /// Location.
        at: Target,
        /// Request id (0: none).
        rid: u64,
        /// Bytes to write.
        data: &'a [u8],
    },
    /// XOR `data` into the slab's bytes, atomically (applied even while the
    /// slab is frozen, so that writes in flight can finish).
    Xor {
        /// Location.
        at: Target,
        /// Request id (0: none), as for [`Request::Cas`]: a resent XOR
        /// with the same session and id is applied once.
        rid: u64,
        /// Bytes to XOR in.
        data: &'a [u8],
    },
    /// The parity updates of the [`Request::Swap`] with this request id
    /// are done: the slab forgets it. Accepted while frozen; idempotent.
    Commit {
        /// The slab (offset ignored).
        at: Target,
        /// The swap's request id.
        rid: u64,
    },
    /// A batch of data operations; iterate with [`BatchOps`].
    Batch(BatchOps<'a>),
    /// An offloaded operation on the slab's bytes from `at` (reply DATA,
    /// DONE for a copy, or ERROR); checked and refused like a read (a copy
    /// like a write to its destination).
    Offload {
        /// Location (the source of a copy).
        at: Target,
        /// What to run.
        op: OffloadOp<'a>,
    },
    /// Create a slab with the given capability.
    CreateSlab {
        /// New slab id.
        slab: u64,
        /// Its capability key.
        key: u64,
        /// The tenant that owns it, as a tag ([`crate::tenant_tag`]):
        /// connections authenticated with its capability count against
        /// that tenant's connection limit.
        owner: u64,
    },
    /// Drop a slab.
    DropSlab {
        /// Slab id.
        slab: u64,
    },
    /// List up to `max` slab ids greater than `after`, ascending (reply:
    /// DATA holding little-endian u64 ids).
    ListSlabs {
        /// Start after this id.
        after: u64,
        /// Most ids to return.
        max: u32,
    },
    /// Let a frozen slab take data operations again; a non-zero `new_key`
    /// replaces its capability key first (so clients with an older map are
    /// refused and fetch the new one).
    ThawSlab {
        /// Slab id.
        slab: u64,
        /// New capability key, or 0 to keep the current one.
        new_key: u64,
    },
    /// Freeze a slab (data operations refused from now on), then copy it
    /// whole to `dest_slab` (capability `dest_key`) on the server at
    /// `dest_addr`. The source stays frozen.
    CopySlab {
        /// Source slab (on this server).
        slab: u64,
        /// Destination slab id.
        dest_slab: u64,
        /// Destination capability.
        dest_key: u64,
        /// Destination server address (`host:port`).
        dest_addr: &'a str,
    },
    /// Freeze a slab: data operations are refused until [`Request::ThawSlab`]
    /// (except XOR and COMMIT). Replies VALUE: the swaps still in flight on
    /// the slab, so the caller can wait for them to finish.
    FreezeSlab {
        /// Slab id.
        slab: u64,
    },
    /// Read `len` bytes at `offset` of a slab, frozen or not (reply DATA).
    ReadSlab {
        /// Slab id.
        slab: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Ask for statistics.
    Stats,
}

/// A data operation inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubOp<'a> {
    /// See [`Request::Read`].
    Read {
        /// Location.
        at: Target,
        /// Bytes to read.
        len: u32,
    },
    /// See [`Request::Write`].
    Write {
        /// Location.
        at: Target,
        /// Bytes to write.
        data: &'a [u8],
    },
    /// See [`Request::Cas`].
    Cas {
        /// Location.
        at: Target,
        /// Expected value.
        expected: u64,
        /// New value.
        new: u64,
    },
    /// See [`Request::Faa`].
    Faa {
        /// Location.
        at: Target,
        /// Added value.
        delta: u64,
    },
}

impl Request<'_> {
    /// The slab capability a data operation carries (slab id and key):
    /// what a client presents in the handshake of a connection it opens
    /// for this request. `None` for the handshake and control operations.
    pub fn capability(&self) -> Option<(u64, u64)> {
        let at = match self {
            Request::Read { at, .. }
            | Request::Write { at, .. }
            | Request::Cas { at, .. }
            | Request::Faa { at, .. }
            | Request::Swap { at, .. }
            | Request::Xor { at, .. }
            | Request::Commit { at, .. }
            | Request::Offload { at, .. } => *at,
            Request::Batch(ops) => match ops.iter().next() {
                Some(Ok(
                    SubOp::Read { at, .. }
                    | SubOp::Write { at, .. }
                    | SubOp::Cas { at, .. }
                    | SubOp::Faa { at, .. },
                )) => at,
                _ => return None,
            },
            _ => return None,
        };
        Some((at.slab, at.key))
    }
}

/// Lazily decoded sub-operations of a batch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOps<'a> {
    count: u32,
    body: &'a [u8],
}

impl<'a> BatchOps<'a> {
    /// Number of sub-operations the batch claims to hold.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates the sub-operations; decoding stops at the first malformed one.
    pub fn iter(&self) -> BatchIter<'a> {
        BatchIter {
            left: self.count,
            cur: Cursor::new(self.body),
        }
    }
}

/// Iterator over a batch's sub-operations.
#[derive(Debug)]
pub struct BatchIter<'a> {
    left: u32,
    cur: Cursor<'a>,
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<SubOp<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = decode_subop(&mut self.cur);
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

fn decode_subop<'a>(c: &mut Cursor<'a>) -> Result<SubOp<'a>, DecodeError> {
    let kind = c.u16()?;
    let at = c.target()?;
    Ok(match kind {
        op::READ => SubOp::Read { at, len: c.u32()? },
        op::WRITE => {
            let n = c.u32()? as usize;
            SubOp::Write {
                at,
                data: c.bytes(n)?,
            }
        }
        op::CAS => SubOp::Cas {
            at,
            expected: c.u64()?,
            new: c.u64()?,
        },
        op::FAA => SubOp::Faa {
            at,
            delta: c.u64()?,
        },
        other => return Err(DecodeError::UnknownKind(other)),
    })
}

/// Decodes a request frame's payload.
pub fn decode_request(kind: u16, payload: &[u8]) -> Result<Request<'_>, DecodeError> {
    let mut c = Cursor::new(payload);
    let req = match kind {
        op::HELLO => {
            let magic = c.bytes(4)?;
            if magic != MAGIC {
                return Err(DecodeError::BadMagic);
            }
            let version = c.u16()?;
            if version != VERSION {
                // Another version's handshake may be laid out differently:
                // only its version is read, so that the server can say why
                // it refuses it.
                return Err(DecodeError::OtherVersion(version));
            }
            Request::Hello {
                version,
                admin_key: c.u64()?,
                session: c.u64()?,
                cap: (c.u64()?, c.u64()?),
            }
        }
        op::READ => Request::Read {
            at: c.target()?,
            len: c.u32()?,
        },
        op::WRITE => {
            let at = c.target()?;
            return Ok(Request::Write { at, data: c.rest() });
        }
        op::CAS => Request::Cas {
            at: c.target()?,
            expected: c.u64()?,
            new: c.u64()?,
            rid: c.u64()?,
        },
        op::FAA => Request::Faa {
            at: c.target()?,
            delta: c.u64()?,
            rid: c.u64()?,
        },
        op::SWAP => {
            let at = c.target()?;
            let rid = c.u64()?;
            return Ok(Request::Swap {
                at,
                rid,
                data: c.rest(),
            });
        }
        op::XOR => {
            let at = c.target()?;
            let rid = c.u64()?;
            return Ok(Request::Xor {
                at,
                rid,
                data: c.rest(),
            });
        }
        op::COMMIT => Request::Commit {
            at: c.target()?,
            rid: c.u64()?,
        },
        op::OFFLOAD => Request::Offload {
            at: c.target()?,
            op: OffloadOp::decode(&mut c)?,
        },
        op::BATCH => {
            let count = c.u32()?;
            if count > MAX_BATCH_OPS {
                return Err(DecodeError::TooManyOps(count));
            }
            return Ok(Request::Batch(BatchOps {
                count,
                body: c.rest(),
            }));
        }
        op::CREATE_SLAB => Request::CreateSlab {
            slab: c.u64()?,
            key: c.u64()?,
            owner: c.u64()?,
        },
        op::DROP_SLAB => Request::DropSlab { slab: c.u64()? },
        op::THAW_SLAB => Request::ThawSlab {
            slab: c.u64()?,
            new_key: c.u64()?,
        },
        op::LIST_SLABS => Request::ListSlabs {
            after: c.u64()?,
            max: c.u32()?,
        },
        op::COPY_SLAB => {
            let slab = c.u64()?;
            let dest_slab = c.u64()?;
            let dest_key = c.u64()?;
            let n = c.u16()? as usize;
            let addr = std::str::from_utf8(c.bytes(n)?).map_err(|_| DecodeError::BadUtf8)?;
            Request::CopySlab {
                slab,
                dest_slab,
                dest_key,
                dest_addr: addr,
            }
        }
        op::FREEZE_SLAB => Request::FreezeSlab { slab: c.u64()? },
        op::READ_SLAB => Request::ReadSlab {
            slab: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        },
        op::STATS => Request::Stats,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    c.finish()?;
    Ok(req)
}

/// Appends a complete request frame to `out`.
pub fn encode_request(out: &mut Vec<u8>, id: u64, req: &Request<'_>) {
    match req {
        Request::Hello {
            version,
            admin_key,
            session,
            cap,
        } => {
            put_header(out, id, op::HELLO, 38);
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&admin_key.to_le_bytes());
            out.extend_from_slice(&session.to_le_bytes());
            out.extend_from_slice(&cap.0.to_le_bytes());
            out.extend_from_slice(&cap.1.to_le_bytes());
        }
        Request::Read { at, len } => {
            put_header(out, id, op::READ, 28);
            put_target(out, at);
            out.extend_from_slice(&len.to_le_bytes());
        }
        Request::Write { at, data } => {
            put_header(out, id, op::WRITE, 24 + data.len());
            put_target(out, at);
            crate::copy::extend(out, data);
        }
        Request::Cas {
            at,
            expected,
            new,
            rid,
        } => {
            put_header(out, id, op::CAS, 48);
            put_target(out, at);
            out.extend_from_slice(&expected.to_le_bytes());
            out.extend_from_slice(&new.to_le_bytes());
            out.extend_from_slice(&rid.to_le_bytes());
        }
        Request::Faa { at, delta, rid } => {
            put_header(out, id, op::FAA, 40);
            put_target(out, at);
            out.extend_from_slice(&delta.to_le_bytes());
            out.extend_from_slice(&rid.to_le_bytes());
        }
        Request::Swap { at, rid, data } => {
            put_header(out, id, op::SWAP, 32 + data.len());
            put_target(out, at);
            out.extend_from_slice(&rid.to_le_bytes());
            crate::copy::extend(out, data);
        }
        Request::Xor { at, rid, data } => {
            put_header(out, id, op::XOR, 32 + data.len());
            put_target(out, at);
            out.extend_from_slice(&rid.to_le_bytes());
            crate::copy::extend(out, data);
        }
        Request::Commit { at, rid } => {
            put_header(out, id, op::COMMIT, 32);
            put_target(out, at);
            out.extend_from_slice(&rid.to_le_bytes());
        }
        Request::Offload { at, op: o } => {
            put_header(out, id, op::OFFLOAD, 24 + o.encoded_len());
            put_target(out, at);
            o.put(out);
        }
        Request::Batch(ops) => {
            put_header(out, id, op::BATCH, 4 + ops.body.len());
            out.extend_from_slice(&ops.count.to_le_bytes());
            crate::copy::extend(out, ops.body);
        }
        Request::CreateSlab { slab, key, owner } => {
            put_header(out, id, op::CREATE_SLAB, 24);
            out.extend_from_slice(&slab.to_le_bytes());
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&owner.to_le_bytes());
        }
        Request::DropSlab { slab } => {
            put_header(out, id, op::DROP_SLAB, 8);
            out.extend_from_slice(&slab.to_le_bytes());
        }
        Request::ThawSlab { slab, new_key } => {
            put_header(out, id, op::THAW_SLAB, 16);
            out.extend_from_slice(&slab.to_le_bytes());
            out.extend_from_slice(&new_key.to_le_bytes());
        }
        Request::ListSlabs { after, max } => {
            put_header(out, id, op::LIST_SLABS, 12);
            out.extend_from_slice(&after.to_le_bytes());
            out.extend_from_slice(&max.to_le_bytes());
        }
        Request::CopySlab {
            slab,
            dest_slab,
            dest_key,
            dest_addr,
        } => {
            let a = dest_addr.as_bytes();
            let a = &a[..a.len().min(u16::MAX as usize)];
            put_header(out, id, op::COPY_SLAB, 26 + a.len());
            out.extend_from_slice(&slab.to_le_bytes());
            out.extend_from_slice(&dest_slab.to_le_bytes());
            out.extend_from_slice(&dest_key.to_le_bytes());
            out.extend_from_slice(&(a.len() as u16).to_le_bytes());
            out.extend_from_slice(a);
        }
        Request::FreezeSlab { slab } => {
            put_header(out, id, op::FREEZE_SLAB, 8);
            out.extend_from_slice(&slab.to_le_bytes());
        }
        Request::ReadSlab { slab, offset, len } => {
            put_header(out, id, op::READ_SLAB, 20);
            out.extend_from_slice(&slab.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Request::Stats => put_header(out, id, op::STATS, 0),
    }
}

pub(crate) fn put_target(out: &mut Vec<u8>, at: &Target) {
    out.extend_from_slice(&at.slab.to_le_bytes());
    out.extend_from_slice(&at.key.to_le_bytes());
    out.extend_from_slice(&at.offset.to_le_bytes());
}

/// Builds the body of a batch request, one sub-operation at a time.
#[derive(Debug, Default, Clone)]
pub struct BatchBuilder {
    count: u32,
    body: Vec<u8>,
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of sub-operations added.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size of the batch frame so far.
    pub fn frame_len(&self) -> usize {
        crate::frame::HEADER_LEN + 4 + self.body.len()
    }

    /// Adds a sub-operation.
    pub fn push(&mut self, sub: &SubOp<'_>) {
        self.count += 1;
        let b = &mut self.body;
        match sub {
            SubOp::Read { at, len } => {
                b.extend_from_slice(&op::READ.to_le_bytes());
                put_target(b, at);
                b.extend_from_slice(&len.to_le_bytes());
            }
            SubOp::Write { at, data } => {
                b.extend_from_slice(&op::WRITE.to_le_bytes());
                put_target(b, at);
                b.extend_from_slice(&(data.len() as u32).to_le_bytes());
                crate::copy::extend(b, data);
            }
            SubOp::Cas { at, expected, new } => {
                b.extend_from_slice(&op::CAS.to_le_bytes());
                put_target(b, at);
                b.extend_from_slice(&expected.to_le_bytes());
                b.extend_from_slice(&new.to_le_bytes());
            }
            SubOp::Faa { at, delta } => {
                b.extend_from_slice(&op::FAA.to_le_bytes());
                put_target(b, at);
                b.extend_from_slice(&delta.to_le_bytes());
            }
        }
    }

    /// The request to encode with [`encode_request`].
    pub fn as_request(&self) -> Request<'_> {
        Request::Batch(BatchOps {
            count: self.count,
            body: &self.body,
        })
    }
}

/// A reply from a memory server, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Handshake accepted.
    HelloOk {
        /// Protocol version the server speaks.
        version: u16,
        /// Server's id.
        server_id: u64,
        /// Slab size in bytes (0 until the server has registered).
        slab_size: u64,
        /// Largest frame the server accepts.
        max_frame: u32,
        /// The server closes this connection after this many milliseconds
        /// without a request (0: never); a client opens a new connection
        /// rather than use one idle for half of it.
        idle_ms: u32,
    },
    /// Bytes read.
    Data(&'a [u8]),
    /// Done, no result.
    Done,
    /// Previous value of an atomic.
    Value(u64),
    /// Batch results; iterate with [`BatchResults`].
    Batch(BatchResults<'a>),
    /// Statistics.
    Stats(ServerStats),
    /// A typed error.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: &'a str,
    },
}

/// Statistics a memory server reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Slab size in bytes.
    pub slab_size: u64,
    /// Slabs the capacity holds.
    pub slabs_total: u64,
    /// Slabs in use.
    pub slabs_used: u64,
    /// Bytes served by reads since start.
    pub bytes_read: u64,
    /// Bytes received by writes since start.
    pub bytes_written: u64,
    /// Data operations executed since start.
    pub ops: u64,
    /// Open connections.
    pub connections: u64,
}

const STATS_LEN: usize = 8 * 8;

impl ServerStats {
    fn put(&self, out: &mut Vec<u8>) {
        for v in [
            self.capacity,
            self.slab_size,
            self.slabs_total,
            self.slabs_used,
            self.bytes_read,
            self.bytes_written,
            self.ops,
            self.connections,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn get(c: &mut Cursor<'_>) -> Result<Self, DecodeError> {
        Ok(ServerStats {
            capacity: c.u64()?,
            slab_size: c.u64()?,
            slabs_total: c.u64()?,
            slabs_used: c.u64()?,
            bytes_read: c.u64()?,
            bytes_written: c.u64()?,
            ops: c.u64()?,
            connections: c.u64()?,
        })
    }
}

/// One result inside a batch reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubResult<'a> {
    /// Bytes read.
    Data(&'a [u8]),
    /// Write done.
    Done,
    /// Previous value of an atomic.
    Value(u64),
    /// The sub-operation failed (the others still ran).
    Error(ErrorCode),
}

/// Lazily decoded results of a batch reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchResults<'a> {
    count: u32,
    body: &'a [u8],
}

impl<'a> BatchResults<'a> {
    /// Number of results.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True when the batch was empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates the results; stops after the first malformed one.
    pub fn iter(&self) -> impl Iterator<Item = Result<SubResult<'a>, DecodeError>> + 'a {
        let mut left = self.count;
        let mut c = Cursor::new(self.body);
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let r = (|| {
                Ok(match c.u16()? {
                    reply::DATA => {
                        let n = c.u32()? as usize;
                        SubResult::Data(c.bytes(n)?)
                    }
                    reply::DONE => SubResult::Done,
                    reply::VALUE => SubResult::Value(c.u64()?),
                    reply::ERROR => SubResult::Error(ErrorCode::from_u16(c.u16()?)),
                    other => return Err(DecodeError::UnknownKind(other)),
                })
            })();
            if r.is_err() {
                left = 0;
            }
            Some(r)
        })
    }
}

/// Writes a batch reply incrementally (server side).
#[derive(Debug)]
pub struct BatchReplyWriter {
    start: usize,
    count_at: usize,
    count: u32,
}

impl BatchReplyWriter {
    /// Starts a batch reply frame in `out`.
    pub fn begin(out: &mut Vec<u8>, id: u64) -> Self {
        let start = begin_frame(out, id, reply::BATCH);
        let count_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        BatchReplyWriter {
            start,
            count_at,
            count: 0,
        }
    }

    /// Appends a data result; `fill` writes exactly `len` bytes into the slice it gets.
    pub fn data(&mut self, out: &mut Vec<u8>, len: usize, fill: impl FnOnce(&mut [u8])) {
        self.count += 1;
        out.extend_from_slice(&reply::DATA.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        let at = out.len();
        out.resize(at + len, 0);
        fill(&mut out[at..]);
    }

    /// Appends a "done" result.
    pub fn done(&mut self, out: &mut Vec<u8>) {
        self.count += 1;
        out.extend_from_slice(&reply::DONE.to_le_bytes());
    }

    /// Appends a value result.
    pub fn value(&mut self, out: &mut Vec<u8>, v: u64) {
        self.count += 1;
        out.extend_from_slice(&reply::VALUE.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends an error result.
    pub fn error(&mut self, out: &mut Vec<u8>, code: ErrorCode) {
        self.count += 1;
        out.extend_from_slice(&reply::ERROR.to_le_bytes());
        out.extend_from_slice(&code.as_u16().to_le_bytes());
    }

    /// Patches count and length.
    pub fn finish(self, out: &mut [u8]) {
        out[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        finish_frame(out, self.start);
    }
}

/// Decodes a reply frame's payload.
pub fn decode_reply(kind: u16, payload: &[u8]) -> Result<Reply<'_>, DecodeError> {
    let mut c = Cursor::new(payload);
    let r = match kind {
        reply::HELLO_OK => Reply::HelloOk {
            version: c.u16()?,
            server_id: c.u64()?,
            slab_size: c.u64()?,
            max_frame: c.u32()?,
            idle_ms: c.u32()?,
        },
        reply::DATA => return Ok(Reply::Data(c.rest())),
        reply::DONE => Reply::Done,
        reply::VALUE => Reply::Value(c.u64()?),
        reply::BATCH => {
            let count = c.u32()?;
            if count > MAX_BATCH_OPS {
                return Err(DecodeError::TooManyOps(count));
            }
            return Ok(Reply::Batch(BatchResults {
                count,
                body: c.rest(),
            }));
        }
        reply::STATS => Reply::Stats(ServerStats::get(&mut c)?),
        reply::ERROR => {
            let code = ErrorCode::from_u16(c.u16()?);
            let n = c.u16()? as usize;
            let message = std::str::from_utf8(c.bytes(n)?).map_err(|_| DecodeError::BadUtf8)?;
            Reply::Error { code, message }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    c.finish()?;
    Ok(r)
}

/// Appends a complete reply frame to `out`.
pub fn encode_reply(out: &mut Vec<u8>, id: u64, r: &Reply<'_>) {
    match r {
        Reply::HelloOk {
            version,
            server_id,
            slab_size,
            max_frame,
            idle_ms,
        } => {
            put_header(out, id, reply::HELLO_OK, 26);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&server_id.to_le_bytes());
            out.extend_from_slice(&slab_size.to_le_bytes());
            out.extend_from_slice(&max_frame.to_le_bytes());
            out.extend_from_slice(&idle_ms.to_le_bytes());
        }
        Reply::Data(d) => {
            put_header(out, id, reply::DATA, d.len());
            crate::copy::extend(out, d);
        }
        Reply::Done => put_header(out, id, reply::DONE, 0),
        Reply::Value(v) => {
            put_header(out, id, reply::VALUE, 8);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Reply::Batch(b) => {
            put_header(out, id, reply::BATCH, 4 + b.body.len());
            out.extend_from_slice(&b.count.to_le_bytes());
            crate::copy::extend(out, b.body);
        }
        Reply::Stats(s) => {
            put_header(out, id, reply::STATS, STATS_LEN);
            s.put(out);
        }
        Reply::Error { code, message } => put_error(out, id, *code, message),
    }
}

/// Appends an error reply frame (message truncated to 1 KiB).
pub fn put_error(out: &mut Vec<u8>, id: u64, code: ErrorCode, message: &str) {
    let mut cut = message.len().min(1024);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let m = &message[..cut];
    put_header(out, id, reply::ERROR, 4 + m.len());
    out.extend_from_slice(&code.as_u16().to_le_bytes());
    out.extend_from_slice(&(m.len() as u16).to_le_bytes());
    out.extend_from_slice(m.as_bytes());
}

/// Appends the header of a DATA reply of `len` bytes; the caller appends the bytes.
pub fn put_data_header(out: &mut Vec<u8>, id: u64, len: usize) {
    put_header(out, id, reply::DATA, len);
}

/// Encodes a handshake request with this crate's version, authenticated
/// by the admin key or by a slab capability `cap` (slab id, key).
pub fn hello(out: &mut Vec<u8>, id: u64, admin_key: u64, session: u64, cap: (u64, u64)) {
    encode_request(
        out,
        id,
        &Request::Hello {
            version: VERSION,
            admin_key,
            session,
            cap,
        },
    );
}

/// A bounds-checked little-endian reader over a byte slice.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn target(&mut self) -> Result<Target, DecodeError> {
        Ok(Target {
            slab: self.u64()?,
            key: self.u64()?,
            offset: self.u64()?,
        })
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use proptest::prelude::*;

    fn one_frame(bytes: &[u8]) -> (u64, u16, Vec<u8>) {
        let mut d = FrameDecoder::new(1 << 20);
        d.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        d.filled(bytes.len());
        let total = d.buffered();
        let f = d.peek().unwrap().unwrap();
        assert_eq!(total, f.payload.len() + crate::frame::HEADER_LEN);
        (f.id, f.kind, f.payload.to_vec())
    }

    fn target() -> impl Strategy<Value = Target> {
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(slab, key, offset)| Target {
            slab,
            key,
            offset,
        })
    }

    proptest! {
        #[test]
        fn decode_request_arbitrary(kind in 0u16..0x20, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Request::Batch(b)) = decode_request(kind, &payload) {
                for s in b.iter() { let _ = s; }
            }
        }

        #[test]
        fn decode_offload_arbitrary(at in target(), op in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..80)) {
            // A valid target and operation code, then anything: every
            // operation's decoder sees arbitrary fields; what decodes
            // re-encodes to the same bytes.
            let mut p = Vec::new();
            put_target(&mut p, &at);
            p.push(op % 7);
            p.extend_from_slice(&payload);
            if let Ok(r) = decode_request(op::OFFLOAD, &p) {
                let Request::Offload { op: o, .. } = r else { panic!("not an offload") };
                let _ = (o.validate(), o.extent(), o.alignment(), o.reply_bound());
                let mut out = Vec::new();
                encode_request(&mut out, 1, &r);
                prop_assert_eq!(&out[crate::frame::HEADER_LEN..], &p[..]);
            }
        }

        #[test]
        fn decode_reply_arbitrary(kind in 0x80u16..0x100, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Reply::Batch(b)) = decode_reply(kind, &payload) {
                for s in b.iter() { let _ = s; }
            }
        }

        #[test]
        fn request_roundtrip(id in any::<u64>(), at in target(), data in proptest::collection::vec(any::<u8>(), 0..100), a in any::<u64>(), b in any::<u64>(), len in any::<u32>()) {
            let (x, y, z) = (a as u8, (a >> 8) as u16, (b >> 16) as u16);
            let reqs = [
                Request::Offload { at, op: OffloadOp::Aggregate { elem: x, count: len } },
                Request::Offload { at, op: OffloadOp::Filter { elem: x, count: len, cmp: b as u8, operand: a, max_out: len ^ 5, out: z as u8 } },
                Request::Offload { at, op: OffloadOp::Probe { bucket_len: len, slots: x, key_len: y, val_len: z, max_buckets: y ^ z, fingerprint: b as u8, key: &data } },
                Request::Offload { at, op: OffloadOp::Chase { slab_base: b, next_off: y, node_len: z, hops: y ^ 3 } },
                Request::Offload { at, op: OffloadOp::Copy { dest: Target { slab: b, key: a, offset: a ^ b }, len } },
                Request::Hello { version: crate::VERSION, admin_key: a, session: b, cap: (b, a) },
                Request::Read { at, len },
                Request::Write { at, data: &data },
                Request::Swap { at, rid: a, data: &data },
                Request::Xor { at, rid: b, data: &data },
                Request::Commit { at, rid: b },
                Request::Cas { at, expected: a, new: b, rid: a ^ 1 },
                Request::Faa { at, delta: a, rid: b },
                Request::CreateSlab { slab: a, key: b, owner: a ^ b },
                Request::DropSlab { slab: a },
                Request::ThawSlab { slab: b, new_key: a },
                Request::ListSlabs { after: a, max: len },
                Request::CopySlab { slab: a, dest_slab: b, dest_key: a ^ b, dest_addr: "127.0.0.1:99" },
                Request::ReadSlab { slab: a, offset: b, len },
                Request::FreezeSlab { slab: a },
                Request::Stats,
            ];
            for r in reqs {
                let mut out = Vec::new();
                encode_request(&mut out, id, &r);
                let (gid, kind, payload) = one_frame(&out);
                prop_assert_eq!(gid, id);
                prop_assert_eq!(decode_request(kind, &payload).unwrap(), r);
            }
        }

        #[test]
        fn batch_roundtrip(ops in proptest::collection::vec((0u8..4, target(), proptest::collection::vec(any::<u8>(), 0..20), any::<u64>()), 0..20)) {
            let subs: Vec<SubOp<'_>> = ops.iter().map(|(k, at, d, v)| match k {
                0 => SubOp::Read { at: *at, len: *v as u32 },
                1 => SubOp::Write { at: *at, data: d },
                2 => SubOp::Cas { at: *at, expected: *v, new: !*v },
                _ => SubOp::Faa { at: *at, delta: *v },
            }).collect();
            let mut bb = BatchBuilder::new();
            for s in &subs { bb.push(s); }
            let mut out = Vec::new();
            encode_request(&mut out, 9, &bb.as_request());
            prop_assert_eq!(out.len(), bb.frame_len());
            let (_, kind, payload) = one_frame(&out);
            let Request::Batch(b) = decode_request(kind, &payload).unwrap() else { panic!("not a batch") };
            let got: Vec<SubOp<'_>> = b.iter().map(|r| r.unwrap()).collect();
            prop_assert_eq!(got, subs);
        }

        #[test]
        fn batch_reply_roundtrip(vals in proptest::collection::vec((0u8..4, any::<u64>()), 0..30)) {
            let mut out = Vec::new();
            let mut w = BatchReplyWriter::begin(&mut out, 5);
            for (k, v) in &vals {
                match k {
                    0 => w.data(&mut out, (*v % 17) as usize, |b| b.fill(*v as u8)),
                    1 => w.done(&mut out),
                    2 => w.value(&mut out, *v),
                    _ => w.error(&mut out, ErrorCode::OutOfRange),
                }
            }
            w.finish(&mut out);
            let (id, kind, payload) = one_frame(&out);
            prop_assert_eq!(id, 5);
            let Reply::Batch(b) = decode_reply(kind, &payload).unwrap() else { panic!("not a batch") };
            let got: Vec<_> = b.iter().map(|r| r.unwrap()).collect();
            prop_assert_eq!(got.len(), vals.len());
            for (g, (k, v)) in got.iter().zip(&vals) {
                match k {
                    0 => prop_assert_eq!(*g, SubResult::Data(&vec![*v as u8; (*v % 17) as usize])),
                    1 => prop_assert_eq!(*g, SubResult::Done),
                    2 => prop_assert_eq!(*g, SubResult::Value(*v)),
                    _ => prop_assert_eq!(*g, SubResult::Error(ErrorCode::OutOfRange)),
                }
            }
        }

        #[test]
        fn reply_roundtrip(id in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..100), v in any::<u64>()) {
            let stats = ServerStats { capacity: v, slab_size: 1, slabs_total: 2, slabs_used: 3, bytes_read: 4, bytes_written: 5, ops: 6, connections: 7 };
            let replies = [
                Reply::HelloOk { version: 1, server_id: v, slab_size: v / 3, max_frame: 77, idle_ms: 5 },
                Reply::Data(&data),
                Reply::Done,
                Reply::Value(v),
                Reply::Stats(stats),
                Reply::Error { code: ErrorCode::BadCapability, message: "nope" },
            ];
            for r in replies {
                let mut out = Vec::new();
                encode_reply(&mut out, id, &r);
                let (gid, kind, payload) = one_frame(&out);
                prop_assert_eq!(gid, id);
                prop_assert_eq!(decode_reply(kind, &payload).unwrap(), r);
            }
        }
    }

    #[test]
    fn error_message_is_truncated_on_char_boundary() {
        let msg = "é".repeat(600);
        let mut out = Vec::new();
        put_error(&mut out, 1, ErrorCode::Internal, &msg);
        let (_, kind, payload) = one_frame(&out);
        match decode_reply(kind, &payload).unwrap() {
            Reply::Error { message, .. } => assert!(message.len() <= 1024),
            other => panic!("unexpected {other:?}"),
        }
    }
}
