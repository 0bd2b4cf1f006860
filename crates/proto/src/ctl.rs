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
        /// How the region survives the loss of servers.
        redundancy: Redundancy,
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
        /// How long after sending a heartbeat that the controller answered
        /// the server may keep serving data (its lease), in milliseconds.
        /// Shorter than the controller's `dead_after`, so a server cut off
        /// from the controller stops serving before it is declared dead and
        /// its data rebuilt elsewhere.
        lease_ms: u64,
        /// When set, the server must drop every slab not listed before it
        /// serves: it is new to this controller, or was declared dead and
        /// its slabs were replaced.
        keep: Option<Vec<u64>>,
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
    /// The server died and the slab's bytes are gone (until rebuilt from
    /// redundancy, which replaces this entry).
    pub lost: bool,
    /// Rebuilt from the other slabs of its group after a loss (rather than
    /// allocated, or moved as a copy of itself): it holds nothing a client
    /// sent to the slab it replaced without reaching the others.
    pub restored: bool,
}

/// How a region survives the loss of memory servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Redundancy {
    /// One copy: a dead server's slabs are lost ([`crate::ErrorCode::DataLost`]).
    #[default]
    None,
    /// `n` copies of every slab on `n` distinct servers.
    Replicate(u8),
    /// Reed–Solomon: every `data` slabs get `parity` parity slabs, the
    /// `data + parity` on distinct servers; any `parity` of them may be lost.
    Erasure {
        /// Data slabs per stripe.
        data: u8,
        /// Parity slabs per stripe.
        parity: u8,
    },
}

/// Most copies or pieces a region's slab group may have.
pub const MAX_GROUP: usize = 32;

impl Redundancy {
    /// Checks the parameters: at least 2 copies, at least 1 data and 1
    /// parity piece, at most [`MAX_GROUP`] servers per group.
    pub fn validate(self) -> Result<(), String> {
        match self {
            Redundancy::None => Ok(()),
            Redundancy::Replicate(n) if n >= 2 && n as usize <= MAX_GROUP => Ok(()),
            Redundancy::Replicate(n) => Err(format!(
                "replicate:{n}: copies must be between 2 and {MAX_GROUP}"
            )),
            Redundancy::Erasure { data, parity }
                if data >= 1 && parity >= 1 && (data as usize + parity as usize) <= MAX_GROUP =>
            {
                Ok(())
            }
            Redundancy::Erasure { data, parity } => Err(format!(
                "erasure:{data}+{parity}: need at least 1 data and 1 parity piece, at most {MAX_GROUP} in all"
            )),
        }
    }

    /// Servers a group of slabs spans (1, the copies, or data + parity).
    pub fn width(self) -> usize {
        match self {
            Redundancy::None => 1,
            Redundancy::Replicate(n) => n as usize,
            Redundancy::Erasure { data, parity } => data as usize + parity as usize,
        }
    }

    /// Servers that may be lost without losing data.
    pub fn tolerates(self) -> usize {
        match self {
            Redundancy::None => 0,
            Redundancy::Replicate(n) => n as usize - 1,
            Redundancy::Erasure { parity, .. } => parity as usize,
        }
    }

    /// Slabs beyond the data slabs for a region of `data_slabs` slabs.
    pub fn extra_slabs(self, data_slabs: u64) -> u64 {
        match self {
            Redundancy::None => 0,
            Redundancy::Replicate(n) => data_slabs * (n as u64 - 1),
            Redundancy::Erasure { data, parity } => {
                data_slabs.div_ceil(data.max(1) as u64) * parity as u64
            }
        }
    }
}

impl std::fmt::Display for Redundancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Redundancy::None => f.write_str("none"),
            Redundancy::Replicate(n) => write!(f, "replicate:{n}"),
            Redundancy::Erasure { data, parity } => write!(f, "erasure:{data}+{parity}"),
        }
    }
}

impl std::str::FromStr for Redundancy {
    type Err = String;

    /// Parses `none`, `replicate:N` or `erasure:K+M`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid redundancy {s:?}: use none, replicate:N or erasure:K+M");
        let r = if s == "none" {
            Redundancy::None
        } else if let Some(n) = s.strip_prefix("replicate:") {
            Redundancy::Replicate(n.parse().map_err(|_| bad())?)
        } else if let Some(km) = s.strip_prefix("erasure:") {
            let (k, m) = km.split_once('+').ok_or_else(bad)?;
            Redundancy::Erasure {
                data: k.parse().map_err(|_| bad())?,
                parity: m.parse().map_err(|_| bad())?,
            }
        } else {
            return Err(bad());
        };
        r.validate()?;
        Ok(r)
    }
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
    /// Bumped whenever a slab moves, is lost or is rebuilt.
    pub version: u64,
    /// How the region survives the loss of servers.
    pub redundancy: Redundancy,
    /// Data slabs in region order (with replication: each slab's first copy).
    pub slabs: Vec<SlabLoc>,
    /// The redundant slabs. Replicate(n): the other n−1 copies of slab `i`
    /// at `[i*(n-1), (i+1)*(n-1))`. Erasure{data k, parity m}: the m parity
    /// slabs of stripe `s` (data slabs `[s*k, (s+1)*k)`) at `[s*m, (s+1)*m)`.
    pub extra: Vec<SlabLoc>,
}

impl RegionMap {
    /// Every slab of the region, data slabs first, then the redundant ones;
    /// a piece's position here is its index for [`CtlRequest::MoveSlab`].
    pub fn pieces(&self) -> impl Iterator<Item = &SlabLoc> {
        self.slabs.iter().chain(self.extra.iter())
    }

    /// The piece at `index` in [`RegionMap::pieces`] order.
    pub fn piece_mut(&mut self, index: usize) -> Option<&mut SlabLoc> {
        let n = self.slabs.len();
        if index < n {
            self.slabs.get_mut(index)
        } else {
            self.extra.get_mut(index - n)
        }
    }

    /// Indexes (in [`RegionMap::pieces`] order) of the group that piece
    /// `index` belongs to: the copies of one slab, or one stripe's data and
    /// parity slabs; the piece itself included. A region without
    /// redundancy has groups of one.
    pub fn group_of(&self, index: usize) -> Vec<usize> {
        let n = self.slabs.len();
        match self.redundancy {
            Redundancy::None => vec![index],
            Redundancy::Replicate(c) => {
                let c = c as usize - 1;
                let slab = if index < n {
                    index
                } else {
                    (index - n) / c.max(1)
                };
                std::iter::once(slab)
                    .chain((0..c).map(|j| n + slab * c + j))
                    .collect()
            }
            Redundancy::Erasure { data, parity } => {
                let (k, m) = (data as usize, parity as usize);
                let stripe = if index < n {
                    index / k
                } else {
                    (index - n) / m
                };
                (stripe * k..((stripe + 1) * k).min(n))
                    .chain((0..m).map(|j| n + stripe * m + j))
                    .collect()
            }
        }
    }

    /// Number of pieces marked lost.
    pub fn lost(&self) -> usize {
        self.pieces().filter(|l| l.lost).count()
    }
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
    /// Redundancy scheme.
    pub redundancy: Redundancy,
    /// Slabs (data and redundant) lost and not yet rebuilt.
    pub lost: u64,
    /// Slabs in all, data and redundant.
    pub pieces: u64,
    /// Slabs not marked lost whose server is not serving: the controller
    /// is waiting for it (it has not registered since the controller
    /// started, or has not finished joining; see [`ServerInfo::waiting`]).
    /// A region with pieces at risk is not healthy.
    pub at_risk: u64,
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
    /// Whether heartbeats arrive in time (and the server has joined: it
    /// takes new slabs and serves those of the maps).
    pub alive: bool,
    /// Milliseconds since the last heartbeat (for a server the controller
    /// is waiting for, since the controller started waiting).
    pub last_seen_ms: u64,
    /// The controller is waiting for this server: the region maps name it
    /// but it has not registered with this controller (which restarted),
    /// or it registered and has not finished joining. Not yet declared
    /// dead (`alive` is false): its slabs are at risk, not lost.
    pub waiting: bool,
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
    /// Lost slabs rebuilt since the controller started.
    pub rebuilt_slabs: u64,
    /// Bytes the rebuilds read and wrote since the controller started.
    pub rebuilt_bytes: u64,
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

    #[test]
    fn redundancy_rejects_nonsense() {
        for s in [
            "",
            "replicate:1",
            "replicate:x",
            "erasure:4",
            "erasure:0+2",
            "erasure:4+0",
            "erasure:30+3",
            "mirror",
        ] {
            assert!(s.parse::<Redundancy>().is_err(), "{s}");
        }
    }

    fn loc(slab: u64) -> SlabLoc {
        SlabLoc {
            server_id: slab,
            addr: String::new(),
            slab,
            key: 1,
            lost: false,
            restored: false,
        }
    }

    #[test]
    fn groups() {
        let mut m = RegionMap {
            id: 1,
            name: None,
            size: 5,
            slab_size: 1,
            version: 1,
            redundancy: Redundancy::Replicate(3),
            slabs: (0..5).map(loc).collect(),
            extra: (5..15).map(loc).collect(),
        };
        assert_eq!(m.group_of(1), vec![1, 7, 8]);
        assert_eq!(m.group_of(8), vec![1, 7, 8]);
        m.redundancy = Redundancy::Erasure { data: 2, parity: 2 };
        m.extra = (5..11).map(loc).collect();
        assert_eq!(m.group_of(4), vec![4, 9, 10]);
        assert_eq!(m.group_of(6), vec![0, 1, 5, 6]);
        assert_eq!(m.pieces().count(), 11);
        assert_eq!(Redundancy::Erasure { data: 2, parity: 2 }.extra_slabs(5), 6);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(&payload);
            let _ = decode_reply(&payload);
        }

        #[test]
        fn redundancy_parses(k in 1u8..20, m in 1u8..12, n in 2u8..32) {
            for r in [Redundancy::None, Redundancy::Replicate(n), Redundancy::Erasure { data: k, parity: m }] {
                prop_assert_eq!(r.to_string().parse::<Redundancy>().unwrap(), r);
            }
        }

        #[test]
        fn roundtrip(size in any::<u64>(), name in proptest::option::of("[a-z]{0,12}"), key in any::<u64>()) {
            let reqs = vec![
                CtlRequest::ClientHello { version: 1, token: "t".into() },
                CtlRequest::Alloc { size, name: name.clone(), redundancy: Redundancy::Erasure { data: 4, parity: 2 } },
                CtlRequest::Register { version: 1, server_id: key, addr: "a:1".into(), admin_key: size, capacity: 3, secret: Some("s".into()), slabs_used: 2 },
            ];
            for r in reqs {
                let mut out = Vec::new();
                encode(&mut out, 1, CTL_REQUEST, &r);
                let payload = &out[crate::frame::HEADER_LEN..];
                prop_assert_eq!(decode_request(payload).unwrap(), r);
            }
            let map = CtlReply::Region(RegionMap { id: 1, name, size, slab_size: 4096, version: 2,
                redundancy: Redundancy::Replicate(2),
                slabs: vec![SlabLoc { server_id: 1, addr: "x".into(), slab: 9, key, lost: false, restored: false }],
                extra: vec![SlabLoc { server_id: 2, addr: "y".into(), slab: 10, key, lost: true, restored: false }] });
            let mut out = Vec::new();
            encode(&mut out, 1, CTL_REPLY, &map);
            prop_assert_eq!(decode_reply(&out[crate::frame::HEADER_LEN..]).unwrap(), map);
        }
    }
}
