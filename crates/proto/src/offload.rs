//! Offloaded operations: small computations a memory server runs next to a
//! slab's bytes, so that a scan, a hash-table probe, a list walk or a copy
//! costs one round trip instead of moving the bytes to the client.
//!
//! An `OFFLOAD` request ([`crate::data::op::OFFLOAD`]) carries a target and
//! one [`OffloadOp`]. Every operation reads only the target's slab (a copy
//! also writes a second slab on the same server), scans at most
//! [`MAX_OFFLOAD_SCAN`] bytes, and is refused if its largest possible reply
//! ([`OffloadOp::reply_bound`]) would not fit in a frame. This module owns
//! the operations' byte layout (documented in `docs/protocol.md`), the
//! parameter checks client and server share ([`OffloadOp::validate`]), and
//! the decoders of the replies.
//!
//! Elements are little-endian integers of one of four types ([`elem`]).
//! Values cross the wire *widened* to 64 bits: unsigned types zero-extended,
//! signed ones sign-extended, as the two's-complement bits of the `u64` or
//! `i64` (an `i32` of −1 is `u64::MAX`). Sums wrap in 64 bits; comparisons
//! of signed types are signed.

use crate::data::{put_target, Cursor, Target};
use crate::DecodeError;

/// Most slab bytes one offloaded operation may scan (aggregate and filter:
/// `count × width`; probe: `max_buckets × bucket_len`; chase:
/// `hops × node_len`).
pub const MAX_OFFLOAD_SCAN: u64 = 16 << 20;
/// Most bytes one offloaded copy may move.
pub const MAX_OFFLOAD_COPY: u32 = 16 << 20;
/// Most nodes one chase may return.
pub const MAX_CHASE_HOPS: u16 = 4096;
/// Most buckets one probe may visit.
pub const MAX_PROBE_BUCKETS: u16 = 1024;
/// Most slots in one hash bucket (one fingerprint byte each, in 8 bytes).
pub const MAX_PROBE_SLOTS: u8 = 8;
/// The next-node offset that ends a list (and the `next` of a chase that
/// reached the end).
pub const CHASE_END: u64 = u64::MAX;

/// Operation codes inside an `OFFLOAD` request.
pub mod kind {
    /// [`super::OffloadOp::Aggregate`].
    pub const AGGREGATE: u8 = 1;
    /// [`super::OffloadOp::Filter`].
    pub const FILTER: u8 = 2;
    /// [`super::OffloadOp::Probe`].
    pub const PROBE: u8 = 3;
    /// [`super::OffloadOp::Chase`].
    pub const CHASE: u8 = 4;
    /// [`super::OffloadOp::Copy`].
    pub const COPY: u8 = 5;
}

/// Element type codes of aggregates and filters.
pub mod elem {
    /// Unsigned 64-bit.
    pub const U64: u8 = 1;
    /// Signed 64-bit.
    pub const I64: u8 = 2;
    /// Unsigned 32-bit.
    pub const U32: u8 = 3;
    /// Signed 32-bit.
    pub const I32: u8 = 4;

    /// Bytes per element of type `code`, if it is one.
    pub fn width(code: u8) -> Option<u64> {
        match code {
            U64 | I64 => Some(8),
            U32 | I32 => Some(4),
            _ => None,
        }
    }

    /// True for the signed types.
    pub fn signed(code: u8) -> bool {
        matches!(code, I64 | I32)
    }

    /// The widened value (as `u64` bits) of one little-endian element of
    /// type `code` held in `bytes` (4 or 8 of them); `None` if the length
    /// does not match the type.
    pub fn widen(code: u8, bytes: &[u8]) -> Option<u64> {
        let mut w = [0u8; 8];
        match (code, bytes.len()) {
            (U64 | I64, 8) => w.copy_from_slice(bytes),
            (U32, 4) => w[..4].copy_from_slice(bytes),
            (I32, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(bytes);
                return Some(i32::from_le_bytes(b) as i64 as u64);
            }
            _ => return None,
        }
        Some(u64::from_le_bytes(w))
    }
}

/// Comparisons of filters: `element <op> operand`.
pub mod cmp {
    /// `<`
    pub const LT: u8 = 1;
    /// `<=`
    pub const LE: u8 = 2;
    /// `==`
    pub const EQ: u8 = 3;
    /// `!=`
    pub const NE: u8 = 4;
    /// `>=`
    pub const GE: u8 = 5;
    /// `>`
    pub const GT: u8 = 6;

    /// Whether the widened element `v` of type `elem` satisfies
    /// `v <cmp> operand`, as a server's filter decides it (signed
    /// comparison for the signed types); false for unknown codes.
    pub fn holds(elem: u8, cmp: u8, v: u64, operand: u64) -> bool {
        let o = if super::elem::signed(elem) {
            (v as i64).cmp(&(operand as i64))
        } else {
            v.cmp(&operand)
        };
        match cmp {
            LT => o.is_lt(),
            LE => o.is_le(),
            EQ => o.is_eq(),
            NE => o.is_ne(),
            GE => o.is_ge(),
            GT => o.is_gt(),
            _ => false,
        }
    }
}

/// What a filter returns besides its counts.
pub mod output {
    /// Counts only (`max_out` is ignored).
    pub const COUNT: u8 = 0;
    /// The matches' element indices (`u32`, relative to the target offset).
    pub const INDICES: u8 = 1;
    /// The matches' values, each in the element's own width.
    pub const VALUES: u8 = 2;
}

/// Fingerprint bytes of hash-bucket slots (any other value, 2 to 255, is
/// an occupied slot's fingerprint).
pub mod fp {
    /// Never used: a probe that meets one in a bucket stops there.
    pub const EMPTY: u8 = 0;
    /// Deleted: skipped, and the probe goes on to the next bucket.
    pub const DELETED: u8 = 1;
}

/// Outcomes of a probe.
pub mod probe {
    /// The key is in the table; the reply carries its slot and value.
    pub const FOUND: u8 = 0;
    /// A bucket with an empty slot did not hold the key: it is absent.
    pub const ABSENT: u8 = 1;
    /// `max_buckets` were probed, or the next bucket would cross the slab's
    /// end, without an answer: go on from the next bucket.
    pub const UNFINISHED: u8 = 2;
}

/// An operation a memory server runs on a slab's bytes, starting at the
/// request target's offset. All integers little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadOp<'a> {
    /// Sum, minimum, maximum and count of `count` elements of type `elem`
    /// (the target offset a multiple of the element's width). Reply DATA:
    /// [`AggregateReply`].
    Aggregate {
        /// Element type ([`elem`]).
        elem: u8,
        /// Elements (at least 1).
        count: u32,
    },
    /// Scans up to `count` elements in order for those with
    /// `element <cmp> operand`, stopping after `max_out` matches (unless
    /// `out` is [`output::COUNT`]). Reply DATA: [`FilterReply`].
    Filter {
        /// Element type ([`elem`]).
        elem: u8,
        /// Elements (at least 1).
        count: u32,
        /// Comparison ([`cmp`]).
        cmp: u8,
        /// Widened operand bits (see the module docs).
        operand: u64,
        /// Most matches to return (at least 1 unless `out` is COUNT).
        max_out: u32,
        /// What to return ([`output`]).
        out: u8,
    },
    /// Looks `key` up in a bucketized hash table whose buckets of
    /// `bucket_len` bytes start at the target offset: each bucket is 8
    /// fingerprint bytes (slot `i`'s at byte `i`; see [`fp`]), then `slots`
    /// entries, entry `i` at byte `8 + i × (key_len + val_len)`, its key then
    /// its value. Slots whose fingerprint equals `fingerprint` have their
    /// key compared; a bucket with an empty slot ends the probe; otherwise
    /// it goes on to the next bucket, up to `max_buckets` and never past
    /// the slab's end. Reply DATA: [`ProbeReply`].
    Probe {
        /// Bytes per bucket (at least `8 + slots × (key_len + val_len)`).
        bucket_len: u32,
        /// Slots per bucket (1 to [`MAX_PROBE_SLOTS`]).
        slots: u8,
        /// Key bytes per entry (`key.len()`).
        key_len: u16,
        /// Value bytes per entry.
        val_len: u16,
        /// Most buckets to visit (1 to [`MAX_PROBE_BUCKETS`]).
        max_buckets: u16,
        /// The key's fingerprint (at least 2).
        fingerprint: u8,
        /// The key.
        key: &'a [u8],
    },
    /// Follows a linked list: the node at the target offset is `node_len`
    /// bytes and holds, at byte `next_off`, the region offset of the next
    /// node ([`CHASE_END`] ends the list). The server maps a region offset
    /// `r` to slab offset `r − slab_base` and stops at the list's end,
    /// after `hops` nodes, or at a node outside this slab. Reply DATA:
    /// [`ChaseReply`].
    Chase {
        /// Region offset of the slab's first byte (a client sets it).
        slab_base: u64,
        /// Where in a node its next offset is (`next_off + 8 <= node_len`).
        next_off: u16,
        /// Bytes per node.
        node_len: u16,
        /// Most nodes to return (1 to [`MAX_CHASE_HOPS`]).
        hops: u16,
    },
    /// Copies `len` bytes from the target to `dest`, a slab on the same
    /// server (its key checked as for a write; the same slab is allowed,
    /// overlapping ranges behave like `memmove`). Reply DONE.
    Copy {
        /// Destination.
        dest: Target,
        /// Bytes (1 to [`MAX_OFFLOAD_COPY`]).
        len: u32,
    },
}

/// Why an offloaded operation's parameters are invalid (the server replies
/// `InvalidArgument` with this as the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// Unknown element type code.
    #[error("unknown element type {0} (1 u64, 2 i64, 3 u32, 4 i32)")]
    Elem(u8),
    /// Unknown comparison code.
    #[error("unknown comparison {0} (1 <, 2 <=, 3 ==, 4 !=, 5 >=, 6 >)")]
    Cmp(u8),
    /// Unknown filter output code.
    #[error("unknown filter output {0} (0 count, 1 indices, 2 values)")]
    Output(u8),
    /// A count that must be positive is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A parameter over its limit.
    #[error("{what} of {value} exceeds the maximum of {max}")]
    Limit {
        /// Which.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// Parameters that contradict each other.
    #[error("{0}")]
    Layout(&'static str),
}

fn limit(what: &'static str, value: u64, max: u64) -> Result<(), OffloadError> {
    if value > max {
        return Err(OffloadError::Limit { what, value, max });
    }
    Ok(())
}

fn positive(what: &'static str, value: u64) -> Result<(), OffloadError> {
    if value == 0 {
        return Err(OffloadError::Zero(what));
    }
    Ok(())
}

/// Width of elements of type `code`, or the error naming it.
fn width(code: u8) -> Result<u64, OffloadError> {
    elem::width(code).ok_or(OffloadError::Elem(code))
}

impl<'a> OffloadOp<'a> {
    /// The operation's code ([`kind`]).
    pub fn kind(&self) -> u8 {
        match self {
            OffloadOp::Aggregate { .. } => kind::AGGREGATE,
            OffloadOp::Filter { .. } => kind::FILTER,
            OffloadOp::Probe { .. } => kind::PROBE,
            OffloadOp::Chase { .. } => kind::CHASE,
            OffloadOp::Copy { .. } => kind::COPY,
        }
    }

    /// Checks the parameters on their own (not where the operation runs):
    /// codes known, counts positive, limits kept, layouts consistent.
    pub fn validate(&self) -> Result<(), OffloadError> {
        match *self {
            OffloadOp::Aggregate { elem, count } => {
                let w = width(elem)?;
                positive("count", count as u64)?;
                limit("scan (count × width)", count as u64 * w, MAX_OFFLOAD_SCAN)
            }
            OffloadOp::Filter {
                elem,
                count,
                cmp,
                max_out,
                out,
                ..
            } => {
                let w = width(elem)?;
                if !(cmp::LT..=cmp::GT).contains(&cmp) {
                    return Err(OffloadError::Cmp(cmp));
                }
                if out > output::VALUES {
                    return Err(OffloadError::Output(out));
                }
                positive("count", count as u64)?;
                if out != output::COUNT {
                    positive("max_out", max_out as u64)?;
                }
                limit("scan (count × width)", count as u64 * w, MAX_OFFLOAD_SCAN)
            }
            OffloadOp::Probe {
                bucket_len,
                slots,
                key_len,
                val_len,
                max_buckets,
                fingerprint,
                key,
            } => {
                positive("slots", slots as u64)?;
                limit("slots", slots as u64, MAX_PROBE_SLOTS as u64)?;
                positive("max_buckets", max_buckets as u64)?;
                limit("max_buckets", max_buckets as u64, MAX_PROBE_BUCKETS as u64)?;
                if fingerprint < 2 {
                    return Err(OffloadError::Layout(
                        "the fingerprint must be at least 2 (0 marks empty slots, 1 deleted ones)",
                    ));
                }
                if key.len() != key_len as usize {
                    return Err(OffloadError::Layout("the key is not key_len bytes long"));
                }
                if 8 + slots as u64 * (key_len as u64 + val_len as u64) > bucket_len as u64 {
                    return Err(OffloadError::Layout(
                        "8 fingerprint bytes and slots × (key_len + val_len) do not fit in bucket_len",
                    ));
                }
                limit(
                    "scan (max_buckets × bucket_len)",
                    max_buckets as u64 * bucket_len as u64,
                    MAX_OFFLOAD_SCAN,
                )
            }
            OffloadOp::Chase {
                next_off,
                node_len,
                hops,
                ..
            } => {
                positive("hops", hops as u64)?;
                limit("hops", hops as u64, MAX_CHASE_HOPS as u64)?;
                if next_off as u64 + 8 > node_len as u64 {
                    return Err(OffloadError::Layout(
                        "the next offset (8 bytes at next_off) does not fit in node_len",
                    ));
                }
                limit(
                    "scan (hops × node_len)",
                    hops as u64 * node_len as u64,
                    MAX_OFFLOAD_SCAN,
                )
            }
            OffloadOp::Copy { len, .. } => {
                positive("len", len as u64)?;
                limit("copy length", len as u64, MAX_OFFLOAD_COPY as u64)
            }
        }
    }

    /// Bytes from the target offset that must lie inside its slab: the
    /// elements of an aggregate or filter, a probe's first bucket, a
    /// chase's first node, the source of a copy. 0 for unknown elements.
    pub fn extent(&self) -> u64 {
        match *self {
            OffloadOp::Aggregate { elem, count } | OffloadOp::Filter { elem, count, .. } => {
                elem::width(elem).unwrap_or(0) * count as u64
            }
            OffloadOp::Probe { bucket_len, .. } => bucket_len as u64,
            OffloadOp::Chase { node_len, .. } => node_len as u64,
            OffloadOp::Copy { len, .. } => len as u64,
        }
    }

    /// What the target offset must be a multiple of: the element width of
    /// aggregates and filters, else 1.
    pub fn alignment(&self) -> u64 {
        match *self {
            OffloadOp::Aggregate { elem, .. } | OffloadOp::Filter { elem, .. } => {
                elem::width(elem).unwrap_or(1)
            }
            _ => 1,
        }
    }

    /// The most bytes the DATA reply can carry (0 for a copy, which
    /// replies DONE). The server refuses an operation whose bound exceeds
    /// its largest frame.
    pub fn reply_bound(&self) -> u64 {
        match *self {
            OffloadOp::Aggregate { .. } => AggregateReply::LEN as u64,
            OffloadOp::Filter {
                elem,
                count,
                max_out,
                out,
                ..
            } => {
                let item = match out {
                    output::INDICES => 4,
                    output::VALUES => elem::width(elem).unwrap_or(8),
                    _ => 0,
                };
                FilterReply::HEAD_LEN as u64 + item * count.min(max_out) as u64
            }
            OffloadOp::Probe { val_len, .. } => 4 + val_len as u64,
            OffloadOp::Chase { node_len, hops, .. } => {
                ChaseReply::HEAD_LEN as u64 + hops as u64 * node_len as u64
            }
            OffloadOp::Copy { .. } => 0,
        }
    }

    /// Encoded bytes after the request's target.
    pub(crate) fn encoded_len(&self) -> usize {
        1 + match self {
            OffloadOp::Aggregate { .. } => 5,
            OffloadOp::Filter { .. } => 19,
            OffloadOp::Probe { key, .. } => 12 + key.len(),
            OffloadOp::Chase { .. } => 14,
            OffloadOp::Copy { .. } => 28,
        }
    }

    /// Appends the encoding (after the request's target).
    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.push(self.kind());
        match *self {
            OffloadOp::Aggregate { elem, count } => {
                out.push(elem);
                out.extend_from_slice(&count.to_le_bytes());
            }
            OffloadOp::Filter {
                elem,
                count,
                cmp,
                operand,
                max_out,
                out: o,
            } => {
                out.push(elem);
                out.extend_from_slice(&count.to_le_bytes());
                out.push(cmp);
                out.extend_from_slice(&operand.to_le_bytes());
                out.extend_from_slice(&max_out.to_le_bytes());
                out.push(o);
            }
            OffloadOp::Probe {
                bucket_len,
                slots,
                key_len,
                val_len,
                max_buckets,
                fingerprint,
                key,
            } => {
                out.extend_from_slice(&bucket_len.to_le_bytes());
                out.push(slots);
                out.extend_from_slice(&key_len.to_le_bytes());
                out.extend_from_slice(&val_len.to_le_bytes());
                out.extend_from_slice(&max_buckets.to_le_bytes());
                out.push(fingerprint);
                out.extend_from_slice(key);
            }
            OffloadOp::Chase {
                slab_base,
                next_off,
                node_len,
                hops,
            } => {
                out.extend_from_slice(&slab_base.to_le_bytes());
                out.extend_from_slice(&next_off.to_le_bytes());
                out.extend_from_slice(&node_len.to_le_bytes());
                out.extend_from_slice(&hops.to_le_bytes());
            }
            OffloadOp::Copy { dest, len } => {
                put_target(out, &dest);
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }

    /// Decodes what [`OffloadOp::put`] wrote; a probe's key is the rest of
    /// the payload.
    pub(crate) fn decode(c: &mut Cursor<'a>) -> Result<Self, DecodeError> {
        Ok(match c.u8()? {
            kind::AGGREGATE => OffloadOp::Aggregate {
                elem: c.u8()?,
                count: c.u32()?,
            },
            kind::FILTER => OffloadOp::Filter {
                elem: c.u8()?,
                count: c.u32()?,
                cmp: c.u8()?,
                operand: c.u64()?,
                max_out: c.u32()?,
                out: c.u8()?,
            },
            kind::PROBE => OffloadOp::Probe {
                bucket_len: c.u32()?,
                slots: c.u8()?,
                key_len: c.u16()?,
                val_len: c.u16()?,
                max_buckets: c.u16()?,
                fingerprint: c.u8()?,
                key: c.rest(),
            },
            kind::CHASE => OffloadOp::Chase {
                slab_base: c.u64()?,
                next_off: c.u16()?,
                node_len: c.u16()?,
                hops: c.u16()?,
            },
            kind::COPY => OffloadOp::Copy {
                dest: c.target()?,
                len: c.u32()?,
            },
            other => return Err(DecodeError::UnknownOffload(other)),
        })
    }
}

/// The widened elements of a valid aggregate or filter `op` held in
/// `bytes` (exactly its `count` elements), or `None`.
fn elements<'b>(
    op: &OffloadOp<'_>,
    bytes: &'b [u8],
) -> Option<(u8, impl Iterator<Item = u64> + 'b)> {
    let (OffloadOp::Aggregate { elem, .. } | OffloadOp::Filter { elem, .. }) = *op else {
        return None;
    };
    if op.validate().is_err() || bytes.len() as u64 != op.extent() {
        return None;
    }
    let w = elem::width(elem)? as usize;
    Some((
        elem,
        bytes
            .chunks_exact(w)
            .map(move |b| elem::widen(elem, b).unwrap_or(0)),
    ))
}

/// What a server answers to the aggregate `op` over `bytes` (the `count`
/// elements from the target offset), computed here: for data a client
/// also holds, or to check a server. `None` unless `op` is a valid
/// aggregate of exactly these bytes.
pub fn aggregate_locally(op: &OffloadOp<'_>, bytes: &[u8]) -> Option<AggregateReply> {
    let (elem, mut it) = elements(op, bytes)?;
    let first = it.next()?;
    let signed = elem::signed(elem);
    let less = |a: u64, b: u64| {
        if signed {
            (a as i64) < (b as i64)
        } else {
            a < b
        }
    };
    let mut r = AggregateReply {
        sum: first,
        min: first,
        max: first,
        n: 1,
    };
    for v in it {
        r.sum = r.sum.wrapping_add(v);
        if less(v, r.min) {
            r.min = v;
        }
        if less(r.max, v) {
            r.max = v;
        }
        r.n += 1;
    }
    Some(r)
}

/// What a server's filter `op` finds in `bytes` (the `count` elements from
/// the target offset), computed here: the elements scanned and each
/// match's index and widened value (whatever `op`'s output, with its
/// stopping rule). `None` unless `op` is a valid filter of exactly these
/// bytes.
pub fn filter_locally(op: &OffloadOp<'_>, bytes: &[u8]) -> Option<(u32, Vec<(u32, u64)>)> {
    let OffloadOp::Filter {
        cmp,
        operand,
        max_out,
        out,
        ..
    } = *op
    else {
        return None;
    };
    let (elem, it) = elements(op, bytes)?;
    let mut scanned = 0;
    let mut hits = Vec::new();
    for (i, v) in it.enumerate() {
        scanned += 1;
        if cmp::holds(elem, cmp, v, operand) {
            hits.push((i as u32, v));
            if out != output::COUNT && hits.len() == max_out as usize {
                break;
            }
        }
    }
    Some((scanned, hits))
}

/// Reply of [`OffloadOp::Aggregate`]: `sum u64, min u64, max u64, n u64`,
/// each the widened bits (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateReply {
    /// Wrapping sum.
    pub sum: u64,
    /// Smallest element (signed comparison for signed types).
    pub min: u64,
    /// Largest element.
    pub max: u64,
    /// Elements aggregated.
    pub n: u64,
}

impl AggregateReply {
    /// Encoded bytes.
    pub const LEN: usize = 32;

    /// Appends the encoding.
    pub fn put(&self, out: &mut Vec<u8>) {
        for v in [self.sum, self.min, self.max, self.n] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Decodes a DATA reply.
    pub fn decode(d: &[u8]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(d);
        let r = AggregateReply {
            sum: c.u64()?,
            min: c.u64()?,
            max: c.u64()?,
            n: c.u64()?,
        };
        c.finish()?;
        Ok(r)
    }
}

/// Reply of [`OffloadOp::Filter`]: `scanned u32, matched u32`, then the
/// `matched` items: `u32` indices (output INDICES) or values in the
/// element's width (output VALUES), nothing for COUNT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterReply<'a> {
    /// Elements examined: all `count`, or up to and including the match
    /// that reached `max_out`.
    pub scanned: u32,
    /// Matches among them.
    pub matched: u32,
    items: &'a [u8],
    elem: u8,
    out: u8,
}

impl<'a> FilterReply<'a> {
    /// Bytes before the items.
    pub const HEAD_LEN: usize = 8;

    /// Writes the head into `buf` (its first [`FilterReply::HEAD_LEN`]
    /// bytes), for a reply whose items were appended after it.
    pub fn put_head(buf: &mut [u8], scanned: u32, matched: u32) {
        buf[..4].copy_from_slice(&scanned.to_le_bytes());
        buf[4..8].copy_from_slice(&matched.to_le_bytes());
    }

    /// Decodes a DATA reply to a filter of elements `elem` with output `out`.
    pub fn decode(d: &'a [u8], elem: u8, out: u8) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(d);
        let scanned = c.u32()?;
        let matched = c.u32()?;
        let item = match out {
            output::COUNT => 0,
            output::INDICES => 4,
            output::VALUES => elem::width(elem).ok_or(DecodeError::UnknownOffload(elem))? as usize,
            other => return Err(DecodeError::UnknownOffload(other)),
        };
        let items = c.bytes(item * matched as usize)?;
        c.finish()?;
        Ok(FilterReply {
            scanned,
            matched,
            items,
            elem,
            out,
        })
    }

    /// The items' raw bytes.
    pub fn items(&self) -> &'a [u8] {
        self.items
    }

    /// The matches' indices (output INDICES; nothing otherwise).
    pub fn indices(&self) -> impl Iterator<Item = u32> + 'a {
        let items = if self.out == output::INDICES {
            self.items
        } else {
            &[]
        };
        items.chunks_exact(4).map(|b| {
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            u32::from_le_bytes(a)
        })
    }

    /// The matches' widened values (output VALUES; nothing otherwise).
    pub fn values(&self) -> impl Iterator<Item = u64> + 'a {
        let (items, w) = match (self.out, elem::width(self.elem)) {
            (output::VALUES, Some(w)) => (self.items, w as usize),
            _ => (&[][..], 8),
        };
        let e = self.elem;
        items
            .chunks_exact(w)
            .map(move |b| elem::widen(e, b).unwrap_or(0))
    }
}

/// Reply of [`OffloadOp::Probe`]: `status u8` ([`probe`]),
/// `buckets_probed u16`, then if found `slot u8` and the value's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReply<'a> {
    /// [`probe::FOUND`], [`probe::ABSENT`] or [`probe::UNFINISHED`].
    pub status: u8,
    /// Buckets visited (the last one included).
    pub buckets: u16,
    /// The key's slot in the last bucket (if found; else 0).
    pub slot: u8,
    /// Its value (if found; else empty).
    pub value: &'a [u8],
}

impl<'a> ProbeReply<'a> {
    /// Appends the encoding.
    pub fn put(&self, out: &mut Vec<u8>) {
        out.push(self.status);
        out.extend_from_slice(&self.buckets.to_le_bytes());
        if self.status == probe::FOUND {
            out.push(self.slot);
            out.extend_from_slice(self.value);
        }
    }

    /// Decodes a DATA reply.
    pub fn decode(d: &'a [u8]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(d);
        let status = c.u8()?;
        let buckets = c.u16()?;
        let r = match status {
            probe::FOUND => {
                let slot = c.u8()?;
                return Ok(ProbeReply {
                    status,
                    buckets,
                    slot,
                    value: c.rest(),
                });
            }
            probe::ABSENT | probe::UNFINISHED => ProbeReply {
                status,
                buckets,
                slot: 0,
                value: &[],
            },
            other => return Err(DecodeError::UnknownOffload(other)),
        };
        c.finish()?;
        Ok(r)
    }
}

/// Reply of [`OffloadOp::Chase`]: `nodes u16`, `next u64` (the region
/// offset of the first node not returned, or [`CHASE_END`]), then the
/// nodes' bytes in list order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaseReply<'a> {
    /// Nodes returned.
    pub nodes: u16,
    /// Where to go on from, or [`CHASE_END`].
    pub next: u64,
    body: &'a [u8],
    node_len: usize,
}

impl<'a> ChaseReply<'a> {
    /// Bytes before the nodes.
    pub const HEAD_LEN: usize = 10;

    /// Writes the head into `buf` (its first [`ChaseReply::HEAD_LEN`]
    /// bytes), for a reply whose nodes were appended after it.
    pub fn put_head(buf: &mut [u8], nodes: u16, next: u64) {
        buf[..2].copy_from_slice(&nodes.to_le_bytes());
        buf[2..10].copy_from_slice(&next.to_le_bytes());
    }

    /// Decodes a DATA reply to a chase of nodes of `node_len` bytes.
    pub fn decode(d: &'a [u8], node_len: u16) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(d);
        let nodes = c.u16()?;
        let next = c.u64()?;
        let body = c.bytes(nodes as usize * node_len as usize)?;
        c.finish()?;
        Ok(ChaseReply {
            nodes,
            next,
            body,
            node_len: node_len as usize,
        })
    }

    /// The nodes' bytes, in list order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let body = if self.node_len == 0 {
            &[][..]
        } else {
            self.body
        };
        body.chunks_exact(self.node_len.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reply_decoders_never_panic(d in proptest::collection::vec(any::<u8>(), 0..100), e in 0u8..6, o in 0u8..4, n in any::<u16>()) {
            let _ = AggregateReply::decode(&d);
            if let Ok(f) = FilterReply::decode(&d, e, o) {
                f.indices().for_each(drop);
                f.values().for_each(drop);
            }
            let _ = ProbeReply::decode(&d);
            if let Ok(c) = ChaseReply::decode(&d, n % 32) {
                c.iter().for_each(drop);
            }
        }

        #[test]
        fn replies_roundtrip(a in any::<[u64; 4]>(), value in proptest::collection::vec(any::<u8>(), 0..40), status in 0u8..3, b in any::<u16>(), slot in any::<u8>()) {
            let agg = AggregateReply { sum: a[0], min: a[1], max: a[2], n: a[3] };
            let mut out = Vec::new();
            agg.put(&mut out);
            prop_assert_eq!(AggregateReply::decode(&out).unwrap(), agg);

            let found = status == probe::FOUND;
            let p = ProbeReply {
                status,
                buckets: b,
                slot: if found { slot } else { 0 },
                value: if found { &value } else { &[] },
            };
            let mut out = Vec::new();
            p.put(&mut out);
            prop_assert_eq!(ProbeReply::decode(&out).unwrap(), p);

            // Nodes of 4 bytes.
            let n = value.len() / 4;
            let mut out = vec![0u8; ChaseReply::HEAD_LEN];
            ChaseReply::put_head(&mut out, n as u16, a[0]);
            out.extend_from_slice(&value[..n * 4]);
            let c = ChaseReply::decode(&out, 4).unwrap();
            prop_assert_eq!((c.nodes, c.next), (n as u16, a[0]));
            prop_assert_eq!(c.iter().collect::<Vec<_>>(), value[..n * 4].chunks(4).collect::<Vec<_>>());
        }
    }

    #[test]
    fn filter_reply_items() {
        let mut out = vec![0u8; FilterReply::HEAD_LEN];
        FilterReply::put_head(&mut out, 10, 2);
        out.extend_from_slice(&(-1i32).to_le_bytes());
        out.extend_from_slice(&7i32.to_le_bytes());
        let f = FilterReply::decode(&out, elem::I32, output::VALUES).unwrap();
        assert_eq!((f.scanned, f.matched), (10, 2));
        assert_eq!(f.values().collect::<Vec<_>>(), vec![u64::MAX, 7]);
        assert_eq!(f.indices().count(), 0);
        let f = FilterReply::decode(&out, elem::U32, output::INDICES).unwrap();
        assert_eq!(f.indices().collect::<Vec<_>>(), vec![u32::MAX, 7]);
        let f = FilterReply::decode(&out, elem::U32, output::VALUES).unwrap();
        assert_eq!(f.values().collect::<Vec<_>>(), vec![u32::MAX as u64, 7]);
        // Items must match the count.
        assert!(FilterReply::decode(&out, elem::U64, output::VALUES).is_err());
        assert!(FilterReply::decode(&out, elem::U64, output::COUNT).is_err());
        assert!(FilterReply::decode(&out[..8], elem::U64, output::COUNT).is_ok());
        assert!(FilterReply::decode(&out[..8], elem::U64, 3).is_err());
        assert!(FilterReply::decode(&out[..8], 0, output::VALUES).is_err());
    }

    #[test]
    fn validation() {
        let agg = |elem, count| OffloadOp::Aggregate { elem, count };
        assert_eq!(agg(elem::U64, 1).validate(), Ok(()));
        assert_eq!(agg(9, 1).validate(), Err(OffloadError::Elem(9)));
        assert_eq!(
            agg(elem::I32, 0).validate(),
            Err(OffloadError::Zero("count"))
        );
        assert_eq!(agg(elem::I32, 4 << 20).validate(), Ok(()));
        assert!(matches!(
            agg(elem::I32, (4 << 20) + 1).validate(),
            Err(OffloadError::Limit { .. })
        ));
        let filter = |cmp, max_out, out| OffloadOp::Filter {
            elem: elem::U32,
            count: 10,
            cmp,
            operand: 0,
            max_out,
            out,
        };
        assert_eq!(filter(cmp::LT, 0, output::COUNT).validate(), Ok(()));
        assert_eq!(
            filter(cmp::LT, 0, output::INDICES).validate(),
            Err(OffloadError::Zero("max_out"))
        );
        assert_eq!(filter(0, 1, 1).validate(), Err(OffloadError::Cmp(0)));
        assert_eq!(filter(7, 1, 1).validate(), Err(OffloadError::Cmp(7)));
        assert_eq!(
            filter(cmp::GT, 1, 3).validate(),
            Err(OffloadError::Output(3))
        );
        assert_eq!(filter(cmp::GT, 100, output::VALUES).reply_bound(), 8 + 40);
        assert_eq!(filter(cmp::GT, 3, output::INDICES).reply_bound(), 8 + 12);
        let probe = |bucket_len, slots, fingerprint, key: &'static [u8]| OffloadOp::Probe {
            bucket_len,
            slots,
            key_len: 4,
            val_len: 4,
            max_buckets: 4,
            fingerprint,
            key,
        };
        assert_eq!(probe(72, 8, 2, b"abcd").validate(), Ok(()));
        assert!(matches!(
            probe(71, 8, 2, b"abcd").validate(),
            Err(OffloadError::Layout(_))
        ));
        assert!(matches!(
            probe(72, 8, 1, b"abcd").validate(),
            Err(OffloadError::Layout(_))
        ));
        assert!(matches!(
            probe(72, 8, 2, b"abc").validate(),
            Err(OffloadError::Layout(_))
        ));
        assert!(matches!(
            probe(200, 9, 2, b"abcd").validate(),
            Err(OffloadError::Limit { .. })
        ));
        assert_eq!(
            probe(72, 0, 2, b"abcd").validate(),
            Err(OffloadError::Zero("slots"))
        );
        let chase = |next_off, node_len, hops| OffloadOp::Chase {
            slab_base: 0,
            next_off,
            node_len,
            hops,
        };
        assert_eq!(chase(8, 16, 1).validate(), Ok(()));
        assert!(matches!(
            chase(9, 16, 1).validate(),
            Err(OffloadError::Layout(_))
        ));
        assert_eq!(chase(0, 8, 0).validate(), Err(OffloadError::Zero("hops")));
        assert!(matches!(
            chase(0, 8, 4097).validate(),
            Err(OffloadError::Limit { .. })
        ));
        assert!(matches!(
            chase(0, 8192, 4096).validate(),
            Err(OffloadError::Limit { .. })
        ));
        assert_eq!(chase(0, 16, 3).reply_bound(), 10 + 48);
        let copy = |len| OffloadOp::Copy {
            dest: Target {
                slab: 1,
                key: 2,
                offset: 3,
            },
            len,
        };
        assert_eq!(copy(1).validate(), Ok(()));
        assert_eq!(copy(0).validate(), Err(OffloadError::Zero("len")));
        assert!(matches!(
            copy(MAX_OFFLOAD_COPY + 1).validate(),
            Err(OffloadError::Limit { .. })
        ));
    }

    #[test]
    fn malformed_requests() {
        use crate::data::{decode_request, op, Request};
        let mut p = vec![0u8; 24];
        p.extend_from_slice(&[kind::AGGREGATE, elem::U64, 1, 0, 0, 0]);
        assert!(matches!(
            decode_request(op::OFFLOAD, &p),
            Ok(Request::Offload {
                op: OffloadOp::Aggregate { count: 1, .. },
                ..
            })
        ));
        assert_eq!(
            decode_request(op::OFFLOAD, &p[..p.len() - 1]),
            Err(DecodeError::Truncated)
        );
        p.push(0);
        assert_eq!(
            decode_request(op::OFFLOAD, &p),
            Err(DecodeError::TrailingBytes(1))
        );
        p[24] = 6;
        assert_eq!(
            decode_request(op::OFFLOAD, &p),
            Err(DecodeError::UnknownOffload(6))
        );
        assert_eq!(
            decode_request(op::OFFLOAD, &p[..24]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn local_evaluation() {
        let bytes: Vec<u8> = [-3i32, 7, -1, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let agg = OffloadOp::Aggregate {
            elem: elem::I32,
            count: 4,
        };
        assert_eq!(
            aggregate_locally(&agg, &bytes),
            Some(AggregateReply {
                sum: 3,
                min: -3i64 as u64,
                max: 7,
                n: 4
            })
        );
        assert_eq!(aggregate_locally(&agg, &bytes[4..]), None);
        let f = |cmp, max_out, out| OffloadOp::Filter {
            elem: elem::I32,
            count: 4,
            cmp,
            operand: u64::MAX,
            max_out,
            out,
        };
        let neg = vec![(0, -3i64 as u64), (2, u64::MAX)];
        assert_eq!(filter_locally(&f(cmp::LE, 9, 1), &bytes), Some((4, neg)));
        assert_eq!(
            filter_locally(&f(cmp::LE, 1, 2), &bytes),
            Some((1, vec![(0, -3i64 as u64)]))
        );
        assert_eq!(
            filter_locally(&f(cmp::GT, 0, 0), &bytes).unwrap().1.len(),
            2
        );
        assert_eq!(filter_locally(&f(9, 1, 1), &bytes), None);
        assert_eq!(filter_locally(&agg, &bytes), None);
        assert!(cmp::holds(elem::U32, cmp::GT, u64::MAX, 0));
        assert!(!cmp::holds(elem::I32, cmp::GT, u64::MAX, 0));
        assert!(!cmp::holds(elem::I32, 0, 1, 0));
    }

    #[test]
    fn widening() {
        assert_eq!(
            elem::widen(elem::I32, &(-2i32).to_le_bytes()),
            Some(-2i64 as u64)
        );
        assert_eq!(
            elem::widen(elem::U32, &u32::MAX.to_le_bytes()),
            Some(u32::MAX as u64)
        );
        assert_eq!(
            elem::widen(elem::I64, &(-5i64).to_le_bytes()),
            Some(-5i64 as u64)
        );
        assert_eq!(elem::widen(elem::U64, &[1, 2, 3, 4]), None);
        assert_eq!(elem::widen(7, &[0; 8]), None);
    }
}
