//! Remora's wire protocol, with no I/O inside (sans-IO).
//!
//! This crate owns the bytes that cross the network and nothing else: the
//! frame envelope ([`frame`]), the memory-server operations on slabs
//! ([`data`]) including those the server runs on a slab's bytes
//! ([`offload`]), the controller's control-plane messages ([`ctl`]), the typed
//! error codes both carry ([`ErrorCode`]) and size parsing shared by every
//! command line ([`size`]). It never opens a socket, spawns a thread or reads
//! a clock, so every decoder is driven directly by property tests and fuzz
//! targets. Decoding never panics on any input.
//!
//! The byte-level layout is documented in `docs/protocol.md`.

pub mod copy;
pub mod ctl;
pub mod data;
pub mod erasure;
pub mod frame;
pub mod offload;
pub mod size;

/// Magic bytes that open every handshake.
pub const MAGIC: [u8; 4] = *b"RMRA";

/// Protocol version spoken by this build. Peers with another version are refused.
pub const VERSION: u16 = 3;

/// A tenant's tag on the data plane: a stable 64-bit digest of its name
/// (FNV-1a), which the controller gives memory servers with each slab so
/// that they can count a tenant's connections without knowing tenants.
/// Never 0 (0 means "no owner").
pub fn tenant_tag(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// Why a byte sequence is not a valid frame or payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A handshake in another protocol version (its layout may differ, so
    /// only its version was read).
    #[error("protocol version {0}, not this build's {VERSION}")]
    OtherVersion(u16),
    /// Payload ended before a field.
    #[error("payload truncated")]
    Truncated,
    /// Payload has bytes after its last field.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// Frame length field is smaller than the header.
    #[error("frame length {0} is shorter than the header")]
    FrameTooShort(u32),
    /// Frame length field exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Claimed frame size.
        len: u64,
        /// Maximum accepted.
        max: u32,
    },
    /// Unknown frame or sub-operation kind.
    #[error("unknown kind 0x{0:04x}")]
    UnknownKind(u16),
    /// Handshake without the magic bytes.
    #[error("bad handshake magic")]
    BadMagic,
    /// A string field is not UTF-8.
    #[error("string is not utf-8")]
    BadUtf8,
    /// Batch claims more operations than allowed.
    #[error("batch of {0} operations exceeds the maximum")]
    TooManyOps(u32),
    /// An offloaded operation (or its reply) with an unknown code.
    #[error("unknown code {0} in an offloaded operation or its reply")]
    UnknownOffload(u8),
    /// A control-plane message did not decode.
    #[error("malformed control message: {0}")]
    Control(String),
}

macro_rules! error_codes {
    ($($(#[$m:meta])* $name:ident = $v:expr,)*) => {
        /// Typed error carried by error replies (data and control plane).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$m])* $name,)*
            /// A code this build does not know (from a newer peer).
            Unknown(u16),
        }

        impl ErrorCode {
            /// The code's wire value.
            pub fn as_u16(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $v,)*
                    ErrorCode::Unknown(v) => v,
                }
            }

            /// Decodes a wire value; unknown values are kept as [`ErrorCode::Unknown`].
            pub fn from_u16(v: u16) -> Self {
                match v {
                    $($v => ErrorCode::$name,)*
                    other => ErrorCode::Unknown(other),
                }
            }
        }
    };
}

error_codes! {
    /// The request did not decode.
    Malformed = 1,
    /// The peer speaks another protocol version.
    UnsupportedVersion = 2,
    /// The frame exceeds the maximum frame size.
    FrameTooLarge = 3,
    /// No slab with this id on this server.
    UnknownSlab = 4,
    /// The capability key does not match the slab.
    BadCapability = 5,
    /// Offset or length outside the slab or region.
    OutOfRange = 6,
    /// An atomic on an offset that is not 8-byte aligned, or an offloaded
    /// scan at an offset that is not a multiple of its element width.
    Unaligned = 7,
    /// The server has no free slab.
    OutOfCapacity = 8,
    /// The operation needs the admin key.
    NotAuthorized = 9,
    /// A slab with this id already exists.
    SlabExists = 10,
    /// An internal failure on the server.
    Internal = 11,
    /// The first frame was not a handshake.
    HandshakeRequired = 12,
    /// The server has not registered with a controller yet.
    NotReady = 13,
    /// The slab is being moved: the operation was refused (not applied);
    /// refresh the region map and retry.
    SlabFrozen = 14,
    /// The server has lost contact with the controller for longer than its
    /// lease and refuses data operations until it is confirmed a member
    /// again (it may have been declared dead and its data rebuilt elsewhere).
    Fenced = 15,
    /// The server is at a limit (connections, the tenant's connections,
    /// or its budget for buffered bytes): nothing was applied; retry later.
    Overloaded = 16,
    /// Unknown or missing tenant token.
    Unauthenticated = 20,
    /// The allocation would exceed the tenant's quota.
    QuotaExceeded = 21,
    /// No such region (for this tenant).
    RegionNotFound = 22,
    /// A region with this name already exists.
    NameTaken = 23,
    /// The cluster has not enough free memory on live servers.
    InsufficientCapacity = 24,
    /// An argument is invalid (zero size, bad name, ...).
    InvalidArgument = 25,
    /// The controller does not know this server (it must register again).
    UnknownServer = 26,
    /// Talking to a memory server failed.
    ServerUnavailable = 27,
    /// Data was on a server that died and the region has no redundancy left
    /// to rebuild it from.
    DataLost = 28,
    /// The operation is not supported on this kind of region.
    Unsupported = 29,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::Malformed => "malformed request",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::FrameTooLarge => "frame too large",
            ErrorCode::UnknownSlab => "unknown slab",
            ErrorCode::BadCapability => "bad capability",
            ErrorCode::OutOfRange => "out of range",
            ErrorCode::Unaligned => "unaligned offset",
            ErrorCode::OutOfCapacity => "server out of capacity",
            ErrorCode::NotAuthorized => "not authorized",
            ErrorCode::SlabExists => "slab exists",
            ErrorCode::Internal => "internal error",
            ErrorCode::HandshakeRequired => "handshake required",
            ErrorCode::NotReady => "server not ready",
            ErrorCode::SlabFrozen => "slab is being moved",
            ErrorCode::Fenced => "server fenced (lost contact with the controller)",
            ErrorCode::Overloaded => {
                "server overloaded (a connection or buffer limit); retry later"
            }
            ErrorCode::DataLost => "data lost",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::QuotaExceeded => "quota exceeded",
            ErrorCode::RegionNotFound => "region not found",
            ErrorCode::NameTaken => "name taken",
            ErrorCode::InsufficientCapacity => "insufficient capacity",
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::UnknownServer => "unknown server",
            ErrorCode::ServerUnavailable => "server unavailable",
            ErrorCode::Unknown(v) => return write!(f, "error code {v}"),
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_roundtrip() {
        for v in 0..64u16 {
            assert_eq!(ErrorCode::from_u16(v).as_u16(), v);
        }
    }
}
