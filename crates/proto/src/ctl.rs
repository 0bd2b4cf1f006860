//! Control-plane messages between clients, memory servers and the controller.
//!
//! They travel in the same frame envelope as data operations (kind
//! [`CTL_REQUEST`] / [`CTL_REPLY`]); the payload is the `postcard` encoding of
//! [`CtlRequest`] or [`CtlReply`]. Postcard's format is specified and stable
//! (varint integers, enum variants by index), so the wire format changes only
//! when these types change: variants and fields are only ever appended, and
//! [`crate::VERSION`] is bumped otherwise. The control plane is never on the
//! data path, so its encoding may allocate.

use serde::{Deserialize, Serialize};

use crate::frame::{begin_frame, finish_frame};
use crate::{DecodeError, ErrorCode};

/// Frame kind of a control request.
pub const CTL_REQUEST: u16 = 0x40;
/// Frame kind of a control reply.
pub const CTL_REPLY: u16 = 0xC0;

/// A request to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlRequest {
    /// First message of a client connection: authenticate as a tenant.
    ClientHello {
        /// Protocol version.
        version: u16,
        /// The tenant's secret token.
        token: String,
    },
    /// First message of a memory server's connection: join the cluster.
    Register {
        /// Protocol version.
        version: u16,
        /// Server id, random per server process.
        server_id: u64,
        /// Address clients and the controller reach the server at.
        addr: String,
        /// Key that authorizes control operations on the server.
        admin_key: u64,
        /// Capacity in bytes.
        capacity: u64,
        /// The cluster secret, if the controller requires one.
        secret: Option<String>,
        /// Slabs the server already holds (after a controller restart).
        slabs_used: u64,
    },
    /// Periodic liveness and usage report from a server.
    Heartbeat {
        /// Server id.
        server_id: u64,
        /// Slabs in use.
        slabs_used: u64,
        /// Slabs the capacity holds.
        slabs_total: u64,
    },
    /// Allocate a region of `size` bytes, optionally named.
    Alloc {
        /// Size in bytes.
        size: u64,
        /// Name, unique within the tenant.
        name: Option<String>,
    },
    /// Free a region and its slabs.
    Free {
        /// Region id.
        region: u64,
    },
    /// Find a named region of the caller's tenant.
    Open {
        /// Region name.
        name: String,
    },
    /// Fetch the current map of a region.
    GetMap {
        /// Region id.
        region: u64,
    },
    /// List the caller's regions.
    List,
    /// Cluster status: servers, tenants, the caller's regions.
    Status,
    /// Move one slab of a region to another server (for rebalancing and
    /// reclamation). Writes to the slab pause while it is copied.
    MoveSlab {
        /// Region id.
        region: u64,
        /// Index of the slab in the region map.
        index: u64,
        /// Destination server address (`None`: chosen by placement).
        to: Option<String>,
    },
}

/// A reply from the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlReply {
    /// Client accepted.
    Welcome {
        /// Tenant the token belongs to.
        tenant: String,
    },
    /// Server registered.
    Registered {
        /// Slab size the server must carve its capacity into.
        slab_size: u64,
        /// How often to heartbeat, in milliseconds.
        heartbeat_ms: u64,
    },
    /// Request done.
    Ack,
    /// A region map.
    Region(RegionMap),
    /// Region summaries.
    Regions(Vec<RegionInfo>),
    /// Cluster status.
    Status(ClusterStatus),
    /// The request failed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Detail for humans.
        message: String,
    },
}

/// Where one slab of a region lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SlabLoc {
    /// Server id.
    pub server_id: u64,
    /// Server address.
    pub addr: String,
    /// Slab id.
    pub slab: u64,
    /// Capability key.
    pub key: u64,
}

/// The region→slab map: slab `i` holds region bytes `[i*slab_size, (i+1)*slab_size)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMap {
    /// Region id.
    pub id: u64,
    /// Optional name.
    pub name: Option<String>,
    /// Size in bytes as requested.
    pub size: u64,
    /// Bytes per slab.
    pub slab_size: u64,
    /// Bumped whenever a slab moves.
    pub version: u64,
    /// Slabs in region order.
    pub slabs: Vec<SlabLoc>,
}

/// A region summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Region id.
    pub id: u64,
    /// Optional name.
    pub name: Option<String>,
    /// Owning tenant.
    pub tenant: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of slabs.
    pub slabs: u64,
    /// Map version.
    pub version: u64,
}

/// One memory server as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Server id.
    pub id: u64,
    /// Address.
    pub addr: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Slabs the capacity holds.
    pub slabs_total: u64,
    /// Slabs in use.
    pub slabs_used: u64,
    /// Whether heartbeats arrive in time.
    pub alive: bool,
    /// Milliseconds since the last heartbeat.
    pub last_seen_ms: u64,
}

/// One tenant as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    /// Name.
    pub name: String,
    /// Far-memory quota in bytes (`None`: unlimited).
    pub quota: Option<u64>,
    /// Bytes allocated (whole slabs).
    pub used: u64,
    /// Number of regions.
    pub regions: u64,
}

/// Cluster status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster slab size.
    pub slab_size: u64,
    /// Placement policy in force.
    pub placement: String,
    /// Servers.
    pub servers: Vec<ServerInfo>,
    /// Tenants.
    pub tenants: Vec<TenantInfo>,
    /// The caller's regions.
    pub regions: Vec<RegionInfo>,
}

/// Appends a control frame of `kind` carrying `msg`.
pub fn encode<T: Serialize>(out: &mut Vec<u8>, id: u64, kind: u16, msg: &T) {
    let start = begin_frame(out, id, kind);
    // Serializing these plain types into a Vec cannot fail; an error would
    // mean a bug in the types, so the frame is left empty and the peer
    // answers Malformed rather than this side panicking.
    if let Ok(v) = postcard::to_stdvec(msg) {
        out.extend_from_slice(&v);
    }
    finish_frame(out, start);
}

fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    let (v, rest) =
        postcard::take_from_bytes(payload).map_err(|e| DecodeError::Control(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(v)
}

/// Decodes a control request payload.
pub fn decode_request(payload: &[u8]) -> Result<CtlRequest, DecodeError> {
    decode(payload)
}

/// Decodes a control reply payload.
pub fn decode_reply(payload: &[u8]) -> Result<CtlReply, DecodeError> {
    decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(&payload);
            let _ = decode_reply(&payload);
        }

        #[test]
        fn roundtrip(size in any::<u64>(), name in proptest::option::of("[a-z]{0,12}"), key in any::<u64>()) {
            let reqs = vec![
                CtlRequest::ClientHello { version: 1, token: "t".into() },
                CtlRequest::Alloc { size, name: name.clone() },
                CtlRequest::Register { version: 1, server_id: key, addr: "a:1".into(), admin_key: size, capacity: 3, secret: Some("s".into()), slabs_used: 2 },
            ];
            for r in reqs {
                let mut out = Vec::new();
                encode(&mut out, 1, CTL_REQUEST, &r);
                let payload = &out[crate::frame::HEADER_LEN..];
                prop_assert_eq!(decode_request(payload).unwrap(), r);
            }
            let map = CtlReply::Region(RegionMap { id: 1, name, size, slab_size: 4096, version: 2,
                slabs: vec![SlabLoc { server_id: 1, addr: "x".into(), slab: 9, key }] });
            let mut out = Vec::new();
            encode(&mut out, 1, CTL_REPLY, &map);
            prop_assert_eq!(decode_reply(&out[crate::frame::HEADER_LEN..]).unwrap(), map);
        }
    }
}
